"""Check results: the object `circuitlang.check` returns, its table and its JSON.

Takes the numbers `check.py` computed and gives (a) `CheckResult`, a plain
object for Python users, (b) `render()`, the terminal table, and (c) `to_json()`,
the machine-readable report written by `circuitlang check --json FILE`, always
atomically (written to a temporary file, then renamed), so an interrupted run
never leaves a half-written report.

`CheckResult.from_json` reads that JSON back (a saved run re-renders without
recomputing). In a notebook a result shows itself (`_repr_html_`: a compact table, the
per-claim breakdown, the counterexamples, a figure when matplotlib is installed) and
gives its numbers away as arrays and tables (`to_numpy`, `to_pandas`; pandas is
optional). The HTML and table helpers here (`html_table`, `figure_html`,
`require_pandas`) are shared by every result class.
"""
from __future__ import annotations

import html
import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

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

    def __repr__(self) -> str:
        return (f"Counterexample({self.expectation!r}: value {self.value:.4g} on {_clip(self.text)!r}"
                f"{', shrunk' if self.shrunk else ''})")

    @classmethod
    def from_json(cls, d: dict) -> "Counterexample":
        """The counterexample `to_json` wrote."""
        return cls(d["text"], list(d["tokens"]), _float(d["value"]), d["expectation"], bool(d["shrunk"]))


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

    def __repr__(self) -> str:
        return f"ExpectationResult({'ok' if self.holds else 'FAIL'} {self.text!r}: {self.detail()})"

    def detail(self) -> str:
        """The number it was judged on, in words (`0.8855 vs 0.8`, `holds on 93.8% of prompts`)."""
        detail = (f"{self.lhs:.4g} vs {self.rhs:.4g}" if self.kind == "aggregate" and self.lhs is not None
                  else f"holds on {_pct(self.value)} of prompts")
        return detail + (f"   ({self.note})" if self.note else "")

    @classmethod
    def from_json(cls, d: dict) -> "ExpectationResult":
        """The expectation `to_json` wrote (an aggregate's null sides read back as NaN, the
        number they stood for; a per-prompt one has none)."""
        side = _float if d["kind"] == "aggregate" else _optional_float
        return cls(d["text"], d["kind"], bool(d["holds"]), _float(d["value"]), side(d["lhs"]), side(d["rhs"]),
                   int(d["failures"]), d["line"], d["note"])


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

    def __repr__(self) -> str:
        where = f"line {self.line} " if self.line else ""
        return (f"ClaimResult({where}{self.text!r}: recovered without it {_pct(self.recovered_without)}, "
                f"cost {_signed_pct(self.cost)})")

    @classmethod
    def from_json(cls, d: dict) -> "ClaimResult":
        """The claim result `to_json` wrote."""
        return cls(d["text"], d["line"], _float(d["recovered_without"]), _float(d["cost"]))


