"""SCE: Select, Calculate, Erase (Wan et al., "FuseChat: Knowledge Fusion of Chat Models", arXiv:2408.07990),
as mergekit 0.1.5 defines it (``merge_methods/sce.py: sce_merge, sce_weight, sce_mask``)."""

from __future__ import annotations

import torch

from malleable.merge.registry import Param, merge_rule
from malleable.merge.ties import blocks


def variance_(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The population variance across the task vectors, per entry: torch.var(stack, dim=0, unbiased=False),
    as mergekit computes it (the same kernel, so the same rounding, which decides ties at the top-k cut), but
    one block at a time instead of stacking every task vector."""
    var = torch.empty_like(tensors[0])
    for v, *bs in zip(blocks(var), *(blocks(t) for t in tensors)):
        v[:] = torch.var(torch.stack(bs), dim=0, unbiased=False)
    return var


def select_(tensors: list[torch.Tensor], select_topk: float) -> None:
    """mergekit's ``sce_mask``: keep, in every task vector, the entries whose variance across the task vectors
    is among the int(select_topk * (number of non-zero variances)) largest (torch.topk, as mergekit)."""
    if select_topk >= 1:
        return
    var = variance_(tensors)
    k = int(int(torch.count_nonzero(var)) * select_topk)
    keep = torch.zeros(var.numel(), dtype=torch.bool)
    if k > 0:
        keep[torch.topk(var.view(-1), k=k, largest=True).indices] = True  # var >= 0: var.abs() is var
    del var
    for t in tensors:
        t.view(-1).mul_(keep)


@merge_rule("sce", params={
    "select_topk": Param(1.0, "fraction of entries kept, those varying most across the task vectors (1.0, "
                         "mergekit's default, keeps all)", ge=0.0, le=1.0),
})
def sce(tensors, weights, generator, select_topk):
    """SCE (Wan et al., 2024), mergekit's sce: Select the entries of highest variance across the task vectors
    (`select_topk`), Calculate one weight per task vector, its mean squared entry over their sum (equal weights
    if that sum is below 1e-6), Erase entries whose sign disagrees with the sign of the task vectors' sum, and
    take the weighted mean of the rest (divisor clamped at 1e-6). Input weights are ignored, as in mergekit."""
    select_(tensors, select_topk)
    energy = torch.tensor([sum(float(b.square().sum()) for b in blocks(t)) / t.numel() for t in tensors])
    total = float(energy.sum())
    w = torch.full_like(energy, 1 / len(tensors)) if abs(total) < 1e-6 else energy / total
    for block in zip(*(blocks(t) for t in tensors)):
        votes = torch.zeros_like(block[0])
        for b in block:
            votes.add_(b)
        elected = (votes >= 0).to(votes.dtype).mul_(2).sub_(1)
        merged, divisor = torch.zeros_like(votes), torch.zeros_like(votes)
        for b, wi in zip(block, w):
            erased = (b.sign() == elected).to(b.dtype).mul_(wi)  # the weight where the sign agrees, else 0
            merged.add_(b * erased)
            divisor.add_(erased)
        block[0][:] = merged.div_(divisor.clamp_(min=1e-6))
    return tensors[0]
