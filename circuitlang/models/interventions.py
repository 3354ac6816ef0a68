"""Intervention values: node patches, edge patches, and the result of a run.

Takes nothing from the model; gives the frozen values `LoadedModel.run` accepts
(`Patch`, `EdgePatch`, `EdgeSet`) and returns (`Run`). Shapes use B = batch,
T = tokens, D = d_model, V = vocab, R = receivers, S = senders.

Edges follow the ACDC / auto-circuit scheme. The residual stream is a sum of node
outputs (embedding, each head's own output, each MLP's output, plus shared biases),
so an edge sender -> receiver is "the receiver's input contains the sender's
output". Ablating it gives the receiver::

    receiver_input = current_input - sum_s mask[..., r, s] * (current_out_s - ablated_out_s)

Senders: `Embed()`, `Head(l, h)` (channel OUT), `Mlp(l)`. Receivers: `Head(l, h, Q|K|V)`
(that head's q/k/v input, before its layer norm), `Mlp(l)` (its input) and `Logits()`
(the final residual stream). Under grouped-query attention one k/v head serves a
group of query heads: `Head(l, h, K)` names the k input of the key/value head that
query head `h` uses, so name one head per group (`EdgeSet.build` uses the first).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence, Union

import torch

from circuitlang.errors import ModelError
from circuitlang import topology
from circuitlang.sites import ModelShape, Site


@dataclass(frozen=True, slots=True, eq=False)
class Patch:
    """Replace the value of one site during a run.

    Attributes:
        site: what to replace (any site kind; `Head(l, h, PATTERN)` replaces the
            pattern's rows at the query positions).
        value: the new value: [B, T, ...] for the whole sequence (B may be 1 to
            broadcast), or with `positions` [B, ...] / [B, k, ...].
        positions: None (every position), LongTensor [B] (one index per row), or [B, k].
        rows: optional BoolTensor [B]: only these rows are patched (per-row choices
            along the batch); the others keep their own value.
    """

    site: Site
    value: torch.Tensor
    positions: torch.Tensor | None = None
    rows: torch.Tensor | None = None


def sender_key(site: Site) -> tuple[int, int, int]:
    """Where a sender sits in the forward pass (`topology.sender_key`, as a ModelError)."""
    try:
        return topology.sender_key(site)
    except ValueError:
        raise ModelError(f"{site} cannot send an edge", code="model.bad-sender",
                         hint=topology.SENDERS_HINT) from None


def _check_receiver(site: Site) -> None:
    if not topology.is_receiver(site):
        raise ModelError(f"{site} cannot receive an edge", code="model.bad-receiver",
                         hint=topology.RECEIVERS_HINT)


@dataclass(frozen=True, slots=True, eq=False)
class EdgeSet:
    """An ordered list of senders and receivers, and the edges between them.

    Attributes:
        senders: sender sites, the mask's last axis.
        receivers: receiver sites, the mask's second-to-last axis.
        shape: the model's shape (edge validity asks `circuitlang.topology` with it;
            None: a model without parallel attention and MLP).
    """

    senders: tuple[Site, ...]
    receivers: tuple[Site, ...]
    shape: ModelShape | None = None
    _s_index: dict = field(default_factory=dict, repr=False)
    _cache: dict = field(default_factory=dict, repr=False)
    _r_index: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        for s in self.senders:
            sender_key(s)
        for r in self.receivers:
            _check_receiver(r)
        self._s_index.update({s: i for i, s in enumerate(self.senders)})
        self._r_index.update({r: i for i, r in enumerate(self.receivers)})
        if len(self._s_index) != len(self.senders) or len(self._r_index) != len(self.receivers):
            raise ModelError("an edge set lists a sender or receiver twice", code="model.duplicate-site")

    @classmethod
    def build(cls, shape: ModelShape) -> "EdgeSet":
        """Every sender and receiver of a model, in computation order (`circuitlang.topology`).

        Senders: embed, then per layer its heads and its MLP. Receivers: per layer each
        head's q, k, v (k and v only for the first query head of each key/value group
        under grouped-query attention), then the MLP; finally the logits.
        """
        return cls(tuple(topology.senders(shape)), tuple(topology.receivers(shape)), shape)

    def index(self, sender: Site, receiver: Site) -> tuple[int, int]:
        """(receiver index, sender index) of an edge in the mask's last two axes."""
        try:
            return self._r_index[receiver], self._s_index[sender]
        except KeyError as exc:
            raise ModelError(
                f"edge {sender} -> {receiver} is not in this edge set",
                code="model.unknown-edge",
                hint="build the set with EdgeSet.build(shape) or list both sites",
            ) from exc

    def valid(self) -> torch.Tensor:
        """BoolTensor [R, S]: which (receiver, sender) pairs are edges of the model
        (computed once per edge set; a copy is returned)."""
        cached = self._cache.get("valid")
        if cached is None:
            cached = torch.tensor(
                [[topology.edge_exists(self.shape, s, r) for s in self.senders] for r in self.receivers],
                dtype=torch.bool,
            ).reshape(len(self.receivers), len(self.senders))
            self._cache["valid"] = cached
        return cached.clone()

    def edges(self) -> list[tuple[Site, Site]]:
        """Every valid (sender, receiver) pair, receivers in order."""
        return [
            (s, r)
            for r in self.receivers
            for s in self.senders
            if topology.edge_exists(self.shape, s, r)
        ]

    def mask(self, batch: int, edges: Iterable[tuple[Site, Site]] = (), value: float = 1.0) -> torch.Tensor:
        """A [batch, R, S] mask with `value` on the given edges (all valid edges if none given)."""
        out = torch.zeros(batch, len(self.receivers), len(self.senders))
        chosen = list(edges)
        if not chosen:
            out[:] = self.valid().to(out.dtype) * value
            return out
        for s, r in chosen:
            ri, si = self.index(s, r)
            out[:, ri, si] = value
        return out


