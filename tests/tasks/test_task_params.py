"""Task parameters a user can set: types, checking, merging, induction's `vocab`, tasks
over token ids without a tokenizer, and prompts that must fit the model."""
from __future__ import annotations

import json

import pytest
import torch

from circuitlang.errors import TaskError
from circuitlang.sites import ModelShape
from circuitlang.tasks import (get_signature, list_tasks, load_task, merge_task_params,
                               task_class, validate_task_params)
from circuitlang.tasks.params import RUN_OPTIONS, describe_params, param_types

SHAPE = ModelShape(n_layers=2, n_heads=4, d_model=16, d_head=4, vocab_size=50257, n_ctx=64,
                   name="tiny")


def test_every_built_in_parameter_has_a_declared_type():
    for name in list_tasks():
        cls = task_class(name)
        assert set(cls.PARAM_TYPES) == set(cls.PARAMS), name
        kinds = param_types(cls)
        assert {"prepend_bos", "n", "seed"} <= set(kinds)
        assert all(k.kind != "any" for k in kinds.values()), name
        assert not {p["name"] for p in describe_params(cls)} & set(RUN_OPTIONS)


def test_unknown_parameters_list_the_valid_ones_with_types():
    with pytest.raises(TaskError) as info:
        validate_task_params("induction", {"colour": 3})
    assert info.value.message == "task induction has no parameter 'colour'"
    assert info.value.hint == ("parameters of induction: length (int), tokens (list[str]), "
                               "vocab (int), prepend_bos (bool)")


@pytest.mark.parametrize("task, params, fragment", [
    ("induction", {"length": "20"}, "length must be a whole number, got '20' (str)"),
    ("induction", {"length": True}, "length must be a whole number, got true (bool)"),
    ("induction", {"prepend_bos": 1}, "prepend_bos must be true or false, got 1 (int)"),
    ("induction", {"tokens": "abc"}, "tokens must be a list such as"),
    ("ioi", {"templates": [0, "x"]}, "templates must be a non-empty list of whole numbers"),
    ("ioi", {"template_set": "AABB"}, "template_set must be one of both, ABBA, BABA"),
    ("custom", {"path": 3}, "path must be a file path"),
])
def test_values_of_the_wrong_type_are_refused(task, params, fragment):
    with pytest.raises(TaskError, match=fragment.replace("[", "\\[").replace("(", "\\(")
                       .replace(")", "\\)")):
        validate_task_params(task, params)


def test_the_same_types_hold_for_python_callers():
    with pytest.raises(TaskError, match="length must be a whole number"):
        load_task("induction", length="20")
    assert load_task("ioi", templates=range(3)).templates == (0, 1, 2)


@pytest.mark.parametrize("name", ["n", "seed"])
def test_run_options_are_not_task_parameters(name):
    with pytest.raises(TaskError, match=f"{name} is a run option") as info:
        validate_task_params("ioi", {name: 3})
    assert ("samples N" if name == "n" else "seed N") in info.value.hint


def test_the_caller_beats_the_file_and_is_checked():
    file_params = (("length", 20), ("vocab", 32))
    assert merge_task_params("induction", file_params, {"length": 8}) == {"length": 8,
                                                                         "vocab": 32}
    assert merge_task_params("induction", file_params) == {"length": 20, "vocab": 32}
    with pytest.raises(TaskError, match="no parameter 'lenght' \\(--task-param\\)"):
        merge_task_params("induction", file_params, {"lenght": 8}, source="--task-param")
    # lists come back as tuples (hashable, as in the IR); decimals as numbers
    assert validate_task_params("ioi", {"templates": [0, 1]}) == {"templates": (0, 1)}


# ------------------------------------------------------------------ induction


