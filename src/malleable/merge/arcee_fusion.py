"""Arcee Fusion, as mergekit 0.1.5 defines ``arcee_fusion`` (``merge_methods/arcee_fusion.py:
arcee_fusion_merge_method, _compute_importance, DynamicThresholdFusion``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from malleable.merge.registry import merge_rule

BLOCK = 1 << 17  # entries per block in the order-statistics passes: temporaries stay small


def importance(params: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """mergekit's ``_compute_importance``: |params - base| times the KL divergence, along the last axis, between
    softmax(params) and softmax(base) (each plus 1e-8). The same operations in the same order as mergekit, done
    in place on two softmax buffers (no further full-size temporaries)."""
    p = F.softmax(params, dim=-1).add_(1e-8)
    q = F.softmax(base, dim=-1).add_(1e-8)
    kl = torch.sum(torch.div(p, q, out=q).log_().mul_(p), dim=-1, keepdim=True)
    del p, q
    return (params - base).abs_().mul_(kl)


def _order_key(b: torch.Tensor) -> torch.Tensor:
    """int32 keys of float32 `b` that order like the values (a negative float's magnitude bits are flipped)."""
    bits = b.view(torch.int32)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


def sorted_at(t: torch.Tensor, positions: list[int]) -> list[torch.Tensor]:
    """The entries that ascending-sorted flattened float32 `t` holds at `positions` (0-based), exactly, without
    sorting: a histogram of the top 16 bits of an order-preserving integer key finds the bucket holding each
    position, and ``kthvalue`` runs on that bucket's entries only."""
    flat = t.reshape(-1)
    chunks = [flat[i:i + BLOCK] for i in range(0, flat.numel(), BLOCK)]
    hist = torch.zeros(1 << 16, dtype=torch.int64)
    for b in chunks:
        hist += torch.bincount((_order_key(b) >> 16) + (1 << 15), minlength=1 << 16)
    cum = hist.cumsum(0)
    found = []
    for pos in positions:
        j = int(torch.searchsorted(cum, pos, right=True))  # first bucket with more than `pos` entries up to it
        below = int(cum[j] - hist[j])
        cand = torch.cat([b[(_order_key(b) >> 16) + (1 << 15) == j] for b in chunks])
        found.append(cand.kthvalue(pos - below + 1).values)
    return found


def fusion_threshold(scores: torch.Tensor) -> torch.Tensor:
    """mergekit's ``DynamicThresholdFusion``: median + 1.5 * (q3 - q1), the quartiles being the sorted scores at
    index int(q * (n - 1)). mergekit estimates them from 1,000,000 entries drawn at random (with replacement)
    when a tensor has more; we compute the exact order statistics of every entry (`sorted_at`), so our result is
    deterministic and differs from mergekit's only by its sampling."""
    n = scores.numel()
    idx = (torch.tensor([0.25, 0.5, 0.75]) * (n - 1)).long().tolist()  # mergekit's float32 index arithmetic
    if scores.dtype == torch.float32:
        q1, median, q3 = sorted_at(scores, idx)
    else:  # other float types (float64 recipes): sort, exact as well
        q1, median, q3 = torch.sort(scores.reshape(-1)).values[idx]
    return median + 1.5 * (q3 - q1)


@merge_rule("arcee_fusion", uses_base="raw", inputs=(1, 1))
def arcee_fusion(tensors, weights, generator):
    """Arcee Fusion (mergekit's arcee_fusion): take the other model's value where its importance
    (|other - base| times the per-row KL divergence of their softmaxes) reaches the upper outlier fence of the
    importances, median + 1.5 IQR, and the base's elsewhere. Needs a base and exactly one input; weights are
    ignored. Differs from mergekit only on tensors of more than 1M entries, where mergekit estimates the
    quartiles from 1M sampled entries and we compute them exactly over all entries."""
    base, other = tensors
    scores = importance(other, base)
    keep = scores >= fusion_threshold(scores)
    del scores
    return other.sub_(base).mul_(keep).add_(base)
