"""Faithfulness over circuit size, and MIB's summaries of it (CPR, CMD).

Takes a `Problem` and a ranking of its edges; gives the faithfulness curve

    f(k) = (m(C_k) - m(empty)) / (m(full) - m(empty))

for the circuits C_k of the k top-ranked edges, at MIB's edge fractions {0.1, 0.2,
0.5, 1, 2, 5, 10, 20, 50, 100}% of all edges (Mueller et al. 2025), every circuit
evaluated in the same batched passes (rows are (circuit, prompt) pairs), with a
paired bootstrap interval over prompts per point. The circuits grow one from the next,
so when a pass holds one circuit (the batch is as many prompts as the batch size; edges
over the whole sequence) it computes only the nodes the edges added since the previous
circuit reach (`Problem.score(chained=True)`); with several circuits a pass, each pass
computes all of them. m is the task metric (the mean
over prompts); `empty` ablates every edge at every position, `full` is the full model
(the clean run, nothing ablated): the checker's `random` and `clean`, so that f is its
% recovered. With named positions (`positions=("END", "S2")`) the full model is not
every candidate kept (that still ablates every edge at the positions not named), so
the curve's last point, 100% of the candidates, may be below 1.

Summaries, as MIB defines them, with x the fraction of edges kept (0 to 1) and the
area taken by the trapezoid rule over the measured points:
* **CPR** (circuit performance ratio): the area under f; higher is better.
* **CMD** (circuit-model difference): the area between f and 1, `integral |1 - f|`;
  lower is better.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["MIB_FRACTIONS", "Curve", "curve"]

MIB_FRACTIONS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


@dataclass(frozen=True)
class Curve:
    """A faithfulness curve.

    Attributes:
        fractions: edge fraction of each point.
        edges: edge count of each point.
        faithfulness: f at each point (mean over prompts).
        low, high: 95% bootstrap interval of f at each point.
        cpr, cmd: MIB's summaries (see the module docstring), with bootstrap intervals
            `cpr_interval`, `cmd_interval`.
        full, empty: the metric of the full model (the clean run) and of the empty
            circuit (every edge ablated), means over prompts.
    """

    fractions: tuple[float, ...]
    edges: tuple[int, ...]
    faithfulness: tuple[float, ...]
    low: tuple[float, ...]
    high: tuple[float, ...]
    cpr: float
    cmd: float
    cpr_interval: tuple[float, float]
    cmd_interval: tuple[float, float]
    full: float
    empty: float

    def to_json(self) -> dict:
        return {"fractions": list(self.fractions), "edges": list(self.edges),
                "faithfulness": list(self.faithfulness), "low": list(self.low), "high": list(self.high),
                "cpr": self.cpr, "cmd": self.cmd, "cpr_interval": list(self.cpr_interval),
                "cmd_interval": list(self.cmd_interval), "full": self.full, "empty": self.empty}

    @classmethod
    def from_json(cls, data: dict) -> Curve:
        """The curve `to_json` wrote (NaN where the JSON holds null).

        Raises:
            DiscoveryError: a field is missing or the per-point lists differ in length.
        """
        from circuitlang.errors import DiscoveryError

        def num(v):
            return float("nan") if v is None else float(v)

        try:
            points = [tuple(num(v) for v in data[k]) for k in ("fractions", "faithfulness", "low", "high")]
            out = cls(fractions=points[0], edges=tuple(int(v) for v in data["edges"]), faithfulness=points[1],
                      low=points[2], high=points[3], cpr=num(data["cpr"]), cmd=num(data["cmd"]),
                      cpr_interval=tuple(num(v) for v in data["cpr_interval"]),
                      cmd_interval=tuple(num(v) for v in data["cmd_interval"]),
                      full=num(data["full"]), empty=num(data["empty"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise DiscoveryError(f"not a faithfulness curve's JSON ({type(exc).__name__}: {exc})",
                                 code="discover.curve-json",
                                 hint="pass the `curve` object `circuitlang discover --json` writes") from None
        if len({len(out.fractions), len(out.edges), len(out.faithfulness), len(out.low), len(out.high)}) != 1:
            raise DiscoveryError("a faithfulness curve's JSON has lists of different lengths",
                                 code="discover.curve-json", hint="fractions, edges, faithfulness, low and "
                                 "high hold one value per point")
        return out

    def render(self) -> str:
        lines = [f"faithfulness over circuit size (CPR {self.cpr:.3f} [{self.cpr_interval[0]:.3f}, "
                 f"{self.cpr_interval[1]:.3f}], CMD {self.cmd:.3f} [{self.cmd_interval[0]:.3f}, "
                 f"{self.cmd_interval[1]:.3f}]):"]
        for frac, k, f, lo, hi in zip(self.fractions, self.edges, self.faithfulness, self.low, self.high):
            lines.append(f"  {100 * frac:>6.1f}% {k:>7} edges   f = {f:7.3f}   [{lo:.3f}, {hi:.3f}]")
        return "\n".join(lines)


def _area(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2))


def curve(problem, ranking: torch.Tensor, *, fractions=MIB_FRACTIONS, metric: str | None = None,
          n_boot: int = 1000, seed: int = 0, prune=None, progress=None, full=None, empty=None) -> Curve:
    """The faithfulness curve of a ranking (most important edge first).

    Args:
        problem: the discovery problem.
        ranking: edge indices, most important first.
        fractions: edge fractions to evaluate (MIB's by default).
        metric: the metric m (default: the task's default metric).
        n_boot: bootstrap resamples of the prompts.
        seed: the bootstrap's seed.
        prune: optional function circuit -> circuit applied to each C_k (dangling edges).
        progress: called with rows scored.
        full, empty: the metric per prompt [N] of the full model and of the empty circuit
            in `metric`, when the caller has them (default: measured here).
    """
    metric = metric or problem.task.SIGNATURE.default_metric
    total = len(ranking)
    counts = [max(1, min(total, int(round(f * total)))) for f in fractions]
    circuits = []
    for k in counts:
        kept = torch.zeros(total, dtype=torch.bool)
        kept[ranking[:k]] = True
        circuits.append(prune(kept) if prune is not None else kept)
    full = problem.full(metric=metric) if full is None else np.asarray(full)
    lead = [] if empty is not None else [torch.zeros(total, dtype=torch.bool)]
    # a circuit of every edge over the whole sequence is the full model: not scored again
    whole = [not problem.space.per_position and bool(c.all()) for c in circuits]
    scored = [c for c, w in zip(circuits, whole) if not w]
    # (the circuits grow one from the next: each pass computes only the nodes the added edges reach)
    values = problem.score(torch.stack(lead + scored), metric=metric, progress=progress, chained=True) \
        if lead or scored else np.zeros((0, problem.n))
    empty, rest = (values[0], values[1:]) if empty is None else (np.asarray(empty), values)
    it = iter(rest)
    per = np.stack([full if w else next(it) for w in whole])
    x = np.asarray(fractions, dtype=float)

    def f_of(idx):
        gap = full[idx].mean() - empty[idx].mean()
        with np.errstate(divide="ignore", invalid="ignore"):
            return (per[:, idx].mean(axis=1) - empty[idx].mean()) / gap

    point = f_of(np.arange(problem.n))
    rng = np.random.default_rng(seed)
    boots = np.stack([f_of(rng.integers(0, problem.n, problem.n)) for _ in range(n_boot)])
    lo, hi = np.nanquantile(boots, [0.025, 0.975], axis=0)
    cprs = np.array([_area(x, b) for b in boots])
    cmds = np.array([_area(x, np.abs(1 - b)) for b in boots])
    return Curve(
        fractions=tuple(float(v) for v in fractions), edges=tuple(counts),
        faithfulness=tuple(float(v) for v in point), low=tuple(float(v) for v in lo),
        high=tuple(float(v) for v in hi), cpr=_area(x, point), cmd=_area(x, np.abs(1 - point)),
        cpr_interval=tuple(float(v) for v in np.nanquantile(cprs, [0.025, 0.975])),
        cmd_interval=tuple(float(v) for v in np.nanquantile(cmds, [0.025, 0.975])),
        full=float(full.mean()), empty=float(empty.mean()),
    )
