"""StreamingLLM (Xiao et al. 2024, "Efficient Streaming Language Models with Attention Sinks"), as kvpress's
`StreamingLLMPress`: keep the first `n_sink` positions (the attention sinks) and the most recent ones, evict the
middle. Like kvpress, the kept keys keep their original rotary positions (the paper re-rotates them to
contiguous positions; kvpress does that in a separate wrapper, left out here)."""

from __future__ import annotations

import torch

from malleable.errors import InputError
from malleable.params import Param
from malleable.slim.evict import EvictionPolicy, LayerState, eviction_policy


@eviction_policy("streaming_llm", params={"n_sink": Param(4, "initial positions always kept", ge=0)})
class StreamingLLM(EvictionPolicy):
    def check(self, length: int, kept: int) -> None:
        if kept <= self.p["n_sink"]:
            raise InputError(f"parameters.n_sink: {self.p['n_sink']} sink tokens leave no room in a budget of "
                             f"{kept} kept positions")

    def score(self, layer: LayerState) -> torch.Tensor:
        length = layer.keys.shape[2]
        scores = torch.ones(layer.keys.shape[:3])
        # positions n_sink .. n_sink + evicted - 1 score 0: the oldest after the sinks go first
        evicted = length - layer.kept
        scores[:, :, self.p["n_sink"]:self.p["n_sink"] + evicted] = 0
        return scores
