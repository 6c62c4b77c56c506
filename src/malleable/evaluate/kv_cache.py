"""What a KV-cache eviction costs in quality, as pure functions of logits (slim/evict.py produces them): the
continuation's negative log-likelihood, its KL divergence from the full cache's predictions, and whether a
retrieval answer holds the needle."""

from __future__ import annotations

import torch


def continuation_nll(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Mean negative log-likelihood (nats per token) of `targets` (positions,) under `logits` (positions, vocab)."""
    return float(torch.nn.functional.cross_entropy(logits.float(), targets.reshape(-1), reduction="mean"))


def mean_kl(reference: torch.Tensor, logits: torch.Tensor) -> float:
    """Mean over positions of KL(reference || evicted), in nats: how far the evicted cache's next-token
    distributions moved from the full cache's (`reference`), both (positions, vocab) logits."""
    p = torch.log_softmax(reference.float(), dim=-1)
    q = torch.log_softmax(logits.float(), dim=-1)
    return float((p.exp() * (p - q)).sum(dim=-1).mean())


def needle_found(answer: str, needle: str) -> bool:
    """The retrieval answer contains the needle (digits compared without spaces, as a model may split them)."""
    return needle.replace(" ", "") in answer.replace(" ", "")
