"""`slim`: make a model cheaper to run: prune weights (magnitude, Wanda, SparseGPT; unstructured or N:M),
remove whole decoder layers (ShortGPT) or learn which tokens skip which modules (SkipGPT), and measure what it
cost in quality and what it saved; or evict KV-cache positions at generation time (evict.py: StreamingLLM,
SnapKV, H2O, key norm).

Methods register by name in registry.py (one file each); the engine (engine.py) calibrates, applies the method,
writes a checkpoint that loads with `from_pretrained`, and reports the dense and slimmed model side by side.
Eviction policies register in evict.py's own registry (they change no weight: they act on a generation's cache).
"""

from malleable.slim import (h2o, knorm, magnitude, shortgpt, skipgpt, snapkv, sparsegpt,  # noqa: F401
                           streaming_llm, wanda)
# (importing them registers the methods and the eviction policies)
from malleable.slim.registry import METHODS, LayerRemover, Pattern, WeightPruner, get_method, slim_method

__all__ = ["METHODS", "LayerRemover", "Pattern", "WeightPruner", "get_method", "slim_method"]
