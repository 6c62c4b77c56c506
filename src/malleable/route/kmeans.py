"""One prototype embedding per candidate; a query goes to the nearest (VL-RouterBench's kmeans router)."""

from __future__ import annotations

import numpy as np

from malleable.params import Param
from malleable.route.prknn import standardise
from malleable.route.registry import QualityRouter, router


def unit(Z: np.ndarray) -> np.ndarray:
    return Z / np.maximum(np.linalg.norm(Z, axis=1, keepdims=True), 1e-12)


@router("kmeans", params={"normalize": Param(True, "unit-length embeddings and prototypes (theirs: true)")})
class KMeans(QualityRouter):
    """VL-RouterBench's kmeans (prototype) router (routers/kmeans/router.py, read in yutao1024/SCOPE-Router at
    35c43e4): embeddings standardised, each candidate's prototype the mean embedding of the training queries it
    gets right (quality > 0; the mean of all when none), scores the softmax of the cosine to each prototype.
    Theirs routes to the top score; ours sweeps willingness to pay over the scores, whose 'quality only' end is
    their router. Stored as the scaler's mean / scale and the prototypes."""

    def learn(self, train, seed):
        keep = (train.Y > 0).any(axis=1)
        self.arrays.update(standardise(train.X[keep]))
        Z = self._features(train.X[keep])
        Y = train.Y[keep] > 0
        P = np.stack([Z[Y[:, m]].mean(axis=0) if Y[:, m].any() else Z.mean(axis=0) for m in range(Y.shape[1])])
        self.arrays["prototypes"] = unit(P) if self.p["normalize"] else P

    def _features(self, X):
        Z = (X - self.arrays["mean"]) / self.arrays["scale"]
        return unit(Z) if self.p["normalize"] else Z

    def quality(self, batch):
        logits = self._features(batch.X) @ self.arrays["prototypes"].T
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)
