"""Draw an intervention graph: DOT text, JSON, or a self-contained SVG, treeified or collapsed.

Takes an `InterventionGraph` and gives text in one of three formats, chosen by
the output file's suffix (`circuitlang graph FILE -o out.svg`). The SVG needs no
Graphviz and no matplotlib. Two views of one graph:

* **tree**: the treeified graph the checker runs, one box per node. Nodes are laid
  out in rows by their depth in the tree (the logits at the top, leaves at the bottom),
  edges drawn child -> parent with their channel@position label. Treeification copies
  every shared sub-DAG once per parent, so a large hypothesis's tree is very wide
  (stdlib/ioi.circ: 1,132 nodes, 104,020 px).
* **collapsed**: one box per site (`role`, `site`, `position`: the treeified copies of a
  node merged), with the number of copies in the box; one arrow per (child box, parent
  box, channel, position), labelled `channel@position` and, when several treeified
  edges were merged into it, `xN`. Rows are the longest distance from the logits, so
  every arrow points up; within a row, boxes sit under their parents (the mean of the
  parents' places, then the order of the forward pass); a row of more than `ROW_LIMIT`
  boxes wraps onto several lines, so the width stays readable (stdlib/ioi.circ: 61
  sites, about 2,300 px).

`view="auto"` (the default) draws the tree up to `TREE_LIMIT` nodes and collapses
larger graphs. JSON is always the full tree (it is the data, not a drawing); DOT and
SVG take either view.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from html import escape

import networkx as nx

from circuitlang import topology
from circuitlang.errors import CircuitlangError
from circuitlang.ir_to_graph import InterventionGraph
from circuitlang.sites import Channel

FORMATS = ("dot", "json", "svg")
VIEWS = ("auto", "tree", "collapsed")
#: `view="auto"` draws the treeified graph up to this many nodes, the collapsed one above.
TREE_LIMIT = 60
#: A row of the collapsed view holds at most this many boxes; a longer one wraps.
ROW_LIMIT = 12

#: The channels' colours, for every drawing of circuits (the circuit diagrams of
#: circuitlang/figures/circuit.py use them too; Okabe-Ito, readable by the colour-blind).
PALETTE = {"q": "#0072B2", "k": "#D55E00", "v": "#009E73", "pattern": "#CC79A7", "other": "#777777"}
#: Arrow colours by the channel a child enters its parent through; `None` is an MLP's or
#: the logits' stream.
CHANNEL_COLOURS = {Channel.Q: PALETTE["q"], Channel.K: PALETTE["k"], Channel.V: PALETTE["v"],
                   Channel.PATTERN: PALETTE["pattern"], None: PALETTE["other"]}


class GraphRenderError(CircuitlangError):
    """A graph cannot be drawn as asked (an unknown format or view)."""

    stage = "graph"


def render(graph: InterventionGraph, fmt: str, view: str = "auto") -> str:
    """Render `graph` as `fmt` ("dot", "json" or "svg") in `view` ("auto", "tree", "collapsed").

    Raises:
        GraphRenderError: an unknown format or view.
    """
    if view not in VIEWS:
        raise GraphRenderError(f"unknown graph view {view!r}", code="graph.view",
                               hint="use " + ", ".join(VIEWS))
    if fmt not in FORMATS:
        raise GraphRenderError(f"unknown graph format {fmt!r}", code="graph.format",
                               hint="use .dot, .json or .svg")
    if fmt == "json":
        return json.dumps(graph.to_json(), indent=2) + "\n"
    collapsed = chosen_view(graph, view) == "collapsed"
    if fmt == "dot":
        return collapsed_dot(collapse(graph)) if collapsed else graph.to_dot()
    return collapsed_svg(collapse(graph)) if collapsed else to_svg(graph)


def chosen_view(graph: InterventionGraph, view: str = "auto") -> str:
    """"tree" or "collapsed": what `view` means for this graph."""
    if view != "auto":
        return view
    return "tree" if graph.graph.number_of_nodes() <= TREE_LIMIT else "collapsed"


def _channel_name(channel: Channel | None) -> str:
    return channel.value if channel is not None else "resid"


# --------------------------------------------------------------------------- tree view


def to_svg(graph: InterventionGraph) -> str:
    """The treeified graph, one box per node, as an SVG document."""
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
    out = _svg_open(width, height, "tree")
    for child, parent in graph.graph.edges:
        t = graph.graph.edges[child, parent]["transplant"]
        (cx, cy), (px, py) = pos[child], pos[parent]
        x1, y1, x2, y2 = cx + box_w / 2, cy, px + box_w / 2, py + box_h
        label = f"{_channel_name(t.channel)}@{t.position}"
        out.append(f'<line x1="{x1:.0f}" y1="{y1:.0f}" x2="{x2:.0f}" y2="{y2:.0f}" '
                   f'stroke="{CHANNEL_COLOURS[t.channel]}"/>')
        out.append(
            f'<text x="{(x1 + x2) / 2 + 4:.0f}" y="{(y1 + y2) / 2:.0f}" fill="#a33">{escape(label)}</text>'
        )
    for n, (x, y) in pos.items():
        node = graph.node(n)
        out.append(f'<rect class="node" x="{x:.0f}" y="{y:.0f}" width="{box_w}" height="{box_h}" rx="4" '
                   f'fill="{_fill(node.role, graph.is_leaf(n))}" stroke="#333"/>')
        out.append(f'<text x="{x + 6:.0f}" y="{y + 21:.0f}">{escape(node.label()[:34])}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def _fill(role: str, leaf: bool) -> str:
    return "#dde8ff" if role == "root" else ("#eee" if leaf else "#e8ffe0")


def _svg_open(width: float, height: float, view: str) -> list[str]:
    return [
        (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
         f'font-family="monospace" font-size="11" data-view="{view}">'),
        '<rect width="100%" height="100%" fill="white"/>',
    ]


# --------------------------------------------------------------------------- collapsed view


@dataclass(frozen=True)
class Box:
    """One site of the collapsed graph: every treeified copy of (role, site, position).

    Attributes:
        key: (role, site, position).
        features: the distinct feature tuples its copies agree on, in first-seen order.
        copies: how many treeified nodes it stands for.
        leaf: whether its copies have no claimed children.
    """

    key: tuple
    features: tuple
    copies: int
    leaf: bool

    @property
    def label(self) -> str:
        role, site, position = self.key
        return "logits" if role == "root" else f"{site} at {position}"

    @property
    def detail(self) -> str:
        feats = " / ".join(", ".join(str(f) for f in fs) or "nothing" for fs in self.features)
        if self.key[0] == "root":
            feats = "the reference prompt"
        return f"| {feats}" + (f"  x{self.copies}" if self.copies > 1 else "")


@dataclass(frozen=True)
class Link:
    """The treeified edges from one box into another through one channel at one position."""

    child: tuple
    parent: tuple
    channel: Channel | None
    position: object
    copies: int

    @property
    def label(self) -> str:
        return f"{_channel_name(self.channel)}@{self.position}" + (f" x{self.copies}" if self.copies > 1 else "")


@dataclass(frozen=True)
class Collapsed:
    """A graph collapsed to one box per site; `root` is the logits' key."""

    boxes: tuple[Box, ...]
    links: tuple[Link, ...]
    root: tuple
    nodes: int  # treeified nodes it stands for