def test_induction_vocab_samples_the_first_non_special_ids(gpt2_tokenizer):
    task = load_task("induction", gpt2_tokenizer, length=5, vocab=12, n=30)
    prompts = task.prompts()
    seen = {t for spec in prompts.specs for t in spec.tokens}
    assert seen <= set(range(12)) and len(seen) > 6
    assert task.candidates == tuple(range(12))  # GPT-2's only special token is 50256
    with pytest.raises(TaskError, match="not both"):
        load_task("induction", gpt2_tokenizer, vocab=12, tokens=["Ġthe", "Ġa"])
    with pytest.raises(TaskError, match="has only 50256 non-special tokens"):
        load_task("induction", gpt2_tokenizer, vocab=60000)
    with pytest.raises(TaskError, match="at least length\\+1"):
        load_task("induction", gpt2_tokenizer, vocab=5, length=5)


def test_induction_builds_token_ids_without_a_tokenizer():
    # a model folder with weights and no tokenizer: induction is over ids, so it runs
    task = load_task("induction", length=4, vocab=20, n=6, prepend_bos=False)
    prompts = task.prompts()
    assert prompts.input_ids.shape == (6, 8)
    for i, spec in enumerate(prompts.specs):
        assert prompts.input_ids[i].tolist() == list(spec.tokens) * 2
        assert max(spec.tokens) < 20
    assert int(prompts.positions["END"][0]) == 7 and int(prompts.positions["REPEAT"][0]) == 4
    assert prompts.texts[0].split() == [task._words[t] for t in prompts.specs[0].ids]
    wide = load_task("induction", length=3, vocab=200, n=4).prompts()
    assert any("<" in text for text in wide.texts)  # ids past the word list show as <id>


def test_text_tasks_without_a_tokenizer_say_how_to_give_one():
    with pytest.raises(TaskError, match="without a tokenizer") as info:
        load_task("ioi", n=2).prompts()
    assert "--tokenizer PATH" in info.value.hint


# ------------------------------------------------------------------ custom, ids


