"""Concatenation of LoRA factors: the exact weighted sum of T LoRAs as one LoRA of rank sum r_t."""

from __future__ import annotations

import torch

from malleable.deltas.lowrank import LowRankDelta
from malleable.errors import RecipeError
from malleable.merge.registry import merge_rule


@merge_rule("concat", space="lora")
def concat(deltas: list[LowRankDelta], weights, generator, rank) -> LowRankDelta:
    """Exact: B = [w_1 s_1 B_1 | ... | w_T s_T B_T], A = [A_1; ...; A_T], so B @ A = sum_t w_t s_t B_t A_t.

    The output rank is the sum of the input ranks (PEFT's ``cat``); a smaller requested rank is an error,
    since concatenation cannot truncate (use knots, core_space or ctm for that).
    """
    total = sum(d.rank for d in deltas)
    if rank is not None and rank < total:
        raise RecipeError(f"rank: concat is exact and needs rank >= {total} (the sum of the input ranks), "
                          f"got {rank}; use core_space, knots or ctm to reduce the rank")
    B = torch.cat([d.B.float() * (w * d.scale) for d, w in zip(deltas, weights)], dim=1)
    A = torch.cat([d.A.float() for d in deltas], dim=0)
    return LowRankDelta(B, A, 1.0)