def _key(node) -> tuple:
    return (node.role, node.site, node.position)


def collapse(graph: InterventionGraph) -> Collapsed:
    """Merge the treeified copies of each site into one box (see the module docstring)."""
    features: dict[tuple, dict] = {}
    copies: dict[tuple, int] = {}
    leaf: dict[tuple, bool] = {}
    for n in sorted(graph.graph.nodes):
        node = graph.node(n)
        k = _key(node)
        features.setdefault(k, {}).setdefault(node.features, None)
        copies[k] = copies.get(k, 0) + 1
        leaf[k] = leaf.get(k, True) and graph.is_leaf(n)
    links: dict[tuple, int] = {}
    for child, parent in sorted(graph.graph.edges):
        t = graph.graph.edges[child, parent]["transplant"]
        k = (_key(graph.node(child)), _key(graph.node(parent)), t.channel, t.position)
        links[k] = links.get(k, 0) + 1
    boxes = tuple(Box(k, tuple(features[k]), copies[k], leaf[k]) for k in copies)
    return Collapsed(boxes, tuple(Link(c, p, ch, pos, m) for (c, p, ch, pos), m in links.items()),
                     _key(graph.node(graph.root)), graph.graph.number_of_nodes())


def _site_rank(key: tuple) -> tuple:
    role, site, position = key
    try:
        order = topology.site_order(site)
    except ValueError:
        order = 0.0
    return (-order, role != "input", str(site), str(position))


def layout(collapsed: Collapsed) -> list[list[tuple]]:
    """Rows of box keys, the logits' row first; deterministic for a given graph."""
    dag = nx.DiGraph()
    dag.add_nodes_from(b.key for b in collapsed.boxes)
    dag.add_edges_from((link.child, link.parent) for link in collapsed.links)
    depth = {collapsed.root: 0}
    if nx.is_directed_acyclic_graph(dag):
        for k in reversed(list(nx.lexicographical_topological_sort(dag, key=_site_rank))):
            parents = [depth[p] for p in dag.successors(k) if p in depth]
            depth.setdefault(k, 1 + max(parents) if parents else 0)
    else:  # pragma: no cover - treeified graphs point up the layers, so their collapse is a DAG
        depth.update(nx.shortest_path_length(dag.reverse(copy=False), collapsed.root))
    rows: dict[int, list[tuple]] = {}
    for k in dag.nodes:
        rows.setdefault(depth.get(k, 0), []).append(k)
    ordered: list[list[tuple]] = []
    place: dict[tuple, float] = {}
    for d in sorted(rows):
        def where(k):
            above = [place[p] for p in dag.successors(k) if p in place]
            return (sum(above) / len(above) if above else 0.0, _site_rank(k))

        row = sorted(rows[d], key=where)
        for i, k in enumerate(row):
            place[k] = (i + 0.5) / len(row)
        ordered.append(row)
    return ordered


