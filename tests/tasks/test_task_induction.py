"""Induction: positions by repeat offset, the repeated-half loss, any vocabulary."""
from __future__ import annotations

import math

import pytest
import torch

from circuitlang.errors import TaskError
from circuitlang.tasks import load_task


def test_positions_by_repeat_offset(gpt2_tokenizer):
    task = load_task("induction", gpt2_tokenizer, length=7, n=10)
    prompts = task.prompts()
    special = set(gpt2_tokenizer.all_special_ids)
    for i, spec in enumerate(prompts.specs):
        ids = prompts.input_ids[i].tolist()
        assert ids[0] == gpt2_tokenizer.bos_token_id
        assert ids[1:] == list(spec.tokens) * 2
        assert not special & set(spec.tokens)
        pos = {k: int(v[i]) for k, v in prompts.positions.items()}
        assert pos == {"FIRST": 1, "PREV": 7, "PREV+1": 8, "REPEAT": 8, "END": 14}
        assert ids[pos["END"]] == ids[pos["PREV"]] == spec.tokens[-1]
        assert ids[pos["PREV+1"]] == prompts.answers[i, 0] == spec.tokens[0]
        assert prompts.wrong_answers[i, 0] not in spec.tokens
        # the counterfactual keeps the first copy and breaks the repeat
        corrupt = prompts.corrupt_input_ids[i].tolist()
        assert corrupt[:8] == ids[:8] and not set(corrupt[8:]) & set(spec.tokens)


def test_loss_over_the_repeated_half(word_tokenizer_factory):
    task0 = load_task("induction", length=4)
    tok = word_tokenizer_factory(task0.vocabulary(), bos=False)
    task = load_task("induction", tok, length=4, n=3)
    prompts = task.prompts()
    n, t = prompts.input_ids.shape
    vocab = len(tok)
    # A perfect inductor: at every position of the repeat, all mass on the next token.
    perfect = torch.full((n, t, vocab), -1e4)
    for i in range(n):
        for p in range(t - 1):
            perfect[i, p, prompts.input_ids[i, p + 1]] = 0.0
    assert task.metric("loss", perfect, prompts).tolist() == pytest.approx([0.0] * n, abs=1e-4)
    uniform = torch.zeros(n, t, vocab)
    assert task.metric("loss", uniform, prompts).tolist() == pytest.approx(
        [math.log(vocab)] * n, rel=1e-5)
    assert task.metric_direction("loss") == -1
    with pytest.raises(TaskError, match="full logits"):
        task.metric("loss", torch.zeros(n, vocab), prompts)


def test_parameters_are_checked(gpt2_tokenizer):
    with pytest.raises(TaskError, match="length must be an integer >= 2"):
        load_task("induction", length=1)
    with pytest.raises(TaskError, match="not in the vocabulary"):
        load_task("induction", gpt2_tokenizer, tokens=["Ġthe", "notatokenzzz"])
    with pytest.raises(TaskError, match="at least length\\+1"):
        load_task("induction", gpt2_tokenizer, length=5, tokens=["Ġthe", "Ġa"])
