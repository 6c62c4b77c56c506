"""DELLA-Merging (Deep et al., "DELLA-Merging: Reducing Interference in Model Merging through
Magnitude-Based Sampling", arXiv:2406.11617), as mergekit 0.1.5 defines ``della`` and ``della_linear``
(``merge_methods/registry.py``: GeneralizedTaskArithmeticMerge with ``sparsify.della_magprune``).

MagPrune: within each row of a task vector (a 1-D tensor is one row), the entry of magnitude rank r (1 = the
smallest, of n) is kept with probability density - epsilon + 2 epsilon (r - 1) / (n - 1), so large entries
survive more often; with `rescale` (on by default, as in mergekit) the kept entries are scaled to the whole
task vector's L1 norm (mergekit's rescale; the paper divides each kept entry by its probability instead).
``della`` then elects signs and takes TIES' disjoint merge, ``della_linear`` sums (task arithmetic).

The draws are random: masks come from the per-tensor generator (`torch.bernoulli(probs, generator=...)`), so
the same seed gives the same bytes, but never mergekit's draws (its global RNG in its task order).
"""

from __future__ import annotations

import torch

from malleable.errors import RecipeError
from malleable.merge.breadcrumbs import rescale_l1_
from malleable.merge.linear import weighted_sum
from malleable.merge.registry import Param, merge_rule
from malleable.merge.ties import NORMALIZE, SCALE, disjoint_merge

DENSITY = Param(1.0, "mean fraction of each task vector's entries kept (1.0, mergekit's default, keeps all)",
                gt=0.0, le=1.0, per_input=True)
EPSILON = Param(0.15, "spread of the keep probabilities around density: from density - epsilon (smallest "
                "entry of a row) to density + epsilon (largest); density +- epsilon must lie in (0, 1) "
                "(mergekit's default 0.15)", ge=0.0, per_input=True)
RESCALE = Param(True, "scale the kept entries back to the task vector's L1 norm (mergekit's rescale, on by "
                "default for della)")


def keep_probabilities(t: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """mergekit's ``della_magprune`` probabilities for `t` (2-D or more: ranks along dim 1; 1-D: one row):
    density - epsilon + 2 epsilon * (rank - min rank) / (max rank - min rank). A row of one entry (0/0 in
    mergekit) gets probability density.

    mergekit ranks with a second argsort of the first; the ranks of a row are then 1..n, so the normalised rank
    of the entry at sorted position i is i / (n - 1), scattered back through the first argsort: the same float32
    values bit for bit at half the cost (the second sort was half of della's time on a 1B model)."""
    x = t.unsqueeze(0) if t.dim() < 2 else t
    n = x.shape[1]
    order = torch.argsort(x.abs(), dim=1)
    by_position = torch.arange(n, dtype=torch.float32) / (n - 1) if n > 1 else torch.full((1,), 0.5)
    by_position = by_position.view(1, n, *[1] * (x.dim() - 2)).expand(x.shape)
    rank_norm = torch.empty(x.shape, dtype=torch.float32).scatter_(1, order, by_position)
    del order
    return (density - epsilon) + rank_norm * 2 * epsilon


def della_magprune_(t: torch.Tensor, density: float, epsilon: float, rescale: bool,
                    generator: torch.Generator) -> torch.Tensor:
    """Drop entries of the task vector `t` in place with MagPrune's probabilities (mergekit's della_magprune)."""
    if density >= 1:
        return t
    if density + epsilon >= 1 or density - epsilon <= 0:
        raise RecipeError(f"parameters.epsilon: density {density} +- epsilon {epsilon} must lie in (0, 1) "
                          "(mergekit's della requirement)")
    before = t.abs().sum() if rescale else None
    mask = torch.bernoulli(keep_probabilities(t, density, epsilon), generator=generator)
    t.mul_(mask.view(t.shape))
    del mask
    return rescale_l1_(t, before) if rescale else t


PARAMS = {"density": DENSITY, "epsilon": EPSILON, "rescale": RESCALE, "scale": SCALE}


def _pruned(tensors, density, epsilon, rescale, generator):
    return [della_magprune_(t, d, e, rescale, generator) for t, d, e in zip(tensors, density, epsilon)]


@merge_rule("della", random=True, params={
    **PARAMS, "normalize": Param("weights", NORMALIZE.doc + "; mergekit's default for della is true ('weights')",
                                 choices=NORMALIZE.choices),
})
def della(tensors, weights, generator, density, epsilon, rescale, normalize, scale):
    """DELLA (Deep et al., 2024): MagPrune each task vector (keep probability rising with magnitude rank),
    then elect signs from the weighted vectors and take the disjoint mean, times `scale` (mergekit's della)."""
    kept = _pruned(tensors, density, epsilon, rescale, generator)
    return disjoint_merge(kept, weights, "total", normalize, True).mul_(scale)


@merge_rule("della_linear", random=True, params={
    **PARAMS, "normalize": Param(False, "divide the weighted sum by the sum of the weights (mergekit's normalize)"),
})
def della_linear(tensors, weights, generator, density, epsilon, rescale, normalize, scale):
    """DELLA's MagPrune, then task arithmetic: base + scale * sum_i w_i * tau_i (/ sum_i w_i with
    `normalize`; a sum within 1e-8 of 0 counts as 1), as mergekit's della_linear."""
    out = weighted_sum(_pruned(tensors, density, epsilon, rescale, generator), weights)
    if normalize:
        total = sum(weights)
        out /= total if abs(total) >= 1e-8 else 1.0
    return out.mul_(scale)
