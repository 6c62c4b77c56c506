"""GGUF import: a (quantised) GGUF file becomes a plain transformers checkpoint (safetensors) plus tokenizer.

transformers' own GGUF loader does the work (`from_pretrained(dir, gguf_file=name)` de-quantises to fp32);
malleable only checks the input up front, clears the quantisation marker so the model saves as an ordinary
checkpoint, and writes the result atomically.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from malleable.errors import InputError
from malleable.io.atomic import atomic_dir, check_output

MAGIC = b"GGUF"
PROVENANCE = "malleable_import.json"


def check_gguf(gguf_file: str | Path) -> Path:
    """Return the file's absolute path, or raise `InputError` if it is missing or not a GGUF file."""
    gguf_file = Path(gguf_file).absolute()
    if not gguf_file.is_file():
        raise InputError(f"{gguf_file}: no such file")
    with open(gguf_file, "rb") as f:
        magic = f.read(4)
    if magic != MAGIC:
        raise InputError(f"{gguf_file}: not a GGUF file (first bytes {magic!r}, expected {MAGIC!r})")
    if importlib.util.find_spec("gguf") is None:
        raise InputError(f"{gguf_file}: reading GGUF needs the gguf package (pip install gguf)")
    return gguf_file


def import_gguf(gguf_file: str | Path, out: str | Path, force: bool = False) -> Path:
    """Convert `gguf_file` to a transformers checkpoint directory `out`; return `out`.

    The output holds `config.json`, `model.safetensors`, `generation_config.json` and the tokenizer files,
    plus `malleable_import.json` naming the source file. Weights are de-quantised to fp32.
    """
    gguf_file = check_gguf(gguf_file)
    out = check_output(out, force, inputs=[gguf_file])

    from transformers import AutoModelForCausalLM, AutoTokenizer

    src, name = str(gguf_file.parent), gguf_file.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(src, gguf_file=name)
    except (ValueError, KeyError, NotImplementedError) as e:  # unsupported architecture or tokenizer
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"{gguf_file}: transformers cannot load this GGUF ({first})") from None

    # The weights are plain fp32 now; without this, save_pretrained writes a quantised-model marker.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config

    with atomic_dir(out, force) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        meta = {"source": str(gguf_file), "source_bytes": gguf_file.stat().st_size, "format": "gguf"}
        (tmp / PROVENANCE).write_text(json.dumps(meta, indent=2) + "\n")
    return out
