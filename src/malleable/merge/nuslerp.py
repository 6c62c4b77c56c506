"""NuSLERP and Multi-SLERP: spherical interpolation of two or more models, of their task vectors when a base is
given and of their weights when not (``uses_base="optional"``). Both follow mergekit 0.1.5
(``merge_methods/nuslerp.py: nuslerp, nuslerp_merge_method``; ``merge_methods/multislerp.py: multislerp``).
"""

from __future__ import annotations

import torch

from malleable.errors import InputError
from malleable.merge.registry import Param, merge_rule


def nuslerp_(t: float, v0: torch.Tensor, v1: torch.Tensor, dim: int = -1, eps: float = 1e-8,
             flatten: bool = False) -> torch.Tensor:
    """mergekit's ``nuslerp``: slerp from `v0` (t=0) to `v1` (t=1) along `dim` (each vector along it separately),
    or of the flattened tensors with `flatten`. Vectors are normalised (norm clamped at 1e-7) only to find the
    angle; the coefficients multiply the raw vectors; where 1 - cos^2 <= eps^2 it interpolates linearly."""
    out_shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif dim != -1:
        v0, v1 = v0.transpose(dim, -1), v1.transpose(dim, -1)
    v0_u = v0 / torch.norm(v0, dim=-1, keepdim=True).clamp(min=1e-7)
    v1_u = v1 / torch.norm(v1, dim=-1, keepdim=True).clamp(min=1e-7)
    cos_theta = torch.sum(v0_u.mul_(v1_u), dim=-1, keepdim=True).clamp(-1, 1)
    del v0_u, v1_u
    colinear = (1 - cos_theta.square()) <= eps ** 2
    theta = torch.acos(torch.where(colinear, 0, cos_theta))
    sin_theta = torch.sin(theta)
    result = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / sin_theta
    result = torch.where(colinear, (1 - t) * v0 + t * v1, result)
    if dim != -1 and not flatten:
        result = result.transpose(dim, -1)
    return result.reshape(out_shape)


@merge_rule("nuslerp", uses_base="optional", inputs=(2, 2), params={
    "nuslerp_flatten": Param(True, "slerp the flattened tensors (mergekit's default); false: each row (or column, "
                             "with nuslerp_row_wise) separately"),
    "nuslerp_row_wise": Param(False, "without nuslerp_flatten, slerp the columns (vectors along dim 0) instead of "
                              "the rows"),
})
def nuslerp(tensors, weights, generator, nuslerp_flatten, nuslerp_row_wise):
    """NuSLERP (mergekit's nuslerp): slerp between exactly two models with t = w_2 / (w_1 + w_2) (0.5 if the
    weights sum to within 1e-6 of 0); with a base, between their task vectors, added back to the base."""
    total = sum(weights)
    t = 0.5 if abs(total) < 1e-6 else weights[1] / total
    return nuslerp_(t, tensors[0], tensors[1], dim=0 if nuslerp_row_wise else -1, flatten=nuslerp_flatten)


@merge_rule("multislerp", uses_base="optional", params={
    "normalize_weights": Param(True, "divide the weights by their sum"),
    "eps": Param(1e-8, "numerical floor added to norms (mergekit's default 1e-8)", gt=0.0),
})
def multislerp(tensors, weights, generator, normalize_weights, eps):
    """Multi-SLERP (mergekit's multislerp; barycentric interpolation on the hypersphere): project the inputs (task
    vectors with a base, weights without) to unit vectors, take their weighted mean direction, map the weighted
    tangent-space mean back with the exponential map, and scale by the weighted mean norm. One input is returned
    as it is. Where the weighted mean of the unit vectors is zero, two inputs fall back to the weighted sum, as
    in mergekit; more are an error."""
    if len(tensors) == 1:
        return tensors[0]
    w = torch.tensor(weights, dtype=torch.float32)
    if normalize_weights:
        w = w / w.sum()
    # In place, one input at a time: the inputs become their unit vectors and then their weighted tangents, with
    # one mean and one scratch buffer (mergekit stacks the inputs and allocates full-size temporaries per step)
    norms = [torch.norm(t.view(-1), dim=-1) for t in tensors]
    mean = torch.zeros_like(tensors[0])
    scratch = torch.empty_like(mean)
    for t, n, wi in zip(tensors, norms, w):
        mean.add_(torch.div(t, n + eps, out=scratch).mul_(wi))  # mergekit: (unit_tensors * weights).sum(0)
    mean_norm = torch.norm(mean.view(-1))
    if mean_norm < eps:
        if len(tensors) == 2:
            return tensors[0].mul_(w[0]).add_(tensors[1].mul_(w[1]))
        raise InputError("multislerp: the weighted sum of the inputs' directions is zero (antipodal inputs whose "
                         "weights balance out); use different weights")
    mean.div_(mean_norm)
    tangent = None
    for t, n, wi in zip(tensors, norms, w):
        u = t.div_(n + eps)
        dot = torch.dot(u.view(-1), mean.view(-1))
        u.sub_(torch.mul(dot, mean, out=scratch)).mul_(wi)  # (unit - dot * mean) * weight
        tangent = u if tangent is None else tangent.add_(u)
    del scratch
    tangent_norm = torch.norm(tangent.view(-1)) + eps
    result = mean.mul_(torch.cos(tangent_norm)).add_(tangent.mul_(torch.sin(tangent_norm) / tangent_norm))
    return result.mul_((torch.stack(norms) * w).sum())