def collapsed_svg(collapsed: Collapsed) -> str:
    """The collapsed graph as an SVG document: one `<rect class="site">` per box."""
    boxes = {b.key: b for b in collapsed.boxes}
    rows, stagger = [], []
    for row in layout(collapsed):
        lines = -(-len(row) // ROW_LIMIT)
        size = -(-len(row) // lines)  # wrapped lines of (nearly) equal length
        for j, i in enumerate(range(0, len(row), size)):
            rows.append(row[i:i + size])
            # wrapped lines shifted by half a box against each other, so links pass between boxes
            stagger.append(0 if lines == 1 else (-1 if j % 2 == 0 else 1))
    chars = max(max(len(b.label), len(b.detail)) for b in collapsed.boxes)
    box_w, box_h, gap_x, gap_y = max(120, int(chars * 6.7) + 14), 38, 24, 90
    width = max(len(r) + abs(stagger[d]) / 2 for d, r in enumerate(rows)) * (box_w + gap_x) + gap_x
    height = len(rows) * (box_h + gap_y) + gap_y + 24
    pos = {}
    for d, row in enumerate(rows):
        row_w = len(row) * (box_w + gap_x) - gap_x
        x0 = (width - row_w) / 2 + stagger[d] * (box_w + gap_x) / 4
        for i, k in enumerate(row):
            pos[k] = (x0 + i * (box_w + gap_x), gap_y / 2 + 24 + d * (box_h + gap_y))
    out = _svg_open(width, height, "collapsed")
    out.append(f'<text x="{gap_x}" y="20">{len(collapsed.boxes)} sites from {collapsed.nodes} treeified '
               'nodes; arrows point from a site to the site that reads it</text>')
    for link in sorted(collapsed.links, key=lambda l: (pos[l.child][1], pos[l.child][0], _channel_name(l.channel))):
        (cx, cy), (px, py) = pos[link.child], pos[link.parent]
        x1, y1, x2, y2 = cx + box_w / 2, cy, px + box_w / 2, py + box_h
        colour = CHANNEL_COLOURS[link.channel]
        out.append(f'<line class="link" x1="{x1:.0f}" y1="{y1:.0f}" x2="{x2:.0f}" y2="{y2:.0f}" '
                   f'stroke="{colour}" stroke-width="{1 + min(link.copies, 8) / 4:.2f}" '
                   f'data-channel="{_channel_name(link.channel)}"/>')
        # the label sits a quarter of the way down from the parent, where arrows into one box fan out
        lx, ly = x2 + (x1 - x2) * 0.25, y2 + (y1 - y2) * 0.25
        out.append(f'<text x="{lx + 3:.0f}" y="{ly:.0f}" fill="{colour}">{escape(link.label)}</text>')
    for k, (x, y) in pos.items():
        box = boxes[k]
        out.append(f'<rect class="site" x="{x:.0f}" y="{y:.0f}" width="{box_w}" height="{box_h}" rx="4" '
                   f'fill="{_fill(k[0], box.leaf)}" stroke="#333"/>')
        out.append(f'<text x="{x + 6:.0f}" y="{y + 15:.0f}">{escape(box.label)}</text>')
        out.append(f'<text x="{x + 6:.0f}" y="{y + 30:.0f}" fill="#555">{escape(box.detail)}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def collapsed_dot(collapsed: Collapsed) -> str:
    """Graphviz text of the collapsed graph: one node per site, edges labelled channel@position."""
    ids = {b.key: i for i, b in enumerate(collapsed.boxes)}
    lines = ["digraph scrub {", "  rankdir=BT;", '  node [shape=box, fontname="monospace"];']
    for b in collapsed.boxes:
        style = ', style="bold"' if b.key[0] == "root" else ""
        lines.append(f"  s{ids[b.key]} [label={json.dumps(b.label + chr(10) + b.detail)}{style}];")
    for link in collapsed.links:
        lines.append(f"  s{ids[link.child]} -> s{ids[link.parent]} [label={json.dumps(link.label)}, "
                     f'color="{CHANNEL_COLOURS[link.channel]}"];')
    lines.append("}")
    return "\n".join(lines) + "\n"
