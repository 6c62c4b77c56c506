"""Wanda (Sun et al., ICLR 2024): prune by |W| times the input feature's norm, compared within each output row.

Follows locuslab/wanda, lib/prune.py (prune_wanda) and lib/layerwrapper.py (WrappedGPT).
"""

from __future__ import annotations

import torch

from malleable.slim.registry import PRUNE_PARAMS, Pattern, WeightPruner, lowest, nm_mask, slim_method


@slim_method("wanda", params=PRUNE_PARAMS)
class Wanda(WeightPruner):
    """Score each weight |W_ij| * ||X_j||_2 (X_j: input feature j over the calibration tokens) and zero, in
    every output row, the lowest-scoring share (a stable sort) or the N lowest of every M inputs (N:M).

    As in the reference, the decoder layers are pruned one after another, each layer's input norms read on the
    outputs of the already pruned layers before it, and every linear module of a layer reads its inputs in one
    pass through that layer before any of them is pruned. The norms are accumulated over all calibration tokens
    at once (the reference rescales a running mean sample by sample; the same value up to float rounding). The
    appendix variant (`use_variant`, a cumulative-sum threshold per row) is not implemented.
    """

    stats = "norms"

    def prune(self, weight: torch.Tensor, stats: torch.Tensor | None, pattern: Pattern) -> torch.Tensor:
        metric = weight.abs() * torch.sqrt(stats.reshape(1, -1))
        if pattern.structured:
            mask = nm_mask(metric, pattern.n, pattern.m)
        else:
            mask = lowest(metric, int(weight.shape[1] * pattern.sparsity), dim=1)
        return weight.masked_fill(mask, 0)
