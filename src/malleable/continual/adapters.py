"""Continual LoRA post-training: the base of every adapter strategy, and the adapter's factors as tensors.

A strategy (seq_lora, inc_lora, o_lora, replay_lora, l2_lora, ewc_lora, merge_each, joint_lora) is a
`ContinualMethod` whose stream is a list of language-model tasks (`stream = "tasks"`); continual/task_stream.py
runs it. The model is a PEFT LoRA model with ONE trainable adapter ("default", learn's `lora` parameters from the
recipe's `lora:` section); what strategies differ in is what happens around each task's training:

* ``examples(current, seen) -> (items, passes)``: what a task trains on (its own items; replay adds some of
  the earlier tasks'; joint all of them) and how many times `training.steps` (passes > 1: joint's longer run);
* ``begin_task(model, t)`` before and ``end_task(model, t, items, collate)`` after the task's training;
* ``penalty(model)``: a regulariser added once per optimiser step (l2, EWC, O-LoRA's orthogonality), on top of
  learn's task loss; ``loss`` folds it in so that the engine's division by the step's units leaves it whole;
* ``evaluating(model)``: the weights the stream holds between tasks (merge_each swaps in the merged adapter);
* ``adapter(model) -> {module: LowRankDelta}``: the adapter the stream holds, written as a PEFT adapter after
  every task; ``state()`` / ``load_state(tensors, model)``: everything needed to resume after a task.

Earlier tasks' adapters that a strategy keeps frozen (inc_lora, o_lora) are added into the base layers' weights
(`fold`): the forward pass is then the sum of all adapters, as PEFT computes with several active adapters, at
one adapter's cost. The written adapter is their concatenation (rank r x tasks), which PEFT loads as one.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

import torch

from malleable.continual.registry import ContinualMethod
from malleable.deltas.lowrank import LowRankDelta
from malleable.learn.loss import count_units, task_loss

ADAPTER = "default"
PEFT_PREFIX = "base_model.model."


def lora_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """{module name as a PEFT adapter file names it: lora layer} of `model`'s trainable adapter."""
    from peft.tuners.lora import LoraLayer

    return {name.removeprefix(PEFT_PREFIX): m for name, m in model.named_modules()
            if isinstance(m, LoraLayer) and ADAPTER in m.lora_A}


def current(model: torch.nn.Module) -> dict[str, LowRankDelta]:
    """The trainable adapter's factors (copies) with PEFT's scale."""
    return {name: LowRankDelta(m.lora_B[ADAPTER].weight.detach().clone(), m.lora_A[ADAPTER].weight.detach().clone(),
                               m.scaling[ADAPTER]) for name, m in lora_layers(model).items()}


def adapter_params(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """{name: parameter} of the trainable adapter, names as in the PEFT adapter file."""
    out = {}
    for name, m in lora_layers(model).items():
        out[f"{name}.lora_A.weight"] = m.lora_A[ADAPTER].weight
        out[f"{name}.lora_B.weight"] = m.lora_B[ADAPTER].weight
    return out


@torch.no_grad()
def reinit(model: torch.nn.Module, seed: int) -> None:
    """A fresh adapter: PEFT's own initialisation (A Kaiming-uniform, B zero) from `seed`."""
    torch.manual_seed(seed)
    for m in lora_layers(model).values():
        m.reset_lora_parameters(ADAPTER, True)


@torch.no_grad()
def fold(model: torch.nn.Module, deltas: dict[str, LowRankDelta], sign: float = 1.0) -> None:
    """Add (sign -1: remove) `deltas` into the base layers' weights, in float32."""
    layers = lora_layers(model)
    for name, d in deltas.items():
        w = layers[name].get_base_layer().weight
        w.add_((sign * d.dense()).to(w.dtype))


@torch.no_grad()
def set_adapter(model: torch.nn.Module, deltas: dict[str, LowRankDelta]) -> None:
    """Put `deltas` (each of at most the adapter's rank; zeros fill the rest) into the trainable adapter, PEFT's
    scale divided out."""
    for name, m in lora_layers(model).items():
        B, A = deltas[name].balanced()
        slot_A, slot_B = m.lora_A[ADAPTER].weight, m.lora_B[ADAPTER].weight
        slot_A.zero_()
        slot_B.zero_()
        slot_A[:A.shape[0]].copy_(A)
        slot_B[:, :B.shape[1]].copy_(B / m.scaling[ADAPTER])


def concatenated(parts: Sequence[dict[str, LowRankDelta]]) -> dict[str, LowRankDelta]:
    """The sum of several adapters as one adapter of their summed rank (factors stacked, scales folded in)."""
    out = {}
    for name in parts[0]:
        pairs = [p[name].balanced() for p in parts]
        out[name] = LowRankDelta(torch.cat([B for B, _ in pairs], 1), torch.cat([A for _, A in pairs], 0))
    return out


def factors_state(prefix: str, deltas: dict[str, LowRankDelta]) -> dict[str, torch.Tensor]:
    """`deltas` as flat tensors for a checkpoint: the factors as they are and the scale."""
    out = {}
    for name, d in deltas.items():
        out[f"{prefix}.{name}.B"], out[f"{prefix}.{name}.A"] = d.B.clone(), d.A.clone()  # own storage: safetensors
        out[f"{prefix}.{name}.s"] = torch.tensor(float(d.scale), dtype=torch.float64)
    return out


def factors_from(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, LowRankDelta]:
    """What `factors_state` wrote under `prefix`."""
    names = sorted({k[len(prefix) + 1:-2] for k in tensors if k.startswith(prefix + ".")})
    return {n: LowRankDelta(tensors[f"{prefix}.{n}.B"], tensors[f"{prefix}.{n}.A"], float(tensors[f"{prefix}.{n}.s"]))
            for n in names}


class AdapterStrategy(ContinualMethod):
    """Sequential LoRA: one adapter trained on, task after task (the base of every adapter strategy)."""

    stream: ClassVar[str] = "tasks"
    # set by the engine before the first task: the stream's seed, its run folder (for files a strategy writes
    # between tasks, such as merge_each's adapters) and the base model's folder
    seed: int = 0
    workdir: Path | None = None
    base: Path | None = None

    def begin_task(self, model: torch.nn.Module, t: int) -> None:
        """Before task t's training (0-based)."""

    def end_task(self, model: torch.nn.Module, t: int, items: list, collate) -> None:
        """After task t's training; `items` are its own training examples, `collate` makes a batch of them."""

    def penalty(self, model: torch.nn.Module) -> torch.Tensor | None:
        """A regulariser added once per optimiser step (None: none)."""
        return None

    def loss(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        """learn's task loss (a sum over target tokens) plus the penalty times the micro-batch's tokens: the engine
        divides by the step's tokens, so the penalty enters each step's mean loss exactly once."""
        total = task_loss(model, batch).sum()
        extra = self.penalty(model)
        return total if extra is None else total + extra * count_units(batch)

    def adapter(self, model: torch.nn.Module) -> dict[str, LowRankDelta]:
        """The adapter the stream holds after a task."""
        return current(model)

    def state(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state(self, tensors: dict[str, torch.Tensor], model: torch.nn.Module | None = None) -> None:
        """Restore what `state` returned (the trainable adapter itself is restored by the engine)."""
