"""RAM, Reinforced Agent Merging (arXiv:2601.13572), and its tensor-local RAM+, as mergekit defines ``ram`` and
``ramplus_tl`` (``merge_methods/ram.py: ram_merge, ramplus_tl_merge, _prepare_ram_vectors``; the file is the
same in mergekit 0.1.5 and on main).

Both look at which task vectors touch each entry (|tau_i| > epsilon): an entry touched by one model takes that
model's value, one touched by several the mean of theirs (untouched entries stay the base's). mergekit writes
it as two terms, unique entries and overlapping ones; with one contributor the mean is the value itself, so we
compute both through the same masked sum, one block of entries at a time.
"""

from __future__ import annotations

import torch

from malleable.merge.registry import Param, merge_rule
from malleable.merge.ties import blocks

EPSILON = Param(1e-5, "an entry of a task vector counts as touched where its magnitude exceeds this", ge=0.0)


def _counts(block: tuple[torch.Tensor, ...], epsilon: float) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Per task vector, where it is touched; and per entry, how many touch it."""
    touched = [b.abs() > epsilon for b in block]
    count = torch.zeros(block[0].shape, dtype=torch.int64)
    for t in touched:
        count.add_(t)
    return touched, count


def _merge(tensors: list[torch.Tensor], epsilon: float, unique_scale: list[float]) -> torch.Tensor:
    """Sum over the task vectors of tau_i * touched_i * (unique_scale_i where only i touches the entry, else
    1 / contributors), block by block, written into tensors[0]."""
    for block in zip(*(blocks(t) for t in tensors)):
        touched, count = _counts(block, epsilon)
        shared = count > 1
        merged = torch.zeros_like(block[0])
        for b, t, s in zip(block, touched, unique_scale):
            merged.add_(torch.where(shared, b / count.clamp(min=1), b * s).mul_(t))
        block[0][:] = merged
    return tensors[0]


@merge_rule("ram", params={"epsilon": EPSILON})
def ram(tensors, weights, generator, epsilon):
    """RAM (mergekit's ram): where one task vector touches an entry (|tau_i| > epsilon) its value is kept whole;
    where several do, their mean (the contributors' only); entries no task vector touches keep the base's.
    Needs a base; input weights are ignored, as in mergekit."""
    return _merge(tensors, epsilon, [1.0] * len(tensors))


@merge_rule("ramplus_tl", params={
    "r": Param(0.1, "strength of the boost to a model's unique entries", ge=0.0),
    "alpha": Param(0.2, "cap on a model's overlap ratio in the boost", ge=0.0),
    "epsilon": EPSILON,
})
def ramplus_tl(tensors, weights, generator, r, alpha, epsilon):
    """RAM+ tensor-local (mergekit's ramplus_tl): RAM, with each model's unique entries scaled by
    lambda_i = 1 + r * clamp(rho_i, 0, alpha), where rho_i is, within this tensor, the number of entries model i
    shares with another model over the number only it touches. A model with no unique entry in a tensor has no
    entry to scale (mergekit divides by epsilon there, and with epsilon 0 gets 0/0 = NaN, which turns the whole
    tensor to NaN; we skip it). Needs a base; input weights are ignored, as in mergekit."""
    shared_n, unique_n = [0] * len(tensors), [0] * len(tensors)
    for block in zip(*(blocks(t) for t in tensors)):
        touched, count = _counts(block, epsilon)
        for i, t in enumerate(touched):
            shared_n[i] += int((t & (count > 1)).sum())
            unique_n[i] += int((t & (count == 1)).sum())
    scale = [1 + r * min(s / u, alpha) if u else 1.0 for s, u in zip(shared_n, unique_n)]
    return _merge(tensors, epsilon, scale)
