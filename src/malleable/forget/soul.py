"""SOUL: second-order unlearning (Jia et al., "SOUL: Unlocking the Power of Second-Order Optimization for LLM
Unlearning", 2024, arXiv 2404.18239), i.e. an unlearning loss optimised with Sophia (Liu et al., "Sophia: A Scalable
Stochastic Second-order Optimizer for Language Model Pre-training", ICLR 2024) instead of AdamW.

Sophia keeps an EMA m of gradients and an EMA h of a diagonal Hessian estimate refreshed every k steps, and
moves each coordinate by lr * clip(m / max(rho * h, eps), 1) (SophiaG's form, decoupled weight decay), so no
coordinate ever moves by more than lr: a flat or negative-curvature direction gets a sign step, a sharp one a
Newton step. Estimates: Gauss-Newton-Bartlett (backprop of the cross-entropy against labels drawn from the
model's own predictions on the step's inputs: N * g^2 for N sampled targets, Sophia-G) or Hutchinson
(u * Hu for a Rademacher u, by double backprop of the objective's own loss, Sophia-H). The extra backward
passes run inside the objective's loss on refresh steps with torch.autograd.grad, leaving `.grad` to the engine.

Two estimators, two sources. `estimator: gnb` (default) and `hutchinson` are the Sophia paper's (its
github.com/Liuhong99/Sophia sophia.py and train_sophiag.py: an estimate every k steps). `estimator: soul` is what
SOUL's own code runs (github.com/OPTML-Group/SOUL at 30f7a41, src/optim/sophia.py `SophiaG.step`, called by the
HF Trainer with no arguments): EVERY step, before the update, h <- beta2 h + (1 - beta2) g^2 with g the
objective's own (clipped) gradient, m's EMA applied twice (`update_exp_avg`, then again inside `_sophiag`, i.e. an
EMA with beta1^2), and the ratio |m| / (rho * bs * h + 1e-15) with `bs` left at its default 5120 (`soul_bs`):
the squared gradient stands in for the Hessian and bs rescales it, as Sophia-G's B * g^2 does for a sampled
batch of B tokens. No extra backward pass; `hessian_every` does not apply.

`SecondOrder` turns any objective into its second-order version (``class X(SecondOrder, NPO)``); soul_graddiff
and soul_npo are SOUL's SO-GradDiff and SO-NPO. Defaults are SOUL's TOFU configs (betas 0.9 / 0.95, rho 0.04)
and SophiaG's k = 10. They bring their own optimiser, so training.optimizer stays unset (the engine refuses another).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from malleable.forget.graddiff import GradDiff
from malleable.forget.losses import output_logits
from malleable.forget.npo import NPO
from malleable.forget.registry import objective
from malleable.params import Param


class Sophia(torch.optim.Optimizer):
    """SophiaG's clipped update; `update_hessian` feeds the diagonal Hessian estimates."""

    def __init__(self, params, lr: float, betas: tuple[float, float] = (0.9, 0.95), rho: float = 0.04,
                 weight_decay: float = 0.0, eps: float = 1e-15, soul_bs: float | None = None):
        super().__init__(params, dict(lr=lr, betas=betas, rho=rho, weight_decay=weight_decay, eps=eps))
        self.soul_bs = soul_bs  # SOUL's estimator: h from the step's own gradient, scaled by its `bs`

    def _state(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        if not state:
            state["m"] = torch.zeros_like(p)
            state["h"] = torch.zeros_like(p)
        return state

    @torch.no_grad()
    def update_hessian(self, estimates: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """h <- beta2 h + (1 - beta2) estimate, for each (parameter, estimate)."""
        beta2 = {id(p): g["betas"][1] for g in self.param_groups for p in g["params"]}
        for p, estimate in estimates:
            if id(p) in beta2:
                self._state(p)["h"].mul_(beta2[id(p)]).add_(estimate.to(p.dtype), alpha=1 - beta2[id(p)])

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            lr, (beta1, _), rho = group["lr"], group["betas"], group["rho"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self._state(p)
                if self.soul_bs is not None:  # SOUL's SophiaG.step: update_hessian, update_exp_avg, then the step
                    state["h"].mul_(group["betas"][1]).addcmul_(p.grad, p.grad, value=1 - group["betas"][1])
                    state["m"].mul_(beta1).add_(p.grad, alpha=1 - beta1)
                state["m"].mul_(beta1).add_(p.grad, alpha=1 - beta1)
                p.mul_(1 - lr * group["weight_decay"])
                if self.soul_bs is not None:
                    ratio = (state["m"].abs() / (rho * self.soul_bs * state["h"] + group["eps"])).clamp(max=1)
                else:
                    ratio = (state["m"].abs() / (rho * state["h"]).clamp(min=group["eps"])).clamp(max=1)
                p.addcmul_(state["m"].sign(), ratio, value=-lr)


def gnb_estimate(model: torch.nn.Module, parts: list[dict], params: list) -> list[tuple]:
    """Gauss-Newton-Bartlett: N * g^2, g the gradient of the mean cross-entropy of N targets sampled from the
    model's own predictive distribution at the parts' inputs."""
    total, count = 0.0, 0
    for part in parts:
        logits, mask = output_logits(model, part)
        sampled = torch.distributions.Categorical(logits=logits.detach()).sample()
        total = total + F.cross_entropy(logits[mask], sampled[mask], reduction="sum")
        count += int(mask.sum())
    grads = torch.autograd.grad(total / max(count, 1), params, allow_unused=True)
    return [(p, count * g.detach() ** 2) for p, g in zip(params, grads) if g is not None]


def hutchinson_estimate(loss: torch.Tensor, params: list) -> list[tuple]:
    """u * (H u) for a Rademacher u, keeping the loss's graph for the engine's backward."""
    used = [(p, g) for p, g in zip(params, torch.autograd.grad(loss, params, create_graph=True, allow_unused=True))
            if g is not None]
    u = [torch.randint_like(p, 2) * 2 - 1 for p, _ in used]
    hu = torch.autograd.grad(sum((g * v).sum() for (_, g), v in zip(used, u)), [p for p, _ in used],
                             retain_graph=True)
    return [(p, v * h.detach()) for (p, _), v, h in zip(used, u, hu)]


SOPHIA_PARAMS = {
    "rho": Param(0.04, "Sophia's clipping scale: a step is lr * clip(m / (rho h), 1)", gt=0),
    "beta1": Param(0.9, "EMA factor of the gradients", ge=0, le=1),
    "beta2": Param(0.95, "EMA factor of the Hessian estimates", ge=0, le=1),
    "hessian_every": Param(10, "steps between two Hessian estimates (Sophia's k)", ge=1),
    "estimator": Param("gnb", "diagonal Hessian estimate: Gauss-Newton-Bartlett or Hutchinson every hessian_every "
                       "steps (Sophia's), or SOUL's code's: the step's own squared gradient every step",
                       choices=("gnb", "hutchinson", "soul")),
    "soul_bs": Param(5120, "estimator soul: the bs its SophiaG.step divides by (rho * bs * h); SOUL never passes "
                     "it, so its default 5120 applies", gt=0),
}


class SecondOrder:
    """Mixin: the objective's loss, optimised by Sophia with a Hessian estimate every `hessian_every` steps."""

    def optimizer(self, params: list, training) -> Sophia:
        groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": training.weight_decay},
                  {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
        self.sophia = Sophia([g for g in groups if g["params"]], lr=training.lr, rho=self.p["rho"],
                             betas=(self.p["beta1"], self.p["beta2"]),
                             soul_bs=self.p["soul_bs"] if self.p["estimator"] == "soul" else None)
        self.steps = 0
        return self.sophia

    def loss(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        refresh, self.steps = self.steps % self.p["hessian_every"] == 0, self.steps + 1
        if not refresh or self.p["estimator"] == "soul":  # soul's estimate is taken inside the optimiser step
            return super().loss(model, batch)
        params = [p for p in model.parameters() if p.requires_grad]
        if self.p["estimator"] == "hutchinson":
            with sdpa_kernel(SDPBackend.MATH):  # the fused attention kernels have no double backward
                loss = super().loss(model, batch)
            self.sophia.update_hessian(hutchinson_estimate(loss, params))
            return loss
        self.sophia.update_hessian(gnb_estimate(model, [p for p in batch.values() if p is not None], params))
        return super().loss(model, batch)


@objective("soul_graddiff", params=SOPHIA_PARAMS)
class SoulGradDiff(SecondOrder, GradDiff):
    """SO-GradDiff: GradDiff's loss optimised with Sophia (SOUL)."""


@objective("soul_npo", params=SOPHIA_PARAMS)
class SoulNPO(SecondOrder, NPO):
    """SO-NPO: NPO's loss optimised with Sophia (SOUL)."""
