"""The task losses every method starts from, per unit (target token or example), unreduced."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def lm_logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, labels) of a left-padded batch, for the last positions only: the ones that predict a target.

    Only those positions go through the LM head: with a 49k vocabulary the head is a quarter of a small
    model's compute, and prompts are most of each sequence. Shapes (B, K, V) and (B, K); labels -100 = no loss.
    """
    labels = batch["labels"]
    keep = int((labels != -100).sum(1).max())
    positions = (batch["attention_mask"].cumsum(1) - 1).clamp(min=0)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=positions,
                   logits_to_keep=keep + 1, use_cache=False).logits
    return logits[:, :-1], labels[:, labels.shape[1] - keep:]


def is_lm(part: dict[str, torch.Tensor]) -> bool:
    return part["labels"].ndim == 2


def class_logits(model: torch.nn.Module, part: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B, classes) logits of a classifier part: a plain module on `x`, or a transformers sequence classifier."""
    if "x" in part:
        out = model(part["x"])
    else:
        out = model(input_ids=part["input_ids"], attention_mask=part["attention_mask"])
    return (out.logits if hasattr(out, "logits") else out).float()


def task_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Cross-entropy per unit: per target token (causal LM, 2-D labels) or per example (classification)."""
    if batch["labels"].ndim == 1:  # classification: one label per example
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return F.cross_entropy(logits.float(), batch["labels"], reduction="none")
    logits, labels = lm_logits(model, batch)
    mask = labels != -100
    return F.cross_entropy(logits[mask].float(), labels[mask], reduction="none")


def count_units(batch: dict[str, torch.Tensor]) -> int:
    """How many loss units a batch holds: target tokens, or examples for classification."""
    labels = batch["labels"]
    return int(labels.numel()) if labels.ndim == 1 else int((labels != -100).sum())
