"""The checker: hypothesis text in, `CheckResult` out (`circuitlang.check`).

`check` is the pipeline, one stage per line (each stage is its own module)::

    hypothesis = load_hypothesis(text)   # parse (text_to_ast), resolve (ast_to_ir)
    setup = prepare(hypothesis)          # load the model and task, draw the prompts
    graph = ir_to_graph(hypothesis)      # lower to the treeified scrubbing graph
    scores = verdict.score(graph, setup) # execute: clean, fully ablated, scrubbed
    result = verdict.judge(...)          # statistics, the variants, every `expect`

`verdict.judge` measures what the field asks of a causal claim: a bootstrap interval
on % recovered, whether the task shows any behaviour at all, a permutation test
against random circuits of the same size (Shi et al. 2024) and the cost of each
statement (both from `circuitlang.variants`, which the solver shares), and every
`expect`, aggregate ones on the numbers and per-prompt ones as properties searched
and shrunk by `hypothesis`. `run` runs a program's experiments only.
"""
from __future__ import annotations

import dataclasses
import textwrap
import time
from pathlib import Path

from circuitlang import options, verdict
from circuitlang.errors import CircuitlangError, ResolveError
from circuitlang.execute import Scrubber
from circuitlang.ir_to_graph import ir_to_graph
from circuitlang.report import CheckResult

