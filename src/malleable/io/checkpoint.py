"""Lazy reader for transformers checkpoints: one safetensors file, or shards listed in an index."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from malleable.errors import InputError
from malleable.io.paths import contained, regular_file
from malleable.io.safetensors_file import DTYPES, SafetensorsFile

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"


@dataclass(frozen=True)
class TensorMeta:
    dtype: torch.dtype
    shape: tuple[int, ...]
    shard: str


class Checkpoint:
    """A transformers checkpoint read one tensor at a time.

    Headers of every shard are read and checked when the checkpoint is opened, so a corrupt or truncated
    file is reported before any work starts. `read(name)` returns a fresh CPU tensor.
    """

    def __init__(self, path: str | Path, allow_pickle: bool = False):
        self.path = Path(path)
        if not self.path.exists():
            raise InputError(f"{self.path}: no such file or directory")
        if not self.path.is_dir():
            regular_file(self.path)
        self.root = self.path if self.path.is_dir() else self.path.parent
        self._files: dict[str, SafetensorsFile] = {}
        self._pickled: dict[str, dict[str, torch.Tensor]] = {}
        self.meta: dict[str, TensorMeta] = {}
        self._index: tuple[Path, dict[str, Path]] | None = None
        self.files = self._resolve_files(allow_pickle)
        for f in self.files:
            self._open(f)
        if self._index:
            self._check_index(*self._index)

    # -- discovery -------------------------------------------------------------------------------
    def _resolve_files(self, allow_pickle: bool) -> list[Path]:
        p = self.path
        if p.is_file():
            if p.name.endswith(".index.json"):
                return self._from_index(p, allow_pickle)
            if p.suffix == ".safetensors":
                return [p]
            if p.suffix in {".bin", ".pt", ".pth"}:
                return self._pickle_ok([p], allow_pickle)
            raise InputError(f"{p}: not a safetensors file or checkpoint directory")
        if (p / SAFE_INDEX).exists():
            return self._from_index(contained(p, SAFE_INDEX, p / SAFE_INDEX), allow_pickle)
        if (p / SAFE_SINGLE).exists():
            return [contained(p, SAFE_SINGLE, p / SAFE_SINGLE)]
        if (p / BIN_INDEX).exists():
            return self._from_index(contained(p, BIN_INDEX, p / BIN_INDEX), allow_pickle)
        if (p / BIN_SINGLE).exists():
            return self._pickle_ok([contained(p, BIN_SINGLE, p / BIN_SINGLE)], allow_pickle)
        singles = sorted(p.glob("*.safetensors"))
        if len(singles) == 1:
            return [contained(p, singles[0].name, singles[0])]
        raise InputError(f"{p}: no model.safetensors or {SAFE_INDEX} found")

    def _from_index(self, index: Path, allow_pickle: bool) -> list[Path]:
        """The shards an index names, each kept inside the checkpoint's folder; any shard that is not
        safetensors is a pickle and needs allow_pickle, whatever the index is called."""
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise InputError(f"{index}: weight_map must map tensor names to shard files")
        where = {}
        for tensor, shard in weight_map.items():
            if not isinstance(shard, str):
                raise InputError(f"{index}: weight_map['{tensor}'] is {shard!r}, not a shard file name")
            where[tensor] = contained(self.root, shard, index)
        files = sorted(set(where.values()))
        for f in files:
            if not f.exists():
                raise InputError(f"{index}: shard {f.name} is listed but missing")
        self._index = index, where
        pickled = [f for f in files if f.suffix != ".safetensors"]
        if pickled:
            self._pickle_ok(pickled, allow_pickle)
        return files

    def _check_index(self, index: Path, where: dict[str, Path]) -> None:
        """Every tensor the index lists is in the shard it names, and every shard tensor is listed: a
        checkpoint whose index and shards disagree loads differently in different readers."""
        for tensor, f in where.items():
            held = self.meta.get(tensor)
            if held is None:
                raise InputError(f"{index}: tensor '{tensor}' is listed in {f.name}, but no shard holds it")
            if held.shard != self._key(f):
                raise InputError(f"{index}: tensor '{tensor}' is listed in {self._key(f)}, but {held.shard} holds it")
        unlisted = sorted(set(self.meta) - set(where))
        if unlisted:
            raise InputError(f"{index}: tensor '{unlisted[0]}' in {self.meta[unlisted[0]].shard} is not listed")

    @staticmethod
    def _pickle_ok(files: list[Path], allow_pickle: bool) -> list[Path]:
        if not allow_pickle:
            raise InputError(f"{files[0]}: pickle checkpoint refused (it can run code when loaded); convert it "
                             "to safetensors, or pass --allow-pickle to load it with torch.load(weights_only=True)")
        return files

    def _key(self, f: Path) -> str:
        """A shard's name relative to the checkpoint folder (an index may place shards in subfolders)."""
        return f.relative_to(self.root).as_posix()

    def _open(self, f: Path) -> None:
        key = self._key(f)
        if f.suffix == ".safetensors":
            sf = SafetensorsFile(f)
            self._files[key] = sf
            for name, info in sf.tensors.items():
                self._add(name, TensorMeta(info.dtype, info.shape, key), f)
        else:
            regular_file(f)
            try:
                state = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:  # torch raises many types for a bad or unsafe pickle
                raise InputError(f"{f}: cannot load with weights_only=True ({type(e).__name__})") from None
            if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
                raise InputError(f"{f}: not a state dict (a mapping of names to tensors)")
            self._pickled[key] = state
            for name, t in state.items():
                self._add(name, TensorMeta(t.dtype, tuple(t.shape), key), f)

    def _add(self, name: str, meta: TensorMeta, f: Path) -> None:
        if name in self.meta:
            raise InputError(f"{f}: tensor '{name}' appears in two shards")
        self.meta[name] = meta

    # -- access ----------------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return list(self.meta)

    def read(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """Tensor `name`, into `out` if given (a contiguous buffer of its shape; converted to out's dtype)."""
        shard = self.meta[name].shard
        if shard in self._files:
            return self._files[shard].read(name, out)
        t = self._pickled[shard][name]
        return t.clone() if out is None else out.copy_(t)

    @property
    def config(self) -> dict | None:
        cfg = self.root / "config.json"
        if not cfg.exists():
            return None
        return read_json(contained(self.root, cfg.name, cfg))

    @property
    def nbytes(self) -> int:
        return sum(m.dtype.itemsize * math.prod(m.shape) for m in self.meta.values())

    @property
    def shards(self) -> list[str]:
        return [self._key(f) for f in self.files]


def read_json(path: Path) -> dict:
    """The JSON object in `path`, a regular file of UTF-8 text (what JSON is), or an InputError naming it."""
    try:
        value = json.loads(regular_file(path).read_bytes().decode("utf-8"))
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror})") from None
    except UnicodeDecodeError:
        raise InputError(f"{path}: not UTF-8 text") from None
    except ValueError:
        raise InputError(f"{path}: not valid JSON") from None
    if not isinstance(value, dict):
        raise InputError(f"{path}: not a JSON object")
    return value


def dtype_from_name(name: str) -> torch.dtype:
    """'bfloat16' / 'bf16' / 'BF16' -> torch.bfloat16."""
    aliases = {"float32": "F32", "fp32": "F32", "float16": "F16", "fp16": "F16", "half": "F16",
               "bfloat16": "BF16", "bf16": "BF16", "float64": "F64"}
    key = aliases.get(name.lower(), name.upper())
    if key not in DTYPES or not DTYPES[key].is_floating_point:
        raise ValueError(f"unknown floating dtype '{name}'")
    return DTYPES[key]
