"""The forget recipe: a YAML file validated with pydantic before any work starts.

```yaml
model: path/to/checkpoint        # a transformers checkpoint: a causal LM, or a sequence classifier
task: causal_lm                  # or classification (text/label rows; labels must be the model's classes)
objective: npo                   # ga | graddiff | npo | simnpo | rmu | ... (`malleable methods` lists them)
parameters: {beta: 0.1}          # the objective's parameters, checked against its declarations
mask: {name: salun, ratio: 0.5}  # optional: only these weights may change; the rest stay bit-identical
lora: {r: 16, alpha: 32}         # optional: unlearn through a LoRA adapter (the base stays frozen; output = adapter)
data:
  forget: forget.jsonl           # what to remove (JSONL / CSV / Parquet, same row formats as `learn`)
  retain: retain.jsonl           # what must keep working (objectives with a retain term need it)
  holdout: holdout.jsonl         # optional: never-trained-on rows like the forget set; the privacy attack's baseline
training:
  epochs: 5                      # over the forget set (the retain set for retain-only objectives); or steps
  batch_size: 8                  # forget rows per step (and as many retain rows)
  lr: 1.0e-5                     # or a list under stop_at, e.g. [1.0e-6, 1.0e-5, 1.0e-4]: tried in order, the first
                                 # whose run reaches the target is kept (the smallest step size that gets there)
  optimizer: adamw               # adamw | sgd; unset: AdamW, or the objective's own (SOUL's Sophia)
  stop_at: indistinguishable     # optional: stop at the retrained model's level (forget/stopping.py), or `reference`
reference: path/to/retrained     # optional: the gold standard (a model trained without the forget set)
retrain: learn.yaml              # optional: a learn recipe; `--reference retrain` runs it on data.retain
seed: 0
```
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Literal

from pydantic import Field, model_validator

from malleable.recipes.common import Seed, Strict, load_recipe_file, validate
from malleable.recipes.learn import DataFormat


class ForgetData(DataFormat):
    forget: Path
    retain: Path | None = None
    holdout: Path | None = None


class ForgetTraining(Strict):
    steps: int | None = Field(default=None, gt=0)
    epochs: float | None = Field(default=None, gt=0)
    batch_size: int = Field(default=8, gt=0)
    # a list: the step sizes tried in order under `stop_at`; the first whose run reaches the target is kept
    lr: float | list[float] = 1e-5
    optimizer: Literal["adamw", "sgd"] | None = None  # unset: AdamW, or the objective's own (SOUL: Sophia)
    schedule: Literal["constant", "linear", "cosine"] = "constant"
    warmup_steps: int = Field(default=0, ge=0)
    weight_decay: float = Field(default=0.0, ge=0)
    max_grad_norm: float | None = Field(default=1.0, gt=0)
    # calibrated unlearning (forget/stopping.py): stop at the retrained model's level, not past it
    stop_at: Literal["indistinguishable", "reference"] | None = None
    tolerance: float = Field(default=0.05, gt=0, lt=0.5)  # around AUC 0.5, or relative to the reference's loss
    check_every: int = Field(default=5, gt=0)  # steps between checks
    calibration: float = Field(default=0.5, gt=0, lt=1)  # share of the holdout rows the rule checks against
    # the retain guard: a check whose retain loss passes this factor of the original model's is never kept (the
    # membership attack alone cannot see utility falling)
    retain_limit: float | None = Field(default=None, gt=1)

    @model_validator(mode="after")
    def _length(self):
        if (self.steps is None) == (self.epochs is None):
            raise ValueError("set exactly one of training.steps and training.epochs")
        lrs = self.lr if isinstance(self.lr, list) else [self.lr]
        if not lrs or any(x <= 0 for x in lrs):
            raise ValueError("lr: every step size must be greater than 0")
        if isinstance(self.lr, list) and self.stop_at is None:
            raise ValueError("lr: a list of step sizes needs training.stop_at (the stopping rule decides which "
                             "one reaches the retrain target)")
        if self.retain_limit is not None and self.stop_at is None:
            raise ValueError("retain_limit: the retain guard is part of training.stop_at's rule; set stop_at")
        if len(set(lrs)) < len(lrs):
            raise ValueError("lr: a step size is listed twice")
        return self


class ForgetRecipe(Strict):
    model: Path
    task: Literal["causal_lm", "classification"] = "causal_lm"
    objective: str
    parameters: dict[str, Any] = Field(default_factory=dict)
    mask: dict[str, Any] | None = None
    lora: dict[str, Any] | None = None
    data: ForgetData
    training: ForgetTraining = Field(default_factory=lambda: ForgetTraining(epochs=5))
    reference: Path | None = None
    retrain: Path | None = None
    seed: Seed = 0
    trust_remote_code: bool = False  # run code shipped inside the model folder (off unless set)
    allow_pickle: bool = False  # load legacy .bin weights with torch.load(weights_only=True)


def parse_forget_recipe(data: Any, source: str = "recipe") -> ForgetRecipe:
    """Validate a recipe dict; the first problem becomes one line naming the key."""
    return validate(ForgetRecipe, data, source)


def load_forget_recipe(path: str | Path, check: Callable[[ForgetRecipe], Any] | None = None) -> ForgetRecipe:
    """The recipe file, validated; `check` is the verb's own check against its registries (forget.run.read_recipe)."""
    return load_recipe_file(path, parse_forget_recipe, check)
