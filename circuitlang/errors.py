"""Errors: one base class, one subclass per pipeline stage, each problem a value.

A `Diagnostic` is one problem: a code, a message, where it is (a `Span`), and a hint
that says what would have been valid. A `CircuitlangError` carries one or more
diagnostics and renders them the way compilers do::

    ioi.circ:3:6: error: head 12.1 out of range (model has layers 0-11)
      head 12.1 moves name to END
           ^^^^
    hint: did you mean 11.1?

Syntax errors fail fast (one diagnostic); the resolver collects every problem it
finds and raises them together.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Span:
    """A stretch of source text: 1-based line and column, end exclusive.

    `end_line`/`end_column` point one past the last character. Spans never take
    part in equality of the nodes that carry them (those fields use
    `field(compare=False)`).
    """

    line: int
    column: int
    end_line: int
    end_column: int
    filename: str | None = None

    def with_filename(self, filename: str | None) -> "Span":
        return Span(self.line, self.column, self.end_line, self.end_column, filename)


@dataclass(frozen=True, slots=True)
class Diagnostic:
    """One problem found in a hypothesis, a command line, a model or a task."""

    code: str
    message: str
    span: Span | None = None
    hint: str | None = None
    severity: str = "error"

    def render(self, source: str | None = None) -> str:
        """Render as `file:line:col: error: message`, source line, caret, hint."""
        span = self.span
        if span is None:
            head = f"{self.severity}: {self.message}"
        else:
            where = f"{span.filename or '<string>'}:{span.line}:{span.column}"
            head = f"{where}: {self.severity}: {self.message}"
        lines = [head]
        if span is not None and source is not None:
            src_lines = source.splitlines()
            if 1 <= span.line <= len(src_lines):
                text = src_lines[span.line - 1].expandtabs(1)
                width = (
                    span.end_column - span.column
                    if span.end_line == span.line
                    else len(text) - span.column + 1
                )
                lines.append("  " + text)
                lines.append("  " + " " * (span.column - 1) + "^" * max(1, width))
        if self.hint:
            lines.append(f"hint: {self.hint}")
        return "\n".join(lines)


def diagnostic_order(diag: Diagnostic):
    """Sort key: diagnostics without a place first, then by file, line and column."""
    span = diag.span
    if span is None:
        return (0, "", 0, 0)
    return (1, span.filename or "", span.line, span.column)


class CircuitlangError(Exception):
    """Base of every error circuitlang raises on bad input.

    Attributes:
        diagnostics: the problems, in source order.
        source: the text the spans point into, when known (for carets).
    """

    stage = "circuitlang"

    def __init__(
        self,
        message_or_diagnostics: str | Diagnostic | list[Diagnostic],
        *,
        code: str | None = None,
        span: Span | None = None,
        hint: str | None = None,
        source: str | None = None,
    ):
        if isinstance(message_or_diagnostics, str):
            diags = [Diagnostic(code or self.stage, message_or_diagnostics, span, hint)]
        elif isinstance(message_or_diagnostics, Diagnostic):
            diags = [message_or_diagnostics]
        else:
            diags = list(message_or_diagnostics)
        if not diags:
            raise ValueError("a CircuitlangError needs at least one diagnostic")
        self.diagnostics: list[Diagnostic] = diags
        self.source = source
        super().__init__(self.render())

    @property
    def message(self) -> str:
        return self.diagnostics[0].message

    @property
    def hint(self) -> str | None:
        return self.diagnostics[0].hint

    @property
    def span(self) -> Span | None:
        return self.diagnostics[0].span

    def with_source(self, source: str) -> "CircuitlangError":
        """Attach the source text so rendering can show the line and caret."""
        self.source = source
        self.args = (self.render(),)
        return self

    def render(self) -> str:
        return "\n".join(d.render(self.source) for d in self.diagnostics)

    def __str__(self) -> str:
        return self.render()


class ParseError(CircuitlangError):
    """The text is not a circuitlang program (grammar-level problem). Fails fast."""

    stage = "parse"


class ResolveError(CircuitlangError):
    """The program parses but does not make sense for this model and task."""

    stage = "resolve"


class ModelError(CircuitlangError):
    """A model cannot be found, loaded, or addressed (unknown site, bad architecture)."""

    stage = "model"


class TaskError(CircuitlangError):
    """A task cannot be built: unknown task, bad parameters, prompts that do not fit."""

    stage = "task"


class LowerError(CircuitlangError):
    """A resolved hypothesis cannot be compiled to an intervention graph."""

    stage = "lower"


class ExecutionError(CircuitlangError):
    """Running an intervention graph failed for a reason the user can act on."""

    stage = "execute"


class DiscoveryError(CircuitlangError):
    """The solver was asked for something it cannot do (bad task, bad budget, holes)."""

    stage = "discover"
