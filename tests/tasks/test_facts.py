"""The factual-recall task: JSONL records, subject spans by token, clear errors for bad records."""
from __future__ import annotations

import json

import pytest
import torch

from circuitlang.errors import TaskError
from circuitlang.tasks import get_signature, list_tasks, load_task
from circuitlang.tasks.facts import subject_span, synthetic_facts


def _write(tmp_path, records, name="facts.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")
    return path


def test_registered_with_its_positions_and_default_metric():
    assert "facts" in list_tasks()
    sig = get_signature("facts")
    assert sig.positions == ("SUBJ_FIRST", "SUBJ_LAST", "END")
    assert sig.default_metric == "answer_prob"


def test_bpe_subject_span_is_every_token_of_the_subject(tmp_path, gpt2_tokenizer):
    path = _write(tmp_path, [
        {"subject": "Miles Davis", "relation": "plays the", "object": "trumpet"},
        {"subject": "The Eiffel Tower", "prompt": "{} is located in the city of", "object": "Paris"},
        {"subject": "Danielle Darrieux", "prompt": "The mother tongue of {} is", "object": "French"},
    ])
    task = load_task("facts", tokenizer=gpt2_tokenizer, path=str(path), prepend_bos=False)
    prompts = task.prompts()
    assert prompts.texts[2] == "The mother tongue of Danielle Darrieux is"
    span = subject_span(prompts)
    for i, spec in enumerate(prompts.specs):
        ids = prompts.input_ids[i][span[i]].tolist()
        assert gpt2_tokenizer.decode(ids).strip() == spec.subject
        assert int(prompts.positions["SUBJ_LAST"][i]) == int(torch.nonzero(span[i]).max())
    # the subject of record 3 starts after "The mother tongue of": 4 tokens in
    assert int(prompts.positions["SUBJ_FIRST"][2]) == 4
    assert prompts.answers[0, 0] == gpt2_tokenizer.encode(" trumpet")[0]


def test_bad_records_name_the_line_and_what_was_expected(tmp_path):
    cases = [
        ({"subject": "A", "object": "b"}, "exactly one of 'relation' and 'prompt', got neither"),
        ({"subject": "A", "relation": "r", "prompt": "{} r", "object": "b"}, "got both"),
        ({"subject": "", "relation": "r", "object": "b"}, "field 'subject' must be a non-empty string"),
        ({"subject": "A", "relation": "r"}, "field 'object' must be a non-empty string, got nothing"),
        ({"subject": "A", "prompt": "no slot", "object": "b"}, "must hold {} exactly once"),
        ({"subject": "A", "relation": "r", "object": "b", "answer": 1}, "no field 'answer'"),
        ("[1, 2]", "must be a JSON object"),
        ("{not json", "not valid JSON"),
    ]
    good = {"subject": "A", "relation": "r", "object": "b"}
    for record, message in cases:
        path = _write(tmp_path, [good, record])
        with pytest.raises(TaskError) as err:
            load_task("facts", path=str(path))
        assert message in err.value.message, (record, err.value.message)
        assert err.value.span.line == 2
        assert err.value.hint


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(TaskError, match="cannot read facts file"):
        load_task("facts", path=str(tmp_path / "none.jsonl"))
    with pytest.raises(TaskError, match="has no records"):
        load_task("facts", path=str(_write(tmp_path, [""])))


def test_builtin_facts_on_toy_facts_tokenizer():
    from circuitlang.models import load_model

    lm = load_model("toy-facts")
    task = load_task("facts", tokenizer=lm.tokenizer)
    prompts = task.prompts()
    assert len(prompts) == len(synthetic_facts()) == 144 and not prompts.dropped.count
    width = prompts.positions["SUBJ_LAST"] - prompts.positions["SUBJ_FIRST"] + 1
    assert set(width.tolist()) == {2, 3}  # subjects of two and three tokens
    # the counterfactual is another subject of as many tokens, same relation, other object
    for spec, corrupt in zip(prompts.specs, prompts.corrupt_specs):
        assert corrupt.template == spec.template and corrupt.subject != spec.subject
        assert len(corrupt.subject.split()) == len(spec.subject.split())
    assert bool((prompts.wrong_answers[:, 0] >= 0).all())
    assert bool((prompts.wrong_answers[:, 0] != prompts.answers[:, 0]).all())
