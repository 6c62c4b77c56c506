"""`malleable inspect`: what a checkpoint, a PEFT adapter or a GGUF file holds, from headers only."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

from malleable.errors import InputError
from malleable.io.adapter import is_adapter, read_adapter
from malleable.io.checkpoint import Checkpoint
from malleable.io.gguf import read_gguf


def _dtype_counts(dtypes) -> dict[str, int]:
    return dict(Counter(str(d).removeprefix("torch.") for d in dtypes))


def inspect_path(path: Path) -> dict:
    if not path.exists():
        raise InputError(f"{path}: no such file or directory")
    if path.suffix == ".gguf" and not path.is_dir():
        return _inspect_gguf(path)
    if is_adapter(path):
        a = read_adapter(path)
        cfg = a.config
        ranks = Counter(d.rank for d in a.deltas.values())
        return {
            "kind": "lora-adapter",
            "path": str(path),
            "base_model": a.base_model,
            "r": cfg.get("r"),
            "lora_alpha": cfg.get("lora_alpha"),
            "use_rslora": bool(cfg.get("use_rslora")),
            "target_modules": cfg.get("target_modules"),
            "rank_pattern": cfg.get("rank_pattern") or {},
            "alpha_pattern": cfg.get("alpha_pattern") or {},
            "modules": len(a.deltas),
            "ranks": {str(k): v for k, v in sorted(ranks.items())},
            "parameters": sum(d.A.numel() + d.B.numel() for d in a.deltas.values()),
            "dtypes": _dtype_counts(t.dtype for d in a.deltas.values() for t in (d.A, d.B)),
            "bytes": sum(f.stat().st_size for f in a.files),
        }
    ck = Checkpoint(path, allow_pickle=False)
    cfg = ck.config or {}
    return {
        "kind": "checkpoint",
        "path": str(path),
        "architecture": (cfg.get("architectures") or [None])[0],
        "model_type": cfg.get("model_type"),
        "layers": cfg.get("num_hidden_layers"),
        "hidden_size": cfg.get("hidden_size"),
        "vocab_size": cfg.get("vocab_size"),
        "tensors": len(ck.meta),
        "parameters": sum(math.prod(m.shape) for m in ck.meta.values()),
        "dtypes": _dtype_counts(m.dtype for m in ck.meta.values()),
        "shards": ck.shards,
        "bytes": ck.nbytes,
    }


def _inspect_gguf(path: Path) -> dict:
    r = read_gguf(path)
    arch = r.fields.get("general.architecture")
    arch_name = bytes(arch.parts[arch.data[0]]).decode() if arch else None
    return {
        "kind": "gguf",
        "path": str(path),
        "architecture": arch_name,
        "tensors": len(r.tensors),
        "parameters": int(sum(int(t.n_elements) for t in r.tensors)),
        "quantizations": dict(Counter(t.tensor_type.name for t in r.tensors)),
        "bytes": path.stat().st_size,
    }
