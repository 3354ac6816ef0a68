"""Check results: the object `circuitlang.check` returns, its table and its JSON.

Takes the numbers `check.py` computed and gives (a) `CheckResult`, a plain
object for Python users, (b) `render()`, the terminal table, and (c) `to_json()`,
the machine-readable report written by `circuitlang check --json FILE`, always
atomically (written to a temporary file, then renamed), so an interrupted run
never leaves a half-written report.
"""
from __future__ import annotations

import json
import math
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from circuitlang.stats import Interval


@dataclass(frozen=True, slots=True)
class Counterexample:
    """A prompt on which a per-prompt expectation fails (shrunk when found by search)."""

    text: str
    tokens: list[str]
    value: float
    expectation: str
    shrunk: bool

    def to_json(self) -> dict:
        return {
            "text": self.text,
            "tokens": self.tokens,
            "value": self.value,
            "expectation": self.expectation,
            "shrunk": self.shrunk,
        }


@dataclass(frozen=True, slots=True)
class ExpectationResult:
    """One `expect` line: whether it holds, and the number it was judged on.

    For a per-prompt (`each`) expectation, `value` is the fraction of the dataset's
    prompts on which it holds, and `failures` counts the rest.
    """

    text: str
    kind: str
    holds: bool
    value: float
    lhs: float | None = None
    rhs: float | None = None
    failures: int = 0
    line: int | None = None
    note: str | None = None  # why it cannot hold ("no behaviour to recover", "not measured")

    def to_json(self) -> dict:
        return {
            "text": self.text,
            "kind": self.kind,
            "holds": self.holds,
            "value": _num(self.value),
            "lhs": _num(self.lhs),
            "rhs": _num(self.rhs),
            "failures": self.failures,
            "line": self.line,
            "note": self.note,
        }


@dataclass(frozen=True, slots=True)
class ClaimResult:
    """What one claim costs: the score with that claim removed from the hypothesis."""

    text: str
    line: int | None
    recovered_without: float
    cost: float

    def to_json(self) -> dict:
        return {
            "text": self.text,
            "line": self.line,
            "recovered_without": _num(self.recovered_without),
            "cost": _num(self.cost),
        }


