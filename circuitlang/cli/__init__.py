"""The `circuitlang` command line.

Each subcommand lives in its own module of this package, which exposes
`register(subparsers)`; registering adds an argparse parser whose `func` takes the
parsed arguments and returns an exit code. Exit codes are the same everywhere:
0 success (every `expect` holds), 1 an `expect` failed, 2 a user error
(bad file, unknown head, model not found), reported as a rendered diagnostic.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from circuitlang.errors import CircuitlangError

# module name -> one-line description; order is the order in `--help`.
COMMAND_MODULES = (
    "circuitlang.cli.lang",  # fmt, parse, check
    "circuitlang.cli.graph",  # graph
    "circuitlang.cli.models",  # models
    "circuitlang.cli.tasks",  # tasks
    "circuitlang.cli.discover",  # discover
    "circuitlang.cli.draw",  # draw
    "circuitlang.cli.runs",  # show, diff
    "circuitlang.cli.sweep",  # sweep
)

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="circuitlang",
        description=(
            "Write circuit hypotheses as small programs, check them against a "
            "transformer with causal scrubbing, and discover circuits."
        ),
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # that command is not written yet
                continue
            raise
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return EXIT_USAGE
    try:
        return int(args.func(args))
    except CircuitlangError as exc:
        print(exc.render(), file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
