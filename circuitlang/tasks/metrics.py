"""Metric arithmetic on logits: masked means and sums over answer ids, and KL.

Takes logits [N, V] and answer-id tables [N, A] padded with -1; gives per-prompt
tensors [N]. `Task.metric` composes these into `logit_diff`, `prob_diff`, `loss`, `kl`.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    import torch


def _at_least_fp32(values: "torch.Tensor") -> "torch.Tensor":
    """fp16/bf16 logits are read in fp32 (metrics accumulate in fp32); fp64 stays fp64."""
    import torch

    return values if values.dtype == torch.float64 else values.float()


def masked_mean(values: "torch.Tensor", index: "torch.Tensor") -> "torch.Tensor":
    """Mean over the ids in each row of `index` (entries -1 ignored) of `values` [N, V]."""
    index = index.to(values.device)
    valid = index >= 0
    picked = _at_least_fp32(values).gather(1, index.clamp_min(0)) * valid
    return picked.sum(dim=1) / valid.sum(dim=1).clamp_min(1)


def masked_sum(values: "torch.Tensor", index: "torch.Tensor") -> "torch.Tensor":
    """Sum over the ids in each row of `index` (entries -1 ignored) of `values` [N, V]."""
    index = index.to(values.device)
    valid = index >= 0
    return (_at_least_fp32(values).gather(1, index.clamp_min(0)) * valid).sum(dim=1)


def kl_divergence(reference: "torch.Tensor", logits: "torch.Tensor") -> "torch.Tensor":
    """KL(softmax(reference) || softmax(logits)) per row of [N, V] logits."""
    ref = _at_least_fp32(reference).log_softmax(dim=-1)
    new = _at_least_fp32(logits).log_softmax(dim=-1)
    return (ref.exp() * (ref - new)).sum(dim=-1)
