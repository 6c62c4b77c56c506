"""The merge-rule registry: a rule is a small function over tensors, registered by name.

Two kinds of rule:

* ``space="full"``: ``fn(tensors, weights, generator, **params) -> Tensor``. ``tensors`` are the inputs'
  task vectors (fine-tuned minus base; for LoRA inputs, the dense deltas) when ``uses_base`` is true, or the
  inputs' raw weights when it is false (linear), or, when it is ``"raw"``, the base's raw weight first and
  then the inputs' raw weights (rules that interpolate between the base and another model: slerp, nearswap),
  or, when it is ``"optional"``, task vectors if the recipe gives a base and raw weights if it does not
  (mergekit's nuslerp and multislerp, whose base is optional).
  The result is a merged task vector (added to the base by the engine) or, for ``uses_base=False``,
  ``"raw"``, and ``"optional"`` without a base, the merged weight itself. A ``"raw"`` rule needs a base and
  full checkpoints (not LoRAs).
  All tensors arrive as contiguous float32, in scratch buffers the engine reuses: a rule may overwrite its
  inputs (and return one of them) instead of allocating, which is what keeps large tensors cheap; a
  ``"raw"`` rule may overwrite the inputs but not the base (tensors[0]), which the engine still reads for
  the report. Callers that need their tensors afterwards pass copies.
* ``space="lora"``: ``fn(deltas, weights, generator, rank, **params) -> LowRankDelta``. ``deltas`` are one
  module's `LowRankDelta` per input; ``rank`` is the requested output rank (None: the rule decides).
  A LoRA rule with an ``inner`` parameter applies that full-space rule to the coordinates it builds,
  and accepts the inner rule's parameters too.
  A LoRA rule may also register ``batch``: ``batch(jobs: list[LoraJob]) -> list[LowRankDelta]``, the same
  merge for many modules at once (one `LoraJob` per module, results in the same order). The engine then
  hands it every module of the adapters in one call instead of calling ``fn`` per module, so a rule whose
  per-module work is many small linear-algebra calls (CtM's HOOI) can batch the modules that share shapes.
  It must equal ``[fn(j.deltas, j.weights, j.generator, j.rank, **j.params) for j in jobs]`` up to float
  round-off, and bound its own memory (the inputs are in memory already; its outputs are adapter-sized).

* ``space="learned"``: a merge that trains on data (TWA): ``fn(plan, out, force, progress) -> report``. The
  engine validates the inputs as for a full-space merge (architectures, tensor sets, shapes, parameters) and
  requires the recipe's ``data``; then, instead of streaming, it hands the plan to ``fn``, which loads the
  checkpoints, trains what it learns, and writes the output atomically with its report.

Parameters are declared with `Param`; the engine validates recipes against them before any work starts,
resolves per-tensor values (name filters, per-layer gradients) and passes plain values. A parameter with
``per_input=True`` may be set on each input (mergekit style); the rule then receives a list, one per input.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from malleable.errors import RecipeError
from malleable.params import Param  # noqa: F401  (rules declare their parameters with it)


@dataclass(frozen=True)
class LoraJob:
    """One module's merge for a LoRA rule's ``batch``: exactly the arguments ``fn`` would get."""

    deltas: list[Any]  # LowRankDelta per input
    weights: list[float]
    generator: Any  # torch.Generator
    rank: int | None
    params: dict[str, Any]


@dataclass(frozen=True)
class Rule:
    name: str
    fn: Callable[..., Any]
    space: str  # "full", "lora" or "learned"
    params: dict[str, Param]
    uses_base: bool | str  # True: task vectors; False: raw weights; "raw": base's raw weight, then the inputs';
    # "optional": task vectors with a base, raw weights without one
    random: bool
    doc: str
    inner: bool = field(default=False)  # LoRA rule that applies a full-space rule to its coordinates
    inputs: tuple[int, int | None] = (1, None)  # how many inputs (besides the base) the rule takes: min, max
    batch: Callable[..., Any] | None = None  # LoRA rule: merges a list of LoraJob at once (see module doc)
    describe: Callable[..., Any] | None = None  # learned rule: describe(plan) -> extra `--dry-run` lines


RULES: dict[str, Rule] = {}


def merge_rule(name: str, *, space: str = "full", params: dict[str, Param] | None = None,
               uses_base: bool | str = True, random: bool = False,
               inputs: tuple[int, int | None] = (1, None), batch: Callable | None = None,
               describe: Callable | None = None) -> Callable:
    """Register `fn` as merge method `name`. Its docstring is the method's documentation. `inputs` bounds the
    number of inputs besides the base (min, max; None: no maximum); the engine checks it before any work.
    `batch` (LoRA rules only): the same merge over a list of `LoraJob`, see the module doc. `describe` (learned
    rules only): describe(plan) -> lines `--dry-run` prints after the plan (what the rule will compute)."""

    def register(fn: Callable) -> Callable:
        if space not in ("full", "lora", "learned"):
            raise ValueError(f"merge rule '{name}': space must be full, lora or learned")
        if uses_base not in (True, False, "raw", "optional"):
            raise ValueError(f"merge rule '{name}': uses_base must be True, False, 'raw' or 'optional'")
        if name in RULES:
            raise ValueError(f"merge rule '{name}' registered twice")
        if batch is not None and space != "lora":
            raise ValueError(f"merge rule '{name}': only LoRA rules merge modules in batches")
        if describe is not None and space != "learned":
            raise ValueError(f"merge rule '{name}': only learned rules describe their own plan")
        ps = dict(params or {})
        RULES[name] = Rule(name, fn, space, ps, uses_base, random, (fn.__doc__ or "").strip(),
                           inner="inner" in ps, inputs=inputs, batch=batch, describe=describe)
        return fn

    return register


def get_rule(name: str) -> Rule:
    from malleable import merge  # noqa: F401  (importing the package registers every rule)

    if name not in RULES:
        raise RecipeError(f"method: unknown merge method '{name}' (known: {', '.join(sorted(RULES))})")
    return RULES[name]


def rule_params(rule: Rule, inner_name: str | None) -> dict[str, Param]:
    """Every parameter a recipe may set for `rule` (plus its inner full-space rule's)."""
    ps = dict(rule.params)
    if rule.inner and inner_name is not None:
        inner = get_rule(inner_name)
        if inner.space != "full" or inner.uses_base == "raw":  # raw rules need the base's own weights
            raise RecipeError(f"parameters.inner: '{inner_name}' is not a full-space merge rule over task vectors")
        ps.update({k: v for k, v in inner.params.items() if k not in ps})
    return ps
