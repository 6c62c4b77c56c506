"""KnOTS (Stoica et al., 2025, "Model merging with SVD to tie the KnOTS"), computed from the LoRA factors."""

from __future__ import annotations

import torch

from malleable.deltas.linalg import compress, knots_space
from malleable.deltas.lowrank import LowRankDelta
from malleable.merge.inner import INNER, apply_inner, default_rank, zero_delta
from malleable.merge.registry import merge_rule


@merge_rule("knots", space="lora", params={"inner": INNER})
def knots(deltas: list[LowRankDelta], weights, generator, rank, inner="ties", **params) -> LowRankDelta:
    """Align the LoRAs with one SVD of their concatenation, then merge the task-specific parts.

    The SVD [Δ_1 | ... | Δ_T] = U S [V_1 | ... | V_T] (from the factors; no Δ_t is formed) gives a shared
    output basis U and per-task coordinates S V_t (k x in, k <= sum of ranks; the reference code's
    ``s_on_V``). The ``inner`` full-space rule merges the coordinates, and the result U · inner(S V_t) is
    truncated by SVD to ``rank`` (default: the largest input rank). With a linear inner rule and
    rank >= sum of ranks this is exactly the full-space weighted sum.
    """
    U, S, Vs = knots_space(deltas, dtype=torch.float64)
    if S.numel() == 0:
        return zero_delta(deltas)
    coords = [S[:, None] * V for V in Vs]
    merged = apply_inner(inner, coords, weights, generator, params)
    return compress(U, merged, None, default_rank(deltas, rank), dtype=torch.float32)
