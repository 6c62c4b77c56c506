"""The embedding-centroid adapter selector: each candidate is the mean embedding of the queries it answers."""

from __future__ import annotations

import numpy as np

from malleable.params import Param
from malleable.route.kmeans import unit
from malleable.route.registry import QualityRouter, router


@router("centroid", params={"normalize": Param(True, "score the cosine to the unit-length centroid; false: the "
                                                     "inner product with the raw mean (LoraRetriever's)")})
class Centroid(QualityRouter):
    """Embedding-centroid selection in the style of LoraRetriever (Zhao et al., ACL Findings 2024; their
    utils/instructor_retrieval.py): each LoRA is represented by the mean embedding of sample inputs, and a
    query retrieves the LoRA whose representation has the highest inner product with the query's embedding.
    Ours: a candidate's centroid is the mean of the unit-length embeddings of the TRAINING queries, weighted by
    its quality on each (Y; the plain mean of all when it answers none), rather than samples of the data the
    adapter was trained on, so it works for any pool a router was fitted on; the embeddings are the matrices'
    (all-MiniLM-L6-v2 by default), not their instruction-tuned retriever; by default the centroid is made unit
    length (cosine similarity, `normalize`), where theirs scores the raw mean; and a query goes to the single
    best candidate, the cosine traded against the candidate's mean training cost with willingness to pay like
    the other quality routers, where theirs retrieves the top k and mixes or fuses them. Unlike `kmeans`
    (VL-RouterBench's prototypes), the embeddings are not standardised, the weights are the quality itself
    (not quality > 0) and there is no softmax. Stored as the centroids."""

    def learn(self, train, seed):
        W = np.clip(train.Y, 0, None)
        X = unit(train.X.astype(np.float64))
        mean = X.mean(axis=0)
        total = W.sum(axis=0)
        C = np.stack([W[:, j] @ X / total[j] if total[j] > 0 else mean for j in range(W.shape[1])])
        self.arrays["centroids"] = unit(C) if self.p["normalize"] else C

    def quality(self, batch):
        return unit(batch.X.astype(np.float64)) @ self.arrays["centroids"].T
