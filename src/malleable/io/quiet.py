"""Quiet transformers loads. Its load report (its logger) and progress bars (its own, and plain stderr from the
libraries under it) would turn a refusal into many lines on stderr; what matters in them becomes malleable's
own one line. Both settings are put back afterwards: they belong to the user's process."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator


@contextlib.contextmanager
def quiet_transformers(stderr: bool = False) -> Iterator[None]:
    """transformers' warnings and progress bars off while the block runs; with `stderr`, anything else written
    to stderr too (GGUF conversion and tokenizers print their own bars)."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with contextlib.redirect_stderr(io.StringIO()) if stderr else contextlib.nullcontext():
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
