"""Heatmaps from real runs on the toy IOI model: sweeps, direct logit attribution, the lens.

Each figure's SVG is read for its structure: the cells (one path each, coloured by
value on a map centred at 0), the tick labels, the caption with the clean/corrupt
values; and drawing twice gives the same file.
"""
from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import numpy as np
import pytest

pytest.importorskip("matplotlib", reason="figures need matplotlib (the [figures] extra)")

import circuitlang  # noqa: E402
from circuitlang import lens  # noqa: E402
from circuitlang.figures import FigureError, dla_grid, logit_lens, svg_text, sweep_heatmap  # noqa: E402
from circuitlang.models import load_model  # noqa: E402
from circuitlang.tasks import load_task  # noqa: E402

SVG = "{http://www.w3.org/2000/svg}"
PROGRAM = ("model toy-ioi\ntask ioi\nmetric logit_diff\n"
           "patch head * at END\n"
           "patch resid * at S1\npatch resid * at S2\npatch resid * at END\n"
           "ablate head 1.1 with mean at END\n"
           "patch mlp * at END\npatch head 1.* at END\npatch head * -> logits at END\n")


# ---- reading an SVG ------------------------------------------------------------------------
def by_id(root, gid: str):
    found = [e for e in root.iter() if e.get("id") == gid]
    assert len(found) == 1, f"expected one element with id {gid!r}, found {len(found)}"
    return found[0]


def cell_fills(root, gid: str = "cells") -> list[str]:
    """The fill colour of each cell of a map, in row-major order ("none" for NaN)."""
    paths = by_id(root, gid).findall(f"{SVG}path")
    return [dict(part.split(": ") for part in p.get("style").split("; "))["fill"] for p in paths]


def tick_labels(root, axes: int, axis: str) -> list[str]:
    """The tick labels of an axes' x or y axis, in order."""
    group = by_id(root, f"axes_{axes}")
    labels = []
    for tick in group.iter(f"{SVG}g"):
        if tick.get("id", "").startswith(f"{axis}tick_"):
            labels.append("".join(t for text in tick.iter(f"{SVG}text") for t in text.itertext()))
    return labels


def text_of(root, gid: str) -> str:
    return " ".join("".join(t.itertext()) for t in by_id(root, gid).iter(f"{SVG}text"))


def all_text(root) -> list[str]:
    return ["".join(t.itertext()) for t in root.iter(f"{SVG}text")]


def expected_fills(mesh, values: np.ndarray) -> list[str]:
    from matplotlib.colors import to_hex

    return ["none" if not np.isfinite(v) else to_hex(mesh.cmap(mesh.norm(v))) for v in values.ravel()]


def the_mesh(fig, gid: str = "cells"):
    [mesh] = [c for ax in fig.axes for c in ax.collections if c.get_gid() == gid]
    return mesh


def assert_centred_at_zero(mesh) -> None:
    assert mesh.norm(0.0) == pytest.approx(0.5)  # 0 is the colour map's midpoint
    assert mesh.norm.vmin == pytest.approx(-mesh.norm.vmax)
    assert mesh.cmap.name.startswith("RdBu_r")


# ---- fixtures: one real run ----------------------------------------------------------------
@pytest.fixture(scope="module")
def ioi():
    lm = load_model("toy-ioi", device="cpu")
    task = load_task("ioi", tokenizer=lm.tokenizer)
    return lm, task, task.prompts(6, 0)


@pytest.fixture(scope="module")
def results(ioi):
    lm, task, _ = ioi
    return circuitlang.run(PROGRAM, model=lm, task=task, n=6)


# ---- patching sweeps ---------------------------------------------------------------------
@pytest.mark.parametrize("normalized", [False, True])
def test_head_sweep_heatmap(results, normalized):
    sweep = results[0]
    assert sweep.grid == (3, 4)
    fig = sweep_heatmap(sweep, normalized=normalized)
    svg = svg_text(fig)
    root = ET.fromstring(svg)
    shown = sweep.normalized if normalized else sweep.values
    mesh = the_mesh(fig)
    assert_centred_at_zero(mesh)
    assert mesh.norm.vmax == pytest.approx(np.nanmax(np.abs(shown)))
    assert cell_fills(root) == expected_fills(mesh, shown)  # 12 cells, each its value's colour
    assert tick_labels(root, 1, "y") == ["L0", "L1", "L2"]
    assert tick_labels(root, 1, "x") == ["H0", "H1", "H2", "H3"]
    caption = text_of(root, "caption")
    assert f"clean {sweep.clean:.4g}" in caption and f"corrupt {sweep.corrupt:.4g}" in caption
    assert "logit_diff" in caption
    texts = all_text(root)
    assert "patch head * at END" in texts
    assert f"{shown[1, 1]:.2f}" in texts  # cells carry their values
    assert ("normalized (1 = the whole gap)" in texts) == normalized
    assert svg_text(sweep_heatmap(sweep, normalized=normalized)) == svg  # deterministic


def test_layer_by_position_heatmap(results):
    by_position = results[1:4]
    fig = sweep_heatmap(by_position, normalized=True)
    root = ET.fromstring(svg_text(fig))
    values = np.stack([r.normalized for r in by_position], axis=1)
    assert values.shape == (4, 3)
    mesh = the_mesh(fig)
    assert_centred_at_zero(mesh)
    assert cell_fills(root) == expected_fills(mesh, values)
    assert tick_labels(root, 1, "x") == ["S1", "S2", "END"]
    assert tick_labels(root, 1, "y") == ["resid 0", "resid 1", "resid 2", "resid 3"]
    assert "patch resid * at each position" in all_text(root)
    # resid 3 at END carries the whole effect; at S1 almost none
    assert values[3, 2] == pytest.approx(1.0, abs=1e-4) and abs(values[3, 0]) < 0.05


