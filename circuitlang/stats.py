"""Statistics over per-prompt numbers: bootstrap intervals and permutation tests.

Takes numpy arrays of per-prompt metric values (clean, scrubbed, random) and gives
the aggregate numbers the report shows, each with an interval a reviewer would
accept. Everything is seeded; nothing here touches a model.

* `recovered(clean, scrubbed, random)` is the causal-scrubbing score
  `(L_random - L_scrubbed) / (L_random - L_clean)` on the means. It is written for
  losses but is direction-free: for a metric where higher is better (logit
  difference) the same ratio measures how much of the clean-vs-random gap the
  scrubbed model keeps.
* `bootstrap_recovered` resamples prompts with replacement (the three numbers of a
  prompt stay together: they are paired) and reports a percentile interval.
* `permutation_p_value` compares an observed score against scores of random
  circuits of the same size (Shi et al. 2024): the one-sided p-value with the +1
  correction, so it is never exactly zero.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, slots=True)
class Interval:
    """A point estimate with a confidence interval."""

    value: float
    low: float
    high: float
    level: float = 0.95

    def to_json(self) -> dict:
        return {"value": self.value, "low": self.low, "high": self.high, "level": self.level}


def recovered(clean: np.ndarray, scrubbed: np.ndarray, random: np.ndarray) -> float:
    """Fraction of the clean-vs-random gap that the scrubbed model keeps.

    Args:
        clean: per-prompt metric of the unmodified model.
        scrubbed: per-prompt metric of the scrubbed model (same prompts).
        random: per-prompt metric when everything is ablated.

    Returns:
        `(mean(random) - mean(scrubbed)) / (mean(random) - mean(clean))`; NaN when
        the clean and random means coincide (the task shows no behaviour to
        recover, which the report says in words).
    """
    gap = float(np.mean(random) - np.mean(clean))
    if gap == 0.0 or not np.isfinite(gap):
        return float("nan")
    return float((np.mean(random) - np.mean(scrubbed)) / gap)


def bootstrap_mean(values: np.ndarray, *, n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> Interval:
    """Mean of `values` with a percentile bootstrap interval."""
    values = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(values), size=(n_boot, len(values)))
    means = values[idx].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return Interval(float(values.mean()), float(lo), float(hi), level)


def bootstrap_recovered(
    clean: np.ndarray,
    scrubbed: np.ndarray,
    random: np.ndarray,
    *,
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> Interval:
    """`recovered` with a paired percentile bootstrap interval over prompts.

    Resamples whose gap is zero are dropped from the interval (they have no
    defined ratio); if every resample is undefined the interval is NaN.
    """
    clean, scrubbed, random = (np.asarray(a, dtype=np.float64) for a in (clean, scrubbed, random))
    n = len(clean)
    if not (len(scrubbed) == len(random) == n):
        raise ValueError("clean, scrubbed and random must have one value per prompt")
    point = recovered(clean, scrubbed, random)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_boot, n))
    c, s, r = clean[idx].mean(1), scrubbed[idx].mean(1), random[idx].mean(1)
    gap = r - c
    ok = gap != 0
    if not ok.any():
        return Interval(point, float("nan"), float("nan"), level)
    ratios = (r[ok] - s[ok]) / gap[ok]
    lo, hi = np.quantile(ratios, [(1 - level) / 2, 1 - (1 - level) / 2])
    return Interval(point, float(lo), float(hi), level)


def permutation_p_value(observed: float, null_scores: np.ndarray) -> float:
    """One-sided p-value that random circuits score at least `observed`.

    `(1 + #{null >= observed}) / (1 + len(null))`: a circuit no better than random
    ones gets p near 0.5 or above; NaN scores in the null count as not beating it.
    """
    null_scores = np.asarray(null_scores, dtype=np.float64)
    if len(null_scores) == 0:
        return float("nan")
    beats = np.sum(np.nan_to_num(null_scores, nan=-np.inf) >= observed)
    return float((1 + beats) / (1 + len(null_scores)))
