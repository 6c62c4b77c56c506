"""SnapKV (Li et al. 2024, "SnapKV: LLM Knows What You are Looking for Before Generation"), as kvpress's
`SnapKVPress`: the last `window_size` prompt positions (the observation window) vote with their attention for the
earlier positions; the votes are averaged over the window's queries, smoothed by average pooling over
`kernel_size` neighbouring positions, averaged over the query heads of each KV head, and the window itself is
always kept. Defaults are kvpress's (window 64, kernel 5)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from malleable.errors import InputError
from malleable.params import Param
from malleable.slim.evict import EvictionPolicy, LayerState, eviction_policy, per_kv_head, window_attention


@eviction_policy("snapkv", params={"window_size": Param(64, "observation window: the last prompt positions", ge=1),
                                   "kernel_size": Param(5, "average-pooling width over positions (odd)", ge=1)})
class SnapKV(EvictionPolicy):
    def check(self, length: int, kept: int) -> None:
        if length <= self.p["window_size"]:
            raise InputError(f"parameters.window_size: the prompt ({length} tokens) must be longer than the "
                             f"observation window ({self.p['window_size']})")
        if self.p["kernel_size"] % 2 == 0:
            raise InputError(f"parameters.kernel_size: {self.p['kernel_size']} must be odd (pooling keeps the length)")

    def score(self, layer: LayerState) -> torch.Tensor:
        window, kernel = self.p["window_size"], self.p["kernel_size"]
        votes = window_attention(layer, window)[..., :-window].mean(dim=-2)
        votes = F.avg_pool1d(votes, kernel_size=kernel, padding=kernel // 2, stride=1)
        scores = per_kv_head(votes, layer.keys.shape[1])
        return F.pad(scores, (0, window), value=scores.max().item() + 1)
