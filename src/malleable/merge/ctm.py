"""Compress-then-Merge (He et al., 2026, "Compress then Merge: From Multiple LoRAs into One Low-Rank Adapter").

Follows the authors' code (github.com/ZhengbaoHe/compress-then-merge, task_merger.py,
``get_low_rank_components_in_core_space``, ``merge_space="low_rank_core"``).
"""

from __future__ import annotations

from collections import defaultdict

import torch

from malleable.deltas.linalg import core_space, split_balanced, tucker2
from malleable.deltas.lowrank import LowRankDelta
from malleable.merge.inner import INNER, apply_inner, default_rank
from malleable.merge.registry import LoraJob, Param, merge_rule

_F64 = torch.float64
_CHUNK_BYTES = 16 << 20  # core tensors of one HOOI batch (float64); bounds the batch's working memory
_CHOL_MIN = 1e-5  # smallest diag(L) / max diag(L) of a stack's Gram Cholesky factor trusted (else QR + SVD)


def _balance(cores: torch.Tensor, beta: float) -> torch.Tensor:
    """The authors' norm balancing of the task slices ``[T, kB, kA]``: each M_t becomes
    M_t / ||M_t|| * (beta ||M_t|| + (1 - beta) mean_s ||M_s||) (beta = 1: raw, beta = 0: equal norms).
    A zero slice stays zero (theirs divides by its zero norm)."""
    norms = torch.linalg.matrix_norm(cores)                             # [T]
    target = beta * norms + (1 - beta) * norms.mean()
    factor = torch.where(norms > 0, target / torch.where(norms > 0, norms, 1), 0)
    return cores * factor[:, None, None]


def _chol_r(gram: torch.Tensor) -> torch.Tensor | None:
    """Upper-triangular R with stack = Q R (Q orthonormal), from the Cholesky factor of the stack's Gram
    matrix; None when the stack is rank deficient or too ill-conditioned to trust it (a QR is used then)."""
    L, info = torch.linalg.cholesky_ex(gram)
    if int(info) != 0:
        return None
    d = L.diagonal()
    return L.T if bool(d.min() > _CHOL_MIN * d.max()) else None


def _stacks(deltas: list[LowRankDelta]) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.cat([d.B.to(_F64) * d.scale for d in deltas], dim=1),     # [out, R]
            torch.cat([d.A.to(_F64) for d in deltas], dim=0))               # [R, in]


class _Module:
    """One module's core space: cores ``M_t`` with s_t B_t A_t = U_B M_t V_A for orthonormal bases U_B, V_A
    of the stacks. Any orthonormal bases give the same CtM result (HOOI, the coordinates P^T M_t Q and the
    rebuilt delta are invariant to a change of orthonormal basis up to column signs, to which the
    element-wise inner rules are equivariant), so the cheap one is used: Bstack = U_B R_B with R_B from the
    Cholesky factor of Bstack^T Bstack ([R x R], no QR of the tall stack, U_B never formed); then
    U_B^T s_t B_t = R_B[:, block t] and likewise for A. A (nearly) rank-deficient stack, or a layer narrower
    than R, falls back to the explicit QR + SVD bases of `core_space`."""

    def __init__(self, deltas: list[LowRankDelta]):
        self.deltas = deltas
        Bs, As = _stacks(deltas)
        R = Bs.shape[1]
        RB = _chol_r(Bs.T @ Bs) if min(Bs.shape[0], As.shape[1]) >= R else None
        RA = _chol_r(As @ As.T) if RB is not None else None
        if RA is None:
            self.RB = self.RA = None
            self.U_B, self.V_A, cores = core_space(deltas, dtype=_F64)
            self.cores = torch.stack(cores)                              # [T, kB, kA]
            return
        self.RB, self.RA = RB, RA
        blocks = [d.rank for d in deltas]
        self.cores = torch.stack([b @ a.T for b, a in zip(RB.split(blocks, dim=1), RA.split(blocks, dim=1))])

    def rebuild(self, left: torch.Tensor, right: torch.Tensor) -> LowRankDelta:
        """The LoRA (U_B left, right V_A) for ``left [kB, k]``, ``right [k, kA]``."""
        if self.RB is None:
            return LowRankDelta((self.U_B @ left).float(), (right @ self.V_A).float(), 1.0)
        Bs, As = _stacks(self.deltas)
        B = Bs @ torch.linalg.solve_triangular(self.RB, left, upper=True)
        A = torch.linalg.solve_triangular(self.RA, right.T, upper=True).T @ As
        return LowRankDelta(B.float(), A.float(), 1.0)


def _key(job: LoraJob) -> tuple:
    """Jobs with equal keys share one batched HOOI: the core tensor's shape, the rank and the stop rule."""
    out, inp = job.deltas[0].shape
    R = sum(d.rank for d in job.deltas)
    kB, kA = min(out, R), min(inp, R)
    r = min(default_rank(job.deltas, job.rank), kB, kA)
    return kB, kA, len(job.deltas), r, int(job.params.get("iters", 1000)), float(job.params.get("tol", 1e-6))


def _split(params: dict) -> tuple[str, float, dict]:
    rest = {k: v for k, v in params.items() if k not in ("inner", "beta", "iters", "tol")}
    return params.get("inner", "ties"), float(params.get("beta", 0.0)), rest


