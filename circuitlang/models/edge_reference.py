"""Nodes taken from an edge reference: the heads and MLPs an edge-patched pass need not
compute, and what the run engine does in their place.

Takes an `EdgePatch` with an `EdgeReference` (another circuit's pass over the same rows:
ACDC's last accepted state, the previous point of a faithfulness curve) and the `_Edges`
prepared for it. `reused_nodes` decides which nodes give what they gave there; for the
run engine (`circuitlang.models.run`), `plan_reused_heads` says which q/k/v units a layer
with reused heads still projects (the reused heads' columns stay 0), `attn_with_reused`
builds that layer's output from every head's delta (its output projection does not
run), and `reused_mlp` is a reused MLP's forward (its reference output).
"""
from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import numpy as np
import torch

from circuitlang.models.adapters.base import head_outputs
from circuitlang.models.edge_engine import _Edges, _valid_matrix, qkv_unit
from circuitlang.models.interventions import EdgePatch, sender_key
from circuitlang.sites import QKV, Channel, Embed, Head, Mlp

if TYPE_CHECKING:  # pragma: no cover
    from circuitlang.models.load import LoadedModel
    from circuitlang.models.run import _Plan


def reused_nodes(lm: "LoadedModel", patch: EdgePatch, edges: _Edges, read_at: torch.Tensor | None,
                 heads_at: torch.Tensor | None) -> dict:
    """The heads and MLPs this pass need not compute: sender site -> its delta in the
    patch's `EdgeReference` ([B, T, D]), which this pass's value equals.

    A node gives what it gave in the reference when each of its inputs does: an input
    named as a receiver, when its mask row equals the reference's in every batch row and
    every sender it keeps (partly, in any row) is itself reused; an input no receiver
    names (the whole stream), when no node before it is computed. Nodes are decided in
    computation order; one without a delta in the reference is computed. The embedding
    never changes. Reuse needs the patch's senders to be every head, MLP and the
    embedding (the stream is then a sum of senders), ablated values as one tensor, and
    no gradients. The last layer's deltas of a reference made at one token per row
    (`EdgeReference.at`) serve only a pass that reads that token alone: its heads when
    this pass computes them there (`heads_at`), its MLP when it reads the logits there
    (`read_at`)."""
    ref = patch.reference
    if ref is None or torch.is_grad_enabled() or not isinstance(patch.ablated, torch.Tensor):
        return {}
    shape = lm.shape
    senders, receivers = tuple(patch.senders), tuple(patch.receivers)
    n_s, n_r = len(senders), len(receivers)
    layout = _node_inputs(senders, receivers, shape, lm.adapter.kv_group())
    if layout is None:
        return {}
    mask = patch.mask.detach().reshape(-1, n_r, n_s)
    rm = ref.mask.to(device=mask.device, dtype=mask.dtype)
    differs = (mask != rm).any(0).any(-1).cpu().numpy()  # [R]
    valid = _valid_matrix(senders, receivers, shape)
    kept = ((mask != 1).any(0).cpu() & valid).numpy()  # [R, S]: an edge that carries the sender's value somewhere
    top = shape.n_layers - 1

    def held_at_top(node) -> bool:
        if ref.at is None:
            return True
        at = read_at if isinstance(node, Mlp) else heads_at
        if at is None or len(at) % len(ref.at):
            return False
        return bool(torch.equal(at.cpu().view(-1, len(ref.at)), ref.at.cpu().expand(len(at) // len(ref.at), -1)))

    computed = np.zeros(n_s, dtype=bool)
    any_computed = False
    out: dict = {}
    for node, at_index, inputs in layout:
        delta = ref.deltas.get(node)
        same = delta is not None and (node.layer != top or held_at_top(node))
        if same:
            for r in inputs:
                if r is None:
                    same = not any_computed
                else:
                    same = not differs[r] and not (kept[r] & computed).any()
                if not same:
                    break
        if same:
            out[node] = delta
        else:
            computed[at_index] = True
            any_computed = True
    return out


@functools.lru_cache(maxsize=32)
def _node_inputs(senders: tuple, receivers: tuple, shape, g: int):
    """Every head and MLP in computation order, as (site, its index among `senders`, the
    receivers its inputs are: q, k, v or the MLP's; None for one no receiver names); None
    when the senders are not every head, MLP and the embedding (`reused_nodes`)."""
    nodes = [Head(l, h) for l in range(shape.n_layers) for h in range(shape.n_heads)]
    nodes += [Mlp(l) for l in range(shape.n_layers)] if shape.has_mlp else []
    index = {s: i for i, s in enumerate(senders)}
    if Embed() not in index or any(n not in index for n in nodes):
        return None
    channel_of: dict = {}
    for r, site in enumerate(receivers):
        if isinstance(site, Head):
            channel_of[(site.layer, site.channel, qkv_unit(site, g))] = r
        elif isinstance(site, Mlp):
            channel_of[("mlp", site.layer)] = r
    out = []
    for node in sorted(nodes, key=sender_key):
        if isinstance(node, Head):
            inputs = [channel_of.get((node.layer, c, qkv_unit(node.with_channel(c), g))) for c in QKV]
        else:
            inputs = [channel_of.get(("mlp", node.layer))]
        out.append((node, index[node], tuple(inputs)))
    return tuple(out)


def plan_reused_heads(lm: "LoadedModel", plan: _Plan) -> None:
    """For the layers with heads taken from the edge reference (`reused_nodes`):
    the q/k/v units only those heads read (not projected: their columns are left 0, and
    nothing reads those heads' z, since the layer's output is built from every head's
    delta: `attn_with_reused`), and the distinct input rows the other units read (the
    only ones mixed)."""
    edges, g = plan.edges, lm.adapter.kv_group()
    for layer in range(plan.start, lm.shape.n_layers):
        heads = {h for h in range(lm.shape.n_heads) if Head(layer, h) in edges.reused}
        # a head whose key/value head serves one that is computed is computed too (with its
        # keys and values, a zeroed query would still average them)
        kv = {u for u in range(lm.shape.n_heads // g) if all(u * g + i in heads for i in range(g))}
        for h in [h for h in heads if h // g not in kv]:
            heads.discard(h)
            del edges.reused[Head(layer, h)]
        if not heads:
            continue
        plan.reused_units[(layer, Channel.Q)] = heads
        plan.reused_units[(layer, Channel.K)] = plan.reused_units[(layer, Channel.V)] = kv
        if layer in edges.attn:
            group = edges.attn[layer]
            rows = {group.inverse[i] for c, units in edges.qkv_recv.get(layer, {}).items()
                    for u, i in units if u not in plan.reused_units[(layer, c)]}
            if layer in edges.attn_base:
                rows.add(edges.attn_base[layer])
            plan.qkv_rows[layer] = rows


def attn_with_reused(lm: "LoadedModel", layer: int, plan: _Plan, output):
    """The attention output and the heads' deltas of a layer some of whose heads are taken
    from the edge reference (their q/k/v columns were left 0 and nothing reads their z):
    the other heads' outputs are computed as usual; the layer's output is every head's
    delta plus its ablated value, plus W_O's bias (the output projection did not run).
    Edge patches only (no node patch or capture: `reused_nodes`), every head a sender."""
    edges = plan.edges
    z = plan.z.pop(layer)
    b, t = z.shape[:2]
    n_heads = lm.shape.n_heads
    _, all_slots, all_srcs = edges.head_slots[layer]  # (as given: slices where they can be)
    hs, slots, srcs = (list(range(v.start, v.stop)) if isinstance(v, slice) else v.tolist()
                       for v in edges.head_slots[layer])
    at = plan.at if plan.at is not None and layer == plan.top else None  # z, heads: at the logits' token
    computed = [k for k, h in enumerate(hs) if Head(layer, h) not in edges.reused]
    if computed:
        which = torch.tensor([hs[k] for k in computed], device=z.device)
        zh = z.reshape(b, t, n_heads, -1).index_select(2, which)
        heads = head_outputs(zh, lm.adapter.out_weight(layer).index_select(0, which))  # [B, Hc, T|1, D]
        sl, sr = [slots[k] for k in computed], [srcs[k] for k in computed]
        if at is not None:
            edges.put_at(sl, at, heads[:, :, 0].transpose(0, 1) - edges.ablated_at(sr, at))
        else:
            edges.delta[torch.tensor(sl, device=z.device)] = heads.transpose(0, 1) - edges.ablated_of(sr).transpose(0, 1)
    for k, h in enumerate(hs):
        if Head(layer, h) in edges.reused:
            edges.put_reused(slots[k], Head(layer, h), at)
    if at is None:
        out = edges.delta[all_slots].sum(0) + edges.ablated_of(all_srcs).sum(1)
    else:
        rows = torch.arange(len(at), device=z.device)
        out = (edges.delta[all_slots][:, rows, at.to(z.device)].sum(0) + edges.ablated_at(all_srcs, at).sum(0))[:, None]
    bias = lm.adapter.out_bias(layer)
    return (out if bias is None else out + bias, *output[1:])


def reused_mlp(layer: int, plan: _Plan):
    """A forward for MLP `layer` when it gives what it gave in the edge reference
    (`reused_nodes`): that output, at the logits' token alone where the last
    MLP runs there (its input is then [B, 1, D])."""
    def forward(x, *args, **kwargs):
        at = plan.at_mlp if layer == plan.top else None
        return plan.edges.reused_output(Mlp(layer), at)
    return forward
