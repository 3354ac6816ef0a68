"""Circuit diagrams in the style of the IOI paper (Wang et al. 2022, Figure 2).

Takes a circuit (a program's text, a `.circ` path, a parsed `Program`, a resolved
`Hypothesis`, or a `DiscoveryResult`) and, optionally, the `CheckResult` of checking it;
gives a matplotlib `Figure`:

* **Boxes** are sites at positions: a head `9.6` where it acts, an MLP, the embedding,
  the logits. Layers are rows (the embedding at the bottom, the logits at the top);
  positions the circuit names are columns in the prompt's order (the task's list of
  positions; `all` first when some claim holds at every position).
* A head **acts** where its output or its query is claimed: a depends-claim on its
  output, pattern or query at P, an edge from it at P, an edge into its query at P.
  An edge into its key or value at P is drawn from the sender at P to the head where
  it acts (so K-composition crosses columns, as in the paper's figure); a head with no
  such place is drawn at P.
* **Arrows** are the circuit's edges, found once by the edge authority
  (`circuitlang.ir_to_edges` for a program; a `DiscoveryResult`'s own `.edges`, which the
  same engine produced), coloured by the receiver's channel (q, k, v; the stream of an
  MLP or the logits in grey). A depends-claim on a head's key or value at P is a dashed
  arrow from the token row at P ("its values at IO carry the name").
* **Groups** (`group name_movers = heads ...`) fill their heads' boxes with one colour
  each and are named in the legend; a head in several groups takes the first.
* **Costs**: given a `CheckResult` with its per-claim breakdown, each arrow's width is
  the cost of the statement that claims it (how much % recovered drops when that
  statement is removed; the largest when several claim it), and a box claimed by
  depends-claims only gets that cost as its outline width. A negative cost (the
  hypothesis scores higher without the statement) is drawn dotted at the thinnest width.
  For a `DiscoveryResult` without a breakdown, widths are the edges' |attribution score|.

The layout is a pure function of the circuit, so two renders give the same SVG.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

from circuitlang.errors import CircuitlangError
from circuitlang.figures._mpl import FigureError, new_figure
from circuitlang.graph_render import PALETTE
from circuitlang.sites import Channel, Embed, Head, Logits, Mlp, Position

__all__ = ["CHANNEL_COLOURS", "GROUP_COLOURS", "CircuitLayout", "circuit_diagram", "circuit_layout"]

#: Arrow colour by channel: the palette of every circuit drawing (the scrubbing graph's too).
CHANNEL_COLOURS = PALETTE
#: Group fills, in the order the groups are defined (Okabe-Ito lightened, then greys).
GROUP_COLOURS = ("#9ecae1", "#fdae6b", "#a1d99b", "#f6b3d0", "#fee08b", "#c7b5e0", "#b7e4e4",
                 "#e0c9a6", "#d9d9d9", "#bdbdbd")
_NO_GROUP = "#ffffff"
_RAD = {"q": 0.08, "k": -0.08, "v": 0.16, "other": 0.0}


@dataclass(frozen=True)
class Node:
    """A box: `site` (a head with channel `out`, an MLP, the embedding, the logits) at `column`."""

    site: object
    column: Position

    @property
    def label(self) -> str:
        if isinstance(self.site, Head):
            return f"{self.site.layer}.{self.site.head}"
        if isinstance(self.site, Mlp):
            return f"MLP {self.site.layer}"
        return str(self.site)


@dataclass(frozen=True)
class Arrow:
    """An arrow between boxes; `sender` None for a read from the token row at `column`."""

    sender: Node | None
    receiver: Node
    channel: str  # "q", "k", "v" or "other"
    column: Position
    weight: float | None = None  # the cost (or |score|) that sets its width


@dataclass(frozen=True)
class CircuitLayout:
    """What a diagram draws, before any drawing: boxes, arrows, groups, columns.

    Attributes:
        nodes: the boxes, in drawing order.
        arrows: edges (`sender` set) and reads from the token row (`sender` None).
        columns: the positions, left to right.
        rows: row keys bottom to top (see `_row`); `n_layers` the model's layers.
        groups: (name, heads) in definition order.
        outline: box -> the cost of the depends-only statements that claim it.
        weight_kind: what arrow widths mean ("cost", "score") or None (all alike).
        title: the circuit's model and task, and the check's score when given.
    """

    nodes: tuple[Node, ...]
    arrows: tuple[Arrow, ...]
    columns: tuple[Position, ...]
    rows: tuple[tuple, ...]
    groups: tuple
    outline: dict
    weight_kind: str | None
    title: str
    n_layers: int


def circuit_diagram(source, *, check=None, model=None, task=None, title: str | None = None):
    """Draw a circuit as the IOI paper draws its circuit (see the module docstring).

    Args:
        source: circuitlang text, a `.circ` path, a parsed `Program`, a resolved
            `Hypothesis`, or a `DiscoveryResult`.
        check: a `CheckResult` of the same circuit; its per-claim breakdown sets the
            arrows' widths (a `DiscoveryResult`'s own check is used when not given).
        model, task: override the file's `model` and `task` lines (text and paths only;
            the model's shape is enough, no weights load); text that names neither takes
            the check's.
        title: the figure's title (default: model, task and the check's % recovered).

    Returns:
        A matplotlib `Figure`.

    Raises:
        FigureError: matplotlib is missing, the circuit has holes, or it claims nothing.
        CircuitlangError: the text does not parse or resolve.
    """
    layout = circuit_layout(source, check=check, model=model, task=task)
    return _draw(layout, title if title is not None else layout.title)


# --------------------------------------------------------------------------- what to draw


def _resolve(source, model, task, check):
    """(hypothesis, edges or None, discovery result or None) for any accepted source."""
    from circuitlang.ir import Hypothesis

    if hasattr(source, "hypothesis") and hasattr(source, "edges") and hasattr(source, "space"):
        return source.hypothesis, list(source.edges), source
    if isinstance(source, Hypothesis):
        return source, None, None
    if isinstance(source, (str, Path)) or hasattr(source, "statements"):
        from circuitlang.checker import load_hypothesis

        try:
            hypothesis, _ = load_hypothesis(source, model=model, task=task)
        except CircuitlangError as exc:
            # text checked with model= and task= (`circuitlang.check("head 9.6 ...", model=...)`)
            # names neither: the check's result does
            if check is None or exc.diagnostics[0].code not in ("check.no-model", "check.no-task"):
                raise
            hypothesis, _ = load_hypothesis(source, model=model or check.model, task=task or check.task)
        return hypothesis, None, None
    raise FigureError(f"cannot draw a circuit from a {type(source).__name__}",
                      hint="pass circuitlang text, a .circ path, a Program, a Hypothesis or a DiscoveryResult")


def _edges(hypothesis) -> list:
    """The hypothesis's edges, by the one edge authority (`ir_to_edges`)."""
    from circuitlang.ir_to_edges import ir_to_edges

    return ir_to_edges(hypothesis).edges()


