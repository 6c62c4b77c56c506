"""The route recipe: which routers to fit on a matrices folder and how to split it, validated before any work.

```yaml
routers:                          # each fitted on train, its trade-off chosen on validation, scored on test
  - oracle                        # a name alone: the router's default parameters
  - {name: knn, parameters: {k: 10}}
  - mlp
split: {train: 0.6, validation: 0.2, test: 0.2}   # used when the matrices carry no split column
seed: 0                           # the random split and every learned router's initialisation
beta: 0.1                         # the rank score's weight of cost against accuracy
```
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Union

from pydantic import Field, field_validator, model_validator

from malleable.recipes.common import Seed, Strict, load_recipe_file, validate

DEFAULT_ROUTERS = ("oracle", "strongest", "cheapest", "strongest_per_task", "random", "knn", "linear", "mlp", "mf",
                   "soft_label")


class RouterSpec(Strict):
    name: str = Field(min_length=1)
    parameters: dict[str, Any] = Field(default_factory=dict)


class Split(Strict):
    train: float = Field(default=0.6, gt=0, lt=1)
    validation: float = Field(default=0.2, gt=0, lt=1)
    test: float = Field(default=0.2, gt=0, lt=1)

    @model_validator(mode="after")
    def _sum(self):
        if abs(self.train + self.validation + self.test - 1) > 1e-6:
            raise ValueError("train + validation + test must be 1")
        return self


class RouteRecipe(Strict):
    routers: list[Union[str, RouterSpec]] = Field(default_factory=lambda: [RouterSpec(name=n) for n in DEFAULT_ROUTERS],
                                                  min_length=1)
    split: Split = Field(default_factory=Split)
    seed: Seed = 0
    beta: float = Field(default=0.1, gt=0)

    @field_validator("routers")
    @classmethod
    def _specs(cls, value):
        specs = [RouterSpec(name=v) if isinstance(v, str) else v for v in value]
        names = [s.name for s in specs]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"router '{twice[0]}' listed twice")
        return specs


def parse_route_recipe(data: Any, source: str = "recipe") -> RouteRecipe:
    """Validate a recipe dict; the first problem becomes one line naming the key."""
    return validate(RouteRecipe, data, source)


def load_route_recipe(path: str | Path, check: Callable[[RouteRecipe], Any] | None = None) -> RouteRecipe:
    """The recipe file, validated; `check` is the verb's check against its registry (route.engine.check_recipe)."""
    return load_recipe_file(path, parse_route_recipe, check)
