"""Model Breadcrumbs (Davari & Belilovsky, "Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse
Masks", ECCV 2024, arXiv:2312.06795), as mergekit 0.1.5 defines ``breadcrumbs`` and ``breadcrumbs_ties``
(``merge_methods/registry.py``: GeneralizedTaskArithmeticMerge with ``sparsify.magnitude_outliers``).

Each task vector drops its `gamma` fraction of largest-magnitude entries (outliers) and then its smallest, so
that `density` of its entries are kept; ``breadcrumbs`` then sums the weighted vectors (task arithmetic),
``breadcrumbs_ties`` elects signs and takes TIES' disjoint merge. `rescale` is mergekit's: the kept entries are
scaled to the task vector's L1 norm (off by default in both).
"""

from __future__ import annotations

import torch

from malleable.merge.linear import weighted_sum
from malleable.merge.registry import Param, merge_rule
from malleable.merge.ties import NORMALIZE, SCALE, disjoint_merge

DENSITY = Param(1.0, "fraction of each task vector's entries kept (1.0, mergekit's default, keeps all)",
                gt=0.0, le=1.0, per_input=True)
GAMMA = Param(0.01, "fraction of each task vector's entries dropped as the largest-magnitude outliers "
              "(mergekit's default 0.01)", ge=0.0, le=1.0, per_input=True)
RESCALE = Param(False, "scale the kept entries back to the task vector's L1 norm (mergekit's rescale)")


def rescale_l1_(t: torch.Tensor, before: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """mergekit's ``sparsify.rescaled_masked_tensor`` with the L1 norm: scale the masked `t` in place so its
    L1 norm is `before` (the unmasked one's); a norm below `eps` on either side leaves it as it is."""
    after = t.abs().sum()
    if before < eps or after < eps:
        return t
    return t.mul_(before / after)


def magnitude_outliers_(t: torch.Tensor, density: float, gamma: float, rescale: bool) -> torch.Tensor:
    """mergekit's ``sparsify.magnitude_outliers``, in place: sort |t| ascending (torch.sort, as mergekit, so
    ties break alike), keep positions [n_bot, n_bot + k) with k = int(density * n), n_top = int(gamma * n),
    n_bot = max(0, n - k - n_top) (fewer outliers are dropped where density + gamma > 1). Density 1 keeps all,
    outliers too, as in mergekit. Temporaries: the sort's values and int64 indices, about three tensors' worth."""
    if density >= 1:
        return t
    flat = t.view(-1)
    n = flat.numel()
    k, n_top = int(density * n), int(gamma * n)
    n_bot = max(0, n - k - n_top)
    before = flat.abs().sum() if rescale else None
    order = torch.sort(flat.abs(), descending=False).indices
    keep = torch.zeros(n, dtype=torch.bool)
    keep[order[n_bot:n_bot + k]] = True
    del order
    flat.mul_(keep)
    return rescale_l1_(t, before) if rescale else t


PARAMS = {"density": DENSITY, "gamma": GAMMA, "rescale": RESCALE, "scale": SCALE}


@merge_rule("breadcrumbs", params={
    **PARAMS, "normalize": Param(False, "divide the weighted sum by the sum of the weights (mergekit's normalize)"),
})
def breadcrumbs(tensors, weights, generator, density, gamma, rescale, normalize, scale):
    """Model Breadcrumbs (Davari & Belilovsky, 2024): drop each task vector's largest (`gamma`) and smallest
    entries, keeping `density`, then base + scale * sum_i w_i * tau_i (/ sum_i w_i with `normalize`; a sum
    of weights within 1e-8 of 0 counts as 1, as in mergekit)."""
    kept = [magnitude_outliers_(t, d, g, rescale) for t, d, g in zip(tensors, density, gamma)]
    out = weighted_sum(kept, weights)
    if normalize:
        total = sum(weights)
        out /= total if abs(total) >= 1e-8 else 1.0
    return out.mul_(scale)


@merge_rule("breadcrumbs_ties", params={
    **PARAMS, "normalize": Param("none", NORMALIZE.doc + "; mergekit's default for breadcrumbs_ties is false",
                                 choices=NORMALIZE.choices),
})
def breadcrumbs_ties(tensors, weights, generator, density, gamma, rescale, normalize, scale):
    """Model Breadcrumbs' sparsification, then TIES' sign election on the weighted task vectors (the sign of
    their sum) and disjoint merge, as mergekit's breadcrumbs_ties."""
    kept = [magnitude_outliers_(t, d, g, rescale) for t, d, g in zip(tensors, density, gamma)]
    return disjoint_merge(kept, weights, "total", normalize, True).mul_(scale)
