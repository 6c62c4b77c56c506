"""The merge recipe: a YAML file validated with pydantic before any work starts.

```yaml
method: ties                 # any registered merge rule (`malleable methods` lists them)
base: path/to/base           # a checkpoint; needed by task-vector rules and to merge LoRAs into a model
inputs:
  - path: path/to/finetune-or-adapter
    weight: 1.0              # per-input; may also be a filter list or a per-layer gradient
    parameters: {density: 0.5}   # per-input values of rules' per-input parameters
parameters:                  # the method's parameters; each value may be
  density: 0.5               #   a scalar,
  scale: [0.5, 1.0]          #   a per-layer gradient (interpolated over the layers), or
  normalize:                 #   a filter list: the first entry whose filter is in the tensor name wins
    - {filter: mlp, value: count}
    - {value: weights}
output: {kind: auto, rank: 16, dtype: bfloat16, max_shard_size: 5GB}
read_dtype: bfloat16         # inputs are rounded to this precision when read (mergekit's `dtype`); rules compute
                             # in float32 on the rounded values
chat_template: auto          # written beside the output: auto (the inputs' most common) or a Jinja string
tokenizer:                   # vocabulary merging (mergekit's): embedding and lm_head rows laid out over
  source: union              #   base | union | path/to/model (whose tokenizer is written)
  base: path/to/model        #   whose tokenizer `base` names and the union starts from (default: base, first input)
  tokens: {"<tok>": {source: path/to/model, force: false}}   # a token's row: a model's, {kind: zero}, or
                             #   {kind: model_token, model: ..., token: ... | token_id: ...}
  pad_to_multiple_of: 64     #   extra rows: each model's mean row
seed: 0
```
Merges that learn from data (method twa, twa_v, twa_t) read a `data` section, learn's (`recipes.learn.DataSpec`):
```yaml
data: {train: train.jsonl, validation: val.jsonl, format: text_label}   # twa_v trains on validation
```
RAIN-Merging (method rain: base, then inputs [reasoning model, instruction model]) reads its two calibration
files from the same section (formats in `malleable.merge.rain`):
```yaml
data: {train: reasoning_calibration.jsonl, validation: instruction_calibration.jsonl}
```
Frankenmerges stack layer ranges of the inputs into a deeper model (method passthrough, one input per slice):
```yaml
slices:
  - {input: 0, layers: [0, 3]}                 # output layers 0..2 are layers 0..2 of inputs[0]
  - {input: 1, layers: [1, 4], parameters: {scale: 0.5}}   # output layers 3..5 are layers 1..3 of inputs[1]
```
A mergekit YAML (`merge_method:` ...) is read by `recipes.mergekit` and becomes this same recipe.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Union

from pydantic import Field, field_validator, model_validator

from malleable.recipes.common import Seed, Strict, load_recipe_file, validate
from malleable.recipes.learn import DataSpec
from malleable.recipes.param_spec import ParamSpec


class InputSpec(Strict):
    path: Path
    weight: ParamSpec = 1.0
    parameters: dict[str, ParamSpec] = Field(default_factory=dict)


class OutputSpec(Strict):
    kind: Literal["auto", "model", "adapter"] = "auto"
    rank: int | None = Field(default=None, gt=0)
    dtype: str | None = None
    max_shard_size: Union[str, int] = "5GB"

    @field_validator("dtype")
    @classmethod
    def _floating(cls, dtype: str | None) -> str | None:
        """Only floating tensors are cast to it: an integer or unknown name fails here, not mid-merge."""
        from malleable.io.checkpoint import dtype_from_name

        if dtype is not None:
            dtype_from_name(dtype)
        return dtype

    @field_validator("max_shard_size")
    @classmethod
    def _size(cls, size: str | int) -> str | int:
        """Checked now, not when the first shard is written."""
        from malleable.io.writer import parse_size

        try:
            positive = parse_size(size) > 0
        except OverflowError:  # more digits than a float holds
            positive = False
        if not positive:
            raise ValueError(f"{size!r:.40} is not a positive size (use e.g. 5GB, 500MB)")
        return size


def _layer_range(layers: tuple[int, int] | None) -> tuple[int, int] | None:
    if layers is not None and not 0 <= layers[0] < layers[1]:
        raise ValueError(f"{list(layers)} is not a layer range [start, end) with 0 <= start < end")
    return layers


class SliceSource(Strict):
    input: int = Field(ge=0)
    layers: tuple[int, int]
    weight: ParamSpec | None = None  # default: the input's own weight
    parameters: dict[str, ParamSpec] = Field(default_factory=dict)  # per-input values, over the input's own

    _range = field_validator("layers")(_layer_range)


class SliceSpec(Strict):
    """Output layers taken from one input's layer range (`input` and `layers`), or merged by the recipe's method
    from several inputs' equally long ranges (`sources`; a rule that needs the base reads its range `base_layers`,
    of the recipe's base or of the input `base_input`).
    `parameters` rank above the recipe's, and a source's own above both; per-layer gradients run over the slice."""

    input: int | None = Field(default=None, ge=0)
    layers: tuple[int, int] | None = None
    sources: list[SliceSource] | None = Field(default=None, min_length=1)
    base_layers: tuple[int, int] | None = None
    # the slice's base is this input instead of the recipe's base (mergekit's per-slice base_model)
    base_input: int | None = Field(default=None, ge=0)
    parameters: dict[str, ParamSpec] = Field(default_factory=dict)

    _range = field_validator("layers", "base_layers")(_layer_range)

    @model_validator(mode="after")
    def _one_form(self) -> SliceSpec:
        if (self.sources is None) == (self.input is None) or (self.input is None) != (self.layers is None):
            raise ValueError("give either `input` and `layers`, or `sources`")
        if self.base_input is not None and self.base_layers is None:
            raise ValueError("base_input: give the base's layers too (base_layers)")
        return self

    def all_sources(self) -> list[SliceSource]:
        return self.sources or [SliceSource(input=self.input, layers=self.layers)]


class TokenSource(Strict):
    kind: Literal["zero", "model_token"]
    model: Path | None = None
    token: str | None = None
    token_id: int | None = Field(default=None, ge=0)

    @model_validator(mode="after")
    def _one_token(self) -> TokenSource:
        if self.kind == "model_token" and (self.model is None or (self.token is None) == (self.token_id is None)):
            raise ValueError("kind model_token takes `model` and one of `token` or `token_id`")
        if self.kind == "zero" and (self.model, self.token, self.token_id) != (None, None, None):
            raise ValueError("kind zero takes nothing else")
        return self


class TokenSpec(Strict):
    source: TokenSource | Path | None = None
    force: bool = False


class TokenizerSpec(Strict):
    """Vocabulary merging: the output tokenizer and every model's embedding rows laid out over it
    (`malleable.merge.vocab`)."""

    source: Union[Literal["base", "union"], Path] = "union"
    base: Path | None = None
    tokens: dict[str, TokenSpec] = Field(default_factory=dict)
    pad_to_multiple_of: int | None = Field(default=None, gt=0)


class MergeRecipe(Strict):
    method: str
    base: Path | None = None
    inputs: list[InputSpec] = Field(min_length=1)
    parameters: dict[str, ParamSpec] = Field(default_factory=dict)
    output: OutputSpec = Field(default_factory=OutputSpec)
    slices: list[SliceSpec] | None = Field(default=None, min_length=1)
    read_dtype: str | None = None
    chat_template: str | None = None
    tokenizer: TokenizerSpec | None = None
    data: DataSpec | None = None  # merges that learn from data (space "learned": TWA, RAIN)
    seed: Seed = 0
    allow_nonfinite: bool = False
    allow_pickle: bool = False

    @field_validator("read_dtype")
    @classmethod
    def _read_floating(cls, dtype: str | None) -> str | None:
        return OutputSpec._floating(dtype)


def parse_recipe(data: dict, source: str = "recipe") -> MergeRecipe:
    """Validate a recipe dict; a mergekit-style dict is translated first."""
    if isinstance(data, dict) and "merge_method" in data:
        from malleable.recipes.mergekit import from_mergekit

        data = from_mergekit(data, source)
    return validate(MergeRecipe, data, source)


def load_recipe(path: str | Path) -> MergeRecipe:
    return load_recipe_file(path, parse_recipe)