DEFAULT_N = 64
#: The most prompts per forward pass when the caller gives no batch size (fewer when the
#: free memory holds fewer: `circuitlang.models.memory`).
DEFAULT_BATCH = 64
#: Random circuits in the permutation test (all of them when there are fewer).
DEFAULT_PERMUTATIONS = 200


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
        # DSL embedded in Python is usually an indented triple-quoted string: its common
        # indentation is not the language's (only a verb body is indented)
        source = textwrap.dedent(program_or_text)
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
    """What to resolve the task against: a task object's signature, else the name (or the
    file's `task` line, which the resolver reads next to the file: a JSONL task's path is
    relative to the hypothesis file and confined to its folder)."""
    from circuitlang import ast

    if task is not None and not isinstance(task, str):
        return task.SIGNATURE
    if task is None and not any(isinstance(s, ast.TaskDecl) for s in program.statements):
        raise CircuitlangError(
            "no task: the hypothesis has no `task` line and none was given",
            code="check.no-task",
            hint="add `task ioi` (or another task) to the file, or pass --task",
        )
    return task


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
    batch_size: int | None = None,
    device=None,
    dtype=None,
    device_map=None,
    progress: bool | None = False,
    task_params: dict | None = None,
    tokenizer=None,
    allow_pickle: bool = False,
    out=None,
    wandb=None,
) -> CheckResult:
    """Test a circuit hypothesis with causal scrubbing.

    Args:
        program_or_text: DSL text (`"head 9.6 moves name to END"`), a `.circ` path,
            or a parsed program.
        model: a name (`"toy-ioi"`, `"gpt2"`), a local path, or a `LoadedModel`.
            Overrides the file's `model` line.
        task: a task name or a task object; overrides the file's `task` line.
        n: number of prompts (default: the file's `samples`, else 64; a JSONL task
            uses every record).
        seed: seed for prompts, resampling, bootstrap and search (default: the
            file's `seed`, else 0).
        metric: overrides the file's `metric` (default: the task's, or, when that one
            cannot see any claimed position, the first of the task's metrics that can).
        semantics: overrides the file's `semantics` ("paths", the default, or
            "channels"; docs/checker.md).
        permutations: random circuits of the same size to compare against (0: skip).
        breakdown: also measure what each claim costs when removed.
        max_examples: prompts `hypothesis` tries per per-prompt expectation.
        batch_size: prompts per forward pass (default: as many as the free memory
            holds, at most 64: `circuitlang.models.memory`).
        device: torch device for the model ("cuda", "cpu"; default: CUDA if present).
        dtype: the weights' dtype when the model is loaded by name (`"float32"`, the
            default, `"bfloat16"`, `"float16"` or a torch dtype); metrics and their
            means are computed in fp32 whatever it is.
        device_map: place the model's layers with accelerate (`load_model`'s
            `device_map`: `"auto"`, or module name -> `"cpu"`/`"disk"`/`"cuda:N"`)
            instead of on one `device`.
        progress: show a progress bar on stderr (None: when stderr is a terminal).
        task_params: task parameters; each beats the file's `task` line's.
        tokenizer: a tokenizer folder or hub id, for a model folder without one.
        allow_pickle: read pickle weights (`pytorch_model.bin`) when a model folder has no
            safetensors, with torch's weights-only unpickler (off by default).
        out: a new folder to write the run to, atomically (program, IR, result,
            per-prompt values, figures, environment; `circuitlang.runs`, docs/runs.md),
            for `circuitlang show` and `circuitlang diff`.
        wandb: log the same record to Weights & Biases: True, a project name, or a
            dict of `wandb.init` arguments (`circuitlang.tracking`; needs wandb).

    Returns:
        A `CheckResult`; `.holds` says whether every `expect` holds.

    Raises:
        CircuitlangError: bad text, unknown model or task, holes left unfilled, an
            `out` folder that exists and is not empty, `wandb` without wandb installed.
    """
    started = time.perf_counter()
    recording = _Recording.start(program_or_text, locals(), out, wandb)           # before any weights load
    permutations = options.check_permutations(permutations, "permutations")
    max_examples = options.check_max_examples(max_examples, "max_examples")
    hypothesis, source = load_hypothesis(program_or_text, model=model, task=task)   # parse, resolve
    hypothesis = _with_semantics(hypothesis, semantics)
    refuse_holes(hypothesis)                                                       # before any weights load
    setup = prepare(hypothesis, model=model, task=task, n=n, seed=seed, metric=metric, device=device,
                    batch_size=batch_size, task_params=task_params, tokenizer=tokenizer,
                    allow_pickle=allow_pickle, dtype=dtype, device_map=device_map)  # model, task, prompts
    graph = ir_to_graph(hypothesis)                                                # lower
    experiments = run_experiments(hypothesis, setup, progress=progress)
    if not hypothesis.claims and not hypothesis.expectations:  # a file of experiments only
        result = verdict.experiments_only(hypothesis, setup, experiments, started)
    else:
        drawn = verdict.null_circuits(hypothesis, setup, permutations)            # random circuits, their
        scores = verdict.score(graph, setup, progress=progress, later=drawn.graphs)  # reads in this pass: execute
        result = verdict.judge(hypothesis, graph, setup, scores, experiments=experiments,  # statistics, expect
                               permutations=permutations, breakdown=breakdown, max_examples=max_examples,
                               progress=progress, started=started, drawn=drawn)
    recording.save(result, hypothesis, source, setup)                             # the run directory
    return result


#: check's arguments that say how it ran (recorded in a run directory's run.json)
_RECORDED = ("model", "task", "n", "seed", "metric", "semantics", "permutations", "breakdown", "max_examples",
             "batch_size", "device", "dtype", "device_map", "task_params", "tokenizer", "allow_pickle")


@dataclasses.dataclass
class _Recording:
    """Where a check's run goes: a run directory (`out=`), a wandb run (`wandb=`), both
    or neither; both are checked before any weights load."""

    call: dict
    out: Path | None
    tracked: dict | None  # wandb.init arguments ({} for wandb=True) when tracking

    @classmethod
    def start(cls, program_or_text, arguments: dict, out, wandb) -> "_Recording":
        if out is not None:
            from circuitlang.runs import check_out_dir

            out = check_out_dir(out, "out=")
        tracked = None
        if wandb:
            from circuitlang.tracking import wandb_settings

            tracked = wandb_settings(wandb)
        return cls(_call_record(program_or_text, arguments), out, tracked)

    def save(self, result, hypothesis, source, setup) -> None:
        if self.out is not None or self.tracked is not None:
            _record(result, hypothesis, source, setup, self.call, self.out, self.tracked)


