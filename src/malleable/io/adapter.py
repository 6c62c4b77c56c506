"""PEFT LoRA adapters in PEFT's own format: `adapter_config.json` + `adapter_model.safetensors`."""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from malleable.deltas.lowrank import LowRankDelta
from malleable.errors import InputError
from malleable.io.checkpoint import read_json
from malleable.io.paths import contained
from malleable.io.safetensors_file import SafetensorsFile

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")


def is_adapter(path: str | Path) -> bool:
    """A folder with an adapter config, even a broken one, so the adapter reader reports what is wrong with it."""
    return os.path.lexists(Path(path) / CONFIG)


def _pattern(key: str) -> re.Pattern:
    """PEFT's rule: a pattern key matches a module whose name ends with it at a dot boundary."""
    return re.compile(rf"(.*\.)?({key})$")


def _pattern_value(patterns: dict, module: str, default):
    for key, value in patterns.items():
        if _pattern(key).match(module):
            return value
    return default


def lora_scale(config: dict, module: str, rank: int) -> float:
    alpha = _pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", 8))
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check_config(cfg_path: Path, config: dict) -> dict:
    """The config's fields that decide how the factors are read and scaled, checked before any is used: PEFT
    would refuse or misread a config that fails here, and a merge would silently scale by a wrong number."""
    if config.get("peft_type", "LORA") != "LORA":
        raise InputError(f"{cfg_path}: peft_type {config.get('peft_type')} is not LORA")
    r = config.get("r", 8)
    if type(r) is not int or r <= 0:
        raise InputError(f"{cfg_path}: r must be a positive integer, got {r!r}")
    if not _number(config.get("lora_alpha", 8)):
        raise InputError(f"{cfg_path}: lora_alpha must be a finite number, got {config['lora_alpha']!r}")
    for key in ("use_dora", "use_rslora", "fan_in_fan_out"):
        if not isinstance(config.get(key, False), bool):
            raise InputError(f"{cfg_path}: {key} must be true or false, got {config[key]!r}")
    if config.get("use_dora"):
        raise InputError(f"{cfg_path}: use_dora is true; DoRA adapters are not supported")
    for key in ("rank_pattern", "alpha_pattern"):
        patterns = config.get(key) or {}
        if not isinstance(patterns, dict):
            raise InputError(f"{cfg_path}: {key} must map module patterns to numbers")
        for pattern, value in patterns.items():
            try:
                _pattern(pattern)
            except re.error as e:
                raise InputError(f"{cfg_path}: {key} key '{pattern}' is not a valid regular expression ({e})") from None
            if not _number(value) or value <= 0 or (key == "rank_pattern" and type(value) is not int):
                raise InputError(f"{cfg_path}: {key}['{pattern}'] must be a positive number, got {value!r}")
    targets = config.get("target_modules")
    if targets is not None and not isinstance(targets, str) and not (
            isinstance(targets, list) and all(isinstance(t, str) for t in targets)):
        raise InputError(f"{cfg_path}: target_modules must be a string or a list of strings, got {targets!r}")
    return config


@dataclass
class LoraAdapter:
    """A PEFT LoRA adapter as one `LowRankDelta` per adapted module (keys are module names)."""

    path: Path
    config: dict
    deltas: dict[str, LowRankDelta]
    files: list[Path]

    @property
    def base_model(self) -> str | None:
        return self.config.get("base_model_name_or_path")

    @property
    def fan_in_fan_out(self) -> bool:
        """True for GPT-2 style Conv1D layers, whose weight is the transpose of B @ A."""
        return bool(self.config.get("fan_in_fan_out"))

    def weight_name(self, module: str) -> str:
        """The base-model tensor this module's delta is added to."""
        return f"{module}.weight"


