"""Magnitude pruning then task arithmetic (PEFT's ``merge_utils.magnitude_prune``)."""

from __future__ import annotations

from malleable.merge.linear import weighted_sum
from malleable.merge.registry import merge_rule
from malleable.merge.ties import DENSITY, trim_magnitude


@merge_rule("magnitude_prune", params={"density": DENSITY})
def magnitude_prune(tensors, weights, generator, density):
    """Trim each task vector to its top-`density` entries by magnitude, then sum_i w_i * trimmed_i: TIES'
    trimming without sign election."""
    return weighted_sum([trim_magnitude(t, d) for t, d in zip(tensors, density)], weights)
