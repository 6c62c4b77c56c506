"""o_lora: incremental LoRA whose new adapter is kept orthogonal to the earlier ones (Wang et al., EMNLP 2023
Findings, "Orthogonal Subspace Learning for Language Model Continual Learning"; github.com/cmnfriend/O-LoRA).

As the authors' trainer: the loss adds ``lambda_1 * sum over modules of |A_old @ A_new^T|.sum()`` (A_old the
earlier tasks' A matrices stacked, the raw factors without LoRA's scale; elementwise absolute values) and
``lambda_2 * sum over the new adapter's tensors of their Frobenius norm`` (not squared); defaults lambda_1 = 0.5,
lambda_2 = 0, the values of their scripts. The earlier adapters are frozen and summed as in inc_lora.

Where ours differs: the authors add the terms to the mean loss of each micro-batch; ours to the mean loss of each
optimiser step (the same with no gradient accumulation). They fine-tune T5 and LLaMA on classification-style
tasks; the stream here is whatever tasks the recipe gives.
"""

from __future__ import annotations

import torch

from malleable.continual.adapters import lora_layers, ADAPTER
from malleable.continual.inc_lora import IncLoRA
from malleable.continual.registry import continual_method
from malleable.params import Param


@continual_method("o_lora", params={
    "lambda_1": Param(0.5, "weight of the orthogonality term |A_old A_new^T| (the authors' 0.5)", ge=0),
    "lambda_2": Param(0.0, "weight of the new adapter's norm (the authors' 0)", ge=0)})
class OLoRA(IncLoRA):
    """O-LoRA: incremental LoRA with the new adapter's subspace pushed orthogonal to the earlier ones'."""

    def penalty(self, model: torch.nn.Module) -> torch.Tensor | None:
        layers = lora_layers(model)
        terms = []
        if self.frozen and self.p["lambda_1"]:
            for name, m in layers.items():
                old = torch.cat([deltas[name].A for deltas in self.frozen]).to(m.lora_A[ADAPTER].weight)
                terms.append(self.p["lambda_1"] * (old @ m.lora_A[ADAPTER].weight.T).abs().sum())
        if self.p["lambda_2"]:
            terms += [self.p["lambda_2"] * torch.linalg.norm(m.lora_A[ADAPTER].weight)
                      + self.p["lambda_2"] * torch.linalg.norm(m.lora_B[ADAPTER].weight) for m in layers.values()]
        return torch.stack(terms).sum() if terms else None
