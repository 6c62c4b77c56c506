"""Per-example quantities every objective is written in: log-likelihoods, logits, KL to a reference.

One function per quantity, for both kinds of model, so an objective never asks what kind of model it has.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from malleable.learn.loss import class_logits, is_lm, lm_logits


def token_logprobs(model: torch.nn.Module, part: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p of each target token, mask of real targets), both (B, K), for a language-model part."""
    logits, labels = lm_logits(model, part)
    mask = labels != -100
    logp = torch.log_softmax(logits.float(), -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return logp * mask, mask


def sequence_logprob(model: torch.nn.Module, part: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(y | x) per example, its number of target units): summed over tokens, or one class label."""
    if is_lm(part):
        logp, mask = token_logprobs(model, part)
        return logp.sum(1), mask.sum(1)
    logits = class_logits(model, part)
    logp = torch.log_softmax(logits, -1).gather(-1, part["labels"].unsqueeze(-1)).squeeze(-1)
    return logp, torch.ones_like(logp)


def mean_nll(model: torch.nn.Module, part: dict[str, torch.Tensor]) -> torch.Tensor:
    """The usual training loss of a part: cross-entropy per target unit, averaged over the batch's units."""
    logp, units = sequence_logprob(model, part)
    return -logp.sum() / units.sum().clamp(min=1)


def output_logits(model: torch.nn.Module, part: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits at every scored position, mask): (B, K, V) for language models, (B, 1, C) for classifiers."""
    if is_lm(part):
        logits, labels = lm_logits(model, part)
        return logits.float(), labels != -100
    logits = class_logits(model, part)
    return logits.unsqueeze(1), torch.ones(logits.shape[:1] + (1,), dtype=torch.bool, device=logits.device)


def logits_and_targets(model: torch.nn.Module, part: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, targets) at every scored unit: (B, K, V) and (B, K) for a language model (targets -100 where
    there is none), (B, 1, C) and (B, 1) for a classifier."""
    if is_lm(part):
        logits, labels = lm_logits(model, part)
        return logits.float(), labels
    return class_logits(model, part).unsqueeze(1), part["labels"].unsqueeze(1)


def sequence_logits(model: torch.nn.Module, part: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits at every real position of the sequence, prompt included, attention mask): (B, S, V) and (B, S)
    for a language model, as open-unlearning's `compute_kl_divergence` scores them; a classifier's as
    `output_logits`."""
    if not is_lm(part):
        return output_logits(model, part)
    positions = (part["attention_mask"].cumsum(1) - 1).clamp(min=0)
    logits = model(input_ids=part["input_ids"], attention_mask=part["attention_mask"], position_ids=positions,
                   use_cache=False).logits
    return logits.float(), part["attention_mask"].bool()


def kl_to(reference_logits: torch.Tensor, logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """KL(reference || model) per scored position, averaged over the mask's positions."""
    kl = F.kl_div(torch.log_softmax(logits, -1), torch.log_softmax(reference_logits, -1), log_target=True,
                  reduction="none").sum(-1)
    return (kl * mask).sum() / mask.sum().clamp(min=1)
