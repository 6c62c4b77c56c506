"""Weight-averaging baselines that TWA is measured against, as plain functions over checkpoints in memory.

* Uniform soup: the mean of the checkpoints (the `linear` merge rule on files; `merge.twa.mean_state` here).
* Greedy soup (Wortsman et al., "Model soups", ICML 2022, Recipe 1; github mlfoundations/model-soups,
  main.py): sort the ingredients by held-out accuracy, best first; start from the best, and add the next
  ingredient only if the uniform average with it is STRICTLY more accurate on the held-out data.
* SWA (Izmailov et al., 2018) through torch.optim.swa_utils: `AveragedModel` over the checkpoints (its running
  equal-weight mean), then optionally `update_bn` (BatchNorm statistics recomputed over the data; without it
  the averaged running statistics stay, which users found can be better or worse).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
from torch import nn

from malleable.merge.twa import mean_state, state_dicts


def greedy_soup(models: Sequence[nn.Module | dict[str, torch.Tensor]],
                evaluate: Callable[[dict[str, torch.Tensor]], float]) -> tuple[dict[str, torch.Tensor], list[int]]:
    """(the soup's state, the indices of its ingredients in the order added); `evaluate(state)` is held-out
    accuracy (higher is better). Each candidate is scored once alone and once per soup it could join."""
    sds = state_dicts(models)
    scores = [evaluate(sd) for sd in sds]
    order = sorted(range(len(sds)), key=lambda i: -scores[i])  # stable: ties keep the input order
    chosen, best = [order[0]], scores[order[0]]
    for i in order[1:]:
        score = evaluate(mean_state([sds[j] for j in chosen + [i]]))
        if score > best:
            chosen, best = chosen + [i], score
    return mean_state([sds[j] for j in chosen]), chosen


def swa(models: Sequence[nn.Module], bn_data: Sequence[torch.Tensor] | None = None) -> nn.Module:
    """The SWA average of `models` (one architecture) with torch.optim.swa_utils; `bn_data` (input batches)
    recomputes BatchNorm statistics with `update_bn`. The inputs are not changed."""
    state_dicts(models)  # one architecture, or a one-line error naming the odd tensor
    averaged = torch.optim.swa_utils.AveragedModel(copy.deepcopy(models[0]), use_buffers=True)
    for m in models:  # the first call copies (n_averaged 0), each later one folds into the running mean
        averaged.update_parameters(m)
    if bn_data is not None:
        torch.optim.swa_utils.update_bn(list(bn_data), averaged)
    return averaged.module.eval()
