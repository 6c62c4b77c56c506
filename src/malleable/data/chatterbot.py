"""chatterbot-corpus (`pip install --no-deps chatterbot-corpus`): English conversations in YAML files, one per
category (trivia, greetings, humor, ...). Each file holds a `conversations` list of conversations, each a list
of lines; some entries are malformed (a lone string), and callers skip what they cannot use.
"""

from __future__ import annotations

from pathlib import Path

from malleable.errors import InputError

INSTALL = "pip install --no-deps chatterbot-corpus"


def category_path(category: str) -> Path:
    """The installed English `<category>.yml`; an InputError saying how to install it when it is missing."""
    import importlib.util

    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None or not spec.origin:
        raise InputError(f"chatterbot-corpus is not installed ({INSTALL})")
    path = Path(spec.origin).parent / "data" / "english" / f"{category}.yml"
    if not path.is_file():
        raise InputError(f"{path}: no such file; reinstall chatterbot-corpus ({INSTALL} --force-reinstall)")
    return path


def conversations(path: str | Path) -> list:
    """A corpus file's `conversations` list, as the YAML holds it."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise InputError(f"{path}: not a readable chatterbot-corpus YAML file ({e.__class__.__name__})") from None
    found = data.get("conversations") if isinstance(data, dict) else None
    if not isinstance(found, list):
        raise InputError(f"{path}: no 'conversations' list")
    return found
