"""Declared method parameters, shared by every verb's registry (merge rules, learn methods, ...).

A method declares each parameter once with its default, range and one-line doc; recipes are checked against
the declarations before any work starts, so a typo or an out-of-range value is an error naming the key.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from malleable.errors import RecipeError


INT_MAX = 2**31 - 1  # the largest count or index torch takes without overflowing, and far beyond any sane value


@dataclass(frozen=True)
class Param:
    default: Any
    doc: str
    ge: float | None = None
    le: float | None = None
    gt: float | None = None
    choices: tuple[Any, ...] | None = None
    per_input: bool = False
    many: bool = False  # a name parameter that may also be a list of names
    required: bool = False  # no default: a recipe must set it (mergekit's slerp `t`)

    def check(self, key: str, value: Any) -> Any:
        """Return `value` coerced to this parameter's type, or raise a RecipeError naming `key`. Numbers must be
        finite (NaN passes every range check) and an int parameter's value whole (3.5 is not a rank)."""
        if self.choices is not None:
            if value not in self.choices:
                raise RecipeError(f"{key}: {value!r} is not one of {list(self.choices)}")
            return value
        if isinstance(self.default, bool):
            if not isinstance(value, bool):
                raise RecipeError(f"{key}: expected true or false, got {value!r}")
            return value
        if isinstance(self.default, str):
            names = value if self.many and isinstance(value, list) and value else [value]
            if not all(isinstance(n, str) and n for n in names):
                raise RecipeError(f"{key}: expected a name{' or a list of names' if self.many else ''}, "
                                  f"got {value!r}")
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RecipeError(f"{key}: expected a number, got {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise RecipeError(f"{key}: {value} is not a finite number")
        if abs(value) > INT_MAX and (isinstance(value, int) or isinstance(self.default, int)):
            raise RecipeError(f"{key}: {value} is beyond the largest value allowed ({INT_MAX})")
        if isinstance(self.default, int) and value != int(value):
            raise RecipeError(f"{key}: {value} is not a whole number")
        if self.ge is not None and value < self.ge:
            raise RecipeError(f"{key}: {value} is below the minimum {self.ge}")
        if self.gt is not None and value <= self.gt:
            raise RecipeError(f"{key}: {value} must be greater than {self.gt}")
        if self.le is not None and value > self.le:
            raise RecipeError(f"{key}: {value} is above the maximum {self.le}")
        return type(self.default)(value) if self.default is not None else value


def check_params(declared: dict[str, Param], given: dict[str, Any], prefix: str = "parameters") -> dict[str, Any]:
    """Every declared parameter, with `given` values checked and defaults filled in; unknown keys are errors."""
    unknown = sorted(set(given) - set(declared))
    if unknown:
        raise RecipeError(f"{prefix}.{unknown[0]}: unknown parameter (known: {', '.join(sorted(declared)) or 'none'})")
    missing = sorted(k for k, p in declared.items() if p.required and k not in given)
    if missing:
        raise RecipeError(f"{prefix}.{missing[0]}: required, and not given")
    return {k: (p.check(f"{prefix}.{k}", given[k]) if k in given else p.default) for k, p in declared.items()}


class Registry(dict):
    """One verb's registered classes by name (learn methods, unlearning objectives, routers, ...): the decorator
    that registers a class with its declared parameters, and the lookup that builds one from a recipe's values.

    `kind` names an entry in messages ("learn method"), `package` is imported before a lookup (importing it
    registers every entry), `key` is the recipe key an unknown name is reported under. A registered class gets
    `name`, `params` (its parent's declarations updated by the given ones) and any further class attributes."""

    def __init__(self, kind: str, package: str, key: str = "method"):
        super().__init__()
        self.kind, self.package, self.key = kind, package, key

    def register(self, name: str, params: dict[str, Param] | None = None, **attributes: Any):
        def add(cls):
            if name in self:
                raise ValueError(f"{self.kind} '{name}' registered twice")
            cls.name = name
            cls.params = {**getattr(cls, "params", {}), **(params or {})}
            for attribute, value in attributes.items():
                setattr(cls, attribute, value)
            self[name] = cls
            return cls

        return add

    def lookup(self, name: str, key: str | None = None):
        """The class registered as `name`; an unknown name is one line naming the recipe key."""
        import importlib

        importlib.import_module(self.package)
        if name not in self:
            raise RecipeError(f"{key or self.key}: unknown {self.kind} '{name}' (known: {', '.join(sorted(self))})")
        return self[name]

    def build(self, name: str, given: dict[str, Any] | None, key: str | None = None,
              prefix: str = "parameters"):
        """An instance of `name` with its parameters checked against the declarations (defaults filled in)."""
        cls = self.lookup(name, key)
        return cls(**check_params(cls.params, given or {}, prefix=prefix))
