"""inc_lora: a new LoRA adapter per task; the earlier tasks' adapters stay frozen and the model adds them all.

After each task its adapter is frozen (added into the base layers' weights, which is exactly the sum PEFT
computes with every adapter active) and a fresh one, PEFT's initialisation from the stream's seed and the task's
index, trains on the next task. The written adapter is the concatenation of the task adapters (rank r x tasks):
PEFT loads it as one adapter with the same output as the sum.
"""

from __future__ import annotations

import torch

from malleable.continual.adapters import (AdapterStrategy, concatenated, current, factors_from, factors_state, fold,
                                         reinit)
from malleable.continual.registry import continual_method
from malleable.deltas.lowrank import LowRankDelta


@continual_method("inc_lora")
class IncLoRA(AdapterStrategy):
    """Incremental LoRA: a new adapter per task, the earlier ones frozen and summed."""

    def setup(self, num_classes: int) -> None:
        super().setup(num_classes)
        self.frozen: list[dict[str, LowRankDelta]] = []  # one per finished task, PEFT's factors and scale

    def end_task(self, model: torch.nn.Module, t: int, items: list, collate) -> None:
        finished = current(model)
        self.frozen.append(finished)
        fold(model, finished)
        reinit(model, self.seed * 1_009 + t + 1)

    def adapter(self, model: torch.nn.Module):
        return concatenated(self.frozen)

    def state(self) -> dict[str, torch.Tensor]:
        out = {"inc.tasks": torch.tensor(len(self.frozen))}
        for i, deltas in enumerate(self.frozen):
            out |= factors_state(f"inc.{i}", deltas)
        return out

    def load_state(self, tensors: dict[str, torch.Tensor], model: torch.nn.Module | None = None) -> None:
        self.frozen = [factors_from(f"inc.{i}", tensors) for i in range(int(tensors["inc.tasks"]))]
        for deltas in self.frozen:
            fold(model, deltas)
