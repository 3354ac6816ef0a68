"""Greater-than with the real GPT-2 tokenizer: years split as the paper requires."""
from __future__ import annotations

import pytest
import torch

from circuitlang.errors import TaskError
from circuitlang.tasks import load_task
from circuitlang.tasks.greater_than import GreaterThanSpec


def _splits(tok, xx, yy):
    pieces = tok.convert_ids_to_tokens(tok.encode(f"the year {xx}{yy:02d}"))
    return pieces[-2:] == [f"Ġ{xx}", f"{yy:02d}"] and len(pieces) == 4


def test_spec_text_and_features():
    spec = GreaterThanSpec(noun="war", xx=17, yy=32)
    assert spec.text == "The war lasted from the year 1732 to the year 17"
    assert spec.features() == {"YY": 32, "XX": 17, "noun": "war", "year": 1732}
    assert spec.answer_texts()[0] == "33" and spec.answer_texts()[-1] == "99"
    assert spec.wrong_answer_texts() == tuple(f"{y:02d}" for y in range(33))


def test_years_tokenize_as_the_paper_requires(gpt2_tokenizer):
    tok = gpt2_tokenizer
    task = load_task("greater_than", tok)
    kept = [(xx, yy) for xx, yys in task.valid.items() for yy in yys]
    assert len(kept) > 500
    assert all(_splits(tok, xx, yy) for xx, yy in kept)
    for year in task.dropped_years:
        xx, yy = divmod(year, 100)
        assert not _splits(tok, xx, yy) or not _splits(tok, xx, 1)
    assert task.dropped_years  # GPT-2 does merge some, e.g. 1109 -> " 110" + "9"
    prompts = task.prompts(60)
    assert prompts.dropped.count == 0
    for i, spec in enumerate(prompts.specs):
        ids = prompts.input_ids[i].tolist()
        at = {p: tok.decode([ids[int(v[i])]]) for p, v in prompts.positions.items()}
        assert at["XX1"] == f" {spec.xx}" and at["YY"] == f"{spec.yy:02d}"
        assert at["XX2"] == at["END"] == f" {spec.xx}"
        assert at["NOUN"].strip() in spec.noun


def test_counterfactual_is_yy_01_and_aligned(gpt2_tokenizer):
    task = load_task("greater_than", gpt2_tokenizer, n=30)
    prompts = task.prompts()
    for i, (clean, corrupt) in enumerate(zip(prompts.specs, prompts.corrupt_specs)):
        assert corrupt == GreaterThanSpec(clean.noun, clean.xx, 1)
        assert corrupt.text.endswith(f"from the year {clean.xx}01 to the year {clean.xx}")
        changed = (prompts.input_ids[i] != prompts.corrupt_input_ids[i]).nonzero().flatten()
        assert changed.tolist() == [int(prompts.positions["YY"][i])]


def test_answers_are_the_two_digit_tokens(gpt2_tokenizer):
    tok = gpt2_tokenizer
    task = load_task("greater_than", tok)
    prompts = task.build([GreaterThanSpec("war", 17, 32)])
    answers = [tok.decode([t]) for t in prompts.answers[0].tolist() if t >= 0]
    wrong = [tok.decode([t]) for t in prompts.wrong_answers[0].tolist() if t >= 0]
    assert answers == [f"{y:02d}" for y in range(33, 100)]
    assert wrong == [f"{y:02d}" for y in range(0, 33)]


def test_prob_diff_on_hand_made_logits(gpt2_tokenizer):
    tok = gpt2_tokenizer
    task = load_task("greater_than", tok)
    prompts = task.build([GreaterThanSpec("war", 17, 32)] * 3)
    vocab = len(tok)
    logits = torch.full((3, prompts.input_ids.shape[1], vocab), -1e4)
    end = int(prompts.positions["END"][0])
    logits[0, end, tok.convert_tokens_to_ids("99")] = 10.0  # all mass above 32
    logits[1, end, tok.convert_tokens_to_ids("05")] = 10.0  # all mass at or below 32
    logits[2, end, tok.convert_tokens_to_ids("50")] = 10.0  # half above, half below
    logits[2, end, tok.convert_tokens_to_ids("10")] = 10.0
    values = task.metric("prob_diff", logits, prompts)
    assert values.tolist() == pytest.approx([1.0, -1.0, 0.0], abs=1e-4)
    assert task.metric_direction("prob_diff") == 1
    loss = task.metric("loss", logits, prompts)
    assert loss[0].item() == pytest.approx(0.0, abs=1e-4)
    assert loss[2].item() == pytest.approx(torch.log(torch.tensor(2.0)).item(), abs=1e-4)


def test_bad_years_are_rejected():
    with pytest.raises(TaskError, match="years must be integers 1-98"):
        load_task("greater_than", years=[0, 50])
