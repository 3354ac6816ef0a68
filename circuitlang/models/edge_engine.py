"""Edge patching's bookkeeping: an `EdgePatch` prepared for one batch of one forward pass.

Takes a `LoadedModel`, an `EdgePatch` and the batch's shape; gives `_Edges`, which the
run engine's hooks (`circuitlang.models.run`) fill and read.

Edge patches keep a buffer `delta[S, B, T, D] = current_out_s - ablated_out_s`, filled
as each sender is computed (a layer's heads straight from `z @ W_O` into it); senders are
sorted in computation order, so the ones a receiver can see are a prefix. The receivers
that read one stream (a layer's q/k/v inputs, an MLP's input, the logits' stream) are
grouped by their mask rows: a row with nothing ablated costs nothing, a fully ablated
row is the stream minus a running sum of the deltas, a row that differs from one of
those in a few senders only reads just those senders' deltas (`_sparse_row`: ACDC's
rows, most edges ablated and a few kept), and the remaining distinct rows are one GEMM
`x - coef @ delta[:prefix]`. The attention norm reads the input most q/k/v
units share; every other unit's columns are written from its own input, and a
projection whose every unit has its own input does not run at all. Large buffers are
reused between runs on CPU (`LoadedModel.free_buffers`). A mask that requires grad
keeps every row in the GEMM so attribution gets d(metric)/d(mask) everywhere.

With an `EdgeReference` (another circuit's pass over the same rows: ACDC's last accepted
state), the heads and MLPs whose inputs are as in that pass are not computed
(`circuitlang.models.edge_reference`): their deltas are copied from it into the buffer
(`_Edges.put_reused`), and a reused MLP's output is its reference one (`reused_output`).
"""
from __future__ import annotations

import dataclasses
import functools
import weakref
from collections import OrderedDict, defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from circuitlang.errors import ModelError
from circuitlang import topology
from circuitlang.models.interventions import EdgePatch, sender_key
from circuitlang.sites import Channel, Embed, Head, Mlp

if TYPE_CHECKING:  # pragma: no cover
    from circuitlang.models.load import LoadedModel

from circuitlang.models.patches import check_site


# ---- edge bookkeeping ---------------------------------------------------------------
CLEAN, ABLATED, MIXED = "clean", "ablated", "mixed"


@dataclass
class _Group:
    """Receivers that read one stream at one sender prefix: a layer's q/k/v inputs, an MLP's
    input, or the logits' stream.

    Receivers with identical mask rows (over the whole batch) share one input, computed
    once. A row is `clean` (no edge ablated: the stream itself), `ablated` (every edge
    in the prefix ablated: the stream minus the running sum of deltas) or `mixed` (one
    matmul row of `coef @ delta`). A mixed row that differs from clean or from ablated
    in a few senders only is `sparse`: that stream (or the ablated one) corrected by those
    senders' deltas alone, so the deltas of the others are not read (ACDC's rows: most
    edges ablated, a few kept)."""

    prefix: int
    inverse: list[int]  # receiver (group order) -> distinct row
    kinds: list[str]  # per distinct row
    coef: torch.Tensor | None  # the dense mixed rows' masks: [B|1, k, P] or [B, T, k, P]
    mixed: list[int]  # distinct row of each coef row
    sparse: list[tuple[int, bool, list[int], torch.Tensor]] = dataclasses.field(default_factory=list)
    # (distinct row, from the ablated stream, the senders it reads, their weights [B|1, n]):
    # the row is base - sum_n weight_n * delta_n, base the stream or the ablated stream
    distinct: torch.Tensor | None = None  # the distinct mask rows, flattened [n, (B|1) * (T) * prefix]

    def row_key(self, j: int) -> bytes:
        """Distinct row `j`'s mask, as bytes (with the prefix's senders, it fixes the input)."""
        if self.kinds[j] == CLEAN or self.distinct is None:
            return b"clean"
        return self.distinct[j].cpu().numpy().tobytes()

    def counts(self) -> list[int]:
        out = [0] * len(self.kinds)
        for j in self.inverse:
            out[j] += 1
        return out


