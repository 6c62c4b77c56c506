"""The relearning attack (Lynch et al., 2024; open-unlearning's relearning evaluation): fine-tune a copy of an
unlearned model on a small share of its forget set and measure how much of the REST comes back.

It trains, so it lives here, above the `forget` verb whose loop it borrows, not in `evaluate/` (pure
metrics); `audit` and both forget protocols call it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch

from malleable.evaluate.llm_forget import RELEARN_METRICS, evaluate_set
from malleable.evaluate.unlearning import evidence
from malleable.forget.engine import fit
from malleable.learn.data import collate as pad_batch
from malleable.learn.data import encode_pair, uses_chat_template


def relearn(model: torch.nn.Module, forget: Sequence, collate: Callable, *, fraction: float = 0.1, steps: int = 10,
            lr: float = 1e-4, batch_size: int = 8, seed: int = 0,
            measure: Callable[[torch.nn.Module, list], dict] | None = None) -> dict:
    """The relearning attack: fine-tune a copy on a small part of the forget set, then measure the REST of it.

    An adapter is merged first so the attacker trains every weight. Returns the held-back forget rows' evidence
    before and after the attack; `measure(model, rows)` replaces `evidence` there (a language model's generation
    metrics need the records, not only token ids, so `forget` may be records that `collate` encodes).
    """
    if measure is None:
        def measure(m, rows):
            return evidence(m, {"forget_held_out": rows}, collate, batch_size)["forget_held_out"]

    attacker = copy.deepcopy(model)
    if hasattr(attacker, "merge_and_unload"):
        attacker = attacker.merge_and_unload()
    order = torch.randperm(len(forget), generator=torch.Generator().manual_seed(seed)).tolist()
    n = max(1, round(fraction * len(forget)))
    seen, held = [forget[i] for i in order[:n]], [forget[i] for i in order[n:]] or list(forget)
    before = measure(attacker, held)
    fit(attacker, seen, collate=collate, steps=steps, batch_size=batch_size, lr=lr, optimizer="adamw",
        schedule="constant", weight_decay=0.0, max_grad_norm=1.0, seed=seed)
    after = measure(attacker, held)
    return {"trained_on": n, "measured_on": len(held), "steps": steps, "lr": lr, "before": before, "after": after}


def relearn_forget(model, tokenizer, records: list[dict], *, max_new_tokens: int | str = 32, eval_batch_size: int = 16,
                   **attack) -> dict:
    """`relearn` on forget `records` (keywords `attack`: fraction, steps, lr, batch_size, seed), measured with
    `RELEARN_METRICS` of `evaluate_set` on the held-back records; `model` is not changed."""
    chat = uses_chat_template(tokenizer, "auto")

    def encode(rows: list[dict]) -> dict:
        return pad_batch([encode_pair(tokenizer, r["prompt"], r["completion"], chat) for r in rows],
                         tokenizer.pad_token_id)

    def measure(m, rows: list[dict]) -> dict:
        out = evaluate_set(m, tokenizer, rows, role="forget", max_new_tokens=max_new_tokens,
                           batch_size=eval_batch_size)
        return {k: out[k] for k in RELEARN_METRICS}

    return relearn(model, records, encode, measure=measure, **attack)
