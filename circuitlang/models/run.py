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

Edge patches are prepared by `circuitlang.models.edge_engine` (its docstring says how
receivers are grouped and what a mask costs); the hooks here fill its delta buffer as
each sender is computed and read the receivers' inputs from it.
"""
from __future__ import annotations

from collections import defaultdict
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable

import torch

from circuitlang.errors import ModelError
from circuitlang.models import compat
from circuitlang.models.adapters.base import head_outputs, linear_bias, linear_weight_in_out
from circuitlang.models.edge_engine import CLEAN, _Edges, _prepare_edges, reused_columns
from circuitlang.models.edge_reference import attn_with_reused, plan_reused_heads, reused_mlp, reused_nodes
from circuitlang.models.interventions import CleanPass, EdgePatch, Patch, Run
from circuitlang.models.offload import execution_devices, resident
from circuitlang.models.patches import _first, _replace_first, apply_patch, check_site
from circuitlang.models.subspace import check_basis, is_subspace_site, subspace_hooks
from circuitlang.models.units import check_unit_site, is_unit_site, unit_hooks
from circuitlang.sites import (
    Channel,
    Embed,
    Head,
    Logits,
    Mlp,
    MlpIn,
    PosEmbed,
    QKV,
    Resid,
    Site,
    TokenEmbed,
)

if TYPE_CHECKING:  # pragma: no cover
    from circuitlang.models.load import LoadedModel



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
    start: int = 0  # blocks below this one return `skipped` (a clean pass resumed)
    skipped: tuple = ()
    at: torch.Tensor | None = None  # the last block's attention output is read at this token per row only
    at_mlp: torch.Tensor | None = None  # the last MLP runs at this token per row only
    top: int = -1  # the last block
    reuse: Any = None  # `ReusedColumns` for the q/k/v units of layer `start` (a resumed pass)
    reused_units: dict = field(default_factory=dict)  # (layer, channel) -> q/k/v units only reused heads read
    qkv_rows: dict = field(default_factory=dict)  # layer -> the distinct input rows its computed units read

    def wants(self, site: Site) -> bool:
        return site in self.capture

    def through(self, site, value: torch.Tensor) -> torch.Tensor:
        """`value` after the site's patches, in order (itself when it has none), kept in
        the cache when the site is captured."""
        for p in self.patches.get(site, ()):
            value = apply_patch(value, p)
        if site in self.capture:
            self.cache[site] = value
        return value

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
    resume: "tuple[CleanPass, int] | None" = None,
    record_blocks: list | None = None,
    logit_columns: torch.Tensor | None = None,
    logits_at: torch.Tensor | None = None,
) -> Run:
    """One forward pass with captures and interventions; see `LoadedModel.run`.

    `resume=(clean, start)` takes blocks below `start` from `clean` instead of computing
    them (edge patches only; nothing they ablate may be read below `start`);
    `record_blocks`, a list, receives what every block returns (for a `CleanPass`);
    `logit_columns` (vocabulary ids) makes the unembedding compute only those columns:
    the logits are then [B, T, len(logit_columns)]; `logits_at` (a token index per row,
    [B]) unembeds only there: [B, 1, V] (or [B, 1, len(logit_columns)])."""
    device = lm.device
    input_ids = torch.as_tensor(input_ids).to(device)
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.dim() != 2:
        raise ModelError(f"input_ids has shape {tuple(input_ids.shape)}", code="model.bad-input",
                         hint="expected [batch, tokens]")
    plan = _Plan(capture=set(capture))
    for site in plan.capture:
        _check(lm, site)
    for patch in patches:
        if not isinstance(patch, Patch):
            raise ModelError(f"{patch!r} is not a Patch", code="model.bad-patch",
                             hint="pass Patch(site, value, positions=None)")
        _check(lm, patch.site)
        plan.patches[patch.site].append(patch)
    start, clean = 0, None
    if resume is not None:
        clean, start = resume
        if not 0 <= start <= lm.shape.n_layers:
            raise ModelError(f"cannot resume at layer {start}", code="model.bad-resume",
                             hint=f"a layer 0..{lm.shape.n_layers}")
        if start and (torch.is_grad_enabled() or (edges is not None and cache is not None)):
            raise ModelError("resuming from a clean pass takes no gradients, and no cache with edges",
                             code="model.bad-resume",
                             hint="run without grad=, and edge patches without cache=")
        below = [s for s in list(plan.capture) + list(plan.patches)
                 if _block_of(s) is None or _block_of(s) < start] if start else []
        if below:
            raise ModelError(f"{below[0]} is not computed when resuming at layer {start}",
                             code="model.bad-resume",
                             hint=f"resume at or below the first layer patched or captured (heads, MLPs, "
                                  f"streams of layers >= {start})")
        if start and len(clean.blocks) != lm.shape.n_layers:
            raise ModelError("the clean pass has no blocks recorded", code="model.bad-resume",
                             hint="make it with LoadedModel.clean_pass")
    plan.start = start
    if plan.capture or plan.patches or edges is not None or start or record_blocks is not None:
        _refuse_compiled(lm)
    if edges is not None:
        _one_device_for_edges(lm)
        plan.edges = _prepare_edges(lm, edges, tuple(input_ids.shape), lm.dtype, device,
                                    start=start, resumed=clean)
    if start:
        plan.skipped = clean.blocks
        if _reuses_columns(lm, plan):
            plan.reuse = reused_columns(lm, clean, edges.ablated)
    partial = logit_columns is not None or logits_at is not None
    if partial and (Logits() in plan.patches or Logits() in plan.capture):
        raise ModelError("logit_columns= / logits_at= compute only some logits: they cannot be patched or "
                         "captured whole", code="model.bad-patch",
                         hint="patch or capture the logits without logit_columns= or logits_at=")

    read_at = logits_at if logits_at is not None and _only_read_at_logits(lm, plan, record_blocks) else None
    plan.at = read_at if read_at is not None and _last_attention_at_logits(lm, plan) else None
    plan.top = lm.shape.n_layers - 1
    plan.at_mlp = read_at
    if edges is not None and edges.reference is not None and not plan.capture and not plan.patches:
        plan.edges.reused = reused_nodes(lm, edges, plan.edges, read_at, plan.at)
        plan_reused_heads(lm, plan)

    with ExitStack() as stack:
        top = plan.top
        # the last block at the one token the logits read: its MLP, and (when nothing
        # reads its heads elsewhere) its attention's output projection; a pre-hook
        # registered before the others, so the heads' own hooks see that token only
        one_token = ([lm.adapter.mlp(top)] if read_at is not None and lm.shape.has_mlp else []) + (
            [lm.adapter.out_proj(top)] if plan.at is not None and plan.start <= top else [])
        for module in one_token:
            handle = module.register_forward_pre_hook(_one_token_hook(read_at), with_kwargs=True)
            stack.callback(handle.remove)
        if record_blocks is not None:
            for block in lm.adapter.blocks():
                handle = block.register_forward_hook(lambda m, a, out: record_blocks.append(out))
                stack.callback(handle.remove)
        if partial:
            stack.enter_context(only_logit_columns(lm, logit_columns, at=logits_at))
        for module, hook, kind in _hooks(lm, plan):
            if kind == "replace":  # a block below the resume layer: its clean output, not computed
                _swap_forward(stack, module, lambda *a, out=hook, **k: out)
                continue
            if kind == "forward":  # another forward for this run
                _swap_forward(stack, module, hook)
                continue
            if kind in ("skip", "zeros"):
                n_out = linear_weight_in_out(module).shape[1]
                make = torch.Tensor.new_zeros if kind == "zeros" else torch.Tensor.new_empty
                _swap_forward(stack, module, lambda x, *a, n_out=n_out, make=make, **k: make(x, (*x.shape[:-1], n_out)))
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
    deltas = {}
    if plan.edges is not None and isinstance(plan.edges.delta, torch.Tensor):
        reused = plan.edges.reused  # (their reference's own tensors: nothing changes those)
        deltas = {site: reused.get(site, plan.edges.delta[i]) for i, site in enumerate(plan.edges.sites)}
    return Run(logits=logits, cache=plan.cache, deltas=deltas, deltas_at=read_at if deltas else None)


def _refuse_compiled(lm: "LoadedModel") -> None:
    """A module compiled in place (`module.compile()`) runs the graph it traced, without
    the hooks added to it or its children since: a patch or capture would be silently
    skipped (bench/bench_compile.py found it), so such a model is refused."""
    for name, module in lm.hf_model.named_modules():
        if getattr(module, "_compiled_call_impl", None) is not None:
            raise ModelError(f"module {name or 'the model'} is compiled (torch.compile): compiled code skips "
                             "the hooks circuitlang's interventions and captures run through",
                             code="model.compiled",
                             hint="load the model again without compiling it; plain passes of a compiled "
                                  "model are fine outside circuitlang")


def _only_read_at_logits(lm: "LoadedModel", plan: _Plan, record_blocks) -> bool:
    """Whether, with the logits unembedded at one token per row, nothing else this pass
    reads is computed by the last block's MLP: then the MLP runs at that token alone.

    Its output, [B, 1, D], broadcasts where the block adds it to the residual stream, so
    every row's other tokens after it hold that token's MLP output: wrong there, right
    at the one token the unembedding reads. Nothing may capture or patch the last MLP,
    its input or the final stream (neurons, latents and subspaces included), and the
    pass records no blocks (a `CleanPass` keeps them whole)."""
    if record_blocks is not None:
        return False
    last = lm.shape.n_layers - 1
    for site in list(plan.capture) + list(plan.patches):
        if isinstance(site, (Head, Embed, TokenEmbed, PosEmbed)):
            continue
        if isinstance(site, (Mlp, MlpIn)) and site.layer < last:
            continue
        if isinstance(site, Resid) and site.layer <= last:
            continue
        return False
    return True


def _last_attention_at_logits(lm: "LoadedModel", plan: _Plan) -> bool:
    """Whether, besides (`_only_read_at_logits`), the last block's attention output is read
    at the logits' token alone: then its output projection runs there only ([B, 1, D],
    broadcast like the MLP's), and under edge patches so do its heads' outputs and the
    inputs of the receivers that read them (the last MLP, the logits: `_Edges.inputs_at`).
    Its keys and values are still computed at every token. Nothing may capture or patch a
    head of the last layer, and the pass takes no gradients (under autograd each sender's
    delta is a tensor of its own, written whole)."""
    if torch.is_grad_enabled():
        return False
    top = lm.shape.n_layers - 1
    return not any(isinstance(s, Head) and s.layer == top for s in list(plan.capture) + list(plan.patches))


def _one_token_hook(at: torch.Tensor):
    """A pre-hook giving a module its input at token `at[b]` of each row b only: [B, 1, D]."""
    def hook(module, args, kwargs):
        x = _only_input(args, kwargs)
        where = at.to(x.device)
        one = x[torch.arange(len(where), device=x.device), where][:, None]
        if args:
            return (one, *args[1:]), kwargs
        return args, {**kwargs, next(iter(kwargs)): one}
    return hook


def _block_of(site: Site) -> int | None:
    """The block in which a patch or capture of `site` acts (Resid(n) is the final norm's
    input: n); None for sites tied to no block's hooks (embeddings, neurons, latents)."""
    if isinstance(site, (Head, Mlp, MlpIn, Resid)):
        return site.layer
    return None


