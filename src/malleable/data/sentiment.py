"""Movie-review sentiment from gensim's test data `pang_lee_polarity.cor`: 200 sentences (100 positive, 100
negative; latin-1), each line `__label__pos text` or `__label__neg text`. A record is
`{"prompt": "Review: simplistic , silly and tedious .\nIs this review positive or negative?",
"completion": " negative", "choices": [" positive", " negative"]}`.
"""

from __future__ import annotations

from pathlib import Path

from malleable.data.files import gensim_file
from malleable.errors import InputError

FILE = "pang_lee_polarity.cor"
LABELS = {"__label__pos": "positive", "__label__neg": "negative"}
CHOICES = [" positive", " negative"]


def polarity_sentences(path: str | Path | None = None) -> list[tuple[str, str]]:
    """(sentence, "positive" | "negative") in the file's order."""
    path = Path(path) if path is not None else gensim_file(FILE)
    out = []
    with open(path, encoding="latin-1") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            label, _, text = line.strip().partition(" ")
            if label not in LABELS or not text.strip():
                raise InputError(f"{path}:{lineno}: expected '__label__pos' or '__label__neg' and a sentence")
            out.append((text.strip(), LABELS[label]))
    return out


def sentiment_records(path: str | Path | None = None) -> list[dict]:
    """Every sentence as a two-choice record (positive / negative)."""
    return [{"prompt": f"Review: {text}\nIs this review positive or negative?", "completion": " " + label,
             "choices": list(CHOICES)} for text, label in polarity_sentences(path)]