def test_one_axis_sweeps_and_saved_results(results):
    """`mlp *` and `head 1.*` are one column; a result read back from its JSON draws the same."""
    from circuitlang.experiments import ExperimentResult

    mlps, one_layer, paths = results[5], results[6], results[7]
    root = ET.fromstring(svg_text(sweep_heatmap(mlps)))
    assert tick_labels(root, 1, "y") == ["L0", "L1", "L2"] and tick_labels(root, 1, "x") == ["END"]
    assert len(cell_fills(root)) == 3
    root = ET.fromstring(svg_text(sweep_heatmap(one_layer)))
    assert tick_labels(root, 1, "y") == ["H0", "H1", "H2", "H3"]
    assert "head (layer 1)" in all_text(root)
    root = ET.fromstring(svg_text(sweep_heatmap(paths)))  # sites are text: "head 0.1 -> logits"
    assert tick_labels(root, 1, "y") == ["L0", "L1", "L2"]
    assert tick_labels(root, 1, "x") == ["H0", "H1", "H2", "H3"]
    for result in (results[0], mlps, paths):
        back = ExperimentResult.from_json(json.loads(json.dumps(result.to_json())))
        assert svg_text(sweep_heatmap(back)) == svg_text(sweep_heatmap(result))


def test_without_matplotlib_each_figure_says_how_to_get_it(results, ioi, monkeypatch):
    import sys

    lm, task, prompts = ioi
    effects = lens.direct_logit_attribution(lm, task, prompts.subset([0]))
    lensed = lens.logit_lens(lm, task, prompts.subset([0]))
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    for draw in (lambda: sweep_heatmap(results[0]), lambda: dla_grid(effects), lambda: logit_lens(lensed)):
        with pytest.raises(FigureError, match="matplotlib") as info:
            draw()
        assert "circuitlang[figures]" in info.value.hint


def test_what_is_not_a_sweep_is_refused(results):
    with pytest.raises(FigureError, match="is not a sweep") as info:
        sweep_heatmap(results[4])  # an ablation: one number
    assert "patch head * at END" in info.value.hint
    with pytest.raises(FigureError, match="one axis of the same length"):
        sweep_heatmap([results[0], results[1]])
    with pytest.raises(FigureError, match="no sweep"):
        sweep_heatmap([])


# ---- direct logit attribution --------------------------------------------------------------
def test_dla_grid(ioi):
    lm, task, prompts = ioi
    effects = lens.direct_logit_attribution(lm, task, prompts, "logit_diff")
    fig = dla_grid(effects)
    svg = svg_text(fig)
    root = ET.fromstring(svg)
    grid = np.concatenate([effects.head_grid, effects.mlp_column[:, None]], axis=1)
    mesh = the_mesh(fig)
    assert_centred_at_zero(mesh)
    assert cell_fills(root) == expected_fills(mesh, grid)  # 3 x (4 heads + MLP)
    assert tick_labels(root, 1, "x") == ["H0", "H1", "H2", "H3", "MLP"]
    assert tick_labels(root, 1, "y") == ["L0", "L1", "L2"]
    caption = text_of(root, "caption")
    assert f"total {effects.linearized.mean():.4g}" in caption
    assert f"metric {effects.metric_values.mean():.4g}" in caption
    assert f"embed {effects.embed.mean():.3g}" in caption
    assert svg_text(dla_grid(effects)) == svg
    one = dla_grid(effects, prompt=2)
    assert cell_fills(ET.fromstring(svg_text(one))) == expected_fills(
        the_mesh(one), np.concatenate([effects.heads[2], effects.mlps[2][:, None]], axis=1))
    with pytest.raises(FigureError, match="prompt 6 is out of range"):
        dla_grid(effects, prompt=6)


# ---- the logit lens ------------------------------------------------------------------------
def test_logit_lens_line(ioi):
    lm, task, prompts = ioi
    lensed = lens.logit_lens(lm, task, prompts, "logit_diff")
    fig = logit_lens(lensed)
    svg = svg_text(fig)
    root = ET.fromstring(svg)
    [line] = [l for l in fig.axes[0].lines if l.get_gid() == "lens"]
    np.testing.assert_allclose(line.get_ydata(), lensed.values[:, 0])
    assert len(by_id(root, "lens").findall(f".//{SVG}path")) >= 1
    assert tick_labels(root, 1, "x") == ["embed", "L0", "L1", "L2"]
    assert f"model's own logit_diff: {lensed.clean.mean():.4g}" in text_of(root, "caption")
    assert svg_text(logit_lens(lensed)) == svg


def test_logit_lens_by_position(ioi):
    lm, task, prompts = ioi
    lensed = lens.logit_lens(lm, task, prompts, "logit_diff", positions=["IO", "S1", "S2", "END"])
    fig = logit_lens(lensed)
    root = ET.fromstring(svg_text(fig))
    mesh = the_mesh(fig)
    assert_centred_at_zero(mesh)
    assert cell_fills(root) == expected_fills(mesh, lensed.values)  # 4 streams x 4 positions
    assert tick_labels(root, 1, "x") == ["IO", "S1", "S2", "END"]
    assert tick_labels(root, 1, "y") == ["embed", "L0", "L1", "L2"]
