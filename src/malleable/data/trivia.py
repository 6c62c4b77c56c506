"""Trivia questions from chatterbot-corpus (data/chatterbot.py): its English `trivia.yml`, 260 question / answer
pairs (one malformed entry, a lone string, is left out). A record is
`{"prompt": "Who was the 37th President of the United States?", "completion": "Richard Nixon"}`; answers keep
the corpus's text less a final full stop.
"""

from __future__ import annotations

from pathlib import Path

from malleable.data.chatterbot import category_path, conversations


def trivia_path() -> Path:
    return category_path("trivia")


def trivia_records(path: str | Path | None = None) -> list[dict]:
    """The corpus's trivia pairs as {prompt, completion}, in the file's order."""
    out = []
    for pair in conversations(path if path is not None else trivia_path()):
        if isinstance(pair, list) and len(pair) == 2 and all(str(x).strip() for x in pair):
            question, answer = (" ".join(str(x).split()) for x in pair)
            out.append({"prompt": question, "completion": answer.rstrip(".").strip()})
    return out
