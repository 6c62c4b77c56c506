"""The slim recipe: which model, which method, which calibration text, validated before any work.

```yaml
model: path/to/checkpoint          # a local transformers checkpoint (a folder with config.json)
method: wanda                      # magnitude, wanda, sparsegpt, shortgpt, skipgpt (`malleable methods`); may
                                   # be left out when `kv` is given (eviction only: no weight changes)
parameters: {sparsity: 0.5, pattern: unstructured}   # the method's declared parameters (pattern 2:4, 4:8, ...)
                                   # skipgpt: {sparsity: 0.25, steps: 200, lr: 2e-3, lora_steps: 0, ...}; its
                                   # routers train on the calibration windows and ship beside the weights
calibration:
  source: lee_background           # lee_background (gensim), lee (gensim), fortunes (Debian), or a .txt file
  n_samples: 32                    # windows of seq_len tokens drawn from the text with the seed
  seq_len: 256
  batch_size: 8                    # windows run through a layer together
  chat_template: auto              # auto: each window as a user turn of the model's chat template when it has
                                   # one (an instruct model's input), on (required), off (plain text)
keep_dense: [embed_tokens, lm_head]   # module names (or globs) never pruned; the decoder layers' linear
                                   # modules are what is pruned, everything outside them stays dense anyway
evaluate:                          # measured on the dense and the slimmed model in the same run; null: skip
  source: lee                      # held-out text, disjoint from calibration (a different source)
  seq_len: 256                     # perplexity over non-overlapping windows of this many tokens
  max_windows: 64
  speed: true                      # prefill and decode tokens/s, interleaved repeats, median
  prompt_tokens: 128
  new_tokens: 32
  repeats: 3
  tasks: [capital-world, ...]      # exact match on word relations (questions-words.txt, test split, seed 0):
                                   # the adapter zoo's eight by default; null or []: skip
  task_items: 20                   # test items per relation (greedy, up to 6 new tokens, chat template if any)
kv:                                # optional: KV-cache eviction at generation, measured against the full cache
  policy: snapkv                   # streaming_llm, snapkv, h2o, knorm (`malleable methods`)
  parameters: {window_size: 64}
  ratio: 0.5                       # the share of the prompt's cache removed after its prefill; or
  # budget: 512                    # the positions each KV head keeps
  decode_interval: null            # N: also while decoding, back to that size every N new tokens
  evaluate:                        # held-out text: NLL and KL of the next tokens after a long prefill, needles
    source: lee
    context: 1024
    continuation: 64
    windows: 3
    needles: 4                     # per depth (10%, 50%, 90% of the haystack); 0: no retrieval test
    haystack: 900
seed: 0
```
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Literal

from pydantic import Field

from malleable.data.word_relations import ZOO_RELATIONS
from malleable.recipes.common import Seed, Strict, load_recipe_file, validate

class Calibration(Strict):
    source: str = Field(default="lee_background", min_length=1)
    n_samples: int = Field(default=32, gt=0, le=100_000)
    seq_len: int = Field(default=256, gt=1, le=1_000_000)
    batch_size: int = Field(default=8, gt=0, le=4096)
    chat_template: Literal["auto", "on", "off"] = "auto"


class Evaluate(Strict):
    source: str = Field(default="lee", min_length=1)
    seq_len: int = Field(default=256, gt=1, le=1_000_000)
    max_windows: int | None = Field(default=64, gt=0)
    speed: bool = True
    prompt_tokens: int = Field(default=128, gt=0, le=1_000_000)
    new_tokens: int = Field(default=32, gt=0, le=100_000)
    repeats: int = Field(default=3, gt=0, le=1000)
    tasks: list[str] | None = Field(default_factory=lambda: list(ZOO_RELATIONS))
    task_items: int = Field(default=20, gt=0, le=100_000)


class KVEvaluate(Strict):
    source: str = Field(default="lee", min_length=1)
    context: int = Field(default=1024, gt=1, le=1_000_000)
    continuation: int = Field(default=64, gt=0, le=100_000)
    windows: int = Field(default=3, gt=0, le=10_000)
    needles: int = Field(default=4, ge=0, le=10_000)
    haystack: int = Field(default=900, gt=1, le=1_000_000)


class KV(Strict):
    policy: str = Field(min_length=1)
    parameters: dict[str, Any] = Field(default_factory=dict)
    ratio: float | None = None
    budget: int | None = None
    decode_interval: int | None = Field(default=None, gt=0)
    evaluate: KVEvaluate = Field(default_factory=KVEvaluate)


class SlimRecipe(Strict):
    model: Path
    method: str | None = Field(default=None, min_length=1)
    parameters: dict[str, Any] = Field(default_factory=dict)
    calibration: Calibration = Field(default_factory=Calibration)
    keep_dense: list[str] = Field(default_factory=lambda: ["embed_tokens", "lm_head"])
    evaluate: Evaluate | None = Field(default_factory=Evaluate)
    kv: KV | None = None
    seed: Seed = 0
    trust_remote_code: bool = False
    allow_pickle: bool = False


def parse_slim_recipe(data: Any, source: str = "recipe") -> SlimRecipe:
    """Validate a recipe dict; the first problem becomes one line naming the key."""
    return validate(SlimRecipe, data, source)


def load_slim_recipe(path: str | Path, check: Callable[[SlimRecipe], Any] | None = None) -> SlimRecipe:
    """The recipe file, validated; `check` is the verb's check against its registry (slim.engine.check_recipe).
    A calibration or evaluation source that names a file is taken relative to the recipe's folder."""
    recipe = load_recipe_file(path, parse_slim_recipe, check)
    root = Path(path).parent
    for section in (recipe.calibration, recipe.evaluate, recipe.kv and recipe.kv.evaluate):
        if section is not None and section.source.endswith(".txt") and not Path(section.source).is_absolute() \
                and (root / section.source).exists():
            section.source = str(root / section.source)
    return recipe
