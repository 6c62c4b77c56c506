"""Loading a user's transformers checkpoint or PEFT adapter: the one place every verb gets its model and tokenizer.

Failures become one InputError line naming the path (the CLI turns that into exit 2), never a traceback.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from malleable.errors import InputError

LOAD_ERRORS = (OSError, ValueError, KeyError)


def checkpoint_base(path: Path) -> tuple[Path, bool]:
    """(the checkpoint whose weights load, whether `path` is a PEFT adapter on top of it)."""
    path = Path(path)
    if (path / "adapter_config.json").is_file():
        return Path(json.loads((path / "adapter_config.json").read_text())["base_model_name_or_path"]), True
    if not (path / "config.json").is_file():
        raise InputError(f"{path}: neither a transformers checkpoint (config.json) nor a PEFT adapter")
    return path, False


def load_tokenizer(path: Path, trust_remote_code: bool = False):
    """The tokenizer beside a checkpoint or adapter (else the adapter's base), with a pad token (EOS if none)."""
    from transformers import AutoTokenizer

    path = Path(path)
    base, _ = checkpoint_base(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path if (path / "tokenizer_config.json").is_file() else base,
                                                  trust_remote_code=trust_remote_code)
    except LOAD_ERRORS as e:
        raise InputError(f"{path}: cannot load its tokenizer ({str(e).splitlines()[0]})") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def model_labels(path: Path, task: str) -> list[str] | None:
    """A classifier checkpoint's classes in index order, from its config (no weights loaded)."""
    if task != "classification":
        return None
    from transformers import AutoConfig

    id2label = AutoConfig.from_pretrained(checkpoint_base(path)[0]).id2label
    return [str(id2label[i]) for i in range(len(id2label))]


def load_model(path: Path, task: str, pad_id: int, *, labels: list[str] | None = None,
               trust_remote_code: bool = False):
    """A checkpoint's model in float32 (mixed precision is autocast's job), or a PEFT adapter on its base with
    the adapter's factors trainable. `labels` gives a classifier a fresh head sized and named by them; without
    it a classifier keeps the head it was saved with."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from transformers.utils import logging

    logging.disable_progress_bar()  # its bar ignores --quiet and would precede a refusal's one line
    base, adapter = checkpoint_base(path)
    kw = {"dtype": torch.float32, "trust_remote_code": trust_remote_code}
    if task == "classification" and labels is not None:
        kw |= {"num_labels": len(labels), "id2label": dict(enumerate(labels)),
               "label2id": {x: i for i, x in enumerate(labels)}}
    cls = AutoModelForSequenceClassification if task == "classification" else AutoModelForCausalLM
    try:
        model = cls.from_pretrained(base, **kw)
        if adapter:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, path, is_trainable=True)
    except LOAD_ERRORS as e:
        raise InputError(f"{path}: cannot load the model ({str(e).splitlines()[0]})") from None
    if task == "classification":
        model.config.pad_token_id = pad_id
    return model.eval()
