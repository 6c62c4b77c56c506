"""`steer`: change a model's behaviour at inference by adding a direction to its residual stream.

Methods register by name in registry.py (one file each); the engine reads contrast pairs and writes the
artefact (a safetensors file with one vector per layer and a JSON config); apply.py adds it at inference
(`with malleable.steer.applied(model, artefact, strength=m): ...`), bakes it into a plain checkpoint, or
exports a llama.cpp control-vector GGUF; peft_export.py writes any bakeable artefact as a PEFT LoRA adapter.
SPLIT's forms (split.py) are trained, through learn's engine, rather than read off the activations; ITI (iti.py)
shifts the outputs of the attention heads its probes pick.
"""

from malleable.steer import (  # noqa: F401  (registers the methods)
    actadd, caa, iti, logistic, pca_center, pca_diff, split_lora, split_vector, split_weight)
from malleable.steer.apply import applied, bake, export_gguf
from malleable.steer.artefact import Artefact, load_artefact
from malleable.steer.registry import METHODS, SteeringMethod, get_method, steering_method

__all__ = ["METHODS", "Artefact", "SteeringMethod", "applied", "bake", "export_gguf", "get_method",
           "load_artefact", "steering_method"]
