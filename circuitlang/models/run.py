"""The run engine: one forward pass of a HF model with captures, node patches and edge patches.

Takes a `LoadedModel`, token ids, the sites to capture, `Patch`es and an optional
`EdgePatch`; gives a `Run` (logits and the captured values). Everything happens in a
single forward pass of the unmodified HF model, through hooks on the modules the
adapter names; hooks exist only for the duration of the call.

Exactness: every intervention is a *delta* added to the model's own computation,
and a layer with nothing to do is not touched, so an identity intervention (a site
patched with its own value, an all-zero edge mask) reproduces the plain forward pass
bit for bit on CPU fp32. A head's q/k/v input patch adds
`(norm(x_h) - norm(x)) @ W_h` to that head's slice of the (possibly fused) projection;
a head output patch adds `(value - current)` to the attention block's output.

Edge patches keep a buffer `delta[S, B, T, D] = current_out_s - ablated_out_s`, filled
as each sender is computed (a layer's heads straight from `z @ W_O` into it); senders are
sorted in computation order, so the ones a receiver can see are a prefix. The receivers
that read one stream (a layer's q/k/v inputs, an MLP's input, the logits' stream) are
grouped by their mask rows: a row with nothing ablated costs nothing, a fully ablated
row is the stream minus a running sum of the deltas, and the remaining distinct rows
are one GEMM `x - coef @ delta[:prefix]`. The attention norm reads the input most q/k/v
units share; every other unit's columns are written from its own input, and a
projection whose every unit has its own input does not run at all. Large buffers are
reused between runs on CPU (`LoadedModel.free_buffers`). A mask that requires grad
keeps every row in the GEMM so attribution gets d(metric)/d(mask) everywhere.
"""
from __future__ import annotations

import functools
from collections import defaultdict
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable

import torch

from circuitlang.errors import ModelError
from circuitlang.models import compat
from circuitlang.models.adapters.base import linear_bias, linear_weight_in_out
from circuitlang.models.interventions import EdgePatch, Patch, Run, edge_is_valid, sender_key
from circuitlang.sites import Channel, Embed, Head, Logits, Mlp, MlpIn, PosEmbed, Resid, Site, TokenEmbed

if TYPE_CHECKING:  # pragma: no cover
    from circuitlang.models.load import LoadedModel

_QKV = (Channel.Q, Channel.K, Channel.V)


# ---- checking sites and applying patch values ---------------------------------------
def check_site(lm: "LoadedModel", site: Site) -> None:
    """Raise ModelError unless `site` exists in this model."""
    shape = lm.shape
    if isinstance(site, Head):
        if not 0 <= site.layer < shape.n_layers:
            raise ModelError(
                f"{site}: layer {site.layer} out of range",
                code="model.bad-site",
                hint=f"model has layers 0-{shape.n_layers - 1}",
            )
        if not 0 <= site.head < shape.n_heads:
            raise ModelError(
                f"{site}: head {site.head} out of range",
                code="model.bad-site",
                hint=f"model has heads 0-{shape.n_heads - 1} per layer",
            )
    elif isinstance(site, (Mlp, MlpIn)):
        if not shape.has_mlp:
            raise ModelError(f"{site}: model {shape.name!r} is attention-only", code="model.bad-site",
                             hint="use head, embed, resid or logits sites")
        if not 0 <= site.layer < shape.n_layers:
            raise ModelError(f"{site}: layer out of range", code="model.bad-site",
                             hint=f"model has layers 0-{shape.n_layers - 1}")
    elif isinstance(site, Resid):
        if not 0 <= site.layer <= shape.n_layers:
            raise ModelError(f"{site}: layer out of range", code="model.bad-site",
                             hint=f"resid takes 0-{shape.n_layers} ({shape.n_layers} = final stream)")
    elif isinstance(site, PosEmbed):
        if not lm.adapter.has_pos_embed:
            raise ModelError(f"{site}: {shape.architecture} models have no learned positional embedding",
                             code="model.bad-site", hint="rotary models: use embed or embed.token")
    elif not isinstance(site, (Embed, TokenEmbed, Logits)):
        raise ModelError(f"{site!r} is not a site", code="model.bad-site",
                         hint="sites are Embed, TokenEmbed, PosEmbed, Head, Mlp, MlpIn, Resid, Logits")


