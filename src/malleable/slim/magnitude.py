"""Magnitude pruning: the baseline of the Wanda paper's code (lib/prune.py, prune_magnitude)."""

from __future__ import annotations

import torch

from malleable.slim.registry import PRUNE_PARAMS, Pattern, WeightPruner, lowest, nm_mask, slim_method


@slim_method("magnitude", params=PRUNE_PARAMS)
class Magnitude(WeightPruner):
    """Zero the weights of smallest |W|: one threshold per linear layer (unstructured) or the N smallest of every
    M inputs of a row (N:M). No calibration data.

    Differs from the reference in one place: it takes the threshold as `sort(|W|)[int(numel * s)]` and zeroes
    every weight `<=` it, one weight more than requested (and more at ties); here exactly `int(numel * s)`
    weights are zeroed (the smallest, ties to the earlier index), so the achieved sparsity is the requested one.
    """

    def prune(self, weight: torch.Tensor, stats: torch.Tensor | None, pattern: Pattern) -> torch.Tensor:
        metric = weight.abs()
        if pattern.structured:
            mask = nm_mask(metric, pattern.n, pattern.m)
        else:
            mask = lowest(metric.flatten(), int(weight.numel() * pattern.sparsity)).reshape(weight.shape)
        return weight.masked_fill(mask, 0)
