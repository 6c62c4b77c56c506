"""`learn`: one training loop (engine.py) and the methods registered with `@learn_method`."""

from malleable.learn import bilora, full, lora, lora_sam, memft, sparse_full, zo  # noqa: F401  (registration)
from malleable.learn.registry import METHODS, Method, get_method, learn_method

__all__ = ["METHODS", "Method", "get_method", "learn_method"]
