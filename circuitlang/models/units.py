"""Sites below the component: MLP neurons and SAE latents, captured and patched in a run.

Takes a `LoadedModel` and the run engine's plan (`circuitlang.models.run`); gives the
checks for `Neuron`, `Latent` and `SaeError` sites and the hooks that read and write
them, on the modules the adapter names (`Adapter.mlp_out_proj`, `blocks`, `attn`,
`mlp`, `final_norm`).

* A `Neuron(l, n)` is column n of the input of MLP l's output projection (the hidden
  units after the activation, after the gate in gated MLPs), [B, T]. Patching it
  rewrites that column, so the MLP's output moves by `(new - old) * W_out[n]`.
* A dictionary (`sites.Dictionary`) is spliced in at its hook point `x` (the stream
  entering block l, an attention block's output, an MLP block's output): latents
  `f = encode(x)` [B, T, d_sae] and error `e = x - decode(f, x)`. Patching latents or
  the error gives the hook point `x + decode_delta(f' - f, x) + (e' - e)`: an identity
  patch adds exact zeros, so splicing the SAE in with its error term is the plain
  forward pass bit for bit, and a latent patched alone leaves the error as it was
  (Marks et al. 2024).
* `Written(unit)` is captured after the unit's patches: `activation * W_out[n]` for a
  neuron, `Sae.write` for a latent (what the scrubber adds into a stream for a unit).

Nothing is hooked for a layer or dictionary no site of the run touches.
"""
from __future__ import annotations

from collections import defaultdict
from typing import TYPE_CHECKING, Any

import torch

from circuitlang.errors import ModelError
from circuitlang.models.patches import _first, _replace_first, check_place
from circuitlang.models.sae import sae_for
from circuitlang.sites import (
    SAE_HOOKS,
    AllLatents,
    AllNeurons,
    Dictionary,
    Latent,
    LatentIn,
    Neuron,
    SaeError,
    Written,
)

if TYPE_CHECKING:  # pragma: no cover
    from circuitlang.models.load import LoadedModel

UNIT_SITES = (Neuron, Latent, SaeError, AllNeurons, AllLatents, LatentIn, Written)


def is_unit_site(site: Any) -> bool:
    if isinstance(site, Written):
        return isinstance(site.unit, (Neuron, Latent))
    return isinstance(site, UNIT_SITES)


def d_mlp(lm: "LoadedModel", layer: int) -> int:
    """Neurons in MLP `layer` (the width of its output projection's input)."""
    return int(lm.adapter.neuron_out_weight(layer).shape[0])


def check_unit_site(lm: "LoadedModel", site) -> None:
    """Raise ModelError unless a neuron / latent / error site exists in this model."""
    shape = lm.shape
    if isinstance(site, Written):
        site = site.unit
    if isinstance(site, (Neuron, AllNeurons)):
        if not shape.has_mlp:
            raise ModelError(f"{site}: model {shape.name!r} is attention-only", code="model.bad-site",
                             hint="neurons are MLP hidden units; use head, embed, resid or logits sites")
        if not 0 <= site.layer < shape.n_layers:
            raise ModelError(f"{site}: layer {site.layer} out of range", code="model.bad-site",
                             hint=f"model has layers 0-{shape.n_layers - 1}")
        width = d_mlp(lm, site.layer)
        if isinstance(site, Neuron) and not 0 <= site.index < width:
            raise ModelError(f"{site}: neuron {site.index} out of range", code="model.bad-site",
                             hint=f"MLP {site.layer} has neurons 0-{width - 1}")
        return
    sae = check_dictionary(lm, site.sae)
    if isinstance(site, (Latent, LatentIn)) and not 0 <= site.index < sae.d_sae:
        raise ModelError(f"{site}: latent {site.index} out of range", code="model.bad-site",
                         hint=f"SAE {site.sae.name} has latents 0-{sae.d_sae - 1}")


def check_dictionary(lm: "LoadedModel", d: Dictionary):
    """The loaded SAE of a dictionary, checked against the model (hook point, width)."""
    shape = lm.shape
    check_place(shape, d, d.hook, d.layer, SAE_HOOKS, noun="hook point", reads="an SAE reads",
                elsewhere="declare the SAE at resid L or attn L")
    sae = sae_for(d.path, lm.device, lm.dtype)
    if sae.d_in != shape.d_model:
        raise ModelError(f"{d}: the SAE reads width {sae.d_in}, the model's stream is {shape.d_model}",
                         code="model.bad-site", hint="declare an SAE trained on this model")
    return sae


