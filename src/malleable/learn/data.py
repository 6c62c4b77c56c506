"""Training examples from a data file: rows checked, tokenised, and batched with left padding.

Formats (`data.format`, detected from the columns when `auto`):

* prompt_completion: the loss is on the completion tokens only; the prompt goes through the tokenizer's
  chat template as a user turn when the tokenizer has one (`data.chat_template`);
* text: plain language modelling on the whole text;
* text_label: classification; labels are strings from `data.labels` (default: those seen in train).

A row with a missing or empty field, a label outside the set, or more tokens than `data.max_length` is a bad
row. Bad rows are skipped only up to `data.max_bad_rows`; beyond that the run refuses, naming the first one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from malleable.data.files import load_table
from malleable.errors import InputError, RecipeError
from malleable.models.chat import render_user_turn


@dataclass
class Examples:
    """Tokenised examples of one file: (input_ids, labels) pairs; labels a list (LM) or an int (classification)."""

    path: Path
    format: str
    items: list[tuple[list[int], list[int] | int]]
    bad_rows: list[str] = field(default_factory=list)
    labels: list[str] | None = None
    rows: list[dict] = field(default_factory=list)  # the file's rows as read (an objective may need other fields)

    def __len__(self) -> int:
        return len(self.items)


def chat_prompt(tokenizer, prompt: str) -> str:
    """The prompt as the model's chat template renders a user turn followed by the assistant header (within
    bounds of time, memory and length: see models.chat)."""
    return render_user_turn(tokenizer, prompt)


def uses_chat_template(tokenizer, setting: str, key: str = "data.chat_template") -> bool:
    has = bool(getattr(tokenizer, "chat_template", None))
    if setting == "on" and not has:
        raise RecipeError(f"{key}: on, but the model's tokenizer has no chat template")
    return has and setting != "off"


def encode_prompts(tokenizer, prompts: list[str], chat: bool, **kwargs):
    """The prompts tokenised as every path here renders them: through the chat template (which writes its own
    special tokens), or plain with the tokenizer's special tokens added. `kwargs` go to the tokenizer."""
    texts = [chat_prompt(tokenizer, p) for p in prompts] if chat else prompts
    return tokenizer(texts, add_special_tokens=not chat, **kwargs)


def encode_pair(tokenizer, prompt: str, completion: str, chat: bool) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one prompt/completion pair; the loss is on the completion and its EOS only
    (the prompt tokenised as `encode_prompts` does, one text at a time)."""
    p = tokenizer(chat_prompt(tokenizer, prompt) if chat else prompt, add_special_tokens=not chat).input_ids
    c = tokenizer(completion, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    return p + c, [-100] * len(p) + c


def _detect(columns: set[str], spec) -> str:
    if spec.format != "auto":
        return spec.format
    if {spec.prompt_field, spec.completion_field} <= columns:
        return "prompt_completion"
    if {spec.text_field, spec.label_field} <= columns:
        return "text_label"
    if spec.text_field in columns:
        return "text"
    raise InputError(f"columns {sorted(columns)}: expected '{spec.prompt_field}'/'{spec.completion_field}', "
                     f"'{spec.text_field}'/'{spec.label_field}' or '{spec.text_field}' (set data.format and the "
                     f"*_field keys)")


def _text(row: dict, key: str) -> str:
    """The row's field as text, or a ValueError saying what is wrong with it."""
    if key not in row or row[key] is None:
        raise ValueError(f"missing field '{key}'")
    value = row[key]
    if not isinstance(value, str):
        raise ValueError(f"field '{key}' is {type(value).__name__}, not text")
    if not value.strip():
        raise ValueError(f"empty field '{key}'")
    return value


def load_examples(path: Path, spec, tokenizer, *, labels: list[str] | None = None) -> Examples:
    """Read, check and tokenise one data file. Raises an InputError naming the file when it is refused."""
    rows, where = load_table(path)
    if not rows:
        raise InputError(f"{path}: no rows")
    try:
        fmt = _detect(set().union(*(r.keys() for r in rows)), spec)
    except InputError as e:
        raise InputError(f"{path}: {e}") from None
    chat = fmt == "prompt_completion" and uses_chat_template(tokenizer, spec.chat_template)
    if fmt == "text_label":
        seen = sorted({str(r[spec.label_field]) for r in rows if r.get(spec.label_field) is not None})
        labels = labels or spec.labels or seen
        if len(labels) < 2:
            raise InputError(f"{path}: classification needs at least two labels in '{spec.label_field}'")
    items, bad = [], []
    for row, at in zip(rows, where):
        try:
            if fmt == "prompt_completion":
                ids, target = encode_pair(tokenizer, _text(row, spec.prompt_field),
                                          _text(row, spec.completion_field), chat)
            elif fmt == "text":
                ids = tokenizer(_text(row, spec.text_field)).input_ids + [tokenizer.eos_token_id]
                target = [-100] + ids[1:]  # the first token has nothing before it to predict it
            else:
                ids = tokenizer(_text(row, spec.text_field)).input_ids
                if row.get(spec.label_field) is None:
                    raise ValueError(f"missing field '{spec.label_field}'")
                label = str(row[spec.label_field])
                if label not in labels:
                    raise ValueError(f"label '{label}' is not one of {labels}")
                target = labels.index(label)
            if len(ids) > spec.max_length:
                raise ValueError(f"{len(ids)} tokens, more than data.max_length ({spec.max_length})")
            items.append((ids, target))
        except ValueError as e:
            bad.append(f"{at}: {e}")
    allowed = spec.max_bad_rows if spec.max_bad_rows >= 1 or spec.max_bad_rows == 0 else spec.max_bad_rows * len(rows)
    if len(bad) > allowed:
        raise InputError(f"{path}: {bad[0]} ({len(bad)} bad rows of {len(rows)}; data.max_bad_rows allows "
                         f"{spec.max_bad_rows})")
    if not items:
        raise InputError(f"{path}: no usable rows")
    return Examples(path, fmt, items, bad, labels if fmt == "text_label" else None, rows)


def collate(items: list[tuple[list[int], list[int] | int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-pad a batch, so every completion ends at the last position (see learn.loss.lm_logits)."""
    width = max(len(ids) for ids, _ in items)
    ids = torch.full((len(items), width), pad_id)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for i, (x, _) in enumerate(items):
        ids[i, width - len(x):] = torch.tensor(x)
        mask[i, width - len(x):] = 1
    if isinstance(items[0][1], int):
        labels = torch.tensor([y for _, y in items])
    else:
        labels = torch.full((len(items), width), -100)
        for i, (_, y) in enumerate(items):
            labels[i, width - len(y):] = torch.tensor(y)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
