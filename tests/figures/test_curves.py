"""Faithfulness curves (circuitlang/figures/curves.py, `circuitlang draw --curve`) from real
discovery runs on the embedded toy induction model, their SVG read for structure."""
from __future__ import annotations

import json
import re

import pytest

pytest.importorskip("matplotlib", reason="figures need matplotlib (pip install 'circuitlang[figures]')")

import circuitlang
from circuitlang.cli import main
from circuitlang.discover.faithfulness import Curve
from circuitlang.figures import FigureError, faithfulness_curves, svg_text
from circuitlang.figures.curves import CURVE_COLOURS, load_curves


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two methods on one problem (toy-induction, 8 prompts), one of them in a run directory."""
    out = tmp_path_factory.mktemp("run")
    eap = circuitlang.discover(model="toy-induction", task="induction", method="eap", n=8, edges=8,
                               check=False, out=out)
    ig = circuitlang.discover(model="toy-induction", task="induction", method="eap-ig", n=8, edges=8,
                              steps=2, check=False)
    return eap, ig, out


def texts(svg: str) -> list[str]:
    return re.findall(r"<text[^>]*>([^<]*)</text>", svg)


def legend(curve: Curve, name: str) -> str:
    return (f"{name}: CPR {curve.cpr:.3f} [{curve.cpr_interval[0]:.3f}, {curve.cpr_interval[1]:.3f}], "
            f"CMD {curve.cmd:.3f} [{curve.cmd_interval[0]:.3f}, {curve.cmd_interval[1]:.3f}]")


def test_two_methods_on_one_plot(runs):
    eap, ig, _ = runs
    svg = svg_text(faithfulness_curves([eap, ig]))
    words = texts(svg)
    assert legend(eap.curve, "eap") in words and legend(ig.curve, "eap-ig") in words
    for i in (0, 1):
        start = svg.index(f'<g id="curve-{i}">')
        assert f"stroke: {CURVE_COLOURS[i].lower()}" in svg[start:start + 2000]
        assert f'<g id="band-{i}">' in svg  # its bootstrap band
    assert '<g id="curve-2">' not in svg
    # log x in percent of the candidates, the edge count on top
    assert {"1%", "10%", "100%"} <= set(words)
    assert f"edges kept (of {len(eap.space)})" in words
    assert "faithfulness f(k)" in words
    assert svg == svg_text(faithfulness_curves([eap, ig]))  # deterministic


def test_bands_are_the_curves_intervals(runs):
    eap, _, _ = runs
    c = eap.curve
    assert len(c.low) == len(c.high) == len(c.faithfulness) == len(c.fractions)
    assert all(lo <= f + 1e-9 and f <= hi + 1e-9 for lo, f, hi in zip(c.low, c.faithfulness, c.high))
    fig = faithfulness_curves(c)
    band = fig.axes[0].collections[0]
    ys = band.get_paths()[0].vertices[:, 1]
    assert min(ys) == pytest.approx(min(c.low)) and max(ys) == pytest.approx(max(c.high))


def test_json_dict_and_labels(runs, tmp_path):
    eap, ig, out = runs
    path = tmp_path / "ig.json"
    path.write_text(json.dumps(ig.to_json()))
    assert Curve.from_json(eap.curve.to_json()) == eap.curve
    loaded = load_curves(path)
    assert list(loaded) == ["eap-ig"]
    assert list(load_curves(out)) == ["eap"]  # a run directory: its result.json
    assert list(load_curves(out / "run.json")) == ["eap"]
    from_objects = svg_text(faithfulness_curves({"A": eap.curve, "B": ig}))
    from_json = svg_text(faithfulness_curves([load_curves(out)["eap"], loaded["eap-ig"]], labels=["A", "B"]))
    assert from_objects == from_json
    assert legend(eap.curve, "A") in texts(from_objects)


def test_bad_input_is_refused(runs, tmp_path):
    eap = runs[0]
    with pytest.raises(FigureError, match="2 labels for 1 curves"):
        faithfulness_curves([eap], labels=["a", "b"])
    with pytest.raises(FigureError, match="no curves"):
        faithfulness_curves([])
    with pytest.raises(FigureError, match="cannot draw a faithfulness curve from a str"):
        faithfulness_curves("eap")
    no_curve = circuitlang.discover(model="toy-induction", task="induction", method="eap", n=8, edges=4,
                                    check=False, with_curve=False)
    with pytest.raises(FigureError, match="no faithfulness curve"):
        faithfulness_curves(no_curve)
    empty = tmp_path / "x.json"
    empty.write_text(json.dumps({"method": "acdc", "curve": None}))
    with pytest.raises(FigureError, match="holds no faithfulness curve"):
        load_curves(empty)


def test_draw_curves_command(runs, tmp_path, capsys):
    eap, ig, out = runs
    ig_json = tmp_path / "ig.json"
    ig_json.write_text(json.dumps(ig.to_json()))
    fig = tmp_path / "f.svg"
    assert main(["draw", "--curve", str(out), "--curve", str(ig_json), "-o", str(fig)]) == 0
    svg = fig.read_text()
    assert legend(eap.curve, "eap") in texts(svg) and legend(ig.curve, "eap-ig") in texts(svg)
    assert main(["draw", "--curve", str(out), "--label", "mine", "-o", str(tmp_path / "g.png")]) == 0
    assert (tmp_path / "g.png").read_bytes().startswith(b"\x89PNG")
    assert main(["draw", "--curve", str(out), "--label", "a", "--label", "b", "-o", str(fig)]) == 2
    assert "one --label per curve" in capsys.readouterr().err
    assert main(["draw", "stdlib/toy_induction.circ", "--curve", str(out), "-o", str(fig)]) == 2
    assert "one figure at a time" in capsys.readouterr().err
    assert main(["draw", "--curve", str(tmp_path / "missing.json"), "-o", str(fig)]) == 2
    assert "no such file" in capsys.readouterr().err
