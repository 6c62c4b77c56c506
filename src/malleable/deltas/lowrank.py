"""Low-rank deltas: a LoRA update `scale * B @ A` kept as its factors."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LowRankDelta:
    """`scale * B @ A` with B: [out, r] and A: [r, in]. Materialise with `dense()` only when a rule must."""

    B: torch.Tensor
    A: torch.Tensor
    scale: float = 1.0

    def __post_init__(self) -> None:
        if self.B.ndim != 2 or self.A.ndim != 2 or self.B.shape[1] != self.A.shape[0]:
            raise ValueError(f"LoRA factors do not chain: B {tuple(self.B.shape)}, A {tuple(self.A.shape)}")

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        return (self.B.shape[0], self.A.shape[1])

    def dense(self) -> torch.Tensor:
        return self.scale * (self.B.float() @ self.A.float())

    def balanced(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Factors with the scale folded in evenly (sqrt into each), so `B @ A` is the whole delta."""
        s = abs(self.scale) ** 0.5
        sign = 1.0 if self.scale >= 0 else -1.0
        return self.B.float() * (s * sign), self.A.float() * s
