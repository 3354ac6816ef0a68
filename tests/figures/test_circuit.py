"""Circuit diagrams (circuitlang/figures/circuit.py, `circuitlang draw`) from real programs and
real checks on the embedded toy models, their SVG read for structure, not pixels."""
from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib", reason="figures need matplotlib (pip install 'circuitlang[figures]')")

import circuitlang
from circuitlang.cli import main
from circuitlang.figures import FigureError, circuit_diagram, svg_text
from circuitlang.figures.circuit import CHANNEL_COLOURS, GROUP_COLOURS, circuit_layout
from circuitlang.sites import Head

ROOT = Path(__file__).resolve().parents[2]
TOY_INDUCTION = ROOT / "stdlib" / "toy_induction.circ"
IOI = ROOT / "stdlib" / "ioi.circ"


@pytest.fixture(scope="module")
def induction_check():
    """The checker's result on the toy induction circuit, with its per-statement breakdown."""
    return circuitlang.check(str(TOY_INDUCTION), n=8, permutations=0, max_examples=1)


def ids(svg: str, prefix: str) -> list[str]:
    return re.findall(rf'<g id="({prefix}[^"]*)"', svg)


def texts(svg: str) -> list[str]:
    return re.findall(r"<text[^>]*>([^<]*)</text>", svg)


def group_style(svg: str, gid: str) -> str:
    """The style of the first drawn element inside `<g id=gid>`."""
    start = svg.index(f'<g id="{gid}">')
    return re.search(r'style="([^"]*)"', svg[start:]).group(1)


def stroke_width(style: str) -> float:
    found = re.search(r"stroke-width: ([0-9.]+)", style)
    return float(found.group(1)) if found else 1.0  # SVG leaves out the default width of 1


def test_toy_induction_boxes_labels_and_channel_colours():
    svg = svg_text(circuit_diagram(TOY_INDUCTION))
    # heads where they act: 0.1 and 0.3 at PREV+1 (copies), 0.3 at END (copies END-1), the
    # induction heads at END; their key and value inputs at PREV+1 are arrows into them
    assert sorted(ids(svg, "head-")) == ["head-0.1-0", "head-0.3-0", "head-0.3-1", "head-1.0-1", "head-1.2-1",
                                         "head-1.3-1"]
    assert sorted(ids(svg, "site-")) == ["site-embed-0", "site-embed-1"]
    words = texts(svg)
    for label in ("0.1", "0.3", "1.0", "1.2", "1.3", "embed", "PREV+1", "END", "layer 0", "layer 1",
                  "previous_token", "induction", "query (q)", "key (k)", "value (v)"):
        assert label in words, label
    # one arrow per edge the edge authority lists, in its channel's colour
    edges = ids(svg, "edge-")
    assert {c: sum(e.startswith(f"edge-{c}-") for e in edges) for c in "qkv"} == {"q": 6, "k": 6, "v": 3}
    for gid in edges:
        channel = gid.split("-")[1]
        assert f"stroke: {CHANNEL_COLOURS[channel].lower()}" in group_style(svg, gid)
    # columns in the prompt's order (the task's list of positions)
    assert [str(p) for p in circuit_layout(TOY_INDUCTION).columns] == ["PREV+1", "END"]


def test_every_kind_of_source_draws_the_same_diagram():
    from circuitlang.checker import load_hypothesis
    from circuitlang.text_to_ast import parse

    text = TOY_INDUCTION.read_text()
    hypothesis, _ = load_hypothesis(TOY_INDUCTION)
    drawn = {svg_text(circuit_diagram(source)) for source in
             (TOY_INDUCTION, str(TOY_INDUCTION), text, parse(text), hypothesis)}
    assert len(drawn) == 1


def test_an_edge_within_a_layer_runs_side_to_side():
    text = "model toy-ioi\ntask ioi\nhead 0.1 -> mlp 0 at END\nmlp 0 -> logits at END\n"
    layout = circuit_layout(text)
    assert [(a.sender.label, a.receiver.label, a.channel) for a in layout.arrows] == [
        ("0.1", "MLP 0", "other"), ("MLP 0", "logits", "other")]
    svg = svg_text(circuit_diagram(text))
    assert sorted(ids(svg, "site-")) == ["site-MLP_0-0", "site-logits-0"]
    assert {"layer 0", "logits", "MLP 0", "0.1", "MLP / logits stream"} <= set(texts(svg))
    assert f"stroke: {CHANNEL_COLOURS['other'].lower()}" in group_style(svg, "edge-other-0")
    # from the head's side to the MLP's side, both ends at the row's height
    start = svg.index('<g id="edge-other-0">')
    points = re.findall(r"([0-9.]+) ([0-9.]+)", re.search(r' d="([^"]*)"', svg[start:]).group(1))
    assert float(points[0][1]) == pytest.approx(float(points[-1][1]), abs=3)  # rows are ~90 px apart