def read_adapter(path: str | Path) -> LoraAdapter:
    path = Path(path)
    cfg_path = contained(path, CONFIG, path / CONFIG)
    config = _check_config(cfg_path, read_json(cfg_path))
    weights = contained(path, WEIGHTS, path / WEIGHTS)
    if not weights.exists():
        if os.path.lexists(path / "adapter_model.bin"):
            raise InputError(f"{path / 'adapter_model.bin'}: pickle adapters are refused; save it with "
                             "safe_serialization=True")
        raise InputError(f"{weights}: missing")
    sf = SafetensorsFile(weights)
    factors: dict[str, dict[str, torch.Tensor]] = {}
    for key in sf.tensors:
        m = _KEY.match(key)
        if not m:
            raise InputError(f"{weights}: tensor '{key}' is not a LoRA factor (modules_to_save, DoRA and "
                             "embedding adapters are not supported yet)")
        factors.setdefault(m.group("module"), {})[m.group("ab")] = sf.read(key)
    deltas = {}
    for module, ab in factors.items():
        if set(ab) != {"A", "B"}:
            raise InputError(f"{weights}: module '{module}' has lora_{'A' if 'B' in ab else 'B'} missing")
        A, B = ab["A"], ab["B"]
        if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1]:
            raise InputError(f"{weights}: module '{module}' has factors of shapes {list(B.shape)} and "
                             f"{list(A.shape)} that do not chain")
        rank = _pattern_value(config.get("rank_pattern") or {}, module, config.get("r", 8))
        if A.shape[0] != rank:
            raise InputError(f"{weights}: module '{module}' has factors of rank {A.shape[0]}, but {cfg_path} "
                             f"gives it rank {rank}")
        if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
            raise InputError(f"{weights}: module '{module}' has factors containing NaN or inf")
        deltas[module] = LowRankDelta(B, A, lora_scale(config, module, rank))
    if not deltas:
        raise InputError(f"{weights}: no LoRA factors")
    return LoraAdapter(path, config, deltas, [cfg_path, weights])


def write_adapter(directory: Path, deltas: dict[str, LowRankDelta], like: dict, dtype: torch.dtype,
                  biases: dict[str, torch.Tensor] | None = None, exact_targets: bool = False) -> dict:
    """Write `deltas` as a PEFT adapter into `directory`; returns the config written.

    Scales are folded into the factors and alpha is set equal to each module's rank, so PEFT's scale is
    exactly 1 and `B @ A` is the delta. Modules whose rank differs from the most common one go in
    `rank_pattern` / `alpha_pattern`, which PEFT honours on load. `biases` (module -> (out,) tensor) sets PEFT's
    `lora_bias` (a bias on lora_B, added with the delta; zero for the modules not named). `exact_targets` lists
    the modules' full names as targets (PEFT then wraps only those) instead of their kinds (`q_proj`, ...).
    """
    ranks = {m: d.rank for m, d in deltas.items()}
    r = Counter(ranks.values()).most_common(1)[0][0]
    odd = {m: k for m, k in ranks.items() if k != r}
    keep = {k: like[k] for k in ("base_model_name_or_path", "task_type", "bias", "fan_in_fan_out",
                                 "inference_mode", "revision") if k in like}
    config = {
        **keep,
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": r,
        "use_rslora": False,
        "lora_dropout": 0.0,
        "target_modules": sorted(deltas) if exact_targets else sorted({m.rsplit(".", 1)[-1] for m in deltas}),
        # anchored full module names, so a pattern matches only its own module
        "rank_pattern": {f"^{re.escape(m)}": k for m, k in odd.items()},
        "alpha_pattern": {f"^{re.escape(m)}": k for m, k in odd.items()},
    }
    tensors = {}
    for module, d in deltas.items():
        B, A = d.balanced()
        tensors[f"{PREFIX}{module}.lora_A.weight"] = A.to(dtype).contiguous()
        tensors[f"{PREFIX}{module}.lora_B.weight"] = B.to(dtype).contiguous()
        if biases is not None:
            bias = biases.get(module, torch.zeros(B.shape[0]))
            tensors[f"{PREFIX}{module}.lora_B.bias"] = bias.to(dtype).contiguous()
    if biases is not None:
        config["lora_bias"] = True
    save_file(tensors, str(directory / WEIGHTS), metadata={"format": "pt"})
    (directory / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True))
    return config
