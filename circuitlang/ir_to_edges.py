"""Lower a hypothesis's edges to the edge engine's masks: the solver's view of a circuit.

Takes a resolved `Hypothesis` and gives an `EdgeCircuit`: the model's `EdgeSet`
(`circuitlang.topology` decides which edges exist) and which of them the circuit
keeps, at every position or only at named ones. `EdgeCircuit.mask(prompts)` is what
`LoadedModel.run(edges=EdgePatch(...))` takes: 1 ablates an edge, 0 keeps it, invalid
pairs stay 0; a circuit with edges at named positions gives a per-position mask
`[B, T, R, S]` (the edge is kept at that position's index in each prompt and ablated
at every other).

An `EdgeClaim(sender, receiver, position)` is one kept edge; an edge into a head
with no channel was already expanded into q, k and v by the resolver; under
grouped-query attention a key/value receiver is named by the first query head of its
group (`topology.canonical`). Claims that are not edges (depends-claims) have no
edge reading and are returned in `EdgeCircuit.skipped`. Edges from a neuron, an SAE
latent or error, or a subspace, and into a latent, are listed too: the default edge set
is the model's components plus the units the hypothesis's edges name (the engine's
masks cover components only; a diagram draws every edge).

The checker and the edge engine agree on what an edge set means: with
`ablation corrupt`, an edge-only hypothesis whose every sender other than the
embedding has a kept input (no edge dangles from the input side) scrubs to the same
per-prompt numbers as the engine patching every edge outside it with the
counterfactual's values (tests/checker/test_edges_agree.py). That is why the solver
prunes dangling edges before it writes a circuit back as a program.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from circuitlang import topology
from circuitlang.errors import LowerError
from circuitlang.ir import EdgeClaim, Hole
from circuitlang.models.interventions import EdgeSet
from circuitlang.sites import ALL, Channel, Head, Latent, Neuron, Position, SaeError, Site, Subspace

__all__ = ["EdgeCircuit", "ir_to_edges"]


@dataclass(frozen=True, eq=False)
class EdgeCircuit:
    """A set of kept edges over a model's `EdgeSet`.

    Attributes:
        edge_set: the senders and receivers (the masks' last two axes).
        everywhere: BoolTensor [R, S], edges kept at every position.
        at: position -> BoolTensor [R, S], edges kept only at that position.
        skipped: claims of the hypothesis that are not edges.
    """

    edge_set: EdgeSet
    everywhere: torch.Tensor
    at: dict
    skipped: tuple = ()

    @property
    def per_position(self) -> bool:
        """True when some edge is kept only at a named position."""
        return any(bool(m.any()) for m in self.at.values())

    def edges(self) -> list[tuple[Site, Site, Position]]:
        """The kept edges as (sender, receiver, position), receivers in order."""
        out = []
        es = self.edge_set
        for where, kept in [(ALL, self.everywhere)] + list(self.at.items()):
            for r, s in kept.nonzero().tolist():
                out.append((es.senders[s], es.receivers[r], where))
        return out

    def __len__(self) -> int:
        return int(self.everywhere.sum()) + sum(int(m.sum()) for m in self.at.values())

    def mask(self, prompts=None, batch: int | None = None) -> torch.Tensor:
        """The engine's ablation mask for this circuit: [B, R, S], or [B, T, R, S] when an
        edge is kept only at a named position (then `prompts` gives where it is).

        Args:
            prompts: the task's `PromptSet` (positions per prompt); needed for per-position
                circuits.
            batch: B when `prompts` is not given (every row the same).
        """
        valid = self.edge_set.valid()
        ablate = (valid & ~self.everywhere).float()
        if not self.per_position:
            b = batch if prompts is None else len(prompts.input_ids)
            return ablate.expand(b or 1, *ablate.shape).clone()
        if prompts is None:
            raise LowerError("this circuit keeps edges at named positions: its mask needs the prompts",
                             hint="call mask(prompts)")
        from circuitlang.execute import position_index

        n, t = prompts.input_ids.shape
        out = ablate.expand(n, t, *ablate.shape).clone()
        rows = torch.arange(n)
        for position, kept in self.at.items():
            index = position_index(prompts, position)
            out[rows, index] = out[rows, index] * (~kept).float()
        return out


def _edge_set(hypothesis, shape) -> EdgeSet:
    """The model's edge set, with the units (neurons, latents, errors, subspaces) the
    hypothesis's edges name added where they sit in the order of computation."""
    base = EdgeSet.build(shape)
    senders, receivers = list(base.senders), list(base.receivers)
    for claim in hypothesis.claims:
        if not isinstance(claim, EdgeClaim):
            continue
        if _is_unit(claim.sender) and claim.sender not in senders:
            senders.append(claim.sender)
        if _is_unit(claim.receiver) and claim.receiver not in receivers:
            receivers.insert(len(receivers) - 1, claim.receiver)  # before the logits
    if len(senders) == len(base.senders) and len(receivers) == len(base.receivers):
        return base
    return EdgeSet(tuple(sorted(senders, key=topology.sender_key)), tuple(receivers), shape)


def _is_unit(site) -> bool:
    return isinstance(site, (Neuron, Latent, SaeError, Subspace))


def ir_to_edges(hypothesis, edge_set: EdgeSet | None = None) -> EdgeCircuit:
    """The edges a hypothesis claims, as kept-edge masks over the model's edge set.

    Args:
        hypothesis: a resolved `Hypothesis` (its `shape` says which edges exist).
        edge_set: the senders and receivers to use (default: every edge of the model).

    Raises:
        LowerError: a claim names an edge the model does not have, or a hole.
    """
    shape = getattr(hypothesis, "shape", None)
    if edge_set is None:
        if shape is None:
            raise LowerError("this hypothesis carries no model shape, so its edges cannot be listed",
                             hint="resolve it against a model (or pass edge_set=...)")
        edge_set = _edge_set(hypothesis, shape)
    n_r, n_s = len(edge_set.receivers), len(edge_set.senders)
    everywhere = torch.zeros(n_r, n_s, dtype=torch.bool)
    at: dict[Position, torch.Tensor] = {}
    skipped = []
    for claim in hypothesis.claims:
        if not isinstance(claim, EdgeClaim):
            skipped.append(claim)
            continue
        sender, receiver = claim.sender, claim.receiver
        if isinstance(sender, Hole) or isinstance(receiver, Hole):
            raise LowerError(f"`{claim.text or claim}` has a hole: fill it first", code="lower.hole",
                             span=claim.span, hint="run `circuitlang discover` on the file")
        if isinstance(sender, Head):
            sender = sender.with_channel(Channel.OUT)
        if isinstance(receiver, Head) and not receiver.channel.is_input:
            receiver = receiver.with_channel(Channel.Q)
        problem = topology.edge_problem(shape, sender, receiver)
        if problem is not None:
            raise LowerError(f"edge {sender} -> {receiver} is not in the model: {problem}",
                             code="lower.not-an-edge", span=claim.span)
        r, s = edge_set.index(sender, topology.canonical(shape, receiver))
        if claim.position.is_all:
            everywhere[r, s] = True
        else:
            at.setdefault(claim.position, torch.zeros(n_r, n_s, dtype=torch.bool))[r, s] = True
    for kept in at.values():
        kept &= ~everywhere  # kept everywhere already covers every position
    return EdgeCircuit(edge_set, everywhere, at, tuple(skipped))