@dataclass(frozen=True, slots=True, eq=False)
class PerPrompt:
    """The metric on every prompt of a check, in dataset order: float64 arrays [N].

    Attributes:
        clean: the unmodified model.
        scrubbed: the model scrubbed as the hypothesis says.
        random: the fully ablated model (every path resampled, or mean / zero).
        texts: the prompts' texts (empty when not known).
    """

    clean: np.ndarray
    scrubbed: np.ndarray
    random: np.ndarray
    texts: tuple[str, ...] = ()

    #: the order of `to_numpy`'s columns
    COLUMNS = ("clean", "scrubbed", "random")

    def __repr__(self) -> str:
        return (f"PerPrompt({len(self.clean)} prompts: mean clean {_fmt(np.mean(self.clean))}, scrubbed "
                f"{_fmt(np.mean(self.scrubbed))}, random {_fmt(np.mean(self.random))})")

    def to_json(self) -> dict:
        return {**{name: [_num(x) for x in getattr(self, name)] for name in self.COLUMNS},
                "texts": list(self.texts)}

    @classmethod
    def from_json(cls, d: dict) -> "PerPrompt":
        return cls(*(np.array([_float(x) for x in d[name]], dtype=np.float64) for name in cls.COLUMNS),
                   tuple(d.get("texts") or ()))


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
        experiments: one `ExperimentResult` per `patch` / `ablate` statement.
        per_prompt: the clean, scrubbed and random metric of every prompt (`PerPrompt`;
            None for a file of experiments only); the aggregates above are their means.
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
    work: str = ""  # what scrubbing computed: rows, reused rows, token-layers (execute_nodes.Work)
    seconds: float = 0.0
    source: str | None = None
    notes: list[str] = field(default_factory=list)
    experiments: list = field(default_factory=list)
    per_prompt: PerPrompt | None = None

    @property
    def holds(self) -> bool:
        """True when every `expect` holds (vacuously true when there are none)."""
        return all(e.holds for e in self.expectations)

    def verdict(self) -> str:
        """The report's last line in words: whether every expectation holds."""
        if not self.expectations:
            return "no expectations to judge (add `expect recovered >= ...`)"
        return "every expectation holds" if self.holds else "an expectation FAILS"

    def __repr__(self) -> str:
        r = self.recovered
        if not self.behaviour:
            score = "recovered undefined (no behaviour)"
        elif math.isnan(r.value):
            score = "nothing scrubbed"
        else:
            score = f"recovered {_pct(r.value)} [{_pct(r.low)}, {_pct(r.high)}]"
        if not math.isnan(self.p_value):
            score += f", p={self.p_value:.3g}"
        failing = sum(not e.holds for e in self.expectations)
        verdict = ("no expectations" if not self.expectations
                   else f"{len(self.expectations) - failing} of {len(self.expectations)} expectations hold")
        counts = [f"{len(self.claims)} claims" if self.claims else "",
                  f"{len(self.counterexamples)} counterexamples" if self.counterexamples else "",
                  f"{len(self.experiments)} experiments" if self.experiments else ""]
        return (f"CheckResult({self.model}, {self.task}, {self.metric}, n={self.n}: {score}; {verdict}"
                + "".join(f"; {c}" for c in counts if c) + ")")

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
                name: {"low": _num(iv.low), "high": _num(iv.high), "level": iv.level}
                for name, iv in (("clean", self.clean), ("scrubbed", self.scrubbed), ("random", self.random))
            },
            "behaviour": self.behaviour,
            "gap": None if self.gap is None else {"value": _num(self.gap.value), "low": _num(self.gap.low),
                                                  "high": _num(self.gap.high), "level": self.gap.level},
            "p_value": _num(self.p_value),
            "null_scores": [_num(x) for x in self.null_scores],
            "null_exact": self.null_exact,
            "null_total": self.null_total,
            "remainder": {node: list(parts) for node, parts in self.remainder},  # node labels are unique
            "holds": self.holds,
            "expectations": [e.to_json() for e in self.expectations],
            "claims": [c.to_json() for c in self.claims],
            "counterexamples": [c.to_json() for c in self.counterexamples],
            "reported": self.reported,
            "notes": self.notes,
            "experiments": [e.to_json() for e in self.experiments],
            "per_prompt": None if self.per_prompt is None else self.per_prompt.to_json(),
            "passes": self.passes,
            "work": self.work,
            "seconds": self.seconds,
            "versions": versions(),
        }

    @classmethod
    def from_json(cls, d: dict) -> "CheckResult":
        """The result `to_json` wrote, for re-rendering a saved run without recomputing.

        `from_json(r.to_json()).render() == r.render()`. JSON has no NaN or infinity: the
        report writes both as null, read back as NaN (how they print as "n/a"). Fields a
        report from an older version lacks take their defaults.
        """
        from circuitlang.experiments import experiment_from_json

        def interval(value, bounds, level=None) -> Interval:
            return Interval(_float(value), _float(bounds["low"]), _float(bounds["high"]),
                            bounds.get("level", level if level is not None else 0.95))

        ci, intervals = d["ci"], d["intervals"]
        gap = d.get("gap")
        return cls(
            model=d["model"], task=d["task"], metric=d["metric"], seed=d["seed"], n=d["n"],
            clean=interval(d["clean"], intervals["clean"]),
            scrubbed=interval(d["scrubbed"], intervals["scrubbed"]),
            random=interval(d["random"], intervals["random"]),
            recovered=interval(d["recovered"], ci),
            gap=None if gap is None else interval(gap["value"], gap),
            behaviour=bool(d.get("behaviour", True)),
            p_value=_float(d.get("p_value")),
            null_scores=[_float(x) for x in d.get("null_scores", [])],
            null_exact=bool(d.get("null_exact", False)),
            null_total=d.get("null_total"),
            expectations=[ExpectationResult.from_json(e) for e in d.get("expectations", [])],
            claims=[ClaimResult.from_json(c) for c in d.get("claims", [])],
            counterexamples=[Counterexample.from_json(c) for c in d.get("counterexamples", [])],
            reported=dict(d.get("reported", {})),
            ablation=d.get("ablation", "resample"),
            semantics=d.get("semantics", "paths"),
            remainder=[(node, list(parts)) for node, parts in d.get("remainder", {}).items()],
            passes=d.get("passes", 0),
            work=d.get("work", ""),
            seconds=float(d.get("seconds", 0.0)),
            source=d.get("source"),
            notes=list(d.get("notes", [])),
            experiments=[experiment_from_json(e) for e in d.get("experiments", [])],
            per_prompt=None if d.get("per_prompt") is None else PerPrompt.from_json(d["per_prompt"]),
        )

    def to_numpy(self) -> np.ndarray:
        """The metric on every prompt: float64 [N, 3], columns clean, scrubbed, random
        (`PerPrompt.COLUMNS`), rows in dataset order.

        Raises:
            CircuitlangError: the result holds no per-prompt values (a file of experiments
                only, or a report from before they were kept).
        """
        per_prompt = self._per_prompt()
        return np.stack([getattr(per_prompt, name) for name in PerPrompt.COLUMNS], axis=1)

    def to_pandas(self, what: str = "prompts"):
        """A pandas DataFrame of one part of the result.

        Args:
            what: "prompts": one row per prompt (index `prompt`, its number), columns
                clean, scrubbed, random and the prompt's text; "claims": one row per
                claim (index: the claim's text), columns line, recovered_without, cost;
                "expectations": one row per `expect` (index: its text), columns kind,
                holds, value, lhs, rhs, failures, note.

        Raises:
            CircuitlangError: pandas is not installed, `what` is none of these, or
                there are no per-prompt values.
        """
        pd = require_pandas()
        if what == "prompts":
            per_prompt = self._per_prompt()
            frame = pd.DataFrame({name: getattr(per_prompt, name) for name in PerPrompt.COLUMNS},
                                 index=pd.RangeIndex(len(per_prompt.clean), name="prompt"))
            if per_prompt.texts:
                frame["text"] = list(per_prompt.texts)
            return frame
        if what == "claims":
            return pd.DataFrame({"line": [c.line for c in self.claims],
                                 "recovered_without": [c.recovered_without for c in self.claims],
                                 "cost": [c.cost for c in self.claims]},
                                index=pd.Index([c.text for c in self.claims], name="claim"))
        if what == "expectations":
            rows = self.expectations
            return pd.DataFrame({"kind": [e.kind for e in rows], "holds": [e.holds for e in rows],
                                 "value": [e.value for e in rows], "lhs": [e.lhs for e in rows],
                                 "rhs": [e.rhs for e in rows], "failures": [e.failures for e in rows],
                                 "note": [e.note for e in rows]},
                                index=pd.Index([e.text for e in rows], name="expectation"))
        from circuitlang.errors import CircuitlangError

        raise CircuitlangError(f"no table {what!r} in a check result", code="display.table",
                               hint="use what='prompts', 'claims' or 'expectations'")

    def _per_prompt(self) -> PerPrompt:
        if self.per_prompt is None:
            from circuitlang.errors import CircuitlangError

            raise CircuitlangError("this result holds no per-prompt values", code="display.per-prompt",
                                   hint="a file of experiments only has none: see .experiments[k].to_numpy()")
        return self.per_prompt

    def _repr_html_(self) -> str:
        """The result in a notebook: the verdict, the numbers with their intervals, the
        claims, the expectations, the counterexamples, each experiment (with its heatmap
        when matplotlib and `circuitlang.figures` are there), the notes."""
        parts = [f"<div class='circuitlang-check'><p><b>{_e(self.verdict())}</b> &mdash; "
                 f"model {_e(self.model)}, task {_e(self.task)}, metric {_e(self.metric)}, ablation "
                 f"{_e(self.ablation)}, n={self.n}, seed={self.seed}</p>"]
        if not (math.isnan(self.recovered.value) and self.experiments and not self.expectations):
            rows = [(name, _fmt(iv.value), f"[{_fmt(iv.low)}, {_fmt(iv.high)}]")
                    for name, iv in (("clean", self.clean), ("scrubbed", self.scrubbed), ("random", self.random))]
            r = self.recovered
            rows.append(("recovered", _pct(r.value), f"{int(r.level * 100)}% CI [{_pct(r.low)}, {_pct(r.high)}]")
                        if self.behaviour else ("recovered", "undefined", "the task shows no behaviour"))
            if not math.isnan(self.p_value):
                rows.append(("p vs random circuits", f"{self.p_value:.3g}",
                             f"{len(self.null_scores)} circuits" + (", exact" if self.null_exact else "")))
            rows += [(f"paper reports {k}", str(v), "") for k, v in self.reported.items()]
            parts.append(html_table(rows, ("", "value", "interval")))
        if self.claims:
            parts.append("<p>claims (recovered without it, cost)</p>" + html_table(
                [(c.line or "", c.text, _pct(c.recovered_without), _signed_pct(c.cost)) for c in self.claims],
                ("line", "claim", "recovered without", "cost")))
        if self.expectations:
            parts.append("<p>expectations</p>" + html_table(
                [("ok" if e.holds else "FAIL", e.text, e.detail()) for e in self.expectations],
                ("", "expectation", "judged on")))
        if self.counterexamples:
            parts.append("<p>smallest counterexamples</p>" + html_table(
                [(c.expectation, f"{c.value:.4g}" + (" (shrunk)" if c.shrunk else ""), c.text,
                  " ".join(repr(t) for t in c.tokens)) for c in self.counterexamples],
                ("expectation", "value", "prompt", "tokens")))
        if self.remainder:
            parts.append("<details><summary>left to the remainder</summary>" + html_table(
                [(node, "; ".join(items)) for node, items in self.remainder], ("node", "paths no claim covers"))
                + "</details>")
        if self.source is not None and self.claims:
            def draw():
                from circuitlang.figures import circuit_diagram

                return circuit_diagram(self.source, check=self)

            parts.append(figure_html(draw))
        parts += [e._repr_html_() for e in self.experiments]
        if self.notes:
            parts.append("<ul>" + "".join(f"<li>note: {_e(n)}</li>" for n in self.notes) + "</ul>")
        parts.append(f"<p><small>{self.passes} forward passes, {self.seconds:.1f}s</small></p></div>")
        return "".join(parts)

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
                lines.append(f"  {mark} {e.text:<48} {e.detail()}")
        if self.counterexamples:
            lines += ["", "smallest counterexamples:"]
            for c in self.counterexamples:
                lines.append(f"  {c.expectation}: value {c.value:.4g}{' (shrunk)' if c.shrunk else ''}")
                lines.append(f"    {c.text!r}")
                lines.append("    tokens: " + " ".join(repr(t) for t in c.tokens))
        lines += experiments
        for note in self.notes:
            lines.append(f"note: {note}")
        lines += ["", f"{self.verdict()}   ({self.passes} forward passes, {self.seconds:.1f}s)"]
        if self.work:
            lines.append(f"scrubbing computed {self.work}")
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


