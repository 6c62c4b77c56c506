"""PEFT LoRA adapters in PEFT's own format: `adapter_config.json` + `adapter_model.safetensors`."""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from malleable.deltas.lowrank import LowRankDelta
from malleable.errors import InputError
from malleable.io.safetensors_file import SafetensorsFile

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")


def is_adapter(path: str | Path) -> bool:
    return (Path(path) / CONFIG).is_file()


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rule: a pattern key matches a module whose name ends with it at a dot boundary."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def lora_scale(config: dict, module: str, rank: int) -> float:
    alpha = _pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", 8))
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


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
    cfg_path = path / CONFIG
    try:
        config = json.loads(cfg_path.read_text())
    except OSError as e:
        raise InputError(f"{cfg_path}: cannot read ({e.strerror})") from None
    except ValueError:
        raise InputError(f"{cfg_path}: not valid JSON") from None
    if config.get("peft_type", "LORA") != "LORA":
        raise InputError(f"{cfg_path}: peft_type {config.get('peft_type')} is not LORA")
    weights = path / WEIGHTS
    if not weights.exists():
        if (path / "adapter_model.bin").exists():
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
        deltas[module] = LowRankDelta(B, A, lora_scale(config, module, A.shape[0]))
    if not deltas:
        raise InputError(f"{weights}: no LoRA factors")
    return LoraAdapter(path, config, deltas, [cfg_path, weights])


def write_adapter(directory: Path, deltas: dict[str, LowRankDelta], like: dict, dtype: torch.dtype) -> dict:
    """Write `deltas` as a PEFT adapter into `directory`; returns the config written.

    Scales are folded into the factors and alpha is set equal to each module's rank, so PEFT's scale is
    exactly 1 and `B @ A` is the delta. Modules whose rank differs from the most common one go in
    `rank_pattern` / `alpha_pattern`, which PEFT honours on load.
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
        "target_modules": sorted({m.rsplit(".", 1)[-1] for m in deltas}),
        # anchored full module names, so a pattern matches only its own module
        "rank_pattern": {f"^{re.escape(m)}": k for m, k in odd.items()},
        "alpha_pattern": {f"^{re.escape(m)}": k for m, k in odd.items()},
    }
    tensors = {}
    for module, d in deltas.items():
        B, A = d.balanced()
        tensors[f"{PREFIX}{module}.lora_A.weight"] = A.to(dtype).contiguous()
        tensors[f"{PREFIX}{module}.lora_B.weight"] = B.to(dtype).contiguous()
    save_file(tensors, str(directory / WEIGHTS), metadata={"format": "pt"})
    (directory / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True))
    return config