def apply_patch(current: torch.Tensor, patch: Patch) -> torch.Tensor:
    """The site's new value: `current` [B, T, ...] with `patch` applied (never in place)."""
    value = patch.value.to(device=current.device, dtype=current.dtype)
    batch = current.shape[0]
    rows = patch.rows
    if patch.positions is None:
        if value.shape[1:] != current.shape[1:] or value.shape[0] not in (1, batch):
            raise ModelError(
                f"patch value for {patch.site} has shape {tuple(value.shape)}",
                code="model.bad-patch",
                hint=f"expected {tuple(current.shape)} (or batch 1), or pass positions",
            )
        new = value.expand_as(current)
        if rows is None:
            return new
        keep = rows.to(current.device).view(batch, *([1] * (current.dim() - 1)))
        return torch.where(keep, new, current)
    pos = patch.positions.to(current.device).long()
    one = pos.dim() == 1
    if one:
        pos = pos[:, None]
    if pos.dim() != 2 or pos.shape[0] != batch:
        raise ModelError(f"patch positions for {patch.site} have shape {tuple(patch.positions.shape)}",
                         code="model.bad-patch", hint=f"expected [{batch}] or [{batch}, k]")
    if one and value.dim() == current.dim() - 1:
        value = value[:, None]
    want = (batch, pos.shape[1], *current.shape[2:])
    if tuple(value.shape) != want:
        raise ModelError(f"patch value for {patch.site} has shape {tuple(patch.value.shape)}",
                         code="model.bad-patch", hint=f"expected {want[:1] + want[2:] if one else want}")
    bidx = torch.arange(batch, device=current.device)[:, None].expand_as(pos)
    if rows is not None:
        sel = rows.to(current.device).bool()
        bidx, pos, value = bidx[sel], pos[sel], value[sel]
    new = current.clone()
    new[bidx, pos] = value
    return new


def _first(args: tuple, kwargs: dict, name: str) -> torch.Tensor:
    return args[0] if args else kwargs[name]


def _replace_first(args: tuple, kwargs: dict, name: str, value: torch.Tensor):
    if args:
        return (value, *args[1:]), kwargs
    kwargs = dict(kwargs)
    kwargs[name] = value
    return args, kwargs


# ---- edge bookkeeping ---------------------------------------------------------------
CLEAN, ABLATED, MIXED = "clean", "ablated", "mixed"


@dataclass
class _Group:
    """Receivers that read one stream at one sender prefix: a layer's q/k/v inputs, an MLP's
    input, or the logits' stream.

    Receivers with identical mask rows (over the whole batch) share one input, computed
    once. A row is `clean` (no edge ablated: the stream itself), `ablated` (every edge
    in the prefix ablated: the stream minus the running sum of deltas) or `mixed` (one
    matmul row of `coef @ delta`)."""

    prefix: int
    inverse: list[int]  # receiver (group order) -> distinct row
    kinds: list[str]  # per distinct row
    coef: torch.Tensor | None  # the mixed rows' masks: [B|1, k, P] or [B, T, k, P]
    mixed: list[int]  # distinct row of each coef row

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
    if mixed:
        first = [int((inverse == j).nonzero()[0]) for j in mixed]
        coef = sub[..., first, :].contiguous()
    return _Group(prefix, inverse.tolist(), kinds, coef, mixed)


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
    _cum: tuple[int, torch.Tensor | None] = (0, None)

    def cum(self, prefix: int, like: torch.Tensor) -> torch.Tensor:
        """sum of delta over the first `prefix` senders (kept as a running sum)."""
        done, total = self._cum
        if total is None or done > prefix:
            done, total = 0, torch.zeros_like(like)
        if prefix > done:
            total = total + self.delta[done:prefix].sum(0)
        self._cum = (prefix, total)
        return total

    def inputs(self, x: torch.Tensor, group: _Group) -> list[torch.Tensor | None]:
        """Per distinct row: the receivers' input stream (None: `x` itself)."""
        out: list[torch.Tensor | None] = [None] * len(group.kinds)
        for j, kind in enumerate(group.kinds):
            if kind == ABLATED:
                out[j] = x - self.cum(group.prefix, x)
        if group.coef is not None:
            for j, xs in zip(group.mixed, _mix(x, group.coef, self.delta[:group.prefix], self.scratch)):
                out[j] = xs
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
def _valid_matrix(senders: tuple, receivers: tuple, parallel_residual: bool) -> torch.Tensor:
    """BoolTensor [R, S]: which pairs are edges (cached: edge sets are reused across runs)."""
    return torch.tensor(
        [[edge_is_valid(s, r, parallel_residual) for s in senders] for r in receivers], dtype=torch.bool
    ).reshape(len(receivers), len(senders))


