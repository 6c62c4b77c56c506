"""The learn-method registry: a method is what to train, the loss and optionally the optimiser; nothing else.

The engine (learn/engine.py) owns the loop: data order, micro-batches, processes, mixed precision, gradient
clipping, schedules, checkpoints, logs and the report. A method subclasses `Method`, overrides only what it
changes, and registers itself by name:

    @learn_method("memft", params={"threshold": Param(0.5, "...", gt=0, le=1)})
    class MemFT(LoRA):
        def loss(self, model, batch):
            ...

Hooks, in the order the engine calls them:

* ``prepare(model, task) -> model``: choose or add the trainable parameters (LoRA wraps the model with PEFT);
  ``task`` is the recipe's (causal_lm or classification).
* ``optimizer(params, training) -> Optimizer``: AdamW by default. A method with ``closure = True`` gets
  ``optimizer.step(closure)``, where each ``closure()`` evaluates the step's loss over every process (and,
  unless ``backward = False``, leaves its gradient in ``.grad``), and returns the step's loss: how zeroth-order
  probes two points and LoRA-SAM takes two gradients per step.
* ``loss(model, batch) -> Tensor``: the SUM of the per-unit losses of a micro-batch (units are target tokens
  for language modelling, examples for classification). The engine divides by the number of units in the
  whole optimiser step, so gradient accumulation and several processes give the gradient of one big batch.
* ``evaluating(model)``: a context for validation passes (default: nothing changes).
* ``metrics() -> dict``: the method's own numbers about its latest step (Bi-LoRA: the auxiliary norm and
  whether rho clipped it), written with every logged step and into the report's ``final``.
* ``save(model, directory, tokenizer, state_dict)``: write the result (a PEFT adapter, or a full checkpoint);
  under FSDP the engine gathers ``state_dict`` (whole tensors) for it, as the model holds only shards.

A method whose optimiser or probes work on whole tensors sets ``shardable = False``: the engine refuses it
under ``training.sharding: fsdp``, where each process holds only a shard of every parameter.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, ClassVar

import torch

from malleable.params import Param, Registry


class Method:
    """Full fine-tuning of every parameter with AdamW on the task's loss; the base of every method."""

    name: ClassVar[str] = ""
    params: ClassVar[dict[str, Param]] = {}
    backward: ClassVar[bool] = True  # False: no gradients (and no DDP), only loss evaluations
    closure: ClassVar[bool] = False  # True: the optimiser drives the step's passes through step(closure)
    output: ClassVar[str] = "model"  # "model" (a full checkpoint) or "adapter" (a PEFT adapter)
    shardable: ClassVar[bool] = True  # False: needs whole parameter tensors, refused under FSDP

    def __init__(self, **params: Any):
        self.p = params

    def prepare(self, model: torch.nn.Module, task: str) -> torch.nn.Module:
        model.requires_grad_(True)
        return model

    def evaluating(self, model: torch.nn.Module):
        """Context for evaluation passes (Bi-LoRA switches its adversarial module off)."""
        return contextlib.nullcontext()

    def metrics(self) -> dict[str, Any]:
        """Numbers about the latest step that only the method knows (none by default)."""
        return {}

    def optimizer(self, params: list[torch.nn.Parameter], training) -> torch.optim.Optimizer:
        """AdamW; weight decay only on matrices (not on biases and norm scales), as is usual."""
        decay = [p for p in params if p.ndim >= 2]
        rest = [p for p in params if p.ndim < 2]
        groups = [{"params": decay, "weight_decay": training.weight_decay}]
        if rest:
            groups.append({"params": rest, "weight_decay": 0.0})
        return torch.optim.AdamW(groups, lr=training.lr)

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        from malleable.learn.loss import task_loss

        return task_loss(model, batch).sum()

    def save(self, model: torch.nn.Module, directory, tokenizer=None, state_dict=None) -> None:
        model.save_pretrained(directory, safe_serialization=True, state_dict=state_dict)
        if tokenizer is not None:
            tokenizer.save_pretrained(directory)


METHODS = Registry("learn method", "malleable.learn")


def learn_method(name: str, *, params: dict[str, Param] | None = None) -> Callable[[type[Method]], type[Method]]:
    """Register a `Method` subclass as `name` (a subclass inherits its parent's parameters); its docstring is the
    method's documentation."""
    return METHODS.register(name, params)


def get_method(name: str, given: dict[str, Any]) -> Method:
    """The registered method `name` built with checked parameters (defaults filled in)."""
    return METHODS.build(name, given, prefix="parameters")
