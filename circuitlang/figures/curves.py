"""Faithfulness over circuit size: MIB's plot, several methods on one set of axes.

Takes faithfulness curves (`circuitlang.discover.faithfulness.Curve`, the `.curve` of a
`DiscoveryResult`, or the `curve` object of a discover JSON) and gives a matplotlib
`Figure`: for each curve its faithfulness f(k) at each edge fraction (log x, as MIB
plots them, Mueller et al. 2025), its 95% bootstrap band (the curve's per-point `low`
and `high`, a paired bootstrap over prompts), and in the legend its CPR and CMD with
their intervals (CPR: area under f, higher is better; CMD: area between f and 1, lower
is better). Dashed lines mark f = 1 (the full model) and f = 0 (every edge ablated);
when every curve ranks the same number of candidate edges, the top axis counts edges.
"""
from __future__ import annotations

import math
from pathlib import Path

from circuitlang.figures._mpl import FigureError, new_figure

__all__ = ["CURVE_COLOURS", "faithfulness_curves", "load_curves"]

#: One colour per curve, in order (Okabe-Ito, then greys).
CURVE_COLOURS = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000",
                 "#777777", "#bbbbbb")


def _as_curve(item, where: str):
    """(curve, default label) for a Curve, a DiscoveryResult, or a curve's JSON dict."""
    from circuitlang.discover.faithfulness import Curve

    if isinstance(item, Curve):
        return item, None
    if isinstance(item, dict):
        return Curve.from_json(item), None
    if hasattr(item, "curve") and hasattr(item, "method"):
        if item.curve is None:
            raise FigureError(f"{where}: this discovery result has no faithfulness curve "
                              f"(method {item.method} ranks no edges, or with_curve=False)",
                              code="figure.no-curve", hint="use a ranking method (eap, eap-ig) with a curve")
        return item.curve, item.method
    raise FigureError(f"{where}: cannot draw a faithfulness curve from a {type(item).__name__}",
                      code="figure.no-curve", hint="pass Curve objects or DiscoveryResults (a dict label -> either)")


def faithfulness_curves(curves, *, labels=None, title: str | None = None):
    """Plot faithfulness curves with bootstrap bands, CPR and CMD in the legend.

    Args:
        curves: a `Curve` or `DiscoveryResult`, a list of them, or a dict label -> one.
        labels: a label per curve (default: the dict's keys, a discovery result's method,
            else `curve 1`, `curve 2`, ...).
        title: the figure's title.

    Returns:
        A matplotlib `Figure`.

    Raises:
        FigureError: matplotlib is missing, no curves, labels of the wrong length, or an
            item that carries no curve.
    """
    if isinstance(curves, dict):
        items = list(curves.values())
        labels = list(curves) if labels is None else labels
    elif isinstance(curves, (list, tuple)):
        items = list(curves)
    else:
        items = [curves]
    if not items:
        raise FigureError("no curves to draw", code="figure.no-curve", hint="pass one Curve or more")
    if labels is not None and len(labels) != len(items):
        raise FigureError(f"{len(labels)} labels for {len(items)} curves", code="figure.labels",
                          hint="give one label per curve, or none")
    parsed = [_as_curve(item, f"curve {i + 1}") for i, item in enumerate(items)]
    names = [str(labels[i]) if labels is not None else (default or f"curve {i + 1}")
             for i, (_, default) in enumerate(parsed)]

    fig = new_figure(7.0, 4.2)
    from matplotlib.ticker import FuncFormatter

    ax = fig.add_subplot()
    ax.set_xscale("log")
    ax.axhline(1.0, color="#999999", lw=0.8, ls="--", zorder=0, gid="full-model")
    ax.axhline(0.0, color="#999999", lw=0.8, ls=":", zorder=0, gid="empty-circuit")
    for i, ((curve, _), name) in enumerate(zip(parsed, names)):
        colour = CURVE_COLOURS[i % len(CURVE_COLOURS)]
        x = [100 * f for f in curve.fractions]
        ax.fill_between(x, curve.low, curve.high, color=colour, alpha=0.18, lw=0, gid=f"band-{i}")
        legend = (f"{name}: CPR {_num(curve.cpr)} [{_num(curve.cpr_interval[0])}, {_num(curve.cpr_interval[1])}], "
                  f"CMD {_num(curve.cmd)} [{_num(curve.cmd_interval[0])}, {_num(curve.cmd_interval[1])}]")
        ax.plot(x, curve.faithfulness, color=colour, marker="o", ms=3.5, lw=1.5, label=legend, gid=f"curve-{i}")
    totals = {round(c.edges[-1] / c.fractions[-1]) for c, _ in parsed if c.fractions and c.fractions[-1] > 0}
    if len(totals) == 1:
        total = totals.pop()
        top = ax.secondary_xaxis("top", functions=(lambda p: p * total / 100, lambda k: k * 100 / total))
        top.set_xlabel(f"edges kept (of {total:,})", fontsize=9)
        top.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_xlabel("edges kept (% of all candidate edges, log scale)", fontsize=9)
    ax.set_ylabel("faithfulness f(k)", fontsize=9)
    ax.set_title(title or "faithfulness over circuit size (95% bootstrap bands)", fontsize=10)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}%"))
    # upper left: a curve is rarely near 1 with few edges, so the legend hides little there
    ax.legend(loc="upper left", fontsize=7.5, frameon=False)
    ax.grid(True, which="major", color="#eeeeee", lw=0.6)
    return fig


def _num(value: float) -> str:
    return "nan" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def load_curves(path: str | Path) -> dict:
    """The curves a JSON file holds: a discover result (its `curve`, labelled by `method`),
    a `Curve`'s own JSON, or a dict label -> either. A run directory (or its `run.json`)
    means its `result.json`.

    Raises:
        FigureError: the file is missing, is not JSON, or holds no curve.
    """
    import json

    path = Path(path)
    if path.is_dir():  # a run directory: its results
        path = path / "result.json"
    elif path.name == "run.json" and (path.parent / "result.json").is_file():
        path = path.parent / "result.json"  # a run directory's spec: its results beside it
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FigureError(f"no such file: {path}", code="figure.curve-file",
                          hint="pass the JSON `circuitlang discover --json` or a run directory wrote") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise FigureError(f"cannot read {path} as JSON: {exc}", code="figure.curve-file",
                          hint="pass the JSON `circuitlang discover --json` or a run directory wrote") from None

    def one(item, name):
        if isinstance(item, dict) and isinstance(item.get("curve"), dict):
            return item.get("method") or name, item["curve"]
        if isinstance(item, dict) and "faithfulness" in item and "fractions" in item:
            return name, item
        return None

    found = one(data, path.stem)
    if found is not None:
        return {found[0]: found[1]}
    if isinstance(data, dict):
        out = {}
        for key, item in data.items():
            got = one(item, str(key))
            if got is not None:
                out[str(key)] = got[1]
        if out:
            return out
    hint = "discover writes a curve for ranking methods (eap, eap-ig), not for acdc or prune"
    raise FigureError(f"{path} holds no faithfulness curve", code="figure.no-curve", hint=hint)