def _call_record(program_or_text, arguments: dict) -> dict:
    """check's options as given, and the call that gave them (`runs.invocation`)."""
    from circuitlang.runs import invocation

    given = {k: arguments[k] for k in _RECORDED if arguments.get(k) is not None}
    what = program_or_text if isinstance(program_or_text, (str, Path)) else "<program>"
    return {"options": given, "invocation": invocation("circuitlang.check", {"program": str(what), **given})}


def _record(result, hypothesis, source, setup, call: dict, out, tracked: dict | None) -> None:
    """Write the run directory (to a temporary one when only tracking), and log it."""
    import shutil
    import tempfile

    from circuitlang import runs

    options = {**call["options"], "n": result.n, "seed": result.seed, "metric": result.metric}
    scratch = None
    if out is None:
        scratch = Path(tempfile.mkdtemp(prefix="circuitlang-run-"))
        out = scratch / "run"
    folder = runs.save_check(out, result=result, hypothesis=hypothesis, source=source, model=setup.model,
                             options=options, call=call["invocation"])
    if tracked is not None:
        from circuitlang.tracking import TrackingError, log_run

        try:
            log_run(folder, tracked)
        except Exception as exc:  # the run is kept: a tracker's failure must not lose it
            raise TrackingError(f"logging the run to wandb failed ({type(exc).__name__}: {exc}); the run is "
                                f"saved in {folder}", code="tracking.failed",
                                hint="`circuitlang show` reads it; try again with WANDB_MODE=offline and "
                                "`wandb sync` later") from exc
    if scratch is not None:
        shutil.rmtree(scratch, ignore_errors=True)


def refuse_holes(hypothesis) -> None:
    """`check` and `run` test complete hypotheses: a hole is a user error, found before any
    model loads.

    Raises:
        ResolveError: the hypothesis still has holes.
    """
    holes = hypothesis.holes()
    if holes:
        raise ResolveError(
            "this hypothesis has holes (" + ", ".join(str(h) for h in holes) + "); "
            "`check` tests complete hypotheses",
            code="check.holes",
            hint="fill them with `circuitlang discover FILE`, or name the components",
        )


def _with_semantics(hypothesis, semantics: str | None):
    if semantics is None:
        return hypothesis
    from circuitlang.ir import SEMANTICS

    if semantics not in SEMANTICS:
        raise CircuitlangError(f"unknown semantics {semantics!r}", code="check.semantics",
                               hint="use " + " or ".join(SEMANTICS))
    return dataclasses.replace(hypothesis, semantics=semantics)


