"""Contrast pairs for `steer`, built from offline text in gensim's test data (`pip install gensim`).

- `sentiment`: pang_lee_polarity.cor (Pang & Lee's movie-review sentences, 100 labelled positive and 100
  negative, latin-1, lower-cased and tokenised with spaces). Pair i is one review prompt (cycling through
  PROMPTS) continued by the i-th positive sentence and by the i-th negative sentence, both lists shuffled with
  the seed; the positive is the completion with the positive label.
- `news`: a topic concept, plain-text pairs (empty prompt): a sentence of Lee's news corpus
  (lee_background.cor, Australian news, 2001) against a sentence of the review corpus (either label). The news
  sentences are lower-cased and their punctuation spaced out the way the review sentences are, so that the
  pairs differ in topic, not in casing or tokenisation; sentences of 6..40 words only.

Train and validation pairs share no sentence: the pairs are split after shuffling, `validation` of them held out.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

from malleable.data.files import gensim_file
from malleable.errors import RecipeError

NEWS = "lee_background.cor"
PROMPTS = ("Review of the film:", "What I thought of the movie:", "The critic wrote:", "My verdict:",
           "In one sentence, the film is")
CONCEPTS = ("sentiment", "news")


def polarity_sentences() -> dict[str, list[str]]:
    """{"pos": [...], "neg": [...]}: the review sentences by label, in file order."""
    from malleable.data.sentiment import polarity_sentences as labelled

    out: dict[str, list[str]] = {"pos": [], "neg": []}
    for text, label in labelled():
        out[label[:3]].append(text)
    return out


def news_sentences(min_words: int = 6, max_words: int = 40) -> list[str]:
    """Lee's news sentences, lower-cased, punctuation spaced out as in the review corpus."""
    text = gensim_file(NEWS).read_text(encoding="utf-8", errors="replace")
    out = []
    for s in re.split(r"(?<=[.!?])\s+", text):
        s = re.sub(r"([,.!?;:()\"])", r" \1 ", s.lower())
        s = " ".join(s.split())
        if min_words <= len(s.split()) <= max_words:
            out.append(s)
    return out


def contrast_pairs(concept: str, seed: int = 0, validation: float = 0.2, limit: int | None = None
                   ) -> dict[str, list[dict]]:
    """{"train": rows, "validation": rows} of {prompt, positive, negative} for `concept` (see the module doc)."""
    if concept not in CONCEPTS:
        raise RecipeError(f"concept: '{concept}' is not one of {list(CONCEPTS)}")
    if not 0 < validation < 1:
        raise RecipeError(f"validation: {validation} must be between 0 and 1")
    rng = random.Random(seed)
    reviews = polarity_sentences()
    if concept == "sentiment":
        pos, neg = reviews["pos"][:], reviews["neg"][:]
        rng.shuffle(pos)
        rng.shuffle(neg)
        rows = [{"prompt": PROMPTS[i % len(PROMPTS)], "positive": f" {p}", "negative": f" {n}"}
                for i, (p, n) in enumerate(zip(pos, neg))]
    else:
        news, other = news_sentences(), reviews["pos"] + reviews["neg"]
        rng.shuffle(news)
        rng.shuffle(other)
        rows = [{"prompt": "", "positive": p, "negative": n} for p, n in zip(news, other)]
    rows = rows[:limit] if limit else rows
    k = max(1, round(len(rows) * validation))
    return {"train": rows[k:], "validation": rows[:k]}


def write_contrast_pairs(concept: str, folder: str | Path, seed: int = 0, validation: float = 0.2,
                         limit: int | None = None) -> dict[str, Path]:
    """Write `<concept>.train.jsonl` and `<concept>.validation.jsonl` in `folder` (the steer recipe's data)."""
    from malleable.data.files import write_jsonl

    parts = contrast_pairs(concept, seed, validation, limit)
    return {s: write_jsonl(Path(folder) / f"{concept}.{s}.jsonl", rows) for s, rows in parts.items()}
