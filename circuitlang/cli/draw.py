"""`circuitlang draw FILE -o c.svg|png|pdf`: draw a circuit, or faithfulness curves.

Takes a `.circ` file (or, with `--curve`, discover results) and writes one figure, in
the format the output's suffix names:

* `draw FILE -o c.svg`: the circuit diagram (`circuitlang.figures.circuit_diagram`).
  The file is only parsed and resolved (the model's shape is enough; no weights load).
* `draw FILE --check -o c.svg`: check the file first, with the run options of
  `circuitlang check` (`--model`, `--task`, `--task-param`, `-n`, `--seed`, ...: the
  same options, borrowed from its parser, checked by the same functions), and draw each
  statement's cost as the width of its edges. The report is printed as `check` prints it.
* `draw --curve result.json [--curve other.json] -o f.svg`: the faithfulness curves of
  discover results (`circuitlang discover --json`, a run directory or its `result.json`)
  on one plot (`circuitlang.figures.faithfulness_curves`).

Exit 0 when the figure is written; 2 on a user error (an unknown suffix, matplotlib
missing, a file with holes, a JSON without a curve), before any model loads.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from circuitlang.errors import CircuitlangError


def register(subparsers) -> None:
    """Add `draw` to the `circuitlang` command (with `check`'s model and run options)."""
    draw = subparsers.add_parser(
        "draw",
        help="draw a circuit diagram (or faithfulness curves) as SVG, PNG or PDF",
        description=(
            "Draw FILE's circuit in the style of the IOI paper: heads by layer, the positions "
            "it names as columns, edges coloured by channel, groups coloured and named. With "
            "--check, check it first and draw each claim's cost as edge width. With --curve, "
            "draw the faithfulness curves of discover results instead. The output's suffix "
            "(.svg, .png, .pdf) chooses the format; needs matplotlib."
        ),
    )
    draw.add_argument("file", nargs="?", metavar="FILE", help="a .circ file (not with --curve)")
    draw.add_argument("-o", "--output", required=True, metavar="OUT", help="out.svg, out.png or out.pdf")
    draw.add_argument("--check", action="store_true",
                      help="check the file (as `circuitlang check` does) and draw each claim's cost")
    draw.add_argument("--curve", action="append", default=[], metavar="JSON",
                      help="a discover result (--json file or run directory) whose faithfulness curve "
                      "to draw; repeat to put several on one plot")
    draw.add_argument("--label", action="append", default=[], metavar="NAME",
                      help="a legend label per --curve (default: each result's method)")
    draw.add_argument("--title", help="the figure's title")
    from circuitlang.cli.lang import add_model_options, add_run_options

    run = draw.add_argument_group("check options (as for `circuitlang check`; --model and --task also "
                                  "choose the shape the file resolves against, the others need --check)")
    defaults = add_model_options(run, model_help="model name, hub id or local path (overrides the file's "
                                 "`model`)")
    defaults.update(add_run_options(run))
    draw.set_defaults(func=draw_command, run_defaults=defaults)


def draw_command(args: argparse.Namespace) -> int:
    from circuitlang.figures import save
    from circuitlang.figures._mpl import FORMATS, FigureError

    suffix = Path(args.output).suffix.lstrip(".").lower()
    if suffix not in FORMATS:
        raise FigureError(f"cannot write a figure as {args.output!r}", code="cli.draw-format",
                          hint="name the output .svg, .png or .pdf")
    if args.curve:
        if args.file or args.check:
            raise CircuitlangError("draw one figure at a time: a circuit (FILE) or curves (--curve)",
                                   code="cli.draw-what", hint="drop FILE and --check, or drop --curve")
        fig = _curves(args)
    elif args.file:
        if args.label:
            raise CircuitlangError("--label names --curve results", code="cli.draw-what",
                                   hint="drop --label, or draw curves with --curve")
        fig = _circuit(args)
    else:
        raise CircuitlangError("nothing to draw", code="cli.draw-what",
                               hint="pass a .circ file, or --curve result.json")
    save(fig, args.output)
    print(f"wrote {args.output}", file=sys.stderr)
    return 0


def _curves(args):
    from circuitlang.figures.curves import faithfulness_curves, load_curves

    curves: dict = {}
    for path in args.curve:
        for name, curve in load_curves(path).items():
            key, k = name, 2
            while key in curves:  # two results of one method: keep both
                key, k = f"{name} ({k})", k + 1
            curves[key] = curve
    labels = args.label or None
    if labels is not None and len(labels) != len(curves):
        raise CircuitlangError(f"{len(labels)} --label for {len(curves)} curves", code="cli.draw-labels",
                               hint="give one --label per curve, or none")
    return faithfulness_curves(curves, labels=labels, title=args.title)


def _circuit(args):
    from circuitlang.cli.lang import load_hypothesis
    from circuitlang.figures.circuit import circuit_diagram, circuit_layout

    given = [d for d, default in getattr(args, "run_defaults", {}).items()
             if d not in ("model", "task") and getattr(args, d, default) != default]
    if given and not args.check:
        names = ", ".join("--" + d.replace("_", "-") for d in given)
        raise CircuitlangError(f"{names} {'applies' if len(given) == 1 else 'apply'} to checking the file",
                               code="cli.draw-check", hint="add --check to check it and draw the costs")
    hypothesis, _ = load_hypothesis(args.file, getattr(args, "model", None), getattr(args, "task", None))
    circuit_layout(hypothesis)  # holes, nothing to draw: refused before a model loads
    result = _check(args, hypothesis) if args.check else None
    return circuit_diagram(hypothesis, check=result, title=args.title)


def _check(args, hypothesis):
    """Check the file as `circuitlang check` does (its options, its functions) and print the report."""
    if not hasattr(args, "samples"):  # pragma: no cover - `check` is always registered before `draw`
        raise CircuitlangError("`draw --check` needs the `check` command", code="cli.draw-check")
    from circuitlang import options
    from circuitlang.checker import DEFAULT_N, check
    from circuitlang.cli.lang import (
        load_from_args,
        model_options,
        task_params_from_args,
    )
    from circuitlang.tasks import merge_task_params, task_for

    if args.samples is not None:
        options.check_n(args.samples)
    seed = None if args.seed is None else options.check_seed(args.seed)
    batch_size = None if args.batch_size is None else options.check_batch_size(args.batch_size)
    max_examples = options.check_max_examples(args.max_examples)
    device = model_options(args)["device"]
    explicit = task_params_from_args(args.task_params)
    n = options.prompt_count(args.samples, hypothesis.samples, DEFAULT_N)
    merge_task_params(hypothesis.task, hypothesis.task_params, explicit, source="--task-param")
    model = load_from_args(args, hypothesis.model)
    task = task_for(hypothesis, model.tokenizer, params=explicit, shape=model.shape, model_name=model.name,
                    source="--task-param")
    # the breakdown is what the diagram draws; the permutation test is not
    result = check(args.file, model=model, task=task, n=n, seed=seed, metric=args.metric,
                   semantics=args.semantics, permutations=0, breakdown=True, max_examples=max_examples,
                   batch_size=batch_size, device=device, progress=None)
    print(result.render())
    if not result.claims:
        print("note: no per-claim costs to draw (a circuit of one statement, or no behaviour to recover)",
              file=sys.stderr)
    return result