def require_pandas():
    """pandas, or a clear error saying how to install it (it is an optional extra)."""
    try:
        import pandas
    except ModuleNotFoundError:
        from circuitlang.errors import CircuitlangError

        raise CircuitlangError("tables need pandas, which is not installed", code="display.pandas",
                               hint="pip install pandas (or 'circuitlang[notebook]')") from None
    return pandas


def html_table(rows, header=None) -> str:
    """An HTML table of `rows` (sequences of cells); every cell's text is escaped."""
    head = "" if header is None else "<tr>" + "".join(f"<th>{_e(h)}</th>" for h in header) + "</tr>"
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table>{head}{body}</table>"


def figure_html(draw) -> str:
    """`draw()`'s matplotlib figure as inline SVG, or "" when it cannot be drawn.

    `draw` imports `circuitlang.figures` itself, so that a result shows as a table alone
    where matplotlib (or the figure) is missing; a notebook's repr never fails.
    """
    try:
        from circuitlang.figures import svg_text

        svg = svg_text(draw())
    except Exception:  # noqa: BLE001 - a missing extra or a figure that cannot be drawn: table only
        return ""
    start = svg.find("<svg")
    return f"<div class='circuitlang-figure'>{svg[start:] if start >= 0 else svg}</div>"


def _e(x) -> str:
    return html.escape(str(x))


def _num(x):
    if x is None:
        return None
    x = float(x)
    return None if math.isnan(x) or math.isinf(x) else x


def _float(x) -> float:
    """A number `_num` wrote: null reads back as NaN."""
    return math.nan if x is None else float(x)


def _optional_float(x) -> float | None:
    return None if x is None else float(x)


def _clip(text: str, width: int = 48) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def _fmt(x) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{x:.4g}"


def _pct(x) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{100 * x:.1f}%"


def _signed_pct(x) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{100 * x:+.1f}%"
