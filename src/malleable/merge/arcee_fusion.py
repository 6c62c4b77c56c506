"""Arcee Fusion, as mergekit 0.1.5 defines ``arcee_fusion`` (``merge_methods/arcee_fusion.py:
arcee_fusion_merge_method, _compute_importance, DynamicThresholdFusion``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from malleable.merge.registry import merge_rule


def importance(params: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """mergekit's ``_compute_importance``: |params - base| times the KL divergence, along the last axis, between
    softmax(params) and softmax(base) (each plus 1e-8)."""
    p = F.softmax(params, dim=-1) + 1e-8
    q = F.softmax(base, dim=-1) + 1e-8
    kl = torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
    del p, q
    return (params - base).abs_().mul_(kl)


def fusion_threshold(scores: torch.Tensor) -> torch.Tensor:
    """mergekit's ``DynamicThresholdFusion``: median + 1.5 * (q3 - q1), the quartiles read from the sorted scores
    at index int(q * (n - 1)). mergekit estimates them from 1,000,000 entries drawn with replacement when a tensor
    has more; we sort every entry (exact, and no random draw)."""
    s = torch.sort(scores.reshape(-1)).values
    q1, median, q3 = s[(torch.tensor([0.25, 0.5, 0.75]) * (s.numel() - 1)).long()]
    return median + 1.5 * (q3 - q1)


@merge_rule("arcee_fusion", uses_base="raw", inputs=(1, 1))
def arcee_fusion(tensors, weights, generator):
    """Arcee Fusion (mergekit's arcee_fusion): take the other model's value where its importance
    (|other - base| times the per-row KL divergence of their softmaxes) reaches the upper outlier fence of the
    importances, median + 1.5 IQR, and the base's elsewhere. Needs a base and exactly one input; weights are
    ignored. Differs from mergekit only on tensors of more than 1M entries, where mergekit samples the quartiles
    and we compute them exactly."""
    base, other = tensors
    scores = importance(other, base)
    keep = scores >= fusion_threshold(scores)
    del scores
    return other.sub_(base).mul_(keep).add_(base)
