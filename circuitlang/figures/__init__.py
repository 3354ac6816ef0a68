"""Figures: circuit diagrams, patching heatmaps, attention patterns, lenses, curves.

Takes results (programs, check results, sweeps, discovery results) and gives matplotlib
`Figure`s; `save(fig, "c.svg")` writes one. matplotlib is an optional extra
(`pip install 'circuitlang[figures]'`); without it every function raises `FigureError`
with that hint. Importing this package imports nothing heavy.
"""
from __future__ import annotations

from circuitlang.figures._mpl import FigureError, save, svg_text
from circuitlang.figures.attention import attention_pattern
from circuitlang.figures.circuit import circuit_diagram
from circuitlang.figures.curves import faithfulness_curves
from circuitlang.figures.heatmaps import dla_grid, logit_lens, sweep_heatmap

__all__ = ["FigureError", "save", "svg_text"]
__all__ += ["circuit_diagram", "faithfulness_curves"]
__all__ += ["attention_pattern", "dla_grid", "logit_lens", "sweep_heatmap"]