def _prepare_edges(lm: "LoadedModel", edges: EdgePatch, x_shape: tuple[int, int], dtype, device) -> _Edges:
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
    valid = _valid_matrix(tuple(sorted_senders), tuple(receivers), adapter.parallel_residual).to(device)
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

    # Senders whose every edge is kept cost nothing: drop them (an all-zero mask is free),
    # unless the mask wants gradients (attribution needs them at 0 too).
    differentiable = mask.requires_grad and torch.is_grad_enabled()
    active = (mask != 0).reshape(-1, n_s).any(0) | differentiable
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
    if adapter.parallel_residual:
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
            unit = site.head if site.channel is Channel.Q else site.head // kv_group
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
    widest = max([len(g.mixed) for g in attn.values()] + [1])
    return _Edges(
        ablated=ablated,
        delta=_Slots(n_s) if delta is None else delta.view(n_s, batch, tokens, d_model),
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
    )


def _as_index(values: list[int], device) -> torch.Tensor | slice:
    """A slice when the indices are a contiguous run (cheap views), else a LongTensor."""
    if values == list(range(values[0], values[0] + len(values))):
        return slice(values[0], values[0] + len(values))
    return torch.tensor(values, device=device)


# ---- the run -----------------------------------------------------------------------
@dataclass
class _Plan:
    capture: set[Site]
    patches: dict[Any, list[Patch]] = field(default_factory=lambda: defaultdict(list))
    edges: _Edges | None = None
    cache: dict[Site, torch.Tensor] = field(default_factory=dict)
    resid_pre: dict[int, torch.Tensor] = field(default_factory=dict)
    z: dict[int, torch.Tensor] = field(default_factory=dict)
    v: dict[int, torch.Tensor] = field(default_factory=dict)
    attn_in: dict[int, list[torch.Tensor | None]] = field(default_factory=dict)  # edge inputs per layer

    def wants(self, site: Site) -> bool:
        return site in self.capture

    def layer_heads(self, layer: int, channels: Iterable[Channel]) -> bool:
        chans = set(channels)
        return any(isinstance(s, Head) and s.layer == layer and s.channel in chans
                   for s in list(self.capture) + [p.site for ps in self.patches.values() for p in ps])


def run_model(
    lm: "LoadedModel",
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    capture: Iterable[Site] = (),
    patches: Iterable[Patch] = (),
    edges: EdgePatch | None = None,
    cache: Any = None,
) -> Run:
    """One forward pass with captures and interventions; see `LoadedModel.run`."""
    device = lm.device
    input_ids = torch.as_tensor(input_ids).to(device)
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.dim() != 2:
        raise ModelError(f"input_ids has shape {tuple(input_ids.shape)}", code="model.bad-input",
                         hint="expected [batch, tokens]")
    plan = _Plan(capture=set(capture))
    for site in plan.capture:
        check_site(lm, site)
    for patch in patches:
        if not isinstance(patch, Patch):
            raise ModelError(f"{patch!r} is not a Patch", code="model.bad-patch",
                             hint="pass Patch(site, value, positions=None)")
        check_site(lm, patch.site)
        plan.patches[patch.site].append(patch)
    if edges is not None:
        plan.edges = _prepare_edges(lm, edges, tuple(input_ids.shape), lm.dtype, device)

    with ExitStack() as stack:
        for module, hook, kind in _hooks(lm, plan):
            if kind == "skip":
                n_out = linear_weight_in_out(module).shape[1]
                module.forward = lambda x, *a, n_out=n_out, **k: x.new_empty(*x.shape[:-1], n_out)
                stack.callback(delattr, module, "forward")
                continue
            if kind == "pre":
                handle = module.register_forward_pre_hook(hook, with_kwargs=True)
            else:
                handle = module.register_forward_hook(hook)
            stack.callback(handle.remove)
        # with a cache, continue cached prefixes: input_ids are the tokens after them
        logits, _ = compat.forward(lm.hf_model, input_ids, attention_mask, cache=cache)
    if Logits() in plan.capture:
        plan.cache[Logits()] = logits
    return Run(logits=logits, cache=plan.cache)


