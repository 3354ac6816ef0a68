"""Planted circuits: the checker accepts the true hypothesis and rejects wrong ones.

The model (tests/checker/planted.py) has a previous-token head 0.0 feeding an
induction head 1.0 through its keys; 0.1 and 1.1 do nothing.
"""
from __future__ import annotations

import pytest

import circuitlang

TRUE = """\
task induction
metric loss
0.0 -> 1.0.k at all
1.0 -> logits at all
expect recovered >= 0.95
expect each loss < 1
"""
WRONG_HEAD = TRUE.replace("0.0 -> 1.0.k", "0.1 -> 1.1.k").replace("1.0 -> logits", "1.1 -> logits")
DROPPED_EDGE = TRUE.replace("0.0 -> 1.0.k", "embed -> 1.0.k")


def check(text, planted, task, **kw):
    kw.setdefault("permutations", 0)
    kw.setdefault("max_examples", 8)
    return circuitlang.check(text, model=planted, task=task, n=32, **kw)


def test_true_hypothesis_recovers_the_behaviour(planted, induction_task):
    result = check(TRUE, planted, induction_task, permutations=6)
    assert result.recovered.value >= 0.95
    assert result.recovered.low >= 0.9
    assert result.holds
    assert not result.counterexamples
    # random circuits of the same size mostly do worse (with four heads in the model,
    # a random draw can be the true circuit itself, which the p-value counts)
    nulls = sorted(result.null_scores)
    assert len(nulls) == 6 and nulls[len(nulls) // 2] < result.recovered.value
    at_least = sum(x >= result.recovered.value - 1e-12 for x in nulls)
    assert result.p_value == pytest.approx((1 + at_least) / 7)


def test_wrong_head_recovers_little_and_comes_with_a_counterexample(planted, induction_task):
    result = check(WRONG_HEAD, planted, induction_task)
    assert result.recovered.value < 0.2
    assert not result.holds
    [failed_aggregate, failed_each] = result.expectations
    assert not failed_aggregate.holds and not failed_each.holds
    [cx] = result.counterexamples
    assert cx.shrunk and cx.value >= 1
    # shrinking goes toward the simplest prompt: the first tokens of the vocabulary
    assert cx.tokens[:3] == ["t0", "t1", "t2"]


def test_dropping_the_needed_edge_is_detected(planted, induction_task):
    result = check(DROPPED_EDGE, planted, induction_task, max_examples=4)
    assert result.recovered.value < 0.6
    assert not result.expectations[0].holds


def test_json_report_has_the_documented_fields(planted, induction_task, tmp_path):
    result = check(TRUE, planted, induction_task)
    data = result.to_json()
    for key in ("clean", "scrubbed", "random", "recovered", "ci", "expectations", "claims",
                "counterexamples", "model", "task", "seed", "versions"):
        assert key in data
    assert data["expectations"][0]["text"] == "expect recovered >= 0.95"
    assert data["expectations"][0]["holds"] is True
    assert isinstance(data["expectations"][0]["value"], float)
    assert data["versions"]["torch"]
