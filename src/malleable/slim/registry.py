"""The slim-method registry: a method says how to make a model cheaper; the engine (slim/engine.py) does the rest.

Two kinds of method share it:

    @slim_method("wanda", params=PRUNE_PARAMS)
    class Wanda(WeightPruner):
        stats = "norms"                     # what the engine collects per linear: None, "norms" or "hessian"
        def prune(self, weight, stats, pattern):   # (out, in) float32 -> the new weight, zeros included
            ...

    @slim_method("shortgpt", params={...})
    class ShortGPT(LayerRemover):
        def influence(self, h_in, h_out):   # one decoder layer's input and output states -> a score
            ...

A `WeightPruner` sees one linear layer's weight and the statistics of its inputs on the calibration data; the
engine runs the decoder layers one after another on the calibration samples, each layer calibrated on the
outputs of the already pruned layers before it (the Wanda and SparseGPT reference code's order). A
`LayerRemover` scores every decoder layer; the engine removes the `count` lowest and writes the smaller model.
A `ModuleSkipper` (SkipGPT) trains token routers on the calibration windows; the engine writes them beside the
weights.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from malleable.errors import RecipeError
from malleable.params import Param, Registry

STATS = (None, "norms", "hessian")


@dataclass(frozen=True)
class Pattern:
    """Which weights a pruner zeroes: a share `sparsity` of each layer (unstructured), or, when `m` > 0, exactly
    `n` of every `m` consecutive weights along a row's input dimension (N:M, as the Wanda code's prune_n:prune_m:
    "2:4" zeroes 2 of every 4)."""

    sparsity: float
    n: int = 0
    m: int = 0

    @property
    def structured(self) -> bool:
        return self.m > 0

    @property
    def name(self) -> str:
        return f"{self.n}:{self.m}" if self.structured else "unstructured"


PRUNE_PARAMS = {
    "sparsity": Param(None, "share of each pruned layer's weights set to zero, in [0, 1) (default 0.5; N/M for "
                      "an N:M pattern)", ge=0),
    "pattern": Param("unstructured", "unstructured, or N:M: N zeros in every M consecutive input weights (2:4, "
                     "4:8)"),
}


def pattern(p: dict[str, Any], key: str = "parameters") -> Pattern:
    """The checked pattern of a pruner's parameters: sparsity in [0, 1); N:M with 0 < N < M; a sparsity given
    beside N:M must be N/M."""
    text, sparsity = p["pattern"], p["sparsity"]
    if sparsity is not None and not 0 <= sparsity < 1:
        raise RecipeError(f"{key}.sparsity: {sparsity} is outside [0, 1)")
    if text == "unstructured":
        return Pattern(0.5 if sparsity is None else float(sparsity))
    found = re.fullmatch(r"(\d+):(\d+)", str(text))
    if not found or not 0 < int(found[1]) < int(found[2]):
        raise RecipeError(f"{key}.pattern: {text!r} is neither 'unstructured' nor N:M with 0 < N < M (2:4, 4:8)")
    n, m = int(found[1]), int(found[2])
    if sparsity is not None and abs(sparsity - n / m) > 1e-12:
        raise RecipeError(f"{key}.sparsity: {sparsity} contradicts pattern {text} (which zeroes {n / m:g}); leave "
                          "sparsity out")
    return Pattern(n / m, n, m)


class SlimMethod:
    """Base of every slim method."""

    name: ClassVar[str] = ""
    kind: ClassVar[str] = ""
    params: ClassVar[dict[str, Param]] = {}

    def __init__(self, **p: Any) -> None:
        self.p = p
        self.check()

    def check(self) -> None:
        """Refuse parameters that are wrong together (a RecipeError naming the key)."""


class WeightPruner(SlimMethod):
    """Sets weights of the decoder layers' linear modules to zero (and may update the others)."""

    kind: ClassVar[str] = "weights"
    stats: ClassVar[str | None] = None

    def check(self) -> None:
        self.pattern = pattern(self.p)

    def prune(self, weight: torch.Tensor, stats: torch.Tensor | None, pattern: Pattern) -> torch.Tensor:
        """The pruned weight (a new float32 tensor of the same shape) from the original one and, for a method
        with `stats`, its inputs' statistics on the calibration data: "norms", the per-input-feature sum of
        squares divided by the number of samples (Wanda's scaler_row); "hessian", 2 X X^T / samples
        (SparseGPT's H)."""
        raise NotImplementedError


class LayerRemover(SlimMethod):
    """Removes whole decoder layers: the output has fewer layers."""

    kind: ClassVar[str] = "depth"

    def influence(self, h_in: torch.Tensor, h_out: torch.Tensor) -> torch.Tensor:
        """Per-token contributions (a 1-D tensor) to a layer's score, from its input and output states
        (tokens, hidden); the engine averages them over every calibration token. Low: removable."""
        raise NotImplementedError

    def count(self, n_layers: int) -> int:
        """How many of the model's `n_layers` decoder layers to remove."""
        raise NotImplementedError


class ModuleSkipper(SlimMethod):
    """Learns, token by token, which modules to skip (routers trained on the calibration text); the weights are
    written unchanged (or with a recovery LoRA merged) and the routers beside them."""

    kind: ClassVar[str] = "dynamic"

    def plan(self, model) -> dict:
        """The plan's entries from the model's skeleton (meta tensors); `summary` is the dry-run text."""
        raise NotImplementedError

    def train(self, model, windows: torch.Tensor, calibration, seed: int, progress: bool) -> dict:
        """Train on the calibration windows, leave `model` routed; return the report's `routing` section."""
        raise NotImplementedError

    def write(self, model, folder) -> None:
        """Write what the checkpoint needs beside its weights (the routers)."""
        raise NotImplementedError

    def finish(self, model) -> dict:
        """The method's own numbers after the evaluation ran."""
        return {}


METHODS = Registry("slim method", "malleable.slim")


def slim_method(name: str, *, params: dict[str, Param] | None = None
                ) -> Callable[[type[SlimMethod]], type[SlimMethod]]:
    """Register a WeightPruner or LayerRemover subclass as `name`; its docstring is the method's documentation."""
    add = METHODS.register(name, params)

    def register(cls: type[SlimMethod]) -> type[SlimMethod]:
        if getattr(cls, "stats", None) not in STATS:
            raise ValueError(f"slim method '{name}': stats {cls.stats!r} not one of {STATS}")
        return add(cls)

    return register


def get_method(name: str, given: dict[str, Any], key: str = "parameters") -> SlimMethod:
    """The registered method `name` built with checked parameters (defaults filled in)."""
    return METHODS.build(name, given, prefix=key)


def lowest(metric: torch.Tensor, k: int, dim: int = -1) -> torch.Tensor:
    """Boolean mask of the `k` smallest entries along `dim` (a stable sort: among equals the earlier index)."""
    mask = torch.zeros_like(metric, dtype=torch.bool)
    if k:
        mask.scatter_(dim, torch.sort(metric, dim=dim, stable=True)[1].narrow(dim, 0, k), True)
    return mask


def nm_mask(metric: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Exactly the `n` smallest of every `m` consecutive entries of each row (the reference code's topk per group
    of columns); the row length must be a multiple of `m` (checked by the engine before any work)."""
    rows, cols = metric.shape
    groups = metric.reshape(rows, cols // m, m)
    mask = torch.zeros_like(groups, dtype=torch.bool)
    mask.scatter_(2, torch.topk(groups, n, dim=2, largest=False)[1], True)
    return mask.reshape(rows, cols)