def run(
    program_or_text,
    *,
    model=None,
    task=None,
    n: int | None = None,
    seed: int | None = None,
    metric: str | None = None,
    batch_size: int | None = None,
    device=None,
    task_params: dict | None = None,
    tokenizer=None,
    allow_pickle: bool = False,
    dtype=None,
    device_map=None,
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
    hypothesis, _ = load_hypothesis(program_or_text, model=model, task=task)
    if not hypothesis.experiments:
        raise CircuitlangError(
            "this program has no experiments to run",
            code="run.no-experiments",
            hint="write e.g. `patch head * at END`, `ablate heads 9.6, 9.9 with mean at END`; "
            "use circuitlang.check for claims and expectations",
        )
    refuse_holes(hypothesis)
    setup = prepare(hypothesis, model=model, task=task, n=n, seed=seed, metric=metric, device=device,
                    batch_size=batch_size, task_params=task_params, tokenizer=tokenizer,
                    allow_pickle=allow_pickle, dtype=dtype, device_map=device_map)
    return run_experiments(hypothesis, setup)


@dataclasses.dataclass
class Setup:
    """What a check runs on: the model, the task, its prompts, the metric and the seed,
    the scrubber that holds the plain activations, and notes about the choices made."""

    model: object
    task: object
    prompts: object
    metric: str
    seed: int
    batch_size: int
    scrubber: Scrubber
    notes: list[str] = dataclasses.field(default_factory=list)


def prepare(hypothesis, *, model=None, task=None, n=None, seed=None, metric=None, device=None,
            batch_size: int | None = None, task_params: dict | None = None, tokenizer=None,
            allow_pickle: bool = False, dtype=None, device_map=None) -> Setup:
    """Check the run options, load the model and the task, draw the prompts, and choose
    the metric.

    Every option is checked before anything loads (`circuitlang.options`). The task's
    parameters: the model's metadata's, then the file's `task` line's, then the caller's
    (`tasks.task_for`). The prompts: `n`, else the file's `samples`, else 64; a JSONL
    task given neither uses every record once, in file order. The metric: the caller's,
    else the file's, else the task's default, unless that one cannot see any position
    the hypothesis claims (induction's `loss` reads the repeated half, not END), in
    which case the first of the task's metrics that can is chosen and a note says so.
    The batch size: the caller's, else as many prompts as the free memory holds, at
    most `DEFAULT_BATCH` (`circuitlang.models.memory.choose_batch_size`).

    Raises:
        CircuitlangError: a bad option, a model or task that cannot be loaded, prompts
            that do not fit the model.
    """
    from circuitlang.models import load_model
    from circuitlang.tasks import task_for

    if n is not None:
        n = options.check_n(n, "n")
    if seed is not None:
        seed = options.check_seed(seed, "seed")
    if batch_size is not None:
        batch_size = options.check_batch_size(batch_size, "batch_size")
    device = options.check_device(device, "device")
    if model is None or isinstance(model, (str, Path)):
        model = load_model(str(model or hypothesis.model), device=device, allow_pickle=allow_pickle,
                           tokenizer=tokenizer, dtype=dtype, device_map=device_map)
    else:
        refuse_load_options(model, dtype, device_map)
    if task is None or isinstance(task, str):
        if task is not None and task != hypothesis.task:
            hypothesis = dataclasses.replace(hypothesis, task=task)
        task = task_for(hypothesis, model.tokenizer, params=task_params, shape=model.shape,
                        model_name=model.name)
    seed = seed if seed is not None else (hypothesis.seed if hypothesis.seed is not None else 0)
    if n is None and hypothesis.samples is None and task.params.get("n", DEFAULT_N) is None:
        n = None  # a JSONL task's `n` is None: every record once, in file order
    else:
        n = options.prompt_count(n, hypothesis.samples, DEFAULT_N)
    prompts = task.prompts(n, seed)
    options.check_prompts_fit(prompts, model.shape)
    if batch_size is None:
        from circuitlang.models.memory import choose_batch_size

        batch_size = choose_batch_size(model, prompts.input_ids.shape[-1], cap=DEFAULT_BATCH).size
    notes = []
    dropped = getattr(prompts, "dropped", None)
    if dropped is not None and dropped.count:
        text, why = dropped.reasons[0]
        notes.append(f"{dropped.count} prompt(s) could not be built and were left out (the first: "
                     f"{text!r}: {why}); {len(prompts.input_ids)} remain")
    chosen = metric or (hypothesis.metric if _names_metric(hypothesis) else None)
    if chosen is None:
        chosen, note = _default_metric(hypothesis, task, prompts, model.shape.vocab_size)
        if note:
            notes.append(note)
    return Setup(model, task, prompts, chosen, seed, batch_size,
                 Scrubber(model, task, prompts, chosen, batch_size=batch_size), notes)


def refuse_load_options(model, dtype, device_map) -> None:
    """`dtype=` and `device_map=` say how to load a model by name; a `LoadedModel` is loaded.

    Raises:
        CircuitlangError: one of them given with a loaded model it does not describe.
    """
    if dtype is not None:
        from circuitlang.models.load import resolve_dtype

        if resolve_dtype(dtype) != model.dtype:
            raise CircuitlangError(f"dtype={dtype!r} was given with a model already loaded in {model.dtype}",
                                   code="check.dtype",
                                   hint="pass the model's name with dtype=, or load it with "
                                   "load_model(..., dtype=...)")
    if device_map is not None:
        raise CircuitlangError("device_map= was given with a model that is already loaded",
                               code="check.device-map",
                               hint="pass the model's name with device_map=, or load it with "
                               "load_model(..., device_map=...)")


def _names_metric(hypothesis) -> bool:
    """Whether the file chose its metric (the resolver fills in the task's default)."""
    return bool(getattr(hypothesis, "metric_named", True)) and hypothesis.metric is not None


def _default_metric(hypothesis, task, prompts, vocab: int) -> tuple[str, str | None]:
    """The task's default metric, or the first that reads a position the claims reach."""
    from circuitlang.execute import claimed_positions, metric_reads

    default = task.SIGNATURE.default_metric
    if not hypothesis.claims:
        return default, None
    try:
        where = claimed_positions(ir_to_graph(hypothesis), prompts)
    except CircuitlangError:
        return default, None
    if where is None:
        return default, None
    for name in (default,) + tuple(m for m in task.SIGNATURE.metrics if m != default):
        if bool((metric_reads(task, name, prompts, vocab) & where).any()):
            if name == default:
                return default, None
            return name, (f"the task's default metric `{default}` reads no position the hypothesis "
                          f"claims, so `{name}` is used (name one with `metric ...` or --metric)")
    return default, None


def run_experiments(hypothesis, setup: Setup, *, progress: bool | None = False) -> list:
    """Every experiment statement of a hypothesis, run on one shared set of clean/corrupt runs
    (`progress`: a bar per sweep)."""
    from circuitlang import ir
    from circuitlang.experiments import Experiments

    if not hypothesis.experiments:
        return []
    runner = Experiments(setup.model, setup.task, setup.prompts, setup.metric, batch_size=setup.batch_size,
                         progress=progress)
    out = []
    for exp in hypothesis.experiments:
        grid = getattr(exp, "grid", ()) or None
        if isinstance(exp, ir.Patch) and exp.direction == "attribution":
            out.append(runner.attribution(list(exp.sites), exp.position, text=exp.text, grid=grid,
                                          top_k=min(ir.ATTRIBUTION_TOP_K, len(exp.sites))))
        elif isinstance(exp, ir.Patch):
            out.append(runner.activation_patching(list(exp.sites), exp.position, text=exp.text, grid=grid,
                                                  together=not exp.sweep, direction=exp.direction))
        elif isinstance(exp, ir.PathPatch):
            for receiver in exp.receivers:
                out.append(runner.path_patching(list(exp.senders), receiver, exp.position,
                                                text=exp.text, grid=grid))
        elif isinstance(exp, ir.Ablate):
            out.append(runner.ablation(list(exp.sites), exp.mode, exp.position, seed=setup.seed, text=exp.text))
        elif isinstance(exp, (ir.Trace, ir.Probe)):  # circuitlang.tracing, circuitlang.probes
            from circuitlang.probes import run_probe
            from circuitlang.tracing import run_trace

            run = run_trace if isinstance(exp, ir.Trace) else run_probe
            out.append(run(exp, setup, hypothesis, progress=progress))
        elif isinstance(exp, ir.Align):  # circuitlang.das; writes the basis later statements read
            from circuitlang.das import run_align

            out.append(run_align(exp, setup, hypothesis, progress=progress))
    return out


def _model_task_params(model) -> dict:
    """Task parameters a model's own metadata asks for (`models.known.model_task_params`)."""
    from circuitlang.models.known import model_task_params

    return model_task_params(model.name)
