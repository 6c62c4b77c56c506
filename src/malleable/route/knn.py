"""k nearest neighbours over query embeddings (RouterBench's knn router)."""

from __future__ import annotations


from malleable.params import Param
from malleable.route.registry import QualityRouter, router


@router("knn", params={"k": Param(10, "neighbours whose mean quality predicts a candidate's", ge=1),
                       "metric": Param("cosine", "distance between embeddings", choices=("cosine", "euclidean"))})
class KNN(QualityRouter):
    """A candidate's predicted quality on a query is its mean quality on the k nearest training queries
    (RouterBench: scikit-learn NearestNeighbors, mean over the neighbours, then willingness to pay). Stored as
    the training embeddings and quality matrix; the neighbour search is rebuilt from them on loading."""

    def learn(self, train, seed):
        self.arrays.update(X=train.X, Y=train.Y)
        self.restore()

    def restore(self):
        from sklearn.neighbors import NearestNeighbors

        k = min(self.p["k"], len(self.arrays["X"]))
        self._nn = NearestNeighbors(n_neighbors=k, metric=self.p["metric"]).fit(self.arrays["X"])

    def quality(self, batch):
        _, idx = self._nn.kneighbors(batch.X)
        return self.arrays["Y"][idx].mean(axis=1)
