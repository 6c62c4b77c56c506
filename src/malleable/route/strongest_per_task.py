"""Per task, the candidate with the best mean training quality on that task."""

from __future__ import annotations

import numpy as np

from malleable.route.registry import Router, mean_costs, router
from malleable.route.strongest import best


@router("strongest_per_task")
class StrongestPerTask(Router):
    """Each query to the best candidate of its task on the training split (the cheaper among equals); a task
    unseen in training goes to the overall strongest. Needs the task name at routing time, nothing else."""

    def fit(self, train, seed):
        costs = mean_costs(train)
        self.info["per_task"] = {t: best(train.Y[train.task == t], costs) for t in sorted(set(train.task))}
        self.info["fallback"] = best(train.Y, costs)

    def choose(self, batch, value):
        table, fallback = self.info["per_task"], self.info["fallback"]
        return np.array([table.get(t, fallback) for t in batch.task], dtype=np.int64)
