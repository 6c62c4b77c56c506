"""Exact match of greedy generations against gold completions (word-relation QA, the zoo's metric)."""

from __future__ import annotations

import re

import torch

from malleable.learn.data import encode_prompts


_EDGE = re.compile(r"^[\W_]+|[\W_]+$")


def normalise(text: str) -> str:
    """Lower case, single spaces, no leading or trailing punctuation."""
    return _EDGE.sub("", " ".join(text.lower().split()))


def is_match(generated: str, gold: str) -> bool:
    """True when the generated text starts with the gold answer as a whole word (case and punctuation aside)."""
    pred, gold = normalise(generated), normalise(gold)
    return pred == gold or (pred.startswith(gold) and not pred[len(gold)].isalnum())


def mentions(generated: str, gold: str) -> bool:
    """True when the gold answer appears anywhere in the generated text as a whole word or phrase (case and
    punctuation aside): the lenient score for a model that answers in a sentence ("Athens is the capital of
    Greece.") rather than with the word alone."""
    pred, gold = normalise(generated), normalise(gold)
    return re.search(rf"(?<![\w]){re.escape(gold)}(?![\w])", pred) is not None


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], *, max_new_tokens: int | list[int] = 8,
             batch_size: int = 16, chat: bool = True, adapter_names: list[str] | None = None) -> list[str]:
    """Greedy completions of chat prompts (with `chat=False`, of the plain prompts, special tokens added as
    `encode_pair` does), batched with left padding. `max_new_tokens` may be one budget per prompt: a batch runs
    to its largest and each row is cut at its own (greedy, so the same tokens). `adapter_names` (one per
    prompt) is passed on to a PeftModel's mixed-batch generation: each row runs with its own adapter
    ("__base__": none)."""
    budgets = max_new_tokens if isinstance(max_new_tokens, list) else [max_new_tokens] * len(prompts)
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    outputs = []
    try:
        for i in range(0, len(prompts), batch_size):
            batch = encode_prompts(tokenizer, prompts[i : i + batch_size], chat, return_tensors="pt",
                                   padding=True).to(model.device)
            limits = budgets[i : i + batch_size]
            mixed = {} if adapter_names is None else {"adapter_names": adapter_names[i : i + batch_size]}
            out = model.generate(
                **batch,
                max_new_tokens=max(limits),
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
                **mixed,
            )
            new = out[:, batch["input_ids"].shape[1] :]
            outputs += tokenizer.batch_decode([row[:n] for row, n in zip(new, limits)], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return outputs


def exact_match(model, tokenizer, records: list[dict], **generate_kwargs) -> tuple[float, list[str]]:
    """(accuracy, generations) of greedy completions of `records` against their `completion`."""
    model.eval()
    generations = generate(model, tokenizer, [r["prompt"] for r in records], **generate_kwargs)
    hits = sum(is_match(g, r["completion"]) for g, r in zip(generations, records, strict=True))
    return hits / max(1, len(records)), generations
