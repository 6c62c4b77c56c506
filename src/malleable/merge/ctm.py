"""Compress-then-Merge (He et al., 2026, "Compress then Merge: From Multiple LoRAs into One Low-Rank Adapter")."""

from __future__ import annotations

import torch

from malleable.deltas.linalg import compress, core_space, hooi
from malleable.deltas.lowrank import LowRankDelta
from malleable.merge.inner import INNER, apply_inner, default_rank
from malleable.merge.registry import Param, merge_rule


@merge_rule("ctm", space="lora", params={
    "inner": INNER,
    "beta": Param(1.0, "norm balancing when finding the shared subspaces: each task core is divided by "
                       "its Frobenius norm to this power (0: raw cores, 1: every task counts equally)",
                  ge=0.0, le=1.0),
    "iters": Param(20, "maximum HOOI sweeps for the shared subspaces (it stops earlier once the fit "
                       "improves by less than 1e-7 of the tensor norm)", ge=1),
})
def ctm(deltas: list[LowRankDelta], weights, generator, rank, inner="ties", beta=1.0, iters=20,
        **params) -> LowRankDelta:
    """Compress first: find shared rank-r subspaces of all LoRAs, then merge r x r coordinates.

    In the core space (s_t B_t A_t = U_B M_t V_A, see core_space), stack the norm-balanced cores
    M_t / ||M_t||_F^beta into an R x R x T tensor and fit a Tucker model of multilinear rank (r, r, T) by
    HOOI. Its first two factors P, Q (R x r) are the shared left/right subspaces: they maximise
    sum_t ||P^T M_t Q||_F^2 over the balanced cores, so with beta = 1 a LoRA with a large norm cannot claim
    the whole subspace (beta = 0 keeps raw energies). Each original (unbalanced) core is projected to
    C_t = P^T M_t Q (r x r), the ``inner`` full-space rule merges the C_t, and the output is
    U_B P C Q^T V_A (stored as balanced factors of B = U_B P C, A = Q^T V_A): rank <= r by construction,
    no truncation after merging.
    ``rank`` (r) defaults to the largest input rank.
    """
    r = default_rank(deltas, rank)
    U_B, V_A, cores = core_space(deltas, dtype=torch.float64)
    r = min(r, U_B.shape[1], V_A.shape[0])
    balanced = []
    for M in cores:
        norm = torch.linalg.matrix_norm(M)
        balanced.append(M / norm**beta if norm > 0 else M)
    _, (P, Q, _) = hooi(torch.stack(balanced, dim=2), (r, r, len(cores)), iters=iters)
    P, Q = P.double(), Q.double()
    coords = [P.T @ M @ Q for M in cores]
    merged = apply_inner(inner, coords, weights, generator, params)
    # U_B P has orthonormal columns and Q^T V_A orthonormal rows, so an SVD of the r x r merged core
    # only rebalances the factors (sqrt of its singular values on each side); the product is unchanged.
    return compress(U_B @ P, merged, Q.T @ V_A, r, dtype=torch.float32)
