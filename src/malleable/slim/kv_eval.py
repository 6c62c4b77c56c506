"""What a KV-cache eviction costs and saves, measured against the full cache of the same model in one run:
the next tokens' NLL and their KL divergence from the full cache's predictions after a long prefill, a synthetic
needle-in-a-haystack retrieval rate, and the KV memory kept.

* Quality: `windows` windows of the held-out text, each `context` tokens (evicted after the prefill) followed by
  `continuation` tokens teacher forced one at a time at their original positions (evict.continuation_logits),
  windows `context + continuation + 112` tokens apart (1,200 at the defaults, as bench/slim_kv.py has measured).
* Retrieval: "The secret number is NNNN." (4 random digits from `seed`) put at 10%, 50% and 90% of a
  `haystack`-token stretch of the same text, then " What is the secret number? The secret number is" and 5
  greedy tokens; found when the digits are in the answer. The haystack with its needle is evicted, the question
  is not (kvpress's pipeline), unless the eviction also runs while decoding.
* KV memory: 2 (keys and values) x layers x KV heads x positions x head_dim x the cache's element size, for the
  `context` positions of a quality window: the full cache against the kept one.
"""

from __future__ import annotations

import random
import statistics
import time

import torch

from malleable.evaluate.kv_cache import continuation_nll, mean_kl, needle_found
from malleable.slim.evict import EvictionPolicy, continuation_logits, greedy_answer, n_kept

DEPTHS = (0.1, 0.5, 0.9)
QUESTION = " What is the secret number? The secret number is"
ANSWER_TOKENS = 5


def stride(context: int, continuation: int) -> int:
    return context + continuation + 112


def tokens_needed(context: int, continuation: int, windows: int, haystack: int, needles: int) -> int:
    """How many tokens of text the quality windows and the haystacks need."""
    step = stride(context, continuation)
    return max((windows - 1) * step + context + continuation, (needles - 1) * step + haystack if needles else 0)


def quality(model, ids: torch.Tensor, policy: EvictionPolicy, size: dict, *, context: int, continuation: int,
            windows: int, kept: list | None = None) -> list[dict]:
    """One row per window: the continuation's NLL with the full cache and with the evicted one, the KL of the
    evicted predictions from the full cache's, and the seconds each took. `kept`, when given, receives each
    window's kept positions per layer ({layer: (batch, kv_heads, n)})."""
    rows = []
    for w in range(windows):
        start = w * stride(context, continuation)
        c = ids[start:start + context].unsqueeze(0)
        t = ids[start + context:start + context + continuation].unsqueeze(0)
        clock = time.perf_counter()
        full = continuation_logits(model, c, t)
        full_s = time.perf_counter() - clock
        layers: dict = {}
        clock = time.perf_counter()
        evicted = continuation_logits(model, c, t, policy, kept=layers, **size)
        rows.append({"window": w, "nll_full": continuation_nll(full, t), "nll": continuation_nll(evicted, t),
                     "kl": mean_kl(full, evicted), "seconds_full": full_s, "seconds": time.perf_counter() - clock})
        if kept is not None:
            kept.append(layers)
    return rows


def needles(model, tokenizer, ids: torch.Tensor, policy: EvictionPolicy | None, size: dict, *, haystack: int,
            per_depth: int, context: int, continuation: int, seed: int = 0) -> list[dict]:
    """One row per needle (depth, number, answer, found) with `policy` (None: the full cache)."""
    rng = random.Random(seed)
    question = torch.tensor([tokenizer(QUESTION, add_special_tokens=False).input_ids])
    eos = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    rows = []
    for depth in DEPTHS:
        for k in range(per_depth):
            number = f"{rng.randrange(1000, 10000)}"
            needle = tokenizer(f" The secret number is {number}.", add_special_tokens=False).input_ids
            start, cut = k * stride(context, continuation), int(depth * haystack)
            hay = ids[start:start + haystack].tolist()
            text = torch.tensor([hay[:cut] + needle + hay[cut:]])
            answer = tokenizer.decode(greedy_answer(model, text, question, ANSWER_TOKENS, eos, policy,
                                                    **(size if policy is not None else {})))
            rows.append({"depth": depth, "number": number, "answer": answer, "found": needle_found(answer, number)})
    return rows


def kv_bytes(config, positions: int, element_size: int) -> int:
    """Bytes of keys and values for `positions` cached positions in every layer."""
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    return 2 * cfg.num_hidden_layers * kv_heads * positions * head_dim * element_size


def measure(model, tokenizer, ids: torch.Tensor, policy: EvictionPolicy, size: dict, *, context: int,
            continuation: int, windows: int, haystack: int, per_depth: int, seed: int = 0) -> dict:
    """The full cache against the evicted one on the same model: summary and per-window / per-needle rows."""
    q = quality(model, ids, policy, size, context=context, continuation=continuation, windows=windows)
    found = {name: needles(model, tokenizer, ids, p, size, haystack=haystack, per_depth=per_depth,
                           context=context, continuation=continuation, seed=seed)
             for name, p in (("full", None), ("evicted", policy))} if per_depth else {"full": [], "evicted": []}
    element = next(model.parameters()).element_size()
    kept = n_kept(context, size.get("ratio"), size.get("budget"))

    def rate(rows):
        return sum(r["found"] for r in rows) / len(rows) if rows else None

    summary = {"full": {"kv_bytes": kv_bytes(model.config, context, element),
                        "nll": statistics.mean(r["nll_full"] for r in q), "kl": 0.0,
                        "needle": rate(found["full"]), "seconds": statistics.median(r["seconds_full"] for r in q)},
               "evicted": {"kv_bytes": kv_bytes(model.config, kept, element),
                           "nll": statistics.mean(r["nll"] for r in q), "kl": statistics.mean(r["kl"] for r in q),
                           "needle": rate(found["evicted"]), "seconds": statistics.median(r["seconds"] for r in q)}}
    return {"kept_positions": kept, "context": context, "continuation": continuation, "windows": windows,
            "haystack": haystack, "needles": len(found["evicted"]), "summary": summary, "windows_rows": q,
            "needle_rows": found}
