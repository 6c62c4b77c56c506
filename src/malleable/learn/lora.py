"""LoRA through PEFT: the output is a standard PEFT adapter (adapter_config.json + adapter_model.safetensors)."""

from __future__ import annotations

import torch

from malleable.errors import RecipeError, reason
from malleable.learn.registry import Method, learn_method
from malleable.params import Param

LORA_PARAMS = {
    "r": Param(16, "rank of each adapter", gt=0),
    "alpha": Param(32.0, "scaling numerator: the update is (alpha / r) B A, or alpha / sqrt(r) with rslora", gt=0),
    "dropout": Param(0.0, "dropout on the adapter's input", ge=0, le=1),
    "targets": Param("all-linear", "module names to adapt (a list), or 'all-linear'", many=True),
    "rslora": Param(False, "rank-stabilised scaling alpha / sqrt(r)"),
}


def lora_config(p: dict, task: str):
    from peft import LoraConfig

    return LoraConfig(r=p["r"], lora_alpha=p["alpha"], lora_dropout=p["dropout"], target_modules=p["targets"],
                      use_rslora=p["rslora"], task_type="SEQ_CLS" if task == "classification" else "CAUSAL_LM")


def with_lora(model: torch.nn.Module, p: dict, task: str, prefix: str = "parameters") -> torch.nn.Module:
    """`model` wrapped with PEFT LoRA factors of checked parameters `p`. A rank above every layer's width would
    only allocate (a rank of 1e9 fails for memory) and targets naming no module fail deep in PEFT: both are
    recipe errors naming the key."""
    from peft import get_peft_model

    width = max((min(m.in_features, m.out_features) for m in model.modules() if isinstance(m, torch.nn.Linear)),
                default=0)
    if p["r"] > width:
        raise RecipeError(f"{prefix}.r: {p['r']} is above the widest layer's rank ({width})")
    try:
        return get_peft_model(model, lora_config(p, task))
    except ValueError as e:  # PEFT: "Target modules {...} not found in the base model"
        raise RecipeError(f"{prefix}.targets: {reason(e)}") from None


@learn_method("lora", params=LORA_PARAMS)
class LoRA(Method):
    """LoRA (PEFT): only the low-rank factors train (and a classifier head, for classification)."""

    output = "adapter"

    def prepare(self, model: torch.nn.Module, task: str) -> torch.nn.Module:
        return with_lora(model, self.p, task)

    def save(self, model: torch.nn.Module, directory, tokenizer=None, state_dict=None) -> None:
        model.save_pretrained(directory, state_dict=state_dict)  # PEFT picks the adapter's keys out of it
