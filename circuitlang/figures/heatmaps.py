"""Heatmaps: patching sweeps, direct logit attribution per head, the logit lens.

Takes results: a sweep's `ExperimentResult` (`circuitlang.experiments`; several of them
at different positions make a layer x position map), `DirectEffects` and `LogitLens`
(`circuitlang.lens`); gives matplotlib `Figure`s. Signed maps use one diverging colour
map with limits symmetric about 0, so 0 is always its white midpoint and equal
magnitudes get equal strength of colour. Layer 0 is the top row, as in the IOI paper and
TransformerLens. Cells carry their values as text when the grid is small enough to read.

In the SVG (what tests inspect) each map's cells are one group per map, `cells` (and
`cells-1`, ... for further panels), one path per cell in row-major order; the caption
is the group `caption`.
"""
from __future__ import annotations

import re
from typing import Sequence

import numpy as np

from circuitlang.figures._mpl import FigureError, new_figure

#: The diverging map of every signed figure (blue negative, white 0, red positive).
DIVERGING = "RdBu_r"
#: Grids with at most this many cells get their values written in.
ANNOTATE_MAX = 160


# ---- shared drawing ------------------------------------------------------------------------
def symmetric_norm(values: np.ndarray):
    """A `Normalize` from -m to m, m the largest finite magnitude (1 when there is none)."""
    from matplotlib.colors import Normalize

    finite = np.abs(values[np.isfinite(values)])
    m = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
    return Normalize(vmin=-m, vmax=m)


def draw_grid(fig, ax, values: np.ndarray, rows: Sequence[str], cols: Sequence[str], *,
              label: str, gid: str = "cells", annotate: bool | None = None, norm=None,
              cmap: str = DIVERGING, fmt: str = "{:.2f}", colorbar: bool = True):
    """One heatmap of `values` [R, C] on `ax`: row 0 on top, ticks named, a colour bar.

    Returns the `QuadMesh` (its `.norm` says where each value falls on the colour map).
    `colorbar=False` leaves the bar out (panels that share one).
    """
    import matplotlib

    values = np.asarray(values, dtype=float)
    n_rows, n_cols = values.shape
    norm = symmetric_norm(values) if norm is None else norm
    colours = matplotlib.colormaps[cmap].with_extremes(bad="#e6e6e6")
    mesh = ax.pcolormesh(np.ma.masked_invalid(values), cmap=colours, norm=norm,
                         edgecolors="white", linewidth=0.5)
    mesh.set_gid(gid)
    ax.set_xlim(0, n_cols)
    ax.set_ylim(n_rows, 0)  # row 0 on top
    ax.set_xticks(np.arange(n_cols) + 0.5, list(cols))
    ax.set_yticks(np.arange(n_rows) + 0.5, list(rows))
    ax.tick_params(length=0)
    for side in ax.spines.values():
        side.set_visible(False)
    if annotate is None:
        annotate = values.size <= ANNOTATE_MAX
    if annotate:
        for r in range(n_rows):
            for c in range(n_cols):
                v = values[r, c]
                dark = np.isfinite(v) and _luminance(colours(norm(v))) < 0.5
                ax.text(c + 0.5, r + 0.5, "-" if not np.isfinite(v) else fmt.format(v),
                        ha="center", va="center", fontsize=7,
                        color="white" if dark else "#222222")
    if colorbar:
        fig.colorbar(mesh, ax=ax, shrink=0.9).set_label(label)
    return mesh


def _luminance(rgba) -> float:
    r, g, b = rgba[:3]
    return 0.299 * r + 0.587 * g + 0.114 * b


def caption(fig, text: str) -> None:
    """The line under a figure that says what its numbers are measured against."""
    fig.supxlabel(text, fontsize=9).set_gid("caption")


def _size(n_rows: int, n_cols: int) -> tuple[float, float]:
    return (min(16.0, 2.4 + 0.62 * n_cols), min(14.0, 1.6 + 0.42 * n_rows))


def _text(label: str) -> str:
    """Text matplotlib shows as written (a `$` would start mathtext)."""
    return label.replace("$", r"\$")


# ---- patching sweeps ---------------------------------------------------------------------
_HEAD = re.compile(r"head (\d+)\.(\d+)")
_LAYER = re.compile(r"(?:mlp|resid) (\d+)")
_AT = re.compile(r"\bat\s+(\S+)\s*$")


def _site_parts(site) -> tuple[int | None, int | None]:
    """(layer, head) a sweep cell's site names: from a typed site or its text."""
    layer = getattr(site, "layer", None)
    head = getattr(site, "head", None)
    if layer is not None:
        return layer, head
    text = str(site)
    match = _HEAD.match(text)
    if match:
        return int(match.group(1)), int(match.group(2))
    match = _LAYER.match(text)
    return (int(match.group(1)), None) if match else (None, None)


