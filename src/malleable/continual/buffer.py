"""The replay buffer: reservoir sampling (Vitter's algorithm R), as the online continual-learning codes keep it.

After `seen` examples of the stream have been offered, every one of them is in the buffer with probability
capacity / seen. The rule, as mammoth's `reservoir` (the LAS authors' and DER's code base) writes it: while the
buffer has room, the example takes the next slot; afterwards a uniform index in [0, seen] (seen = examples
offered before this one) replaces that slot when it falls inside the buffer, else the example is dropped.
Replay batches are drawn uniformly without replacement from the filled slots (mammoth's `get_data`).

All randomness comes from one torch.Generator whose state travels with the buffer, so a stream resumed from a
checkpoint draws exactly what the uninterrupted one would have.
"""

from __future__ import annotations

import torch


class Reservoir:
    def __init__(self, capacity: int, seed: int):
        self.capacity = capacity
        self.seen = 0
        self.x: torch.Tensor | None = None
        self.y: torch.Tensor | None = None
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return min(self.seen, self.capacity)

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Offer each example of a batch in turn (non-augmented, as the stream gave it)."""
        if self.capacity == 0:
            self.seen += len(y)
            return
        if self.x is None:
            self.x = torch.zeros((self.capacity, *x.shape[1:]), dtype=x.dtype)
            self.y = torch.zeros(self.capacity, dtype=torch.long)
        for i in range(len(y)):
            if self.seen < self.capacity:
                slot = self.seen
            else:
                slot = int(torch.randint(0, self.seen + 1, (1,), generator=self.generator))
            if slot < self.capacity:
                self.x[slot] = x[i].detach().cpu()
                self.y[slot] = int(y[i])
            self.seen += 1

    def sample(self, size: int) -> dict[str, torch.Tensor] | None:
        """Up to `size` stored examples, uniformly without replacement; None while the buffer is empty."""
        n = len(self)
        if n == 0 or size == 0:
            return None
        idx = torch.randperm(n, generator=self.generator)[:min(size, n)]
        return {"x": self.x[idx], "labels": self.y[idx]}

    def state(self) -> dict[str, torch.Tensor]:
        out = {"buffer.seen": torch.tensor([self.seen], dtype=torch.long),
               "buffer.generator": self.generator.get_state()}
        if self.x is not None:
            out |= {"buffer.x": self.x, "buffer.y": self.y}
        return out

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        self.seen = int(tensors["buffer.seen"][0])
        self.generator.set_state(tensors["buffer.generator"])
        self.x, self.y = tensors.get("buffer.x"), tensors.get("buffer.y")
