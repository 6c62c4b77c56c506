"""RMU, Representation Misdirection for Unlearning (Li et al., "The WMDP Benchmark", 2024).

At one decoder layer, push the forget set's hidden states towards a fixed random direction scaled by
`steering_coeff` (so later layers see noise) and keep the retain set's hidden states where the frozen original
had them: loss = gamma * MSE(h_forget, c * u) + alpha * MSE(h_retain, h_retain_original), u ~ U[0,1)^d / norm.

Follows open-unlearning's `RMU` (src/trainer/unlearn/rmu.py, "borrowed from" WMDP's rmu/unlearn.py) and its
configs/trainer/RMU.yaml defaults: `layer` 7 (module_regex model.layers.7), `steering_coeff` 2, `alpha` 1
(retain weight), `gamma` 1 (forget weight; WMDP has none, i.e. 1). Hidden states are the decoder layer's
output at the answer tokens' OWN positions (open-unlearning masks with labels != -100, unshifted; malleable
before 2026-11-29 read the positions one earlier, those that predict the answer tokens). WMDP trains on plain
documents and takes every position (padding included) with steering_coeff 20 and alpha 100.

`trainable`: "down_proj" trains only the MLP down-projections of the layer and the two below it (WMDP's
layer_ids 5,6,7 with param_ids 6, and open-unlearning's commented alternative); "all" trains every weight
(open-unlearning's TOFU default, trainable_params_regex ".*"). The default stays "down_proj", the method
authors' choice and what this objective always did. A run through a LoRA adapter trains the adapter instead.

One difference kept: the MSE is a mean over every scored token of the batch; open-unlearning's
`compute_activation_loss` averages per sequence first, then over sequences (the same when all sequences have
as many answer tokens).
"""

from __future__ import annotations

import torch

from malleable.errors import RecipeError
from malleable.forget.registry import Objective, objective
from malleable.params import Param


def _decoder_layer(model: torch.nn.Module, index: int) -> torch.nn.Module:
    layers = next((m for name, m in model.named_modules() if name.endswith("layers")
                   and isinstance(m, torch.nn.ModuleList)), None)
    if layers is None or not -len(layers) <= index < len(layers):
        raise RecipeError(f"parameters.layer: {index} is not a decoder layer of this model")
    return layers[index]


def hidden_states(model: torch.nn.Module, part: dict, layer: int) -> torch.Tensor:
    """The output of decoder layer `layer` at the answer tokens' own positions (labels != -100), (N, hidden)."""
    captured = []
    hook = _decoder_layer(model, layer).register_forward_hook(
        lambda m, args, out: captured.append(out[0] if isinstance(out, tuple) else out))
    try:
        positions = (part["attention_mask"].cumsum(1) - 1).clamp(min=0)
        model(input_ids=part["input_ids"], attention_mask=part["attention_mask"], position_ids=positions,
              logits_to_keep=1, use_cache=False)
    finally:
        hook.remove()
    return captured[0][part["labels"] != -100].float()


@objective("rmu", kinds=("causal_lm",), needs_retain=True, needs_reference=True, params={
    "layer": Param(7, "decoder layer whose hidden states are steered"),
    "steering_coeff": Param(2.0, "norm of the random target direction", gt=0),
    "alpha": Param(1.0, "weight of the retain term (MSE to the original's hidden states)", ge=0),
    "gamma": Param(1.0, "weight of the forget term (MSE to the steered direction)", ge=0),
    "trainable": Param("down_proj", "which weights train: the MLP down-projections of the layer and the two "
                       "below it (WMDP), or all (open-unlearning's TOFU default)", choices=("down_proj", "all")),
})
class RMU(Objective):
    """RMU: steer the forget set's hidden states at one layer to a random direction; keep retain's."""

    def prepare(self, model: torch.nn.Module, task: str) -> torch.nn.Module:
        model.requires_grad_(self.p["trainable"] == "all")
        if self.p["trainable"] == "all":
            return model
        top = self.p["layer"] % len(next(m for n, m in model.named_modules() if n.endswith("layers")))
        for i in range(max(0, top - 2), top + 1):
            _decoder_layer(model, i).mlp.down_proj.weight.requires_grad_(True)
        return model

    def setup(self, model, forget, retain, collate) -> None:
        hidden = model.config.hidden_size
        direction = torch.rand(hidden)  # WMDP draws from U[0, 1) and normalises
        self.target = direction / direction.norm() * self.p["steering_coeff"]

    def loss(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        layer = self.p["layer"]
        forget = hidden_states(model, batch["forget"], layer)
        retain = hidden_states(model, batch["retain"], layer)
        original = self.reference(hidden_states, batch["retain"], layer)
        target = self.target.to(forget.device)
        return (self.p["gamma"] * ((forget - target) ** 2).mean()
                + self.p["alpha"] * ((retain - original) ** 2).mean())
