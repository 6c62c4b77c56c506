"""joint: the offline upper bound. At each stream step the model trains on everything learned so far (the
union of the steps' training data, this one's included), shuffled, for `epochs` passes, with no buffer: what
an unlimited memory and several passes would give. It continues from the previous step's model (training from
scratch at every step would cost a full retraining per step and end at the same kind of model)."""

from __future__ import annotations

from collections.abc import Sequence

from malleable.continual.registry import ContinualMethod, continual_method
from malleable.params import Param


@continual_method("joint", params={"epochs": Param(1, "passes over all data seen so far at each step", ge=1)})
class Joint(ContinualMethod):
    """Offline upper bound: at every step, train on the union of all steps' data so far (shuffled, `epochs` passes)."""

    def examples(self, current: Sequence, seen: Sequence) -> tuple[Sequence, int]:
        return list(seen) + list(current), self.p["epochs"]

    def retain(self, buffer, remaining: Sequence) -> list:
        """Offline: everything learned and not forgotten is at hand to keep training on."""
        return list(remaining)
