"""The algebra every verb shares: low-rank deltas and the linear algebra over them."""

from malleable.deltas.lowrank import LowRankDelta

__all__ = ["LowRankDelta"]