def _statement_costs(hypothesis, check) -> tuple[list, dict]:
    """[(statement, cost)] for the statements the check's breakdown measured, and
    edge -> the largest cost of a statement claiming it."""
    from circuitlang import variants

    measured = {(c.text, c.line): c.cost for c in getattr(check, "claims", None) or []}
    if not measured:
        return [], {}
    out, by_edge = [], {}
    for st in variants.statements(hypothesis):
        cost = measured.get((st.text, st.line))
        if cost is None:
            continue
        out.append((st, cost))
        part = dataclasses.replace(hypothesis, claims=tuple(hypothesis.claims[i] for i in st.claims))
        for edge in _edges(part):
            by_edge[edge] = max(by_edge.get(edge, cost), cost)
    return out, by_edge


def _column_order(hypothesis, positions) -> list[Position]:
    """Positions left to right: `all`, then the task's order (offsets beside their base)."""
    try:
        from circuitlang.tasks import get_signature

        names = list(get_signature(hypothesis.task, **dict(hypothesis.task_params)).positions)
    except CircuitlangError:  # a task that cannot be looked up here still draws, in first-seen order
        names = []
    bases: dict[str, int] = {}
    for i, text in enumerate(names):
        bases.setdefault(Position.parse(text).name, i)
    seen = {p: i for i, p in enumerate(dict.fromkeys(positions))}

    def key(p: Position):
        if p.is_all:
            return (-1, 0, 0)
        if p.name in bases:
            return (bases[p.name], p.offset, 0)
        return (len(names) + (1 if p.name == "END" else 0), 0, seen[p])

    return sorted(seen, key=key)


