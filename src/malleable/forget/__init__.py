"""`forget`: unlearning objectives and masks (registered by name) run through learn's training loop."""

from malleable.forget import (  # noqa: F401  (registration)
    dpo, graddiff, mu_mis, natmu, negation, npo, relabel, retain_ft, rmu, salun, sam, sfr_on, soul, undial, wagle,
    wga,
)
from malleable.forget.engine import UnlearnResult, fit, unlearn
from malleable.forget.registry import MASKS, OBJECTIVES, Objective, mask, objective

__all__ = ["MASKS", "OBJECTIVES", "Objective", "UnlearnResult", "fit", "mask", "objective", "unlearn"]
