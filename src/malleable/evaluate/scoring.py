"""Teacher-forced scoring of (prompt, answer) pairs: one forward pass per batch gives every answer token's
log-probability and whether it is the argmax. The TOFU metrics and the merge benchmarks' exact match read it.
"""

from __future__ import annotations

import numpy as np
import torch

from malleable.learn.data import collate, encode_pair
from malleable.learn.loss import lm_logits


@torch.no_grad()
def score_pairs(model, tokenizer, pairs: list[tuple[str, str]], *, batch_size: int = 16,
                chat: bool = True) -> list[dict[str, np.ndarray]]:
    """Per (prompt, answer): the answer's token log-probabilities and whether each token is the argmax.

    Pairs are sorted by length before batching so padding stays small; results come back in input order.
    """
    model.eval()
    items = [encode_pair(tokenizer, q, a, chat) for q, a in pairs]
    order = sorted(range(len(items)), key=lambda i: len(items[i][0]))
    out: list[dict] = [{}] * len(items)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        batch = collate([items[i] for i in idx], tokenizer.pad_token_id)
        logits, labels = lm_logits(model, {k: v.to(model.device) for k, v in batch.items()})
        logp = torch.log_softmax(logits.float(), -1)
        mask = labels != -100
        token_lp = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        hit = logp.argmax(-1) == labels
        for row, i in enumerate(idx):
            m = mask[row]
            out[i] = {"logprobs": token_lp[row][m].cpu().numpy(), "correct": hit[row][m].cpu().numpy()}
    return out


def without_eos(scored: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A `score_pairs` result without its last token, the EOS `encode_pair` appends: what open-unlearning's
    `tokenwise_logprobs` and `tokenwise_vocab_logprobs` keep ("-1 to ignore eos prediction")."""
    return {k: v[:-1] for k, v in scored.items()}


def forced_match(model, tokenizer, records: list[dict], *, chat: bool = True, batch_size: int = 32) -> list[bool]:
    """Per record: is every completion token the argmax under teacher forcing? One forward pass per batch.

    This is exactly "greedy decoding reproduces the completion's tokens" (a greedy step that picks the right
    token leaves the same prefix as teacher forcing), so it scores generation-style exact match without
    generating; what follows the completion is not checked (the EOS `encode_pair` appends is left out), as
    `is_match` accepts an answer followed by more text. Unlike `is_match` it compares tokens, not normalised text.
    """
    scored = score_pairs(model, tokenizer, [(r["prompt"], r["completion"]) for r in records],
                         batch_size=batch_size, chat=chat)
    return [bool(without_eos(s)["correct"].all()) for s in scored]


def choice_pick(scored: list[dict[str, np.ndarray]], choices: list[str], norm: bool = False) -> int:
    """The index of the choice with the highest answer log-likelihood, from `score_pairs` results of
    (prompt, choice) for each choice (the EOS `encode_pair` appends is left out: a choice is a continuation,
    not a whole answer). Summed over the choice's tokens (lm-eval's `acc`), or with `norm` divided by the
    choice's length in UTF-8 bytes (lm-eval's `acc_norm`). Ties go to the first choice, as numpy's argmax."""
    ll = np.array([float(without_eos(s)["logprobs"].sum()) for s in scored])
    if norm:
        ll = ll / np.array([max(1, len(c.encode("utf-8"))) for c in choices])
    return int(np.argmax(ll))


def choice_match(model, tokenizer, records: list[dict], *, norm: bool = False, chat: bool = True,
                 batch_size: int = 32) -> list[int]:
    """Per record (`prompt`, `choices`): the index of the picked choice (`choice_pick`), every choice of every
    record scored teacher-forced in shared batches, one forward per batch."""
    pairs = [(r["prompt"], c) for r in records for c in r["choices"]]
    scored = score_pairs(model, tokenizer, pairs, batch_size=batch_size, chat=chat)
    picks, at = [], 0
    for r in records:
        k = len(r["choices"])
        picks.append(choice_pick(scored[at:at + k], r["choices"], norm))
        at += k
    return picks
