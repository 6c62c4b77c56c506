"""Activation Addition (Turner et al. 2023, "Steering Language Models With Activation Engineering")."""

from __future__ import annotations

import numpy as np

from malleable.errors import RecipeError
from malleable.params import Param
from malleable.steer.registry import SteeringMethod, steering_method


@steering_method("actadd", read="all", intervene="first", pairs_used=1, params={
    "pair": Param(0, "which training pair is the prompt pair (its positive and negative, e.g. 'Love' / 'Hate')",
                  ge=0),
})
class ActAdd(SteeringMethod):
    """One prompt pair: the positive's minus the negative's residual stream at every position of the pair,
    added over the first positions of the steered text (position i gets row i).

    As the paper: the shorter of the two prompts is padded at the end with space tokens to the same length
    (ours: the tokenizer's encoding of " ", else its pad token), the difference is taken position by position
    and added, times the coefficient (our strength), to the residual stream of the first positions of the
    user's prompt at the chosen layer. The paper's example coefficients are 3..15 at GPT-2-XL scale; ours
    defaults to the strength the recipe gives (1 otherwise). The pair is the `pair`-th row of data.train.
    """

    def pairs(self, rows: list[dict]) -> list[dict]:
        if self.p["pair"] >= len(rows):
            raise RecipeError(f"parameters.pair: {self.p['pair']} is beyond the {len(rows)} training pairs")
        return [rows[self.p["pair"]]]

    def direction(self, pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
        return pos - neg