def ctm_batch(jobs: list[LoraJob]) -> list[LowRankDelta]:
    """CtM for many modules: the modules whose core tensors share a shape (for same-rank adapters: every
    module, whatever its layer's width) are fitted by one batched HOOI, in chunks of at most 32 MiB of
    float64 core tensors. Working memory: twice one chunk's cores (raw and balanced, 32 MiB) plus one module's
    float64 factor stacks at a time (R (out + in) doubles) and small HOOI temporaries."""
    results: list[LowRankDelta | None] = [None] * len(jobs)
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, job in enumerate(jobs):
        groups[_key(job)].append(i)
    for (kB, kA, T, r, iters, tol), idx in groups.items():
        size = max(1, _CHUNK_BYTES // (kB * kA * T * 8))
        for start in range(0, len(idx), size):
            chunk = idx[start:start + size]
            mods = [_Module(jobs[i].deltas) for i in chunk]
            X = torch.empty(len(chunk), T, kB, kA, dtype=_F64)
            for j, (m, i) in enumerate(zip(mods, chunk)):
                X[j] = _balance(m.cores, _split(jobs[i].params)[1])
            P, Q, _ = tucker2(X, r, max_sweeps=iters, tol=tol)
            for j, (m, i) in enumerate(zip(mods, chunk)):
                job = jobs[i]
                inner, _, rest = _split(job.params)
                coords = list(P[j].T @ m.cores @ Q[j])                     # the raw cores' coordinates
                merged = apply_inner(inner, coords, job.weights, job.generator, rest).to(_F64)
                # U_B P has orthonormal columns and Q^T V_A orthonormal rows, so the SVD of the r x r merged
                # core only splits sqrt of its singular values onto each side; the product is unchanged
                u, s, vh = torch.linalg.svd(merged, full_matrices=False)
                d = split_balanced(P[j] @ u, s, vh @ Q[j].T)
                results[i] = m.rebuild(d.B, d.A)
                m.cores = None
    return results  # type: ignore[return-value]


@merge_rule("ctm", space="lora", batch=ctm_batch, params={
    "inner": INNER,
    "beta": Param(0.0, "norm balancing before the shared subspaces are fitted (the authors' convention): each "
                       "task core M_t is rescaled to norm beta ||M_t|| + (1 - beta) mean ||M|| (0: every task "
                       "counts equally, the authors' default; 1: raw cores)", ge=0.0, le=1.0),
    "iters": Param(1000, "maximum HOOI sweeps for the shared subspaces (the authors' 1000)", ge=1),
    "tol": Param(1e-6, "HOOI stops, from its third sweep on, once the relative fit error changes by less than "
                       "this (the authors' tensorly tol)", gt=0.0),
})
def ctm(deltas: list[LowRankDelta], weights, generator, rank, inner="ties", beta=0.0, iters=1000, tol=1e-6,
        **params) -> LowRankDelta:
    """Compress first: find shared rank-r subspaces of all LoRAs, then merge r x r coordinates.

    In the core space (s_t B_t A_t = U_B M_t V_A, orthonormal U_B, V_A), balance the task cores to
    M_t / ||M_t|| (beta ||M_t|| + (1 - beta) mean_s ||M_s||), stack them into an R x R x T tensor and fit a
    Tucker-2 model of ranks (r, r) by HOOI (tensorly's partial_tucker with init="svd", at most ``iters``
    sweeps, stopping once the relative error changes by < ``tol``). Its factors P, Q (R x r) are the shared
    left/right subspaces. Each original (unbalanced) core is projected to C_t = P^T M_t Q (r x r), the
    ``inner`` full-space rule merges the C_t, and the output is U_B P C Q^T V_A (stored as balanced factors):
    rank <= r by construction, no truncation after merging. ``rank`` (r) defaults to the largest input rank.
    The engine merges all modules through ``ctm_batch`` (one batched HOOI per core-tensor shape); this
    per-module entry point is the same code on a batch of one.

    Where ours differs from the authors' code, and why:
    * ``beta`` is theirs (and so is the default 0). Earlier malleable versions divided each core by
      ||M_t||^beta with default 1: old ``beta: 1`` (equal norms) is new ``beta: 0``, old ``beta: 0`` (raw)
      is new ``beta: 1``; old fractional values have no exact new equivalent. The old HOOI stopped after at
      most 20 sweeps (``iters`` default 20) on a different criterion; ``iters: 20`` now caps the authors' rule.
    * TIES ``density`` d keeps int(d * r^2) coordinates per task (PEFT / mergekit's convention); their
      ``topK`` = K (percent) keeps int(r^2 K / 100) + 1 (their kthvalue threshold keeps the k-th entry
      too). To reproduce their topK = K, set density = (int(r^2 K / 100) + 1 + 0.5) / r^2.
    * The LoRA scale s_t (alpha / r) is folded into B_t; their handler merges the raw factors.
    * The core-space bases come from a Cholesky factor of the stacks' Gram matrices instead of an SVD of the
      stacks (the result does not depend on the basis, see `_Module`), and the singular vectors in HOOI from
      ``eigh`` of Gram matrices instead of an SVD, in float64.
    """
    return ctm_batch([LoraJob(deltas, list(weights), generator, rank,
                              {"inner": inner, "beta": beta, "iters": iters, "tol": tol, **params})])[0]