@contextmanager
def only_logit_columns(lm: "LoadedModel", columns: torch.Tensor | None, *, at: torch.Tensor | None = None):
    """Within the block, the model's unembedding computes only `columns` of the logits
    (vocabulary ids; none at all for an empty tensor; None: all): [B, T, len(columns)];
    with `at` (a token index per row, [B]) only there: [B, 1, ...]."""
    module = lm.adapter.unembed()
    unembed = module.forward if columns is None else unembed_columns(lm, columns)
    if at is not None:
        def forward(x, *a, _unembed=unembed, **k):
            where = at.to(x.device)
            return _unembed(x[torch.arange(len(where), device=x.device), where][:, None])
    else:
        forward = unembed
    with ExitStack() as stack:
        _swap_forward(stack, module, forward)
        yield


def unembed_columns(lm: "LoadedModel", columns: torch.Tensor):
    """A forward for the unembedding that computes only `columns` of the logits."""
    module = lm.adapter.unembed()
    weight = resident(module, "weight")
    columns = torch.as_tensor(columns, dtype=torch.long, device=weight.device)
    if isinstance(module, torch.nn.Linear):  # [vocab, d_model]: rows are the columns
        w = weight.index_select(0, columns)
    else:  # HF Conv1D: [d_model, vocab]
        w = weight.index_select(1, columns).t()
    bias = linear_bias(module)
    b = None if bias is None else bias.index_select(0, columns)
    return lambda x, *a, **k: torch.nn.functional.linear(x, w.to(x.device), None if b is None else b.to(x.device))


