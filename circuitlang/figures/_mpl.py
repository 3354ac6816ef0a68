"""What every figure shares: matplotlib imported on first use, and deterministic files.

Figures are matplotlib `Figure` objects built with the object-oriented API (no pyplot
state, no backend switch), so they work in scripts, notebooks and tests alike. Saved files
are deterministic: SVG keeps text as text (tests read labels) and carries no date or
random ids, PDF carries no creation date.
"""
from __future__ import annotations

from pathlib import Path

from circuitlang.errors import CircuitlangError

FORMATS = ("svg", "png", "pdf")


class FigureError(CircuitlangError):
    """A figure cannot be drawn: matplotlib missing, an unknown format, nothing to draw."""

    stage = "figure"


def new_figure(width: float, height: float):
    """A fresh `matplotlib.figure.Figure` of `width` x `height` inches, styled the same for all."""
    try:
        import matplotlib
        from matplotlib.figure import Figure
    except ModuleNotFoundError as exc:
        raise FigureError(
            "figures need matplotlib, which is not installed",
            hint="pip install 'circuitlang[figures]'",
        ) from exc
    matplotlib.rcParams["svg.fonttype"] = "none"  # text stays text: labels are searchable
    matplotlib.rcParams["svg.hashsalt"] = "circuitlang"  # ids repeat from run to run
    return Figure(figsize=(width, height), layout="constrained")


def save(fig, path: str | Path) -> Path:
    """Write `fig` to `path`; the suffix (.svg, .png, .pdf) picks the format."""
    path = Path(path)
    fmt = path.suffix.lstrip(".").lower()
    if fmt not in FORMATS:
        raise FigureError(
            f"cannot write a figure as {path.suffix or 'a file without a suffix'!r}",
            hint="name the file .svg, .png or .pdf",
        )
    metadata = {"svg": {"Date": None}, "pdf": {"CreationDate": None}, "png": {}}[fmt]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, format=fmt, metadata=metadata)
    tmp.replace(path)
    return path


def svg_text(fig) -> str:
    """The figure as SVG text (what notebooks inline and tests inspect)."""
    import io

    buf = io.StringIO()
    fig.savefig(buf, format="svg", metadata={"Date": None})
    return buf.getvalue()
