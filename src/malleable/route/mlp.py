"""A small multi-layer perceptron from the query embedding to every candidate's quality (RouterBench's mlp)."""

from __future__ import annotations

import numpy as np

from malleable.params import Param
from malleable.route.registry import QualityRouter, router


@router("mlp", params={"hidden": Param(64, "hidden units (one ReLU layer)", ge=1),
                       "alpha": Param(1e-4, "L2 penalty", ge=0),
                       "max_iter": Param(300, "training epochs at most", ge=1)})
class MLP(QualityRouter):
    """scikit-learn's MLPRegressor (one ReLU hidden layer, Adam, multi-output: one quality per candidate),
    then willingness to pay, as RouterBench's mlp router (which uses MLPClassifier per candidate; one
    regressor over all candidates is ours, and equivalent for 0/1 quality up to the loss). Stored as the
    layers' `coefs_` / `intercepts_` arrays; prediction is the same forward pass in numpy."""

    def learn(self, train, seed):
        import warnings

        from sklearn.exceptions import ConvergenceWarning
        from sklearn.neural_network import MLPRegressor

        model = MLPRegressor(hidden_layer_sizes=(self.p["hidden"],), alpha=self.p["alpha"],
                             max_iter=self.p["max_iter"], random_state=seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            model.fit(train.X, train.Y)
        for i, (w, b) in enumerate(zip(model.coefs_, model.intercepts_)):
            self.arrays[f"layer{i}.weight"], self.arrays[f"layer{i}.bias"] = w, b
        self.info["layers"] = len(model.coefs_)

    def quality(self, batch):
        h = batch.X.astype("float64")
        for i in range(self.info["layers"]):
            h = h @ self.arrays[f"layer{i}.weight"] + self.arrays[f"layer{i}.bias"]
            if i < self.info["layers"] - 1:
                h = np.maximum(h, 0)
        return h.reshape(len(batch), -1)
