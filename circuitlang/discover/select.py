"""From edge scores to a circuit: top-n, a threshold, or growth to a target; no dangling edges.

Takes an edge space and per-edge importances (or a circuit); gives circuits as
BoolTensors over the edge space (True = kept).

* `top_n(importance, n)`: the n most important edges (ties by index).
* `above(importance, threshold)`: every edge whose importance exceeds it.
* `grow(problem, ranking, target)`: add edges in ranked order until the circuit's
  faithfulness reaches `target`: evaluated at doubling sizes along the batch, then
  narrowed by bisection between the first doubling size that reaches it and the one
  before (the smallest prefix that does when faithfulness rises across that gap; see
  `grow`).
* `prune_dangling(space, kept)`: drop edges no path uses: an edge whose receiver
  reaches no output through kept edges, and an edge whose sender (other than the
  embedding) has no kept input, position by position where the edges are at named
  positions (a query's or an MLP's input at P reaches the output only through an edge
  out of that node at P). Such edges cannot change the output (they carry the ablated
  value either way, exactly so under corrupt and resample ablation, or lead nowhere),
  and without them the checker's reading of the circuit equals the edge engine's
  (circuitlang/ir_to_edges.py).
"""
from __future__ import annotations

import numpy as np
import torch

from circuitlang.errors import DiscoveryError
from circuitlang.sites import Channel, Embed, Head, Logits

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


def _local(receiver) -> bool:
    """Whether an input edge into `receiver` at a position changes the receiver's output
    only at that position: a query or an MLP's input does; a key or a value feeds the
    head's output at every later position."""
    return not (isinstance(receiver, Head) and receiver.channel in (Channel.K, Channel.V))


def prune_dangling(space, kept: torch.Tensor) -> torch.Tensor:
    """`kept` without edges that no path from the input to the output uses.

    An edge `s -> r at P` is dangling when r is not the logits and r's output where this
    edge changes it is read by no kept edge (into a query or an MLP at P: r sends no kept
    edge at P; into a key or value: r sends no kept edge at all), or when s is not the
    embedding and s's output at P has no kept input (no kept edge into s's query or MLP
    at P, and none into its keys or values). Over the whole sequence (`positions` is
    `(ALL,)`) the positions agree and this is the node-level rule. Every such edge carries
    what the ablation gives it either way (or leads nowhere), so dropping it does not
    change the engine's output (exactly so under corrupt and resample ablation; under
    mean and zero ablation a sender computed on ablated inputs is close to, not equal
    to, its ablated value).
    """
    kept = kept.clone()
    edges = space.edges()
    anywhere = object()
    while True:
        idx = kept.nonzero()[:, 0].tolist()
        sends_at: dict = {}  # node -> positions of its kept outgoing edges
        fed_at: dict = {}  # node -> positions where a kept input changes its output (`anywhere`)
        for i in idx:
            sender, receiver, position = edges[i]
            sends_at.setdefault(_node(sender), set()).add(position)
            fed_at.setdefault(_node(receiver), set()).add(position if _local(receiver) else anywhere)
        changed = False
        for i in idx:
            sender, receiver, position = edges[i]
            out = sends_at.get(_node(receiver), set())
            reaches_output = isinstance(receiver, Logits) or (position in out if _local(receiver) else bool(out))
            fed = fed_at.get(_node(sender), set())
            has_input = isinstance(sender, Embed) or anywhere in fed or position in fed
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


def grow(problem, ranking: torch.Tensor, target: float, *, full=None, empty=None,
         metric: str | None = None) -> tuple[torch.Tensor, float]:
    """A prefix of `ranking` (after pruning dangling edges) whose faithfulness reaches
    `target`; (circuit, its faithfulness).

    Faithfulness is `(m(C) - m(empty)) / (m(full) - m(empty))` in `metric` (default: the
    task's), with `full` the full model (the clean run, `Problem.full`) and `empty` every
    edge ablated, as the checker's % recovered and `discover`'s reported number.

    Sizes are tried along the batch: 1, 2, 4, ... edges (and every candidate) in one
    scoring run. With `hi` the first of those sizes that reaches the target and `lo` the
    one before it (which does not; 0 when `hi` is 1), the sizes between are bisected:
    the result is a prefix of more than `lo` and at most `hi` edges that reaches the
    target, and a size one edge smaller than it does not (or is `lo`). It is the
    smallest prefix reaching the target when faithfulness rises with size from `lo` to
    `hi`; when it does not (faithfulness is not monotone in circuit size), a smaller
    prefix may reach the target too, inside that gap or below `lo` between the sizes
    tried.

    Args:
        full, empty: the metric per prompt [N] of the full model and of the empty circuit,
            in `metric`, when the caller has them (default: measured here).
        metric: the metric faithfulness is measured in (default: the task's).

    Raises:
        DiscoveryError: a target outside (0, 1.5], or one no prefix reaches.
    """
    if not 0 < target <= 1.5:
        raise DiscoveryError(f"target faithfulness {target} is outside (0, 1.5]", code="discover.target",
                             hint="for example --target 0.9")
    metric = metric or problem.task.SIGNATURE.default_metric
    full = problem.full(metric=metric) if full is None else full
    empty = problem.empty(metric=metric) if empty is None else empty
    total = len(ranking)

    def circuit(k: int) -> torch.Tensor:
        kept = torch.zeros(total, dtype=torch.bool)
        kept[ranking[:k]] = True
        return prune_dangling(problem.space, kept)

    sizes = [1]
    while sizes[-1] < total:
        sizes.append(min(total, sizes[-1] * 2))
    # (each size grows from the one before: scored as a chain, `Problem.score(chained=True)`)
    scores = faithfulness(problem.score(torch.stack([circuit(k) for k in sizes]), metric=metric, chained=True),
                          full, empty)
    hits = [i for i, f in enumerate(scores) if f >= target]
    if not hits:
        every = "every candidate kept" if problem.space.per_position else "the full model"
        raise DiscoveryError(f"no circuit reaches faithfulness {target}: {every} scores "
                             f"{scores[-1]:.3f}", code="discover.target-unreachable",
                             hint="lower --target, or use more prompts"
                             + (", or name more positions" if problem.space.per_position else ""))
    hi = sizes[hits[0]]
    lo = sizes[hits[0] - 1] if hits[0] > 0 else 0
    best, best_f = hi, float(scores[hits[0]])
    while hi - lo > 1:
        mid = (lo + hi) // 2
        f = float(faithfulness(problem.score(circuit(mid)[None], metric=metric), full, empty)[0])
        if f >= target:
            hi, best, best_f = mid, mid, f
        else:
            lo = mid
    return circuit(best), best_f
