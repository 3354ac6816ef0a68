"""Node-level attribution over neurons, SAE latents and error terms (feature circuits).

Takes a `LoadedModel`, clean and corrupt token ids, a differentiable metric and the
units to score (`AllLatents(sae)`, `AllNeurons(layer)`, `SaeError(sae)`, or single
`Latent` / `Neuron` sites, which are read off their layer's unit); gives a
`NodeAttribution`: for every unit, the first-order estimate of how the metric moves
when that unit alone takes its corrupt value (attribution patching, Nanda 2023;
Syed et al. 2023; over SAE latents and error terms as in Marks et al. 2024):

    effect(u) ~= sum over positions of (u_corrupt - u_clean) * d metric / d u  (at clean)

What "corrupt" is follows `baseline`: each prompt's paired donor (`paired`: the task's
counterfactual, or a resampled prompt, whichever ids are given), the unit's dataset mean
per position over the clean prompts (`mean`), or zero (`zero`).

Cost per batch: one forward pass of the donor prompts (no graph; for `mean`, one pass of
each batch before the first, for the means) and one forward + backward pass of the clean
ones, whatever the number of units (every latent of a
16 x d_model dictionary costs what one does). The gradients come from the run
engine: under autograd a captured `AllLatents` / `SaeError` is a leaf spliced in with
exact zeros (`circuitlang.models.units`), `AllNeurons` is the tensor the MLP's output
projection reads.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from circuitlang.errors import ModelError
from circuitlang.sites import AllLatents, AllNeurons, Latent, Neuron, SaeError, Site

__all__ = ["BASELINES", "NodeAttribution", "attribute_nodes", "unit_of"]

#: What a unit is moved to: its value on the paired donor prompt, its mean, or zero.
BASELINES = ("paired", "mean", "zero")

_UNITS = (AllLatents, AllNeurons, SaeError)


def unit_of(site: Site) -> tuple[Site, int | None]:
    """The captured unit a site is read from, and its column (None: the unit itself)."""
    if isinstance(site, Latent):
        return AllLatents(site.sae), site.index
    if isinstance(site, Neuron):
        return AllNeurons(site.layer), site.index
    if isinstance(site, _UNITS):
        return site, None
    raise ModelError(f"{site} cannot be attributed at node level", code="model.bad-attribution",
                     hint="attribution covers neurons, SAE latents and SAE error terms "
                     "(for heads and edges use `circuitlang discover` with EAP)")


@dataclass(frozen=True, eq=False)
class NodeAttribution:
    """Estimated effects of single nodes.

    Attributes:
        sites: the nodes scored (every latent of an `AllLatents` is its own `Latent`;
            every unit of an `AllNeurons` its own `Neuron`).
        per_prompt: [n_sites, n_prompts]: the estimated change of the metric on each
            prompt when that node alone takes its corrupt value.
        passes: forward passes run (a forward + backward counts one).
    """

    sites: tuple[Site, ...]
    per_prompt: torch.Tensor
    passes: int

    @property
    def scores(self) -> torch.Tensor:
        """[n_sites]: the mean estimated change of the metric."""
        return self.per_prompt.mean(1)

    def top(self, k: int) -> list[tuple[Site, float]]:
        """The `k` nodes with the largest |estimated effect|, largest first."""
        scores = self.scores
        order = torch.argsort(scores.abs(), descending=True)[: max(0, k)]
        return [(self.sites[i], float(scores[i])) for i in order.tolist()]


def attribute_nodes(
    lm,
    clean_ids: torch.Tensor,
    corrupt_ids: torch.Tensor | None,
    metric: Callable[[torch.Tensor, slice], torch.Tensor],
    sites: Iterable[Site],
    *,
    attention_mask: torch.Tensor | None = None,
    positions: torch.Tensor | None = None,
    batch_size: int = 32,
    baseline: str = "paired",
) -> NodeAttribution:
    """Attribution patching over nodes, in two passes per batch (one with `zero`).

    Args:
        lm: the `LoadedModel`.
        clean_ids, corrupt_ids: LongTensor [N, T], aligned prompt pairs (`corrupt_ids`
            None unless `baseline` is `paired`).
        metric: `metric(logits, rows)` -> [B] per-prompt metric, differentiable in the
            logits; `rows` is the slice of the N prompts the batch holds.
        sites: what to score (see the module docstring).
        attention_mask: [N, T] (1 for real tokens); padding never counts.
        positions: LongTensor [N]: score each node at this position only (`at END`);
            None sums over every real token.
        batch_size: prompts per pass.
        baseline: `paired` (each unit moves to its value on the prompt's donor in
            `corrupt_ids`), `mean` (to its mean over the clean prompts' real tokens, per
            position) or `zero`.

    Returns:
        A `NodeAttribution`, its sites in the order given (units expanded).

    Raises:
        ModelError: a site that is not a neuron, latent or error term; a `baseline` not in
            `BASELINES`, or donor ids given (or missing) against it.
    """
    if baseline not in BASELINES:
        raise ModelError(f"unknown attribution baseline {baseline!r}", code="model.bad-attribution",
                         hint="use " + ", ".join(BASELINES))
    if (corrupt_ids is None) != (baseline != "paired"):
        raise ModelError(f"baseline {baseline!r} " + ("needs" if baseline == "paired" else "takes no")
                         + " donor ids", code="model.bad-attribution",
                         hint="pass corrupt_ids with `paired`, None with `mean` or `zero`")
    requested = list(dict.fromkeys(sites))
    units = list(dict.fromkeys(unit_of(s)[0] for s in requested))
    expanded: list[Site] = []
    for site in requested:
        if isinstance(site, AllLatents):
            expanded += [Latent(site.sae, i) for i in range(_width(lm, site))]
        elif isinstance(site, AllNeurons):
            expanded += [Neuron(site.layer, i) for i in range(_width(lm, site))]
        else:
            expanded.append(site)
    n = clean_ids.shape[0]
    if attention_mask is None:
        attention_mask = torch.ones_like(clean_ids)
    columns: dict[Site, list[torch.Tensor]] = {u: [] for u in units}
    constant, passes = None, 0
    if baseline == "mean":
        constant, passes = _means(lm, clean_ids, attention_mask, units, batch_size)
    for start in range(0, n, batch_size):
        rows = slice(start, min(n, start + batch_size))
        mask = attention_mask[rows]
        if baseline == "paired":
            donor = lm.run(corrupt_ids[rows], mask, capture=units).cache
            passes += 1
        clean = lm.run(clean_ids[rows], mask, capture=units, grad=True)
        passes += 1
        value = metric(clean.logits, rows).sum()
        grads = torch.autograd.grad(value, [clean.cache[u] for u in units], allow_unused=True)
        weight = mask.to(device=clean.logits.device, dtype=torch.float32)
        if positions is not None:
            at = positions[rows].to(weight.device)
            weight = torch.zeros_like(weight).scatter_(1, at[:, None], 1.0)
        for unit, grad in zip(units, grads):
            here = clean.cache[unit].detach()
            if baseline == "paired":
                moved = donor[unit].detach() - here
            elif baseline == "mean":
                moved = constant[unit].to(here)[:, : here.shape[1]] - here
            else:
                moved = -here
            if grad is None:  # the unit does not reach the metric
                grad = torch.zeros_like(moved)
            effect = (moved * grad.detach()).float()
            if isinstance(unit, SaeError):
                effect = effect.sum(-1, keepdim=True)
            columns[unit].append(torch.einsum("bt,btu->ub", weight, effect).cpu())
    table = {u: torch.cat(parts, 1) for u, parts in columns.items()}  # unit -> [width, N]
    rows_out = []
    for site in expanded:
        unit, column = unit_of(site)
        rows_out.append(table[unit][0 if column is None else column])
    return NodeAttribution(tuple(expanded), torch.stack(rows_out), passes)


def _means(lm, ids: torch.Tensor, attention_mask: torch.Tensor, units: list[Site], batch_size: int
           ) -> tuple[dict[Site, torch.Tensor], int]:
    """Each unit's mean value per position over the prompts' real tokens: unit -> [1, T, width],
    and the passes run."""
    total: dict[Site, torch.Tensor] = {}
    count, passes = None, 0
    for start in range(0, ids.shape[0], batch_size):
        rows = slice(start, start + batch_size)
        cache = lm.run(ids[rows], attention_mask[rows], capture=units).cache
        passes += 1
        m = attention_mask[rows].to(torch.float32)[:, :, None]
        for unit in units:
            part = (cache[unit].detach().float() * m.to(cache[unit].device)).sum(0, keepdim=True)
            total[unit] = part if unit not in total else total[unit] + part
        part = m.sum(0, keepdim=True)
        count = part if count is None else count + part
    return {u: t / count.to(t.device).clamp(min=1) for u, t in total.items()}, passes


def _width(lm, site: Site) -> int:
    from circuitlang.models.units import check_dictionary, d_mlp

    if isinstance(site, AllNeurons):
        return d_mlp(lm, site.layer)
    return check_dictionary(lm, site.sae).d_sae
