"""Contrast pairs for `steer`, built from offline text: gensim's test data (`pip install gensim`) and
chatterbot-corpus.

- `sentiment`: pang_lee_polarity.cor (Pang & Lee's movie-review sentences, 100 labelled positive and 100
  negative, latin-1, lower-cased and tokenised with spaces). Pair i is one review prompt (cycling through
  PROMPTS) continued by the i-th positive sentence and by the i-th negative sentence, both lists shuffled with
  the seed; the positive is the completion with the positive label.
- `news`: a topic concept, plain-text pairs (empty prompt): a sentence of Lee's news corpus
  (lee_background.cor, Australian news, 2001) against a sentence of the review corpus (either label). The news
  sentences are lower-cased and their punctuation spaced out the way the review sentences are, so that the
  pairs differ in topic, not in casing or tokenisation; sentences of 6..40 words only.
- `register`: a register concept, plain-text pairs: an encyclopedic sentence (gensim's para2para_text1.txt and
  para2para_text2.txt, Wikipedia's articles on New York and Berlin, citation marks such as "[1]" removed; 6..40
  words) against a conversational line (chatterbot-corpus's conversations, greetings, humor, gossip and emotion
  files, `pip install --no-deps chatterbot-corpus`; 4..40 words, each distinct line once). Both keep their own
  casing and punctuation, which are part of a register. Chat lines are shorter (9 words on average against 19),
  and PrefOdds compares whole-sequence likelihoods, so each sentence is paired with the unused chat line nearest
  its word count (pairs then average 19 and 13 words): less of the preference is length.

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
ENCYCLOPEDIC = ("para2para_text1.txt", "para2para_text2.txt")
CHAT = ("conversations", "greetings", "humor", "gossip", "emotion")
CONCEPTS = ("sentiment", "news", "register")


def polarity_sentences() -> dict[str, list[str]]:
    """{"pos": [...], "neg": [...]}: the review sentences by label, in file order."""
    from malleable.data.sentiment import polarity_sentences as labelled

    out: dict[str, list[str]] = {"pos": [], "neg": []}
    for text, label in labelled():
        out[label[:3]].append(text)
    return out


def sentences(text: str, min_words: int, max_words: int, normalise=lambda s: s) -> list[str]:
    """The text's sentences (split after . ! ?), each normalised, whitespace collapsed, kept when its word count
    is in min_words..max_words, in text order."""
    out = []
    for s in re.split(r"(?<=[.!?])\s+", text):
        s = " ".join(normalise(s).split())
        if min_words <= len(s.split()) <= max_words:
            out.append(s)
    return out


def news_sentences(min_words: int = 6, max_words: int = 40) -> list[str]:
    """Lee's news sentences, lower-cased, punctuation spaced out as in the review corpus."""
    text = gensim_file(NEWS).read_text(encoding="utf-8", errors="replace")
    return sentences(text, min_words, max_words, lambda s: re.sub(r"([,.!?;:()\"])", r" \1 ", s.lower()))


def encyclopedic_sentences(min_words: int = 6, max_words: int = 40) -> list[str]:
    """The para2para texts' sentences, citation marks removed, in file order."""
    text = "\n".join(gensim_file(name).read_text(encoding="utf-8", errors="replace") for name in ENCYCLOPEDIC)
    return sentences(re.sub(r"\[\d+\]", "", text), min_words, max_words)


def chat_lines(min_words: int = 4, max_words: int = 40) -> list[str]:
    """The distinct lines of chatterbot-corpus's conversational files, sorted."""
    from malleable.data.chatterbot import category_path, conversations

    lines = {" ".join(str(line).split()) for c in CHAT for conv in conversations(category_path(c))
             if isinstance(conv, list) for line in conv}
    return sorted(x for x in lines if min_words <= len(x.split()) <= max_words)


def length_matched(text: str, pool: list[str]) -> str:
    """Remove and return the line of `pool` nearest `text` in word count (the first such in the pool's order)."""
    words = len(text.split())
    return pool.pop(min(range(len(pool)), key=lambda i: abs(len(pool[i].split()) - words)))


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
        pos, neg = ((news_sentences(), reviews["pos"] + reviews["neg"]) if concept == "news"
                    else (encyclopedic_sentences(), chat_lines()))
        rng.shuffle(pos)
        rng.shuffle(neg)
        if concept == "register":
            pool = neg
            neg = [length_matched(p, pool) for p in pos[:len(pool)]]
        rows = [{"prompt": "", "positive": p, "negative": n} for p, n in zip(pos, neg)]
    rows = rows[:limit] if limit else rows
    k = max(1, round(len(rows) * validation))
    return {"train": rows[k:], "validation": rows[:k]}


def write_contrast_pairs(concept: str, folder: str | Path, seed: int = 0, validation: float = 0.2,
                         limit: int | None = None) -> dict[str, Path]:
    """Write `<concept>.train.jsonl` and `<concept>.validation.jsonl` in `folder` (the steer recipe's data)."""
    from malleable.data.files import write_jsonl

    parts = contrast_pairs(concept, seed, validation, limit)
    return {s: write_jsonl(Path(folder) / f"{concept}.{s}.jsonl", rows) for s, rows in parts.items()}
