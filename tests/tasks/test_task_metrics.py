"""Metrics on hand-made logits give the known values."""
from __future__ import annotations

import math

import pytest
import torch

from circuitlang.errors import TaskError
from circuitlang.tasks import load_task
from circuitlang.tasks.ioi import IOISpec


@pytest.fixture(scope="module")
def ioi_prompts(gpt2_tokenizer):
    task = load_task("ioi", gpt2_tokenizer)
    specs = [IOISpec(0, "ABBA", "Mary", "John"), IOISpec(3, "BABA", "Anna", "Paul")]
    return task, task.build(specs)


def _logits(prompts, vocab, values):
    """Logits that are 0 everywhere except the given (row, token) -> value at END."""
    logits = torch.zeros(len(prompts), prompts.input_ids.shape[1], vocab)
    for (row, token), value in values.items():
        logits[row, int(prompts.positions["END"][row]), token] = value
    return logits


def test_logit_diff_prob_diff_loss_kl(ioi_prompts, gpt2_tokenizer):
    task, prompts = ioi_prompts
    vocab = len(gpt2_tokenizer)
    io = prompts.answers[:, 0].tolist()
    s = prompts.wrong_answers[:, 0].tolist()
    logits = _logits(prompts, vocab, {(0, io[0]): 3.0, (0, s[0]): 1.0,
                                      (1, io[1]): -2.0, (1, s[1]): 0.5})
    assert task.metric("logit_diff", logits, prompts).tolist() == pytest.approx([2.0, -2.5])
    z0 = (vocab - 2) + math.exp(3) + math.exp(1)
    z1 = (vocab - 2) + math.exp(-2) + math.exp(0.5)
    expected = [(math.exp(3) - math.exp(1)) / z0, (math.exp(-2) - math.exp(0.5)) / z1]
    assert task.metric("prob_diff", logits, prompts).tolist() == pytest.approx(expected, rel=1e-4)
    expected_loss = [-(3 - math.log(z0)), -(-2 - math.log(z1))]
    assert task.metric("loss", logits, prompts).tolist() == pytest.approx(expected_loss, rel=1e-4)
    # KL of a distribution with itself is 0; against uniform it is log V - H(p).
    assert task.metric("kl", logits, prompts, reference_logits=logits).tolist() == pytest.approx(
        [0.0, 0.0], abs=1e-5)
    # KL(p || uniform) for p = (1/2, 1/4, 1/8, 1/8) is (1/4) ln 2.
    ref = torch.tensor([[0.5, 0.25, 0.125, 0.125]] * 2).log()
    kl = task.metric("kl", torch.zeros(2, 4), prompts, reference_logits=ref)
    assert kl.tolist() == pytest.approx([0.25 * math.log(2)] * 2, rel=1e-5)
    # Logits already taken at END give the same numbers.
    end_logits = logits[torch.arange(2), prompts.positions["END"]]
    assert torch.allclose(task.metric("logit_diff", end_logits, prompts),
                          task.metric("logit_diff", logits, prompts))


def test_directions_and_errors(ioi_prompts):
    task, prompts = ioi_prompts
    assert [task.metric_direction(m) for m in ("logit_diff", "prob_diff", "loss", "kl")] == [
        1, 1, -1, -1]
    with pytest.raises(TaskError, match="valid metrics: logit_diff"):
        task.metric("accuracy", torch.zeros(2, 5), prompts)
    with pytest.raises(TaskError, match="needs reference_logits"):
        task.metric("kl", torch.zeros(2, 10), prompts)
    with pytest.raises(TaskError, match="do not match 2 prompts"):
        task.metric("logit_diff", torch.zeros(3, 4, 10), prompts)


def test_ragged_answers_are_padded_and_ignored():
    from circuitlang.tasks.metrics import masked_mean, masked_sum

    values = torch.tensor([[1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 30.0, 40.0]])
    index = torch.tensor([[0, 1, 2], [3, -1, -1]])
    assert masked_mean(values, index).tolist() == [2.0, 40.0]
    assert masked_sum(values, index).tolist() == [6.0, 40.0]


def test_every_task_says_what_its_counterfactual_changes():
    from circuitlang.tasks import list_tasks, task_class

    for name in list_tasks():
        cls = task_class(name)
        if not cls.__module__.startswith("circuitlang."):
            continue  # a user's task may leave CORRUPTION unset
        text = cls.CORRUPTION
        assert isinstance(text, str) and len(text) > 20, name
