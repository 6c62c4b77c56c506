"""The steering-method registry: a method turns the activations of contrast pairs into one direction per layer.

    @steering_method("caa", params={...}, read=-2)
    class CAA(SteeringMethod):
        def direction(self, pos, neg):      # (pairs, hidden) each, one layer -> (hidden,)
            return (pos - neg).mean(axis=0)

The engine (steer/engine.py) reads the residual stream (each decoder layer's output) at the method's read
position for every pair, calls `direction` once per layer, and writes the artefact; the method sees arrays
only. `read` is where a method reads by default: "last" (the last token of prompt + completion), "mean" (the
mean over the completion's tokens), a negative index counted from the end (-2: CAA's answer letter), or "all"
(every position of one pair: ActAdd, whose direction is then (positions, hidden)). `intervene` is where the
vector is added by default: "all" positions, or the "first" positions of the text (ActAdd). `unit_norm` says
that the direction has norm 1 (PCA, logistic): its default strength is then measured, not 1 (engine.py).

A fitted method (`fitted = True`) builds its artefact itself: the engine calls `fit` instead of `direction`.
SPLIT (steer/split.py) trains its intervention through learn's engine; ITI (steer/iti.py) fits a probe per
attention head. `every_layer` hands such a method every layer when the recipe says `layers: auto` (ITI picks its
heads across the whole model) instead of the one layer the probe chooses. A form that is not a vector (SPLIT's
LoRA or local weight edit, ITI's per-head offsets) brings its own artefact form and applier in steer/apply.py's
FORMS; the vector methods, split_vector too, share "vector".
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np

from malleable.params import Param, Registry

READS = ("last", "mean", "all")
INTERVENES = ("all", "first")


class SteeringMethod:
    """Base of every steering method."""

    name: ClassVar[str] = ""
    params: ClassVar[dict[str, Param]] = {}
    read: ClassVar[str | int] = "last"
    intervene: ClassVar[str] = "all"
    unit_norm: ClassVar[bool] = False
    pairs_used: ClassVar[int | None] = None  # None: every training pair; ActAdd reads one
    form: ClassVar[str] = "vector"  # the artefact form (steer/apply.py FORMS)
    fitted: ClassVar[bool] = False  # True: the engine calls `fit`, not `direction`
    every_layer: ClassVar[bool] = False  # True: `layers: auto` gives `fit` every layer
    fitting: ClassVar[str] = ""  # what `fit` does, for --dry-run ("{form}" is filled in)

    def __init__(self, **p: Any) -> None:
        self.p = p

    def pairs(self, rows: list[dict]) -> list[dict]:
        """The training pairs the method reads (all of them; ActAdd picks one)."""
        return rows

    def direction(self, pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
        """One layer's direction from the positives' and negatives' activations (float64 arrays)."""
        raise NotImplementedError

    def fit(self, model, tokenizer, rows: list[dict], layers: list[int], seed: int = 0, progress: bool = False,
            read: str | int = "last", batch_size: int = 16) -> tuple[dict[int, Any], Any]:
        """A fitted method's artefact from the training pairs `rows` on `layers` (it may steer fewer): (its tensors
        by layer, a log for report.json `training`). `model` is left as it was."""
        raise NotImplementedError

    def check_model(self, model, rows: list[dict], layers: list[int] | None) -> None:
        """Refuse, before any work, a model, training pairs or layers (None: chosen later by the probe) that the
        method cannot use (one line)."""

    def default_strength(self) -> float:
        """The artefact's default strength when the recipe gives none and the direction is not unit-norm."""
        return 1.0

    def artefact_config(self) -> dict[str, Any]:
        """Keys the method adds to steering.json (where its form is applied)."""
        return {}

    def summary(self, log: Any) -> list[str]:
        """report.md lines about the `fit` log."""
        return []


def pair_sign(direction: np.ndarray, pos: np.ndarray, neg: np.ndarray) -> float:
    """repeng's sign rule (repeng/extract.py, read_representations): +1 when more pairs project the positive
    above the negative on `direction` than below it, else -1 (a tie keeps the sign)."""
    a, b = pos @ direction, neg @ direction
    return -1.0 if np.mean(a < b) > np.mean(a > b) else 1.0


METHODS = Registry("steering method", "malleable.steer")


def steering_method(name: str, *, params: dict[str, Param] | None = None, read: str | int = "last",
                    intervene: str = "all", unit_norm: bool = False,
                    pairs_used: int | None = None) -> Callable[[type[SteeringMethod]], type[SteeringMethod]]:
    """Register a `SteeringMethod` subclass as `name`; its docstring is the method's documentation."""
    if not (read in READS or (isinstance(read, int) and read < 0)) or intervene not in INTERVENES:
        raise ValueError(f"steering method '{name}': read {read!r} / intervene {intervene!r} not known")

    return METHODS.register(name, params, read=read, intervene=intervene, unit_norm=unit_norm,
                            pairs_used=pairs_used)


def method_class(name: str, key: str = "method") -> type[SteeringMethod]:
    return METHODS.lookup(name, key)


def get_method(name: str, given: dict[str, Any], key: str = "parameters") -> SteeringMethod:
    """The registered method `name` built with checked parameters (defaults filled in)."""
    return METHODS.build(name, given, prefix=key)
