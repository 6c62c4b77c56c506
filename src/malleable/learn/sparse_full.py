"""Full fine-tuning that keeps a pruned model pruned: the recovery training after `malleable slim`."""

from __future__ import annotations

import torch

from malleable.learn.full import Full
from malleable.learn.registry import learn_method


@learn_method("sparse_full")
class SparseFull(Full):
    """Full fine-tuning in which every weight that is exactly zero when training starts stays exactly zero: the
    recovery fine-tune of a magnitude / Wanda / SparseGPT model keeps its sparsity and its N:M pattern.

    The same two guards as forget's masks: a gradient hook zeroes the gradient of those entries, and after every
    optimiser step they are multiplied by the mask again (AdamW's weight decay and moments would move them).
    Exact zeros of a model that was never pruned are kept too: few in a trained float model, but one
    de-quantised from 4 bits holds some (0.24% of SmolLM2-135M-Instruct's weights, imported from its Q4_1 GGUF)."""

    shardable = False  # the masks are taken from whole parameter tensors

    def prepare(self, model: torch.nn.Module, task: str) -> torch.nn.Module:
        model = super().prepare(model, task)
        self.kept: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
        for p in model.parameters():
            keep = p.detach() != 0
            if not keep.all():
                keep = keep.to(p.dtype)
                p.register_hook(lambda g, keep=keep: g * keep)
                self.kept.append((p, keep))
        return model

    def optimizer(self, params: list[torch.nn.Parameter], training) -> torch.optim.Optimizer:
        optimizer = super().optimizer(params, training)

        def rezero(*_):
            with torch.no_grad():
                for p, keep in self.kept:
                    p.mul_(keep)

        optimizer.register_step_post_hook(rezero)
        return optimizer

    def metrics(self) -> dict:
        return {"zeros": sum(int((p == 0).sum()) for p, _ in self.kept)}
