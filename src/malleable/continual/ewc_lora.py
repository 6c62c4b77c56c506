"""ewc_lora: elastic weight consolidation on the adapter (Kirkpatrick et al., PNAS 2017), as TRACE's continual
LLM baseline (github.com/BeyondTheCL/TRACE, model/Regular/EWC.py) applies it to the trainable parameters.

The loss adds ``lambda / 2 * sum F (theta - theta*)^2``: theta* the adapter at the end of the previous task, F
the diagonal Fisher information summed over all earlier tasks (never reset, as TRACE), each task's the mean over
batches of the squared gradient of its mean token loss; lambda = 400, TRACE's default.

Where ours differs: TRACE accumulates a task's Fisher from the gradients of its training steps (the penalty's
gradient included); ours takes them after the task, from `fisher_batches` seeded batches of the task's own
examples at the final adapter, the task loss alone (the usual empirical Fisher, and independent of the
optimiser's path). With this Fisher, TRACE's lambda = 400 changes nothing measurable on the continual LoRA
benchmark's stream (22.5% average accuracy on held-out training items, seq_lora's level); 4e4 and 4e5 give
57.5% and 56.9% (bench/results/continual_lora_tuning.md), so set `lam` by such a search for a new stream.
"""

from __future__ import annotations

import torch

from malleable.continual.adapters import adapter_params
from malleable.continual.l2_lora import L2LoRA
from malleable.continual.registry import continual_method
from malleable.learn.loss import task_loss
from malleable.params import Param


@continual_method("ewc_lora", params={
    "lam": Param(400.0, "weight of the Fisher-weighted squared distance (TRACE's lambda_ewc 400)", ge=0),
    "fisher_batches": Param(20, "batches of the task's examples the Fisher is estimated on", gt=0),
    "fisher_batch_size": Param(8, "examples per such batch", gt=0)})
class EWCLoRA(L2LoRA):
    """EWC on the adapter: the pull towards the previous adapter weighted by the diagonal Fisher information."""

    def end_task(self, model: torch.nn.Module, t: int, items: list, collate) -> None:
        params = adapter_params(model)
        fisher = {k: torch.zeros_like(p) for k, p in params.items()}
        g = torch.Generator().manual_seed(self.seed * 1_009 + t)
        n = self.p["fisher_batches"]
        model.eval()
        for _ in range(n):
            idx = torch.randint(len(items), (min(self.p["fisher_batch_size"], len(items)),), generator=g).tolist()
            batch = {k: v.to(next(iter(params.values())).device) for k, v in collate([items[i] for i in idx]).items()}
            model.zero_grad(set_to_none=True)
            task_loss(model, batch).mean().backward()
            for k, p in params.items():
                if p.grad is not None:
                    fisher[k] += p.grad.detach() ** 2 / n
        model.zero_grad(set_to_none=True)
        model.train()
        self.weight = {k: self.weight.get(k, 0) + f for k, f in fisher.items()}
        super().end_task(model, t, items, collate)
