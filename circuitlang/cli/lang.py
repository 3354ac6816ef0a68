"""The language commands: `circuitlang fmt`, `circuitlang parse`, `circuitlang check`.

Takes parsed command-line arguments; gives an exit code (0 fine, 1 an `expect`
failed or `fmt --check` found unformatted files, 2 a user error, rendered as a
diagnostic by `circuitlang.cli.main`).

`check` has two halves. The front half is here: the options are checked
(`circuitlang.options`: a bad `-n`, seed, batch size, device or `--json` path is a
user error before anything runs), `load_hypothesis` parses the file and resolves it
against the model's shape and the task (every problem reported at once), the task
parameters of the file and of `--task-param` are merged and checked, and the model
and task are built (`--tokenizer`, `--allow-pickle`). The back half, running it,
is the executor's (`circuitlang.check`).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from circuitlang import ir
from circuitlang.errors import CircuitlangError, Diagnostic

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def register(subparsers) -> None:
    """Add `fmt`, `parse` and `check` to the `circuitlang` command."""
    fmt = subparsers.add_parser(
        "fmt",
        help="format .circ files in canonical form",
        description="Rewrite hypothesis files in canonical form (comments kept). "
        "With --check, change nothing and exit 1 if a file would change.",
    )
    fmt.add_argument("files", nargs="+", metavar="FILE", help=".circ files to format")
    fmt.add_argument("--check", action="store_true",
                     help="only report files that are not formatted (exit 1 if any)")
    fmt.add_argument("--stdout", action="store_true",
                     help="print the formatted text instead of rewriting the files")
    fmt.set_defaults(func=fmt_command)

    parse_cmd = subparsers.add_parser(
        "parse",
        help="parse and resolve a .circ file; print the AST or the IR",
        description="Parse FILE and print it. With --json, resolve it against its model "
        "and task and print the IR (the resolved hypothesis) as JSON, for tools.",
    )
    parse_cmd.add_argument("file", metavar="FILE", help="a .circ file")
    parse_cmd.add_argument("--json", action="store_true",
                           help="print the resolved IR as JSON")
    parse_cmd.add_argument("--model", metavar="M", help="override the file's `model` line")
    parse_cmd.add_argument("--task", metavar="T", help="override the file's `task` line")
    parse_cmd.set_defaults(func=parse_command)

    check = subparsers.add_parser(
        "check",
        help="check a hypothesis file against a model",
        description="Parse FILE, resolve it against the model and task (reporting every "
        "problem at once), then test it with causal scrubbing. Exit 0 if every "
        "`expect` holds, 1 if one fails, 2 on a user error.",
    )
    check.add_argument("file", metavar="FILE", help="a .circ file")
    add_model_options(check, model_help="model name, hub id or local path (overrides the file's `model`)")
    add_run_options(check)
    check.add_argument("--permutations", type=int, default=200, metavar="K",
                       help="random circuits of the same size for the permutation test (default 200; "
                       "all of them, for an exact p, when the model has fewer; 0: skip)")
    check.add_argument("--no-breakdown", action="store_true",
                       help="skip measuring what each claim costs when removed")
    check.add_argument("--json", metavar="FILE", dest="json_out",
                       help="also write the full result as JSON to FILE (atomically)")
    check.add_argument("--out", metavar="RUN_DIR",
                       help="write the run to a new folder RUN_DIR, atomically: program, resolved IR, "
                       "result JSON, per-prompt values, figures, environment (for `circuitlang show` "
                       "and `circuitlang diff`; docs/runs.md)")
    check.add_argument("--wandb", nargs="?", const=True, default=None, metavar="PROJECT",
                       help="log the run to Weights & Biases (project PROJECT, default circuitlang; "
                       "needs `pip install 'circuitlang[tracking]'`; WANDB_MODE=offline works)")
    check.add_argument("--resolve-only", action="store_true",
                       help="parse and resolve, print what the file claims, run nothing")
    check.add_argument("-q", "--quiet", action="store_true",
                       help="no progress bar (there is none anyway when stderr is not a terminal)")
    check.set_defaults(func=check_command)


def add_run_options(parser) -> dict:
    """Add what a check runs on and how (task, task parameters, prompts, seed, metric,
    semantics, search and batch sizes), as `check` and `draw --check` take them; the
    defaults by destination."""
    parser.add_argument("--task", metavar="T", help="task name (overrides the file's `task`)")
    parser.add_argument("--task-param", action="append", default=[], metavar="NAME=VALUE",
                        dest="task_params",
                        help="a task parameter, written as in a file's `task` line "
                        "(length=20, template_set=ABBA, tokens=[a, b]); beats the file's; "
                        "repeatable; `circuitlang tasks NAME` lists them")
    parser.add_argument("-n", "--samples", type=int, metavar="N",
                        help="number of prompts (default: the file's `samples`, else 64)")
    parser.add_argument("--seed", type=int, help="seed for prompts, resampling, bootstrap, search")
    parser.add_argument("--metric", help="metric to score in (default: the file's, else the task's)")
    parser.add_argument("--semantics", choices=("paths", "channels"),
                        help="how a claimed node's inputs that no claimed child covers are read: "
                        "paths (default, Chan et al.: scrubbed) or channels (see docs/checker.md)")
    parser.add_argument("--max-examples", type=int, default=25, metavar="K",
                        help="prompts `hypothesis` tries per per-prompt expectation")
    parser.add_argument("--batch-size", type=int, metavar="B",
                        help="prompts per forward pass (default: as many as the free memory holds, "
                        "at most 64)")
    return {dest: parser.get_default(dest) for dest in
            ("task", "task_params", "samples", "seed", "metric", "semantics", "max_examples", "batch_size")}


#: The dtypes `--dtype` offers (metrics and their means are fp32 whichever).
DTYPES = ("float32", "bfloat16", "float16")
#: `--device-map` plans (accelerate places the layers; `circuitlang.models.load`).
DEVICE_MAP_PLANS = ("auto", "balanced", "balanced_low_0", "sequential")


def add_model_options(parser, *, model_help: str = "model name, hub id or local path") -> dict:
    """Add the options that say which model to load and how, the same for every command:
    `--model`, `--tokenizer`, `--allow-pickle`, `--device`, `--dtype`, `--device-map`,
    `--offload-folder`. `load_from_args` loads the model they describe.

    Returns:
        {dest: default} of the options added.
    """
    added = [
        parser.add_argument("--model", metavar="M", help=model_help),
        parser.add_argument("--tokenizer", metavar="PATH",
                            help="the tokenizer to use (a folder with tokenizer.json, or a hub id), "
                            "for a model folder that has none"),
        parser.add_argument("--allow-pickle", action="store_true",
                            help="read pickle weights (pytorch_model.bin) when a model has no "
                            "safetensors, with torch's weights-only unpickler (pickle files can "
                            "run code; off by default)"),
        parser.add_argument("--device", help="torch device (default: cuda when present, else cpu)"),
        parser.add_argument("--dtype", choices=DTYPES,
                            help="the weights' dtype (default float32); metrics, scores and their "
                            "means are computed in fp32 whichever"),
        parser.add_argument("--device-map", choices=DEVICE_MAP_PLANS, metavar="PLAN",
                            help="place the layers with accelerate instead of on one --device: "
                            f"{', '.join(DEVICE_MAP_PLANS)} (GPUs, then CPU memory, then disk; "
                            "needs `pip install 'circuitlang[offload]'`)"),
        parser.add_argument("--offload-folder", metavar="DIR",
                            help="where --device-map puts layers offloaded to disk (default: a "
                            "temporary folder)"),
    ]
    return {action.dest: action.default for action in added}


def model_options(args: argparse.Namespace) -> dict:
    """The model options of `args` as `load_model` keyword arguments, each checked.

    Raises:
        OptionError: a device this machine does not have, `--device` with
            `--device-map`, `--offload-folder` without it.
    """
    from circuitlang import options

    device = options.check_device(args.device)
    device_map = getattr(args, "device_map", None)
    folder = getattr(args, "offload_folder", None)
    if device_map is not None and device is not None:
        raise options.OptionError(f"--device {args.device} and --device-map {device_map} were both given",
                                  code="options.device-map",
                                  hint="--device-map places every layer; leave --device out")
    if folder is not None and device_map is None:
        raise options.OptionError("--offload-folder is where --device-map offloads layers",
                                  code="options.device-map", hint="add --device-map auto, or drop it")
    found = {"device": device, "dtype": args.dtype, "allow_pickle": args.allow_pickle,
             "tokenizer": args.tokenizer}
    if device_map is not None:
        found["device_map"] = device_map
        found["offload_folder"] = folder
    return found


def load_from_args(args: argparse.Namespace, name: str):
    """Load model `name` as the model options of `args` say (`add_model_options`).

    Raises:
        CircuitlangError: a bad option (OptionError) or a model that cannot be loaded.
    """
    from circuitlang.models import load_model

    return load_model(name, **model_options(args))


def fmt_command(args: argparse.Namespace) -> int:
    """Format files in place (or check, or print); every file is tried."""
    from circuitlang.printer import format
    from circuitlang.text_to_ast import parse

    errors: list[CircuitlangError] = []
    unformatted: list[str] = []
    for name in args.files:
        try:
            source = _read(name)
            text = format(parse(source, name))
        except CircuitlangError as exc:
            errors.append(exc)
            continue
        if args.stdout:
            sys.stdout.write(text)
        elif text != source:
            if args.check:
                unformatted.append(name)
            else:
                Path(name).write_text(text, encoding="utf-8")
                print(f"formatted {name}")
    for exc in errors[:-1]:
        print(exc.render(), file=sys.stderr)
    for name in unformatted:
        print(f"would reformat {name}")
    if errors:
        raise errors[-1]
    return EXIT_FAILED if unformatted else EXIT_OK


def parse_command(args: argparse.Namespace) -> int:
    """Print the canonical text, or (with --json) the resolved IR as JSON."""
    if args.json:
        hypothesis, _ = load_hypothesis(args.file, args.model, args.task)
        json.dump(hypothesis.to_json(), sys.stdout, indent=2)
        sys.stdout.write("\n")
        return EXIT_OK
    from circuitlang.printer import format
    from circuitlang.text_to_ast import parse

    sys.stdout.write(format(parse(_read(args.file), args.file)))
    return EXIT_OK


def load_hypothesis(
    path: str, model_override: str | None = None, task_override: str | None = None
) -> tuple[ir.Hypothesis, str]:
    """The front half of `check`: read, parse and resolve one file.

    Args:
        path: the .circ file.
        model_override: a model name that beats the file's `model` line.
        task_override: a task name that beats the file's `task` line.

    Returns:
        (the resolved hypothesis, the file's text).

    Raises:
        CircuitlangError: unreadable file, syntax error, or every resolve problem.
    """
    from circuitlang.ast_to_ir import resolve
    from circuitlang.text_to_ast import parse

    source = _read(path)
    program = parse(source, path)
    hypothesis = resolve(program, None, task_override, model=model_override, filename=path,
                         source=source)
    return hypothesis, source


def check_command(args: argparse.Namespace) -> int:
    """`circuitlang check FILE`: check the options, resolve (every problem at once,
    exit 2), build the model and the task, then scrub.

    Prints the report; exit 0 when every `expect` holds, 1 when one fails.
    `--resolve-only` stops after the front half and prints what the file claims.
    """
    from circuitlang import options
    from circuitlang.checker import DEFAULT_N
    from circuitlang.tasks import merge_task_params

    # Every option first: a bad one must not cost a model load, or a whole run whose
    # result then cannot be written.
    if args.samples is not None:
        options.check_n(args.samples)
    seed = None if args.seed is None else options.check_seed(args.seed)
    batch_size = None if args.batch_size is None else options.check_batch_size(args.batch_size)
    permutations = options.check_permutations(args.permutations)
    max_examples = options.check_max_examples(args.max_examples)
    device = model_options(args)["device"]
    if args.json_out:
        options.check_output_path(args.json_out)
    if args.out:
        from circuitlang.runs import check_out_dir

        check_out_dir(args.out)
    if args.wandb:
        from circuitlang.tracking import wandb_settings

        wandb_settings(args.wandb)
    explicit = task_params_from_args(args.task_params)

    hypothesis, source = load_hypothesis(args.file, args.model, args.task)
    n = options.prompt_count(args.samples, hypothesis.samples, DEFAULT_N)
    merge_task_params(hypothesis.task, hypothesis.task_params, explicit, source="--task-param")
    if args.resolve_only:
        print(summarize(hypothesis))
        return EXIT_OK
    from circuitlang.checker import check
    from circuitlang.report import write_json_atomic
    from circuitlang.tasks import task_for

    model = load_from_args(args, hypothesis.model)
    task = task_for(hypothesis, model.tokenizer, params=explicit, shape=model.shape,
                    model_name=model.name, source="--task-param")
    result = check(
        args.file,
        model=model,
        task=task,
        n=n,
        seed=seed,
        metric=args.metric,
        semantics=args.semantics,
        permutations=permutations,
        breakdown=not args.no_breakdown,
        max_examples=max_examples,
        batch_size=batch_size,
        device=device,
        progress=False if args.quiet else None,
        out=args.out,
        wandb=args.wandb,
    )
    print(result.render())
    if args.json_out:
        write_json_atomic(args.json_out, result.to_json())
    return EXIT_OK if result.holds else EXIT_FAILED


def task_params_from_args(texts: list[str]) -> dict:
    """`--task-param NAME=VALUE` options as a dict (the later of two with one name wins).

    Raises:
        ParseError: one that is not `NAME=VALUE` in the syntax of a `task` line.
    """
    from circuitlang.text_to_ast import parse_task_param

    params = {}
    for text in texts:
        param = parse_task_param(text)
        params[param.name] = param.value
    return params


def summarize(hypothesis: ir.Hypothesis) -> str:
    """A readable account of a resolved hypothesis (what `check` shows before running).

    Each core claim is printed as the statement it is (`ir_to_ast.claim_text`, the one
    printer of resolved claims)."""
    from circuitlang.ir_to_ast import claim_text

    h = hypothesis
    lines = [f"{h.filename or '<string>'}: model {h.model}, task {h.task}, metric {h.metric}, "
             f"ablation {h.ablation.mode}"
             + (" given " + ", ".join(map(str, h.ablation.given)) if h.ablation.given else "")]
    for cite in h.citations:
        lines.append(f"  cites {cite}")
    if h.imports:
        lines.append("  uses " + ", ".join(h.imports))
    for r in h.reported:
        lines.append(f"  reported {r.name} = {r.value:g}")
    if h.groups:
        lines.append("groups:")
        for name, heads in h.groups:
            lines.append(f"  {name} = " + ", ".join(f"{x.layer}.{x.head}" for x in heads))
    if h.claims:
        statements: dict[tuple, list[ir.Claim]] = {}
        for claim in h.claims:
            key = (claim.span.line if claim.span else 0, claim.text)
            statements.setdefault(key, []).append(claim)
        lines.append(f"claims ({len(h.claims)} core claims from {len(statements)} statements):")
        for (_, text), claims in statements.items():
            lines.append(f"  {text}")
            for claim in claims:
                lines.append(f"    {claim_text(claim)}")
    if h.experiments:
        lines.append("experiments:")
        for exp in h.experiments:
            extra = ""
            if getattr(exp, "sweep", False):
                extra = f"  (sweep: {' x '.join(map(str, exp.grid))} grid over " \
                        f"{' x '.join(exp.axes)})"
            lines.append(f"  {exp.text}{extra}")
    if h.expectations:
        lines.append("expectations:")
        for exp in h.expectations:
            lines.append(f"  {exp.text}    [{exp.kind}: {exp.lhs} {exp.op} {exp.rhs}]")
    holes = h.holes()
    if holes:
        lines.append("holes (the solver fills these; the checker needs them filled): "
                     + ", ".join(str(x) for x in holes))
    lines.append("resolved: every name checked against the model and the task")
    return "\n".join(lines)


def _read(path: str) -> str:
    from circuitlang.text_to_ast import MAX_SOURCE_CHARS

    try:
        size = Path(path).stat().st_size
        if size > 4 * MAX_SOURCE_CHARS:  # too long however it decodes: do not read it
            raise CircuitlangError(Diagnostic(
                "cli.file", f"{path} is {size:,} bytes; a hypothesis file holds at most "
                f"{MAX_SOURCE_CHARS:,} characters", None,
                "split it into files joined with `use`"))
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CircuitlangError(Diagnostic("cli.file", f"no such file: {path}", None,
                                          "pass the path of a .circ file")) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CircuitlangError(Diagnostic("cli.file", f"cannot read {path}: {exc}", None,
                                          "pass a readable UTF-8 .circ file")) from None