def _check(lm: "LoadedModel", site: Site) -> None:
    """`check_site`, for neurons and SAE latents `units.check_unit_site`, for subspaces
    `subspace.check_basis`."""
    if is_unit_site(site):
        check_unit_site(lm, site)
    elif is_subspace_site(site):
        check_basis(lm, getattr(site, "unit", site).basis)
    else:
        check_site(lm, site)


def _one_device_for_edges(lm: "LoadedModel") -> None:
    """Edge patches keep every sender's delta in one buffer that receivers in every layer
    read: a model dispatched over several devices (`device_map`) must compute on one
    (offloading to CPU memory or disk is fine: offloaded layers compute on the main device).

    Raises:
        ModelError: layers that compute on more than one device.
    """
    if not getattr(lm.hf_model, "hf_device_map", None):
        return
    devices = lm.buffers.get("execution-devices")
    if devices is None:
        devices = lm.buffers["execution-devices"] = execution_devices(lm.hf_model)
    if len(devices) > 1:
        raise ModelError(f"edge patches need one compute device; this model's layers compute on "
                         f"{', '.join(sorted(map(str, devices)))}", code="model.edges-devices",
                         hint="load it with a device_map of one GPU plus \"cpu\"/\"disk\" offload "
                         "(max_memory= to keep it to one GPU), or on one device")


