"""The Karcher (Riemannian) mean on the hypersphere, as mergekit 0.1.5 defines ``karcher``
(``merge_methods/karcher.py: karcher_merge_tensors, karcher_merge_method``)."""

from __future__ import annotations

import torch

from malleable.merge.registry import Param, merge_rule


def karcher_mean(tensors: list[torch.Tensor], alphas: list[float], max_iter: int, tol: float) -> torch.Tensor:
    """mergekit's ``karcher_merge_tensors``: the weighted Karcher mean of the inputs' directions (gradient steps
    on the unit sphere, at most `max_iter`, stopping when the tangent's norm falls below `tol`), times the
    weighted mean of their norms. Inputs with norm <= `tol` take no part in the direction. Works in place."""
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
    for a, u in zip(valid_alphas, valid_units):
        mean += a * u
    mean_norm = torch.linalg.vector_norm(mean)
    mean = valid_units[0].clone() if mean_norm.item() < tol else mean / mean_norm
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for a, u in zip(valid_alphas, valid_units):
            dot = torch.clamp(torch.dot(mean.view(-1), u.view(-1)), -1.0, 1.0)
            theta = torch.arccos(dot)
            if theta.item() < tol:
                continue
            tangent += a * (theta / torch.sin(theta)) * (u - dot * mean)
        tangent_norm = torch.linalg.vector_norm(tangent)
        if tangent_norm.item() < tol:
            break
        mean = torch.cos(tangent_norm) * mean + torch.sin(tangent_norm) * (tangent / tangent_norm)
        unit_norm = torch.linalg.vector_norm(mean)
        if unit_norm.item() > tol:
            mean = mean / unit_norm
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
