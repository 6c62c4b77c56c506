"""GGUF import: a (quantised) GGUF file becomes a plain transformers checkpoint (safetensors) plus tokenizer.

transformers' own GGUF loader does the work (`from_pretrained(dir, gguf_file=name)` de-quantises to fp32);
malleable only checks the input up front, clears the quantisation marker so the model saves as an ordinary
checkpoint, and writes the result atomically.
"""

from __future__ import annotations

import json
from pathlib import Path

from malleable.errors import InputError, reason
from malleable.io.atomic import atomic_dir, check_output
from malleable.io.paths import regular_file
from malleable.io.quiet import quiet_transformers

MAGIC = b"GGUF"
PROVENANCE = "malleable_import.json"


def read_gguf(gguf_file: str | Path):
    """The file parsed by gguf's own reader (a `GGUFReader`), or `InputError`: a damaged file is reported here
    as one line, not deep inside a loader."""
    gguf_file = Path(gguf_file).absolute()
    if not gguf_file.exists():
        raise InputError(f"{gguf_file}: no such file")
    regular_file(gguf_file)
    with open(gguf_file, "rb") as f:
        magic = f.read(4)
    if magic != MAGIC:
        raise InputError(f"{gguf_file}: not a GGUF file (first bytes {magic!r}, expected {MAGIC!r})")
    try:
        from gguf import GGUFReader
    except ImportError:
        raise InputError(f"{gguf_file}: reading GGUF needs the gguf package (pip install gguf)") from None
    try:
        return GGUFReader(gguf_file)
    except Exception as e:  # gguf raises ValueError, struct and numpy errors on bad files
        raise InputError(f"{gguf_file}: not a readable GGUF file ({type(e).__name__})") from None


def import_gguf(gguf_file: str | Path, out: str | Path, force: bool = False, *,
                chat_template: str | None = None) -> Path:
    """Convert `gguf_file` to a transformers checkpoint directory `out`; return `out`.

    The output holds `config.json`, `model.safetensors`, `generation_config.json` and the tokenizer files,
    plus `malleable_import.json` naming the source file. Weights are de-quantised to fp32. `chat_template`
    (jinja) is given to a tokenizer whose GGUF carries none; one the file carries is kept.
    """
    gguf_file = Path(gguf_file).absolute()
    read_gguf(gguf_file)
    out = check_output(out, force, inputs=[gguf_file])

    from transformers import AutoModelForCausalLM, AutoTokenizer

    src, name = str(gguf_file.parent), gguf_file.name
    try:
        with quiet_transformers(stderr=True):
            tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=name)
            model, info = AutoModelForCausalLM.from_pretrained(src, gguf_file=name, output_loading_info=True,
                                                               ignore_mismatched_sizes=True)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # a damaged file makes transformers or tokenizers raise anything, even a Rust panic
        raise InputError(f"{gguf_file}: transformers cannot load this GGUF ({reason(e)})") from None
    # transformers fills a missing or misshapen tensor with random values and carries on
    bad = sorted(info["missing_keys"]) + sorted(k for k, *_ in info["mismatched_keys"])
    if bad:
        raise InputError(f"{gguf_file}: has no usable tensor for '{bad[0]}' (missing or of the wrong shape)")

    # The weights are plain fp32 now; without this, save_pretrained writes a quantised-model marker.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config

    added = chat_template is not None and not getattr(tokenizer, "chat_template", None)
    if added:
        tokenizer.chat_template = chat_template
    with atomic_dir(out, force) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        template = "added by malleable" if added else ("from the file" if tokenizer.chat_template else None)
        meta = {"source": str(gguf_file), "source_bytes": gguf_file.stat().st_size, "format": "gguf",
                "chat_template": template}
        (tmp / PROVENANCE).write_text(json.dumps(meta, indent=2) + "\n")
    return out
