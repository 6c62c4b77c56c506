"""Sharded checkpoint writer in the transformers layout, streaming one tensor at a time."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch

from malleable.io.checkpoint import SAFE_INDEX, SAFE_SINGLE
from malleable.io.safetensors_file import StreamingSafetensorsWriter

Plan = list[tuple[str, torch.dtype, tuple[int, ...]]]


def parse_size(size: str | int) -> int:
    """'5GB' / '500MB' / '2GiB' / 1000 -> bytes (decimal units like transformers, binary with 'i')."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", size, re.IGNORECASE)
    if not m:
        raise ValueError(f"cannot read size '{size}' (use e.g. 5GB, 500MB)")
    base = 1024 if m.group(3) else 1000
    return int(float(m.group(1)) * base ** " KMGT".index(m.group(2).upper() or " "))


def _nbytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    return dtype.itemsize * math.prod(shape)


def split_shards(plan: Plan, max_shard_bytes: int) -> list[Plan]:
    """Greedy in plan order, as transformers does; a tensor larger than the limit gets a shard of its own."""
    shards: list[Plan] = [[]]
    size = 0
    for entry in plan:
        n = _nbytes(entry[1], entry[2])
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += n
    return shards


class ShardedWriter:
    """Write `plan` into `directory` as model.safetensors, or shards plus model.safetensors.index.json.

    Call `write(name, tensor)` in plan order; `close()` finishes the last shard and writes the index.
    The directory should be a temporary one from `atomic_dir`, so a failure leaves nothing behind.
    """

    def __init__(self, directory: Path, plan: Plan, max_shard_bytes: int, metadata: dict[str, str] | None = None):
        self.directory = Path(directory)
        self.shards = split_shards(plan, max_shard_bytes)
        n = len(self.shards)
        self.filenames = ([SAFE_SINGLE] if n == 1 else
                          [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)])
        self.metadata = {"format": "pt", **(metadata or {})}
        self.total_size = sum(_nbytes(d, s) for _, d, s in plan)
        self._shard = -1
        self._left = 0
        self._writer: StreamingSafetensorsWriter | None = None

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._left == 0:
            self._next_shard()
        assert self._writer is not None
        self._writer.write(name, tensor)
        self._left -= 1

    def _next_shard(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._shard += 1
        plan = self.shards[self._shard]
        self._writer = StreamingSafetensorsWriter(self.directory / self.filenames[self._shard], plan, self.metadata)
        self._left = len(plan)

    def close(self) -> None:
        if self._writer is None:  # an empty plan still produces one (empty) file
            self._next_shard()
        if self._left or self._shard != len(self.shards) - 1:
            raise ValueError("some planned tensors were never written")
        self._writer.close()
        if len(self.shards) > 1:
            weight_map = {name: self.filenames[i] for i, shard in enumerate(self.shards) for name, _, _ in shard}
            index = {"metadata": {"total_size": self.total_size}, "weight_map": weight_map}
            (self.directory / SAFE_INDEX).write_text(json.dumps(index, indent=2))
