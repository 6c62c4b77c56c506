"""The learn recipe: a YAML file validated with pydantic before any work starts.

```yaml
model: path/to/checkpoint        # a transformers checkpoint (its tokenizer beside it)
task: causal_lm                  # or classification (text/label rows, a sequence-classification head)
method: lora                     # lora | full | bilora | zo | memft (`malleable methods` lists them)
parameters: {r: 16, alpha: 32}   # the method's parameters, checked against its declarations
data:
  train: train.jsonl             # JSONL / CSV / Parquet, read with `datasets`
  validation: val.jsonl          # optional: validation loss every `eval_every` steps and at the end
                                 # (with training.patience: early stopping on it, the best weights kept)
  max_bad_rows: 0                # rows that may be skipped (a count, or a fraction below 1) before refusing
training:
  steps: 200                     # or epochs: 3
  batch_size: 16                 # examples per optimiser step, over all processes and micro-batches
  micro_batch_size: 4            # examples per forward pass and process (gradient accumulation makes up the rest)
  lr: 2.0e-4
  schedule: cosine               # constant | linear | cosine, after `warmup_steps` of linear warm-up
  sharding: none                 # or fsdp: under several processes each holds 1/N of the weights, gradients
                                 # and optimiser state (torch FSDP2); one process runs unsharded
seed: 0
```
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Literal, Union

from pydantic import Field, model_validator

from malleable.recipes.common import Seed, Strict, load_recipe_file, validate


class DataFormat(Strict):
    """How rows of a data file become examples (shared by learn and forget recipes)."""

    format: Literal["auto", "prompt_completion", "text", "text_label"] = "auto"
    prompt_field: str = "prompt"
    completion_field: str = "completion"
    text_field: str = "text"
    label_field: str = "label"
    labels: list[str] | None = Field(default=None, min_length=1)  # classification (default: the labels in train)
    chat_template: Literal["auto", "on", "off"] = "auto"
    max_length: int = Field(default=512, gt=1)
    max_bad_rows: Union[int, float] = Field(default=0, ge=0)


class DataSpec(DataFormat):
    train: Path
    validation: Path | None = None


class TrainingSpec(Strict):
    steps: int | None = Field(default=None, gt=0)
    epochs: float | None = Field(default=None, gt=0)
    batch_size: int = Field(default=8, gt=0)
    micro_batch_size: int | None = Field(default=None, gt=0)
    lr: float = Field(default=2e-4, gt=0)
    schedule: Literal["constant", "linear", "cosine"] = "cosine"
    warmup_steps: int = Field(default=0, ge=0)
    weight_decay: float = Field(default=0.0, ge=0)
    max_grad_norm: float | None = Field(default=1.0, gt=0)
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    log_every: int = Field(default=10, gt=0)
    eval_every: int | None = Field(default=None, gt=0)
    # early stopping: stop once the validation loss has not improved for this many evaluations in a row and
    # keep the weights of the best one (needs data.validation and eval_every)
    patience: int | None = Field(default=None, gt=0)
    checkpoint_every: int | None = Field(default=None, gt=0)
    keep_checkpoints: bool = False
    # also write the model (or adapter) every this many steps as a loadable folder OUT/snapshots/step-N/, the
    # history that `merge` method twa / twa_v averages (the resume checkpoints above keep only the newest)
    snapshot_every: int | None = Field(default=None, gt=0)
    sharding: Literal["none", "fsdp"] = "none"

    @model_validator(mode="after")
    def _length(self):
        if (self.steps is None) == (self.epochs is None):
            raise ValueError("set exactly one of training.steps and training.epochs")
        if self.micro_batch_size and self.micro_batch_size > self.batch_size:
            raise ValueError(f"training.micro_batch_size ({self.micro_batch_size}) is larger than "
                             f"training.batch_size ({self.batch_size})")
        if self.sharding == "fsdp" and self.mixed_precision == "fp16":
            raise ValueError("training.mixed_precision: fp16 does not fit training.sharding: fsdp (its loss scaler "
                             "expects whole gradients); use bf16 or no")
        return self


class LearnRecipe(Strict):
    model: Path
    task: Literal["causal_lm", "classification"] = "causal_lm"
    method: str = "lora"
    parameters: dict[str, Any] = Field(default_factory=dict)
    data: DataSpec
    training: TrainingSpec
    seed: Seed = 0
    trust_remote_code: bool = False  # run code shipped inside the model folder (off unless set)
    allow_pickle: bool = False  # load legacy .bin weights with torch.load(weights_only=True)

    @model_validator(mode="after")
    def _early_stopping(self):
        if self.training.patience and not (self.training.eval_every and self.data.validation):
            raise ValueError("training.patience: early stopping needs data.validation and training.eval_every")
        return self


def parse_learn_recipe(data: Any, source: str = "recipe") -> LearnRecipe:
    """Validate a recipe dict; the first problem becomes one line naming the key."""
    return validate(LearnRecipe, data, source)


def load_learn_recipe(path: str | Path, check: Callable[[LearnRecipe], Any] | None = None) -> LearnRecipe:
    """The recipe file, validated; `check` is the verb's own check against its registry (learn.engine.read_recipe)."""
    return load_recipe_file(path, parse_learn_recipe, check)
