"""Gradient ascent and GradDiff: the two baselines every unlearning paper starts from.

GA raises the forget set's loss and nothing else; it forgets fast and breaks the model soon after. GradDiff
(Liu et al., "Continual Learning and Private Unlearning", 2022; the name follows TOFU) adds a retain term,
either the usual NLL on retain data or KL to the frozen original model on it. NPO and SimNPO (npo.py) change
only the forget term of GradDiff, so they subclass it.

The retain term (`retain_loss`) follows open-unlearning's `GradDiff.compute_retain_loss`, whose default (every
configs/trainer GradDiff/NPO/SimNPO.yaml) is NLL, as here. Its KL (src/trainer/utils.py, `compute_kl_divergence`)
is KL(original || model) summed over the vocabulary at EVERY position of the retain sequences, prompt included,
divided by batch x length (`batchmean` over the flattened positions): `kl_full` here, except that padding is left
out of the mean (open-unlearning counts padded positions too; equal on unpadded batches). `kl` (malleable's
own) takes only the positions that predict answer tokens, the ones the NLL term trains; it stays what "kl" means.
"""

from __future__ import annotations

import torch

from malleable.forget.losses import kl_to, mean_nll, output_logits, sequence_logits
from malleable.forget.registry import Objective, objective
from malleable.params import Param

RETAIN_PARAMS = {
    "gamma": Param(1.0, "weight of the forget term", ge=0),
    "alpha": Param(1.0, "weight of the retain term", ge=0),
    "retain_loss": Param("nll", "retain term: NLL on retain data, or KL to the frozen original on it at the "
                         "answer tokens (kl) or at every position (kl_full, open-unlearning's)",
                         choices=("nll", "kl", "kl_full")),
}


@objective("ga", kinds=("classifier", "causal_lm"))
class GradientAscent(Objective):
    """Gradient ascent: maximise the forget set's NLL. No retain data."""

    def forget_term(self, model: torch.nn.Module, part: dict) -> torch.Tensor:
        return -mean_nll(model, part)

    def loss(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        return self.forget_term(model, batch["forget"])


@objective("graddiff", params=RETAIN_PARAMS, needs_retain=True)
class GradDiff(GradientAscent):
    """GradDiff: gamma * (ascent on forget) + alpha * (NLL on retain, or KL to the original on retain)."""

    def setup(self, model, forget, retain, collate) -> None:
        self.needs_reference = type(self).needs_reference or self.p["retain_loss"] != "nll"

    def retain_term(self, model: torch.nn.Module, part: dict) -> torch.Tensor:
        if self.p["retain_loss"] == "nll":
            return mean_nll(model, part)
        logits_of = sequence_logits if self.p["retain_loss"] == "kl_full" else output_logits
        logits, mask = logits_of(model, part)
        reference, _ = self.reference(logits_of, part)
        return kl_to(reference, logits, mask)

    def loss(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        forget = self.p["gamma"] * self.forget_term(model, batch["forget"])
        return forget + self.p["alpha"] * self.retain_term(model, batch["retain"]) if self.needs_retain else forget


class OptionalRetain:
    """Mixin for a GradDiff-shaped objective whose papers also run it without retain data: alpha 0 needs none."""

    def __init__(self, **params):
        super().__init__(**params)
        self.needs_retain = self.p["alpha"] > 0