def _group(mask: torch.Tensor, rows: list[int], prefix: int, differentiable: bool = False) -> _Group:
    """Find the distinct mask rows of `rows` (mask unexpanded: [B|1, R, S] or [B, T, R, S]).
    A mask that needs gradients keeps every row as a matmul row."""
    sub = mask[..., rows, :prefix]
    n = len(rows)
    if differentiable:
        return _Group(prefix, list(range(n)), [MIXED] * n, sub, list(range(n)))
    key = sub.movedim(-2, 0).reshape(n, -1)
    if key.shape[1] == 0:
        return _Group(prefix, [0] * n, [CLEAN], None, [])
    uniq, inverse = torch.unique(key, dim=0, return_inverse=True)
    kinds = []
    for row in uniq:
        if not bool(row.any()):
            kinds.append(CLEAN)
        elif bool((row == 1).all()):
            kinds.append(ABLATED)
        else:
            kinds.append(MIXED)
    mixed = [j for j, k in enumerate(kinds) if k == MIXED]
    coef = None
    sparse = []
    if mixed:
        first = [int((inverse == j).nonzero()[0]) for j in mixed]
        coef = sub[..., first, :].contiguous()
        if coef.dim() == 3:
            dense = []
            for i, j in enumerate(mixed):
                found = _sparse_row(coef[:, i], prefix)
                if found is None:
                    dense.append(i)
                else:
                    sparse.append((j, *found))
            if len(dense) < len(mixed):
                mixed = [mixed[i] for i in dense]
                coef = coef[:, dense].contiguous() if dense else None
    return _Group(prefix, inverse.tolist(), kinds, coef, mixed, sparse, uniq)


def _sparse_row(row: torch.Tensor, prefix: int) -> tuple[bool, list[int], torch.Tensor] | None:
    """A mixed mask row [B|1, P] as (from the ablated stream, senders, weights) when it
    reads few enough senders to beat one GEMM over all P (each sender read costs about
    three passes over a stream, the GEMM one per sender), else None."""
    kept = (row != 0).any(0)
    cut = (row != 1).any(0)
    ablated = int(cut.sum()) < int(kept.sum())
    which = (cut if ablated else kept).nonzero()[:, 0]
    extra = 1 if ablated else 0  # the ablated stream: one more pass (its running sum is shared)
    if 3 * (len(which) + extra) >= prefix:
        return None
    weights = row[:, which] - (1.0 if ablated else 0.0)
    return ablated, which.tolist(), weights.contiguous()


class _Slots:
    """The delta buffer under autograd: one tensor per sender, stacked when read (writing
    into one shared buffer would change tensors autograd saved)."""

    def __init__(self, n: int):
        self.items: list[torch.Tensor | None] = [None] * n

    def __setitem__(self, key, value: torch.Tensor) -> None:
        if isinstance(key, int):
            self.items[key] = value
            return
        index = range(len(self.items))[key] if isinstance(key, slice) else key.tolist()
        for j, i in enumerate(index):
            self.items[i] = value[j]

    def __getitem__(self, key: slice) -> torch.Tensor:
        return torch.stack(self.items[key])