Ablated = Union[Mapping[Site, torch.Tensor], torch.Tensor]


@dataclass(frozen=True, slots=True, eq=False)
class EdgeReference:
    """A circuit already run on the same batch rows with the same ablated values: its
    mask and what each sender computed there. An edge-patched pass given one computes
    again only the nodes (heads, MLPs) whose input can differ from that pass's: a node
    whose receivers' mask rows equal the reference's and whose kept edges come from nodes
    that are not computed again gives what it gave there (ACDC's passes change the edges
    of one receiver, so only that node and what its kept edges reach are computed).

    Attributes:
        mask: [R, S], the reference circuit's mask over the patch's receivers and senders
            (one circuit for every batch row).
        deltas: sender -> [B, T, D]: its output there minus its ablated value (`Run.deltas`
            of that pass, copied: those are views of a reused buffer); or [n, T, D] when
            the batch is n rows repeated (circuits along the batch). A node with none is
            computed.
        at: [B] (or [n]) when the last layer's deltas hold only at one token per row (a
            pass with `logits_at=`): they are then used only by passes that read there.
    """

    mask: torch.Tensor
    deltas: Mapping[Site, torch.Tensor]
    at: torch.Tensor | None = None

    @classmethod
    def from_run(cls, run: "Run", mask: torch.Tensor, rows: slice = slice(None), *,
                 previous: "EdgeReference | None" = None, known: Mapping | None = None) -> "EdgeReference":
        """The circuit `mask` [R, S] that batch rows `rows` of `run` held, as the reference
        of a later pass: each sender's delta there copied out of the reused buffer, except
        those the pass took from `previous` (that reference's own tensors, which nothing
        changes) and those `known` gives (sender -> a tensor equal to its delta there)."""
        known = known or {}
        deltas = {}
        for site, delta in run.deltas.items():
            if site in known:
                deltas[site] = known[site]
            elif previous is not None and delta is previous.deltas.get(site):
                deltas[site] = delta
            else:
                deltas[site] = delta[rows].clone()
        at = None if run.deltas_at is None else run.deltas_at[rows].clone()
        return cls(mask.clone(), deltas, at)