def _layer_names(sites) -> list[str]:
    names = []
    for site in sites:
        layer, _ = _site_parts(site)
        text = str(site)
        if text.startswith("resid"):
            names.append(f"resid {layer}")
        else:
            names.append(f"L{layer}" if layer is not None else text)
    return names


def _check_sweep(result) -> tuple[int, ...]:
    grid = getattr(result, "grid", None)
    if not grid or len(grid) not in (1, 2):
        what = getattr(result, "text", repr(result))
        raise FigureError(f"{what!r} is not a sweep: it has no layer or head grid to draw",
                          hint="draw a wildcard sweep such as `patch head * at END` or `patch resid * at S2`")
    return tuple(grid)


def sweep_heatmap(result, *, normalized: bool = False, annotate: bool | None = None):
    """A patching sweep as a heatmap, diverging and centred at 0.

    Args:
        result: an `ExperimentResult` with a grid: layer x head (`patch head * at END`)
            or one axis (`patch mlp * at END`, `patch head 1.* at END`); or a list of
            one-axis sweeps at different positions (`patch resid * at S1`, `... at S2`,
            ...) drawn as layer x position.
        normalized: plot the share of the clean-vs-corrupt gap each patch moves
            (`result.normalized`, 1 = the whole effect) instead of the patched metric.
        annotate: write each cell's value in it (default: when the grid is small).

    Returns:
        The matplotlib `Figure`; its caption gives the clean and corrupt metric values.

    Raises:
        FigureError: a result without a grid, or sweeps that do not line up.
    """
    results = list(result) if isinstance(result, (list, tuple)) else [result]
    if not results:
        raise FigureError("no sweep to draw", hint="pass an ExperimentResult of a wildcard sweep")
    grids = [_check_sweep(r) for r in results]
    first = results[0]
    field = "normalized" if normalized else "values"
    ylabel = "layer"
    if len(results) == 1 and len(grids[0]) == 2:
        n_rows, n_cols = grids[0]
        values = np.asarray(first.normalized if normalized else first.values, dtype=float).reshape(n_rows, n_cols)
        sites = list(first.sites)
        rows = _layer_names(sites[::n_cols])
        cols = [f"H{_site_parts(s)[1]}" if _site_parts(s)[1] is not None else str(s) for s in sites[:n_cols]]
        xlabel, title = "head", first.text
    else:
        if any(len(g) != 1 for g in grids) or len({g for g in grids}) != 1:
            raise FigureError("sweeps drawn side by side must each have one axis of the same length",
                              hint="e.g. `patch resid * at S1`, `patch resid * at S2`, `patch resid * at END`")
        if len({(round(r.clean, 9), round(r.corrupt, 9), r.metric) for r in results}) != 1:
            raise FigureError("these sweeps were not run on the same prompts and metric "
                              "(their clean or corrupt values differ)",
                              hint="run them from one program (one prompt set)")
        values = np.stack([np.asarray(getattr(r, field), dtype=float).ravel() for r in results], axis=1)
        sites = list(first.sites)
        first_head = _site_parts(sites[0])
        if first_head[1] is not None and all(_site_parts(s)[0] == first_head[0] for s in sites):
            rows = [f"H{_site_parts(s)[1]}" for s in sites]  # `head 1.*`: one layer's heads
            ylabel = f"head (layer {first_head[0]})"
        else:
            rows = _layer_names(sites)
        cols = [_position_of(r, i) for i, r in enumerate(results)]
        xlabel = "position"
        title = first.text if len(results) == 1 else _common_text(results)
    fig = new_figure(*_size(len(rows), len(cols)))
    ax = fig.add_subplot()
    label = "normalized (1 = the whole gap)" if normalized else f"patched {first.metric}"
    draw_grid(fig, ax, values, rows, [_text(c) for c in cols], label=label, annotate=annotate)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(_text(title), fontsize=10)
    direction = getattr(first, "direction", "noise")
    caption(fig, f"{first.metric}: clean {first.clean:.4g}, corrupt {first.corrupt:.4g}"
            + (f" ({direction}d)" if first.kind == "patch" and direction == "denoise" else ""))
    return fig


def _position_of(result, i: int) -> str:
    match = _AT.search(getattr(result, "text", "") or "")
    return match.group(1) if match else f"#{i}"


def _common_text(results) -> str:
    texts = [r.text for r in results]
    stems = {_AT.sub("", t).strip() for t in texts}
    return f"{stems.pop()} at each position" if len(stems) == 1 else "; ".join(texts)


