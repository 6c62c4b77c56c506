"""The continual-method registry: a method is its loss over (incoming batch, replayed batch); nothing else.

The engine (continual/engine.py) owns the stream: data order, the reservoir buffer, the optimiser step (learn's),
evaluation, checkpoints and the report. A method subclasses `ContinualMethod`, overrides what it changes and
registers itself by name:

    @continual_method("las", params={"tau": Param(1.0, "..."), ...})
    class LAS(ContinualMethod):
        replay = True
        def loss(self, model, batch):
            ...

`batch` is ``{"stream": part, "replay": part or None}``; a part is ``{"x": images, "labels": class indices}``.
`replay` is None for methods that do not replay and while the buffer is empty. The loss is a MEAN over the
batch, as the papers write it (learn's optimizer_step is called with one unit).

Hooks, in the order the engine calls them: ``setup(num_classes)`` once; ``examples(current, seen)`` per stream
step (which examples the step walks, and how many passes: online methods one pass over the step's own data);
``retrieve(model, incoming, buffer, size, lr)`` per optimiser step of a replay method (which
stored examples to replay: uniform draws by default, MIR picks them by interference); ``loss(model, batch)`` per
optimiser step; ``state()`` / ``load_state(tensors)`` for checkpoints (a method's
own running numbers: LAS's label counts), so a resumed stream ends identical.

At a forget step (continual/unlearning.py runs it) the engine first takes the forgotten examples out of the
buffer, then calls ``retain(buffer, remaining)`` (what the method still holds of the data it should keep: an
online method only its buffer, the offline `joint` everything learned and not forgotten) and
``forget(model, forget, retain, settings, seed)``. The default forget step is the recipe's `forget` objective
run by `malleable forget`'s engine (`forget.unlearn`) on the classifier, "verb by verb"; `ug_clu` brings its own.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from malleable.errors import RecipeError
from malleable.learn.registry import Method
from malleable.params import Param, Registry


class ContinualMethod(Method):
    """Base of every continual method: cross-entropy on the incoming batch (plus the replayed one)."""

    replay: ClassVar[bool] = False  # True: the engine keeps a reservoir buffer and hands a replayed batch
    stream: ClassVar[str] = "classes"  # "classes": an online classifier stream; "tasks": LoRA post-training
    num_classes: int = 0

    def setup(self, num_classes: int) -> None:
        self.num_classes = num_classes

    def examples(self, current: Sequence, seen: Sequence) -> tuple[Sequence, int]:
        """(the examples this step walks, passes over them): online, one pass over the step's own data."""
        return current, 1

    def retrieve(self, model: torch.nn.Module, incoming: dict[str, torch.Tensor], buffer, size: int,
                 lr: float) -> dict[str, torch.Tensor] | None:
        """The replayed part of this optimiser step, drawn from `buffer` (a continual.buffer.Reservoir) before the
        step: `size` stored examples uniformly at random (ER's retrieval); None while the buffer is empty."""
        return buffer.sample(size)

    def retain(self, buffer, remaining: Sequence) -> list | None:
        """The examples a forget step may keep training on: the buffer's (forgotten ones already out) for a
        replay method, nothing for a method without memory (online learning keeps only its buffer)."""
        return [(x, y) for x, y, _ in buffer.contents()] if self.replay else None

    def forget(self, model: torch.nn.Module, forget: Sequence, retain: Sequence | None, settings,
               seed: int) -> dict:
        """Unlearn `forget` from `model` in place: `settings` (the recipe's `forget`) names an objective of
        `malleable forget`, run by its engine on (image, label) pairs; returns what to report of the run."""
        from malleable.forget import unlearn
        from malleable.forget.data import collate_classification

        s = settings
        result = unlearn(model, forget=forget, retain=retain, collate=collate_classification, objective=s.objective,
                         parameters=s.parameters, mask=s.mask, steps=s.steps, batch_size=s.batch_size, lr=s.lr,
                         optimizer=s.optimizer, momentum=s.momentum, weight_decay=s.weight_decay,
                         max_grad_norm=s.max_grad_norm, seed=seed)
        if result.model is not model:
            raise RecipeError("forget: the objective returned a new model; a continual forget step trains in place")
        return {"objective": s.objective, "steps": result.steps, "mask_fraction": result.mask_fraction}

    def state(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore what `state` returned."""

    def loss(self, model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        x, y = joined(batch)
        return F.cross_entropy(model(x), y)


def joined(batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """The incoming and replayed examples as one batch (incoming first), as ER's reference code concatenates."""
    parts = [p for p in (batch["stream"], batch.get("replay")) if p is not None]
    return torch.cat([p["x"] for p in parts]), torch.cat([p["labels"] for p in parts])


METHODS = Registry("continual method", "malleable.continual")


def continual_method(name: str, *, params: dict[str, Param] | None = None
                     ) -> Callable[[type[ContinualMethod]], type[ContinualMethod]]:
    """Register a `ContinualMethod` subclass as `name`; its docstring is the method's documentation."""
    return METHODS.register(name, params)


def get_method(name: str, given: dict[str, Any]) -> ContinualMethod:
    """The registered method `name` built with checked parameters (defaults filled in)."""
    return METHODS.build(name, given)
