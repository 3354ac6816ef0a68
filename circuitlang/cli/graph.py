"""`circuitlang graph FILE -o out.dot|out.json|out.svg`: show a hypothesis's scrubbing graph.

Parses and resolves the file (no weights are loaded: the model's shape is enough),
lowers it to its treeified intervention graph, and writes it in the format the
output's suffix names; without `-o`, prints DOT to stdout. `--view tree` draws every
treeified node, `--view collapsed` one box per site (circuitlang/graph_render.py);
the default draws the tree up to `graph_render.TREE_LIMIT` nodes and collapses larger
graphs. JSON is always the whole tree.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from circuitlang.errors import CircuitlangError


def register(subparsers) -> None:
    """Add `graph` to the `circuitlang` command."""
    graph = subparsers.add_parser(
        "graph",
        help="draw a hypothesis's causal-scrubbing graph",
        description=(
            "Lower a hypothesis file to the treeified intervention graph the checker "
            "runs, and write it as Graphviz DOT, JSON or a self-contained SVG (chosen "
            "by the output file's suffix). Arrows point from a node to the node that "
            "reads it, labelled with the channel and position. Large graphs are drawn "
            "collapsed, one box per site with the number of its treeified copies."
        ),
    )
    graph.add_argument("file", metavar="FILE", help="a .circ file")
    graph.add_argument("-o", "--output", metavar="OUT", help="out.dot, out.json or out.svg (default: DOT on stdout)")
    graph.add_argument("--model", metavar="M", help="override the file's `model` line")
    graph.add_argument("--task", metavar="T", help="override the file's `task` line")
    graph.add_argument("--view", choices=("auto", "tree", "collapsed"), default="auto",
                       help="tree: every treeified node; collapsed: one box per site; auto (default): "
                       "the tree up to 60 nodes, collapsed above (DOT and SVG; JSON is the tree)")
    graph.set_defaults(func=graph_command)


def graph_command(args: argparse.Namespace) -> int:
    from circuitlang.checker import load_hypothesis
    from circuitlang.graph_render import FORMATS, render
    from circuitlang.ir_to_graph import ir_to_graph
    from circuitlang.report import write_text_atomic

    fmt = "dot"
    if args.output:
        fmt = Path(args.output).suffix.lstrip(".").lower()
        if fmt not in FORMATS:
            raise CircuitlangError(
                f"cannot write a graph as {args.output!r}",
                code="cli.graph-format",
                hint="name the output .dot, .json or .svg",
            )
    hypothesis, _ = load_hypothesis(args.file, model=args.model, task=args.task)
    text = render(ir_to_graph(hypothesis), fmt, view=args.view)
    if args.output:
        write_text_atomic(args.output, text)
        print(f"wrote {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0
