"""TIES-Merging: trim, elect sign, disjoint merge (Yadav et al., "TIES-Merging: Resolving Interference When
Merging Models", NeurIPS 2023, arXiv:2306.01708).

The defaults reproduce PEFT's ``merge_utils.ties``. mergekit's ``ties`` is ``normalize="weights"`` with
``weighted_election=true`` (mergekit elects signs from the weighted task vectors, PEFT from the unweighted).
"""

from __future__ import annotations

import torch

from malleable.merge.registry import Param, merge_rule

DENSITY = Param(1.0, "fraction of each task vector's entries kept, by magnitude (1.0, mergekit's default, keeps "
                "all; the TIES paper uses 0.2)", gt=0.0, le=1.0, per_input=True)
SIGN_METHOD = Param("total", "sign election: 'total' (sign of the sum of the trimmed vectors, the paper's) or "
                    "'frequency' (sign of the count of signs)", choices=("total", "frequency"))
NORMALIZE = Param("count", "divisor of the disjoint sum: 'count' (number of tasks agreeing with the elected "
                  "sign; PEFT and the paper), 'weights' (sum of their weights; mergekit's normalize: true), "
                  "'none' (mergekit's normalize: false)", choices=("count", "weights", "none"))
WEIGHTED_ELECTION = Param(False, "elect signs from the weighted task vectors (mergekit) instead of the "
                          "unweighted trimmed ones (PEFT)")
SCALE = Param(1.0, "multiplier on the merged task vector (the paper's lambda)")


def trim_magnitude(t: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the int(density * numel) entries of largest magnitude, zero the rest."""
    if density >= 1:
        return t
    mask = torch.zeros(t.numel(), dtype=t.dtype, device=t.device)
    mask[torch.topk(t.abs().flatten(), int(density * t.numel()), sorted=False).indices] = 1
    return t * mask.view_as(t)


def disjoint_merge(tensors: list[torch.Tensor], weights: list[float], sign_method: str, normalize: str,
                   weighted_election: bool) -> torch.Tensor:
    """Elect a sign per entry, then sum the weighted entries that agree with it, divided per `normalize`.
    Entries that are zero (trimmed or dropped) never agree. A zero divisor counts as 1 (as PEFT and mergekit).

    Loops over tasks instead of stacking them, so the working set is a few tensors, not T copies.
    """
    votes = torch.zeros_like(tensors[0])
    for t, w in zip(tensors, weights):
        voter = t * w if weighted_election else t
        votes.add_(voter if sign_method == "total" else voter.sign())
    elected = torch.where(votes >= 0, 1.0, -1.0)
    del votes
    merged = torch.zeros_like(tensors[0])
    divisor = torch.zeros_like(tensors[0])
    for t, w in zip(tensors, weights):
        if weighted_election and w == 0:
            continue  # sign(0 * t) is 0: a zero-weighted task never agrees
        # sign(w * t) == sign(t) * sign(w): the voter's sign, whichever election was used
        voter_sign = t.sign() * (-1.0 if (weighted_election and w < 0) else 1.0)
        agree = voter_sign == elected
        merged.add_(t * w * agree)  # not add_(alpha=w): a fused multiply-add rounds differently from PEFT
        if normalize == "count":
            divisor.add_(agree)
        elif normalize == "weights":
            divisor.add_(agree, alpha=w)
    if normalize == "none":
        return merged
    divisor[divisor == 0] = 1
    return merged.div_(divisor)


@merge_rule("ties", params={"density": DENSITY, "sign_method": SIGN_METHOD, "normalize": NORMALIZE,
                            "weighted_election": WEIGHTED_ELECTION, "scale": SCALE})
def ties(tensors, weights, generator, density, sign_method, normalize, weighted_election, scale):
    """TIES-Merging (Yadav et al., 2023): trim each task vector to its top-`density` entries by magnitude,
    elect a sign per entry, average the entries that agree with it (disjoint mean), times `scale`."""
    trimmed = [trim_magnitude(t, d) for t, d in zip(tensors, density)]
    return disjoint_merge(trimmed, weights, sign_method, normalize, weighted_election) * scale
