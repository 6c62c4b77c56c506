"""TSV-M (Gargiulo et al., "Task Singular Vectors: Reducing Task Interference in Model Merging", CVPR 2025,
arXiv:2412.00081; reference code AntoAndGar/task_singular_vectors, ``compute_and_sum_svd_mem_reduction``).

For a 2-D tensor: SVD each weighted task vector w_i * tau_i = U_i S_i V_i^T and keep its top k_i components,
k_i = max(1, int(min(rows, cols) * fraction)); concatenate U = [U_1 .. U_T], S = [S_1 .. S_T],
V^T = [V_1^T; ..; V_T^T]; whiten both bases to their nearest orthonormal matrices (Procrustes: the polar
factor P Q^T of the SVD P D Q^T); return scale * U_perp diag(S) V_perp^T.
Other tensors (biases, norms, conv kernels) get the weighted mean of the task vectors, times `scale`, as the
reference code does (it takes the plain mean).
"""

from __future__ import annotations

import torch

from malleable.merge.linear import weighted_sum
from malleable.merge.registry import Param, merge_rule


def orthonormalised(m: torch.Tensor) -> torch.Tensor:
    """The orthonormal matrix nearest to `m` in Frobenius norm (its polar factor)."""
    p, _, qt = torch.linalg.svd(m, full_matrices=False)
    return p @ qt


@merge_rule("tsv", params={
    "fraction": Param(None, "fraction of each task's singular components kept (default 1/number of inputs, "
                      "the paper's; at least one is kept)", gt=0.0, le=1.0),
    "scale": Param(1.0, "multiplier on the merged task vector (the paper's alpha)"),
})
def tsv(tensors, weights, generator, fraction, scale):
    """TSV-M (Gargiulo et al., CVPR 2025): per-task truncated SVD, concatenated singular vectors whitened to
    remove interference, singular values kept. Non-2-D tensors: weighted mean of the task vectors."""
    if tensors[0].dim() != 2:
        return weighted_sum(tensors, weights) * (scale / sum(weights))
    k = max(1, int(min(tensors[0].shape) * (1 / len(tensors) if fraction is None else fraction)))
    us, ss, vts = [], [], []
    for t, w in zip(tensors, weights):
        u, s, vt = torch.linalg.svd(t, full_matrices=False)
        us.append(u[:, :k])
        ss.append(s[:k] * w)
        vts.append(vt[:k])
    u_perp = orthonormalised(torch.cat(us, dim=1))
    vt_perp = orthonormalised(torch.cat(vts, dim=0))
    return (u_perp * torch.cat(ss)) @ vt_perp * scale
