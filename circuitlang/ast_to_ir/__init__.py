"""Resolve: `Program` (AST) + `ModelShape` + `TaskSignature` -> `Hypothesis` (IR).

Binds every name the program uses: `use` imports (the stdlib prelude always),
verb definitions, groups, heads (checked against the model's layer and head
counts), channels, positions and features (checked against the task), metric names
in expressions. Verb uses are matched against the verb patterns in scope and
expanded into core claims (`circuitlang.verbs` does the matching and the
substitution, AST to AST; the claims it gives are resolved here); groups into
their heads; wildcards (`patch head * at END`) into explicit site lists with a grid shape; expressions into sympy
expressions built node by node from the AST (no string is ever evaluated). Holes
(`head ?h`) stay in the IR as `ir.Hole` placeholders.

The resolver reports every problem at once: it keeps going after an error, and
raises one `ResolveError` carrying all the diagnostics, in source order. Reading a
hypothesis never runs code: imports are other `.circ` files, parsed and resolved
the same way.

The stage is a package, one module per part of the language it resolves:
`resolver` (the program: claims, verbs, groups, experiments), `header` (model, task,
metric, ablation, settings), `imports` (`use` and the files a hypothesis may read),
`names` (sites, positions, features), `claims` (core claims and edges), `holes`
(holes and their constraints: `?h in layers 9-11`, `?g has at most 4 heads`), `units`
(neurons, SAE declarations, latents and error terms), `subspaces` (`subspace` and `align`),
`expressions` (`expect`). They share one `_Resolver` object, which collects the
diagnostics.
"""
from __future__ import annotations

from dataclasses import replace

from circuitlang import ast, ir, sites
from circuitlang.ast_to_ir.header import environment
from circuitlang.ast_to_ir.imports import stdlib_modules, verb_patterns
from circuitlang.ast_to_ir.resolver import _Resolver
from circuitlang.errors import CircuitlangError
from circuitlang.tasks.signature import TaskSignature
from circuitlang.text_to_ast import parse

__all__ = ["resolve", "resolve_text", "stdlib_modules", "verb_patterns"]


def resolve(
    program: ast.Program,
    shape: sites.ModelShape | None = None,
    task: TaskSignature | str | None = None,
    *,
    model: str | None = None,
    filename: str | None = None,
    source: str | None = None,
) -> ir.Hypothesis:
    """Resolve a parsed program against a model shape and a task signature.

    Args:
        program: what `circuitlang.parse` returned.
        shape: the model's layers, heads, MLPs (no weights needed). When None, it
            is looked up by name (`model`, else the file's `model` line) with
            `circuitlang.models.known_shape`.
        task: the task's signature, or a task name overriding the file's `task`
            line (looked up with `circuitlang.tasks.get_signature`).
        model: a model name overriding the file's `model` line.
        filename: where the program came from (defaults to `program.filename`);
            relative `use` imports are looked up next to it.
        source: the program's text; errors then render with carets.

    Returns:
        The `Hypothesis`, with verbs expanded and every name checked.

    Raises:
        ResolveError: carrying every problem found (or the `ModelError` /
            `TaskError` when the model or task alone cannot be found).
    """
    filename = filename if filename is not None else program.filename
    try:
        shape, signature = environment(program, shape, task, model, filename)
        hypothesis = _Resolver(shape, signature, filename).run(program)
    except CircuitlangError as exc:
        if source is not None:
            exc.with_source(source)
        raise
    if model and model != hypothesis.model:
        hypothesis = replace(hypothesis, model=model)
    return hypothesis


def resolve_text(
    text: str,
    shape: sites.ModelShape | None = None,
    task: TaskSignature | str | None = None,
    *,
    model: str | None = None,
    filename: str | None = None,
) -> ir.Hypothesis:
    """Parse and resolve in one step; errors carry the source for carets.

    Raises:
        ParseError: the text does not parse.
        ResolveError: it parses but names things this model or task lacks.
    """
    program = parse(text, filename)
    return resolve(program, shape, task, model=model, filename=filename, source=text)

