"""Attribution patching: a score for every edge from mask gradients (EAP and EAP-IG).

Takes a `Problem`; gives `Scores`: for every candidate edge, the first-order estimate
of how much the (mean) metric changes when that edge alone is ablated, and node
scores (a head's or an MLP's, summed over its outgoing edges). Rank edges by the
magnitude of their score.

* **EAP** (Syed et al. 2023): the gradient of the metric with respect to the edge's
  ablation mask at the full model (one forward and one backward pass per batch).
  Equal, up to sign, to auto-circuit's `mask_gradient_prune_scores(mask_val=0)` (which
  differentiates minus the metric; tests/peers).
* **EAP-IG** (Hanna et al. 2024), integrated gradients along a straight path, `steps`
  points (MIB's default: 5):
  - `inputs` (MIB's recommended default): the input embeddings move from the
    counterfactual's to the clean prompt's (`alpha = 1/steps ... 1`); at each point the
    gradient is taken and every edge's difference is its sender's clean-minus-ablated
    output. Needs `ablation corrupt` (the path ends at the counterfactual).
  - `activations`: every sender's output moves from ablated to clean (the mask goes
    from 1 to 0 on every edge at once), the gradient taken at each point.
  - `clean-corrupt`: the two ends only, averaged (a two-point trapezoid: the gradient
    on the full model and on the fully ablated one).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from circuitlang.discover.problem import Problem
from circuitlang.errors import DiscoveryError
from circuitlang.sites import Embed, Head, Mlp, Site

__all__ = ["IG_VARIANTS", "Scores", "eap", "eap_ig", "node_scores"]

IG_VARIANTS = ("inputs", "activations", "clean-corrupt")


@dataclass(frozen=True, eq=False)
class Scores:
    """Per-edge scores over a problem's edge space, and per-node sums.

    Attributes:
        edges: FloatTensor [E]: the estimated change of the mean metric when the edge is
            ablated (negative: ablating it hurts a higher-is-better metric).
        method: how they were computed (`eap`, `eap-ig-inputs`, ...).
        space: the edge space they index.
    """

    edges: torch.Tensor
    method: str
    space: object

    def importance(self) -> torch.Tensor:
        """|score| per edge: what ranking uses."""
        return self.edges.abs()

    def ranking(self) -> torch.Tensor:
        """Edge indices, most important first (ties broken by index, stable)."""
        return torch.argsort(-self.importance(), stable=True)

    def by_edge(self) -> dict:
        """{(sender, receiver, position): score}, keyed by typed sites."""
        return {edge: float(v) for edge, v in zip(self.space.edges(), self.edges.tolist())}

    def nodes(self) -> dict[Site, float]:
        """Per sender: the sum of its outgoing edges' scores (a node's attribution)."""
        return node_scores(self)


def eap(problem: Problem) -> Scores:
    """Edge attribution patching: mask gradients at the full model."""
    return Scores(problem.gradients(1.0).float(), "eap", problem.space)


def eap_ig(problem: Problem, variant: str = "inputs", steps: int = 5) -> Scores:
    """Edge attribution patching with integrated gradients (see the module docstring).

    Raises:
        DiscoveryError: an unknown variant, steps < 1, or `inputs` without corrupt ablation.
    """
    if variant not in IG_VARIANTS:
        raise DiscoveryError(f"unknown EAP-IG variant {variant!r}", code="discover.ig-variant",
                             hint="variants: " + ", ".join(IG_VARIANTS))
    if steps < 1:
        raise DiscoveryError(f"EAP-IG needs at least one step, got {steps}", code="discover.ig-steps",
                             hint="MIB's default is 5")
    if variant == "clean-corrupt":
        total = problem.gradients(1.0) + problem.gradients(0.0)
        return Scores((total / 2).float(), "eap-ig-clean-corrupt", problem.space)
    if variant == "inputs" and problem.ablation != "corrupt":
        raise DiscoveryError("EAP-IG over inputs interpolates toward the counterfactual prompt, so it "
                             f"needs corrupt ablation (got {problem.ablation})", code="discover.ig-ablation",
                             hint="use --ablation corrupt, or --ig activations")
    total = torch.zeros(len(problem.space), dtype=torch.float64)
    for k in range(1, steps + 1):
        alpha = k / steps
        if variant == "inputs":
            total += problem.gradients(1.0, inputs_alpha=alpha)
        else:
            total += problem.gradients(alpha)
    return Scores((total / steps).float(), f"eap-ig-{variant}", problem.space)


def node_scores(scores: Scores) -> dict[Site, float]:
    """Per sender (embed, head, MLP): the sum of its outgoing edges' scores."""
    out: dict[Site, float] = {}
    for (sender, _, _), value in zip(scores.space.edges(), scores.edges.tolist()):
        out[sender] = out.get(sender, 0.0) + value
    order = {s: i for i, s in enumerate(scores.space.edge_set.senders)}
    return dict(sorted(out.items(), key=lambda item: order[item[0]]))


def is_node(site: Site) -> bool:
    return isinstance(site, (Embed, Head, Mlp))
