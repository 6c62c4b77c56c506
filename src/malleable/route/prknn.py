"""PR-KNN: the k nearest training queries vote on each pair of candidates (VL-RouterBench's prknn router)."""

from __future__ import annotations

import numpy as np

from malleable.params import Param
from malleable.route.registry import QualityRouter, router


def standardise(train_X: np.ndarray) -> dict[str, np.ndarray]:
    """scikit-learn's StandardScaler fitted on `train_X`, as its `mean_` and `scale_` arrays."""
    from sklearn.preprocessing import StandardScaler

    s = StandardScaler().fit(train_X)
    return {"mean": s.mean_.astype(np.float64), "scale": s.scale_.astype(np.float64)}


@router("prknn", params={"k": Param(7, "neighbours (VL-RouterBench's run script: 7)", ge=1),
                         "metric": Param("cosine", "distance between standardised embeddings",
                                         choices=("cosine", "euclidean")),
                         "weights": Param("distance", "neighbour weights: 1 / (1e-6 + distance), or uniform",
                                          choices=("distance", "uniform"))})
class PRKNN(QualityRouter):
    """VL-RouterBench's PR-KNN (routers/prknn/router.py, read in yutao1024/SCOPE-Router at 35c43e4): embeddings
    standardised (StandardScaler), training queries no candidate gets right dropped, and on the k nearest
    neighbours a weighted Copeland count: candidate m earns a neighbour's weight for every other candidate b
    it beats there (higher quality, or equal quality at a lower cost). Theirs routes to the top count; ours
    divides the count by its largest possible value (weights x (candidates - 1)) into a predicted win share
    and sweeps willingness to pay over it, whose 'quality only' end is their router. Stored as the scaler's
    mean / scale and the standardised training embeddings, qualities and costs."""

    def learn(self, train, seed):
        keep = (train.Y > 0).any(axis=1)
        self.arrays.update(standardise(train.X[keep]))
        self.arrays.update(X=(train.X[keep] - self.arrays["mean"]) / self.arrays["scale"], Y=train.Y[keep],
                           C=train.C[keep])
        self.restore()

    def restore(self):
        from sklearn.neighbors import NearestNeighbors

        k = min(self.p["k"], len(self.arrays["X"]))
        self._nn = NearestNeighbors(n_neighbors=k, metric=self.p["metric"]).fit(self.arrays["X"])

    def quality(self, batch):
        dist, idx = self._nn.kneighbors((batch.X - self.arrays["mean"]) / self.arrays["scale"])
        w = np.ones_like(dist) if self.p["weights"] == "uniform" else 1.0 / (1e-6 + dist)
        Y, C = self.arrays["Y"][idx], self.arrays["C"][idx]  # (queries, k, candidates)
        beats = (Y[..., :, None] > Y[..., None, :]) | ((Y[..., :, None] == Y[..., None, :])
                                                      & (C[..., :, None] < C[..., None, :]))
        wins = np.einsum("qk,qkmb->qm", w, beats)
        return wins / (w.sum(axis=1, keepdims=True) * max(Y.shape[-1] - 1, 1))