def _hooks(lm: "LoadedModel", plan: _Plan) -> list[tuple[torch.nn.Module, Any, str]]:
    """The (module, hook, 'pre'|'fwd') triples this plan needs, and no others."""
    adapter, shape = lm.adapter, lm.shape
    n = shape.n_layers
    edges = plan.edges
    hooks: list[tuple[torch.nn.Module, Any, str]] = []
    touched = set(plan.capture) | set(plan.patches)

    def simple_output_hook(site: Site):
        def hook(module, args, output):
            for p in plan.patches.get(site, ()):
                output = apply_patch(output, p)
            if site in plan.capture:
                plan.cache[site] = output
            return output
        return hook

    if TokenEmbed() in touched:
        hooks.append((adapter.token_embed(), simple_output_hook(TokenEmbed()), "fwd"))
    if PosEmbed() in touched:
        hooks.append((adapter.pos_embed(), simple_output_hook(PosEmbed()), "fwd"))

    for layer in range(n):
        qkv_recv = edges.qkv_recv.get(layer, {}) if edges else {}
        rebase = edges is not None and layer in edges.attn_base
        qkv_sites = plan.layer_heads(layer, _QKV)
        pattern_patch = any(isinstance(s, Head) and s.layer == layer and s.channel is Channel.PATTERN
                            for s in plan.patches)
        need_resid = qkv_sites or bool(qkv_recv)
        block_needed = (need_resid or Resid(layer) in touched
                        or (layer == 0 and (Embed() in touched or (edges and edges.embed_slot is not None))))
        if block_needed:
            hooks.append((adapter.blocks()[layer], _block_hook(layer, plan), "pre"))
        if rebase:  # the norm reads an edge input: every projection rewrites the units it misleads
            hooks.append((adapter.attn_norm(layer), _attn_norm_hook(layer, plan), "pre"))
        channels = set(_QKV) if rebase else {c for c in _QKV if c in qkv_recv or plan.layer_heads(layer, [c])}
        if pattern_patch:
            channels.add(Channel.V)
        by_module: dict[int, tuple[torch.nn.Module, list[Channel]]] = {}
        for c in sorted(channels, key=lambda c: c.value):
            proj = adapter.projection(layer, c)
            by_module.setdefault(id(proj.module), (proj.module, []))[1].append(c)
        for module, chans in by_module.values():
            if edges is not None and _rewrites_every_unit(lm, layer, module, chans, plan):
                hooks.append((module, None, "skip"))  # its own output would be overwritten whole
            hooks.append((module, _proj_hook(lm, layer, chans, plan, pattern_patch), "fwd"))
        per_head = plan.layer_heads(layer, [Channel.OUT, Channel.PATTERN]) or (
            edges is not None and layer in edges.head_slots)
        if per_head:
            hooks.append((adapter.out_proj(layer), _z_hook(layer, plan), "pre"))
            hooks.append((adapter.attn(layer), _attn_hook(lm, layer, plan), "fwd"))
        if (edges is not None and layer in edges.mlp) or MlpIn(layer) in touched:
            hooks.append((adapter.mlp_norm(layer), _mlp_in_hook(layer, plan), "pre"))
        if shape.has_mlp and (Mlp(layer) in touched or (edges is not None and layer in edges.mlp_slot)):
            hooks.append((adapter.mlp(layer), _mlp_out_hook(layer, plan), "fwd"))
    if Resid(n) in touched or (edges is not None and edges.logits is not None):
        hooks.append((adapter.final_norm(), _final_hook(n, plan), "pre"))
    if Logits() in plan.patches:
        def logits_hook(module, args, output):
            for p in plan.patches[Logits()]:
                output = apply_patch(output, p)
            return output
        hooks.append((adapter.unembed(), logits_hook, "fwd"))
    return hooks