def _swap_forward(stack: ExitStack, module: torch.nn.Module, forward) -> None:
    """Give `module` another forward for this run; what it had comes back after. A module
    dispatched by accelerate (`device_map`) has a forward of its own (its hook's): that
    one is put back, not removed."""
    own = module.__dict__.get("forward")
    module.forward = forward
    if own is None:
        stack.callback(delattr, module, "forward")
    else:
        stack.callback(setattr, module, "forward", own)


def _hooks(lm: "LoadedModel", plan: _Plan) -> list[tuple[torch.nn.Module, Any, str]]:
    """The (module, hook, 'pre'|'fwd') triples this plan needs, and no others
    (neuron and SAE hooks from `circuitlang.models.units`, in the order they must run)."""
    first, last = unit_hooks(lm, plan)
    sub_first, sub_last = subspace_hooks(lm, plan)  # circuitlang.models.subspace
    return sub_first + first + _component_hooks(lm, plan) + last + sub_last


def _component_hooks(lm: "LoadedModel", plan: _Plan) -> list[tuple[torch.nn.Module, Any, str]]:
    """The hooks of component sites (heads, MLPs, streams, edges)."""
    adapter, shape = lm.adapter, lm.shape
    n = shape.n_layers
    edges = plan.edges
    hooks: list[tuple[torch.nn.Module, Any, str]] = []
    touched = set(plan.capture) | set(plan.patches)

    def simple_output_hook(site: Site):
        def hook(module, args, output):
            return plan.through(site, output)
        return hook

    if TokenEmbed() in touched:
        hooks.append((adapter.token_embed(), simple_output_hook(TokenEmbed()), "fwd"))
    if PosEmbed() in touched:
        hooks.append((adapter.pos_embed(), simple_output_hook(PosEmbed()), "fwd"))

    for layer in range(n):
        if layer < plan.start:
            hooks.append((adapter.blocks()[layer], plan.skipped[layer], "replace"))
            continue
        qkv_recv = edges.qkv_recv.get(layer, {}) if edges else {}
        reuse = plan.reuse is not None and layer == plan.start  # every unit's columns: `_reused_projection`
        rebase = edges is not None and layer in edges.attn_base and not reuse
        qkv_sites = plan.layer_heads(layer, QKV)
        pattern_patch = any(isinstance(s, Head) and s.layer == layer and s.channel is Channel.PATTERN
                            for s in plan.patches)
        some_reused = (layer, Channel.Q) in plan.reused_units  # then every unit's columns are written or zeroed
        need_resid = qkv_sites or bool(qkv_recv) or some_reused
        block_needed = (need_resid or Resid(layer) in touched
                        or (layer == 0 and (Embed() in touched or (edges and edges.embed_slot is not None))))
        if block_needed:
            hooks.append((adapter.blocks()[layer], _block_hook(layer, plan), "pre"))
        if rebase:  # the norm reads an edge input: every projection rewrites the units it misleads
            hooks.append((adapter.attn_norm(layer), _attn_norm_hook(layer, plan), "pre"))
        channels = set(QKV) if rebase or reuse or some_reused else \
            {c for c in QKV if c in qkv_recv or plan.layer_heads(layer, [c])}
        if pattern_patch:
            channels.add(Channel.V)
        by_module: dict[int, tuple[torch.nn.Module, list[Channel]]] = {}
        for c in sorted(channels, key=lambda c: c.value):
            proj = adapter.projection(layer, c)
            by_module.setdefault(id(proj.module), (proj.module, []))[1].append(c)
        for module, chans in by_module.values():
            if some_reused:  # its reused heads' columns stay 0, the others are written
                hooks.append((module, None, "zeros"))
            elif reuse or (edges is not None and _rewrites_every_unit(lm, layer, module, chans, plan)):
                hooks.append((module, None, "skip"))  # its own output would be overwritten whole
            hooks.append((module, _proj_hook(lm, layer, chans, plan, pattern_patch), "fwd"))
        per_head = plan.layer_heads(layer, [Channel.OUT, Channel.PATTERN]) or (
            edges is not None and layer in edges.head_slots)
        if per_head:
            hooks.append((adapter.out_proj(layer), _z_hook(layer, plan), "pre"))
            if some_reused:  # the layer's output is built from its heads' deltas (`edge_reference.attn_with_reused`)
                hooks.append((adapter.out_proj(layer), None, "skip"))
            hooks.append((adapter.attn(layer), _attn_hook(lm, layer, plan), "fwd"))
        if (edges is not None and layer in edges.mlp) or MlpIn(layer) in touched:
            hooks.append((adapter.mlp_norm(layer), _mlp_in_hook(layer, plan), "pre"))
        if edges is not None and Mlp(layer) in edges.reused:  # as in the reference pass: not computed
            hooks.append((adapter.mlp(layer), reused_mlp(layer, plan), "forward"))
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
        if edges is not None and layer in edges.attn:  # (reused columns: the inputs they lack, later)
            plan.attn_in[layer] = None if plan.reuse is not None and layer == plan.start else \
                edges.inputs(x, edges.attn[layer], only=plan.qkv_rows.get(layer))
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
        if plan.reuse is not None and layer == plan.start:
            return _reused_projection(lm, layer, channels, plan, module, output)
        x = plan.resid_pre.get(layer)
        edges = plan.edges
        base, base_row, row_inputs = x, None, None
        if edges is not None and layer in edges.attn:
            row_inputs = plan.attn_in[layer]
            base_row = edges.attn_base.get(layer)
            if base_row is not None:
                base = row_inputs[base_row]
        recvs = edges.qkv_recv.get(layer, {}) if edges is not None else {}
        whole = (layer, Channel.Q) in plan.reused_units  # the module did not run: write every other unit
        direct: dict[int, tuple[torch.Tensor, list[torch.Tensor]]] = {}
        added: dict[int, tuple[torch.Tensor, list[torch.Tensor]]] = {}
        for c in channels:
            proj = adapter.projection(layer, c)
            own: dict[int, torch.Tensor] = {}
            if base is not x or whole:
                own = dict.fromkeys(range(proj.columns.shape[0]), x)
            for unit, i in recvs.get(c, ()):
                j = edges.attn[layer].inverse[i]
                inp = x if row_inputs[j] is None else row_inputs[j]
                if (j == base_row or inp is base) and not whole:
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
            for unit in plan.reused_units.get((layer, c), ()):  # (the module gave zeros: left so)
                own.pop(unit, None)
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


