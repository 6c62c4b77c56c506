"""Iso-C (Marczak et al., "No Task Left Behind: Isotropic Model Merging with Common and Task-Specific
Subspaces", ICML 2025, arXiv:2502.04959; reference code danielm1405/iso-merging).

For a 2-D tensor: the task-arithmetic sum M = sum_i w_i tau_i = U diag(S) V^T is replaced by
scale * mean(S) * U V^T, a flat (isotropic) spectrum with the same nuclear norm.
Other tensors (biases, norms, conv kernels) get the weighted mean of the task vectors, times `scale`, as the
reference code does (it takes the plain mean there, not the sum).
"""

from __future__ import annotations

import torch

from malleable.merge.linear import weighted_sum
from malleable.merge.registry import Param, merge_rule


@merge_rule("iso_c", params={
    "scale": Param(1.0, "multiplier on the merged task vector (the paper's alpha)"),
})
def iso_c(tensors, weights, generator, scale):
    """Iso-C (Marczak et al., 2025): sum the task vectors, then set all its singular values to their mean.
    Non-2-D tensors: weighted mean of the task vectors."""
    merged = weighted_sum(tensors, weights)
    if merged.dim() != 2:
        return merged * (scale / sum(weights))
    u, s, vt = torch.linalg.svd(merged, full_matrices=False)
    return (u * (s.mean() * scale)) @ vt
