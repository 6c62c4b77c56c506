"""SPLIT, local weight form: h + m (x dW + db), x the MLP's intermediate activation of the steered layer."""

from __future__ import annotations

import torch

from malleable.steer.apply import FORMS
from malleable.steer.registry import steering_method
from malleable.steer.split import SplitMethod, down_proj_bake, form_hooks, module_width, split_params


class WeightDelta(torch.nn.Module):
    """x dW + db, dW (in, hidden) and db (hidden,) zero at the start (the authors' LocalWeightIntervention);
    dropout on the output while training."""

    def __init__(self, width: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(width, hidden))
        self.bias = torch.nn.Parameter(torch.zeros(hidden))
        self.drop = torch.nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(x @ self.weight.to(x.dtype) + self.bias.to(x.dtype))

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"weight": self.weight.detach().float().clone(), "bias": self.bias.detach().float().clone()}


@steering_method("split_weight", params=split_params(lr=0.01, batch_size=8, gamma=5.0, theta=0.4, m_min=0.2,
                                                     m_max=2.0, swapped=False))
class SplitWeight(SplitMethod):
    """SPLIT's local weight form (h + m (x dW + db) added to the steered layer's output, x the MLP's intermediate
    activation: mlp.down_proj's input, the authors' mlp_mid), trained with the preference-utility loss.

    Defaults from the authors' generate_spilt_local_weight.yaml: lr 0.01, 2 epochs, batch 4 pairs with 2
    accumulation steps (8 here), w_pos 1, w_neg 0.5, gamma 5, theta 0.4, strengths 0.2, 0.4, ..., 2.0, dropout
    0.1, and only the pair itself ("orig_add"; `swapped: true` adds the swap at -m as the other forms do).
    Artefact form "local_weight" (layers.<i>.weight, layers.<i>.bias); on a Llama-style model it bakes into
    mlp.down_proj (W += m dW^T, a bias m db through mlp_bias).
    """

    form = "local_weight"
    module = "mlp.down_proj"

    def delta(self, model, layer: int) -> torch.nn.Module:
        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        return WeightDelta(module_width(model, layer, self.module), int(cfg.hidden_size), self.p["dropout"])


def _build(model, layer: int, t: dict[str, torch.Tensor]) -> WeightDelta:
    from malleable.errors import InputError

    w, b = t.get("weight"), t.get("bias")
    if w is None or b is None or w.dim() != 2 or b.shape != (w.shape[1],):
        raise InputError(f"layer {layer}: a local-weight artefact needs weight (in, hidden) and bias (hidden,)")
    d = WeightDelta(w.shape[0], w.shape[1])
    with torch.no_grad():
        d.weight.copy_(w)
        d.bias.copy_(b)
    return d


def _bake(model, artefact, strength: float) -> None:
    for i, t in artefact.vectors.items():
        down_proj_bake(model, artefact, strength, t["weight"], i, t["bias"])


FORMS["local_weight"] = (form_hooks(_build), _bake)
