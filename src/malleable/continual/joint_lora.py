"""joint_lora: the oracle of continual LoRA post-training. At every step a fresh adapter trains on all tasks
seen so far together (their examples shuffled), for `training.steps` times the number of those tasks (with
`training.epochs`: that many epochs over them all): multi-task training with every task's data at hand, which a
stream does not have."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from malleable.continual.adapters import AdapterStrategy, reinit
from malleable.continual.registry import continual_method


@continual_method("joint_lora")
class JointLoRA(AdapterStrategy):
    """Oracle: a fresh adapter on the union of the tasks so far, at every step (steps x tasks)."""

    def examples(self, current: Sequence, seen: Sequence) -> tuple[Sequence, int]:
        return [x for items in seen for x in items] + list(current), len(seen) + 1

    def begin_task(self, model: torch.nn.Module, t: int) -> None:
        if t:
            reinit(model, self.seed * 1_009 + t)
