"""Perplexity of a causal language model over fixed-length token windows, and the cost of running it."""

from __future__ import annotations

import math
import statistics
import time

import torch


@torch.no_grad()
def window_nll(model, windows: torch.Tensor, batch_size: int = 8) -> list[float]:
    """Per window of (windows, seq_len) ids, each on its own (no context carried over): the summed NLL of its
    predicted tokens (every token but the first), in float64."""
    out: list[float] = []
    device = next(model.parameters()).device
    for a in range(0, len(windows), batch_size):
        ids = windows[a:a + batch_size].to(device)
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
        out += nll.double().sum(1).tolist()
    return out


def perplexity(nll: list[float], seq_len: int) -> float:
    """Perplexity over windows of `seq_len` tokens from their summed NLLs (`window_nll`): exp of the mean NLL of
    every predicted token."""
    return math.exp(sum(nll) / (len(nll) * (seq_len - 1)))


@torch.no_grad()
def time_generation(model, prompt: torch.Tensor, new_tokens: int) -> tuple[float, float]:
    """(prefill seconds, decode seconds) of one greedy run: a forward over the (1, L) prompt that fills the KV
    cache, then `new_tokens` single-token forwards reading it (only the last position's logits computed, as
    `generate` does)."""
    import inspect

    key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    device = next(model.parameters()).device
    ids = prompt.to(device)
    t0 = time.perf_counter()
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    t1 = time.perf_counter()
    for _ in range(new_tokens):
        out = model(input_ids=out.logits[:, -1:].argmax(-1), use_cache=True, logits_to_keep=1,
                    **{key: getattr(out, key)})
    return t1 - t0, time.perf_counter() - t1


def speeds(models: dict, prompt: torch.Tensor, new_tokens: int, repeats: int) -> dict[str, dict]:
    """Prefill and decode tokens/s of each model, repeats interleaved (model A, B, A, B, ...) after one untimed
    warm-up run each; medians and every repeat."""
    for m in models.values():
        time_generation(m, prompt, 2)
    runs: dict[str, list] = {k: [] for k in models}
    for _ in range(repeats):
        for name, m in models.items():
            runs[name].append(time_generation(m, prompt, new_tokens))
    out = {}
    for name, rs in runs.items():
        prefill = [prompt.shape[1] / p for p, _ in rs]
        decode = [new_tokens / d for _, d in rs]
        out[name] = {"prefill_tokens_per_s": statistics.median(prefill),
                     "decode_tokens_per_s": statistics.median(decode), "prefill_repeats": prefill,
                     "decode_repeats": decode}
    return out
