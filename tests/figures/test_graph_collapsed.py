"""The scrubbing graph's collapsed view (circuitlang/graph_render.py, `circuitlang graph
--view`): one box per site, links with their treeified counts. Hand-written SVG, no
matplotlib needed."""
from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest

from circuitlang.checker import load_hypothesis
from circuitlang.cli import main
from circuitlang.graph_render import (
    CHANNEL_COLOURS,
    TREE_LIMIT,
    GraphRenderError,
    chosen_view,
    collapse,
    render,
)
from circuitlang.ir_to_graph import ir_to_graph

ROOT = Path(__file__).resolve().parents[2]
IOI = ROOT / "stdlib" / "ioi.circ"
TOY_IOI = ROOT / "stdlib" / "toy_ioi.circ"


@pytest.fixture(scope="module")
def ioi_graph():
    hypothesis, _ = load_hypothesis(IOI)  # gpt2's shape only: no weights load
    return ir_to_graph(hypothesis)


def width(svg: str) -> int:
    return int(re.match(r'<svg [^>]*width="(\d+)"', svg).group(1))


def test_ioi_collapsed_has_one_box_per_site(ioi_graph):
    g = ioi_graph
    sites = Counter((g.node(n).role, g.node(n).site, g.node(n).position) for n in g.graph.nodes)
    assert g.graph.number_of_nodes() > TREE_LIMIT and chosen_view(g) == "collapsed"
    svg = render(g, "svg")  # the default view for a graph this large
    assert 'data-view="collapsed"' in svg
    assert svg.count('<rect class="site"') == len(sites) == 61
    assert width(svg) < 4000  # the tree of the same graph is over 100,000 px wide
    assert width(render(g, "svg", view="tree")) > 100_000
    labels = re.findall(r"<text[^>]*>([^<]*)</text>", svg)
    for role, site, position in sites:
        label = "logits" if role == "root" else f"{site} at {position}"
        assert label in labels, label
    # the box of a site copied by treeification says how many copies it stands for
    many = max(sites.items(), key=lambda item: item[1])
    assert many[1] > 1
    assert f"{1132} treeified" in svg and any(t.endswith(f"x{many[1]}") for t in labels)
    assert svg == render(g, "svg")  # deterministic


def test_collapsed_links_count_the_treeified_edges(ioi_graph):
    g = ioi_graph
    c = collapse(g)
    assert sum(b.copies for b in c.boxes) == g.graph.number_of_nodes()
    assert sum(link.copies for link in c.links) == g.graph.number_of_edges()
    svg = render(g, "svg", view="collapsed")
    lines = re.findall(r'<line class="link"[^>]*stroke="([^"]+)"[^>]*data-channel="([^"]+)"', svg)
    assert len(lines) == len(c.links)
    names = {None: "resid"} | {ch: ch.value for ch in CHANNEL_COLOURS if ch is not None}
    colour = {names[ch]: col for ch, col in CHANNEL_COLOURS.items()}
    assert {"q", "v", "pattern"} <= {ch for _, ch in lines}
    assert all(stroke == colour[ch] for stroke, ch in lines)
    # a link's label is channel@position, with its count when it merges several
    labels = re.findall(r"<text[^>]*>([^<]*)</text>", svg)
    merged = next(link for link in c.links if link.copies > 1)
    assert merged.label in labels and merged.label.endswith(f" x{merged.copies}")
    assert re.search(r"^q@END( x\d+)?$", "\n".join(labels), re.MULTILINE)


def test_small_graphs_stay_treeified_and_views_are_chosen(tmp_path):
    hypothesis, _ = load_hypothesis(TOY_IOI)
    g = ir_to_graph(hypothesis)
    assert chosen_view(g) == "tree" and 'data-view="tree"' in render(g, "svg")
    collapsed = render(g, "svg", view="collapsed")
    assert collapsed.count('<rect class="site"') == len(collapse(g).boxes)
    dot = render(g, "dot", view="collapsed")
    assert dot.count("[label=") == len(collapse(g).boxes) + len(collapse(g).links)
    with pytest.raises(GraphRenderError, match="unknown graph view"):
        render(g, "svg", view="sideways")


def test_graph_command_views(tmp_path, capsys):
    out = tmp_path / "g.svg"
    assert main(["graph", str(IOI), "-o", str(out)]) == 0
    assert 'data-view="collapsed"' in out.read_text()
    assert main(["graph", str(TOY_IOI), "-o", str(out)]) == 0
    assert 'data-view="tree"' in out.read_text()
    assert main(["graph", str(TOY_IOI), "--view", "collapsed", "-o", str(out)]) == 0
    assert 'data-view="collapsed"' in out.read_text()
    with pytest.raises(SystemExit) as exc:
        main(["graph", str(TOY_IOI), "--view", "sideways", "-o", str(out)])
    assert exc.value.code == 2
