"""The merged model's chat template (mergekit's `chat_template:`): a built-in name, `auto`, or a Jinja string.

As mergekit does, the tokenizer is loaded from the folder the output's tokenizer files come from, given the
template, and saved again with transformers (which writes the template to chat_template.jinja). `auto` takes the
template most of the inputs share (ties: the first in recipe order, base first). mergekit's built-in names
(chatml, llama3, ...) are refused with a line saying so: those templates are mergekit's files (LGPL-3.0), which this
Apache-2.0 project does not copy; a recipe gives the template's text instead.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from malleable.errors import InputError, RecipeError

# mergekit's names for the templates it ships (LGPL-3.0 files, not copied here)
MERGEKIT_NAMES = ("alpaca", "chatml", "exaone", "llama3", "mistral")


def check(spec: str, donor: Path) -> None:
    """Refuse, before any work, a template mergekit would refuse or that has no tokenizer to go with."""
    if not (donor / "tokenizer_config.json").is_file():
        raise RecipeError(f"chat_template: {donor} has no tokenizer (tokenizer_config.json) to attach it to")
    if spec in MERGEKIT_NAMES:
        raise RecipeError(f"chat_template: '{spec}' names a template mergekit ships; malleable does not copy "
                          "mergekit's template files: give the Jinja template itself, or auto")
    if spec != "auto" and (len(spec) < 20 or "{" not in spec):
        raise RecipeError(f"chat_template: '{spec:.40}' is neither auto nor a Jinja template")


def _own_template(folder: Path) -> str | None:
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception:  # noqa: BLE001 (an input without a loadable tokenizer has no vote, as in mergekit)
        return None
    template = tok.chat_template
    if isinstance(template, dict):
        template = template.get("default")
    return template.strip() if template else None


def resolve(spec: str, folders: list[Path]) -> str | None:
    """The template text for `spec`; for `auto`, the most common among `folders` (None: none has one)."""
    if spec == "auto":
        votes = [t for t in (_own_template(f) for f in folders) if t]
        return Counter(votes).most_common(1)[0][0] if votes else None
    return spec


def write(spec: str, donor: Path, folders: list[Path], out: Path) -> None:
    """Re-save `donor`'s tokenizer into `out` with the chat template `spec`, as mergekit does."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(donor, local_files_only=True)
    except Exception as e:  # noqa: BLE001
        raise InputError(f"{donor}: cannot load its tokenizer to set the chat template ({e})") from None
    template = resolve(spec, folders)
    if template is not None:
        tok.chat_template = template
    tok.save_pretrained(out)
