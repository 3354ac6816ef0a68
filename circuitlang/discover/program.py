"""A discovered circuit written back as a circuitlang program.

Takes a `Problem` and a circuit (kept edges); gives the `Hypothesis` of that circuit
(one `A -> B at P` claim per kept edge, `ablation` as discovered, `samples` and `seed`
so `circuitlang check` draws the same prompts) and its formatted text, with a header
comment saying how it was found. `circuitlang check found.circ` then re-measures the
same faithfulness: with `ablation corrupt` (and the dangling edges pruned) the
checker's causal scrubbing of an edge-only circuit is exactly the edge engine's
patching (circuitlang/ir_to_edges.py).

Under grouped-query attention the engine names a key/value receiver by the first
query head of its group; the program names it for every query head of the group that
is in the circuit, since each of them reads that shared input.
"""
from __future__ import annotations

import math

import torch

from circuitlang import ir
from circuitlang.sites import Channel, Head

__all__ = ["circuit_claims", "circuit_hypothesis", "program_text"]


def _in_circuit(edges) -> set[tuple[int, int]]:
    heads = set()
    for s, r, _ in edges:
        for site in (s, r):
            if isinstance(site, Head):
                heads.add((site.layer, site.head))
    return heads


def circuit_claims(problem, kept: torch.Tensor) -> tuple[ir.EdgeClaim, ...]:
    """One edge claim per kept edge (key/value edges named for each query head of the group
    that is in the circuit)."""
    edges = problem.space.edges(kept)
    shape = problem.model.shape
    present = _in_circuit(edges)
    claims: dict = {}
    for sender, receiver, position in edges:
        targets = [receiver]
        if isinstance(receiver, Head) and receiver.channel in (Channel.K, Channel.V) and shape.kv_group > 1:
            first = receiver.head - receiver.head % shape.kv_group
            group = [Head(receiver.layer, first + i, receiver.channel) for i in range(shape.kv_group)]
            targets = [h for h in group if (h.layer, h.head) in present] or [receiver]
        for r in targets:
            claims.setdefault((sender, r, position), ir.EdgeClaim(sender, r, position))
    return tuple(claims.values())


def circuit_hypothesis(problem, kept: torch.Tensor, *, metric: str, seed: int, expect_at_least: float | None,
                       task_params: tuple = ()) -> ir.Hypothesis:
    """The hypothesis of a circuit, ready to print and to check."""
    expectations = ()
    if expect_at_least is not None and math.isfinite(expect_at_least):
        import sympy

        bound = math.floor(expect_at_least * 100) / 100
        expectations = (ir.Expectation("aggregate", sympy.Symbol("recovered"), ">=",
                                       sympy.Rational(round(bound * 100), 100)),)
    return ir.Hypothesis(
        model=problem.model.name, task=problem.task.SIGNATURE.name, metric=metric, metric_named=True,
        ablation=ir.Ablation(problem.ablation), seed=seed, samples=problem.n,
        claims=circuit_claims(problem, kept), expectations=expectations, shape=problem.model.shape,
        task_params=task_params,
    )


def program_text(hypothesis: ir.Hypothesis, header: list[str]) -> str:
    """The formatted program, `header` lines as its opening comment."""
    from circuitlang.ir_to_ast import ir_to_ast
    from circuitlang.printer import format

    return format(ir_to_ast(hypothesis, comments=tuple(header)))