def unit_hooks(lm: "LoadedModel", plan) -> tuple[list, list]:
    """(hooks to register before the engine's own, hooks to register after), as
    (module, hook, 'pre'|'fwd') triples, for the unit sites `plan` captures or patches."""
    adapter, n = lm.adapter, lm.shape.n_layers
    touched = [s for s in set(plan.capture) | set(plan.patches) if is_unit_site(s)]
    first: list = []
    last: list = []
    neurons: dict[int, list[Neuron]] = defaultdict(list)
    saes: dict[Dictionary, list] = defaultdict(list)
    for site in touched:
        unit = site.unit if isinstance(site, Written) else site
        if isinstance(unit, (Neuron, AllNeurons)):
            neurons[unit.layer].append(site)
        else:
            saes[unit.sae].append(site)
    for layer, found in sorted(neurons.items()):
        # single units, every unit (it sees their patches), then what units write
        found = sorted(found, key=lambda s: (isinstance(s, Written), isinstance(s, AllNeurons), _index(s)))
        last.append((adapter.mlp_out_proj(layer), _neuron_hook(found, plan, adapter, layer), "pre"))
    for d, found in sorted(saes.items()):
        sae = check_dictionary(lm, d)
        # what single latents read, single latents, every latent (it sees their patches),
        # then the error term
        order = {LatentIn: 0, Latent: 1, AllLatents: 2, SaeError: 3, Written: 4}
        found = sorted(found, key=lambda s: (order[type(s)], _index(s)))
        if d.hook == "resid":
            # before the engine's block / final-norm hook, so Resid(l) and q/k/v patches
            # see the spliced stream
            module = adapter.blocks()[d.layer] if d.layer < n else adapter.final_norm()
            name = "hidden_states" if d.layer < n else "input"
            first.append((module, _resid_splice(sae, found, plan, name), "pre"))
        elif d.hook == "attn":
            last.append((adapter.attn(d.layer), _output_splice(sae, found, plan), "fwd"))
        else:
            last.append((adapter.mlp(d.layer), _output_splice(sae, found, plan), "fwd"))
    return first, last


def _index(site) -> int:
    unit = site.unit if isinstance(site, Written) else site
    return getattr(unit, "index", 0)


def _neuron_hook(found: list, plan, adapter, layer: int):
    def hook(module, args, kwargs):
        h = args[0] if args else next(iter(kwargs.values()))
        new_h = h
        for site in found:
            if isinstance(site, Written):  # last: the unit as patched, times its row of W_out
                row = adapter.neuron_out_weight(layer)[site.unit.index].to(h.device, h.dtype)
                plan.cache[site] = new_h[..., site.unit.index, None] * row
                continue
            if isinstance(site, AllNeurons):  # after the single units: it sees their patches
                new_h = plan.through(site, new_h)  # under grad, the tensor the projection reads
                continue
            cur = h[..., site.index]
            new = plan.through(site, cur)
            if new is not cur:
                if new_h is h:
                    new_h = h.clone()
                new_h[..., site.index] = new
        if new_h is h:
            return None
        if args:
            return (new_h, *args[1:]), kwargs
        return args, {**kwargs, next(iter(kwargs)): new_h}
    return hook


def _splice(sae, found: list, plan, x: torch.Tensor) -> torch.Tensor:
    """The hook point's new value (`x` itself when nothing is patched).

    Under autograd, a captured `AllLatents` / `SaeError` is a leaf the hook point adds as
    `leaf - leaf.detach()` (exact zeros): its gradient is the metric's gradient with
    respect to the latents (the error), as attribution needs, and the gradient reaching
    `x` is the plain model's."""
    f = sae.encode(x)
    grad = torch.is_grad_enabled()
    df = None
    delta = None
    new_f = f
    for site in found:
        if isinstance(site, Written):  # last: the latent as patched, decoded alone
            i = site.unit.index
            value = f[..., i] if df is None else f[..., i] + df[..., i]
            plan.cache[site] = sae.write(i, value, x)
            continue
        if isinstance(site, SaeError):
            err = x - sae.decode(f, x)
            if grad and site in plan.capture:
                err = err.detach().requires_grad_(True)
            new = plan.through(site, err)
            if new is not err or err.requires_grad:
                step = new - err.detach()
                delta = step if delta is None else delta + step
            continue
        if isinstance(site, AllLatents):  # after the single latents: it sees their patches
            base = f if df is None else f + df
            if grad and site in plan.capture:
                base = base.detach().requires_grad_(True)
            new_f = plan.through(site, base)
            if new_f is not base or base.requires_grad:
                df = new_f - f.detach() if base.requires_grad else new_f - f
            continue
        if isinstance(site, LatentIn):  # the latent re-encoded from its own input
            inp = plan.through(site, x)
            if inp is not x:
                if df is None:
                    df = torch.zeros_like(f)
                df[..., site.index] = sae.encode(inp)[..., site.index] - f[..., site.index]
            continue
        cur = f[..., site.index] if df is None else f[..., site.index] + df[..., site.index]
        new = plan.through(site, cur)
        if new is not cur:
            if df is None:
                df = torch.zeros_like(f)
            df[..., site.index] = new - f[..., site.index]
    if df is not None:
        moved = sae.decode_delta(df, x)
        delta = moved if delta is None else delta + moved
    return x if delta is None else x + delta


def _resid_splice(sae, found: list, plan, name: str):
    def hook(module, args, kwargs):
        x = _first(args, kwargs, name)
        new = _splice(sae, found, plan, x)
        if new is x:
            return None
        return _replace_first(args, kwargs, name, new)
    return hook


def _output_splice(sae, found: list, plan):
    def hook(module, args, output):
        x = output[0] if isinstance(output, tuple) else output
        new = _splice(sae, found, plan, x)
        if new is x:
            return None
        return (new, *output[1:]) if isinstance(output, tuple) else new
    return hook
