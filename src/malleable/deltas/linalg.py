"""Linear algebra over low-rank deltas: truncated SVD, the core space of T LoRAs, the KnOTS space, Tucker.

Conventions used throughout:

* A LoRA delta is ``s * B @ A`` with ``B: [out, r]``, ``A: [r, in]`` (PEFT's ``lora_B`` / ``lora_A``).
* Bases are named for the side they live on: ``U_B`` is ``[out, k]`` with orthonormal *columns* (a basis of
  the output space), ``V_A`` is ``[k, in]`` with orthonormal *rows* (a basis of the input space), so a
  delta expressed in them reads ``U_B @ M @ V_A``, like ``U @ diag(S) @ Vh`` of ``torch.linalg.svd``.
* Nothing here forms ``B @ A`` (``[out, in]``): every decomposition is a QR of a thin stack of factors
  followed by an SVD of a small matrix whose side is the sum of the ranks. The small work runs in float64
  (it is cheap and makes the "exact" reconstructions exact to float32 round-off); results come back in
  the inputs' floating dtype (at least float32) unless ``dtype`` says otherwise.
"""

from __future__ import annotations

import torch

from malleable.deltas.lowrank import LowRankDelta

_WORK = torch.float64


def _out_dtype(*tensors: torch.Tensor, dtype: torch.dtype | None = None) -> torch.dtype:
    if dtype is not None:
        return dtype
    out = torch.float32
    for t in tensors:
        out = torch.promote_types(out, t.dtype)
    return out