@dataclass
class _Edges:
    """An `EdgePatch` prepared for one batch: senders sorted, receivers grouped, buffers."""

    ablated: torch.Tensor  # [B, S_all, T, D], as given (indexed through the slots' sources)
    delta: torch.Tensor | _Slots  # [S, B, T, D]: current_out_s - ablated_out_s, filled as senders run
    scratch: torch.Tensor | None  # reused for the mixed receivers' inputs (None under autograd)
    embed_slot: int | None
    head_slots: dict[int, tuple[Any, Any]]  # layer -> (heads, slots)
    mlp_slot: dict[int, int]
    attn: dict[int, _Group]  # layer -> its q/k/v receivers
    qkv_recv: dict[int, dict[Channel, list[tuple[int, int]]]]  # layer -> ch -> [(unit, index in group)]
    attn_base: dict[int, int]  # layer -> distinct row the attention norm reads (others: per unit)
    mlp: dict[int, _Group]
    logits: _Group | None
    sources: tuple = ()  # per kept sender (sorted order): its index in the edge patch's senders
    sites: tuple = ()  # per kept sender (sorted order): its site
    reused: dict = dataclasses.field(default_factory=dict)  # head/MLP site -> its reference delta (`edge_reference.reused_nodes`)
    index: dict = dataclasses.field(default_factory=dict)  # sender site -> its index in the patch's senders
    _cum: tuple[int, torch.Tensor | None] = (0, None)
    _ablated_at: torch.Tensor | None = None  # [B, S_all, D] at the logits' token (`ablated_at`)

    def cum(self, prefix: int, like: torch.Tensor) -> torch.Tensor:
        """sum of delta over the first `prefix` senders (kept as a running sum)."""
        done, total = self._cum
        if total is None or done > prefix:
            done, total = 0, torch.zeros_like(like)
        if prefix > done:
            total = total + self.delta[done:prefix].sum(0)
        self._cum = (prefix, total)
        return total

    def ablated_of(self, senders) -> torch.Tensor:
        """[B, n, T, D]: the ablated values of `senders` (their sources: a slice, a view;
        else an index_select, several times faster than indexing with a tensor)."""
        if isinstance(senders, slice):
            return self.ablated[:, senders]
        return self.ablated.index_select(1, torch.as_tensor(senders, device=self.ablated.device))

    def ablated_at(self, senders, at: torch.Tensor) -> torch.Tensor:
        """[n, B, D]: the ablated values of `senders` (sources) at token `at[b]` of each row b
        (every sender's gathered once per pass)."""
        if self._ablated_at is None:
            a = self.ablated
            b, n_all, t, d = a.shape
            at = at.to(a.device)
            if a.stride(0) == 0:  # one value for every row (mean, zero)
                self._ablated_at = a[0].index_select(1, at).transpose(0, 1)
            else:
                rows = torch.arange(b, device=a.device)
                flat = ((rows * n_all)[:, None] + torch.arange(n_all, device=a.device)[None]) * t + at[:, None]
                self._ablated_at = a.reshape(b * n_all * t, d).index_select(0, flat.reshape(-1)).view(b, n_all, d)
        return self._ablated_at[:, senders].transpose(0, 1)

    def reused_output(self, site, at: torch.Tensor | None = None) -> torch.Tensor:
        """A reused node's output in this pass, its reference delta plus its ablated value:
        [B, T, D], or [B, 1, D] at token `at[b]` of each row b."""
        delta = self.reused[site]
        i = self.index[site]
        b, n = self.ablated.shape[0], delta.shape[0]
        if at is None:
            return (self.ablated[:, i].view(b // n, n, *delta.shape[1:]) + delta).view(b, *delta.shape[1:])
        rows = torch.arange(b, device=delta.device)
        at = at.to(delta.device)
        return (delta[rows % n, at] + self.ablated[rows, i, at])[:, None]

    def put_reused(self, slot: int, site, at: torch.Tensor | None = None) -> None:
        """Write a reused node's reference delta into its slot (the reference's rows repeat
        along the batch when it has fewer), at token `at[b]` of each row b only when given."""
        delta = self.reused[site]
        n = delta.shape[0]
        if at is not None:
            rows = torch.arange(len(at), device=delta.device)
            self.put_at([slot], at, delta[rows % n, at.to(delta.device)][None])
            return
        self.delta[slot].view(-1, *delta.shape).copy_(delta.expand(len(self.delta[slot]) // n, *delta.shape))

    def put_at(self, slots, at: torch.Tensor, value: torch.Tensor) -> None:
        """Write the deltas of `slots` at token `at[b]` of each row b only: value [n, B, D].
        Their other tokens keep what the buffer held, which nothing reads (`inputs_at`)."""
        device = self.delta.device
        index = torch.arange(slots.start, slots.stop, device=device) if isinstance(slots, slice) else \
            torch.as_tensor(slots, device=device)
        rows = torch.arange(len(at), device=device)
        self.delta[index[:, None], rows[None], at.to(device)[None]] = value

    def inputs_at(self, x: torch.Tensor, group: _Group, at: torch.Tensor) -> list[torch.Tensor | None]:
        """`inputs` at token `at[b]` of each row b only: [B, 1, D] per distinct row (None:
        `x` there), from the deltas there (the last block's senders write only those)."""
        b, t, d = x.shape
        at = at.to(x.device)
        rows = torch.arange(b, device=x.device)
        flat = rows * t + at
        delta = self.delta[:group.prefix]
        delta = delta.reshape(len(delta), b * t, d).index_select(1, flat)[:, :, None]
        one = dataclasses.replace(self, delta=delta, scratch=None, _cum=(0, None))
        if group.coef is not None and group.coef.dim() == 4:  # per-position masks: that token's
            group = dataclasses.replace(group, coef=group.coef[rows, at][:, None])
        return one.inputs(x.reshape(b * t, d).index_select(0, flat)[:, None], group)

    def inputs(self, x: torch.Tensor, group: _Group, only: set[int] | None = None) -> list[torch.Tensor | None]:
        """Per distinct row: the receivers' input stream (None: `x` itself, or a row not in
        `only` when given)."""
        out: list[torch.Tensor | None] = [None] * len(group.kinds)
        for j, kind in enumerate(group.kinds):
            if kind == ABLATED and (only is None or j in only):
                out[j] = x - self.cum(group.prefix, x)
        if group.coef is not None and (only is None or not only.isdisjoint(group.mixed)):
            for j, xs in zip(group.mixed, _mix(x, group.coef, self.delta[:group.prefix], self.scratch)):
                out[j] = xs
        used = len(group.mixed) if group.coef is not None else 0  # the sparse rows' scratch slots follow
        b, t, d = x.shape
        n = b * t * d
        for slot, (j, ablated, senders, weights) in enumerate(group.sparse, start=used):
            if only is not None and j not in only:
                continue
            base = x - self.cum(group.prefix, x) if ablated else x
            if self.scratch is None:  # (grad enabled for other reasons: no reused buffer)
                row = base.clone()
            else:
                row = self.scratch[slot * n:(slot + 1) * n].view(b, t, d)
                row.copy_(base)
            for i, p in enumerate(senders):  # row -= weight * delta_p, per batch row
                row.addcmul_(self.delta[p], weights[:, i].view(-1, 1, 1), value=-1.0)
            out[j] = row
        return out


def _mix(x: torch.Tensor, coef: torch.Tensor, delta: torch.Tensor, scratch: torch.Tensor | None
         ) -> list[torch.Tensor]:
    """`x - coef @ delta` per coef row ([B, T, D] each), for coef [B|1, k, P] or [B, T, k, P]
    and delta [P, B, T, D]; written into `scratch` when given (no autograd)."""
    b, t, d = x.shape
    k, p = coef.shape[-2:]
    if coef.dim() == 4:
        return list((x.unsqueeze(1) - torch.einsum("pbtd,btkp->bktd", delta, coef)).unbind(1))
    if scratch is None:
        return list((x.unsqueeze(1) - torch.einsum("pbtd,bkp->bktd", delta, coef.expand(b, k, p))).unbind(1))
    n = b * t * d
    if coef.shape[0] == 1:  # one circuit for the whole batch: a single GEMM
        out = scratch[: k * n].view(k, n)
        torch.addmm(x.reshape(1, n).expand(k, n), coef[0], delta.reshape(p, n), alpha=-1.0, out=out)
        return list(out.view(k, b, t, d).unbind(0))
    out = scratch[: k * n].view(k, b, t * d)  # receiver-major: each input contiguous
    flat_x, flat_d = x.reshape(b, 1, t * d), delta.reshape(p, b, t * d)
    for i in range(b):  # a circuit per row: one GEMM each
        torch.addmm(flat_x[i].expand(k, t * d), coef[i], flat_d[:, i], alpha=-1.0, out=out[:, i])
    return list(out.view(k, b, t, d).unbind(0))


def _buffer(lm: "LoadedModel", name: str, numel: int, dtype, device) -> torch.Tensor | None:
    """A flat scratch tensor of at least `numel` elements, or None under autograd.

    On CPU it is kept on the model across runs (a fresh large allocation is fresh pages,
    and faulting them in costs as much as the arithmetic); `LoadedModel.free_buffers()`
    lets it go. Elsewhere the framework's caching allocator already reuses memory."""
    if torch.is_grad_enabled():
        return None
    if torch.device(device).type != "cpu":
        return torch.empty(numel, dtype=dtype, device=device)
    key = (name, dtype, str(device))
    buf = lm.buffers.get(key)
    if buf is None or buf.numel() < numel:
        lm.buffers.pop(key, None)
        buf = torch.empty(numel, dtype=dtype, device=device)
        lm.buffers[key] = buf
    return buf[:numel]


@functools.lru_cache(maxsize=32)
def _valid_matrix(senders: tuple, receivers: tuple, shape) -> torch.Tensor:
    """BoolTensor [R, S]: which pairs are edges (cached: edge sets are reused across runs)."""
    return torch.tensor(
        [[topology.edge_exists(shape, s, r) for s in senders] for r in receivers], dtype=torch.bool
    ).reshape(len(receivers), len(senders))


def qkv_unit(receiver: Head, kv_group: int) -> int:
    """The projection unit a head's q/k/v receiver names: its head for the query; under
    grouped-query attention its key/value head (`kv_group` query heads share one)."""
    return receiver.head if receiver.channel is Channel.Q else receiver.head // kv_group


def _check_reference(ref, n_r: int, n_s: int, batch: int, tokens: int, d_model: int) -> None:
    """An `EdgeReference` fits the patch: a mask [R, S] and deltas [n, T, D] whose n rows,
    repeated, are the batch's."""
    if tuple(ref.mask.shape) != (n_r, n_s):
        raise ModelError(f"the edge reference's mask has shape {tuple(ref.mask.shape)}", code="model.bad-reference",
                         hint=f"expected [{n_r}, {n_s}]: one circuit over the patch's receivers and senders")
    for site, delta in ref.deltas.items():
        if tuple(delta.shape[1:]) != (tokens, d_model) or batch % max(1, delta.shape[0]):
            raise ModelError(f"the edge reference's delta of {site} has shape {tuple(delta.shape)}",
                             code="model.bad-reference",
                             hint=f"expected [n, {tokens}, {d_model}] with this pass's {batch} batch rows those "
                                  "n rows repeated (n = the batch, or a divisor of it)")


def _prepare_edges(lm: "LoadedModel", edges: EdgePatch, x_shape: tuple[int, int], dtype, device,
                   start: int = 0, resumed=None) -> _Edges:
    shape, adapter = lm.shape, lm.adapter
    senders, receivers = list(edges.senders), list(edges.receivers)
    for site in senders + receivers:
        check_site(lm, site)
    n_s, n_r = len(senders), len(receivers)
    batch, tokens = x_shape
    mask = edges.mask
    if mask.dim() not in (3, 4) or mask.shape[-2:] != (n_r, n_s) or mask.shape[0] not in (1, batch) or (
        mask.dim() == 4 and mask.shape[1] != tokens
    ):
        raise ModelError(
            f"edge mask has shape {tuple(mask.shape)}",
            code="model.bad-mask",
            hint=f"expected [{batch}, {n_r}, {n_s}] or [{batch}, {tokens}, {n_r}, {n_s}] (receivers, senders)",
        )
    order = sorted(range(n_s), key=lambda i: sender_key(senders[i]))
    if len(set(senders)) != n_s:
        raise ModelError("edge patch lists a sender twice", code="model.duplicate-site")
    sorted_senders = [senders[i] for i in order]
    mask = mask.to(device=device, dtype=dtype)
    if order != list(range(n_s)):
        mask = mask.index_select(-1, torch.tensor(order, dtype=torch.long, device=device))
    valid = _valid_matrix(tuple(sorted_senders), tuple(receivers), lm.shape).to(device)
    bad = (mask != 0) & ~valid
    if bool(bad.any()):
        where = bad.nonzero()[0]
        r, s = int(where[-2]), int(where[-1])
        raise ModelError(
            f"edge {sorted_senders[s]} -> {receivers[r]} is not an edge of this model",
            code="model.bad-edge",
            hint="a sender must be computed before its receiver reads the residual stream",
        )
    d_model = shape.d_model
    if edges.reference is not None:
        _check_reference(edges.reference, n_r, n_s, batch, tokens, d_model)

    # Senders whose every edge is kept cost nothing: drop them (an all-zero mask is free),
    # unless the mask wants gradients (attribution needs them at 0 too).
    # A patch with a reference keeps them all, so that its `Run.deltas` can serve as the next one.
    differentiable = mask.requires_grad and torch.is_grad_enabled()
    active = (mask != 0).reshape(-1, n_s).any(0) | differentiable | (edges.reference is not None)
    kept = active.nonzero()[:, 0].tolist()
    if len(kept) < n_s:
        mask = mask.index_select(-1, torch.tensor(kept, dtype=torch.long, device=device))
    source = [order[i] for i in kept]  # where each kept sender's ablated value is
    sorted_senders = [sorted_senders[i] for i in kept]
    n_s = len(sorted_senders)
    want = f"[{batch}, {len(senders)}, {tokens}, {d_model}] (batch may be 1)"
    if isinstance(edges.ablated, torch.Tensor):
        ablated = edges.ablated.to(device=device, dtype=dtype)
        if ablated.dim() != 4 or ablated.shape[0] not in (1, batch) or tuple(ablated.shape[1:]) != (
                len(senders), tokens, d_model):
            raise ModelError(f"ablated sender values have shape {tuple(ablated.shape)}",
                             code="model.bad-ablated", hint=f"expected {want}, in `senders` order")
    else:
        missing = [str(s) for s in sorted_senders if s not in edges.ablated]
        if missing:
            raise ModelError(f"edge patch has no ablated value for {', '.join(missing[:5])}",
                             code="model.bad-ablated", hint="capture every sender in the ablation run")
        values = [edges.ablated[s].to(device=device, dtype=dtype) for s in sorted_senders]
        for s, v in zip(sorted_senders, values):
            if v.dim() != 3 or v.shape[0] not in (1, batch) or tuple(v.shape[1:]) != (tokens, d_model):
                raise ModelError(f"ablated value of {s} has shape {tuple(v.shape)}", code="model.bad-ablated",
                                 hint=f"expected [{batch}, {tokens}, {d_model}] (batch may be 1)")
        ablated = torch.stack([v.expand(batch, tokens, d_model) for v in values], 1) if values else \
            torch.empty(batch, 0, tokens, d_model, dtype=dtype, device=device)
        source = list(range(n_s))
    if ablated.shape[0] == 1 and batch > 1:
        ablated = ablated.expand(batch, *ablated.shape[1:])

    keys = [sender_key(s) for s in sorted_senders]
    embed_slot = None
    head_slots: dict[int, tuple[list[int], list[int], list[int]]] = defaultdict(lambda: ([], [], []))
    mlp_slot: dict[int, tuple[int, int]] = {}
    for i, s in enumerate(sorted_senders):
        if isinstance(s, Embed):
            embed_slot = (i, source[i])
        elif isinstance(s, Head):
            hs, slots, srcs = head_slots[s.layer]
            hs.append(s.head)
            slots.append(i)
            srcs.append(source[i])
        else:
            mlp_slot[s.layer] = (i, source[i])
    attn_prefix = {l: sum(k[0] < l for k in keys) for l in range(shape.n_layers)}
    if shape.parallel_residual:
        mlp_prefix = dict(attn_prefix)
    else:
        mlp_prefix = {l: sum(k[:2] <= (l, 0) for k in keys) for l in range(shape.n_layers)}

    # receivers, grouped by the stream they read; identical mask rows share one input
    group_mask = mask[:1] if mask.dim() == 3 and mask.shape[0] == 1 else mask.expand(batch, *mask.shape[1:])
    kv_group = adapter.kv_group()
    qkv_rows: dict[int, list[int]] = defaultdict(list)
    qkv_recv: dict[int, dict[Channel, list[tuple[int, int]]]] = defaultdict(lambda: defaultdict(list))
    seen: set[tuple[int, Channel, int]] = set()
    mlp: dict[int, _Group] = {}
    logits = None
    for r, site in enumerate(receivers):
        if isinstance(site, Head):
            unit = qkv_unit(site, kv_group)
            if (site.layer, site.channel, unit) in seen:
                raise ModelError(
                    f"{site}: query heads {unit * kv_group}-{unit * kv_group + kv_group - 1} share one "
                    f"{site.channel.value} head (grouped-query attention)",
                    code="model.gqa-receiver",
                    hint=f"name one head per group, e.g. head {site.layer}.{unit * kv_group}.{site.channel.value}",
                )
            seen.add((site.layer, site.channel, unit))
            qkv_recv[site.layer][site.channel].append((unit, len(qkv_rows[site.layer])))
            qkv_rows[site.layer].append(r)
        elif isinstance(site, Mlp):
            mlp[site.layer] = _group(group_mask, [r], mlp_prefix[site.layer], differentiable)
        else:
            logits = _group(group_mask, [r], n_s, differentiable)
    attn = {l: _group(group_mask, rows, attn_prefix[l], differentiable) for l, rows in qkv_rows.items()}
    attn_base = {}
    for l, g in attn.items():
        # the attention norm reads the input most of this layer's q/k/v units want; the
        # others get their own columns written. Units no receiver names read the stream.
        # An input shared by only a few units is not worth a whole projection: then, if no
        # unit reads the stream, the projection does not run at all (`_rewrites_every_unit`).
        units = shape.n_heads + 2 * adapter.n_kv_heads
        votes = g.counts()
        clean = units - sum(c for c, k in zip(votes, g.kinds) if k != CLEAN)
        best = max(range(len(votes)), key=lambda j: (votes[j] if g.kinds[j] != CLEAN else -1, -j))
        if g.kinds[best] != CLEAN and votes[best] > clean and 4 * votes[best] >= units:
            attn_base[l] = best
    delta = _buffer(lm, "edge-delta", n_s * batch * tokens * d_model, dtype, device)
    widest = max([len(g.mixed) + len(g.sparse) for g in [*attn.values(), *mlp.values()]]
                 + ([len(logits.mixed) + len(logits.sparse)] if logits is not None else []) + [1])
    delta = _Slots(n_s) if delta is None else delta.view(n_s, batch, tokens, d_model)
    if start:
        done = 0 if isinstance(delta, _Slots) else _clean_prefix(lm, delta, resumed, edges.ablated, sorted_senders,
                                                                  source)
        _resume_below(start, attn, mlp, sorted_senders, keys, source, ablated, delta, resumed, device, done)
    if not isinstance(delta, _Slots):
        _remember_clean_prefix(lm, delta, start, resumed, edges.ablated, sorted_senders, source, keys)
    return _Edges(
        ablated=ablated,
        delta=delta,
        scratch=_buffer(lm, "edge-inputs", widest * batch * tokens * d_model, dtype, device),
        embed_slot=embed_slot,
        head_slots={l: (_as_index(h, device), _as_index(s, device), _as_index(o, device))
                    for l, (h, s, o) in head_slots.items()},
        mlp_slot=mlp_slot,
        attn=attn,
        qkv_recv={l: dict(d) for l, d in qkv_recv.items()},
        attn_base=attn_base,
        mlp=mlp,
        logits=logits,
        sources=tuple(source),
        sites=tuple(sorted_senders),
        index={s: i for i, s in enumerate(senders)},
    )


def _resume_below(start, attn, mlp, senders, keys, source, ablated, delta, clean, device, done: int = 0) -> None:
    """Resuming a clean pass at layer `start`: no receiver below it may read an ablated
    edge, and the deltas of the senders below it come from the clean pass's outputs
    (the first `done` of them are in `delta` already: `_clean_prefix`)."""
    below = [f"mlp {l}" for l, g in mlp.items() if l < start and any(k != CLEAN for k in g.kinds)]
    below += [f"layer {l}'s q/k/v" for l, g in attn.items() if l < start and any(k != CLEAN for k in g.kinds)]
    if below:
        raise ModelError(f"cannot resume at layer {start}: edges into {', '.join(below)} are ablated",
                         code="model.bad-resume", hint="resume at the lowest layer whose receivers change")
    for i, (site, key) in enumerate(zip(senders, keys)):
        if key[0] < start and i >= done:
            value = clean.senders.get(site)
            if value is None:
                raise ModelError(f"the clean pass has no output of {site}", code="model.bad-resume",
                                 hint="make it with LoadedModel.clean_pass over the edge set's senders")
            delta[i] = value.to(device) - ablated[:, source[i]]


# What the reused delta buffer holds between runs: the clean deltas of the first senders,
# written by a resumed run, are the same for the next run resumed from the same clean pass
# with the same ablated values and senders (ACDC's passes, hundreds of them), so they are
# not written again. Key: `_HOLDS` in `LoadedModel.buffers`.
_HOLDS = "edge-delta-holds"


def _holding(delta, clean, ablated, senders, source) -> tuple:
    """(the clean pass, the ablated tensor, the buffer: by identity; the layout: by value).
    The buffer is the tensor `_buffer` keeps (a new one when it grows), not this run's view."""
    base = delta._base if delta._base is not None else delta
    return (weakref.ref(clean), weakref.ref(ablated), weakref.ref(base), tuple(senders), tuple(source),
            tuple(delta.shape), delta.data_ptr())


def _clean_prefix(lm: "LoadedModel", delta, clean, ablated, senders, source) -> int:
    """How many leading senders' clean deltas `delta` holds from the run before for this
    clean pass, ablated tensor and senders (0: none; a dict of ablated values is stacked
    anew each run, so it never matches). The values of a `CleanPass` and of an ablated
    tensor are never changed in place."""
    held = lm.buffers.get(_HOLDS)
    if held is None or not isinstance(ablated, torch.Tensor):
        return 0
    (clean_ref, ablated_ref, base_ref, *layout), count = held
    base = delta._base if delta._base is not None else delta
    if clean_ref() is not clean or ablated_ref() is not ablated or base_ref() is not base:
        return 0
    return count if tuple(layout) == _holding(delta, clean, ablated, senders, source)[3:] else 0


def _remember_clean_prefix(lm: "LoadedModel", delta, start, clean, ablated, senders, source, keys) -> None:
    """After preparing a run on the reused buffer: the senders below `start` hold clean
    deltas for the next run (the run's hooks write only the senders from `start` up);
    a run from the embedding up leaves none."""
    count = sum(k[0] < start for k in keys) if start else 0
    if count and isinstance(ablated, torch.Tensor):
        lm.buffers[_HOLDS] = (_holding(delta, clean, ablated, senders, source), count)
    else:
        lm.buffers.pop(_HOLDS, None)


# The q/k/v columns the first layer of a resumed pass computes, kept between passes: at
# that layer every sender a receiver reads is below the resume layer, so a unit's input is
# fixed by the clean pass, the ablated values and its mask row, and ACDC's next pass
# changes one receiver's row of dozens. Key: `_REUSE` in `LoadedModel.buffers`.
_REUSE = "edge-qkv-reuse"
_REUSE_BYTES = 256 << 20


class ReusedColumns:
    """Projected q/k/v columns by (layer, units, shape, senders, mask row), for one clean
    pass and one ablated tensor (by identity: neither is changed in place), least recently
    used dropped beyond `_REUSE_BYTES`."""

    def __init__(self, clean, ablated):
        self.holding = (weakref.ref(clean), weakref.ref(ablated))
        self.entries: OrderedDict = OrderedDict()
        self.bytes = 0

    def holds(self, clean, ablated) -> bool:
        return self.holding[0]() is clean and self.holding[1]() is ablated

    def get(self, key) -> torch.Tensor | None:
        value = self.entries.get(key)
        if value is not None:
            self.entries.move_to_end(key)
        return value

    def put(self, key, value: torch.Tensor) -> None:
        size = value.numel() * value.element_size()
        if size > _REUSE_BYTES:
            return
        self.entries[key] = value
        self.bytes += size
        while self.bytes > _REUSE_BYTES:
            _, old = self.entries.popitem(last=False)
            self.bytes -= old.numel() * old.element_size()


def reused_columns(lm: "LoadedModel", clean, ablated) -> ReusedColumns | None:
    """The store of projected columns for passes resumed from `clean` with `ablated` (a new,
    empty one when the model's held another's); None for ablated values given as a dict
    (stacked anew each run)."""
    if not isinstance(ablated, torch.Tensor) or clean is None:
        return None
    held = lm.buffers.get(_REUSE)
    if held is None or not held.holds(clean, ablated):
        held = ReusedColumns(clean, ablated)
        lm.buffers[_REUSE] = held
    return held


def _as_index(values: list[int], device) -> torch.Tensor | slice:
    """A slice when the indices are a contiguous run (cheap views), else a LongTensor."""
    if values == list(range(values[0], values[0] + len(values))):
        return slice(values[0], values[0] + len(values))
    return torch.tensor(values, device=device)
