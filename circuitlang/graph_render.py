"""Draw an intervention graph: DOT text, JSON, or a self-contained SVG.

Takes an `InterventionGraph` and gives text in one of three formats, chosen by
the output file's suffix (`circuitlang graph FILE -o out.svg`). The SVG needs no
Graphviz: nodes are laid out in rows by their height in the tree (leaves at the
bottom, the logits at the top), edges drawn child -> parent with their
channel@position label.
"""
from __future__ import annotations

import json
from html import escape

from circuitlang.errors import CircuitlangError
from circuitlang.ir_to_graph import InterventionGraph

FORMATS = ("dot", "json", "svg")


def render(graph: InterventionGraph, fmt: str) -> str:
    """Render `graph` as `fmt` ("dot", "json" or "svg")."""
    if fmt == "dot":
        return graph.to_dot()
    if fmt == "json":
        return json.dumps(graph.to_json(), indent=2) + "\n"
    if fmt == "svg":
        return to_svg(graph)
    raise CircuitlangError(f"unknown graph format {fmt!r}", hint="use .dot, .json or .svg")


def to_svg(graph: InterventionGraph) -> str:
    """A layered drawing of the graph as an SVG document."""
    depth = {graph.root: 0}
    for n in reversed(graph.postorder()):
        parent = graph.parent(n)
        if parent is not None:
            depth[n] = depth[parent] + 1
    rows: dict[int, list[int]] = {}
    for n, d in depth.items():
        rows.setdefault(d, []).append(n)
    box_w, box_h, gap_x, gap_y = 230, 34, 20, 70
    width = max(len(r) for r in rows.values()) * (box_w + gap_x) + gap_x
    height = len(rows) * (box_h + gap_y) + gap_y
    pos = {}
    for d, nodes in rows.items():
        row_w = len(nodes) * (box_w + gap_x) - gap_x
        x0 = (width - row_w) / 2
        for i, n in enumerate(sorted(nodes)):
            pos[n] = (x0 + i * (box_w + gap_x), gap_y / 2 + d * (box_h + gap_y))
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
        'font-family="monospace" font-size="11">',
        '<rect width="100%" height="100%" fill="white"/>',
    ]
    for child, parent in graph.graph.edges:
        t = graph.graph.edges[child, parent]["transplant"]
        (cx, cy), (px, py) = pos[child], pos[parent]
        x1, y1, x2, y2 = cx + box_w / 2, cy, px + box_w / 2, py + box_h
        label = f"{t.channel.value if t.channel else 'resid'}@{t.position}"
        out.append(f'<line x1="{x1:.0f}" y1="{y1:.0f}" x2="{x2:.0f}" y2="{y2:.0f}" stroke="#555"/>')
        out.append(
            f'<text x="{(x1 + x2) / 2 + 4:.0f}" y="{(y1 + y2) / 2:.0f}" fill="#a33">{escape(label)}</text>'
        )
    for n, (x, y) in pos.items():
        node = graph.node(n)
        fill = "#dde8ff" if node.role == "root" else ("#eee" if graph.is_leaf(n) else "#e8ffe0")
        out.append(f'<rect x="{x:.0f}" y="{y:.0f}" width="{box_w}" height="{box_h}" rx="4" fill="{fill}" stroke="#333"/>')
        out.append(f'<text x="{x + 6:.0f}" y="{y + 21:.0f}">{escape(node.label()[:34])}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"
