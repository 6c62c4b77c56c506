"""replay_lora: one adapter trained task after task on the task's examples mixed with a stored share of every
earlier task's (experience replay for post-training, as TRACE's replay baseline and most continual
instruction-tuning work mix old data into the new).

The memory keeps a seeded random `share` of each task's training examples (at least one) once the task is done;
a task then trains for `training.steps` on its own examples together with the whole memory, shuffled.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from malleable.continual.adapters import AdapterStrategy
from malleable.continual.registry import continual_method
from malleable.params import Param


@continual_method("replay_lora", params={
    "share": Param(0.1, "share of each earlier task's training examples kept and replayed", gt=0, le=1)})
class ReplayLoRA(AdapterStrategy):
    """Sequential LoRA with replay: each task's examples mixed with a stored share of the earlier tasks'."""

    def examples(self, current: Sequence, seen: Sequence) -> tuple[Sequence, int]:
        memory = []
        for t, items in enumerate(seen):  # `seen`: the earlier tasks' training examples, one list per task
            g = torch.Generator().manual_seed(self.seed * 1_009 + t)
            keep = max(1, round(self.p["share"] * len(items)))
            memory += [items[i] for i in torch.randperm(len(items), generator=g)[:keep].tolist()]
        return list(current) + memory, 1
