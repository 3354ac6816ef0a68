"""The checker: hypothesis text in, `CheckResult` out (`circuitlang.check`).

The whole pipeline on one screen::

    program = parse(text)                         # text_to_ast
    hypothesis = resolve(program, shape, task)    # ast_to_ir
    graph = ir_to_graph(hypothesis)               # ir_to_graph
    scrubbed = Scrubber(...).scrub(graph)         # execute
    result = CheckResult(...)                     # report, stats

`check` also measures what the field asks of a causal claim: the fully ablated
baseline, a bootstrap interval on % recovered, a permutation test against random
circuits of the same size (Shi et al. 2024), the cost of each claim (the score
with that claim's statement removed), and every `expect`, aggregate ones on the
numbers and per-prompt ones as properties searched and shrunk by `hypothesis`.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np

from circuitlang import stats
from circuitlang.errors import CircuitlangError, ResolveError
from circuitlang.execute import Scrubber
from circuitlang.ir_to_graph import ir_to_graph
from circuitlang.report import CheckResult, ClaimResult, Progress

DEFAULT_N = 64
DEFAULT_PERMUTATIONS = 20


def load_hypothesis(program_or_text, *, model=None, task=None, filename=None):
    """Parse and resolve a hypothesis against its model's shape and its task.

    Args:
        program_or_text: circuitlang source, a path to a `.circ` file, or a parsed
            `Program`.
        model: a model name, path or `LoadedModel`; overrides the file's `model`.
        task: a task name or task object; overrides the file's `task`.
        filename: the name errors point at.

    Returns:
        (hypothesis, source text or None).

    Raises:
        CircuitlangError: the text does not parse, names no model or task, or names
            things the model or task lacks (every problem at once).
    """
    from circuitlang.ast_to_ir import resolve
    from circuitlang.text_to_ast import parse

    source = None
    if isinstance(program_or_text, Path) or (
        isinstance(program_or_text, str) and program_or_text.endswith(".circ") and "\n" not in program_or_text
    ):
        path = Path(program_or_text)
        if not path.is_file():
            raise CircuitlangError(f"no hypothesis file {str(path)!r}", hint="pass a .circ file or DSL text")
        source = path.read_text()
        filename = filename or str(path)
        program = parse(source, filename)
    elif isinstance(program_or_text, str):
        source = program_or_text
        program = parse(source, filename)
    else:
        program = program_or_text
    shape, model_name = _shape_for(program, model)
    signature = _signature_for(program, task)
    try:
        hypothesis = resolve(program, shape, signature, filename=filename)
    except CircuitlangError as exc:
        raise (exc.with_source(source) if source is not None else exc) from None
    if hypothesis.model != model_name:
        hypothesis = dataclasses.replace(hypothesis, model=model_name)
    return hypothesis, source


def _declared(program, kind) -> str | None:
    for statement in program.statements:
        if isinstance(statement, kind):
            return statement.name
    return None


def _shape_for(program, model):
    """The model shape to resolve against: the override's, else the `model` line's."""
    from circuitlang import ast
    from circuitlang.models import known_shape

    if model is not None and not isinstance(model, (str, Path)):
        return model.shape, model.name
    name = str(model) if model is not None else _declared(program, ast.ModelDecl)
    if name is None:
        raise CircuitlangError(
            "no model: the hypothesis has no `model` line and none was given",
            code="check.no-model",
            hint="add `model toy-ioi` (or another name) to the file, or pass --model",
        )
    return known_shape(name), name


def _signature_for(program, task):
    from circuitlang import ast
    from circuitlang.tasks import get_signature

    if task is not None and not isinstance(task, str):
        return task.SIGNATURE
    name = task if task is not None else _declared(program, ast.TaskDecl)
    if name is None:
        raise CircuitlangError(
            "no task: the hypothesis has no `task` line and none was given",
            code="check.no-task",
            hint="add `task ioi` (or another task) to the file, or pass --task",
        )
    return get_signature(name)


def check(
    program_or_text,
    *,
    model=None,
    task=None,
    n: int | None = None,
    seed: int | None = None,
    metric: str | None = None,
    semantics: str | None = None,
    permutations: int = DEFAULT_PERMUTATIONS,
    breakdown: bool = True,
    max_examples: int = 25,
    batch_size: int = 64,
    device=None,
    progress: bool | None = False,
) -> CheckResult:
    """Test a circuit hypothesis with causal scrubbing.

    Args:
        program_or_text: DSL text (`"head 9.6 moves name to END"`), a `.circ` path,
            or a parsed program.
        model: a name (`"toy-ioi"`, `"gpt2"`), a local path, or a `LoadedModel`.
            Overrides the file's `model` line.
        task: a task name or a task object; overrides the file's `task` line.
        n: number of prompts (default: the file's `samples`, else 64).
        seed: seed for prompts, resampling, bootstrap and search (default: the
            file's `seed`, else 0).
        metric: overrides the file's `metric` (default: the task's).
        semantics: overrides the file's `semantics` ("paths", the default, or
            "channels"; docs/checker.md).
        permutations: random circuits of the same size to compare against (0: skip).
        breakdown: also measure what each claim costs when removed.
        max_examples: prompts `hypothesis` tries per per-prompt expectation.
        batch_size: prompts per forward pass.
        device: torch device for the model ("cuda", "cpu"; default: CUDA if present).
        progress: show a progress bar on stderr (None: when stderr is a terminal).

    Returns:
        A `CheckResult`; `.holds` says whether every `expect` holds.

    Raises:
        CircuitlangError: bad text, unknown model or task, holes left unfilled.
    """
    started = time.perf_counter()
    hypothesis, model, task, prompts, metric, seed = _prepare(
        program_or_text, model=model, task=task, n=n, seed=seed, metric=metric, device=device
    )
    holes = hypothesis.holes()
    if holes:
        raise ResolveError(
            "this hypothesis has holes (" + ", ".join(str(h) for h in holes) + "); "
            "`check` tests complete hypotheses",
            hint="fill them with `circuitlang discover`, or name the components",
        )
    experiments = run_experiments(hypothesis, model, task, prompts, metric, seed=seed, batch_size=batch_size)
    if not hypothesis.claims and not hypothesis.expectations:
        # a file of experiments only (`patch head * at END`): nothing to scrub
        return _experiments_only(hypothesis, model, task, prompts, metric, seed, experiments, started)

    bar = Progress(3 + (len(hypothesis.claims) if breakdown else 0) + permutations, "checking", enabled=progress)
    scrubber = Scrubber(model, task, prompts, metric, batch_size=batch_size)
    clean = scrubber.clean()
    bar.step("clean")
    empty = dataclasses.replace(hypothesis, claims=())
    random = scrubber.scrub(ir_to_graph(empty), seed=seed).scrubbed
    bar.step("random")
    scrubbed = scrubber.scrub(ir_to_graph(hypothesis), seed=seed).scrubbed
    bar.step("scrubbed")
    recovered = stats.bootstrap_recovered(clean, scrubbed, random, seed=seed)

    result = CheckResult(
        model=model.name,
        task=task.SIGNATURE.name,
        metric=metric,
        seed=seed,
        n=len(clean),
        clean=stats.bootstrap_mean(clean, seed=seed),
        scrubbed=stats.bootstrap_mean(scrubbed, seed=seed),
        random=stats.bootstrap_mean(random, seed=seed),
        recovered=recovered,
        reported={r.name: r.value for r in hypothesis.reported},
        ablation=scrubber_mode(hypothesis),
        source=getattr(hypothesis, "filename", None),
        experiments=experiments,
    )
    if recovered.value != recovered.value:  # NaN
        result.notes.append(
            "clean and fully-ablated runs score the same: this task shows no behaviour "
            "on this model to recover, so no claim can be judged"
        )

    if breakdown:
        result.claims = claim_breakdown(hypothesis, scrubber, clean, random, recovered.value, seed, bar)
    if permutations:
        null = permutation_null(hypothesis, scrubber, clean, random, model.shape, permutations, seed, bar)
        result.null_scores = [float(x) for x in null]
        result.p_value = stats.permutation_p_value(recovered.value, null)
        if len(null) < permutations:
            result.notes.append(
                f"permutation test: only {len(null)} of {permutations} random circuits of the same "
                "size could keep every edge's layer order in this model"
            )

    from circuitlang.properties import judge_expectations

    per_prompt = {"clean": clean, "scrubbed": scrubbed, "random": random}
    result.expectations, result.counterexamples = judge_expectations(
        hypothesis,
        scrubber=scrubber,
        per_prompt=per_prompt,
        summary=result,
        seed=seed,
        max_examples=max_examples,
    )
    bar.close()
    result.passes = scrubber.passes + scrubber.cache.passes
    result.seconds = time.perf_counter() - started
    return result


def run(
    program_or_text,
    *,
    model=None,
    task=None,
    n: int | None = None,
    seed: int | None = None,
    metric: str | None = None,
    batch_size: int = 64,
    device=None,
) -> list:
    """Run a program's experiments (`patch`, `ablate`) and return their numbers.

    For notebooks: `circuitlang.run("patch head * at END", model=m, task="ioi")`
    returns one `ExperimentResult` per experiment statement, whose `.values` and
    `.normalized` are numpy arrays (a layers x heads grid for a head sweep).

    Args: as for `check`.

    Raises:
        CircuitlangError: bad text, unknown model or task, or a program with no
            experiment statements.
    """
    hypothesis, model, task, prompts, metric, seed = _prepare(
        program_or_text, model=model, task=task, n=n, seed=seed, metric=metric, device=device
    )
    if not hypothesis.experiments:
        raise CircuitlangError(
            "this program has no experiments to run",
            code="run.no-experiments",
            hint="write e.g. `patch head * at END`, `ablate heads 9.6, 9.9 with mean at END`; "
            "use circuitlang.check for claims and expectations",
        )
    return run_experiments(hypothesis, model, task, prompts, metric, seed=seed, batch_size=batch_size)


def _prepare(program_or_text, *, model, task, n, seed, metric, device):
    """Parse, resolve, load model and task, and draw the prompts."""
    from circuitlang.models import load_model
    from circuitlang.tasks import load_task

    hypothesis, _ = load_hypothesis(program_or_text, model=model, task=task)
    if model is None or isinstance(model, (str, Path)):
        model = load_model(str(model or hypothesis.model), device=device)
    if task is None or isinstance(task, str):
        task = load_task(task or hypothesis.task, tokenizer=model.tokenizer, **_model_task_params(model))
    seed = seed if seed is not None else (hypothesis.seed if hypothesis.seed is not None else 0)
    n = n or hypothesis.samples or DEFAULT_N
    metric = metric or hypothesis.metric or task.SIGNATURE.default_metric
    return hypothesis, model, task, task.prompts(n, seed), metric, seed


def _model_task_params(model) -> dict:
    """Task parameters a model's own metadata asks for (an embedded toy trained
    without a BOS token says `"prepend_bos": false` in its circuitlang.json)."""
    import json

    from circuitlang.models.known import toy_dir, toy_names

    if model.name not in toy_names():
        return {}
    meta = toy_dir(model.name) / "circuitlang.json"
    if not meta.is_file():
        return {}
    data = json.loads(meta.read_text())
    return {"prepend_bos": data["prepend_bos"]} if "prepend_bos" in data else {}


def run_experiments(hypothesis, model, task, prompts, metric, *, seed, batch_size) -> list:
    """Every experiment statement of a hypothesis, run on one shared set of clean/corrupt runs."""
    from circuitlang import ir
    from circuitlang.experiments import Experiments

    if not hypothesis.experiments:
        return []
    holes = hypothesis.holes()
    if holes:
        raise ResolveError("experiments cannot run with holes: " + ", ".join(str(h) for h in holes),
                           hint="name the components, or use `circuitlang discover`")
    runner = Experiments(model, task, prompts, metric, batch_size=batch_size)
    out = []
    for exp in hypothesis.experiments:
        grid = getattr(exp, "grid", ()) or None
        if isinstance(exp, ir.Patch):
            out.append(runner.activation_patching(list(exp.sites), exp.position, text=exp.text, grid=grid,
                                                  together=not exp.sweep))
        elif isinstance(exp, ir.PathPatch):
            for receiver in exp.receivers:
                out.append(runner.path_patching(list(exp.senders), receiver, exp.position,
                                                text=exp.text, grid=grid))
        elif isinstance(exp, ir.Ablate):
            out.append(runner.ablation(list(exp.sites), exp.mode, exp.position, seed=seed, text=exp.text))
    return out


def _experiments_only(hypothesis, model, task, prompts, metric, seed, experiments, started) -> CheckResult:
    import math

    from circuitlang.stats import Interval

    nan = Interval(math.nan, math.nan, math.nan)
    result = CheckResult(
        model=model.name, task=task.SIGNATURE.name, metric=metric, seed=seed, n=len(prompts.input_ids),
        clean=nan, scrubbed=nan, random=nan, recovered=nan,
        reported={r.name: r.value for r in hypothesis.reported},
        ablation=scrubber_mode(hypothesis), source=hypothesis.filename, experiments=experiments,
    )
    result.seconds = time.perf_counter() - started
    return result


def scrubber_mode(hypothesis) -> str:
    ablation = getattr(hypothesis, "ablation", None)
    return str(getattr(ablation, "mode", ablation) or "resample")


def _statements(hypothesis) -> list[tuple[str, int | None, list[int]]]:
    """Claims grouped by the source statement they came from: (text, line, indices)."""
    groups: dict = {}
    for i, claim in enumerate(hypothesis.claims):
        span = getattr(claim, "span", None)
        text = getattr(claim, "source", None) or getattr(claim, "text", None) or str(claim)
        key = (text, span.line if span else None)
        groups.setdefault(key, []).append(i)
    return [(text, line, idx) for (text, line), idx in groups.items()]


def claim_breakdown(hypothesis, scrubber, clean, random, full_score, seed, bar) -> list[ClaimResult]:
    """For each source statement: % recovered with its claims removed, and the cost."""
    out = []
    statements = _statements(hypothesis)
    if len(statements) < 2:
        return out
    for text, line, idx in statements:
        drop = set(idx)
        kept = tuple(c for i, c in enumerate(hypothesis.claims) if i not in drop)
        reduced = dataclasses.replace(hypothesis, claims=kept)
        scr = scrubber.scrub(ir_to_graph(reduced), seed=seed).scrubbed
        without = stats.recovered(clean, scr, random)
        out.append(ClaimResult(text, line, without, full_score - without))
        bar.step(text)
    return out


def permutation_null(hypothesis, scrubber, clean, random, shape, k, seed, bar) -> np.ndarray:
    """% recovered of `k` random circuits of the same size and shape.

    Each random circuit maps every head the hypothesis names to a distinct random
    head, keeping positions, features, channels and the layer order of edges.
    """
    from circuitlang.sites import Head

    rng = np.random.default_rng(seed + 1)
    heads = sorted({c for c in _heads_in(hypothesis)})
    all_heads = [(l, h) for l in range(shape.n_layers) for h in range(shape.n_heads)]
    scores = []
    tries = 0
    while len(scores) < k and tries < 20 * k:
        tries += 1
        picks = rng.choice(len(all_heads), size=len(heads), replace=False) if heads else []
        mapping = {old: all_heads[i] for old, i in zip(heads, picks)}
        try:
            graph = ir_to_graph(_remap(hypothesis, mapping, Head))
        except CircuitlangError:
            continue  # an edge would run backwards: draw again
        scr = scrubber.scrub(graph, seed=seed).scrubbed
        scores.append(stats.recovered(clean, scr, random))
        bar.step("random circuit")
    return np.array(scores)


def _heads_in(hypothesis):
    from circuitlang.sites import Head

    for claim in hypothesis.claims:
        for attr in ("site", "sender", "receiver"):
            s = getattr(claim, attr, None)
            if isinstance(s, Head):
                yield (s.layer, s.head)


def _remap(hypothesis, mapping, Head):
    def fix(site):
        if isinstance(site, Head) and (site.layer, site.head) in mapping:
            l, h = mapping[(site.layer, site.head)]
            return Head(l, h, site.channel)
        return site

    claims = []
    for claim in hypothesis.claims:
        changes = {a: fix(getattr(claim, a)) for a in ("site", "sender", "receiver") if hasattr(claim, a)}
        claims.append(dataclasses.replace(claim, **changes))
    return dataclasses.replace(hypothesis, claims=tuple(claims))