def _write(tmp_path, records, name="pairs.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


ID_RECORDS = [
    {"clean": [50256, 464, 3290, 318], "corrupt": [50256, 464, 3797, 318], "answers": [257],
     "positions": {"SUBJ": 2, "LAST": -1}, "features": {"animal": "dog"}},
    {"clean": [50256, 464, 2415, 318], "corrupt": [50256, 464, 3797, 318], "answers": 257,
     "positions": {"SUBJ": 2, "LAST": -1}, "features": {"animal": "woman"}},
]


def test_token_id_records_need_no_tokenizer(tmp_path):
    path = _write(tmp_path, ID_RECORDS)
    sig = get_signature(str(path))
    assert sig.positions == ("SUBJ", "LAST", "END")
    # no wrong answers: the metrics that need none, answer_logit by default
    assert sig.metrics == ("answer_logit", "answer_prob", "loss", "kl")
    assert sig.default_metric == "answer_logit"
    prompts = load_task(str(path)).prompts()
    assert prompts.input_ids.tolist() == [r["clean"] for r in ID_RECORDS]  # no BOS added
    assert prompts.corrupt_input_ids.tolist() == [r["corrupt"] for r in ID_RECORDS]
    assert prompts.positions["SUBJ"].tolist() == [2, 2]
    assert prompts.positions["LAST"].tolist() == [3, 3] == prompts.positions["END"].tolist()
    assert prompts.answers.tolist() == [[257], [257]]
    assert prompts.features["animal"] == ["dog", "woman"]
    assert prompts.texts[0] == "50256 464 3290 318"


def test_token_id_records_are_decoded_for_display_with_a_tokenizer(tmp_path, gpt2_tokenizer):
    prompts = load_task(str(_write(tmp_path, ID_RECORDS)), gpt2_tokenizer).prompts()
    assert prompts.texts == ("<|endoftext|>The dog is", "<|endoftext|>The woman is")
    assert prompts.input_ids[0].tolist() == ID_RECORDS[0]["clean"]


def test_answer_metrics_need_no_wrong_answer(tmp_path):
    prompts = load_task(str(_write(tmp_path, ID_RECORDS))).prompts()
    task = load_task(str(tmp_path / "pairs.jsonl"))
    logits = torch.randn(2, 4, 300)
    end = logits[:, -1]
    got = task.metric("answer_logit", logits, prompts)
    assert torch.allclose(got, end[:, 257])
    probs = task.metric("answer_prob", logits, prompts)
    assert torch.allclose(probs, end.softmax(-1)[:, 257])
    assert task.metric_direction("answer_logit") == task.metric_direction("answer_prob") == 1
    with pytest.raises(TaskError, match="no metric 'logit_diff'"):
        task.metric("logit_diff", logits, prompts)


def test_text_records_may_give_answers_as_ids(tmp_path, gpt2_tokenizer):
    path = _write(tmp_path, [{"clean": "The dog is", "corrupt": "The cat is",
                              "answers": [257], "wrong_answers": " not"}])
    prompts = load_task(str(path), gpt2_tokenizer).prompts()
    assert prompts.answers.tolist() == [[257]]
    assert gpt2_tokenizer.decode(prompts.wrong_answers[0].tolist()) == " not"
    assert get_signature(str(path)).default_metric == "logit_diff"


@pytest.mark.parametrize("record, fragment", [
    ({"clean": [1, 2], "corrupt": [1], "answers": [3]}, "'corrupt' has 1 token ids, 'clean' has 2"),
    ({"clean": [1, -2], "corrupt": [1, 2], "answers": [3]}, "must be a non-empty list of token ids"),
    ({"clean": [1, 2], "corrupt": [1, 2], "answers": [" x"]},
     "'answers' of a token-id record must be a token id"),
    ({"clean": [1, 2], "corrupt": [1, 2], "answers": [3], "positions": {"P": 2}},
     "position 'P' must be a token index of 'clean' \\(0-1"),
])
def test_bad_token_id_records_are_refused_at_their_line(tmp_path, record, fragment):
    path = _write(tmp_path, [record])
    with pytest.raises(TaskError, match=fragment) as info:
        load_task(str(path))
    assert info.value.span.line == 1


def test_a_file_that_is_not_utf8_is_a_task_error_at_its_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    good = json.dumps({"clean": "a b", "corrupt": "c d", "answers": " x"})
    path.write_bytes((good + "\n" + good.replace("a b", "caf\xe9") + "\n").encode("latin-1"))
    with pytest.raises(TaskError, match="not UTF-8 text") as info:
        get_signature(str(path))
    assert info.value.span.line == 2 and str(info.value).startswith(f"{path}:2:1: error:")


# ------------------------------------------------------------------ fitting the model


def test_prompts_longer_than_the_context_are_refused_when_built(gpt2_tokenizer):
    short = ModelShape(n_layers=2, n_heads=4, d_model=16, d_head=4, vocab_size=50257,
                       n_ctx=16, name="short")
    task = load_task("induction", gpt2_tokenizer, length=10, n=3).for_model(short)
    with pytest.raises(TaskError) as info:
        task.prompts()
    assert info.value.message.startswith(
        "the longest prompt is 21 tokens, but model short reads at most 16 (its context "
        "length)")
    assert "length=" in info.value.hint
    load_task("induction", gpt2_tokenizer, length=7, n=3).for_model(short).prompts()  # 15 fit


def test_token_ids_outside_the_vocabulary_are_refused_when_built(tmp_path):
    small = ModelShape(n_layers=2, n_heads=4, d_model=16, d_head=4, vocab_size=300, n_ctx=64,
                       name="small")
    task = load_task(str(_write(tmp_path, ID_RECORDS))).for_model(small)
    with pytest.raises(TaskError, match="token id 50,256, outside model small's vocabulary "
                       "of 300 ids"):
        task.prompts()
    task = load_task("induction", length=4, n=3, vocab=400).for_model(small)
    with pytest.raises(TaskError, match="outside model small's vocabulary"):
        task.prompts()
    load_task("induction", length=4, n=3, vocab=300).for_model(small).prompts()
