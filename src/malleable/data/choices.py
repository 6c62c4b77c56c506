"""Question/answer records turned into multiple-choice rows for `route build` (metric `choice`).

A record's distractors are the gold answers of other records of the same task (drawn by a seeded
`random.Random`, never equal to the gold up to case and spaces), so a model must know which answer belongs to
this question, not which answer looks like the kind asked for. Every choice is written with one leading space:
a choice continues the prompt text, as the zoo's completions do. A row is
`{"prompt": ..., "completion": " Greece", "choices": [" Peru", " Greece"]}` (the gold among the choices, their
order shuffled).
"""

from __future__ import annotations

import random

from malleable.errors import InputError


def _key(text: str) -> str:
    return " ".join(text.lower().split())


def multiple_choice(records: list[dict], k: int = 2, seed: int = 0) -> list[dict]:
    """`records` ({prompt, completion}) with `k` choices each: the gold and k - 1 other golds of `records`."""
    golds: dict[str, str] = {}  # one spelling per answer: the first seen
    for r in records:
        golds.setdefault(_key(r["completion"]), " " + r["completion"].strip())
    if k < 2 or len(golds) < k:
        raise InputError(f"multiple choice: {len(golds)} distinct answers, too few for {k} choices per question")
    rng = random.Random(seed)
    pool = sorted(golds)
    out = []
    for r in records:
        gold = _key(r["completion"])
        others = rng.sample([g for g in pool if g != gold], k - 1)
        choices = [golds[g] for g in others] + [golds[gold]]
        rng.shuffle(choices)
        out.append({"prompt": r["prompt"], "completion": golds[gold], "choices": choices})
    return out
