"""Random labels (RL): train the forget samples towards wrong classes while the retain set keeps the rest.

The classic classifier baseline (Golatkar et al., 2020; SalUn pairs it with its mask). SalUn draws one random
label per forget sample once; here every step draws fresh wrong labels (never the true class), so the model
cannot simply memorise a new mapping for the forget samples.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from malleable.forget.losses import mean_nll
from malleable.learn.loss import class_logits
from malleable.forget.registry import Objective, objective
from malleable.params import Param


@objective("rl", kinds=("classifier",), needs_retain=True, params={
    "alpha": Param(1.0, "weight of the retain cross-entropy", ge=0),
})
class RandomLabels(Objective):
    """Random labels: cross-entropy of forget samples against random wrong classes + retain cross-entropy."""

    def loss(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        part = batch["forget"]
        logits = class_logits(model, part)
        shift = torch.randint(1, logits.shape[1], part["labels"].shape, device=logits.device)
        wrong = (part["labels"] + shift) % logits.shape[1]  # uniform over the classes other than the true one
        return F.cross_entropy(logits, wrong) + self.p["alpha"] * mean_nll(model, batch["retain"])
