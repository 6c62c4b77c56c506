"""Passthrough: copy one model's tensors, optionally scaled (mergekit's `passthrough`; with `slices:` it stacks
layer ranges of several models into a deeper one, the layer bookkeeping being the engine's)."""

from __future__ import annotations

from malleable.merge.registry import Param, merge_rule


@merge_rule("passthrough", uses_base=False, inputs=(1, 1), params={
    "scale": Param(1.0, "multiplier on the copied tensor (mergekit: scale)", per_input=True),
})
def passthrough(tensors, weights, generator, scale):
    """Copy the one input's tensor (times `scale`). With `slices:`, output layers are input layer ranges stacked."""
    return tensors[0] if scale[0] == 1.0 else tensors[0].mul_(scale[0])
