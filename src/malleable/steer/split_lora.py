"""SPLIT, LoRA form: h + m x A B, x the input of a chosen module of the steered layer."""

from __future__ import annotations

import math

import torch

from malleable.params import Param
from malleable.steer.apply import FORMS
from malleable.steer.registry import steering_method
from malleable.steer.split import SplitMethod, down_proj_bake, form_hooks, module_width, split_params


class LoraDelta(torch.nn.Module):
    """x A B: A (in, r) uniform within 1/sqrt(r) (the authors' kaiming_uniform_(a=sqrt(5)) on that shape), B (r,
    hidden) zero, so training starts at the unsteered model; no alpha / r scaling (the authors store alpha and do
    not apply it). Dropout on the output while training."""

    def __init__(self, width: int, hidden: int, rank: int, dropout: float = 0.0):
        super().__init__()
        bound = 1 / math.sqrt(rank)
        self.A = torch.nn.Parameter(torch.empty(width, rank).uniform_(-bound, bound))
        self.B = torch.nn.Parameter(torch.zeros(rank, hidden))
        self.drop = torch.nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop((x @ self.A.to(x.dtype)) @ self.B.to(x.dtype))

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"A": self.A.detach().float().clone(), "B": self.B.detach().float().clone()}


MODULE = Param("mlp.down_proj", "the module of the steered layer whose input x the intervention reads "
               "(dotted path; mlp.down_proj: the MLP's intermediate activation, the authors' mlp_mid; '' the "
               "layer's input)")


@steering_method("split_lora", params=split_params(lr=0.01, batch_size=8, gamma=5.0, theta=0.4, m_min=0.2,
                                                   m_max=2.0, swapped=True,
                                                   rank=Param(4, "rank r of A (in, r) and B (r, hidden)", gt=0),
                                                   module=MODULE))
class SplitLora(SplitMethod):
    """SPLIT's LoRA form (h + m x A B added to the steered layer's output, x the input of `module`), trained with
    the preference-utility loss.

    Defaults from the authors' generate_spilt_lora.yaml: lr 0.01, 2 epochs, batch 4 pairs with 2 accumulation
    steps (8 here), w_pos 1, w_neg 0.5, gamma 5, theta 0.4, rank 4, strengths 0.2, 0.4, ..., 2.0, the pair and its
    swap, intervention on mlp_mid, dropout 0.1. Artefact form "lora" (layers.<i>.A, layers.<i>.B); on
    mlp.down_proj of a Llama-style model it bakes into that weight (W += m (A B)^T).
    """

    form = "lora"

    def delta(self, model, layer: int) -> torch.nn.Module:
        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        return LoraDelta(module_width(model, layer, self.p["module"]), int(cfg.hidden_size), self.p["rank"],
                         self.p["dropout"])


def _build(model, layer: int, t: dict[str, torch.Tensor]) -> LoraDelta:
    from malleable.errors import InputError

    a, b = t.get("A"), t.get("B")
    if a is None or b is None or a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
        raise InputError(f"layer {layer}: a LoRA-form artefact needs A (in, r) and B (r, hidden)")
    d = LoraDelta(a.shape[0], b.shape[1], a.shape[1])
    with torch.no_grad():
        d.A.copy_(a)
        d.B.copy_(b)
    return d


def _bake(model, artefact, strength: float) -> None:
    for i, t in artefact.vectors.items():
        _build(model, i, t)  # checks the shapes
        down_proj_bake(model, artefact, strength, t["A"] @ t["B"], i)


FORMS["lora"] = (form_hooks(_build), _bake)