def test_ioi_groups_are_coloured_and_named():
    layout = circuit_layout(IOI)  # gpt2's shape only: no weights load
    assert [str(p) for p in layout.columns] == ["IO", "S1+1", "S2", "END"]
    svg = svg_text(circuit_diagram(IOI))
    heads = ids(svg, "head-")
    assert len(heads) == 26  # the paper's 26 heads, each where it acts
    words = texts(svg)
    groups = ("name_movers", "backup_name_movers", "negative_name_movers", "s_inhibition", "induction",
              "duplicate_token", "previous_token")
    for name in groups:
        assert name in words, name
    # a name mover at END is filled with the first group's colour, an S-inhibition head with the fourth's
    end = layout.columns.index(next(p for p in layout.columns if str(p) == "END"))
    assert f"fill: {GROUP_COLOURS[0]}" in group_style(svg, f"head-9.9-{end}")
    assert f"fill: {GROUP_COLOURS[3]}" in group_style(svg, f"head-8.6-{end}")
    # the S-inhibition heads' values read at S2 arrive at END, where they act
    s_inhibition = {n for n in layout.nodes if n.site == Head(8, 6)}
    assert {str(n.column) for n in s_inhibition} == {"END"}
    assert any(a.channel == "v" and a.receiver.site == Head(8, 6) and str(a.column) == "S2" for a in layout.arrows)


def test_costs_set_edge_widths(induction_check):
    result = induction_check
    assert len(result.claims) >= 2, "the toy induction circuit has a per-statement breakdown"
    layout = circuit_layout(TOY_INDUCTION, check=result)
    assert layout.weight_kind == "cost"
    svg = svg_text(circuit_diagram(TOY_INDUCTION, check=result))
    width = {gid: stroke_width(group_style(svg, gid)) for gid in ids(svg, "edge-")}
    drawn = [(a.weight, width[f"edge-{a.channel}-{k}"]) for k, a in enumerate(layout.arrows)]
    assert all(w is not None for w, _ in drawn)
    # wider is costlier: the order of widths is the order of costs
    for wa, xa in drawn:
        for wb, xb in drawn:
            if wa > wb + 1e-9:
                assert xa >= xb
    # each arrow carries the cost of a statement that claims it
    costs = {c.text: c.cost for c in result.claims}
    assert {w for w, _ in drawn} <= set(costs.values())
    for sender, statement in ((Head(0, 3), "previous_token -> induction.k at PREV+1"),
                              (Head(0, 1), "head 0.1 -> induction.k at PREV+1")):
        keys = [a for a in layout.arrows if a.channel == "k" and a.sender.site == sender]
        assert len(keys) == 3 and {a.weight for a in keys} == {costs[statement]}
    costliest = max(result.claims, key=lambda c: c.cost)
    assert f"cost {100 * costliest.cost:.0f}%" in texts(svg)
    r = result.recovered
    assert f"recovered {100 * r.value:.1f}% [{100 * r.low:.1f}, {100 * r.high:.1f}]" in texts(svg)
    # determinism: two renders, the same SVG
    assert svg == svg_text(circuit_diagram(TOY_INDUCTION, check=result))


def test_text_without_model_lines_takes_the_checks(induction_check):
    text = "head 0.3 -> head 1.0.k at PREV+1\nhead 1.0 copies PREV+1 to END\n"
    with pytest.raises(circuitlang.errors.CircuitlangError, match="no model"):
        circuit_diagram(text)
    svg = svg_text(circuit_diagram(text, check=induction_check))
    assert sorted(ids(svg, "head-")) == ["head-0.3-0", "head-1.0-1"]
    assert ids(svg, "edge-") == ["edge-k-0"]


def test_a_discovered_circuit_is_drawn_from_its_edges():
    found = circuitlang.discover(model="toy-induction", task="induction", method="eap", n=8, edges=8, check=False)
    layout = circuit_layout(found)
    assert layout.weight_kind == "score"  # no breakdown: widths are the edges' |attribution score|
    assert {str(p) for p in layout.columns} == {"all"}
    svg = svg_text(circuit_diagram(found))
    heads = {(s.layer, s.head) for e in found.edges for s in e[:2] if isinstance(s, Head)}
    assert len(ids(svg, "head-")) == len(heads)
    assert len(ids(svg, "edge-")) == len(found.edges)
    assert "all positions" in texts(svg)
    assert svg == svg_text(circuit_diagram(found))


