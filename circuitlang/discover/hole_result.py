"""What filling a hypothesis's holes gives: each hole's chosen sites, the runners-up with
their attribution scores and checked recovered fractions, and the filled program
(`circuitlang.discover.holes.fill_holes` returns a `HoleResult`)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from circuitlang import ast, ir
from circuitlang.sites import Head, Position, Site

__all__ = ["Candidate", "HoleFill", "HoleResult", "Verified"]


def describe_ranking(method: str, ablation: str) -> str:
    """How holes were ranked, in words: each method joined by `+` in `method` (edge
    attribution and latent attribution, both under the file's ablation)."""
    words = []
    for m in method.split("+"):
        name = "attribution patching over latents" if m == "latent-attribution" else m
        words.append(f"{name} ({ablation} ablation)")
    return "; ".join(words)


@dataclass(frozen=True)
class Candidate:
    """A filling of one hole: its site(s), its attribution score and, when it was verified,
    the recovered fraction of the program with it (the other holes as chosen)."""

    sites: tuple[Site, ...]
    score: float
    recovered: float | None = None

    def text(self) -> str:
        from circuitlang.sites import Latent

        if len(self.sites) > 1 and all(isinstance(s, Latent) for s in self.sites):
            return "features " + ", ".join(f"{s.sae.name}.{s.index}" for s in self.sites)
        return ", ".join(_site_text(s) for s in self.sites)


@dataclass
class HoleFill:
    """What filled one hole, and the evidence.

    Attributes:
        name, kind: the hole (`h`, "head" / "group" / "mlp" / "latent" / "latents").
        chosen: the chosen candidate (a group: all its heads or latents, best first).
        runners_up: the next candidates by attribution, with their checked recovered
            fraction where it was verified (a group: the next heads, each scored as one).
        ranking: every candidate with its attribution score (a group: per head), best first.
        growth: for a group: (size, recovered, meets every expectation) of each step
            of its growth that was verified.
    """

    name: str
    kind: str
    chosen: Candidate
    runners_up: list[Candidate] = field(default_factory=list)
    ranking: list[tuple[Site, float]] = field(default_factory=list)
    growth: list[tuple[int, float, bool]] = field(default_factory=list)

    def to_json(self) -> dict:
        def cand(c: Candidate) -> dict:
            return {"sites": [_site_text(s) for s in c.sites], "score": _num(c.score),
                    "recovered": _num(c.recovered)}

        return {"name": self.name, "kind": self.kind, "chosen": cand(self.chosen),
                "runners_up": [cand(c) for c in self.runners_up],
                "ranking": [[_site_text(s), _num(v)] for s, v in self.ranking],
                "growth": [{"size": k, "recovered": _num(r), "meets": m} for k, r, m in self.growth]}


@dataclass(frozen=True)
class Verified:
    """One assignment scored by causal scrubbing: the fill, its attribution score, its
    recovered fraction, its size (heads and latents in group holes) and the expectations it fails."""

    fill: tuple[tuple[str, tuple[Site, ...]], ...]
    score: float
    recovered: float
    size: int
    failed: tuple[str, ...]

    @property
    def meets(self) -> bool:
        return not self.failed

    def to_json(self) -> dict:
        return {"fill": {f"?{name}": [_site_text(s) for s in found] for name, found in self.fill},
                "score": _num(self.score), "recovered": _num(self.recovered), "size": self.size,
                "meets": self.meets, "failed": list(self.failed)}


@dataclass
class HoleResult:
    """What `fill_holes` (and `circuitlang.discover(FILE)`) found.

    Attributes:
        text: the filled program, formatted.
        program: the same, as an AST.
        hypothesis: the same, resolved.
        holes: hole name -> `HoleFill` (the chosen heads, runners-up, scores), in order
            of appearance.
        verified: every assignment causal scrubbing scored, the chosen one first.
        check: the checker's `CheckResult` on the filled program (None with `check=False`).
        method: how candidates were ranked (`eap-ig-activations`, ...), ablation: with
            which ablated values; positions: the claim positions scored.
        model, task, n, seed, metric, seconds, passes (forward passes, ranking and
            scrubbing together), scrub_batches (`scrub_many` calls), notes.
    """

    text: str
    program: ast.Program
    hypothesis: ir.Hypothesis
    holes: dict[str, HoleFill]
    verified: list[Verified]
    check: object
    method: str
    ablation: str
    positions: tuple[Position, ...]
    model: str
    task: str
    n: int
    seed: int
    metric: str
    seconds: float = 0.0
    passes: int = 0
    scrub_batches: int = 0
    notes: list[str] = field(default_factory=list)

    def chosen(self) -> dict[str, tuple[Site, ...]]:
        """hole name -> the site(s) that filled it."""
        return {name: fill.chosen.sites for name, fill in self.holes.items()}

    def __repr__(self) -> str:
        fills = "; ".join(f"?{n} = {f.chosen.text()}" for n, f in self.holes.items())
        best = self.verified[0] if self.verified else None
        score = "" if best is None else f"; recovered {_fmt(best.recovered)}"
        if best is not None and not best.meets:
            score += f", fails {', '.join(best.failed)}"
        check = ""
        if self.check is not None:
            r = self.check.recovered
            check = (f"; check {_fmt(r.value)} [{_fmt(r.low)}, {_fmt(r.high)}], "
                     + ("holds" if self.check.holds else "FAILS"))
        return f"HoleResult({fills}{score}; {len(self.verified)} verified{check})"

    def to_json(self) -> dict:
        check = None
        if self.check is not None:
            r = self.check.recovered
            check = {"recovered": _num(r.value), "ci": [_num(r.low), _num(r.high)], "holds": self.check.holds,
                     "p_value": _num(self.check.p_value)}
        return {"method": self.method, "ablation": self.ablation, "positions": [str(p) for p in self.positions],
                "model": self.model, "task": self.task, "n": self.n, "seed": self.seed, "metric": self.metric,
                "holes": [f.to_json() for f in self.holes.values()],
                "verified": [v.to_json() for v in self.verified], "check": check, "program": self.text,
                "notes": self.notes, "seconds": round(self.seconds, 3), "passes": self.passes,
                "scrub_batches": self.scrub_batches}

    def _repr_html_(self) -> str:
        """The filled holes in a notebook: each hole's choice with its evidence, the
        check's verdict, the filled program."""
        from circuitlang.report import _e, html_table

        rows = []
        for name, fill in self.holes.items():
            runners = ", ".join(f"{c.text()} ({_fmt(c.recovered)})" if c.recovered is not None else c.text()
                                for c in fill.runners_up)
            rows.append((f"?{name}", fill.chosen.text(), f"{fill.chosen.score:.4g}", runners))
        best = self.verified[0] if self.verified else None
        head = (f"recovered {_fmt(best.recovered)}" + ("" if best.meets else f"; fails {', '.join(best.failed)}")
                if best is not None else "nothing verified")
        check = ""
        if self.check is not None:
            r = self.check.recovered
            check = (f"<p>check: recovered {_fmt(r.value)} [{_fmt(r.low)}, {_fmt(r.high)}], "
                     + ("every expectation holds" if self.check.holds else "an expectation FAILS") + "</p>")
        return (f"<div class='circuitlang-holes'><p><b>{_e(head)}</b> &mdash; {len(self.holes)} hole(s) on "
                f"{_e(self.model)}, task {_e(self.task)}, ranked by {_e(self.method)}</p>"
                f"{html_table(rows, ('hole', 'chosen', 'attribution', 'runners-up (recovered)'))}{check}"
                f"<details><summary>filled program</summary><pre>{_e(self.text)}</pre></details></div>")

    def render(self) -> str:
        best = self.verified[0]
        lines = [f"filled {len(self.holes)} hole(s) on {self.model}, task {self.task} (n={self.n}, seed "
                 f"{self.seed}, metric {self.metric}): recovered {_fmt(best.recovered)}"
                 + ("" if best.meets else f"; fails {', '.join(best.failed)}")]
        for name, fill in self.holes.items():
            lines.append(f"  ?{name} = {fill.chosen.text()}  (attribution {fill.chosen.score:.4g})")
            if fill.growth:
                steps = ", ".join(f"{k}: {_fmt(r)}{'' if m else ' (fails)'}" for k, r, m in fill.growth)
                lines.append(f"      growth by size: {steps}")
            if fill.runners_up:
                lines.append("      runners-up: " + ", ".join(
                    f"{c.text()} (attribution {c.score:.4g}" + (f", recovered {_fmt(c.recovered)})"
                                                                if c.recovered is not None else ")")
                    for c in fill.runners_up))
        lines.append(f"ranked by {describe_ranking(self.method, self.ablation)} at "
                     f"{', '.join(str(p) for p in self.positions)}; {len(self.verified)} assignment(s) "
                     f"verified by causal scrubbing in {self.scrub_batches} batch(es); {self.passes} "
                     f"forward passes in all")
        if self.check is not None:
            r = self.check.recovered
            lines.append(f"check: recovered {100 * r.value:.1f}% [{100 * r.low:.1f}%, {100 * r.high:.1f}%], "
                         + ("every expectation holds" if self.check.holds else "an expectation FAILS"))
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def _num(x):
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _fmt(x) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{100 * x:.1f}%"


def _site_text(site: Site) -> str:
    if isinstance(site, Head):
        return f"{site.layer}.{site.head}"
    return str(site)
