"""From edge scores to a circuit: top-n, a threshold, or growth to a target; no dangling edges.

Takes an edge space and per-edge importances (or a circuit); gives circuits as
BoolTensors over the edge space (True = kept).

* `top_n(importance, n)`: the n most important edges (ties by index).
* `above(importance, threshold)`: every edge whose importance exceeds it.
* `grow(problem, ranking, target)`: add edges in ranked order until the circuit's
  faithfulness reaches `target` (evaluated at doubling sizes along the batch, then
  narrowed by bisection), the smallest prefix of the ranking that does.
* `prune_dangling(space, kept)`: drop edges no path uses: an edge whose receiver
  reaches no output through kept edges, and an edge whose sender (other than the
  embedding) has no kept input. Such edges cannot change the output (they carry the
  ablated value either way, or lead nowhere), and without them the checker's reading
  of the circuit equals the edge engine's (circuitlang/ir_to_edges.py).
"""
from __future__ import annotations

import numpy as np
import torch

from circuitlang.errors import DiscoveryError
from circuitlang.sites import Embed, Head, Logits

__all__ = ["above", "faithfulness", "grow", "prune_dangling", "top_n"]


def top_n(importance: torch.Tensor, n: int) -> torch.Tensor:
    """The `n` most important edges.

    Raises:
        DiscoveryError: n is negative or larger than the number of edges.
    """
    total = importance.numel()
    if not 0 <= n <= total:
        raise DiscoveryError(f"--edges {n} is not between 0 and the {total} candidate edges",
                             code="discover.edges", hint=f"choose 1-{total}")
    kept = torch.zeros(total, dtype=torch.bool)
    kept[torch.argsort(-importance, stable=True)[:n]] = True
    return kept


def above(importance: torch.Tensor, threshold: float) -> torch.Tensor:
    """Every edge whose importance exceeds `threshold`.

    Raises:
        DiscoveryError: a negative threshold.
    """
    if threshold < 0:
        raise DiscoveryError(f"threshold {threshold} is negative", code="discover.threshold",
                             hint="importances are magnitudes: use a threshold >= 0")
    return importance > threshold


def _node(site):
    if isinstance(site, Head):
        return ("head", site.layer, site.head)
    return site


def prune_dangling(space, kept: torch.Tensor) -> torch.Tensor:
    """`kept` without edges that no path from the input to the output uses."""
    kept = kept.clone()
    edges = space.edges()
    while True:
        idx = kept.nonzero()[:, 0].tolist()
        sends_on = {_node(edges[i][0]) for i in idx}  # nodes with a kept outgoing edge
        fed = {_node(edges[i][1]) for i in idx}  # nodes with a kept incoming edge
        changed = False
        for i in idx:
            sender, receiver, _ = edges[i]
            reaches_output = isinstance(receiver, Logits) or _node(receiver) in sends_on
            has_input = isinstance(sender, Embed) or _node(sender) in fed
            if not (reaches_output and has_input):
                kept[i] = False
                changed = True
        if not changed:
            return kept


def faithfulness(value: np.ndarray, full: np.ndarray, empty: np.ndarray) -> np.ndarray:
    """`(m(C) - m(empty)) / (m(full) - m(empty))` on means over prompts (per circuit row)."""
    gap = float(np.mean(full) - np.mean(empty))
    if gap == 0.0:
        return np.full(value.shape[0], np.nan)
    return (value.mean(axis=-1) - float(np.mean(empty))) / gap


def grow(problem, ranking: torch.Tensor, target: float, *, full=None, empty=None) -> tuple[torch.Tensor, float]:
    """The smallest prefix of `ranking` (after pruning dangling edges) whose faithfulness
    reaches `target`; (circuit, its faithfulness).

    Sizes are tried along the batch: 1, 2, 4, ... edges in one scoring run, then the
    interval where the target is first reached is bisected.

    Raises:
        DiscoveryError: a target outside (0, 1.5], or one even the full model misses.
    """
    if not 0 < target <= 1.5:
        raise DiscoveryError(f"target faithfulness {target} is outside (0, 1.5]", code="discover.target",
                             hint="for example --target 0.9")
    full = problem.full() if full is None else full
    empty = problem.empty() if empty is None else empty
    total = len(ranking)

    def circuit(k: int) -> torch.Tensor:
        kept = torch.zeros(total, dtype=torch.bool)
        kept[ranking[:k]] = True
        return prune_dangling(problem.space, kept)

    sizes = [1]
    while sizes[-1] < total:
        sizes.append(min(total, sizes[-1] * 2))
    scores = faithfulness(problem.score(torch.stack([circuit(k) for k in sizes])), full, empty)
    hits = [i for i, f in enumerate(scores) if f >= target]
    if not hits:
        raise DiscoveryError(f"no circuit reaches faithfulness {target}: the full model scores "
                             f"{scores[-1]:.3f}", code="discover.target-unreachable",
                             hint="lower --target, or use more prompts")
    hi = sizes[hits[0]]
    lo = sizes[hits[0] - 1] if hits[0] > 0 else 0
    best, best_f = hi, float(scores[hits[0]])
    while hi - lo > 1:
        mid = (lo + hi) // 2
        f = float(faithfulness(problem.score(circuit(mid)[None]), full, empty)[0])
        if f >= target:
            hi, best, best_f = mid, mid, f
        else:
            lo = mid
    return circuit(best), best_f
