"""The unlearning registries: an objective is a loss over (forget, retain) batches; a mask says which weights move.

An objective subclasses `Objective` (itself a learn `Method`, so the training loop, optimisers and saving are
learn's), overrides `loss` and whatever else it changes, and registers itself by name:

    @objective("npo", params={"beta": Param(0.1, "..."), ...}, needs_reference=True)
    class NPO(Objective):
        def loss(self, model, batch):
            ...

`batch` is ``{"forget": part, "retain": part or None}``. A part is what the collate function built: for a
language model ``input_ids / attention_mask / labels`` (labels 2-D, -100 where no loss), for a classifier
``x / labels`` (model(x) gives logits) or ``input_ids / attention_mask / labels`` (labels 1-D, a transformers
sequence classifier). Unlike a learn method, an objective's loss is a MEAN over the batch: forget and retain
terms are averaged separately and then weighted, as the papers write them.

Hooks, in the order they are called: ``examples(forget, tokenizer, ...)`` (by the caller that tokenised the data,
before `unlearn`: DPO's preferred answers), ``prepare(model, task)`` (which parameters train; default all),
``setup(model, forget, retain, collate)`` (once, before training: a frozen reference, random labels, ...),
``optimizer(params, training)``, ``loss(model, batch)`` each step (``self.progress`` in [0, 1) tells how far
the run is), ``finish(model, original)`` once after training (task negation rewrites the weights here).

A mask (`@mask("salun")`) is a function ``(model, batches, **params) -> {parameter name: bool tensor}``, True
where the weight may change; ``batches("forget")`` / ``batches("retain")`` walk a set once in collated parts.
The engine keeps every other weight at its original value, bit for bit. ``self.reference(fn, *args)`` runs
``fn(frozen original, *args)`` without gradients for objectives that declare `needs_reference`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch

from malleable.errors import RecipeError
from malleable.learn.registry import Method
from malleable.params import Param, Registry, check_params


class Objective(Method):
    """Base of every unlearning objective."""

    kinds: ClassVar[frozenset[str]] = frozenset({"classifier", "causal_lm"})
    needs_retain: ClassVar[bool] = False
    needs_reference: ClassVar[bool] = False  # a frozen copy of the original model (self.reference)
    epochs_over: ClassVar[str] = "forget"  # which set one epoch walks through
    progress: float = 0.0

    def examples(self, forget: list, tokenizer, *, seed: int, records: list[dict] | None = None,
                 chat_template: str = "auto") -> list:
        """The forget examples as this objective trains on them, built by the caller that has the tokenizer
        (forget/run.py, the protocols) before `unlearn`; default: unchanged. DPO attaches each example's preferred
        answer here. `records`: the forget rows as prompt/completion dicts (with any other field of the row)."""
        return forget

    def setup(self, model: torch.nn.Module, forget: list, retain: list | None, collate: Callable) -> None:
        """Once, before the first step, on the original model."""

    def finish(self, model: torch.nn.Module, original: dict[str, torch.Tensor]) -> None:
        """Once, after the last step; `original` is the trainable parameters' values before training."""

    def loss(self, model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        raise NotImplementedError


OBJECTIVES = Registry("unlearning objective", "malleable.forget", key="objective")
MASKS: dict[str, tuple[Callable, dict[str, Param], str]] = {}


def objective(name: str, *, params: dict[str, Param] | None = None, kinds: tuple[str, ...] | None = None,
              needs_retain: bool | None = None, needs_reference: bool | None = None,
              epochs_over: str | None = None) -> Callable[[type[Objective]], type[Objective]]:
    """Register an `Objective` subclass as `name`; its docstring is the objective's documentation. The flags
    left at None keep the class's (or its parent's) value."""
    flags = {"needs_retain": needs_retain, "needs_reference": needs_reference, "epochs_over": epochs_over,
             "kinds": None if kinds is None else frozenset(kinds)}
    return OBJECTIVES.register(name, params, **{k: v for k, v in flags.items() if v is not None})


def mask(name: str, *, params: dict[str, Param] | None = None):
    """Register a weight-saliency mask function as `name`; its docstring is the mask's documentation."""

    def register(fn: Callable) -> Callable:
        if name in MASKS:
            raise ValueError(f"mask '{name}' registered twice")
        MASKS[name] = (fn, params or {}, (fn.__doc__ or "").strip())
        return fn

    return register


def get_objective(name: str, given: dict[str, Any]) -> Objective:
    """The registered objective `name` built with checked parameters (defaults filled in)."""
    return OBJECTIVES.build(name, given)


def get_mask(spec: dict[str, Any]) -> tuple[Callable, dict[str, Any]]:
    """The mask function and its checked parameters, from a recipe's ``mask: {name: salun, ratio: 0.5}``."""
    from malleable import forget  # noqa: F401

    spec = dict(spec)
    name = spec.pop("name", None)
    if not isinstance(name, str) or name not in MASKS:
        raise RecipeError(f"mask.name: unknown mask '{name}' (known: {', '.join(sorted(MASKS))})")
    fn, declared, _ = MASKS[name]
    return fn, check_params(declared, spec, prefix="mask")
