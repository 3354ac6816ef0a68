"""Invariants of causal scrubbing, as properties over hypotheses and seeds."""
from __future__ import annotations

import dataclasses

import numpy as np
import torch
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from circuitlang.execute import Scrubber
from circuitlang.ir import DependsClaim, EdgeClaim, Feature, Hypothesis
from circuitlang.ir_to_graph import ir_to_graph
from circuitlang.sites import ALL, Channel, Embed, Head, Logits, Position

INPUT = (Feature("input", "input"),)


def hyp(*claims, ablation="resample"):
    from circuitlang.ir import Ablation

    return Hypothesis(model="planted", task="induction", metric="loss", ablation=Ablation(ablation),
                      claims=tuple(claims))


@pytest.fixture(scope="module")
def scrubber(planted, induction_task):
    prompts = induction_task.prompts(24, 0)
    return Scrubber(planted, induction_task, prompts, "loss", batch_size=16)


def whole_model():
    claims = [DependsClaim(Embed(), ALL, INPUT)]
    claims += [DependsClaim(Head(l, h), ALL, INPUT) for l in range(2) for h in range(2)]
    return hyp(*claims)


@settings(max_examples=5, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_empty_hypothesis_scrubs_everything(scrubber, seed):
    """Claiming nothing is the fully ablated model: 0% recovered."""
    random = scrubber.scrub(ir_to_graph(hyp()), seed=seed).scrubbed
    again = scrubber.scrub(ir_to_graph(hyp()), seed=seed).scrubbed
    np.testing.assert_array_equal(random, again)
    assert random.mean() > scrubber.clean().mean() + 1.0


@settings(max_examples=5, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_claiming_the_whole_model_recovers_everything(scrubber, seed):
    scrubbed = scrubber.scrub(ir_to_graph(whole_model()), seed=seed).scrubbed
    np.testing.assert_allclose(scrubbed, scrubber.clean(), atol=1e-5)


def test_logits_depending_on_the_input_is_the_clean_model(scrubber):
    """An identity intervention: the final stream taken from the prompt itself."""
    h = hyp(DependsClaim(Logits(), ALL, INPUT))
    scrubbed = scrubber.scrub(ir_to_graph(h), seed=0).scrubbed
    np.testing.assert_array_equal(scrubbed, scrubber.clean())


@pytest.mark.parametrize("mode", ["mean", "zero"])
def test_mean_and_zero_ablation_differ_from_resampling(scrubber, mode):
    h = hyp(EdgeClaim(Head(1, 0), Logits(), ALL), ablation=mode)
    scrubbed = scrubber.scrub(ir_to_graph(h), seed=0).scrubbed
    resampled = scrubber.scrub(ir_to_graph(dataclasses.replace(h, ablation=hyp().ablation)), seed=0).scrubbed
    assert np.isfinite(scrubbed).all()
    assert not np.allclose(scrubbed, resampled)


@pytest.mark.parametrize("batch_size", [1, 5, 64])
def test_results_do_not_depend_on_batch_size(planted, induction_task, scrubber, batch_size, monkeypatch):
    """Nor on the kernels' chunks: with no `KERNEL_BUDGET` a chunk holds the batch size of
    rows, so the rows of one node are split across chunks."""
    import circuitlang.execute

    monkeypatch.setattr(circuitlang.execute, "KERNEL_BUDGET", 0)
    h = hyp(EdgeClaim(Head(0, 0), Head(1, 0, Channel.K), ALL), EdgeClaim(Head(1, 0), Logits(), ALL))
    other = Scrubber(planted, induction_task, scrubber.prompts, "loss", batch_size=batch_size)
    a = scrubber.scrub(ir_to_graph(h), seed=3).scrubbed
    b = other.scrub(ir_to_graph(h), seed=3).scrubbed
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_feature_agreement_is_respected(scrubber):
    """A node claimed to depend on `next` gets prompts with the same next token."""
    h = hyp(DependsClaim(Head(1, 0), Position("END"), (Feature("task", "next"),)))
    result = scrubber.scrub(ir_to_graph(h), seed=1)
    nexts = scrubber.prompts.features["next"]
    (node,) = [n for n in result.rows if n != 0]
    for ref, row in enumerate(result.rows[node]):
        assert nexts[row] == nexts[ref]
    assert any(row != ref for ref, row in enumerate(result.rows[node])), "never resampled anything"


def test_out_of_memory_halves_the_batch_and_gives_the_same_numbers(planted, induction_task, scrubber, monkeypatch):
    """A CUDA out-of-memory error splits the batch (patches' rows included) instead of failing."""
    from circuitlang import execute

    h = hyp(EdgeClaim(Head(0, 0), Head(1, 0, Channel.K), ALL), EdgeClaim(Head(1, 0), Logits(), ALL))
    expected = scrubber.scrub(ir_to_graph(h), seed=2).scrubbed
    real_run = type(planted).run
    calls = {"oom": 0}

    def small_memory(self, input_ids, attention_mask=None, **kw):
        if input_ids.shape[0] > 4:
            calls["oom"] += 1
            raise torch.cuda.OutOfMemoryError("pretend")
        return real_run(self, input_ids, attention_mask, **kw)

    monkeypatch.setattr(type(planted), "run", small_memory)
    other = execute.Scrubber(planted, induction_task, scrubber.prompts, "loss", batch_size=16)
    got = other.scrub(ir_to_graph(h), seed=2).scrubbed
    assert calls["oom"] > 0
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