def _reuses_columns(lm: "LoadedModel", plan: _Plan) -> bool:
    """Whether the q/k/v columns of the first layer a resumed pass computes can come from
    the ones earlier passes computed (`edge_engine.ReusedColumns`): edge patches only (no
    node patch or capture, no gradients), and every projection's output columns are its
    units' (so the module itself need not run)."""
    edges, layer = plan.edges, plan.start
    if edges is None or not 0 < layer < lm.shape.n_layers or torch.is_grad_enabled():
        return False
    if plan.capture or plan.patches or not isinstance(edges.delta, torch.Tensor) or layer not in edges.attn:
        return False
    width: dict[int, list] = {}
    for c in QKV:
        proj = lm.adapter.projection(layer, c)
        width.setdefault(id(proj.module), [proj.module, 0])[1] += proj.columns.numel()
    return all(n == linear_weight_in_out(module).shape[1] for module, n in width.values())


def _reused_projection(lm: "LoadedModel", layer: int, channels: list[Channel], plan: _Plan, module,
                       output: torch.Tensor) -> torch.Tensor:
    """Every q/k/v unit's columns of `module` (which did not run: `output` is empty), the
    units reading one input projected together, from `plan.reuse` where an earlier pass
    computed them for the same units and mask row; the inputs of the others are computed
    here (`_Edges.inputs(only=)`)."""
    edges, store = plan.edges, plan.reuse
    group = edges.attn[layer]
    x = plan.resid_pre[layer]
    reads: dict[tuple[Channel, int], int] = {}
    for c, units in edges.qkv_recv.get(layer, {}).items():
        for unit, i in units:
            j = group.inverse[i]
            if group.kinds[j] != CLEAN:
                reads[(c, unit)] = j
    by_row: dict[int | None, list] = {}
    for c in channels:
        proj = lm.adapter.projection(layer, c)
        skip = plan.reused_units.get((layer, c), ())  # (the module gave zeros: left so)
        for unit in range(proj.columns.shape[0]):
            if unit not in skip:
                by_row.setdefault(reads.get((c, unit)), []).append((c, proj, unit))
    senders = edges.sources[:group.prefix]
    keys = {j: (layer, tuple((c.value, u) for c, _, u in units), tuple(x.shape), senders,
                b"clean" if j is None else group.row_key(j)) for j, units in by_row.items()}
    found = {j: store.get(key) for j, key in keys.items()}
    missing = {j for j, y in found.items() if y is None and j is not None}
    inputs = edges.inputs(x, group, only=missing) if missing else [None] * len(group.kinds)
    weight, bias = linear_weight_in_out(module), linear_bias(module)
    norm = lm.adapter.attn_norm(layer)
    for j, units in by_row.items():
        cs = torch.cat([proj.columns[u] for _, proj, u in units])
        y = found[j]
        if y is None:
            normed = norm.forward(x if j is None else inputs[j])
            w = units[0][1].weight[units[0][2]] if len(units) == 1 else weight[:, cs]
            flat = normed.reshape(-1, normed.shape[-1])
            y = (torch.addmm(bias[cs], flat, w) if bias is not None else flat @ w).view(*output.shape[:-1], -1)
            store.put(keys[j], y)
        output.index_copy_(-1, cs, y)
    return output


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
        if (layer, Channel.Q) in plan.reused_units:
            return attn_with_reused(lm, layer, plan, output)
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
        at_one = plan.at is not None and layer == plan.top  # z, heads: at the logits' token
        if sends:
            hs, slots, srcs = edges.head_slots[layer]
            in_delta = (isinstance(hs, slice) and hs == slice(0, n_heads) and isinstance(slots, slice) and not torch.is_grad_enabled()
                        and not any(Head(layer, h) in plan.capture for h in range(n_heads)) and not at_one)
            heads = head_outputs(zh, w_o, edges.delta[slots] if in_delta else None)
        elif patterns:
            heads = head_outputs(zh, w_o)
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
        if sends and at_one:  # heads [B, H, 1, D]: their deltas at that token only
            edges.put_at(slots, plan.at, heads[:, hs, 0].transpose(0, 1) - edges.ablated_at(srcs, plan.at))
        elif sends:
            abl = edges.ablated_of(srcs).transpose(0, 1)
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
        if edges is not None and layer in edges.mlp and Mlp(layer) not in edges.reused:  # (reused: not read)
            if plan.at is not None and layer == plan.top:  # read at one token: computed there only
                xs = edges.inputs_at(x, edges.mlp[layer], plan.at)[0]
                xs = None if xs is None else xs.expand_as(x)
            else:
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
            if Mlp(layer) in edges.reused:  # its reference delta (where the last MLP ran at the logits'
                #                              token, only that token of it is ever read)
                edges.put_reused(i, Mlp(layer))
            elif plan.at is not None and layer == plan.top:  # output [B, 1, D] at the logits' token
                edges.put_at([i], plan.at, (output[:, 0] - edges.ablated_at([src], plan.at)[0])[None])
            else:
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
            if plan.at is not None:  # unembedded at one token per row: the input there only
                xs = edges.inputs_at(x, edges.logits, plan.at)[0]
                xs = None if xs is None else xs.expand_as(x)
            else:
                xs = edges.inputs(x, edges.logits)[0]
            if xs is not None:
                x = xs
        if x is not x0:
            return _replace_first(args, kwargs, "input", x)
        return None
    return hook
