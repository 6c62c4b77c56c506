"""The replay buffer: reservoir sampling (Vitter's algorithm R), as the online continual-learning codes keep it.

After `seen` examples of the stream have been offered, every one of them is in the buffer with probability
capacity / seen. The rule, as mammoth's `reservoir` (the LAS authors' and DER's code base) writes it: while the
buffer has room, the example takes the next slot; afterwards a uniform index in [0, seen] (seen = examples
offered before this one) replaces that slot when it falls inside the buffer, else the example is dropped.
Replay batches are drawn uniformly without replacement from the filled slots (mammoth's `get_data`).

Forget steps (continual/stream.py) take forgotten examples out: `forget(ids)` drops their slots and moves the
rest down, so the buffer holds fewer than `capacity`; the freed slots are filled first by the next examples
offered, then the reservoir rule resumes. `seen` is lowered by the number of forgotten examples (all of them were
offered once), so the rule counts only examples that may still be kept. Strictly, the buffer is then a uniform
sample of the remaining stream only when the forgotten examples were a uniform share of it; for a forgotten class
the remaining classes keep their shares, and the freed slots go to the next examples (ours, no reference exists).

All randomness comes from one torch.Generator whose state travels with the buffer, so a stream resumed from a
checkpoint draws exactly what the uninterrupted one would have.
"""

from __future__ import annotations

import torch


class Reservoir:
    def __init__(self, capacity: int, seed: int):
        self.capacity = capacity
        self.seen = 0
        self.filled = 0
        self.x: torch.Tensor | None = None
        self.y: torch.Tensor | None = None
        self.ids: torch.Tensor | None = None  # each slot's example id (the dataset's training index; -1: unknown)
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return self.filled

    def add(self, x: torch.Tensor, y: torch.Tensor, ids: torch.Tensor | None = None) -> None:
        """Offer each example of a batch in turn (non-augmented, as the stream gave it); `ids` name them."""
        if self.capacity == 0:
            self.seen += len(y)
            return
        if self.x is None:
            self.x = torch.zeros((self.capacity, *x.shape[1:]), dtype=x.dtype)
            self.y = torch.zeros(self.capacity, dtype=torch.long)
            self.ids = torch.full((self.capacity,), -1, dtype=torch.long)
        for i in range(len(y)):
            if self.filled < self.capacity:
                slot = self.filled
                self.filled += 1
            else:
                slot = int(torch.randint(0, self.seen + 1, (1,), generator=self.generator))
            if slot < self.capacity:
                self.x[slot] = x[i].detach().cpu()
                self.y[slot] = int(y[i])
                self.ids[slot] = -1 if ids is None else int(ids[i])
            self.seen += 1

    def forget(self, ids: set[int] | frozenset[int]) -> int:
        """Drop the stored examples whose id is in `ids` (the rest keep their order); returns how many were
        dropped. `seen` falls by len(ids): every forgotten example was offered once."""
        self.seen = max(self.filled, self.seen - len(ids))
        if self.x is None or not ids:
            return 0
        keep = [k for k in range(self.filled) if int(self.ids[k]) not in ids]
        dropped = self.filled - len(keep)
        n = len(keep)
        self.x[:n], self.y[:n], self.ids[:n] = self.x[keep], self.y[keep], self.ids[keep]
        self.filled = n
        self.seen = max(self.filled, self.seen)
        return dropped

    def contents(self) -> list[tuple[torch.Tensor, int, int]]:
        """The stored examples as (image, label, id), slot order."""
        if self.x is None:
            return []
        return [(self.x[k], int(self.y[k]), int(self.ids[k])) for k in range(self.filled)]

    def sample(self, size: int) -> dict[str, torch.Tensor] | None:
        """Up to `size` stored examples, uniformly without replacement; None while the buffer is empty."""
        n = len(self)
        if n == 0 or size == 0:
            return None
        idx = torch.randperm(n, generator=self.generator)[:min(size, n)]
        return {"x": self.x[idx], "labels": self.y[idx]}

    def state(self) -> dict[str, torch.Tensor]:
        out = {"buffer.seen": torch.tensor([self.seen, self.filled], dtype=torch.long),
               "buffer.generator": self.generator.get_state()}
        if self.x is not None:
            out |= {"buffer.x": self.x, "buffer.y": self.y, "buffer.ids": self.ids}
        return out

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        counts = tensors["buffer.seen"].tolist()
        self.seen = counts[0]
        self.filled = counts[1] if len(counts) > 1 else min(self.seen, self.capacity)
        self.generator.set_state(tensors["buffer.generator"])
        self.x, self.y = tensors.get("buffer.x"), tensors.get("buffer.y")
        self.ids = tensors.get("buffer.ids")
        if self.x is not None and self.ids is None:
            self.ids = torch.full((self.capacity,), -1, dtype=torch.long)
