"""`circuitlang sweep SPEC`: a grid of checks and discoveries, here or on Ray.

Takes argv (`circuitlang sweep SPEC [--out DIR] [--resume] [--backend local|ray]
[--address A] [--workers K] [--threads T] [--device D] [-q]`, or `circuitlang sweep
--summary DIR`); gives an exit code: 0 when every item finished and every check (and
discovery re-check) holds, 1 when an item failed an `expect` or raised an error (its
record says which), 2 on a bad spec, folder or option (rendered by
`circuitlang.cli.main`), before any item runs.

The summary table goes to stdout (and into DIR/summary.txt); the progress bar to
stderr when it is a terminal, unless `--quiet`. The spec format: docs/sweeps.md.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from circuitlang.errors import CircuitlangError

EXIT_OK, EXIT_FAILED = 0, 1


def register(subparsers) -> None:
    """Add `sweep` to the `circuitlang` command."""
    p = subparsers.add_parser(
        "sweep",
        help="run a grid of checks and discoveries (files x models x tasks x seeds x options), "
        "locally or on Ray",
        description="Run every cell of a TOML grid (docs/sweeps.md) through `circuitlang.check` or "
        "`circuitlang.discover`, one JSON per item in a sweep directory, then print a summary "
        "table across the grid. `--resume` keeps the finished items of an interrupted sweep.",
    )
    p.add_argument("spec", nargs="?", metavar="SPEC", help="the grid file (.toml)")
    p.add_argument("-o", "--out", metavar="DIR",
                   help="the sweep directory (default: sweeps/NAME, NAME the spec's file name without .toml)")
    p.add_argument("--resume", action="store_true", help="continue the sweep in DIR: finished items are kept")
    p.add_argument("--summary", metavar="DIR", dest="summary_of",
                   help="print the summary of the sweep in DIR again (nothing runs)")
    p.add_argument("--backend", choices=("local", "ray"), default="local",
                   help="local: this process (default); ray: one actor per device on a Ray cluster "
                   "(needs `pip install circuitlang[ray]`)")
    p.add_argument("--address", metavar="HOST:PORT",
                   help="ray: the cluster to join (default: $RAY_ADDRESS, else a local instance)")
    p.add_argument("--workers", type=int, metavar="K", help="ray: number of actors (default: one per device)")
    p.add_argument("--threads", type=int, metavar="T",
                   help="torch CPU threads per worker (default: local as torch has it, ray 1); "
                   "equal threads give identical numbers on both backends")
    p.add_argument("--device", help="local: torch device (default: cuda when present, else cpu)")
    p.add_argument("-q", "--quiet", action="store_true",
                   help="no progress bar (there is none anyway when stderr is not a terminal)")
    p.set_defaults(func=sweep_command)


def sweep_command(args: argparse.Namespace) -> int:
    """Run `circuitlang sweep`; see the module docstring."""
    from circuitlang.runs import invocation
    from circuitlang.sweeps import SweepError, summary, sweep

    if args.summary_of is not None:
        if args.spec is not None or args.resume:
            raise SweepError("--summary prints a finished sweep's table; it takes no SPEC or --resume",
                             code="sweep.summary", hint=f"circuitlang sweep --summary {args.summary_of}")
        text, holds = summary(args.summary_of)
        print(text)
        return EXIT_OK if holds else EXIT_FAILED
    if args.spec is None:
        raise CircuitlangError("no sweep spec given", code="sweep.spec",
                               hint="circuitlang sweep SPEC.toml (docs/sweeps.md), or --summary DIR")
    if args.backend == "local" and (args.address or args.workers is not None):
        raise SweepError("--address and --workers are for --backend ray", code="sweep.backend",
                         hint="add --backend ray, or drop them")
    if args.backend == "ray" and args.device:
        raise SweepError("--device is for --backend local: Ray actors take a GPU each where the cluster has "
                         "GPUs, else CPUs", code="sweep.backend", hint="drop --device")
    out = args.out or str(Path("sweeps") / Path(args.spec).stem)
    result = sweep(args.spec, out, backend=args.backend, resume=args.resume, device=args.device, threads=args.threads,
                   address=args.address, workers=args.workers, progress=False if args.quiet else None,
                   call=invocation())
    print(result.summary)
    kept = f", {result.kept} kept from before" if result.kept else ""
    print(f"\n{result.ran} items run{kept}; results in {result.folder}")
    return EXIT_OK if result.holds else EXIT_FAILED