@dataclass
class CheckResult:
    """Everything `circuitlang check` found out about one hypothesis.

    Attributes:
        clean, scrubbed, random: mean metric of the unmodified, scrubbed and fully
            ablated model (with bootstrap intervals).
        recovered: the causal-scrubbing score with its bootstrap interval (NaN when
            the task shows no behaviour to recover).
        gap: mean of random minus clean per prompt, with its interval: the behaviour
            there is to recover. `behaviour` is False when its interval includes 0.
        p_value: permutation test against random circuits of the same size
            (NaN when not run); `null_exact` when every such circuit was scored.
        remainder: per claimed node with claimed children, what it reads from the
            remainder (the paths no claim covers), in words.
        expectations, claims, counterexamples: per-line results.
        reported: numbers the hypothesis file says the paper reports.
    """

    model: str
    task: str
    metric: str
    seed: int
    n: int
    clean: Interval
    scrubbed: Interval
    random: Interval
    recovered: Interval
    gap: Interval | None = None
    behaviour: bool = True
    p_value: float = float("nan")
    null_scores: list[float] = field(default_factory=list)
    null_exact: bool = False
    null_total: int | None = None
    expectations: list[ExpectationResult] = field(default_factory=list)
    claims: list[ClaimResult] = field(default_factory=list)
    counterexamples: list[Counterexample] = field(default_factory=list)
    reported: dict = field(default_factory=dict)
    ablation: str = "resample"
    semantics: str = "paths"
    remainder: list = field(default_factory=list)
    passes: int = 0
    seconds: float = 0.0
    source: str | None = None
    notes: list[str] = field(default_factory=list)
    experiments: list = field(default_factory=list)

    @property
    def holds(self) -> bool:
        """True when every `expect` holds (vacuously true when there are none)."""
        return all(e.holds for e in self.expectations)

    def to_json(self) -> dict:
        return {
            "source": self.source,
            "model": self.model,
            "task": self.task,
            "metric": self.metric,
            "ablation": self.ablation,
            "semantics": self.semantics,
            "seed": self.seed,
            "n": self.n,
            "clean": _num(self.clean.value),
            "scrubbed": _num(self.scrubbed.value),
            "random": _num(self.random.value),
            "recovered": _num(self.recovered.value),
            "ci": {"low": _num(self.recovered.low), "high": _num(self.recovered.high), "level": self.recovered.level},
            "intervals": {
                name: {"low": _num(iv.low), "high": _num(iv.high)}
                for name, iv in (("clean", self.clean), ("scrubbed", self.scrubbed), ("random", self.random))
            },
            "behaviour": self.behaviour,
            "gap": None if self.gap is None else {"value": _num(self.gap.value), "low": _num(self.gap.low),
                                                  "high": _num(self.gap.high)},
            "p_value": _num(self.p_value),
            "null_scores": [_num(x) for x in self.null_scores],
            "null_exact": self.null_exact,
            "null_total": self.null_total,
            "remainder": {node: list(parts) for node, parts in self.remainder},
            "holds": self.holds,
            "expectations": [e.to_json() for e in self.expectations],
            "claims": [c.to_json() for c in self.claims],
            "counterexamples": [c.to_json() for c in self.counterexamples],
            "reported": self.reported,
            "notes": self.notes,
            "experiments": [e.to_json() for e in self.experiments],
            "passes": self.passes,
            "seconds": round(self.seconds, 3),
            "versions": versions(),
        }

    def render(self) -> str:
        """The terminal report: numbers, one line per claim and expectation, counterexamples."""
        header = (
            f"model {self.model}   task {self.task}   metric {self.metric}   "
            f"ablation {self.ablation}   n={self.n}   seed={self.seed}"
        )
        if self.semantics != "paths":
            header += f"   semantics {self.semantics}"
        experiments = []
        for e in self.experiments:
            experiments += ["", e.render()]
        if math.isnan(self.recovered.value) and self.experiments and not self.expectations:
            return "\n".join([header] + experiments) + "\n"
        r = self.recovered
        lines = [
            header,
            "",
            f"  clean      {_fmt(self.clean.value):>10}   [{_fmt(self.clean.low)}, {_fmt(self.clean.high)}]",
            f"  scrubbed   {_fmt(self.scrubbed.value):>10}   [{_fmt(self.scrubbed.low)}, {_fmt(self.scrubbed.high)}]",
            f"  random     {_fmt(self.random.value):>10}   [{_fmt(self.random.low)}, {_fmt(self.random.high)}]",
            f"  recovered  {_pct(r.value):>10}   {int(r.level * 100)}% CI [{_pct(r.low)}, {_pct(r.high)}]"
            if self.behaviour else "  recovered   undefined   (the task shows no behaviour on this model)",
        ]
        if not math.isnan(self.p_value):
            exact = ", every one there is: exact" if self.null_exact else ""
            lines.append(
                f"  vs random circuits of the same size: p = {self.p_value:.3g} "
                f"({len(self.null_scores)} circuits{exact}; median recovered "
                f"{_pct(sorted(self.null_scores)[len(self.null_scores) // 2])})"
            )
        for key, value in self.reported.items():
            lines.append(f"  paper reports {key} = {value}")
        if self.remainder:
            lines += ["", "left to the remainder (paths into claimed nodes that no claim covers):"]
            for node, parts in self.remainder:
                lines.append(f"  {node}: " + "; ".join(parts))
        if self.claims:
            lines += ["", "claims (recovered without it, cost):"]
            for c in self.claims:
                where = f"{c.line:>4}: " if c.line else "      "
                lines.append(f"  {where}{c.text:<50} {_pct(c.recovered_without):>8}  {_signed_pct(c.cost):>8}")
        if self.expectations:
            lines += ["", "expectations:"]
            for e in self.expectations:
                mark = "ok  " if e.holds else "FAIL"
                detail = (
                    f"{e.lhs:.4g} vs {e.rhs:.4g}" if e.kind == "aggregate" and e.lhs is not None
                    else f"holds on {_pct(e.value)} of prompts"
                )
                if e.note:
                    detail += f"   ({e.note})"
                lines.append(f"  {mark} {e.text:<48} {detail}")
        if self.counterexamples:
            lines += ["", "smallest counterexamples:"]
            for c in self.counterexamples:
                lines.append(f"  {c.expectation}: value {c.value:.4g}{' (shrunk)' if c.shrunk else ''}")
                lines.append(f"    {c.text!r}")
                lines.append("    tokens: " + " ".join(repr(t) for t in c.tokens))
        lines += experiments
        for note in self.notes:
            lines.append(f"note: {note}")
        verdict = "every expectation holds" if self.holds else "an expectation FAILS"
        if not self.expectations:
            verdict = "no expectations to judge (add `expect recovered >= ...`)"
        lines += ["", f"{verdict}   ({self.passes} forward passes, {self.seconds:.1f}s)"]
        return "\n".join(lines)


def versions() -> dict:
    """Versions of the software that produced a result (for the JSON report)."""
    import platform

    out = {"python": platform.python_version()}
    for name in ("circuitlang", "torch", "transformers", "numpy", "hypothesis"):
        try:
            module = __import__(name)
            out[name] = getattr(module, "__version__", "unknown")
        except ImportError:  # pragma: no cover - all are dependencies
            out[name] = None
    return out


def write_json_atomic(path: str | os.PathLike, data) -> None:
    """Write JSON to `path` via a temporary file in the same folder and a rename."""
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write text to `path` via a temporary file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class Progress:
    """A one-line progress bar on stderr for long runs; silent when not a terminal."""

    def __init__(self, total: int, label: str, *, enabled: bool | None = None):
        self.total = max(1, total)
        self.label = label
        self.done = 0
        self.enabled = sys.stderr.isatty() if enabled is None else enabled

    def step(self, what: str = "") -> None:
        self.set(self.done + 1, what)

    def set(self, done: int, what: str = "") -> None:
        """Show `done` of `total` finished."""
        self.done = done
        if not self.enabled:
            return
        width = 24
        filled = int(width * self.done / self.total)
        bar = "#" * filled + "-" * (width - filled)
        sys.stderr.write(f"\r{self.label} [{bar}] {self.done}/{self.total} {what[:30]:<30}")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\r" + " " * 80 + "\r")
            sys.stderr.flush()


def _num(x):
    if x is None:
        return None
    x = float(x)
    return None if math.isnan(x) or math.isinf(x) else x


def _fmt(x) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{x:.4g}"


def _pct(x) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{100 * x:.1f}%"


def _signed_pct(x) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{100 * x:+.1f}%"
