"""H2O (Zhang et al. 2023, "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language
Models"), at the prefill: a share `recent` of each KV head's budget goes to the most recent positions, the rest
to the heavy hitters, the earlier positions with the largest attention accumulated over every prompt query (the
authors' real-drop code sums the softmax weights over the queries; llama-recipes' H2O recipe splits the budget
half recent, half heavy hitters, our default). Query heads sharing a KV head are averaged. Differs from kvpress's
`ObservedAttentionPress` ("related to H2O"), which divides each key's sum by the number of queries that see it and
keeps no recent window. The authors also evict during decoding, one position per new token; here eviction is
one-shot after the prefill, like the other policies."""

from __future__ import annotations

import torch

from malleable.params import Param
from malleable.slim.evict import EvictionPolicy, LayerState, eviction_policy, per_kv_head, window_attention


@eviction_policy("h2o", params={"recent": Param(0.5, "share of the kept positions that are the most recent",
                                                 ge=0.0, le=1.0)})
class H2O(EvictionPolicy):
    def score(self, layer: LayerState) -> torch.Tensor:
        length = layer.keys.shape[2]
        accumulated = window_attention(layer, length).sum(dim=-2)  # every prompt query's weights, summed per key
        scores = per_kv_head(accumulated, layer.keys.shape[1])
        recent = int(round(self.p["recent"] * layer.kept))
        if recent:
            scores[..., length - recent:] = float("inf")
        return scores
