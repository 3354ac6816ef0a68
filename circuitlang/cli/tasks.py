"""`circuitlang tasks`: list the tasks with their positions, features, metrics and parameters.

Takes argv (`circuitlang tasks [NAME ...] [--json] [--load-module M] [--example]`);
prints one block per task and returns exit code 0 (2, through the caller, on an
unknown task or module).
"""
from __future__ import annotations

import argparse
import json


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `tasks` subcommand."""
    parser = subparsers.add_parser(
        "tasks",
        help="list tasks: their positions, features and metrics",
        description="List the tasks a hypothesis can name (`task ioi`): the positions "
        "(`at END`), features (`depends on IO`) and metrics each defines, and the "
        "parameters it takes (`task induction length=20`, `check --task-param length=20`).",
    )
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help="tasks to show (default: all); a .jsonl path shows a custom file")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    parser.add_argument("--load-module", action="append", default=[], metavar="MODULE",
                        help="import this Python module (or .py file) and register the "
                        "tasks it defines first (repeatable)")
    parser.add_argument("--example", action="store_true",
                        help="also print one example prompt per task (no tokenizer)")
    parser.set_defaults(func=run)


def describe(name: str, example: bool = False) -> dict:
    """A task's signature (and optionally one example prompt) as a plain dict."""
    from circuitlang.tasks import get_signature, load_task, task_class
    from circuitlang.tasks.params import describe_params

    sig = get_signature(name)
    cls = task_class("custom" if name.endswith((".jsonl", ".json")) else name)
    info = {
        "name": sig.name if not name.endswith((".jsonl", ".json")) else name,
        "description": sig.description,
        "positions": list(sig.positions),
        "features": list(sig.features),
        "aliases": dict(sig.aliases),
        "metrics": list(sig.metrics),
        "default_metric": sig.default_metric,
        "params": describe_params(cls),
    }
    if example:
        if name == "custom":
            info["example"] = None
        else:
            task = load_task(name)
            info["example"] = task.sample(1)[0].text
    return info


def _text(info: dict) -> str:
    aliases = ", ".join(f"{a} -> {t}" for a, t in info["aliases"].items())
    metrics = ", ".join(
        f"{m} (default)" if m == info["default_metric"] else m for m in info["metrics"]
    )
    lines = [
        f"{info['name']}: {info['description']}",
        f"  positions: {', '.join(info['positions'])}, all",
        f"  features:  {', '.join(info['features'])}"
        + (f"   aliases: {aliases}" if aliases else "")
        + "   built in: token(P), position(P)",
        f"  metrics:   {metrics}",
    ]
    for i, param in enumerate(info.get("params", ())):
        default = "" if param["default"] is None else f"={_value(param['default'])}"
        about = f": {param['help']}" if param["help"] else ""
        lines.append(f"  {'params:' if i == 0 else '':<9}  {param['name']}{default} "
                     f"({param['type']}){about}")
    if info.get("example"):
        lines.append(f"  example:   {info['example']!r}")
    return "\n".join(lines)


def _value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def run(args: argparse.Namespace) -> int:
    """Print the tasks; returns 0."""
    from circuitlang.tasks import list_tasks, load_task_module

    for module in args.load_module:
        load_task_module(module)
    names = args.names or list_tasks()
    infos = [describe(name, example=args.example) for name in names]
    if args.json:
        print(json.dumps(infos, indent=2))
    else:
        print("\n\n".join(_text(info) for info in infos))
    return 0
