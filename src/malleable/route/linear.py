"""Ridge regression from the query embedding to every candidate's quality."""

from __future__ import annotations

from malleable.params import Param
from malleable.route.registry import QualityRouter, router


@router("linear", params={"alpha": Param(1.0, "ridge penalty", ge=0)})
class Linear(QualityRouter):
    """One linear predictor of quality per candidate, fitted jointly by scikit-learn's Ridge (multi-output),
    then willingness to pay. Stored as Ridge's `coef_` (candidates x dim) and `intercept_`; prediction is
    ``X @ coef.T + intercept``, Ridge's own formula."""

    def learn(self, train, seed):
        from sklearn.linear_model import Ridge

        model = Ridge(alpha=self.p["alpha"]).fit(train.X, train.Y)
        self.arrays.update(coef=model.coef_.astype("float64"), intercept=model.intercept_.astype("float64"))

    def quality(self, batch):
        return batch.X.astype("float64") @ self.arrays["coef"].T + self.arrays["intercept"]
