"""Trivia questions from chatterbot-corpus (`pip install --no-deps chatterbot-corpus`): its English
`trivia.yml`, 260 question / answer pairs (one malformed entry, a lone string, is left out). A record is
`{"prompt": "Who was the 37th President of the United States?", "completion": "Richard Nixon"}`; answers keep
the corpus's text less a final full stop.
"""

from __future__ import annotations

from pathlib import Path

from malleable.errors import InputError

INSTALL = "pip install --no-deps chatterbot-corpus"


def trivia_path() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None or not spec.origin:
        raise InputError(f"chatterbot-corpus is not installed ({INSTALL})")
    path = Path(spec.origin).parent / "data" / "english" / "trivia.yml"
    if not path.is_file():
        raise InputError(f"{path}: no such file; reinstall chatterbot-corpus ({INSTALL} --force-reinstall)")
    return path


def trivia_records(path: str | Path | None = None) -> list[dict]:
    """The corpus's trivia pairs as {prompt, completion}, in the file's order."""
    import yaml

    path = Path(path) if path is not None else trivia_path()
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise InputError(f"{path}: not a readable chatterbot-corpus YAML file ({e.__class__.__name__})") from None
    pairs = data.get("conversations") if isinstance(data, dict) else None
    if not isinstance(pairs, list):
        raise InputError(f"{path}: no 'conversations' list")
    out = []
    for pair in pairs:
        if isinstance(pair, list) and len(pair) == 2 and all(str(x).strip() for x in pair):
            question, answer = (" ".join(str(x).split()) for x in pair)
            out.append({"prompt": question, "completion": answer.rstrip(".").strip()})
    return out
