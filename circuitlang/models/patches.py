"""Checking that a site exists in a model, and applying a `Patch`'s value to a tensor."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from circuitlang.errors import ModelError
from circuitlang.models.interventions import Patch
from circuitlang.sites import Channel, Embed, Head, Logits, Mlp, MlpIn, PosEmbed, Resid, Site, TokenEmbed

if TYPE_CHECKING:  # pragma: no cover
    from circuitlang.models.load import LoadedModel


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


def check_place(shape, what, hook: str, layer: int, hooks: tuple[str, ...], *, noun: str, reads: str,
                elsewhere: str) -> None:
    """Raise ModelError unless `hook` at `layer` is a place of this model that `what` (an
    SAE dictionary, a subspace) can sit at: one of `hooks`, a layer in range (`resid`
    takes n_layers too, the final stream), and an MLP only where the model has one.
    `noun` names the place in messages, `reads` the hint's verb, `elsewhere` where an
    attention-only model lets it sit."""
    if hook not in hooks:
        raise ModelError(f"{what}: unknown {noun} {hook!r}", code="model.bad-site",
                         hint=f"{reads} " + ", ".join(hooks))
    top = shape.n_layers if hook == "resid" else shape.n_layers - 1
    if not 0 <= layer <= top:
        raise ModelError(f"{what}: layer {layer} out of range", code="model.bad-site",
                         hint=f"{hook} takes layers 0-{top}")
    if hook == "mlp" and not shape.has_mlp:
        raise ModelError(f"{what}: model {shape.name!r} is attention-only", code="model.bad-site",
                         hint=elsewhere)


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

