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
#  - forget: {classes: [1]}      #   forget every learned image of these classes (task-agnostic), or
#  - forget: {step: 2}           #   what stream step 2 (counting from 1) learned (task-aware), or
#  - forget: {sample: 0.1}       #   a seeded random share (< 1) or count (>= 1) of what is learned and not forgotten
forget:                          # how a forget step is done (ug_clu brings its own update and reads steps/lr/batch)
  objective: npo                 # any classifier objective of `malleable forget` (npo, graddiff, rl, sfr_on, ...)
  parameters: {}                 # its parameters
  mask: null                     # a forget mask, e.g. {name: salun, ratio: 0.5}
  steps: 50                      # optimiser steps per forget step
  lr: 0.01
  batch_size: 32                 # forget and retain examples per step
evaluate:
  retrain: forget_steps          # the gold standard (retrained from scratch): forget_steps | every_step | off
  retrain_epochs: 5              # its passes over everything learned and not forgotten
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

Continual LoRA post-training of a language model is the same verb on a `tasks:` list (the recipe's keys differ,
so `tasks` decides which recipe a file is):
```yaml
model: path/to/checkpoint        # a transformers causal LM (its tokenizer beside it)
method: o_lora                   # seq_lora | inc_lora | o_lora | replay_lora | l2_lora | ewc_lora | merge_each |
                                 #   joint_lora (the oracle)
parameters: {lambda_1: 0.5}      # the strategy's parameters (`malleable methods` lists them)
lora: {r: 8, alpha: 16, targets: [q_proj, v_proj]}   # the adapter every strategy trains (learn's lora parameters)
tasks:                           # learned one after another; prompt/completion rows (JSONL / CSV / Parquet)
  - {name: birth-city, train: city/train.jsonl, test: city/test.jsonl}
  - {name: profession, train: job/train.jsonl, test: job/test.jsonl}
data: {chat_template: auto}      # how rows become examples (learn's data keys, without train/validation)
training: {steps: 40, batch_size: 8, lr: 1.0e-3}    # learn's training keys, per task
evaluate:
  probe: lee                     # general text for the perplexity probe (data/corpus.py sources or a .txt), or null
  probe_windows: 16              # windows of probe_length tokens
  probe_length: 128
  composed:                      # prompts that need two learned skills (cross-task generalisation), optional
    - {name: city+profession, test: both/test.jsonl}
seed: 0
```
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Literal

from pydantic import Field, field_validator

from malleable.recipes.common import Seed, Strict, load_recipe_file, validate
from malleable.recipes.learn import DataFormat, TrainingSpec


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


class ForgetStep(Strict):
    """What a forget step removes; exactly one key (checked with the stream, continual/stream.py)."""

    step: int | None = Field(default=None, ge=1)
    classes: list[int] | None = None
    sample: int | float | None = Field(default=None, gt=0)

    @field_validator("classes")
    @classmethod
    def _distinct(cls, value: list[int] | None) -> list[int] | None:
        return None if value is None else LearnStep._distinct(value)


class Step(Strict):
    """One step of the stream: `learn` or `forget` (exactly one, checked with the stream)."""

    learn: LearnStep | None = None
    forget: ForgetStep | None = None


class ForgetSettings(Strict):
    """How a method's forget step unlearns: an objective of `malleable forget` run on the classifier."""

    objective: str = "npo"
    parameters: dict[str, Any] = Field(default_factory=dict)
    mask: dict[str, Any] | None = None
    steps: int = Field(default=50, gt=0)
    lr: float = Field(default=0.01, gt=0)
    batch_size: int = Field(default=32, gt=0)
    optimizer: Literal["sgd", "adamw"] = "sgd"
    momentum: float = Field(default=0.9, ge=0, lt=1)
    weight_decay: float = Field(default=0.0, ge=0)
    max_grad_norm: float | None = Field(default=None, gt=0)


class ContinualEvaluate(Strict):
    retrain: Literal["forget_steps", "every_step", "off"] = "forget_steps"
    retrain_epochs: int = Field(default=5, gt=0)
    mia_max_shadow: int = Field(default=2000, gt=0)


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
    forget: ForgetSettings = Field(default_factory=ForgetSettings)
    evaluate: ContinualEvaluate = Field(default_factory=ContinualEvaluate)
    seed: Seed = 0
    keep_checkpoints: bool = False  # keep OUT.run/ (one checkpoint per step) after a finished run


class TaskFiles(Strict):
    """One task of a LoRA post-training stream: its name, training rows and test rows."""

    name: str = Field(min_length=1)
    train: Path
    test: Path


class TestFiles(Strict):
    name: str = Field(min_length=1)
    test: Path


class TaskEvaluate(Strict):
    probe: str | None = "lee"
    probe_windows: int = Field(default=16, gt=0)
    probe_length: int = Field(default=128, gt=1)
    composed: list[TestFiles] = Field(default_factory=list)
    max_test: int | None = Field(default=None, gt=0)  # score at most this many test rows per task (quick runs)
    batch_size: int = Field(default=32, gt=0)


class TaskStreamRecipe(Strict):
    """Continual LoRA post-training: a causal LM learns `tasks` one after another with an adapter strategy."""

    model: Path
    method: str
    parameters: dict[str, Any] = Field(default_factory=dict)
    lora: dict[str, Any] = Field(default_factory=dict)
    tasks: list[TaskFiles] = Field(min_length=1)
    data: DataFormat = Field(default_factory=DataFormat)
    training: TrainingSpec
    evaluate: TaskEvaluate = Field(default_factory=TaskEvaluate)
    seed: Seed = 0
    trust_remote_code: bool = False
    allow_pickle: bool = False
    keep_checkpoints: bool = False

    @field_validator("tasks")
    @classmethod
    def _distinct_names(cls, value: list[TaskFiles]) -> list[TaskFiles]:
        names = [t.name for t in value]
        twice = next((n for n in names if names.count(n) > 1), None)
        if twice is not None:
            raise ValueError(f"task name '{twice}' is given twice")
        return value


AnyContinualRecipe = ContinualRecipe | TaskStreamRecipe


def parse_continual_recipe(data: Any, source: str = "recipe") -> AnyContinualRecipe:
    """Validate a recipe dict (a `tasks:` list makes it a LoRA post-training stream); the first problem becomes
    one line naming the key."""
    if isinstance(data, dict) and "tasks" in data:
        return validate(TaskStreamRecipe, data, source)
    return validate(ContinualRecipe, data, source)


def load_continual_recipe(path: str | Path, check: Callable[[AnyContinualRecipe], Any] | None = None
                          ) -> AnyContinualRecipe:
    """The recipe file, validated; `check` is continual.engine.check_recipe (the method, the stream)."""
    return load_recipe_file(path, parse_continual_recipe, check)