def test_bad_sources_are_refused(tmp_path):
    holes = tmp_path / "holes.circ"
    holes.write_text("model toy-induction\ntask induction\nhead ?h copies PREV to PREV+1\n")
    with pytest.raises(FigureError, match="holes"):
        circuit_diagram(holes)
    with pytest.raises(FigureError, match="claims nothing"):
        circuit_diagram("model toy-ioi\ntask ioi\nexpect recovered >= 0.5\n")
    with pytest.raises(FigureError, match="cannot draw a circuit from a int"):
        circuit_diagram(3)


def test_draw_command_writes_each_format(tmp_path, capsys):
    for suffix, magic in (("svg", b"<?xml"), ("png", b"\x89PNG"), ("pdf", b"%PDF")):
        out = tmp_path / f"c.{suffix}"
        assert main(["draw", str(TOY_INDUCTION), "-o", str(out)]) == 0
        assert out.read_bytes().startswith(magic)
    assert len(ids((tmp_path / "c.svg").read_text(), "head-")) == 6


def test_draw_check_draws_the_costs(tmp_path, capsys):
    out = tmp_path / "c.svg"
    assert main(["draw", str(TOY_INDUCTION), "--check", "-n", "8", "--max-examples", "1", "-o", str(out)]) == 0
    assert "recovered" in capsys.readouterr().out  # the check's report, as `check` prints it
    words = texts(out.read_text())
    assert any(w.startswith("cost ") and w.endswith("%") for w in words)


def test_draw_command_errors_exit_2(tmp_path, capsys, monkeypatch):
    assert main(["draw", str(TOY_INDUCTION), "-o", str(tmp_path / "c.gif")]) == 2
    assert "name the output .svg, .png or .pdf" in capsys.readouterr().err
    holes = tmp_path / "holes.circ"
    holes.write_text("model toy-induction\ntask induction\nhead ?h copies PREV to PREV+1\n")
    assert main(["draw", str(holes), "-o", str(tmp_path / "c.svg")]) == 2
    assert "holes" in capsys.readouterr().err
    assert main(["draw", str(TOY_INDUCTION), "-n", "8", "-o", str(tmp_path / "c.svg")]) == 2
    assert "add --check" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    assert main(["draw", str(TOY_INDUCTION), "-o", str(tmp_path / "c.svg")]) == 2
    assert "pip install 'circuitlang[figures]'" in capsys.readouterr().err
    assert not (tmp_path / "c.svg").exists()


def test_neurons_latents_and_subspaces_are_drawn_in_their_layers(tmp_path):
    """Edges from units and into a latent are drawn (the diagram's edge set adds the units
    the hypothesis's edges name); a latent sits in its dictionary's layer, a final-stream
    one beside the logits."""
    import json

    import torch
    from safetensors.torch import save_file

    folder = tmp_path / "res2"
    folder.mkdir()
    save_file({"W_enc": torch.zeros(64, 8), "b_enc": torch.zeros(8), "W_dec": torch.zeros(8, 64),
               "b_dec": torch.zeros(64)}, str(folder / "sae_weights.safetensors"))
    (folder / "cfg.json").write_text(json.dumps({"d_in": 64, "d_sae": 8}))
    (tmp_path / "h.circ").write_text('model toy-ioi\ntask ioi\nsae s = "res2" at resid 2\n'
                                     "neuron 0.5 -> head 1.0.q at END\nhead 1.0 -> feature s.3 at END\n"
                                     "feature s.3 -> logits at END\n")
    layout = circuit_layout(tmp_path / "h.circ")
    assert [(a.sender.label, a.receiver.label, a.channel) for a in layout.arrows] == [
        ("neuron 0.5", "1.0", "q"), ("1.0", "feature s.3", "other"), ("feature s.3", "logits", "other")]
    rows = {n.label: layout.rows.index(_row_of(layout, n)) for n in layout.nodes}
    assert rows["neuron 0.5"] < rows["1.0"] < rows["feature s.3"] < rows["logits"]


def _row_of(layout, node):
    from circuitlang.figures.circuit import _row

    return _row(node.site, layout.n_layers)