def _rewrites_every_unit(lm: "LoadedModel", layer: int, module, channels: list[Channel], plan: _Plan) -> bool:
    """True when edge inputs give every q/k/v unit this projection computes an input of its
    own, so `_proj_hook` writes all of its columns and the module need not run."""
    edges = plan.edges
    if layer in edges.attn_base or layer not in edges.attn:
        return False
    group = edges.attn[layer]
    columns = 0
    for c in channels:
        if any(isinstance(s, Head) and s.layer == layer and s.channel is c for s in plan.patches):
            return False
        proj = lm.adapter.projection(layer, c)
        units = {u for u, i in edges.qkv_recv.get(layer, {}).get(c, ()) if group.kinds[group.inverse[i]] != CLEAN}
        if len(units) != proj.columns.shape[0]:
            return False
        columns += proj.columns.numel()
    return columns == linear_weight_in_out(module).shape[1]


def _block_hook(layer: int, plan: _Plan):
    def hook(module, args, kwargs):
        x = _first(args, kwargs, "hidden_states")
        x0 = x
        if layer == 0:
            for p in plan.patches.get(Embed(), ()):
                x = apply_patch(x, p)
            if Embed() in plan.capture:
                plan.cache[Embed()] = x
        for p in plan.patches.get(Resid(layer), ()):
            x = apply_patch(x, p)
        if Resid(layer) in plan.capture:
            plan.cache[Resid(layer)] = x
        edges = plan.edges
        if layer == 0 and edges is not None and edges.embed_slot is not None:
            i, src = edges.embed_slot
            edges.delta[i] = x - edges.ablated[:, src]
        plan.resid_pre[layer] = x
        if edges is not None and layer in edges.attn:
            plan.attn_in[layer] = edges.inputs(x, edges.attn[layer])
        if x is not x0:
            return _replace_first(args, kwargs, "hidden_states", x)
        return None
    return hook


