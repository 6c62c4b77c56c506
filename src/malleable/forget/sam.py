"""Sharpness-aware unlearning (Fan et al., "Towards LLM Unlearning Resilient to Relearning Attacks: A
Sharpness-Aware Minimization Perspective and Beyond", ICML 2025).

Relearning attacks succeed when the unlearned model sits in a sharp valley of the forget loss: a few steps on
forget data climb back out. The paper's fix is min over theta of max over ||delta|| <= rho of the forget loss at
theta + delta, plus the retain loss at theta; SAM's one-step inner maximiser is delta = rho * g / ||g||, g the
forget loss's gradient (one norm over all trainable parameters), as in the official code
(OPTML-Group/Unlearn-Smooth, sam_iterative.py, default rho 0.01).

Here the loss computes g with torch.autograd.grad, then evaluates the forget loss with every trainable
parameter replaced by theta + delta for the duration of that forward only (the stored parameters are never
written), so the gradient the engine backpropagates is the SAM gradient: the forget gradient at the perturbed
point plus the retain gradient at theta. The base forget term is GA, GradDiff's or NPO's. The SAM step
(`sam_shift`, `shifted`) is learn/lora_sam.py's.
"""

from __future__ import annotations

import torch

from malleable.errors import InputError
from malleable.forget.graddiff import GradientAscent
from malleable.forget.npo import NPO
from malleable.forget.registry import objective
from malleable.learn.lora_sam import sam_shift, shifted
from malleable.params import Param


@objective("sam", needs_reference=False, params={
    "rho": Param(0.01, "radius of the ball the forget loss is maximised over", ge=0),
    "base": Param("npo", "the forget term made sharpness-aware", choices=("ga", "graddiff", "npo")),
})
class SharpnessAware(NPO):
    """SAM unlearning: the base forget loss at its worst point within rho of theta, + the retain term at theta."""

    def setup(self, model, forget, retain, collate) -> None:
        base = self.p["base"]
        if base != "ga" and not retain:
            raise InputError(f"retain set: sam with base {base} needs retain data and none was given")
        self.needs_reference = base == "npo" or (base != "ga" and self.p["retain_loss"] != "nll")

    def forget_term(self, model: torch.nn.Module, part: dict) -> torch.Tensor:
        return super().forget_term(model, part) if self.p["base"] == "npo" else GradientAscent.forget_term(
            self, model, part)

    def perturbed_forget_term(self, model: torch.nn.Module, part: dict) -> torch.Tensor:
        if self.p["rho"] == 0:
            return self.forget_term(model, part)
        params = [p for p in model.parameters() if p.requires_grad]
        grads = torch.autograd.grad(self.forget_term(model, part), params, allow_unused=True)
        with shifted(model, sam_shift(params, grads, self.p["rho"])):
            return self.forget_term(model, part)

    def loss(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        forget = self.p["gamma"] * self.perturbed_forget_term(model, batch["forget"])
        if self.p["base"] == "ga":
            return forget
        return forget + self.p["alpha"] * self.retain_term(model, batch["retain"])