def _row(site, n_layers: int) -> tuple:
    """Sort key of a site's row: the embedding, then each layer, then the logits."""
    if isinstance(site, Embed) or str(site).startswith("embed"):
        return (-1,)
    if isinstance(site, Logits):
        return (n_layers + 1,)
    place = getattr(site, "sae", None) or getattr(site, "basis", None)  # a latent's, a subspace's
    if place is not None:
        return (place.layer,) if place.layer < n_layers else (n_layers + 1,)
    return (getattr(site, "layer", 0),)


def _base(site):
    return Head(site.layer, site.head) if isinstance(site, Head) else site


def circuit_layout(source, *, check=None, model=None, task=None) -> CircuitLayout:
    """What `circuit_diagram` draws, as data (the tests read it beside the SVG)."""
    from circuitlang.ir import DependsClaim

    hypothesis, edges, found = _resolve(source, model, task, check)
    holes = hypothesis.holes()
    if holes:
        raise FigureError("this circuit has holes (" + ", ".join(str(h) for h in holes) + "): a diagram "
                          "draws a complete circuit", code="figure.holes",
                          hint="fill them with `circuitlang discover FILE -o filled.circ`, then draw that")
    if found is not None and check is None:
        check = found.check
    if edges is None:
        edges = _edges(hypothesis)
    depends = [c for c in hypothesis.claims if isinstance(c, DependsClaim)]
    if not edges and not depends:
        raise FigureError("this circuit claims nothing to draw", code="figure.empty",
                          hint="add claims (`head 9.6 moves name to END`, `5.5 -> 8.6.q at END`)")
    statement_costs, cost_of_edge = _statement_costs(hypothesis, check)
    weight_kind = "cost" if statement_costs else None
    if weight_kind is None and found is not None and found.scores is not None:
        scores = found.scores.by_edge()
        cost_of_edge = {e: abs(scores[e]) for e in edges if e in scores}
        weight_kind = "score" if cost_of_edge else None

    # where each head acts: its output, pattern or query claimed there, or an edge from it
    acts: dict[Head, list[Position]] = {}
    for claim in depends:
        if isinstance(claim.site, Head) and claim.site.channel in (Channel.OUT, Channel.PATTERN, Channel.Q):
            acts.setdefault(_base(claim.site), []).append(claim.position)
    for sender, receiver, position in edges:
        if isinstance(sender, Head):
            acts.setdefault(_base(sender), []).append(position)
        if isinstance(receiver, Head) and receiver.channel is Channel.Q:
            acts.setdefault(_base(receiver), []).append(position)
    acts = {h: list(dict.fromkeys(ps)) for h, ps in acts.items()}

    def targets(site, position) -> list[Node]:
        base = _base(site)
        if isinstance(site, Head) and site.channel in (Channel.K, Channel.V) and acts.get(base):
            return [Node(base, p) for p in acts[base]]
        return [Node(base, position)]

    nodes: dict[Node, None] = {}
    arrows: list[Arrow] = []
    for edge in edges:
        sender, receiver, position = edge
        channel = receiver.channel.value if isinstance(receiver, Head) else "other"
        src = Node(_base(sender), position)
        nodes.setdefault(src, None)
        for dst in targets(receiver, position):
            nodes.setdefault(dst, None)
            arrows.append(Arrow(src, dst, channel, position, cost_of_edge.get(edge)))
    claim_cost: dict[int, float] = {}
    for st, cost in statement_costs:
        for i in st.claims:
            claim_cost[i] = cost
    outline: dict[Node, float] = {}
    for i, claim in enumerate(hypothesis.claims):
        if not isinstance(claim, DependsClaim):
            continue
        site = claim.site
        reads = isinstance(site, Head) and site.channel in (Channel.K, Channel.V)
        for node in targets(site, claim.position):
            nodes.setdefault(node, None)
            if reads:
                arrows.append(Arrow(None, node, site.channel.value, claim.position, claim_cost.get(i)))
            elif i in claim_cost:
                outline[node] = max(outline.get(node, claim_cost[i]), claim_cost[i])

    shape = hypothesis.shape
    n_layers = shape.n_layers if shape is not None else 1 + max(
        (getattr(n.site, "layer", 0) for n in nodes), default=0)
    columns = tuple(_column_order(hypothesis, [n.column for n in nodes] + [a.column for a in arrows]))
    rows = tuple(sorted({_row(n.site, n_layers) for n in nodes}))
    order = {p: i for i, p in enumerate(columns)}
    ordered = sorted(nodes, key=lambda n: (_row(n.site, n_layers), order[n.column], isinstance(n.site, Mlp),
                                           getattr(n.site, "head", 0), str(n.site)))
    title = f"{hypothesis.model or 'circuit'} · task {hypothesis.task}"
    if found is not None:
        f = found.faithfulness
        title += (f" · {found.method}, {len(edges)} of {len(found.space)} edges, faithfulness "
                  f"{f.value:.3f} [{f.low:.3f}, {f.high:.3f}]")
    recovered = getattr(getattr(check, "recovered", None), "value", None)
    if recovered is not None and not math.isnan(recovered):
        r = check.recovered
        title += f"\nrecovered {100 * r.value:.1f}% [{100 * r.low:.1f}, {100 * r.high:.1f}]"
    return CircuitLayout(tuple(ordered), tuple(arrows), columns, rows, tuple(hypothesis.groups), outline,
                         weight_kind, title, n_layers)