@dataclass(frozen=True, slots=True, eq=False)
class EdgePatch:
    """Ablate any set of edges in one forward pass.

    Attributes:
        ablated: the senders' replacement outputs: a mapping site -> [B, T, D] (a
            `Run.cache` works), or one tensor [B, S, T, D] in `senders` order.
        mask: [B, R, S] or [B, T, R, S]; 1 = ablate the edge, 0 = keep it; values in
            between mix clean and ablated linearly.
        senders: the sender sites (the mask's last axis).
        receivers: the receiver sites (the mask's second-to-last axis).
        reference: an `EdgeReference` (a pass of another circuit on the same rows),
            so that the nodes this mask leaves as they were there are not computed.
    """

    ablated: Ablated
    mask: torch.Tensor
    senders: Sequence[Site]
    receivers: Sequence[Site]
    reference: EdgeReference | None = None

    @staticmethod
    def all_edges(shape: ModelShape) -> EdgeSet:
        """The canonical senders and receivers of a model; see `EdgeSet.build`."""
        return EdgeSet.build(shape)

    @classmethod
    def from_set(cls, edge_set: EdgeSet, ablated: Ablated, mask: torch.Tensor,
                 reference: EdgeReference | None = None) -> "EdgePatch":
        """An edge patch over an `EdgeSet`'s senders and receivers."""
        return cls(ablated, mask, edge_set.senders, edge_set.receivers, reference)


@dataclass(frozen=True, eq=False)
class CleanPass:
    """A plain forward pass kept so that later edge-patched passes of the same prompts can
    resume from it at a layer (`LoadedModel.run(..., resume=(clean, start))`): below
    `start` nothing changes, so those layers are not computed again.

    Made by `LoadedModel.clean_pass`. Attributes:
        blocks: what each transformer block returned (the stream entering the next).
        senders: site -> [B, T, D]: the senders' outputs (the deltas of the senders below
            `start` are read from these).
    """

    blocks: tuple
    senders: dict

    def rows(self, index: torch.Tensor) -> "CleanPass":
        """The same pass for batch rows `index` (prompts repeated along the batch)."""
        def pick(value):
            if isinstance(value, torch.Tensor):
                return value.index_select(0, index.to(value.device))
            if isinstance(value, tuple):
                return tuple(pick(v) for v in value)
            return value
        return CleanPass(tuple(pick(b) for b in self.blocks), {s: pick(v) for s, v in self.senders.items()})

    def nbytes(self) -> int:
        def size(value):
            if isinstance(value, torch.Tensor):
                return value.element_size() * value.numel()
            return sum(size(v) for v in value) if isinstance(value, tuple) else 0
        return sum(size(b) for b in self.blocks) + sum(size(v) for v in self.senders.values())


@dataclass(frozen=True, slots=True, eq=False)
class Run:
    """What one forward pass gives back.

    Attributes:
        logits: [B, T, V].
        cache: the captured sites' values (as they were in this pass, patches included).
        deltas: under edge patches without gradients, sender -> [B, T, D]: its output in
            this pass minus its ablated value, for every sender with an ablated edge (views
            of a buffer the next edge-patched pass overwrites: copy what you keep; for an
            `EdgeReference`; a node the pass took from its reference gives the reference's
            own tensor, which may hold fewer rows, repeated along the batch). With
            `logits_at=` the last layer's hold only at that token.
        deltas_at: that token per row, or None (every token holds).
    """

    logits: torch.Tensor
    cache: dict[Site, torch.Tensor]
    deltas: dict[Site, torch.Tensor] = field(default_factory=dict)
    deltas_at: torch.Tensor | None = None

    def __getitem__(self, site: Site) -> torch.Tensor:
        try:
            return self.cache[site]
        except KeyError as exc:
            have = ", ".join(str(s) for s in self.cache) or "none"
            raise ModelError(
                f"{site} was not captured in this run",
                code="model.not-captured",
                hint=f"pass it in capture=(...); captured: {have}",
            ) from exc
