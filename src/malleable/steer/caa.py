"""Contrastive Activation Addition (Rimsky et al. 2023, nrimsky/CAA generate_vectors.py)."""

from __future__ import annotations

import numpy as np

from malleable.steer.registry import SteeringMethod, steering_method


@steering_method("caa", read=-2)
class CAA(SteeringMethod):
    """The mean over pairs of the positive's minus the negative's residual stream, read at the answer letter.

    As nrimsky/CAA generate_vectors.py: activations at token -2 (the letter of an "(A)" / "(B)" answer, the
    closing parenthesis being -1) of each decoder layer's output, `(pos - neg).mean(0)`; steering-vectors'
    `mean_aggregator` is the same formula at its default read index -1 (`read_position: last` here). Ours
    differs in where the vector is added by default: every non-padding position, while CAA's code adds it from
    the end of the instruction on; the intervention positions are a recipe setting here (`intervene`).
    """

    def direction(self, pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
        return (pos - neg).mean(axis=0)
