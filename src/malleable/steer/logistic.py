"""steering-vectors' `logistic_aggregator` (steering-vectors/steering-vectors steering_vectors/aggregators.py)."""

from __future__ import annotations

import numpy as np

from malleable.params import Param
from malleable.steer.registry import SteeringMethod, steering_method


@steering_method("logistic", unit_norm=True, params={
    "C": Param(1.0, "inverse L2 regularisation strength (scikit-learn's LogisticRegression default)", gt=0),
    "max_iter": Param(100, "solver iterations (scikit-learn's default)", ge=1),
})
class Logistic(SteeringMethod):
    """The normalised weight vector of a logistic regression (no intercept) that tells the positives (+1) from
    the negatives (-1) after each pair's midpoint is subtracted, read at the last token.

    As steering-vectors' `_get_normalized_regression_coef` with `LogisticRegression(fit_intercept=False)`:
    midpoint-centred activations, labels +1 / -1, `F.normalize(coef)`. Ours fits in float64 (theirs casts to
    float32) and exposes scikit-learn's C and max_iter as parameters with scikit-learn's defaults.
    """

    def direction(self, pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
        from sklearn.linear_model import LogisticRegression

        centre = (pos + neg) / 2
        x = np.concatenate([pos - centre, neg - centre])
        y = np.concatenate([np.ones(len(pos)), -np.ones(len(neg))])
        coef = LogisticRegression(fit_intercept=False, C=self.p["C"], max_iter=self.p["max_iter"]).fit(x, y).coef_[0]
        return coef / max(np.linalg.norm(coef), 1e-12)
