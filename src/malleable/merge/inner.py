"""Shared by the LoRA-native rules that merge coordinates with a full-space rule (``inner``)."""

from __future__ import annotations

import torch

from malleable.deltas.lowrank import LowRankDelta
from malleable.errors import RecipeError
from malleable.merge.registry import Param, get_rule

# choices=None: the set of full rules grows as modules register; the engine validates the name (and the
# inner rule's parameters) through `rule_params`, and `apply_inner` checks again for direct calls.
INNER = Param("ties", "full-space merge rule applied to the coordinates (any registered full-space rule)")


def apply_inner(inner: str, tensors: list[torch.Tensor], weights, generator, params: dict) -> torch.Tensor:
    """Run full-space rule ``inner`` on ``tensors`` (as contiguous float32) with its own parameters from ``params``.

    ``params`` are the keyword arguments the LoRA rule received beyond its own, i.e. the inner rule's
    parameters; missing ones take the inner rule's defaults (direct Python calls), unknown ones are a
    RecipeError naming the key (a typo must never be silently ignored), and a per-input parameter given
    as one value is repeated for every input. The generator is passed through, so random inner rules
    (DARE) are seeded only by it.
    """
    rule = get_rule(inner)
    if rule.space != "full" or rule.uses_base == "raw":
        raise RecipeError(f"parameters.inner: '{inner}' is not a full-space merge rule over task vectors")
    unknown = sorted(set(params) - set(rule.params))
    if unknown:
        raise RecipeError(f"parameters.{unknown[0]}: not a parameter of inner rule '{inner}' "
                          f"(known: {', '.join(sorted(rule.params)) or 'none'})")
    kwargs = {k: p.default for k, p in rule.params.items()}
    kwargs.update(params)
    for k, p in rule.params.items():  # a per-input parameter given once (or defaulted) applies to every input
        if p.per_input and not isinstance(kwargs[k], (list, tuple)):
            kwargs[k] = [kwargs[k]] * len(tensors)
    return rule.fn([t.float().contiguous() for t in tensors], list(weights), generator, **kwargs).float()


def default_rank(deltas: list[LowRankDelta], rank: int | None) -> int:
    """The requested output rank, or the largest input rank when none was requested."""
    if rank is None:
        return max(d.rank for d in deltas)
    if rank < 1:
        raise RecipeError(f"rank: must be at least 1, got {rank}")
    return int(rank)


def zero_delta(deltas: list[LowRankDelta]) -> LowRankDelta:
    """A rank-1 zero delta of the inputs' shape (all inputs were zero)."""
    out, inp = deltas[0].shape
    return LowRankDelta(torch.zeros(out, 1), torch.zeros(1, inp), 1.0)
