"""merge_each: one adapter per task, each trained from the base model on its task alone, and after every task
the adapters so far merged into one by a rule of `malleable merge` (any rule that merges LoRA adapters into an
adapter: ties, task_arithmetic, ctm, knots, core_space, ...). The merged adapter is what the stream holds and is
scored; the next task's adapter starts fresh from the base again.

The merge runs through merge's own engine on the task adapters written as PEFT adapters (in the run folder), with
the rule's defaults and an adapter output of the stream's LoRA rank (the trainable adapter holds it for scoring):
what a user gets from `malleable merge` on the same adapters. After the first task there is nothing to merge yet,
and the stream holds that task's adapter as it is (a rule such as TIES would otherwise trim an adapter merged
with nothing).
"""

from __future__ import annotations

import shutil

import torch

from malleable.continual.adapters import AdapterStrategy, current, factors_from, factors_state, reinit, set_adapter
from malleable.continual.registry import continual_method
from malleable.deltas.lowrank import LowRankDelta
from malleable.params import Param


@continual_method("merge_each", params={
    "rule": Param("ties", "the merge rule (any of `malleable merge`'s rules with a LoRA adapter output)")})
class MergeEach(AdapterStrategy):
    """Per-task adapters from the base model, merged into one with a `merge` rule after every task."""

    def setup(self, num_classes: int) -> None:
        super().setup(num_classes)
        self.tasks: list[dict[str, LowRankDelta]] = []
        self.merged: dict[str, LowRankDelta] | None = None

    def begin_task(self, model: torch.nn.Module, t: int) -> None:
        if t:
            reinit(model, self.seed * 1_009 + t)

    def end_task(self, model: torch.nn.Module, t: int, items: list, collate) -> None:
        self.tasks.append(current(model))
        self.merged = self.tasks[0] if len(self.tasks) == 1 else self._merge(self.tasks, current(model))
        set_adapter(model, self.merged)

    def _merge(self, tasks: list[dict[str, LowRankDelta]], like: dict[str, LowRankDelta]) -> dict[str, LowRankDelta]:
        from malleable.io.adapter import read_adapter, write_adapter
        from malleable.merge.engine import plan_merge, run_merge
        from malleable.recipes.merge import parse_recipe

        root = self.workdir / "merge_each"
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        inputs = []
        for i, deltas in enumerate(tasks):
            (root / f"task-{i + 1}").mkdir()
            write_adapter(root / f"task-{i + 1}", deltas, {"base_model_name_or_path": str(self.base),
                                                            "task_type": "CAUSAL_LM"}, torch.float32)
            inputs.append({"path": str(root / f"task-{i + 1}")})
        rank = next(iter(like.values())).rank
        recipe = parse_recipe({"method": self.p["rule"], "base": str(self.base), "inputs": inputs,
                               "output": {"kind": "adapter", "rank": rank, "dtype": "float32"}})
        run_merge(plan_merge(recipe), root / "merged", progress=False)
        merged = read_adapter(root / "merged").deltas
        shutil.rmtree(root, ignore_errors=True)
        return {name: merged.get(name, LowRankDelta(d.B * 0, d.A * 0)) for name, d in like.items()}

    def adapter(self, model: torch.nn.Module):
        return self.merged

    def state(self) -> dict[str, torch.Tensor]:
        out = {"merge_each.tasks": torch.tensor(len(self.tasks))} | factors_state("merged", self.merged or {})
        for i, deltas in enumerate(self.tasks):
            out |= factors_state(f"task.{i}", deltas)
        return out

    def load_state(self, tensors: dict[str, torch.Tensor], model: torch.nn.Module | None = None) -> None:
        self.tasks = [factors_from(f"task.{i}", tensors) for i in range(int(tensors["merge_each.tasks"]))]
        self.merged = factors_from("merged", tensors) or None
