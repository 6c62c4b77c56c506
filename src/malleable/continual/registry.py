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
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from malleable.errors import RecipeError
from malleable.learn.registry import Method
from malleable.params import Param, check_params


class ContinualMethod(Method):
    """Base of every continual method: cross-entropy on the incoming batch (plus the replayed one)."""

    replay: ClassVar[bool] = False  # True: the engine keeps a reservoir buffer and hands a replayed batch
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


METHODS: dict[str, type[ContinualMethod]] = {}


def continual_method(name: str, *, params: dict[str, Param] | None = None
                     ) -> Callable[[type[ContinualMethod]], type[ContinualMethod]]:
    """Register a `ContinualMethod` subclass as `name`; its docstring is the method's documentation."""

    def register(cls: type[ContinualMethod]) -> type[ContinualMethod]:
        if name in METHODS:
            raise ValueError(f"continual method '{name}' registered twice")
        cls.name = name
        cls.params = {**getattr(cls, "params", {}), **(params or {})}
        METHODS[name] = cls
        return cls

    return register


def get_method(name: str, given: dict[str, Any]) -> ContinualMethod:
    """The registered method `name` built with checked parameters (defaults filled in)."""
    from malleable import continual  # noqa: F401  (importing the package registers every method)

    if name not in METHODS:
        raise RecipeError(f"method: unknown continual method '{name}' (known: {', '.join(sorted(METHODS))})")
    cls = METHODS[name]
    return cls(**check_params(cls.params, given))
