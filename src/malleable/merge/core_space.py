"""Core Space merging (Panariello et al., NeurIPS 2025): merge T LoRAs in their shared R x R core space."""

from __future__ import annotations

import torch

from malleable.deltas.linalg import compress, core_space
from malleable.deltas.lowrank import LowRankDelta
from malleable.merge.inner import INNER, apply_inner, default_rank
from malleable.merge.registry import merge_rule


@merge_rule("core_space", space="lora", params={"inner": INNER})
def core_space_merge(deltas: list[LowRankDelta], weights, generator, rank, inner="ties",
                     **params) -> LowRankDelta:
    """Express every LoRA in shared reference bases and merge the small core matrices.

    With U_B the left singular vectors of [s_1 B_1 | ... | s_T B_T] and V_A the right singular vectors of
    [A_1; ...; A_T], each delta is exactly s_t B_t A_t = U_B M_t V_A with an R x R core M_t
    (R = sum of ranks). The ``inner`` full-space rule merges the cores (M = inner(M_1..M_T)) and the result
    is U_B M V_A: no information is lost, and a linear inner rule (task_arithmetic) gives exactly the
    full-space result. Output rank R by default (the paper's "rank Tr"); a smaller ``rank`` truncates by
    an SVD of the R x R merged core, the best approximation of U_B M V_A at that rank.
    """
    if rank is not None:
        default_rank(deltas, rank)  # validates rank >= 1
    U_B, V_A, cores = core_space(deltas, dtype=torch.float64)
    merged = apply_inner(inner, cores, weights, generator, params)
    return compress(U_B, merged, V_A, rank, dtype=torch.float32)