# --------------------------------------------------------------------------- drawing


def _gid(text: str) -> str:
    """An SVG id from text (letters, digits, '.', '-', '_')."""
    return "".join(ch if ch.isalnum() or ch in ".-_" else "_" for ch in text)


def _draw(layout: CircuitLayout, title: str):
    from matplotlib.lines import Line2D
    from matplotlib.patches import FancyArrowPatch, FancyBboxPatch, Patch

    n_layers = layout.n_layers
    cells: dict[tuple, list] = {}
    for node in layout.nodes:
        cells.setdefault((_row(node.site, n_layers), node.column), []).append(node)
    slots = {c: max([len(v) for (r, col), v in cells.items() if col == c] or [1]) for c in layout.columns}
    col_x, x = {}, 0.0
    for c in layout.columns:
        col_x[c] = x
        x += slots[c] + 0.6
    total_w = max(x - 0.6, 1.0)
    row_y = {r: 1.0 + 1.2 * i for i, r in enumerate(layout.rows)}
    box_w, box_h = 0.8, 0.46
    centre: dict[Node, tuple[float, float]] = {}
    for (r, c), members in cells.items():
        left = col_x[c] + (slots[c] - len(members)) / 2
        for i, node in enumerate(members):
            centre[node] = (left + i + 0.5, row_y[r])

    group_of: dict[Head, int] = {}
    drawn = {n.site for n in layout.nodes}
    groups = [(name, heads) for name, heads in layout.groups if any(_base(h) in drawn for h in heads)]
    for g, (_, heads) in enumerate(groups):
        for h in heads:
            group_of.setdefault(_base(h), g)
    weights = [a.weight for a in layout.arrows if a.weight is not None] + list(layout.outline.values())
    top = max([w for w in weights if w > 0] or [1.0])

    def width(w: float | None, base: float = 1.2, most: float = 4.0) -> float:
        if layout.weight_kind is None or w is None:
            return base
        return 0.6 + (most - 0.6) * max(w, 0.0) / top

    height = 1.0 + 1.2 * len(layout.rows) * 0.75
    fig = new_figure(min(max(4.5, 1.0 + total_w * 0.62) + 2.4, 40.0), min(max(height, 3.0), 24.0))
    ax = fig.add_subplot()
    ax.set_axis_off()
    ax.set_xlim(-0.4, total_w + 0.4)
    ax.set_ylim(-0.2, 1.0 + 1.2 * len(layout.rows) - 0.4)
    ax.set_title(title, fontsize=10)
    for r in layout.rows:
        name = "embed" if r[0] < 0 else ("logits" if r[0] > n_layers else f"layer {r[0]}")
        ax.text(-0.35, row_y[r], name, ha="right", va="center", fontsize=8, color="#555555")
    for c in layout.columns:
        ax.text(col_x[c] + slots[c] / 2, 0.15, "all positions" if c.is_all else str(c), ha="center",
                va="center", fontsize=9, fontweight="bold",
                bbox={"boxstyle": "round,pad=0.25", "fc": "#f2f2f2", "ec": "#999999", "lw": 0.6},
                gid=_gid(f"column-{c}"))

    for k, arrow in enumerate(layout.arrows):
        x2, y2 = centre[arrow.receiver]
        rad = _RAD[arrow.channel]
        if arrow.sender is None:
            x1, y1 = col_x[arrow.column] + slots[arrow.column] / 2, 0.32
            y2 -= box_h / 2
            style, prefix = "--", "read"
        else:
            x1, y1 = centre[arrow.sender]
            style, prefix = "-", "edge"
            if y1 == y2:  # within a layer (a head into its layer's MLP): side to side, arched over
                side = 1 if x2 >= x1 else -1
                x1, x2, rad = x1 + side * box_w / 2, x2 - side * box_w / 2, -0.4 * side
            else:
                y1, y2 = y1 + box_h / 2, y2 - box_h / 2
        dotted = layout.weight_kind == "cost" and arrow.weight is not None and arrow.weight < 0
        patch = FancyArrowPatch(
            (x1, y1), (x2, y2), arrowstyle="-|>", mutation_scale=8,
            connectionstyle=f"arc3,rad={rad}", color=CHANNEL_COLOURS[arrow.channel],
            linewidth=width(arrow.weight), linestyle=":" if dotted else style, shrinkA=0, shrinkB=1,
            zorder=1, gid=f"{prefix}-{arrow.channel}-{k}",
        )
        ax.add_patch(patch)
    for node in layout.nodes:
        cx, cy = centre[node]
        g = group_of.get(node.site) if isinstance(node.site, Head) else None
        fill = GROUP_COLOURS[g % len(GROUP_COLOURS)] if g is not None else _NO_GROUP
        kind = "head" if isinstance(node.site, Head) else "site"
        box = FancyBboxPatch((cx - box_w / 2, cy - box_h / 2), box_w, box_h, boxstyle="round,pad=0.02",
                             fc=fill, ec="#333333", lw=width(layout.outline.get(node), base=0.8, most=2.5), zorder=2,
                             gid=_gid(f"{kind}-{node.label}-{layout.columns.index(node.column)}"))
        ax.add_patch(box)
        ax.text(cx, cy, node.label, ha="center", va="center", fontsize=8, zorder=3)

    handles = [Patch(fc=GROUP_COLOURS[g % len(GROUP_COLOURS)], ec="#333333", label=name)
               for g, (name, _) in enumerate(groups)]
    used = list(dict.fromkeys(a.channel for a in layout.arrows))
    names = {"q": "query (q)", "k": "key (k)", "v": "value (v)", "other": "MLP / logits stream"}
    handles += [Line2D([], [], color=CHANNEL_COLOURS[c], lw=1.6, label=names[c]) for c in ("q", "k", "v", "other")
                if c in used]
    if any(a.sender is None for a in layout.arrows):
        handles.append(Line2D([], [], color="#555555", lw=1.2, ls="--", label="reads at a position"))
    if layout.weight_kind == "cost":
        handles.append(Line2D([], [], color="none", label="width: cost (recovered lost\nwithout the statement)"))
        handles += [Line2D([], [], color="#555555", lw=width(w), label=f"cost {100 * w:.0f}%") for w in (top, top / 2)]
    elif layout.weight_kind == "score":
        handles += [Line2D([], [], color="#555555", lw=width(w), label=f"|score| {w:.3g}") for w in (top, top / 2)]
    if handles:
        fig.legend(handles=handles, loc="outside right upper", fontsize=8, frameon=False)
    return fig