def truncated_svd(M: torch.Tensor, rank: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The leading ``rank`` singular triplets of ``M``: ``U [m, k]``, ``S [k]``, ``Vh [k, n]``.

    ``U @ diag(S) @ Vh`` is the best rank-``k`` approximation of ``M`` in Frobenius and spectral norm
    (Eckart-Young), which is why merge-then-compress baselines (PEFT's ``*_svd`` combinations) truncate
    this way. A deterministic full thin SVD (LAPACK), not a randomised one, so equal inputs give equal
    bytes. ``rank=None`` (or a rank above ``min(m, n)``) keeps every triplet. Computed in the input's
    dtype promoted to at least float32.
    """
    work = M.to(_out_dtype(M))
    U, S, Vh = torch.linalg.svd(work, full_matrices=False)
    k = S.numel() if rank is None else max(0, min(int(rank), S.numel()))
    return U[:, :k], S[:k], Vh[:k]


def split_balanced(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor) -> LowRankDelta:
    """``U diag(S) Vh`` as LoRA factors with ``sqrt(S)`` on each side (scale 1).

    Splitting the singular values evenly keeps B and A of similar magnitude, which matters when the
    adapter is stored in bf16/fp16.
    """
    root = S.clamp_min(0).sqrt()
    return LowRankDelta(U * root, root[:, None] * Vh, 1.0)


def lowrank_from_dense(M: torch.Tensor, rank: int | None) -> LowRankDelta:
    """The best rank-``rank`` LoRA for a dense delta: ``B = U sqrt(S)``, ``A = sqrt(S) Vh``, scale 1."""
    return split_balanced(*truncated_svd(M, rank))


def compress(U: torch.Tensor, core: torch.Tensor, Vh: torch.Tensor | None, rank: int | None,
             dtype: torch.dtype | None = None) -> LowRankDelta:
    """``U @ core @ Vh`` as a balanced LoRA of rank at most ``rank``, touching only the small core.

    ``U [out, p]`` must have orthonormal columns and ``Vh [q, in]`` orthonormal rows (or be None: the
    identity, so ``core`` is ``[p, in]``). Then the SVD of ``core`` *is* the SVD of the product up to the
    change of basis, and its truncation is the best rank-``rank`` approximation of the product.
    """
    out = _out_dtype(U, core, dtype=dtype)
    u, s, vh = truncated_svd(core.to(_WORK), rank)
    left = U.to(_WORK) @ u
    right = vh if Vh is None else vh @ Vh.to(_WORK)
    d = split_balanced(left, s, right)
    return LowRankDelta(d.B.to(out), d.A.to(out), 1.0)


def _left_basis(stack: torch.Tensor) -> torch.Tensor:
    """Left singular vectors of a thin ``[m, R]`` stack, via QR and an SVD of the ``R x R`` factor.

    ``stack = Q Rf`` and ``Rf = u s vh`` give ``stack = (Q u) s vh``, so ``Q u`` are the left singular
    vectors of the stack. All ``min(m, R)`` of them are kept, zero singular values included: ``Q u``
    always spans ``Q``'s columns, which contain the stack's column space even when the stack is rank
    deficient, so projecting onto it loses nothing.
    """
    Q, Rf = torch.linalg.qr(stack)
    u = torch.linalg.svd(Rf, full_matrices=False)[0]
    return Q @ u


def core_space(deltas: list[LowRankDelta], dtype: torch.dtype | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """The core space of T LoRAs (Panariello et al., NeurIPS 2025): shared bases and per-task cores.

    Returns ``U_B [out, kB]``, ``V_A [kA, in]`` and cores ``M_t [kB, kA]`` with

        s_t B_t A_t == U_B @ M_t @ V_A        (exactly, up to float round-off)

    where ``U_B`` are the left singular vectors of the horizontal stack ``[s_1 B_1 | ... | s_T B_T]``
    (``[out, R]``, ``R = sum r_t``), ``V_A`` the right singular vectors of the vertical stack
    ``[A_1; ...; A_T]`` (``[R, in]``), ``M_t = U_B^T (s_t B_t) (A_t V_A^T)``, and ``kB = min(out, R)``,
    ``kA = min(in, R)`` (both ``R`` for any real LoRA). Exactness: ``U_B U_B^T`` is the identity on the
    column space of every ``B_t`` and ``V_A^T V_A`` on the row space of every ``A_t``.

    Why SVD bases rather than the raw QR ``Q``: any orthonormal basis of the stacks reconstructs exactly,
    but element-wise merge rules (TIES, DARE, magnitude pruning) are not rotation invariant; the paper's
    reference bases are the singular vectors, which order coordinates by energy across tasks. They are
    obtained from a QR of the thin stack and an SVD of its ``R x R`` triangular factor, never from
    ``B @ A``. The scale ``s_t`` is folded into ``B_t`` (it does not change the spanned space, only how
    the energy is weighted when choosing the basis order).
    """
    if not deltas:
        raise ValueError("core_space needs at least one delta")
    out = _out_dtype(*(d.B for d in deltas), *(d.A for d in deltas), dtype=dtype)
    Bs = [d.B.to(_WORK) * d.scale for d in deltas]
    As = [d.A.to(_WORK) for d in deltas]
    U_B = _left_basis(torch.cat(Bs, dim=1))                 # [out, kB]
    V_A = _left_basis(torch.cat(As, dim=0).T).T             # [kA, in]
    cores = [(U_B.T @ B) @ (A @ V_A.T) for B, A in zip(Bs, As)]
    return U_B.to(out), V_A.to(out), [M.to(out) for M in cores]


def knots_space(deltas: list[LowRankDelta], dtype: torch.dtype | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """The KnOTS decomposition (Stoica et al., 2025): SVD of ``[Δ_1 | ... | Δ_T]``, from the factors.

    Returns ``U [out, k]`` (orthonormal columns), ``S [k]`` and per-task ``V_t [k, in]`` with

        [Δ_1 | ... | Δ_T] == U @ diag(S) @ [V_1 | ... | V_T]     (``[V_1 | ... | V_T]`` orthonormal rows)

    so ``Δ_t == U @ diag(S) @ V_t``. This is the reference implementation's layout (deltas concatenated
    along the input dimension, a shared *output* basis ``U``, task-specific ``V_t`` blocks of ``Vh``).
    Only ``k`` singular values above float64 round-off are kept, as KnOTS drops unsupported directions.

    Computed without any ``Δ_t``: with ``[s_1 B_1 | ... | s_T B_T] = Q_B R_B`` and ``A_t^T = Q_t R_t``,
    the concatenation is ``Q_B · K · blockdiag(Q_t)^T`` with the small ``K = R_B · blockdiag(R_t^T)``
    (``R x R``); ``K = u S w^T`` gives ``U = Q_B u`` and ``V_t = w_t^T Q_t^T`` (``w_t``: task t's rows of
    ``w``). Costs ``O((out + T in) R^2)``.
    """
    if not deltas:
        raise ValueError("knots_space needs at least one delta")
    out = _out_dtype(*(d.B for d in deltas), *(d.A for d in deltas), dtype=dtype)
    QB, RB = torch.linalg.qr(torch.cat([d.B.to(_WORK) * d.scale for d in deltas], dim=1))
    Qs, Rts = [], []
    for d in deltas:
        Qt, Rt = torch.linalg.qr(d.A.to(_WORK).T)          # A_t^T = Q_t R_t: [in, k_t], [k_t, r_t]
        Qs.append(Qt)
        Rts.append(Rt.T)                                    # R_t^T: [r_t, k_t]
    K = RB @ torch.block_diag(*Rts)                         # [kB, sum k_t]
    u, S, wT = torch.linalg.svd(K, full_matrices=False)
    keep = S > S.max() * max(K.shape) * torch.finfo(_WORK).eps if S.numel() else S > 0
    u, S, wT = u[:, keep], S[keep], wT[keep]
    U = QB @ u
    Vs, start = [], 0
    for Qt in Qs:
        k_t = Qt.shape[1]
        Vs.append(wT[:, start:start + k_t] @ Qt.T)          # [k, in]
        start += k_t
    return U.to(out), S.to(out), [V.to(out) for V in Vs]


def _top_eigvecs(gram: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` leading eigenvectors of (a batch of) symmetric PSD matrices, largest first: the leading left
    singular vectors of any ``Y`` with ``Y @ Y.T == gram`` (one LAPACK call per matrix, batched)."""
    return torch.linalg.eigh(gram)[1][..., -k:].flip(-1)


def tucker2(X: torch.Tensor, rank: int, max_sweeps: int = 1000, tol: float = 1e-6
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tucker-2 (modes 0 and 1 at rank ``rank``, the task mode kept whole) of a batch of 3-way tensors by HOOI.

    ``X``: ``[G, T, m, n]``, G independent ``m x n x T`` tensors given by their T slices (e.g. the balanced
    core tensors ``M_t`` of G modules; slices first, so no copy is made of a float64 input). Returns
    ``P [G, m, r]``, ``Q [G, n, r]`` with orthonormal columns and ``sweeps [G]`` (sweeps run per tensor).
    The algorithm and stop rule are tensorly's ``partial_tucker(init="svd")`` as Compress-then-Merge calls it
    (``n_iter_max=1000, tol=1e-6``): start from the leading left singular vectors of the mode-0 and mode-1
    unfoldings (truncated HOSVD); each sweep replaces ``P`` by the leading left singular vectors of
    ``X x_1 Q^T`` (mode 0) and then ``Q`` by those of ``X x_0 P^T`` (mode 1); after sweep ``i`` the relative
    error ``e_i = sqrt(|‖X‖² - ‖X x_0 P^T x_1 Q^T‖²|) / ‖X‖`` is recorded, and from the third sweep on it stops
    once ``|e_{i-1} - e_i| < tol``, else after ``max_sweeps``. Each tensor of the batch stops at its own
    sweep (finished ones drop out of the batch), so a tensor gets the same factors alone or in any batch, up
    to float round-off of the batched products. An all-zero tensor keeps its (arbitrary, deterministic)
    start. The singular vectors come from ``eigh`` of the small Gram matrices (``Y Y^T``), which give the
    same subspaces as tensorly's SVD; the signs of the columns may differ, which no CtM result depends on.
    Float64 throughout (``X`` is converted).
    """
    Xs = X.to(_WORK).contiguous()                                # [G, T, m, n]: the task slices M_t
    G, T, m, n = Xs.shape
    r0, r1 = min(rank, m), min(rank, n)
    G0 = torch.zeros(G, m, m, dtype=_WORK)
    G1 = torch.zeros(G, n, n, dtype=_WORK)
    for t in range(T):      # slice by slice: no temporary as large as X
        G0.baddbmm_(Xs[:, t], Xs[:, t].transpose(1, 2))          # sum_t M_t M_t^T
        G1.baddbmm_(Xs[:, t].transpose(1, 2), Xs[:, t])          # sum_t M_t^T M_t
    P, Q = _top_eigvecs(G0, r0), _top_eigvecs(G1, r1)
    norm2 = G0.diagonal(dim1=1, dim2=2).sum(dim=1)                # ||X||^2 = trace(sum_t M_t M_t^T)
    del G0, G1
    sweeps = torch.zeros(G, dtype=torch.long)
    active = torch.nonzero(norm2 > 0).flatten()
    Xa = Xs if active.numel() == G else Xs[active]
    Pa, Qa, na = P[active], Q[active], norm2[active]
    prev = torch.full_like(na, float("nan"))
    for it in range(max_sweeps):
        g = Xa.shape[0]
        if g == 0:
            break
        Y = (Xa @ Qa[:, None]).transpose(1, 2).reshape(g, m, T * r1)   # unfolding of X x_1 Q^T
        Pa = _top_eigvecs(Y @ Y.transpose(1, 2), r0)
        Z = (Pa.transpose(1, 2)[:, None] @ Xa).reshape(g, T * r0, n)       # unfolding of X x_0 P^T, transposed
        Qa = _top_eigvecs(Z.transpose(1, 2) @ Z, r1)
        core2 = (Z @ Qa).square().sum(dim=(1, 2))
        err = (na - core2).abs().sqrt() / na.sqrt()
        sweeps[active] += 1
        done = (err - prev).abs() < tol if it > 1 else torch.zeros_like(err, dtype=torch.bool)
        prev = err
        if bool(done.any()):   # finished tensors keep their factors and leave the batch
            P[active], Q[active] = Pa, Qa
            keep = ~done
            active, Xa, Pa, Qa, na, prev = active[keep], Xa[keep], Pa[keep], Qa[keep], na[keep], prev[keep]
    P[active], Q[active] = Pa, Qa
    return P, Q, sweeps
