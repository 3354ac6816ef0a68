"""Node-level attribution over neurons, SAE latents and error terms (feature circuits).

Takes a `LoadedModel`, clean and corrupt token ids, a differentiable metric and the
units to score (`AllLatents(sae)`, `AllNeurons(layer)`, `SaeError(sae)`, or single
`Latent` / `Neuron` sites, which are read off their layer's unit); gives a
`NodeAttribution`: for every unit, the first-order estimate of how the metric moves
when that unit alone takes its corrupt value (attribution patching, Nanda 2023;
Syed et al. 2023; over SAE latents and error terms as in Marks et al. 2024):

    effect(u) ~= sum over positions of (u_corrupt - u_clean) * d metric / d u  (at clean)

Cost per batch: one forward pass of the corrupt prompts (no graph) and one forward +
backward pass of the clean ones, whatever the number of units (every latent of a
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

__all__ = ["NodeAttribution", "attribute_nodes", "unit_of"]

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
    corrupt_ids: torch.Tensor,
    metric: Callable[[torch.Tensor, slice], torch.Tensor],
    sites: Iterable[Site],
    *,
    attention_mask: torch.Tensor | None = None,
    positions: torch.Tensor | None = None,
    batch_size: int = 32,
) -> NodeAttribution:
    """Attribution patching over nodes, in two passes per batch.

    Args:
        lm: the `LoadedModel`.
        clean_ids, corrupt_ids: LongTensor [N, T], aligned prompt pairs.
        metric: `metric(logits, rows)` -> [B] per-prompt metric, differentiable in the
            logits; `rows` is the slice of the N prompts the batch holds.
        sites: what to score (see the module docstring).
        attention_mask: [N, T] (1 for real tokens); padding never counts.
        positions: LongTensor [N]: score each node at this position only (`at END`);
            None sums over every real token.
        batch_size: prompts per pass.

    Returns:
        A `NodeAttribution`, its sites in the order given (units expanded).

    Raises:
        ModelError: a site that is not a neuron, latent or error term.
    """
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
    passes = 0
    for start in range(0, n, batch_size):
        rows = slice(start, min(n, start + batch_size))
        mask = attention_mask[rows]
        corrupt = lm.run(corrupt_ids[rows], mask, capture=units)
        clean = lm.run(clean_ids[rows], mask, capture=units, grad=True)
        passes += 2
        value = metric(clean.logits, rows).sum()
        grads = torch.autograd.grad(value, [clean.cache[u] for u in units], allow_unused=True)
        weight = mask.to(device=clean.logits.device, dtype=torch.float32)
        if positions is not None:
            at = positions[rows].to(weight.device)
            weight = torch.zeros_like(weight).scatter_(1, at[:, None], 1.0)
        for unit, grad in zip(units, grads):
            moved = corrupt.cache[unit].detach() - clean.cache[unit].detach()
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


def _width(lm, site: Site) -> int:
    from circuitlang.models.units import check_dictionary, d_mlp

    if isinstance(site, AllNeurons):
        return d_mlp(lm, site.layer)
    return check_dictionary(lm, site.sae).d_sae
