"""KnOTS (Stoica et al., 2025, "Model merging with SVD to tie the KnOTS"), computed from the LoRA factors."""

from __future__ import annotations

import torch

from malleable.deltas.linalg import compress, knots_space
from malleable.deltas.lowrank import LowRankDelta
from malleable.merge.inner import INNER, apply_inner, default_rank, zero_delta
from malleable.merge.registry import Param, merge_rule

FORM = Param("original", "where S enters: 'original' merges the coordinates S V_t (the KnOTS authors' code, "
             "gstoica27/KnOTS); 'per_layer' merges V_t and multiplies by S afterwards (the KnOTS branch of "
             "the CtM and Core Space authors' MatrixPerLayerMerger)", choices=("original", "per_layer"))


@merge_rule("knots", space="lora", params={"inner": INNER, "form": FORM})
def knots(deltas: list[LowRankDelta], weights, generator, rank, inner="ties", form="original",
          **params) -> LowRankDelta:
    """Align the LoRAs with one SVD of their concatenation, then merge the task-specific parts.

    The SVD [Δ_1 | ... | Δ_T] = U S [V_1 | ... | V_T] (from the factors; no Δ_t is formed) gives a shared
    output basis U and per-task parts V_t (k x in, k <= sum of ranks). The ``inner`` full-space rule merges,
    per module, either

    * ``form: original`` (default): the coordinates S V_t, as the KnOTS authors' code does (its ``s_on_V``:
      the merge rule, TIES's trimming included, sees the singular values), giving U · inner(S V_t); or
    * ``form: per_layer``: the bare V_t, scaled by S afterwards, U · S · inner(V_t), as the KnOTS branch of
      the CtM (ZhengbaoHe/compress-then-merge, ``MatrixPerLayerMerger``, ``MERGE_SPACE == 'knots'``) and Core
      Space authors' code does. With a linear inner rule both forms are the same; a trimming rule (TIES)
      trims other entries, because the rows of V_t all have unit scale while those of S V_t do not.

    The result is truncated by SVD to ``rank`` (default: the largest input rank). With a linear inner rule
    and rank >= sum of ranks this is exactly the full-space weighted sum.
    """
    U, S, Vs = knots_space(deltas, dtype=torch.float64)
    if S.numel() == 0:
        return zero_delta(deltas)
    if form == "per_layer":
        merged = S[:, None] * apply_inner(inner, list(Vs), weights, generator, params).to(S.dtype)
    else:
        merged = apply_inner(inner, [S[:, None] * V for V in Vs], weights, generator, params)
    return compress(U, merged, None, default_rank(deltas, rank), dtype=torch.float32)