# ---- direct logit attribution -------------------------------------------------------------
def dla_grid(result, *, prompt: int | None = None, annotate: bool | None = None):
    """Each head's direct effect on the metric as a layer x head grid, with an MLP column.

    Args:
        result: `circuitlang.lens.DirectEffects`.
        prompt: draw one prompt's effects (its index) instead of the mean over prompts.
        annotate: write each cell's value in it (default: when the grid is small).

    Returns:
        The matplotlib `Figure`; its caption gives the embeddings', the shared biases'
        and the total direct effects and the metric.

    Raises:
        FigureError: `prompt` out of range.
    """
    n = result.n_prompts
    if prompt is not None and not (isinstance(prompt, int) and 0 <= prompt < n):
        raise FigureError(f"prompt {prompt!r} is out of range", hint=f"the result has prompts 0-{n - 1}")

    def pick(a: np.ndarray) -> np.ndarray:
        return a.mean(0) if prompt is None else a[prompt]

    shape = result.shape
    heads = pick(result.heads)
    cols = [f"H{h}" for h in range(shape.n_heads)]
    values = heads
    if shape.has_mlp:
        values = np.concatenate([heads, pick(result.mlps)[:, None]], axis=1)
        cols.append("MLP")
    rows = [f"L{l}" for l in range(shape.n_layers)]
    fig = new_figure(*_size(len(rows), len(cols)))
    ax = fig.add_subplot()
    draw_grid(fig, ax, values, rows, cols, label=f"direct effect on {result.metric}", annotate=annotate)
    if shape.has_mlp:
        ax.axvline(shape.n_heads, color="#444444", linewidth=1.2)
    ax.set_xlabel("head")
    which = "mean over" if prompt is None else f"prompt {prompt} of"
    ax.set_title(f"direct logit attribution ({which} {n} prompt{'s' if n != 1 else ''})", fontsize=10)
    how = "" if result.exact else " (first order)"
    caption(fig, f"{result.metric}{how}: total {float(pick(result.linearized)):.4g}, "
            f"metric {float(pick(result.metric_values)):.4g}\n"
            f"embed {float(pick(result.embed)):.3g}, attention biases {float(pick(result.attn_bias.sum(1))):.3g}, "
            f"final norm bias {float(pick(result.norm_bias)):.3g}")
    return fig


# ---- the logit lens ----------------------------------------------------------------------
def logit_lens(result, *, annotate: bool | None = None):
    """The metric read off each layer's residual stream.

    One position read: a line over the layers, from the embeddings to the last block
    (whose value is the model's own metric). Several positions: a layer x position
    heatmap, diverging and centred at 0.

    Args:
        result: `circuitlang.lens.LogitLens`.
        annotate: write each cell's value in it (heatmaps; default: when small).

    Returns:
        The matplotlib `Figure`.
    """
    rows = result.layer_names()
    values = result.values
    n = result.per_prompt.shape[0]
    title = f"logit lens: {result.metric} per layer ({n} prompt{'s' if n != 1 else ''})"
    if values.shape[1] == 1:
        fig = new_figure(max(4.0, 1.6 + 0.55 * len(rows)), 3.2)
        ax = fig.add_subplot()
        x = np.arange(len(rows))
        per = result.per_prompt[:, :, 0]
        low, high = np.percentile(per, [10, 90], axis=0)
        ax.fill_between(x, low, high, color="#9ecae1", alpha=0.5, linewidth=0, label="10-90% of prompts")
        line, = ax.plot(x, values[:, 0], marker="o", color="#08519c", label="mean")
        line.set_gid("lens")
        ax.axhline(0.0, color="#888888", linewidth=0.8)
        ax.set_xticks(x, rows)
        ax.set_xlabel("residual stream after")
        ax.set_ylabel(result.metric)
        ax.legend(fontsize=8, frameon=False)
        ax.set_title(title, fontsize=10)
    else:
        cols = [_text(c) for c in result.position_names()]
        fig = new_figure(*_size(len(rows), len(cols)))
        ax = fig.add_subplot()
        draw_grid(fig, ax, values, rows, cols, label=result.metric, annotate=annotate)
        ax.set_xlabel("position read (as END)")
        ax.set_ylabel("residual stream after")
        ax.set_title(title, fontsize=10)
    caption(fig, f"model's own {result.metric}: {float(result.clean.mean()):.4g}")
    return fig


__all__ = ["DIVERGING", "dla_grid", "draw_grid", "logit_lens", "sweep_heatmap", "symmetric_norm"]
