"""SPLIT, vector form: h + m v on a decoder layer's output (the residual stream)."""

from __future__ import annotations

import math

import torch

from malleable.steer.registry import steering_method
from malleable.steer.split import SplitMethod, split_params


class VectorDelta(torch.nn.Module):
    """v, initialised as the authors' nn.Linear(hidden, 1) weight (uniform within 1/sqrt(hidden)); dropout on the
    vector per row while training."""

    def __init__(self, hidden: int, dropout: float = 0.0):
        super().__init__()
        bound = 1 / math.sqrt(hidden)
        self.v = torch.nn.Parameter(torch.empty(hidden).uniform_(-bound, bound))
        self.drop = torch.nn.Dropout(dropout)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.drop(self.v.expand(h.shape[0], 1, -1))

    def tensors(self) -> torch.Tensor:
        return self.v.detach().float().clone()


@steering_method("split_vector", params=split_params(lr=0.08, batch_size=4, gamma=8.0, theta=0.3, m_min=2.0,
                                                     m_max=20.0, swapped=True))
class SplitVector(SplitMethod):
    """SPLIT's vector form (h + m v at the steered layers' outputs), trained with the preference-utility loss.

    Defaults from the authors' generate_spilt_vector.yaml (EasyEdit, spilt_experiment): lr 0.08, 2 epochs,
    batch 4 pairs, w_pos 1, w_neg 0.5, gamma 8, theta 0.3, w_ref 0, strengths 2, 4, ..., 20, both the pair and its
    swap, dropout 0.1. The artefact is a plain steering vector (form "vector"): it applies, bakes and exports as
    CAA's does. See steer/split.py for the loss and where ours differs from the authors' code.
    """

    form = "vector"

    def delta(self, model, layer: int) -> torch.nn.Module:
        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        return VectorDelta(int(cfg.hidden_size), self.p["dropout"])
