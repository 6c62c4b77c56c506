"""The continual recipe: a YAML file validated with pydantic before any work starts.

```yaml
model: small_cnn                 # the small vision CNN of models/vision.py, initialised from `seed`
width: 16                        # its width (forget's classifier benchmark uses 16)
method: er                       # finetune | er | er_ace | las | mir | mir_las | joint (`malleable methods` lists them)
parameters: {}                   # the method's parameters, checked against its declarations (las: tau, window)
dataset: fashion_mnist           # fashion_mnist (Debian dataset-fashion-mnist) | digits (scikit-learn)
stream: split_fashion_mnist      # a named scenario (split_ or blurry_ fashion_mnist / digits), or a list of steps:
#  - learn: {classes: [0, 1]}    #   each learns the dataset's training images of these classes
#  - learn: {classes: [2, 3]}
training:
  batch_size: 10                 # incoming stream examples per optimiser step (one pass, online)
  replay_batch_size: 10          # examples drawn from the buffer per step (replay methods)
  buffer_size: 200               # reservoir capacity in examples
  lr: 0.03                       # SGD (the LAS authors' optimiser and step size)
  eval_every: null               # batches between anytime evaluations on the seen tasks' test images
  max_per_class: null            # keep at most this many training images per class (quick runs, tests)
  test_per_class: null           # and this many test images per class
seed: 0
```
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Literal

from pydantic import Field, field_validator

from malleable.recipes.common import Seed, Strict, load_recipe_file, validate


class LearnStep(Strict):
    classes: list[int] = Field(min_length=1)

    @field_validator("classes")
    @classmethod
    def _distinct(cls, value: list[int]) -> list[int]:
        if any(c < 0 for c in value):
            raise ValueError("a class index is negative")
        if len(set(value)) < len(value):
            raise ValueError("a class is listed twice")
        return value


class Step(Strict):
    """One step of the stream. Only `learn` exists in this version; `forget` steps (issue 18's learning-unlearning
    cycles) are refused with a line saying so, not silently ignored."""

    learn: LearnStep | None = None
    forget: Any = None


class ContinualTraining(Strict):
    batch_size: int = Field(default=10, gt=0)
    replay_batch_size: int = Field(default=10, ge=0)
    buffer_size: int = Field(default=200, ge=0)
    lr: float = Field(default=0.03, gt=0)
    momentum: float = Field(default=0.0, ge=0, lt=1)
    eval_every: int | None = Field(default=None, gt=0)
    max_per_class: int | None = Field(default=None, gt=0)
    test_per_class: int | None = Field(default=None, gt=0)


class ContinualRecipe(Strict):
    model: Literal["small_cnn"] = "small_cnn"
    width: int = Field(default=16, gt=0, le=1024)
    method: str
    parameters: dict[str, Any] = Field(default_factory=dict)
    dataset: Literal["fashion_mnist", "digits"] = "fashion_mnist"
    stream: str | list[Step]
    training: ContinualTraining = Field(default_factory=ContinualTraining)
    seed: Seed = 0
    keep_checkpoints: bool = False  # keep OUT.run/ (one checkpoint per step) after a finished run


def parse_continual_recipe(data: Any, source: str = "recipe") -> ContinualRecipe:
    """Validate a recipe dict; the first problem becomes one line naming the key."""
    return validate(ContinualRecipe, data, source)


def load_continual_recipe(path: str | Path, check: Callable[[ContinualRecipe], Any] | None = None) -> ContinualRecipe:
    """The recipe file, validated; `check` is continual.engine.check_recipe (the method, the stream)."""
    return load_recipe_file(path, parse_continual_recipe, check)
