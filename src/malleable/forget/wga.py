"""WGA: weighted gradient ascent (Wang et al., "Rethinking LLM Unlearning Objectives: A Gradient Perspective and
Go Beyond", ICLR 2025, the G-effect paper).

Gradient ascent's forget loss is the mean of log p over the answer tokens; WGA weights each token's term by its
own probability raised to beta, held constant (no gradient through the weight): mean(p^beta * log p). A token the
model no longer predicts gets a small weight, so, like NPO, the ascent fades on what is already forgotten
instead of driving the likelihood to zero, while tokens still recalled keep GA's full push.

Transcribed from open-unlearning's `compute_wga_loss` (src/trainer/utils.py) and its WGA trainer
(src/trainer/unlearn/wga.py: gamma * forget + alpha * GradDiff's retain term); defaults are its
configs/trainer/WGA.yaml: beta 1, gamma 1, alpha 1, NLL retain term (lr 1e-5 there). The authors' code
(github.com/tmlr-group/G-effect, dataloader.py, loss_type 'wga') computes the same forget term with beta 5 by
default and no retain term ('wga_kl' adds KL to the original on retain): set beta 5 and alpha 0 for it.

The paper evaluates language models only. The loss needs nothing but the probability of each target unit, so
on a classifier it is the same formula per example (weight p(y|x)^beta); that use is ours.
"""

from __future__ import annotations

import torch

from malleable.forget.graddiff import RETAIN_PARAMS, GradDiff, OptionalRetain
from malleable.forget.losses import logits_and_targets
from malleable.forget.registry import objective
from malleable.params import Param


def weighted_ascent(logits: torch.Tensor, targets: torch.Tensor, beta: float) -> torch.Tensor:
    """mean over the scored units of p^beta (detached) * log p: minimising it is WGA's forget step."""
    mask = targets != -100
    logp = torch.log_softmax(logits.float(), -1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    weight = logp.detach().exp() ** beta
    return (weight * logp)[mask].mean()


@objective("wga", params={
    "beta": Param(1.0, "exponent of the per-token probability weight p^beta (0: plain gradient ascent)", ge=0),
    **RETAIN_PARAMS,
})
class WGA(OptionalRetain, GradDiff):
    """WGA: gradient ascent with each token weighted by its (detached) probability^beta, plus GradDiff's retain term."""

    def forget_term(self, model: torch.nn.Module, part: dict) -> torch.Tensor:
        return weighted_ascent(*logits_and_targets(model, part), self.p["beta"])
