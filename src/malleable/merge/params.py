"""Per-tensor parameter values: scalars, per-layer gradients and name-filter lists (mergekit's forms)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from malleable.errors import RecipeError
from malleable.merge.registry import Param
from malleable.recipes.merge import MergeRecipe
from malleable.recipes.param_spec import Filtered

_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")
_FROM_NAME = object()  # a tensor's layer, for parameter gradients: read from its name unless given


def layer_index(name: str) -> int | None:
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def rename_layer(name: str, index: int) -> str:
    """`name` with its layer index replaced by `index` (model.layers.3.mlp -> model.layers.{index}.mlp)."""
    m = _LAYER.search(name)
    return name[:m.start(1)] + str(index) + name[m.end(1):]


def _gradient(values: list[float], layer: int | None, num_layers: int) -> float:
    """Interpolate `values` piecewise-linearly over evenly spaced layers (mergekit's gradient). Tensors
    outside a layer (embeddings, final norm, lm_head) take the first value, and a one-layer model's layer the
    last, as in mergekit (plan.py: t = idx / (num_layers - 1), or 1 for a single layer)."""
    if len(values) == 1 or layer is None:
        return values[0]
    t = layer / (num_layers - 1) if num_layers > 1 else 1.0
    return float(np.interp(t, np.linspace(0.0, 1.0, len(values)), values))


def _value(spec: Any, name: str, layer: int | None, num_layers: int) -> Any:
    if isinstance(spec, list) and spec and isinstance(spec[0], Filtered):
        for entry in spec:
            if entry.filter in (None, "*") or entry.filter in name:
                return _value(entry.value, name, layer, num_layers)
        return None  # no entry applies: the parameter's default
    if isinstance(spec, list):
        return _gradient([float(v) for v in spec], layer, num_layers)
    return spec


@dataclass
class ParamResolver:
    """Resolves every parameter of a rule for one tensor name, checked against its `Param` ranges."""

    recipe: MergeRecipe
    params: dict[str, Param]
    num_layers: int

    def __post_init__(self) -> None:
        for key in self.recipe.parameters:
            if key not in self.params:
                known = ", ".join(sorted(self.params)) or "none"
                raise RecipeError(f"parameters.{key}: unknown parameter for method '{self.recipe.method}' "
                                  f"(known: {known})")
        for i, inp in enumerate(self.recipe.inputs):
            for key in inp.parameters:
                if key not in self.params or not self.params[key].per_input:
                    raise RecipeError(f"inputs.{i}.parameters.{key}: not a per-input parameter of "
                                      f"'{self.recipe.method}'")

    def weights(self, name: str, layer: int | None | object = _FROM_NAME) -> list[float]:
        layer = layer_index(name) if layer is _FROM_NAME else layer
        out = []
        for i, inp in enumerate(self.recipe.inputs):
            w = _value(inp.weight, name, layer, self.num_layers)
            w = 1.0 if w is None else w
            if isinstance(w, bool) or not isinstance(w, (int, float)):
                raise RecipeError(f"inputs.{i}.weight: expected a number, got {w!r}")
            out.append(float(w))
        return out

    def values(self, name: str, layer: int | None | object = _FROM_NAME) -> dict[str, Any]:
        """Every parameter's value for tensor `name`; `layer` (the position a per-layer gradient is read at)
        defaults to the layer index in the name."""
        layer = layer_index(name) if layer is _FROM_NAME else layer
        out: dict[str, Any] = {}
        for key, p in self.params.items():
            glob = self._one(f"parameters.{key}", p, self.recipe.parameters.get(key), name, layer)
            if p.required and glob is None:
                raise RecipeError(f"parameters.{key}: method '{self.recipe.method}' needs it (no default), and "
                                  f"it is not set for tensor '{name}'")
            if p.per_input:  # an input's own value wins; where its filters match nothing, the shared one
                out[key] = [self._one(f"inputs.{i}.parameters.{key}", p, inp.parameters.get(key), name, layer,
                                      fallback=glob) for i, inp in enumerate(self.recipe.inputs)]
            else:
                out[key] = glob
        return out

    def _one(self, key: str, p: Param, spec: Any, name: str, layer: int | None, fallback: Any = None) -> Any:
        v = None if spec is None else _value(spec, name, layer, self.num_layers)
        if v is None:
            return p.default if fallback is None else fallback
        return p.check(key, v)
