"""The Karcher (Riemannian) mean on the hypersphere, as mergekit 0.1.5 defines ``karcher``
(``merge_methods/karcher.py: karcher_merge_tensors, karcher_merge_method``)."""

from __future__ import annotations

import torch

from malleable.merge.registry import Param, merge_rule


def karcher_mean(tensors: list[torch.Tensor], alphas: list[float], max_iter: int, tol: float) -> torch.Tensor:
    """mergekit's ``karcher_merge_tensors``: the weighted Karcher mean of the inputs' directions (gradient steps
    on the unit sphere, at most `max_iter`, stopping when the tangent's norm falls below `tol`), times the
    weighted mean of their norms. Inputs with norm <= `tol` take no part in the direction.

    The same floating-point operations in the same order as mergekit (bit-identical results), but in place: the
    inputs become their unit vectors, and every step reuses one mean, one tangent and one scratch buffer where
    mergekit allocates a full-size temporary per operation (fresh memory costs page faults on every step)."""
    if len(tensors) == 1:
        return tensors[0]
    norms = [torch.linalg.vector_norm(t) for t in tensors]
    units = [t if n.item() == 0.0 else t.div_(n) for t, n in zip(tensors, norms)]
    valid = [i for i, n in enumerate(norms) if n.item() > tol]
    if not valid:
        return tensors[0].zero_()
    alpha_sum = sum(alphas[i] for i in valid)
    valid_alphas = [alphas[i] / alpha_sum for i in valid]
    valid_units = [units[i] for i in valid]
    mean = torch.zeros_like(valid_units[0])
    scratch = torch.empty_like(mean)
    for a, u in zip(valid_alphas, valid_units):
        mean += torch.mul(u, a, out=scratch)
    mean_norm = torch.linalg.vector_norm(mean)
    if mean_norm.item() < tol:
        mean.copy_(valid_units[0])
    else:
        mean.div_(mean_norm)
    tangent = torch.empty_like(mean)
    for _ in range(max_iter):
        tangent.zero_()
        for a, u in zip(valid_alphas, valid_units):
            dot = torch.clamp(torch.dot(mean.view(-1), u.view(-1)), -1.0, 1.0)
            theta = torch.arccos(dot)
            if theta.item() < tol:
                continue
            # tangent += a * (theta / sin(theta)) * (u - dot * mean)
            torch.sub(u, torch.mul(dot, mean, out=scratch), out=scratch)
            tangent += scratch.mul_(a * (theta / torch.sin(theta)))
        tangent_norm = torch.linalg.vector_norm(tangent)
        if tangent_norm.item() < tol:
            break
        # mean = cos(|tangent|) * mean + sin(|tangent|) * (tangent / |tangent|)
        torch.div(tangent, tangent_norm, out=scratch).mul_(torch.sin(tangent_norm))
        mean.mul_(torch.cos(tangent_norm)).add_(scratch)
        unit_norm = torch.linalg.vector_norm(mean)
        if unit_norm.item() > tol:
            mean.div_(unit_norm)
    del scratch, tangent
    return mean.mul_(sum(a * n for a, n in zip(alphas, norms)))


@merge_rule("karcher", uses_base=False, params={
    "max_iter": Param(10, "most gradient steps on the sphere", ge=1),
    "tol": Param(1e-5, "stop when the tangent's norm falls below this; inputs of smaller norm are left out of "
                 "the direction", gt=0.0),
})
def karcher(tensors, weights, generator, max_iter, tol):
    """Karcher mean (mergekit's karcher): the Riemannian mean of the models' weight directions on the unit sphere,
    scaled by their mean norm, every model with equal weight (input weights are ignored, as in mergekit). No base:
    a mergekit YAML's base_model is one more input, as mergekit treats it."""
    return karcher_mean(tensors, [1.0 / len(tensors)] * len(tensors), max_iter, tol)
