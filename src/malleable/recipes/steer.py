"""The steer recipe: which model, which method, which contrast pairs, validated before any work.

```yaml
model: path/to/checkpoint          # a local transformers checkpoint (a folder with config.json)
method: caa                        # caa, actadd, pca_diff, pca_center, logistic, iti (per-head probes);
                                   # trained: split_vector, split_lora, split_weight (`malleable methods`)
parameters: {}                     # the method's declared parameters
data:
  train: pairs.train.jsonl         # rows {prompt, positive, negative}; prompt may be "" for plain-text pairs
  validation: pairs.val.jsonl      # held-out pairs: the probe accuracy per layer, and `layers: auto`
layers: auto                       # a list of decoder-layer indices, or auto: the layer whose linear probe
                                   # tells the validation pairs apart best (iti: every layer's heads)
read_position: null                # null: the method's own (last token; CAA -2; ActAdd every position);
                                   # last, mean (over the completion's tokens), or a negative index
intervene: null                    # null: the method's own (all positions; ActAdd the first ones); all, first
strength: null                     # the artefact's default strength; null: 1, for unit-norm directions the
                                   # pairs' mean separation along the direction, for iti its alpha
batch_size: 16
chat_template: off                 # on / auto: each prompt (and generation prompt) as a user turn of the model's
                                   # chat template, the completion as the assistant's reply; off: plain text
generation: {prompts: null, max_new_tokens: 20}   # samples at each --strengths value (default: validation prompts)
```
The text a pair's member is read from is `prompt + positive` (or `+ negative`) exactly: put the separating
space where the tokenizer expects it (usually at the start of the completion). With `chat_template` on, the
prompt is first rendered as a user turn followed by the assistant header, and the completion follows that
header as given (an instruct model's reply usually starts without a space).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Literal, Union

from pydantic import Field, field_validator

from malleable.recipes.common import Seed, Strict, load_recipe_file, validate


class PairsData(Strict):
    train: Path
    validation: Path


class Generation(Strict):
    prompts: list[str] | None = Field(default=None, min_length=1)
    max_new_tokens: int = Field(default=20, gt=0, le=1024)


class SteerRecipe(Strict):
    model: Path
    method: str = Field(min_length=1)
    parameters: dict[str, Any] = Field(default_factory=dict)
    data: PairsData
    layers: Union[Literal["auto"], list[int]] = "auto"
    read_position: Union[Literal["last", "mean", "all"], int, None] = None
    intervene: Literal["all", "first", None] = None
    strength: float | None = None
    batch_size: int = Field(default=16, gt=0, le=4096)
    chat_template: Literal["auto", "on", "off"] = "off"
    generation: Generation = Field(default_factory=Generation)
    seed: Seed = 0
    trust_remote_code: bool = False
    allow_pickle: bool = False

    @field_validator("layers")
    @classmethod
    def _layers(cls, value):
        if isinstance(value, list):
            if not value:
                raise ValueError("give at least one layer, or auto")
            if len(set(value)) != len(value):
                raise ValueError("a layer is listed twice")
            if min(value) < 0:
                raise ValueError(f"layer {min(value)} is negative; layers count from 0")
        return value

    @field_validator("read_position")
    @classmethod
    def _read(cls, value):
        if isinstance(value, int) and value >= 0:
            raise ValueError(f"{value}: a numeric read position counts from the end of the text (-1 is the last "
                             "token)")
        return value


def parse_steer_recipe(data: Any, source: str = "recipe") -> SteerRecipe:
    """Validate a recipe dict; the first problem becomes one line naming the key."""
    return validate(SteerRecipe, data, source)


def load_steer_recipe(path: str | Path, check: Callable[[SteerRecipe], Any] | None = None) -> SteerRecipe:
    """The recipe file, validated; `check` is the verb's check against its registry (steer.engine.check_recipe)."""
    return load_recipe_file(path, parse_steer_recipe, check)
