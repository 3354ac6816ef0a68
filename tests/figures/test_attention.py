"""Attention-pattern figures on the toy IOI model: one panel per head, tokens on both axes."""
from __future__ import annotations

import xml.etree.ElementTree as ET

import numpy as np
import pytest

pytest.importorskip("matplotlib", reason="figures need matplotlib (the [figures] extra)")

from circuitlang import lens  # noqa: E402
from circuitlang.errors import ExecutionError  # noqa: E402
from circuitlang.figures import FigureError, attention_pattern, svg_text  # noqa: E402
from circuitlang.figures.attention import token_labels  # noqa: E402
from circuitlang.models import LoadedModel, load_model  # noqa: E402
from circuitlang.sites import Head  # noqa: E402
from circuitlang.tasks import load_task  # noqa: E402

SVG = "{http://www.w3.org/2000/svg}"


def by_id(root, gid: str):
    found = [e for e in root.iter() if e.get("id") == gid]
    assert len(found) == 1, f"expected one element with id {gid!r}, found {len(found)}"
    return found[0]


def cell_fills(root, gid: str) -> list[str]:
    paths = by_id(root, gid).findall(f"{SVG}path")
    return [dict(part.split(": ") for part in p.get("style").split("; "))["fill"] for p in paths]


def tick_labels(root, axes: int, axis: str) -> list[str]:
    group = by_id(root, f"axes_{axes}")
    return ["".join(t for text in tick.iter(f"{SVG}text") for t in text.itertext())
            for tick in group.iter(f"{SVG}g") if tick.get("id", "").startswith(f"{axis}tick_")]


@pytest.fixture(scope="module")
def ioi():
    lm = load_model("toy-ioi", device="cpu")
    task = load_task("ioi", tokenizer=lm.tokenizer)
    return lm, task.prompts(2, 0)


def test_one_panel_per_head_with_the_prompts_tokens(ioi):
    from matplotlib.colors import to_hex

    lm, prompts = ioi
    fig = attention_pattern(lm, (prompts, 0), ["1.1", Head(0, 3)])
    svg = svg_text(fig)
    root = ET.fromstring(svg)
    n = int(prompts.attention_mask[0].sum())
    ids = prompts.input_ids[0, :n]
    words = [lm.tokenizer.decode([int(t)]) for t in ids]
    patterns = lens.attention_patterns(lm, ids, [Head(1, 1), Head(0, 3)])
    for axes, (head, gid) in enumerate([(Head(1, 1), "pattern-1.1"), (Head(0, 3), "pattern-0.3")], start=1):
        pattern = patterns[head][0]
        [mesh] = [c for c in fig.axes[axes - 1].collections if c.get_gid() == gid]
        assert mesh.norm.vmin == 0 and mesh.norm.vmax == 1
        expected = [to_hex(mesh.cmap(mesh.norm(v))) for v in pattern.ravel()]
        assert cell_fills(root, gid) == expected  # n x n cells, query-major
        assert len(expected) == n * n
        assert tick_labels(root, axes, "x") == words  # keys
        assert tick_labels(root, axes, "y") == words  # queries
    titles = ["".join(t.itertext()) for t in root.iter(f"{SVG}text")]
    assert "head 1.1" in titles and "head 0.3" in titles
    # the name mover at 1.1 reads the indirect object from the last token
    io = int(prompts.positions["IO"][0])
    assert int(np.argmax(patterns[Head(1, 1)][0, n - 1])) == io
    assert svg_text(attention_pattern(lm, (prompts, 0), ["1.1", Head(0, 3)])) == svg  # deterministic


def test_a_text_prompt_and_one_head(ioi):
    lm, _ = ioi
    text = "When Mary and John went to the store, John gave a drink to"
    fig = attention_pattern(lm, text, "1.2")
    root = ET.fromstring(svg_text(fig))
    words = text.replace(",", " ,").split()
    assert tick_labels(root, 1, "x") == words
    assert len(cell_fills(root, "pattern-1.2")) == len(words) ** 2
    assert len([a for a in fig.axes if a.collections and a.collections[0].get_gid()]) == 1


def test_bad_heads_and_prompts_are_refused(ioi):
    lm, prompts = ioi
    with pytest.raises(ExecutionError, match="layer 3 out of range"):
        attention_pattern(lm, (prompts, 0), ["3.0"])
    with pytest.raises(ExecutionError, match="no heads"):
        attention_pattern(lm, (prompts, 0), [])
    with pytest.raises(FigureError, match="outside the model's vocabulary"):
        attention_pattern(lm, [1, 2, 999], ["0.0"])
    with pytest.raises(FigureError, match="prompt index 5 out of range"):
        attention_pattern(lm, (prompts, 5), ["0.0"])
    bare = LoadedModel.from_hf(lm.hf_model, None, name="no-tokenizer")
    with pytest.raises(FigureError, match="has no tokenizer"):
        attention_pattern(bare, "Mary and John", ["0.0"])
    assert token_labels(bare, [5, 7]) == ["5", "7"]  # ids stand in for tokens


def test_without_matplotlib_the_figure_says_how_to_get_it(ioi, monkeypatch):
    import sys

    lm, prompts = ioi
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(FigureError, match="matplotlib") as info:
        attention_pattern(lm, (prompts, 0), (1, 1))
    assert "circuitlang[figures]" in info.value.hint
