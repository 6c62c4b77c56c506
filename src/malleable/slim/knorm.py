"""Key-norm eviction (Devoto et al. 2024, "A Simple and Effective L2 Norm-Based Strategy for KV Cache
Compression"), as kvpress's `KnormPress`: keys with a LOW L2 norm draw the most attention, so the positions with
the largest key norms are evicted. The norm is taken in at least float32, as kvpress does, so a half-precision
cache does not tie distinct positions."""

from __future__ import annotations

import torch

from malleable.slim.evict import EvictionPolicy, LayerState, eviction_policy


@eviction_policy("knorm")
class KNorm(EvictionPolicy):
    def score(self, layer: LayerState) -> torch.Tensor:
        return -torch.linalg.vector_norm(layer.keys, dim=-1, dtype=torch.promote_types(layer.keys.dtype,
                                                                                      torch.float32))
