"""`circuitlang discover`: find a circuit and write it as a circuitlang program.

Takes argv (`circuitlang discover [FILE] --task T --model M --method eap|eap-ig|acdc|prune
[--threshold TAU | --edges N | --target F] [--ablation ...] [--positions ...] -o found.circ
[--out RUN_DIR [--resume]]`); gives an exit code: 0 when the program was written and its
re-check holds (or was skipped with `--no-check`); 1 when the program was written but the
checker's re-check of it fails an `expect` line: with a FILE of holes, one of the filled
program's (an `expect p_value` under `--permutations 0` among them), without one, the
discovered program's own `expect recovered >= B` (the checker re-measuring less than the
engine's bound, or a task that shows no behaviour); 2 on a bad request (rendered by
`circuitlang.cli.main`).

Every option is checked before a model loads. The program goes to `-o` (atomically;
the folder must be writable, checked first) or to stdout; the report (the faithfulness
curve with CPR/CMD, the checker's re-measurement) goes to stderr, or as JSON with
`--json FILE`.
"""
from __future__ import annotations

import argparse
import sys

from circuitlang.errors import DiscoveryError

EXIT_OK, EXIT_FAILED = 0, 1

# The solver's choices, named here so that building the command line imports no torch
# (tests/discover/test_cli_discover.py checks they equal the solver's own lists).
METHODS = ("acdc", "eap", "eap-ig", "prune")
IG_VARIANTS = ("inputs", "activations", "clean-corrupt")
ABLATIONS = ("corrupt", "resample", "mean", "zero")


def register(subparsers) -> None:
    """Add `discover` to the `circuitlang` command."""
    p = subparsers.add_parser(
        "discover",
        help="discover a circuit (EAP, EAP-IG, ACDC, learned masks) or fill a file's holes",
        description="Find a circuit on the edge engine and write it back as a circuitlang "
        "program that `circuitlang check` re-measures. With FILE, fill its holes "
        "(`head ?h moves IO to END`) instead.",
    )
    p.add_argument("file", nargs="?", metavar="FILE",
                   help="a .circ file with holes to fill (optional): heads, groups, MLPs, SAE latents "
                   "(`feature res5.?f`) and groups of latents (`features res5.?g`)")
    from circuitlang.cli.lang import add_model_options

    add_model_options(p)
    p.add_argument("--task", metavar="T", help="task name (or a .jsonl file of prompt pairs)")
    p.add_argument("--task-param", action="append", default=[], metavar="NAME=VALUE", dest="task_params",
                   help="a task parameter, as on a file's `task` line (repeatable)")
    p.add_argument("--method", default="eap-ig", choices=METHODS,
                   help="discovery method (default: eap-ig)")
    p.add_argument("--ig", choices=IG_VARIANTS,
                   help="EAP-IG's variant (default: inputs, MIB's recommended; with FILE: inputs under "
                   "`ablation corrupt`, else activations)")
    p.add_argument("--steps", type=int, default=5, metavar="K", help="EAP-IG's points (default 5)")
    choose = p.add_mutually_exclusive_group()
    choose.add_argument("--edges", type=int, metavar="N", help="keep the N top-ranked edges")
    choose.add_argument("--threshold", type=float, metavar="T",
                        help="keep edges whose importance exceeds T (ACDC: its tau)")
    choose.add_argument("--target", type=float, metavar="F",
                        help="grow the circuit until faithfulness F (default 0.9)")
    prune = p.add_argument_group("learned masks (--method prune)")
    prune.add_argument("--prune-steps", type=int, metavar="K", help="optimisation steps (default 300)")
    prune.add_argument("--sparsity", type=float, metavar="F",
                       help="target fraction of edges kept (default 0.05)")
    prune.add_argument("--lr", type=float, metavar="LR", help="Adam's learning rate (default 0.1)")
    prune.add_argument("--warm-start", action="store_true", help="start the masks from EAP-IG scores")
    p.add_argument("--ablation", choices=ABLATIONS,
                   help="what an ablated edge carries (default: corrupt, the paired counterfactual; "
                   "with FILE it replaces the file's `ablation` line, default the file's)")
    p.add_argument("--positions", metavar="P,Q",
                   help="named positions whose edges are separate candidates (e.g. END,S2); "
                   "default: edges over the whole sequence")
    p.add_argument("--metric", help="what the method optimises (default: kl for acdc and prune, "
                   "else the task's metric)")
    p.add_argument("-n", "--samples", type=int, metavar="N", help="number of prompts (default 32)")
    p.add_argument("--seed", type=int, help="seed for prompts and resampling (default: the file's "
                   "`seed` line, else 0)")
    p.add_argument("--batch-size", type=int, metavar="B",
                   help="rows per forward pass (default: as many as the free memory holds, at most 32)")
    p.add_argument("-o", "--output", metavar="FOUND.circ", help="write the program here (default: stdout)")
    p.add_argument("--json", metavar="FILE", dest="json_out", help="also write the result as JSON")
    p.add_argument("--out", metavar="RUN_DIR", help="a run directory: checkpoints and results")
    p.add_argument("--resume", action="store_true", help="continue the run in --out after an interruption")
    p.add_argument("--no-curve", action="store_true", help="skip the faithfulness curve")
    p.add_argument("--no-check", action="store_true", help="skip re-checking the program")
    p.add_argument("-q", "--quiet", action="store_true",
                   help="no progress bar (there is none anyway when stderr is not a terminal)")
    p.add_argument("--permutations", type=int, metavar="K",
                   help="random circuits of the same size for the re-check's permutation test "
                   "(default 0; with FILE: 200 when it has an `expect p_value` line, else 0)")
    p.set_defaults(func=discover_command)


