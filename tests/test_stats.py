"""Statistics: the recovered score, its bootstrap interval, the permutation test."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from circuitlang import stats


def test_recovered_endpoints():
    clean = np.array([1.0, 2.0, 3.0])
    random = np.array([5.0, 5.0, 5.0])
    assert stats.recovered(clean, clean, random) == pytest.approx(1.0)
    assert stats.recovered(clean, random, random) == pytest.approx(0.0)
    halfway = (clean + random) / 2
    assert stats.recovered(clean, halfway, random) == pytest.approx(0.5)


def test_recovered_works_for_higher_is_better_metrics():
    # logit difference: clean 3, random 0, scrubbed 2.4 keeps 80% of the gap
    clean, random, scrubbed = np.full(4, 3.0), np.zeros(4), np.full(4, 2.4)
    assert stats.recovered(clean, scrubbed, random) == pytest.approx(0.8)


def test_recovered_is_nan_without_a_gap():
    same = np.ones(3)
    assert np.isnan(stats.recovered(same, same * 2, same))


@settings(max_examples=50, deadline=None)
@given(
    st.lists(st.floats(-5, 5), min_size=3, max_size=30),
    st.floats(0.1, 3),
    st.floats(0, 1),
)
def test_bootstrap_interval_contains_point_for_constant_shift(values, gap, frac):
    clean = np.array(values)
    random = clean + gap
    scrubbed = clean + (1 - frac) * gap
    ci = stats.bootstrap_recovered(clean, scrubbed, random, n_boot=200, seed=1)
    assert ci.value == pytest.approx(frac, abs=1e-9)
    assert ci.low <= ci.value + 1e-9 <= ci.high + 2e-9


def test_bootstrap_interval_narrows_with_more_prompts():
    rng = np.random.default_rng(0)

    def width(n):
        clean = rng.normal(3, 1, n)
        random = rng.normal(0, 1, n)
        scrubbed = rng.normal(2, 1, n)
        ci = stats.bootstrap_recovered(clean, scrubbed, random, n_boot=500, seed=0)
        return ci.high - ci.low

    assert width(400) < width(20)


def test_bootstrap_is_seeded():
    rng = np.random.default_rng(3)
    a, b, c = rng.normal(size=(3, 50))
    assert stats.bootstrap_recovered(a, b, c + 3, seed=7) == stats.bootstrap_recovered(a, b, c + 3, seed=7)


def test_bootstrap_rejects_unpaired_input():
    with pytest.raises(ValueError, match="one value per prompt"):
        stats.bootstrap_recovered(np.ones(3), np.ones(2), np.ones(3))


def test_permutation_p_value():
    null = np.linspace(0, 1, 99)
    assert stats.permutation_p_value(2.0, null) == pytest.approx(1 / 100)
    assert stats.permutation_p_value(-1.0, null) == pytest.approx(1.0)
    assert 0.4 < stats.permutation_p_value(0.5, null) < 0.6
    assert np.isnan(stats.permutation_p_value(0.5, np.array([])))


def test_bootstrap_mean():
    ci = stats.bootstrap_mean(np.arange(10.0), seed=0)
    assert ci.value == 4.5 and ci.low < 4.5 < ci.high
