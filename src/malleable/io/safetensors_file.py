"""Streaming access to single safetensors files.

Written by hand because the `safetensors` library reads through a memory map (every page touched stays
in our RSS until the map closes) and `save_file` needs every tensor in memory at once. Merging a model
tensor by tensor needs the opposite: read one tensor into a private buffer, write one tensor straight to
its place in the output file, and hold nothing else. The format is tiny (an 8-byte little-endian header
length, a JSON header, then raw little-endian bytes), and files written here load with `safetensors`.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from malleable.errors import InputError
from malleable.io.paths import regular_file

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives in a safetensors file."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


class SafetensorsFile:
    """One safetensors file: the header is parsed and checked on open, tensors are read on demand."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.tensors, self.metadata = _read_header(self.path)

    def read(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """Tensor `name`, read into `out` when given: a contiguous tensor of its shape (a reused buffer saves
        the page faults of a fresh allocation, which cost more than the read itself). An `out` of another
        dtype is filled by converting straight from a read-only map of the tensor's bytes, unmapped at once:
        one pass instead of a read and a conversion, and no mapped page stays resident."""
        info = self.tensors[name]
        if out is None:
            out = torch.empty(info.shape, dtype=info.dtype)  # not zero-filled: readinto writes every byte
        elif tuple(out.shape) != info.shape or not out.is_contiguous():
            raise ValueError(f"read buffer for '{name}' has shape {tuple(out.shape)}, need {info.shape}")
        if out.dtype != info.dtype and info.nbytes:
            return self._convert_into(info, out)
        with open(self.path, "rb") as f:
            f.seek(info.begin)
            got = f.readinto(memoryview(out.view(-1).view(torch.uint8).numpy())) if info.nbytes else 0
        if got != info.nbytes:
            raise InputError(f"{self.path}: truncated while reading tensor '{name}'")
        return out


    def _convert_into(self, info: TensorInfo, out: torch.Tensor) -> torch.Tensor:
        start = info.begin - info.begin % mmap.ALLOCATIONGRANULARITY
        with open(self.path, "rb") as f, mmap.mmap(f.fileno(), info.end - start, offset=start,
                                                   access=mmap.ACCESS_READ) as m, warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # the map is read-only; the tensor is only read
            src = torch.frombuffer(m, dtype=info.dtype, count=info.numel, offset=info.begin - start)
            out.copy_(src.view(info.shape))
            del src  # release the map's buffer before it closes
        return out


def _read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    regular_file(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise InputError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise InputError(f"{path}: corrupt safetensors header (declares {n} header bytes, file has {size})")
            raw = f.read(n)
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror})") from None
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (UnicodeDecodeError, ValueError) as e:
        raise InputError(f"{path}: corrupt safetensors header ({e})") from None
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise InputError(f"{path}: corrupt safetensors header (__metadata__ must map strings to strings)")
    data_start = 8 + n
    tensors = {name: _entry(path, name, entry, data_start) for name, entry in header.items()}
    # the rule of the safetensors library: sorted by offset, tensors tile the data section exactly
    at = data_start
    for info in sorted(tensors.values(), key=lambda t: (t.begin, t.end)):
        if info.begin != at:
            what = "overlaps the tensor before it" if info.begin < at else f"leaves a gap of {info.begin - at} bytes"
            raise InputError(f"{path}: tensor '{info.name}' {what} (data_offsets must be contiguous from 0)")
        at = info.end
    if at > size:
        raise InputError(f"{path}: truncated (tensors end at byte {at}, file has {size})")
    if at < size:
        raise InputError(f"{path}: {size - at} bytes after the last tensor that no tensor claims")
    return tensors, metadata or {}


def _natural(x) -> bool:
    return type(x) is int and x >= 0  # not a bool, not a float like 4.0


def _entry(path: Path, name: str, entry, data_start: int) -> TensorInfo:
    """One header entry, checked as the safetensors library checks it: known dtype, a shape of non-negative
    ints, [begin, end] offsets of non-negative ints spanning exactly the tensor's bytes."""
    if not isinstance(entry, dict):
        raise InputError(f"{path}: tensor '{name}': header entry is not a JSON object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise InputError(f"{path}: tensor '{name}': unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_natural(d) for d in shape):
        raise InputError(f"{path}: tensor '{name}': shape must be a list of non-negative integers, got {shape!r}")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_natural(x) for x in offsets):
        raise InputError(f"{path}: tensor '{name}': data_offsets must be [begin, end] integers, got {offsets!r}")
    b, e = offsets
    info = TensorInfo(name, DTYPES[dtype], tuple(shape), data_start + b, data_start + e)
    if e < b or info.nbytes != info.numel * info.dtype.itemsize:
        raise InputError(f"{path}: tensor '{name}' has {e - b} bytes for shape {shape} of {dtype}")
    return info


class StreamingSafetensorsWriter:
    """Writes a safetensors file whose tensor names, dtypes and shapes are known in advance.

    The header goes first with every offset computed up front, then each tensor's bytes are appended in
    plan order as it is produced, so the writer never holds more than the tensor being written.
    """

    def __init__(self, path: str | Path, plan: list[tuple[str, torch.dtype, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self.plan = plan
        header: dict[str, object] = {"__metadata__": dict(metadata or {"format": "pt"})}
        offset = 0
        for name, dtype, shape in plan:
            n = dtype.itemsize * math.prod(shape)
            header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self._f = open(self.path, "wb")
        self._f.write(struct.pack("<Q", len(raw)) + raw)
        self._next = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        want_name, want_dtype, want_shape = self.plan[self._next]
        if name != want_name or tensor.dtype != want_dtype or tuple(tensor.shape) != want_shape:
            raise ValueError(f"writer expected {want_name} {want_dtype} {want_shape}, got {name} "
                             f"{tensor.dtype} {tuple(tensor.shape)}")
        t = tensor.detach().contiguous().cpu()
        if t.numel():
            # view as bytes to write without a copy; safetensors is little-endian like every host we run on
            self._f.write(memoryview(t.view(torch.uint8).reshape(-1).numpy()))
        self._next += 1

    def close(self) -> None:
        if self._next != len(self.plan):
            self._f.close()
            raise ValueError(f"{self.path}: {len(self.plan) - self._next} planned tensors were never written")
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