def discover_command(args: argparse.Namespace) -> int:
    """Run `circuitlang discover`; see the module docstring."""
    import circuitlang
    from circuitlang import options
    from circuitlang.cli.lang import (
        load_from_args,
        load_hypothesis,
        model_options,
        task_params_from_args,
    )
    from circuitlang.report import write_json_atomic, write_text_atomic

    if args.samples is not None:
        options.check_n(args.samples)
    if args.seed is not None:
        options.check_seed(args.seed)
    if args.batch_size is not None:
        options.check_batch_size(args.batch_size)
    if args.permutations is not None:
        options.check_permutations(args.permutations)
    loading = model_options(args)
    device = loading["device"]
    for path, flag in ((args.output, "-o"), (args.json_out, "--json")):
        if path:
            options.check_output_path(path, flag)
    if args.resume and not args.out:
        raise DiscoveryError("--resume continues a run directory", code="discover.resume",
                             hint="pass --out RUN_DIR (the folder of the interrupted run)")
    if args.steps < 1:
        raise DiscoveryError(f"--steps {args.steps} is not a number of points", code="discover.ig-steps",
                             hint="EAP-IG needs at least 1 (MIB's default is 5)")
    if args.target is not None and not 0 < args.target <= 1.5:
        raise DiscoveryError(f"--target {args.target} is outside (0, 1.5]", code="discover.target",
                             hint="a faithfulness such as 0.9")
    if args.threshold is not None and args.threshold < 0:
        raise DiscoveryError(f"--threshold {args.threshold} is negative", code="discover.threshold",
                             hint="importances (and ACDC's tau) are >= 0")
    if args.edges is not None and args.edges < 1:
        raise DiscoveryError(f"--edges {args.edges} keeps no edge", code="discover.edges",
                             hint="ask for at least 1")
    positions = tuple(p.strip() for p in args.positions.split(",") if p.strip()) if args.positions else None
    method_options = {k: v for k, v in (("prune_steps", args.prune_steps), ("sparsity", args.sparsity),
                                        ("lr", args.lr)) if v is not None}
    if args.warm_start:
        method_options["warm_start"] = True
    params = task_params_from_args(args.task_params)

    model, how = args.model, {}
    if args.tokenizer or args.allow_pickle or args.offload_folder:  # ways to load that discover() leaves to load_model
        name = model or (load_hypothesis(args.file, None, args.task)[0].model if args.file else None)
        if name is not None:
            model = load_from_args(args, name)
    else:
        how = {"dtype": loading["dtype"], "device_map": loading.get("device_map")}
    kwargs = dict(model=model, task=args.task, method=args.method, edges=args.edges,
                  threshold=args.threshold, target=args.target, ablation=args.ablation, positions=positions,
                  metric=args.metric, ig=args.ig, steps=args.steps, n=args.samples, seed=args.seed,
                  batch_size=args.batch_size, with_curve=not args.no_curve, check=not args.no_check,
                  permutations=args.permutations, out=args.out, resume=args.resume, device=device, task_params=params or None,
                  progress=not args.quiet and sys.stderr.isatty(), method_options=method_options or None,
                  **how)
    if args.file:
        kwargs["program_or_text"] = args.file
    result = circuitlang.discover(**kwargs)
    if args.output:
        write_text_atomic(args.output, result.text)
    else:
        sys.stdout.write(result.text)
    if args.json_out:
        write_json_atomic(args.json_out, result.to_json())
    print(result.render(), file=sys.stderr)
    check = getattr(result, "check", None)
    return EXIT_OK if check is None or check.holds else EXIT_FAILED
