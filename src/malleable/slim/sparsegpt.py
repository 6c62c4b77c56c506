"""SparseGPT (Frantar & Alistarh, ICML 2023): prune column by column and update the remaining weights of each
row to make up for the pruned ones (the optimal brain surgeon update with the inverse Hessian's Cholesky factor).

Follows IST-DASLab/sparsegpt, sparsegpt.py (`SparseGPT.add_batch`, `fasterprune`), as the Wanda code copies it.
"""

from __future__ import annotations

import torch

from malleable.errors import InputError, RecipeError
from malleable.params import Param
from malleable.slim.registry import PRUNE_PARAMS, Pattern, WeightPruner, lowest, nm_mask, slim_method


@slim_method("sparsegpt", params=PRUNE_PARAMS | {
    "blocksize": Param(128, "columns pruned and updated together (the reference's blocksize)", ge=1),
    "percdamp": Param(0.01, "dampening added to the Hessian's diagonal, as a share of its mean", gt=0),
})
class SparseGPT(WeightPruner):
    """H = 2 X X^T / samples over the calibration inputs; dampen its diagonal by percdamp times its mean; take
    the upper Cholesky factor of H^-1; then, block by block of `blocksize` columns, choose the mask by
    w^2 / [H^-1]_jj^2 (per block for unstructured sparsity, per M columns for N:M), zero the masked weights one
    column at a time and spread each column's error over the columns to its right (inside the block at once,
    beyond it once per block). Columns whose input is always zero are zeroed, as in the reference.

    Differs from the reference in one place: its unstructured mask zeroes every score `<=` the block's
    `int(numel * s)`-th smallest, one weight more than requested per block; here exactly that many are zeroed
    (the smallest, ties to the earlier index). The optional joint quantisation is not implemented.
    """

    stats = "hessian"

    def check(self) -> None:
        super().check()
        m = self.pattern.m
        if m and self.p["blocksize"] % m:
            raise RecipeError(f"parameters.blocksize: {self.p['blocksize']} is not a multiple of M = {m} of "
                              f"pattern {self.pattern.name}")

    def prune(self, weight: torch.Tensor, stats: torch.Tensor | None, pattern: Pattern) -> torch.Tensor:
        w = weight.detach().clone().float()
        h = stats.clone().float()
        cols = w.shape[1]
        dead = torch.diag(h) == 0
        h[dead, dead] = 1
        w[:, dead] = 0
        h.diagonal().add_(self.p["percdamp"] * torch.mean(torch.diag(h)))
        try:
            hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
        except torch.linalg.LinAlgError:
            raise InputError("calibration: a layer's input Hessian is not positive definite even after dampening "
                             "(raise parameters.percdamp, or give more calibration samples)") from None
        step = self.p["blocksize"]
        for a in range(0, cols, step):
            b = min(a + step, cols)
            block, hb = w[:, a:b].clone(), hinv[a:b, a:b]
            d = torch.diag(hb)
            kept, errors = torch.zeros_like(block), torch.zeros_like(block)
            if pattern.structured:
                mask = torch.zeros_like(block, dtype=torch.bool)
            else:
                score = block ** 2 / d.reshape(1, -1) ** 2
                mask = lowest(score.flatten(), int(score.numel() * pattern.sparsity)).reshape(score.shape)
            for j in range(b - a):
                if pattern.structured and j % pattern.m == 0:
                    group = slice(j, j + pattern.m)
                    mask[:, group] = nm_mask(block[:, group] ** 2 / d[group].reshape(1, -1) ** 2, pattern.n,
                                             pattern.m)
                col = block[:, j]
                q = col.masked_fill(mask[:, j], 0)
                kept[:, j] = q
                err = (col - q) / hb[j, j]
                block[:, j:] -= err.unsqueeze(1) * hb[j, j:].unsqueeze(0)
                errors[:, j] = err
            w[:, a:b] = kept
            w[:, b:] -= errors @ hinv[a:b, b:]
        return w
