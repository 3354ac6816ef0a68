"""`circuitlang show RUN_DIR` and `circuitlang diff A B`: saved runs, read back.

Takes run directories (`circuitlang check --out`, `circuitlang discover --out`; see
`circuitlang.runs` and docs/runs.md); gives the report again, or a table of what moved
between two runs. Neither loads a model nor recomputes anything.

Exit codes: `show` 0; `diff` 0 when no number moved beyond its intervals, 1 when one
did (an expectation that flipped, a claim in one run only included); both 2 on a
folder that is not a finished run (rendered by `circuitlang.cli.main`).
"""
from __future__ import annotations

import argparse
import json
import sys

EXIT_OK, EXIT_MOVED = 0, 1


def register(subparsers) -> None:
    """Add `show` and `diff` to the `circuitlang` command."""
    show = subparsers.add_parser(
        "show",
        help="print a saved run's report again (no model, nothing recomputed)",
        description="Re-render the report of a run directory written by `circuitlang check --out` "
        "(the same text the run printed) or `circuitlang discover --out`.",
    )
    show.add_argument("run", metavar="RUN_DIR", help="a run directory")
    show.add_argument("--environment", action="store_true",
                      help="also print the environment record (versions, model hash, command, time)")
    show.set_defaults(func=show_command)

    diff = subparsers.add_parser(
        "diff",
        help="compare two saved runs: which numbers moved beyond their intervals",
        description="Compare two run directories of the same kind: % recovered and the clean, "
        "scrubbed and random means (by their intervals), p-values, per-claim costs, "
        "expectations (flipped or not), sweep values. Exit 0 when nothing moved beyond its "
        "intervals, 1 when something did, 2 when a folder is not a finished run.",
    )
    diff.add_argument("a", metavar="A", help="a run directory")
    diff.add_argument("b", metavar="B", help="another run directory of the same kind")
    diff.add_argument("--all", action="store_true", dest="every",
                      help="list the numbers that did not move too")
    diff.add_argument("--json", action="store_true", help="print the comparison as JSON")
    diff.set_defaults(func=diff_command)


def show_command(args: argparse.Namespace) -> int:
    """Print the run's report (stdout) as the run printed it."""
    from circuitlang.runs import load_run

    run = load_run(args.run)
    print(run.render())
    if args.environment:
        print()
        print(json.dumps(run.environment, indent=2))
    return EXIT_OK


def diff_command(args: argparse.Namespace) -> int:
    """Print what moved between two runs; exit 1 when something did."""
    from circuitlang.runs import diff_runs, load_run, render_diff

    a, b = load_run(args.a), load_run(args.b)
    diffs = diff_runs(a, b)
    if args.json:
        json.dump({"a": str(a.path), "b": str(b.path), "moved": any(d.moved for d in diffs),
                   "numbers": [{"what": d.what, "a": d.a, "b": d.b, "moved": d.moved, "why": d.why}
                               for d in diffs]}, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(render_diff(diffs, a, b, every=args.every))
    return EXIT_MOVED if any(d.moved for d in diffs) else EXIT_OK
