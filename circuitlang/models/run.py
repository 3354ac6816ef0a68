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

Edge patches keep a buffer `delta[B, S, T, D] = current_out_s - ablated_out_s` filled as
each sender is computed; each receiver group of a layer then reads
`x - mask @ delta[:, :prefix]` in one batched matmul (senders are sorted in computation
order, so the ones a layer can see are a prefix).
"""
from __future__ import annotations

import functools
from collections import defaultdict
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable

import torch

from circuitlang.errors import ModelError
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
@dataclass
class _Edges:
    """An `EdgePatch` prepared for one batch: senders sorted, mask permuted, buffers."""

    mask: torch.Tensor  # [B, R, S] or [B, T, R, S], senders in computation order
    ablated: torch.Tensor  # [B, S, T, D]
    delta: torch.Tensor  # [B, S, T, D]
    embed_slot: int | None
    head_slots: dict[int, tuple[torch.Tensor, torch.Tensor]]  # layer -> (heads, slots)
    mlp_slot: dict[int, int]
    attn_prefix: dict[int, int]
    mlp_prefix: dict[int, int]
    qkv_recv: dict[int, dict[Channel, tuple[torch.Tensor, list[int]]]]  # layer -> ch -> (r_idx, units)
    mlp_recv: dict[int, torch.Tensor]
    logits_recv: torch.Tensor | None

    def inputs(self, x: torch.Tensor, r_idx: torch.Tensor, prefix: int) -> torch.Tensor | None:
        """[B, R, T, D] receiver inputs `x - mask @ delta`, or None when no edge is ablated."""
        if prefix == 0:
            return None
        m = self.mask[..., r_idx, :prefix]
        if not bool(m.any()):
            return None
        b, t, d = x.shape
        dl = self.delta[:, :prefix]
        if m.dim() == 3:  # x - m @ delta, fused into one batched matmul
            base = x.reshape(b, 1, t * d).expand(b, m.shape[1], t * d)
            return torch.baddbmm(base, m, dl.reshape(b, prefix, t * d), alpha=-1.0).view(b, -1, t, d)
        return x.unsqueeze(1) - torch.einsum("bptd,btrp->brtd", dl, m)


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
    identity = order == list(range(n_s))
    perm = torch.tensor(order, dtype=torch.long, device=device)
    sorted_senders = [senders[i] for i in order]
    mask = mask.to(device=device, dtype=dtype)
    if not identity:
        mask = mask.index_select(-1, perm)
    mask = mask.expand(batch, *mask.shape[1:])
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
    if isinstance(edges.ablated, torch.Tensor):
        ablated = edges.ablated.to(device=device, dtype=dtype)
        if not identity:
            ablated = ablated.index_select(1, perm)
    else:
        missing = [str(s) for s in sorted_senders if s not in edges.ablated]
        if missing:
            raise ModelError(f"edge patch has no ablated value for {', '.join(missing[:5])}",
                             code="model.bad-ablated", hint="capture every sender in the ablation run")
        ablated = torch.stack([edges.ablated[s].to(device=device, dtype=dtype) for s in sorted_senders], 1)
    if ablated.shape[0] == 1 and batch > 1:
        ablated = ablated.expand(batch, *ablated.shape[1:])
    if tuple(ablated.shape) != (batch, n_s, tokens, d_model):
        raise ModelError(f"ablated sender values have shape {tuple(ablated.shape)}", code="model.bad-ablated",
                         hint=f"expected [{batch}, {n_s}, {tokens}, {d_model}] or [B, T, D] per sender")

    # Senders whose every edge is kept cost nothing: drop them (an all-zero mask is free).
    active = (mask != 0).reshape(-1, n_s).any(0)
    if not bool(active.all()):
        keep = active.nonzero()[:, 0]
        sorted_senders = [sorted_senders[i] for i in keep.tolist()]
        mask = mask.index_select(-1, keep)
        ablated = ablated.index_select(1, keep)
        n_s = len(sorted_senders)
    keys = [sender_key(s) for s in sorted_senders]
    embed_slot = None
    head_slots: dict[int, tuple[list[int], list[int]]] = defaultdict(lambda: ([], []))
    mlp_slot: dict[int, int] = {}
    for i, s in enumerate(sorted_senders):
        if isinstance(s, Embed):
            embed_slot = i
        elif isinstance(s, Head):
            head_slots[s.layer][0].append(s.head)
            head_slots[s.layer][1].append(i)
        else:
            mlp_slot[s.layer] = i
    attn_prefix = {l: sum(k[0] < l for k in keys) for l in range(shape.n_layers)}
    if adapter.parallel_residual:
        mlp_prefix = dict(attn_prefix)
    else:
        mlp_prefix = {l: sum(k[:2] <= (l, 0) for k in keys) for l in range(shape.n_layers)}

    group = adapter.kv_group()
    qkv: dict[int, dict[Channel, tuple[list[int], list[int]]]] = defaultdict(dict)
    mlp_recv: dict[int, torch.Tensor] = {}
    logits_recv = None
    for r, site in enumerate(receivers):
        if isinstance(site, Head):
            idx, units = qkv[site.layer].setdefault(site.channel, ([], []))
            unit = site.head if site.channel is Channel.Q else site.head // group
            if unit in units:
                raise ModelError(
                    f"{site}: query heads {unit * group}-{unit * group + group - 1} share one "
                    f"{site.channel.value} head (grouped-query attention)",
                    code="model.gqa-receiver",
                    hint=f"name one head per group, e.g. head {site.layer}.{unit * group}.{site.channel.value}",
                )
            idx.append(r)
            units.append(unit)
        elif isinstance(site, Mlp):
            mlp_recv[site.layer] = torch.tensor([r], device=device)
        else:
            logits_recv = torch.tensor([r], device=device)
    return _Edges(
        mask=mask,
        ablated=ablated,
        delta=torch.empty(batch, n_s, tokens, d_model, dtype=dtype, device=device),
        embed_slot=embed_slot,
        head_slots={l: (_as_index(h, device), _as_index(s, device)) for l, (h, s) in head_slots.items()},
        mlp_slot=mlp_slot,
        attn_prefix=attn_prefix,
        mlp_prefix=mlp_prefix,
        qkv_recv={l: {c: (torch.tensor(i, device=device), u) for c, (i, u) in d.items()} for l, d in qkv.items()},
        mlp_recv=mlp_recv,
        logits_recv=logits_recv,
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
    past_key_values: Any = None,
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
            if kind == "pre":
                handle = module.register_forward_pre_hook(hook, with_kwargs=True)
            else:
                handle = module.register_forward_hook(hook)
            stack.callback(handle.remove)
        if past_key_values is None:
            out = lm.hf_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        else:  # continue cached prefixes: input_ids are the tokens after them
            out = lm.hf_model(input_ids=input_ids, attention_mask=attention_mask,
                              past_key_values=past_key_values, use_cache=True)
    logits = out.logits
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
        qkv_sites = plan.layer_heads(layer, _QKV)
        pattern_patch = any(isinstance(s, Head) and s.layer == layer and s.channel is Channel.PATTERN
                            for s in plan.patches)
        need_resid = qkv_sites or bool(qkv_recv)
        block_needed = (need_resid or Resid(layer) in touched
                        or (layer == 0 and (Embed() in touched or (edges and edges.embed_slot is not None))))
        if block_needed:
            hooks.append((adapter.blocks()[layer], _block_hook(layer, plan), "pre"))
        channels = {c for c in _QKV if c in qkv_recv or plan.layer_heads(layer, [c])}
        if pattern_patch:
            channels.add(Channel.V)
        by_module: dict[int, tuple[torch.nn.Module, list[Channel]]] = {}
        for c in sorted(channels, key=lambda c: c.value):
            proj = adapter.projection(layer, c)
            by_module.setdefault(id(proj.module), (proj.module, []))[1].append(c)
        for module, chans in by_module.values():
            hooks.append((module, _proj_hook(lm, layer, chans, plan, pattern_patch), "fwd"))
        per_head = plan.layer_heads(layer, [Channel.OUT, Channel.PATTERN]) or (
            edges is not None and layer in edges.head_slots)
        if per_head:
            hooks.append((adapter.out_proj(layer), _z_hook(layer, plan), "pre"))
            hooks.append((adapter.attn(layer), _attn_hook(lm, layer, plan), "fwd"))
        if (edges is not None and layer in edges.mlp_recv) or MlpIn(layer) in touched:
            hooks.append((adapter.mlp_norm(layer), _mlp_in_hook(layer, plan), "pre"))
        if shape.has_mlp and (Mlp(layer) in touched or (edges is not None and layer in edges.mlp_slot)):
            hooks.append((adapter.mlp(layer), _mlp_out_hook(layer, plan), "fwd"))
    if Resid(n) in touched or (edges is not None and edges.logits_recv is not None):
        hooks.append((adapter.final_norm(), _final_hook(n, plan), "pre"))
    if Logits() in plan.patches:
        def logits_hook(module, args, output):
            for p in plan.patches[Logits()]:
                output = apply_patch(output, p)
            return output
        hooks.append((adapter.unembed(), logits_hook, "fwd"))
    return hooks


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
            i = edges.embed_slot
            edges.delta[:, i] = x - edges.ablated[:, i]
        plan.resid_pre[layer] = x
        if x is not x0:
            return _replace_first(args, kwargs, "hidden_states", x)
        return None
    return hook


def _proj_hook(lm: "LoadedModel", layer: int, channels: list[Channel], plan: _Plan, stash_v: bool):
    adapter = lm.adapter
    group = adapter.kv_group()

    def hook(module, args, output):
        x = plan.resid_pre[layer] if layer in plan.resid_pre else None
        edges = plan.edges
        # every receiver this module feeds, in one batched matmul
        from_edges: dict[Channel, torch.Tensor] = {}
        recvs = edges.qkv_recv.get(layer, {}) if edges is not None else {}
        with_recv = [c for c in channels if c in recvs]
        if with_recv:
            r_all = torch.cat([recvs[c][0] for c in with_recv])
            xs_all = edges.inputs(x, r_all, edges.attn_prefix[layer])
            if xs_all is not None:
                parts = xs_all.split([len(recvs[c][1]) for c in with_recv], dim=1)
                from_edges = dict(zip(with_recv, parts))
        for c in channels:
            proj = adapter.projection(layer, c)
            units: list[int] = []
            inputs: list[torch.Tensor] = []
            stacked: torch.Tensor | None = from_edges.get(c)
            if stacked is not None:
                units = list(recvs[c][1])
                inputs = list(stacked.unbind(1))
            for h in range(lm.shape.n_heads):
                site = Head(layer, h, c)
                unit = h if c is Channel.Q else h // group
                for p in plan.patches.get(site, ()):
                    if unit in units:
                        i = units.index(unit)
                        inputs[i] = apply_patch(inputs[i], p)
                        stacked = None
                    else:
                        units.append(unit)
                        inputs.append(apply_patch(x, p))
                        stacked = None
                if site in plan.capture:
                    plan.cache[site] = inputs[units.index(unit)] if unit in units else x
            if units and stacked is not None and stacked is from_edges.get(c):
                # only edges act on this channel: write the receivers' columns directly
                # (an all-zero mask never gets here: senders with no ablated edge are dropped)
                u = torch.tensor(units, device=output.device)
                cols = proj.columns[u].reshape(-1)
                y = torch.matmul(adapter.attn_norm(layer)(stacked), proj.weight[u])  # [B, n, T, dh]
                y = y.transpose(1, 2).reshape(*output.shape[:2], -1)
                bias = getattr(proj.module, "bias", None)
                if bias is not None:
                    y = y + bias[cols]
                output = output.index_copy(-1, cols, y)
            elif units:
                xs = stacked if stacked is not None else torch.stack(inputs, 1)  # [B, n, T, D]
                norm = adapter.attn_norm(layer)
                diff = norm(xs) - norm(x.unsqueeze(1))
                u = torch.tensor(units, device=output.device)
                delta = torch.matmul(diff, proj.weight[u])  # [B, n, T, dh]
                delta = delta.transpose(1, 2).reshape(*output.shape[:2], -1)
                output = output.index_add(-1, proj.columns[u].reshape(-1), delta)
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
        if patterns or (edges is not None and layer in edges.head_slots):
            heads = torch.matmul(zh.transpose(1, 2), w_o)  # [B, H, T, D]
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
        if edges is not None and layer in edges.head_slots:
            hs, slots = edges.head_slots[layer]
            if isinstance(slots, slice):
                torch.sub(heads[:, hs], edges.ablated[:, slots], out=edges.delta[:, slots])
            else:
                edges.delta[:, slots] = heads[:, hs] - edges.ablated[:, slots]
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
        if edges is not None and layer in edges.mlp_recv:
            xs = edges.inputs(x, edges.mlp_recv[layer], edges.mlp_prefix[layer])
            if xs is not None:
                new = xs[:, 0]
        for p in plan.patches.get(site, ()):
            new = apply_patch(new, p)
        if site in plan.capture:
            plan.cache[site] = new
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
            i = edges.mlp_slot[layer]
            edges.delta[:, i] = output - edges.ablated[:, i]
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
        if edges is not None and edges.logits_recv is not None:
            xs = edges.inputs(x, edges.logits_recv, edges.delta.shape[1])
            if xs is not None:
                x = xs[:, 0]
        if x is not x0:
            return _replace_first(args, kwargs, "input", x)
        return None
    return hook
