"""Custom tasks: JSONL prompt pairs, their validation, and user-named Python modules."""
from __future__ import annotations

import json

import pytest

from circuitlang.errors import TaskError
from circuitlang.tasks import get_signature, list_tasks, load_task, load_task_module

GOOD = [
    {"clean": "When Mary and John went to the store, John gave a drink to",
     "corrupt": "When Alice and Bob went to the store, Carl gave a drink to",
     "answers": [" Mary"], "wrong_answers": " John",
     "positions": {"IO": "Mary", "S2": [38, 42]}, "features": {"template": 1}},
    {"clean": "When Anna and Paul went to the house, Paul gave a ring to",
     "corrupt": "When Alice and Bob went to the house, Carl gave a ring to",
     "answers": " Anna", "wrong_answers": [" Paul"],
     "positions": {"IO": "Anna", "S2": [38, 42]}, "features": {"template": 2}},
]


def _write(tmp_path, records, name="pairs.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")
    return path


def test_loads_records_with_positions_features_and_answers(tmp_path, gpt2_tokenizer):
    tok = gpt2_tokenizer
    path = _write(tmp_path, GOOD)
    sig = get_signature(str(path))
    assert sig.positions == ("IO", "S2", "END") and sig.features == ("prompt", "template")
    task = load_task(str(path), tok)
    assert task.SIGNATURE == sig and task is not None
    prompts = task.prompts()
    assert len(prompts) == 2 and prompts.dropped.count == 0
    for i, record in enumerate(GOOD):
        ids = prompts.input_ids[i].tolist()
        assert tok.decode([ids[int(prompts.positions["IO"][i])]]) == " " + record["positions"]["IO"]
        start, end = record["positions"]["S2"]
        assert tok.decode([ids[int(prompts.positions["S2"][i])]]) == " " + record["clean"][start:end]
        assert tok.decode([ids[int(prompts.positions["END"][i])]]) == " to"
    assert tok.decode(prompts.answers[:, 0].tolist()) == " Mary Anna"
    assert prompts.features["template"] == [1, 2]
    assert prompts.corrupt_texts == tuple(r["corrupt"] for r in GOOD)
    assert load_task("custom", tok, path=str(path)).prompts().texts == prompts.texts


def test_pairs_that_do_not_fit_are_dropped_with_reasons(tmp_path, gpt2_tokenizer):
    longer = dict(GOOD[0], corrupt="When Alice and Bob went to the big store, Carl gave a drink to")
    multi = dict(GOOD[1], answers=[" Annabelle-Marie"])
    path = _write(tmp_path, [GOOD[0], longer, multi])
    prompts = load_task(str(path), gpt2_tokenizer).prompts()
    assert len(prompts) == 1
    reasons = [why for _, why in prompts.dropped.reasons]
    assert "counterfactual" in reasons[0] and "tokens" in reasons[0]
    assert "answer ' Annabelle-Marie' is not a single token" in reasons[1]


@pytest.mark.parametrize("record, line, fragment", [
    ('{"clean": "a", ', 2, "not valid JSON"),
    ('[1, 2]', 2, "must be a JSON object"),
    ({"clean": "a b", "corrupt": "c d", "wrong_answers": [" x"]}, 2, "missing field 'answers'"),
    ({"clean": "a b", "corrupt": "c d", "answers": [" x"]}, 2,
     "this record has no wrong_answers, but line 1 has"),
    ({"clean": "a b", "corrupt": "c d", "answers": 3.5, "wrong_answers": " y"}, 2,
     "field 'answers' must be a string, a token id, or a non-empty list of strings or of "
     "token ids, got 3.5"),
    ({"clean": [1, 2], "corrupt": [3, 4], "answers": [5], "wrong_answers": [6]}, 2,
     "this record is token ids, but line 1 is text"),
    ({"clean": "", "corrupt": "c d", "answers": " x", "wrong_answers": " y"}, 2,
     "field 'clean' must be a non-empty string"),
    ({"clean": "a b", "corrupt": "c d", "answers": " x", "wrong_answers": " y", "extra": 1}, 2,
     "unknown field 'extra'"),
    ({"clean": "a b", "corrupt": "c d", "answers": " x", "wrong_answers": " y",
      "positions": {"IO": "zzz"}}, 2, "position 'IO': 'zzz' does not occur in 'clean'"),
    ({"clean": "a b", "corrupt": "c d", "answers": " x", "wrong_answers": " y",
      "positions": {"IO": [2, 99]}}, 2, "must be a substring of 'clean' or \\[start, end\\]"),
    ({"clean": "a b", "corrupt": "c d", "answers": " x", "wrong_answers": " y",
      "features": {"t": [1]}}, 2, "field 'features' must be an object"),
])
def test_bad_records_are_rejected_at_file_and_line(tmp_path, record, line, fragment):
    ok = {"clean": "a b", "corrupt": "c d", "answers": " x", "wrong_answers": " y"}
    path = _write(tmp_path, [ok, record])
    with pytest.raises(TaskError, match=fragment) as info:
        load_task(str(path))
    assert info.value.span.line == line and info.value.span.filename == str(path)
    assert str(info.value).startswith(f"{path}:{line}:1: error:")
    assert info.value.hint


def test_records_must_agree_on_positions_and_a_file_must_exist(tmp_path):
    a = {"clean": "a b", "corrupt": "c d", "answers": " x", "wrong_answers": " y",
         "positions": {"P": "a"}}
    b = {"clean": "a b", "corrupt": "c d", "answers": " x", "wrong_answers": " y"}
    with pytest.raises(TaskError, match="line 1 names"):
        load_task(str(_write(tmp_path, [a, b])))
    with pytest.raises(TaskError, match="cannot read custom task file"):
        load_task(str(tmp_path / "missing.jsonl"))
    with pytest.raises(TaskError, match="has no records"):
        load_task(str(_write(tmp_path, ["", ""], name="empty.jsonl")))
    with pytest.raises(TaskError, match="needs path="):
        load_task("custom")


def test_tasks_from_a_user_named_python_module(tmp_path):
    module = tmp_path / "my_tasks.py"
    module.write_text('''
from dataclasses import dataclass
from circuitlang.tasks import Spec, Task, TaskSignature


@dataclass(frozen=True, slots=True)
class EchoSpec(Spec):
    word: str

    @property
    def text(self):
        return f"say {self.word} say"

    def features(self):
        return {"word": self.word}

    def word_spans(self):
        return {"W": (4, 4 + len(self.word))}

    def answer_texts(self):
        return (" " + self.word,)


class EchoTask(Task):
    SIGNATURE = TaskSignature("echo_words", ("W", "END"), ("word",), ("logit_diff",),
                              "logit_diff")

    def _sample_one(self, rng):
        return EchoSpec(rng.choice(["cat", "dog"]))

    def _corrupt(self, spec, rng):
        return EchoSpec("cow")
''')
    assert load_task_module(str(module)) == ["echo_words"]
    assert "echo_words" in list_tasks()
    task = load_task("echo_words", n=4)
    assert {s.word for s in task.sample()} <= {"cat", "dog"}
    assert get_signature("echo_words").positions == ("W", "END")
    with pytest.raises(TaskError, match="cannot import task module"):
        load_task_module("no_such_module_for_circuitlang")
    empty = tmp_path / "empty_tasks.py"
    empty.write_text("X = 1\n")
    with pytest.raises(TaskError, match="defines no Task subclass"):
        load_task_module(str(empty))


def test_unknown_task_lists_valid_ones():
    with pytest.raises(TaskError, match="valid tasks: ioi, induction, greater_than"):
        load_task("iio")
