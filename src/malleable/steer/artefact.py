"""The steering artefact: `steering.safetensors` (one tensor per steered layer, `layers.<i>`) and
`steering.json` (what it was made from and for), in one folder beside the report.

steering.json: schema, form ("vector"; SPLIT's LoRA and local-weight forms come with their own), method and
its parameters, the model it was read from (path, architecture, model_type, hidden_size, num_hidden_layers),
layers, default_strength, read_position and intervene. A vector is (hidden,) for an addition at every position
or (positions, hidden) for ActAdd's addition over the first positions. Another form keeps several named tensors
per layer, `layers.<i>.<name>` (SPLIT's LoRA: A and B; its local weight edit: weight and bias); the form's
applier checks their shapes against the model.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from malleable.errors import InputError

SCHEMA = "malleable.steer.artefact/1"
WEIGHTS = "steering.safetensors"
CONFIG = "steering.json"


@dataclass
class Artefact:
    vectors: dict[int, torch.Tensor | dict[str, torch.Tensor]]  # per layer: a vector, or a form's named tensors
    config: dict
    path: Path | None = field(default=None)

    @property
    def form(self) -> str:
        return self.config.get("form", "vector")

    @property
    def default_strength(self) -> float:
        return float(self.config["default_strength"])

    def where(self) -> str:
        return str(self.path) if self.path is not None else "steering artefact"


def model_identity(model) -> dict:
    """What an artefact records of the model it was read from, and checks against the model it is applied to."""
    cfg = model.config
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    return {"architecture": (getattr(cfg, "architectures", None) or [type(model).__name__])[0],
            "model_type": cfg.model_type, "hidden_size": int(text.hidden_size),
            "num_hidden_layers": int(text.num_hidden_layers)}


def write_artefact(folder: Path, artefact: Artefact) -> None:
    from safetensors.torch import save_file

    tensors = {}
    for i, v in sorted(artefact.vectors.items()):
        for name, t in (v.items() if isinstance(v, dict) else [("", v)]):
            tensors[f"layers.{i}{'.' + name if name else ''}"] = t.detach().to(torch.float32).contiguous()
    save_file(tensors, str(folder / WEIGHTS), metadata={"schema": SCHEMA})
    (folder / CONFIG).write_text(json.dumps({"schema": SCHEMA, **artefact.config}, indent=2) + "\n")


def load_artefact(path: str | Path) -> Artefact:
    """The artefact in folder `path` (written by `malleable steer`); a damaged or foreign folder is one
    InputError naming the file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    cfg_file, weights = path / CONFIG, path / WEIGHTS
    if not cfg_file.is_file() or not weights.is_file():
        raise InputError(f"{path}: not a steering artefact (needs {CONFIG} and {WEIGHTS})")
    try:
        config = json.loads(cfg_file.read_text(encoding="utf-8"))
        tensors = load_file(str(weights))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, SafetensorError) as e:
        raise InputError(f"{path}: cannot read the steering artefact ({type(e).__name__})") from None
    if not isinstance(config, dict) or config.get("schema") != SCHEMA:
        raise InputError(f"{cfg_file}: not a steering config (schema {SCHEMA})")
    for key in ("layers", "default_strength", "model", "method"):
        if key not in config:
            raise InputError(f"{cfg_file}: missing '{key}'")
    hidden = config["model"].get("hidden_size") if isinstance(config["model"], dict) else None
    strength = config["default_strength"]
    if not isinstance(strength, (int, float)) or not math.isfinite(strength):
        raise InputError(f"{cfg_file}: default_strength must be a finite number")
    if config.get("form", "vector") != "vector":
        return Artefact(_named_tensors(config, tensors, weights), config, path)
    vectors = {}
    for i in config["layers"]:
        t = tensors.get(f"layers.{i}")
        if not isinstance(i, int) or t is None:
            raise InputError(f"{weights}: no tensor layers.{i} for layer {i!r} of {CONFIG}")
        if t.shape[-1] != hidden or t.dim() not in (1, 2) or not torch.isfinite(t).all():
            raise InputError(f"{weights}: layers.{i} has shape {list(t.shape)} or non-finite values; expected "
                             f"finite (…, {hidden})")
        vectors[i] = t
    return Artefact(vectors, config, path)


def _named_tensors(config: dict, tensors: dict, weights: Path) -> dict[int, dict[str, torch.Tensor]]:
    """A non-vector form's tensors by layer, `layers.<i>.<name>`: each layer has some, all finite."""
    out = {}
    for i in config["layers"]:
        prefix = f"layers.{i}."
        named = {k[len(prefix):]: t for k, t in tensors.items() if k.startswith(prefix)} if isinstance(i, int) else {}
        if not named:
            raise InputError(f"{weights}: no tensors layers.{i}.* for layer {i!r} of {CONFIG}")
        for name, t in named.items():
            if not torch.isfinite(t).all():
                raise InputError(f"{weights}: {prefix}{name} has non-finite values")
        out[i] = named
    return out


def check_compatible(artefact: Artefact, model) -> None:
    """Refuse a model of another architecture or hidden size than the one the artefact was read from, or one with
    too few layers."""
    want, have = artefact.config["model"], model_identity(model)
    for key in ("architecture", "hidden_size"):
        if want.get(key) != have[key]:
            raise InputError(f"{artefact.where()}: read from a model with {key} {want.get(key)!r}, applied to one "
                             f"with {have[key]!r}")
    top = max(artefact.vectors)
    if top >= have["num_hidden_layers"]:
        raise InputError(f"{artefact.where()}: steers layer {top}, the model has {have['num_hidden_layers']} layers")