def _only_input(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else next(iter(kwargs.values()))


def _attn_norm_hook(layer: int, plan: _Plan):
    """Feed the attention norm the edge input most of the layer's q/k/v units read."""
    def hook(module, args, kwargs):
        x = _only_input(args, kwargs)
        if x is not plan.resid_pre.get(layer):  # someone else calling the norm
            return None
        base = plan.attn_in[layer][plan.edges.attn_base[layer]]
        if args:
            return (base, *args[1:]), kwargs
        return args, {**kwargs, next(iter(kwargs)): base}
    return hook


def _proj_hook(lm: "LoadedModel", layer: int, channels: list[Channel], plan: _Plan, stash_v: bool):
    """Rewrite the output columns of every q/k/v unit whose input is not the one the norm read.

    A unit reads the norm's stream `base` (the residual stream, or under edge patches the
    input most units share) unless an edge patch gives it another input, a node patch
    changes its input, or `base` is an edge input it does not share. Units reading the
    same tensor are projected together in one matmul. Node-patched units get
    `(norm(x_u) - norm(base)) @ W_u` added, so a patch with the stream's own value is
    exactly the identity; units changed only by edges get their columns written.
    """
    adapter = lm.adapter
    group = adapter.kv_group()
    norm = adapter.attn_norm(layer)
    n_heads = lm.shape.n_heads

    def hook(module, args, output):
        x = plan.resid_pre.get(layer)
        edges = plan.edges
        base, base_row, row_inputs = x, None, None
        if edges is not None and layer in edges.attn:
            row_inputs = plan.attn_in[layer]
            base_row = edges.attn_base.get(layer)
            if base_row is not None:
                base = row_inputs[base_row]
        recvs = edges.qkv_recv.get(layer, {}) if edges is not None else {}
        direct: dict[int, tuple[torch.Tensor, list[torch.Tensor]]] = {}
        added: dict[int, tuple[torch.Tensor, list[torch.Tensor]]] = {}
        for c in channels:
            proj = adapter.projection(layer, c)
            own: dict[int, torch.Tensor] = {}
            if base is not x:
                own = dict.fromkeys(range(proj.columns.shape[0]), x)
            for unit, i in recvs.get(c, ()):
                j = edges.attn[layer].inverse[i]
                inp = x if row_inputs[j] is None else row_inputs[j]
                if j == base_row or inp is base:
                    own.pop(unit, None)
                else:
                    own[unit] = inp
            patched: set[int] = set()
            for h in range(n_heads):
                site = Head(layer, h, c)
                unit = h if c is Channel.Q else h // group
                for p in plan.patches.get(site, ()):
                    own[unit] = apply_patch(own.get(unit, base), p)
                    patched.add(unit)
                if site in plan.capture:  # (edge inputs live in reused scratch: copy them)
                    value = own.get(unit, base)
                    plan.cache[site] = value.clone() if edges is not None and value is not x else value
            for unit, inp in own.items():
                bucket = added if unit in patched else direct
                bucket.setdefault(id(inp), (inp, []))[1].append((proj, unit))
        if direct or added:
            weight = linear_weight_in_out(module)
            bias = linear_bias(module)
            normed_base = args[0] if args else norm.forward(base)
            lead = output.shape[:-1]
            for bucket, add in ((direct, False), (added, True)):
                if not bucket:
                    continue
                cols, ys = [], []
                for inp, units in bucket.values():
                    if len(units) == 1:  # the cached per-head weight, no gather
                        proj, unit = units[0]
                        cs, w = proj.columns[unit], proj.weight[unit]
                    else:
                        cs = torch.cat([proj.columns[unit] for proj, unit in units])
                        w = weight[:, cs]
                    normed = norm.forward(inp)
                    if add:
                        ys.append(torch.matmul(normed - normed_base, w))
                    elif bias is not None:
                        ys.append(torch.addmm(bias[cs], normed.reshape(-1, normed.shape[-1]), w).view(*lead, -1))
                    else:
                        ys.append(torch.matmul(normed, w))
                    cols.append(cs)
                cs, y = torch.cat(cols), torch.cat(ys, -1)
                output = output.index_add(-1, cs, y) if add else output.index_copy(-1, cs, y)
        if stash_v and Channel.V in channels:
            cols = adapter.projection(layer, Channel.V).columns
            plan.v[layer] = output[..., cols.reshape(-1)].view(*output.shape[:2], *cols.shape)
        return output
    return hook


def _z_hook(layer: int, plan: _Plan):
    def hook(module, args, kwargs):
        plan.z[layer] = _first(args, kwargs, "input")
        return None
    return hook


def _head_outputs(zh: torch.Tensor, w_o: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """[B, H, T, D]: each head's own output `z_h @ W_O[h]` from zh [B, T, H, dh] and
    w_o [H, dh, D]; a view of `out` [H, B, T, D] when given (one GEMM per head)."""
    b, t, n, dh = zh.shape
    zc = zh.permute(2, 0, 1, 3).reshape(n, b * t, dh)
    if out is None:
        out = torch.bmm(zc, w_o).view(n, b, t, -1)
    else:
        torch.bmm(zc, w_o, out=out.view(n, b * t, -1))
    return out.transpose(0, 1)


def _attn_hook(lm: "LoadedModel", layer: int, plan: _Plan):
    adapter = lm.adapter
    n_heads = lm.shape.n_heads
    group = adapter.kv_group()

    def hook(module, args, output):
        attn_out, weights = output[0], output[1]
        z = plan.z.pop(layer)
        b, t = z.shape[:2]
        w_o = adapter.out_weight(layer)  # [H, dh, D]
        zh = z.reshape(b, t, n_heads, -1)
        edges = plan.edges
        patterns = any(Head(layer, h, Channel.PATTERN) in plan.patches or Head(layer, h, Channel.PATTERN)
                       in plan.capture for h in range(n_heads))
        # every head's output only when edges or patterns need them all; otherwise
        # just the heads that are patched or captured (a sweep touches one per row)
        heads = None
        sends = edges is not None and layer in edges.head_slots
        in_delta = False  # heads computed straight into the edge buffer
        if sends:
            hs, slots, srcs = edges.head_slots[layer]
            in_delta = (isinstance(hs, slice) and hs == slice(0, n_heads) and isinstance(slots, slice) and not torch.is_grad_enabled()
                        and not any(Head(layer, h) in plan.capture for h in range(n_heads)))
            heads = _head_outputs(zh, w_o, edges.delta[slots] if in_delta else None)
        elif patterns:
            heads = _head_outputs(zh, w_o)
        delta = None
        new_weights = weights
        for h in range(n_heads):
            site = Head(layer, h, Channel.PATTERN)
            if site in plan.patches or site in plan.capture:
                if weights is None:
                    raise ModelError(f"{site}: this model's attention returns no pattern",
                                     code="model.no-pattern", hint="load it with attn_implementation='eager'")
                old = weights[:, h]
                new = old
                for p in plan.patches.get(site, ()):
                    new = apply_patch(new, p)
                if new is not old:
                    v_h = plan.v[layer][:, :, h // group]  # [B, T, dh]
                    d_out = ((new - old) @ v_h) @ w_o[h]
                    heads = heads.clone() if delta is None else heads
                    heads[:, h] = heads[:, h] + d_out
                    delta = d_out if delta is None else delta + d_out
                    if new_weights is weights:
                        new_weights = weights.clone()
                    new_weights[:, h] = new
                if site in plan.capture:
                    plan.cache[site] = new
        for h in range(n_heads):
            site = Head(layer, h, Channel.OUT)
            patches = plan.patches.get(site, ())
            if not patches and site not in plan.capture:
                continue
            cur = heads[:, h] if heads is not None else torch.matmul(zh[:, :, h], w_o[h])
            new = cur
            for p in patches:
                new = apply_patch(new, p)
            if new is not cur:
                d_out = new - cur
                delta = d_out if delta is None else delta + d_out
                if heads is not None:
                    heads = heads.clone()
                    heads[:, h] = new
            if site in plan.capture:
                plan.cache[site] = new
        if sends:
            abl = edges.ablated[:, srcs].transpose(0, 1)
            if in_delta and heads.data_ptr() == edges.delta[slots].data_ptr():
                edges.delta[slots].sub_(abl)  # heads were written there and not patched since
            elif isinstance(slots, slice) and not torch.is_grad_enabled():
                torch.sub(heads[:, hs].transpose(0, 1), abl, out=edges.delta[slots])
            else:
                edges.delta[slots] = heads[:, hs].transpose(0, 1) - abl
        if delta is None and new_weights is weights:
            return None
        new_out = attn_out if delta is None else attn_out + delta
        return (new_out, new_weights, *output[2:])
    return hook


def _mlp_in_hook(layer: int, plan: _Plan):
    """The stream MLP `layer` reads (its norm's input): edge patches, then `MlpIn` patches."""
    site = MlpIn(layer)

    def hook(module, args, kwargs):
        edges = plan.edges
        x = _first(args, kwargs, "input")
        new = x
        if edges is not None and layer in edges.mlp:
            xs = edges.inputs(x, edges.mlp[layer])[0]
            if xs is not None:
                new = xs
        for p in plan.patches.get(site, ()):
            new = apply_patch(new, p)
        if site in plan.capture:  # (edge inputs live in reused scratch: copy them)
            plan.cache[site] = new.clone() if new is not x and edges is not None else new
        if new is x:
            return None
        return _replace_first(args, kwargs, "input", new)
    return hook


def _mlp_out_hook(layer: int, plan: _Plan):
    site = Mlp(layer)

    def hook(module, args, output):
        for p in plan.patches.get(site, ()):
            output = apply_patch(output, p)
        if site in plan.capture:
            plan.cache[site] = output
        edges = plan.edges
        if edges is not None and layer in edges.mlp_slot:
            i, src = edges.mlp_slot[layer]
            edges.delta[i] = output - edges.ablated[:, src]
        return output
    return hook


def _final_hook(n_layers: int, plan: _Plan):
    site = Resid(n_layers)

    def hook(module, args, kwargs):
        x = _first(args, kwargs, "input")
        x0 = x
        for p in plan.patches.get(site, ()):
            x = apply_patch(x, p)
        if site in plan.capture:
            plan.cache[site] = x
        edges = plan.edges
        if edges is not None and edges.logits is not None:
            xs = edges.inputs(x, edges.logits)[0]
            if xs is not None:
                x = xs
        if x is not x0:
            return _replace_first(args, kwargs, "input", x)
        return None
    return hook
