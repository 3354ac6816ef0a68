"""The solver: discover circuits on the edge engine and write them back as programs.

`circuitlang.discover(...)` and `circuitlang discover` are this pipeline::

    setup = prepare(model, task, n, seed)            # model, task, prompts
    problem = Problem(..., ablation, positions)      # the edge space, ablated values, metric
    found = METHODS[method](problem, selection)      # scores and a circuit (eap, eap-ig, ...)
    circuit = prune_dangling(found.circuit)          # no edge that no path uses
    curve = faithfulness.curve(problem, ranking)     # f(k) at MIB's fractions, CPR, CMD
    text = program_text(circuit_hypothesis(...))     # a circuitlang program
    check(text)                                      # the checker re-measures it

Methods (one module each, all on the one edge engine, `circuitlang.models`):
`eap` and `eap-ig` (`attribution`), plus those registered in `METHODS` by their
modules (`acdc`, `prune`). A run directory (`out=`) keeps checkpoints of the long steps
and the results, atomically; `resume=True` continues after an interruption.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from circuitlang.discover.attribution import IG_VARIANTS, Scores, eap, eap_ig
from circuitlang.discover.faithfulness import Curve, curve
from circuitlang.discover.problem import ABLATIONS, EdgeSpace, Problem
from circuitlang.discover.program import circuit_hypothesis, program_text
from circuitlang.discover.rundir import RunDir
from circuitlang.discover.select import above, grow, prune_dangling, top_n
from circuitlang.errors import DiscoveryError
from circuitlang.sites import ALL, Position

__all__ = ["DEFAULT_N", "DiscoveryResult", "Found", "METHODS", "Selection", "discover", "register_method"]

DEFAULT_N = 32
#: The most rows per forward pass when the caller gives no batch size (fewer when the free
#: memory holds fewer: `circuitlang.models.memory`).
DEFAULT_BATCH = 32
#: The prompt length a batch size is planned for when filling a program's holes (its
#: prompts are drawn later, by `fill_holes`).
HOLES_TOKENS = 128


@dataclass(frozen=True)
class Selection:
    """How a ranking becomes a circuit: the `edges` top edges, every edge above
    `threshold`, or a prefix reaching faithfulness `target` (default 0.9; `select.grow`
    says which)."""

    edges: int | None = None
    threshold: float | None = None
    target: float | None = None

    def __post_init__(self) -> None:
        given = [x for x in (self.edges, self.threshold, self.target) if x is not None]
        if len(given) > 1:
            raise DiscoveryError("choose one of --edges, --threshold and --target", code="discover.selection",
                                 hint="--edges N keeps the N top edges; --threshold T those above T; "
                                 "--target F grows the circuit until faithfulness F")


@dataclass
class Found:
    """What a method found: a circuit, and the scores (or ranking) behind it."""

    circuit: torch.Tensor
    scores: Scores | None = None
    ranking: torch.Tensor | None = None
    notes: list[str] = field(default_factory=list)
    extra: dict = field(default_factory=dict)


#: method name -> function(problem, selection, options, rundir) -> Found
METHODS: dict[str, Callable] = {}


def register_method(name: str):
    """Decorator: make a function `(problem, selection, options, rundir) -> Found` a method."""
    def deco(fn):
        METHODS[name] = fn
        return fn
    return deco


def _select(problem: Problem, ranking: torch.Tensor, importance: torch.Tensor, selection: Selection,
            full, empty, metric=None) -> torch.Tensor:
    if selection.edges is not None:
        return top_n(importance, selection.edges)
    if selection.threshold is not None:
        return above(importance, selection.threshold)
    circuit, _ = grow(problem, ranking, selection.target or 0.9, full=full, empty=empty, metric=metric)
    return circuit


def _attribution(problem, selection, options, rundir, scorer) -> Found:
    saved = rundir.read_tensors("scores") if rundir is not None else None
    if saved is not None:
        scores = Scores(saved["edges"], options["method_name"], problem.space)
    else:
        scores = scorer()
        if rundir is not None:
            rundir.write_tensors("scores", {"edges": scores.edges})
    ranking = scores.ranking()
    circuit = _select(problem, ranking, scores.importance(), selection, options["full"], options["empty"],
                      options["task_metric"])
    return Found(circuit, scores, ranking)


@register_method("eap")
def _eap(problem, selection, options, rundir) -> Found:
    options["method_name"] = "eap"
    return _attribution(problem, selection, options, rundir, lambda: eap(problem))


@register_method("eap-ig")
def _eap_ig(problem, selection, options, rundir) -> Found:
    variant, steps = options.get("ig", "inputs"), options.get("steps", 5)
    options["method_name"] = f"eap-ig-{variant}"
    return _attribution(problem, selection, options, rundir, lambda: eap_ig(problem, variant, steps))


@dataclass
class DiscoveryResult:
    """What `circuitlang.discover` found.

    Attributes:
        text: the circuit as a formatted circuitlang program.
        hypothesis: the same, resolved (`circuitlang.ir.Hypothesis`).
        edges: the kept edges as (sender, receiver, position), typed sites.
        circuit: BoolTensor over `space` (True = kept).
        space: the candidate edges (`EdgeSpace`).
        scores: per-edge scores (attribution methods), indexable by typed sites via
            `scores.by_edge()` and `scores.nodes()`; None for methods without scores.
        curve: the faithfulness curve over circuit size (ranking methods), with CPR/CMD.
        faithfulness: the circuit's faithfulness with a bootstrap interval.
        check: the checker's `CheckResult` on `text` (None with `check=False`).
        method, model, task, n, seed, seconds, passes, notes.
        details: what the method reports beyond the circuit, by name: `acdc` (tau,
            metric, edges tried / kept / scored, passes), `log_alpha` and `lambdas`
            (prune's gates and multipliers, tensors). The JSON carries the plain values.
    """

    text: str
    hypothesis: object
    edges: list
    circuit: torch.Tensor
    space: EdgeSpace
    scores: Scores | None
    curve: Curve | None
    faithfulness: object
    check: object
    method: str
    model: str
    task: str
    n: int
    seed: int
    seconds: float = 0.0
    passes: int = 0
    notes: list[str] = field(default_factory=list)
    details: dict = field(default_factory=dict)

    def __repr__(self) -> str:
        f = self.faithfulness
        check = ""
        if self.check is not None:
            r = self.check.recovered
            check = (f"; check recovered {100 * r.value:.1f}% [{100 * r.low:.1f}%, {100 * r.high:.1f}%], "
                     + ("holds" if self.check.holds else "FAILS"))
        curve = "" if self.curve is None else f"; CPR {self.curve.cpr:.3f}, CMD {self.curve.cmd:.3f}"
        return (f"DiscoveryResult({self.method} on {self.model}, {self.task}, n={self.n}: {len(self.edges)} "
                f"edges of {len(self.space)}, faithfulness {f.value:.3f} [{f.low:.3f}, {f.high:.3f}]"
                f"{curve}{check})")

    def to_json(self) -> dict:
        from circuitlang.report import _num

        f = self.faithfulness
        return {
            "method": self.method, "model": self.model, "task": self.task, "n": self.n, "seed": self.seed,
            "edges": [{"sender": str(s), "receiver": str(r), "position": str(p)} for s, r, p in self.edges],
            "n_edges": len(self.edges), "candidates": len(self.space),
            "faithfulness": {"value": _num(f.value), "low": _num(f.low), "high": _num(f.high)},
            "curve": None if self.curve is None else self.curve.to_json(),
            "check": None if self.check is None else {"recovered": _num(self.check.recovered.value),
                                                      "ci": [_num(self.check.recovered.low),
                                                             _num(self.check.recovered.high)],
                                                      "holds": self.check.holds,
                                                      "p_value": _num(self.check.p_value)},
            "program": self.text, "notes": self.notes, "seconds": round(self.seconds, 3),
            "passes": self.passes,
            **{k: v for k, v in self.details.items() if isinstance(v, (dict, list, str, int, float))},
        }

    def to_numpy(self) -> np.ndarray:
        """The per-edge scores, float64 [E] in the order of `space.edges()` (`to_pandas`
        names each edge by its typed sites).

        Raises:
            DiscoveryError: the method gives no scores (ACDC, prune): `to_pandas()` still
                says which edges were kept.
        """
        if self.scores is None:
            raise DiscoveryError(f"{self.method} gives no per-edge scores", code="display.scores",
                                 hint="to_pandas() has a `kept` column for every candidate edge; "
                                 "eap and eap-ig give scores")
        return self.scores.edges.detach().to("cpu", torch.float64).numpy().copy()

    def to_pandas(self):
        """A pandas DataFrame with one row per candidate edge, indexed by a MultiIndex of
        typed sites (sender, receiver, position), columns `score` (NaN for methods
        without scores) and `kept` (in the circuit).

        Raises:
            CircuitlangError: pandas is not installed.
        """
        from circuitlang.report import require_pandas

        pd = require_pandas()
        edges = self.space.edges()
        scores = self.to_numpy() if self.scores is not None else np.full(len(edges), np.nan)
        index = pd.MultiIndex.from_tuples(edges, names=["sender", "receiver", "position"])
        return pd.DataFrame({"score": scores, "kept": self.circuit.detach().to("cpu").bool().numpy()},
                            index=index)

    def _repr_html_(self) -> str:
        """The discovery in a notebook: the numbers, the kept edges, the curve's summaries,
        the check's verdict and, when matplotlib and `circuitlang.figures` are there, the
        circuit's diagram."""
        from circuitlang.report import _e, figure_html, html_table

        f = self.faithfulness
        rows = [("edges kept", f"{len(self.edges)} of {len(self.space)}", ""),
                ("faithfulness", f"{f.value:.3f}", f"[{f.low:.3f}, {f.high:.3f}]")]
        if self.curve is not None:
            c = self.curve
            rows += [("CPR", f"{c.cpr:.3f}", f"[{c.cpr_interval[0]:.3f}, {c.cpr_interval[1]:.3f}]"),
                     ("CMD", f"{c.cmd:.3f}", f"[{c.cmd_interval[0]:.3f}, {c.cmd_interval[1]:.3f}]")]
        if self.check is not None:
            r = self.check.recovered
            rows.append(("check: recovered", f"{100 * r.value:.1f}%",
                         f"[{100 * r.low:.1f}%, {100 * r.high:.1f}%], "
                         + ("every expectation holds" if self.check.holds else "an expectation FAILS")))
        by_edge = self.scores.by_edge() if self.scores is not None else {}
        kept = html_table([(s, r, p, f"{by_edge[(s, r, p)]:.4g}" if (s, r, p) in by_edge else "")
                           for s, r, p in self.edges[:50]], ("sender", "receiver", "position", "score"))
        more = f"<p><small>and {len(self.edges) - 50} more edges</small></p>" if len(self.edges) > 50 else ""

        def draw():
            from circuitlang.figures import circuit_diagram

            return circuit_diagram(self)

        notes = "".join(f"<li>note: {_e(n)}</li>" for n in self.notes)
        return (f"<div class='circuitlang-discovery'><p><b>{_e(self.method)}</b> on {_e(self.model)}, task "
                f"{_e(self.task)}, n={self.n}, seed={self.seed}</p>{html_table(rows, ('', 'value', 'interval'))}"
                f"{figure_html(draw)}<details><summary>kept edges</summary>{kept}{more}</details>"
                f"{'<ul>' + notes + '</ul>' if notes else ''}</div>")

    def render(self) -> str:
        f = self.faithfulness
        lines = [f"{self.method} on {self.model}, task {self.task}, n={self.n}, seed={self.seed}: "
                 f"{len(self.edges)} of {len(self.space)} edges, faithfulness {f.value:.3f} "
                 f"[{f.low:.3f}, {f.high:.3f}]"]
        if self.curve is not None:
            lines += ["", self.curve.render()]
        if self.check is not None:
            r = self.check.recovered
            lines += ["", f"check: recovered {100 * r.value:.1f}% [{100 * r.low:.1f}%, {100 * r.high:.1f}%], "
                          + ("every expectation holds" if self.check.holds else "an expectation FAILS")]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def discover(
    program_or_text=None,
    *,
    model=None,
    task=None,
    method: str = "eap-ig",
    edges: int | None = None,
    threshold: float | None = None,
    target: float | None = None,
    ablation: str | None = None,
    positions: tuple[str, ...] | None = None,
    metric: str | None = None,
    ig: str | None = None,
    steps: int = 5,
    n: int | None = None,
    seed: int | None = None,
    batch_size: int | None = None,
    with_curve: bool = True,
    check: bool = True,
    permutations: int | None = None,
    out=None,
    resume: bool = False,
    device=None,
    task_params: dict | None = None,
    progress: bool = False,
    method_options: dict | None = None,
    dtype=None,
    device_map=None,
) -> DiscoveryResult:
    """Discover a circuit and write it back as a circuitlang program (or, given a program
    with holes, fill them: `circuitlang.discover.holes.fill_holes`, which returns a
    `HoleResult`).

    Args:
        model: a model name, path or `LoadedModel`.
        task: a task name or task object.
        method: one of `METHODS` (`eap`, `eap-ig`, `acdc`, `prune`).
        edges, threshold, target: how to choose the circuit from a ranking (one of
            them; default `target=0.9`); for ACDC `threshold` is its tau.
        ablation: what an ablated edge carries: `corrupt` (the paired
            counterfactual; the default), `resample`, `mean`, `zero`. Given a program with
            holes it replaces the file's `ablation` line (the default: the file's line).
        positions: named positions whose edges are separate candidates (`("END",)`);
            None: edges over the whole sequence.
        metric: what the method optimises (default: `kl` for ACDC and pruning, the
            task's metric otherwise); faithfulness is always in the task's metric.
        ig, steps: EAP-IG's variant (default `inputs`; given a program with holes,
            `inputs` under `ablation corrupt`, else `activations`) and number of points.
        n, seed: prompts and their seed (default: 32 prompts, seed 0; a program with holes:
            its `samples` and `seed` lines).
        batch_size: rows per forward pass (default: as many as the free memory holds
            with gradients and every sender's buffers, at most 32; `circuitlang.models.memory`).
        with_curve: also compute the faithfulness curve of the ranking.
        check: re-check the written program with the causal-scrubbing checker.
        permutations: random circuits for that check's permutation test, 0 .. 10,000
            (default 0; given a program with holes, the checker's 200 when it has an
            `expect` on `p_value`, else 0).
        out: a run directory for checkpoints and results (see `rundir`).
        resume: continue the run in `out` (needs `out`).
        device: torch device.
        task_params: task parameters.
        progress: show progress on stderr.
        method_options: the method's own settings, e.g. pruning's `{"prune_steps": 500,
            "sparsity": 0.02, "warm_start": True}` (see `circuitlang.discover.prune`).
        dtype: the weights' dtype when the model is loaded by name (`"bfloat16"`, ...;
            float32 by default); scores, masks' gradients and metrics stay fp32.
        device_map: place the model's layers with accelerate (`load_model`'s
            `device_map`) instead of on one `device`.

    Raises:
        DiscoveryError: a bad request (method, selection, positions, ablation, `resume`
            without `out`).
        OptionError: a bad `permutations`.
    """
    from circuitlang import options as run_options
    from circuitlang.checker import refuse_load_options
    from circuitlang.models import load_model
    from circuitlang.models.known import model_task_params
    from circuitlang.tasks import load_task

    if permutations is not None:
        permutations = run_options.check_permutations(permutations, "permutations")
    if resume and out is None:
        raise DiscoveryError("resume=True continues a run directory", code="discover.resume",
                             hint="pass out=RUN_DIR (the folder of the interrupted run)")
    if program_or_text is not None:  # a program with holes: fill them (discover/holes.py)
        from circuitlang.discover.holes import fill_holes

        given = [k for k, v in (("edges", edges), ("threshold", threshold), ("target", target),
                                ("positions", positions), ("out", out), ("method_options", method_options))
                 if v is not None]
        if given:
            raise DiscoveryError(", ".join(given) + (" applies" if len(given) == 1 else " apply")
                                 + " to discovering a circuit, not to filling a program's holes (its "
                                 "claims and `expect` lines decide)", code="discover.holes",
                                 hint="drop " + ", ".join(given) + ", or leave out the program")
        if model is None or not hasattr(model, "run"):  # loaded here, as asked, for its batch size
            model = load_model(str(model or _program_model(program_or_text, task)), device=device,
                               dtype=dtype, device_map=device_map)
        else:
            refuse_load_options(model, dtype, device_map)
        if batch_size is None:
            batch_size = _batch_size(model, min(model.shape.n_ctx or HOLES_TOKENS, HOLES_TOKENS))
        return fill_holes(program_or_text, model=model, task=task, n=n, seed=seed, metric=metric,
                          method=method, ig=ig, ablation=ablation, steps=steps, check=check,
                          permutations=permutations, batch_size=batch_size, device=device,
                          task_params=task_params)
    started = time.perf_counter()
    seed = 0 if seed is None else seed
    ablation = "corrupt" if ablation is None else ablation
    ig = "inputs" if ig is None else ig
    if method not in METHODS:
        raise DiscoveryError(f"unknown method {method!r}", code="discover.method",
                             hint="methods: " + ", ".join(sorted(METHODS)))
    if ablation not in ABLATIONS:
        raise DiscoveryError(f"unknown ablation {ablation!r}", code="discover.ablation",
                             hint="use " + ", ".join(ABLATIONS))
    if ig not in IG_VARIANTS:
        raise DiscoveryError(f"unknown EAP-IG variant {ig!r}", code="discover.ig-variant",
                             hint="variants: " + ", ".join(IG_VARIANTS))
    selection = Selection(edges, None if method == "acdc" else threshold, target)
    if model is None:
        raise DiscoveryError("no model to discover a circuit in", code="discover.model",
                             hint="pass --model NAME (e.g. toy-ioi)")
    if task is None:
        raise DiscoveryError("no task to discover a circuit for", code="discover.task",
                             hint="pass --task NAME (e.g. ioi)")
    if not hasattr(model, "run"):
        model = load_model(str(model), device=device, dtype=dtype, device_map=device_map)
    else:
        refuse_load_options(model, dtype, device_map)
    if isinstance(task, str):
        params = {**model_task_params(model.name), **(task_params or {})}
        task = load_task(task, tokenizer=model.tokenizer, **params)
    n = DEFAULT_N if n is None else n
    prompts = task.prompts(n, seed)
    if batch_size is None and resume:  # a resumed run keeps the batch size it started with
        batch_size = _recorded_batch_size(out)
    if batch_size is None:
        batch_size = _batch_size(model, prompts.input_ids.shape[-1])
    space = EdgeSpace.build(model.edge_set(), _positions(task, positions))
    default_metric = task.SIGNATURE.default_metric
    chosen = metric or ("kl" if method in ("acdc", "prune") else default_metric)
    problem = Problem(model, task, prompts, chosen, ablation, space, seed=seed, batch_size=batch_size)

    rundir = None
    spec = {"method": method, "model": model.name, "task": task.SIGNATURE.name, "n": n, "seed": seed,
            "ablation": ablation, "positions": [str(p) for p in space.positions], "metric": chosen,
            "edges": edges, "threshold": threshold, "target": target, "ig": ig, "steps": steps,
            "task_params": {str(k): _plain(v) for k, v in sorted((task_params or {}).items())},
            "batch_size": batch_size}
    if method_options:
        spec["method_options"] = {k: v for k, v in method_options.items() if k not in ("callback", "progress")}
    if out is not None:
        rundir = RunDir(out, spec, resume=resume)

    # faithfulness f(C) = (m(C) - m(empty)) / (m(full) - m(empty)) in the task's metric, with
    # full the full model (the clean run: with named positions not every candidate kept,
    # which still ablates every edge at the other positions) and empty every edge ablated:
    # the checker's % recovered (clean, scrubbed, random)
    full = problem.full(metric=default_metric)
    empty = problem.empty(metric=default_metric)
    options = {"ig": ig, "steps": steps, "threshold": threshold, "full": full, "empty": empty,
               "task_metric": default_metric, "progress": progress, **(method_options or {})}
    found = METHODS[method](problem, selection, options, rundir)
    notes = list(found.notes)
    circuit = prune_dangling(space, found.circuit)
    dropped = int(found.circuit.sum() - circuit.sum())
    if dropped:
        notes.append(f"{dropped} dangling edge(s) dropped: no path from the input to the output uses them")
    if not bool(circuit.any()):
        notes.append("the circuit is empty: no edge is kept (lower the threshold, or ask for more edges)")

    value = problem.score(circuit[None], metric=default_metric)[0]
    faith = _faithfulness_interval(value, full, empty, seed)
    the_curve = None
    if with_curve and found.ranking is not None:
        the_curve = curve(problem, found.ranking, metric=default_metric, seed=seed,
                          prune=lambda kept: prune_dangling(space, kept), full=full, empty=empty)
    hypothesis = circuit_hypothesis(problem, circuit, metric=default_metric, seed=seed,
                                    expect_at_least=faith.low - 0.005,
                                    task_params=tuple(sorted((task_params or {}).items())))
    header = _header(method, options, problem, circuit, faith, the_curve)
    text = program_text(hypothesis, header)
    result_check = None
    if check:
        import circuitlang

        result_check = circuitlang.check(text, model=model, task=task, permutations=permutations or 0,
                                         breakdown=False, max_examples=5, batch_size=batch_size)
        gap = abs(result_check.recovered.value - faith.value)
        if result_check.recovered.value == result_check.recovered.value and gap > 1e-3:
            notes.append(f"the checker re-measures {result_check.recovered.value:.4f}, the engine "
                         f"{faith.value:.4f}")
    result = DiscoveryResult(
        text=text, hypothesis=hypothesis, edges=space.edges(circuit), circuit=circuit, space=space,
        scores=found.scores, curve=the_curve, faithfulness=faith, check=result_check, method=method,
        model=model.name, task=task.SIGNATURE.name, n=problem.n, seed=seed, notes=notes,
        seconds=time.perf_counter() - started, passes=problem.passes, details=dict(found.extra),
    )
    if rundir is not None:
        from circuitlang.runs import discovery_figures, environment, invocation

        rundir.write_json("environment", environment(model, seed=seed, invocation=invocation(
            "circuitlang.discover", {k: v for k, v in rundir.spec.items() if v is not None})))
        rundir.write_text("report.txt", result.render() + "\n")
        discovery_figures(rundir.path / "figures", result)  # when matplotlib is installed
        rundir.write_text("found.circ", text)
        rundir.write_json("result", result.to_json())  # last: it marks the run finished
    return result


def _plain(value):
    """A task parameter as JSON keeps it (run.json compares them on resume)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return str(value)


def _positions(task, positions) -> tuple[Position, ...]:
    if not positions:
        return (ALL,)
    names = task.SIGNATURE.positions
    out = []
    for text in positions:
        try:
            position = Position.parse(text)
        except ValueError as exc:
            raise DiscoveryError(str(exc), code="discover.positions",
                                 hint="positions: " + ", ".join(names)) from None
        base = Position(position.name).name
        if not position.is_all and base not in {Position.parse(p).name for p in names}:
            raise DiscoveryError(f"task {task.SIGNATURE.name} defines no position {text!r}",
                                 code="discover.positions", hint="positions: " + ", ".join(names))
        out.append(ALL if position.is_all else position)
    if any(p.is_all for p in out) and len(out) > 1:
        raise DiscoveryError("`all` covers every position: give it alone, or name positions",
                             code="discover.positions", hint="e.g. --positions END,S2 or --positions all")
    return tuple(dict.fromkeys(out))


def _faithfulness_interval(value: np.ndarray, full: np.ndarray, empty: np.ndarray, seed: int):
    from circuitlang.stats import bootstrap_recovered

    # f = (m(C) - m(empty)) / (m(full) - m(empty)) is causal scrubbing's % recovered with
    # random = empty and clean = full
    return bootstrap_recovered(full, value, empty, seed=seed)


def _header(method, options, problem, circuit, faith, the_curve) -> list[str]:
    from circuitlang import __version__

    lines = [f"Found by circuitlang {__version__} discover: method {options.get('method_name', method)}, "
             f"model {problem.model.name}, task {problem.task.SIGNATURE.name}",
             f"n={problem.n} prompts, seed {problem.seed}, ablation {problem.ablation}, metric optimised "
             f"{problem.metric}; positions: {', '.join(str(p) for p in problem.space.positions)}",
             f"{int(circuit.sum())} of {len(problem.space)} candidate edges; faithfulness "
             f"{faith.value:.3f} (95% CI {faith.low:.3f}-{faith.high:.3f})"]
    if the_curve is not None:
        lines.append(f"faithfulness curve of the ranking: CPR {the_curve.cpr:.3f}, CMD {the_curve.cmd:.3f}")
    return lines


def _batch_size(model, tokens: int) -> int:
    """Rows per pass from the free memory: a pass keeps gradients and every sender's
    ablated value and delta (`circuitlang.models.memory`)."""
    from circuitlang.models.memory import choose_batch_size

    return choose_batch_size(model, tokens, grad=True, edges=True, cap=DEFAULT_BATCH).size


def _recorded_batch_size(out) -> int | None:
    """The batch size an interrupted run in `out` recorded (None: no record to read)."""
    import json
    from pathlib import Path

    try:
        found = json.loads((Path(out) / "run.json").read_text()).get("batch_size")
    except (OSError, ValueError, AttributeError):
        return None
    return found if isinstance(found, int) and not isinstance(found, bool) and found >= 1 else None


def _program_model(program_or_text, task) -> str:
    """The model a program with holes names (its `model` line), for loading it here."""
    from circuitlang.checker import load_hypothesis

    return load_hypothesis(program_or_text, task=task)[0].model


from circuitlang.discover import acdc as _acdc  # noqa: E402,F401  (registers the "acdc" method)
from circuitlang.discover import prune as _prune  # noqa: E402,F401  (registers the "prune" method)


class _CallableModule(type(__import__("sys"))):
    """`circuitlang.discover` is this package and, called, the `discover` function (the
    public API the design names), whichever of the two an import made it."""

    def __call__(self, *args, **kwargs):
        return discover(*args, **kwargs)


__import__("sys").modules[__name__].__class__ = _CallableModule
