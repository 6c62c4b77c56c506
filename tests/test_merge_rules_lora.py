"""LoRA-native merge rules (concat, knots, core_space, ctm) and the linear algebra under them."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from malleable.deltas.linalg import core_space, knots_space, lowrank_from_dense, truncated_svd
from malleable.deltas.lowrank import LowRankDelta
from malleable.errors import RecipeError
from malleable.merge import RULES, get_rule

F64 = torch.float64


def loras(shapes=((4, 2.0), (6, 0.5), (3, 1.5)), out=40, inp=30, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [LowRankDelta(torch.randn(out, r, generator=g, dtype=dtype), torch.randn(r, inp, generator=g, dtype=dtype),
                         s) for r, s in shapes]


def exact_sum(deltas, weights):
    return sum(w * d.B.double() @ d.A.double() * d.scale for d, w in zip(deltas, weights))


def close(got: torch.Tensor, want: torch.Tensor, rel: float = 1e-5):
    """Equal up to float32 round-off relative to the matrix's size."""
    assert_close(got.double(), want.double(), rtol=0, atol=rel * float(want.abs().max()))


W = [1.0, -0.5, 2.0]


# --- linear algebra -------------------------------------------------------------------------------------

def test_truncated_svd_and_lowrank_from_dense():
    M = torch.randn(20, 12, generator=torch.Generator().manual_seed(1))
    U, S, Vh = truncated_svd(M, 5)
    assert U.shape == (20, 5) and S.shape == (5,) and Vh.shape == (5, 12)
    full = torch.linalg.svd(M, full_matrices=False)
    close(U @ torch.diag(S) @ Vh, full.U[:, :5] @ torch.diag(full.S[:5]) @ full.Vh[:5])
    d = lowrank_from_dense(M, 5)
    assert d.rank == 5 and d.scale == 1.0
    close(d.dense(), U @ torch.diag(S) @ Vh)
    assert_close(d.B.norm(dim=0), d.A.norm(dim=1))   # sqrt(S) on each side: balanced factors
    assert lowrank_from_dense(M, 100).rank == 12      # a rank above min(m, n) keeps everything


def test_core_space_reconstructs_each_task_exactly():
    deltas = loras()
    U_B, V_A, cores = core_space(deltas, dtype=F64)
    R = sum(d.rank for d in deltas)
    assert U_B.shape == (40, R) and V_A.shape == (R, 30) and all(M.shape == (R, R) for M in cores)
    assert_close(U_B.T @ U_B, torch.eye(R, dtype=F64))   # orthonormal columns (output side)
    assert_close(V_A @ V_A.T, torch.eye(R, dtype=F64))   # orthonormal rows (input side)
    for d, M in zip(deltas, cores):
        close(U_B @ M @ V_A, d.dense())
    # the bases are the singular vectors of the stacks (the paper's reference bases)
    stack = torch.cat([d.B.double() * d.scale for d in deltas], dim=1)
    S = torch.linalg.svdvals(stack)
    assert_close((U_B.T @ stack).norm(dim=1), S)
    # rank-deficient stacks (two tasks share B) and out < R: still exact
    B0 = torch.randn(10, 4, dtype=F64)
    shared = [LowRankDelta(B0, torch.randn(4, 30, dtype=F64)), LowRankDelta(B0 * 3, torch.randn(4, 30, dtype=F64)),
              LowRankDelta(torch.randn(10, 5, dtype=F64), torch.randn(5, 30, dtype=F64), 0.7)]
    U_B, V_A, cores = core_space(shared)
    assert U_B.shape == (10, 10) and V_A.shape == (13, 30)
    for d, M in zip(shared, cores):
        close(U_B @ M @ V_A, d.scale * d.B @ d.A, 1e-10)


def test_knots_space_reconstructs_the_concatenation():
    deltas = loras()
    U, S, Vs = knots_space(deltas, dtype=F64)
    assert_close(U.T @ U, torch.eye(len(S), dtype=F64))
    V = torch.cat(Vs, dim=1)
    assert_close(V @ V.T, torch.eye(len(S), dtype=F64))
    for d, Vt in zip(deltas, Vs):
        close(U @ torch.diag(S) @ Vt, d.dense())
    dense = torch.cat([d.dense().double() for d in deltas], dim=1)
    assert_close(S, torch.linalg.svdvals(dense)[:len(S)])


# --- rules ----------------------------------------------------------------------------------------------

def test_concat_is_exact_and_refuses_a_smaller_rank():
    deltas = loras()
    out = get_rule("concat").fn(deltas, W, torch.Generator(), None)
    assert out.rank == 13 and out.scale == 1.0
    close(out.dense(), exact_sum(deltas, W))
    assert get_rule("concat").fn(deltas, W, torch.Generator(), 20).rank == 13
    with pytest.raises(RecipeError, match="rank"):
        get_rule("concat").fn(deltas, W, torch.Generator(), 12)


def test_core_space_with_task_arithmetic_is_the_exact_sum():
    deltas = loras()
    rule = get_rule("core_space")
    assert rule.space == "lora" and rule.inner
    out = rule.fn(deltas, W, torch.Generator(), None, inner="task_arithmetic", normalize=False, scale=1.0)
    assert out.rank == 13                                   # rank T r: nothing is lost
    want = exact_sum(deltas, W)
    close(out.dense(), want)
    # a smaller rank truncates the small core: for a linear inner rule that is merge-then-compress exactly
    low = rule.fn(deltas, W, torch.Generator(), 5, inner="task_arithmetic")
    assert low.rank == 5
    close(low.dense(), lowrank_from_dense(want, 5).dense())


def test_knots_with_task_arithmetic_at_full_rank_is_the_exact_sum():
    deltas = loras()
    want = exact_sum(deltas, W)
    out = get_rule("knots").fn(deltas, W, torch.Generator(), 13, inner="task_arithmetic")
    close(out.dense(), want)
    default = get_rule("knots").fn(deltas, W, torch.Generator(), None, inner="task_arithmetic")
    assert default.rank == 6                                # the largest input rank
    close(default.dense(), lowrank_from_dense(want, 6).dense())


@pytest.mark.parametrize("r", [1, 3, 6, 9])
def test_ctm_rank_is_at_most_r(r):
    deltas = loras()
    out = get_rule("ctm").fn(deltas, W, torch.Generator(), r, inner="task_arithmetic", beta=1.0, iters=10)
    assert out.rank <= r and out.shape == (40, 30)
    assert torch.linalg.matrix_rank(out.dense(), rtol=1e-5) <= r
    assert get_rule("ctm").fn(deltas, W, torch.Generator(), None, inner="task_arithmetic").rank <= 6


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_ctm_is_exact_when_the_loras_share_rank_r_subspaces(beta):
    """B_t = B0 G_t, A_t = H_t A0: one rank-r left and right subspace, so the Tucker step loses nothing."""
    g = torch.Generator().manual_seed(5)
    B0, A0 = torch.randn(40, 4, generator=g), torch.randn(4, 30, generator=g)
    deltas = [LowRankDelta(B0 @ torch.randn(4, r, generator=g), torch.randn(r, 4, generator=g) @ A0, s)
              for r, s in [(4, 1.0), (6, 0.3), (5, 2.0)]]
    out = get_rule("ctm").fn(deltas, W, torch.Generator(), 4, inner="task_arithmetic", beta=beta, iters=20)
    assert out.rank == 4
    close(out.dense(), exact_sum(deltas, W), 1e-4)


@pytest.mark.skipif("ties" not in RULES, reason="ties is not registered yet")
@pytest.mark.parametrize("method", ["knots", "core_space", "ctm"])
def test_inner_rule_parameters_pass_through(method):
    deltas = loras()
    rule = get_rule(method)
    out = rule.fn(deltas, W, torch.Generator(), 4, inner="ties", density=[0.5] * 3, sign_method="frequency")
    assert out.rank <= (4 if method != "core_space" else 13) and torch.isfinite(out.dense()).all()
    assert rule.fn(deltas, W, torch.Generator(), 4, inner="ties", density=0.5).rank > 0  # one value: all inputs
    with pytest.raises(RecipeError, match="densty"):
        rule.fn(deltas, W, torch.Generator(), 4, inner="ties", densty=0.5)
    with pytest.raises(RecipeError, match="full-space"):
        rule.fn(deltas, W, torch.Generator(), 4, inner="concat")


@pytest.mark.skipif("ties" not in RULES, reason="ties is not registered yet")
def test_knots_and_core_space_match_their_dense_reference_computations():
    """The reference implementations (gstoica27/KnOTS, apanariello4/core-space-merging) work on dense
    matrices; ours from the factors must give the same merge for a non-linear inner rule (TIES), since
    TIES is equivariant to the sign freedom of singular vectors."""
    deltas = loras(shapes=((4, 1.0), (6, 1.0), (3, 1.0)))   # equal scales: the reference stacks raw B's
    ties = get_rule("ties")
    params = {k: p.default for k, p in ties.params.items()} | {"density": [0.3] * 3}
    dense = [d.B.double() @ d.A.double() for d in deltas]
    # KnOTS: SVD of [Δ_1 | ... | Δ_T], TIES on the S V_t blocks, U @ merged, then truncation to the rank
    U, S, Vh = torch.linalg.svd(torch.cat(dense, dim=1), full_matrices=False)
    keep = S > 1e-8 * S[0]
    U, S, Vh = U[:, keep], S[keep], Vh[keep]
    coords = [(S[:, None] * V).float() for V in Vh.split(30, dim=1)]
    want = U @ ties.fn(coords, W, torch.Generator(), **params).double()
    got = get_rule("knots").fn(deltas, W, torch.Generator(), 7, inner="ties", density=0.3)
    close(got.dense(), lowrank_from_dense(want, 7).dense(), 1e-4)
    # Core Space: reference bases from SVDs of the stacks, M_t = U_B^T B_t A_t V_A^T, TIES, U_B M V_A
    U_B = torch.linalg.svd(torch.cat([d.B.double() for d in deltas], dim=1), full_matrices=False)[0]
    V_A = torch.linalg.svd(torch.cat([d.A.double() for d in deltas], dim=0), full_matrices=False)[2]
    cores = [(U_B.T @ D @ V_A.T).float() for D in dense]
    want = U_B @ ties.fn(cores, W, torch.Generator(), **params).double() @ V_A
    got = get_rule("core_space").fn(deltas, W, torch.Generator(), None, inner="ties", density=0.3)
    close(got.dense(), want, 1e-4)


@pytest.mark.skipif("dare_ties" not in RULES, reason="dare_ties is not registered yet")
@pytest.mark.parametrize("method", ["knots", "core_space", "ctm"])
def test_random_inner_rule_is_seeded_only_by_the_generator(method):
    deltas = loras()

    def run(seed):
        torch.manual_seed(1234 + seed)   # the global RNG must not matter
        out = get_rule(method).fn(deltas, W, torch.Generator().manual_seed(seed), 4, inner="dare_ties", density=0.5)
        return out.dense()

    assert torch.equal(run(0), run(0))
    assert not torch.equal(run(0), run(1))


@pytest.mark.parametrize("method", ["concat", "knots", "core_space", "ctm"])
def test_lora_rules_never_form_the_dense_delta(method):
    """out = in = 200,000: B @ A would need 160 GB; the rules must work in the factors' space."""
    n = 200_000
    g = torch.Generator().manual_seed(0)
    deltas = [LowRankDelta(torch.randn(n, 2, generator=g), torch.randn(2, n, generator=g), 1.0) for _ in range(3)]
    kw = {} if method == "concat" else {"inner": "task_arithmetic"}
    out = get_rule(method).fn(deltas, [1.0, 1.0, 1.0], torch.Generator(), None, **kw)
    assert out.shape == (n, n)
    x = torch.randn(n, 3, generator=g)
    want = sum(d.B @ (d.A @ x) for d in deltas)
    got = out.B @ (out.A @ x)
    if method in ("concat", "core_space"):   # exact; knots and ctm truncate to rank 2
        assert_close(got, want, rtol=1e-3, atol=1e-3 * float(want.abs().max()))


# --- merge-then-compress against PEFT's add_weighted_adapter ----------------------------------------------

@pytest.fixture(scope="module")
def peft_model():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=4, vocab_size=128,
                                        max_position_embeddings=64))
    configs = [LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
               LoraConfig(r=6, lora_alpha=6, target_modules=["q_proj", "v_proj", "down_proj"]),
               LoraConfig(r=4, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "v_proj", "down_proj"])]
    model = get_peft_model(base, configs[0], adapter_name="t0")
    for i, cfg in enumerate(configs[1:], 1):
        model.add_adapter(f"t{i}", cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:   # PEFT initialises lora_B to zero; give every factor a random value
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def lora_layers(model):
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def peft_and_ours(model, combination_type, adapter_name, full_rule, rank, weights, **kw):
    """PEFT's merged adapter's B @ A per module, and ours: full rule on the dense deltas, then truncated SVD."""
    peft_kw = {k: v for k, v in kw.items() if k in ("density", "majority_sign_method")}
    model.add_weighted_adapter(["t0", "t1", "t2"], weights, adapter_name, combination_type=combination_type,
                               svd_rank=rank, **peft_kw)
    rule = get_rule(full_rule)
    params = {k: p.default for k, p in rule.params.items()}
    params.update({k: v for k, v in kw.items() if k in rule.params})
    pairs = []
    for name, layer in lora_layers(model).items():
        assert layer.scaling[adapter_name] == 1.0   # PEFT sets alpha = r for the merged adapter
        theirs = layer.lora_B[adapter_name].weight @ layer.lora_A[adapter_name].weight
        # our inputs: each adapter's factors with PEFT's scale (alpha / r, or alpha / sqrt(r) with rsLoRA)
        deltas = [LowRankDelta(layer.lora_B[t].weight.detach(), layer.lora_A[t].weight.detach(), layer.scaling[t])
                  for t in ("t0", "t1", "t2")]
        if "density" in params and rule.params["density"].per_input:
            params["density"] = [kw["density"]] * 3
        merged = rule.fn([d.dense() for d in deltas], list(weights), torch.Generator(), **params)
        ours = lowrank_from_dense(merged, rank)
        assert ours.rank == rank
        pairs.append((name, ours.dense(), theirs.detach()))
    return pairs


def test_svd_merge_matches_peft_add_weighted_adapter(peft_model):
    # PEFT's "svd" multiplies each scaled delta (get_delta_weight: B @ A * alpha / r) by its weight as is (no
    # square root, unlike its factor-wise "linear"), sums, and keeps U S / Vh of the top svd_rank triplets.
    weights = [0.7, -0.4, 1.3]
    for name, ours, theirs in peft_and_ours(peft_model, "svd", "m_svd", "task_arithmetic", 5, weights):
        assert_close(ours, theirs, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.skipif("ties" not in RULES, reason="ties is not registered yet")
@pytest.mark.parametrize("sign", ["total", "frequency"])
def test_ties_svd_matches_peft_add_weighted_adapter(peft_model, sign):
    # PEFT's ties: trim to int(density * numel) by magnitude, elect the sign from the unweighted trimmed deltas,
    # divide the agreeing weighted sum by the number of agreeing tasks: our ties with normalize="count".
    weights = [0.7, 0.4, 1.3]
    pairs = peft_and_ours(peft_model, "ties_svd", f"m_ties_{sign}", "ties", 6, weights, density=0.4,
                          majority_sign_method=sign, sign_method=sign, normalize="count",
                          weighted_election=False)
    for name, ours, theirs in pairs:
        assert_close(ours, theirs, rtol=1e-4, atol=1e-6, msg=name)


# --- CtM against the authors' code ------------------------------------------------------------------------
# A transcription, in our words, of Compress-then-Merge as its authors run it: github.com/ZhengbaoHe/
# compress-then-merge at commit 6017d1e5fc293717aacc215d0e42b9f3d75eda86, task_merger.py
# (util_get_core_matrices, get_low_rank_components_in_core_space, merge_space="low_rank_core") with
# tensorly's partial_tucker(rank=[r, r], modes=[0, 1], n_iter_max=1000, tol=1e-6, init="svd") written out,
# and merging_functions.py (ties_merging: topk_values_mask, resolve_sign, disjoint_merge "mean").

def _svd_left(M, r):
    return torch.linalg.svd(M, full_matrices=False)[0][:, :r]


def _authors_ctm(As, Bs, r, beta, merge):
    Bst, Ast = torch.cat(Bs, dim=1), torch.cat(As, dim=0)
    U_B, Vh_A = _svd_left(Bst, None), torch.linalg.svd(Ast, full_matrices=False)[2]   # reference bases
    X = torch.stack([U_B.T @ B @ A @ Vh_A.T for A, B in zip(As, Bs)], dim=-1)          # [R, R, T]
    norms = torch.linalg.vector_norm(X, dim=(0, 1), keepdim=True)
    X = X / norms * (norms * beta + norms.mean() * (1 - beta))                         # balancing
    factors = [_svd_left(X.reshape(X.shape[0], -1), r), _svd_left(X.transpose(0, 1).reshape(X.shape[1], -1), r)]
    norm_x, errors = torch.linalg.vector_norm(X), []
    for it in range(1000):
        Y = torch.einsum("ijt,jb->ibt", X, factors[1])                                 # X x_1 U1^T
        factors[0] = _svd_left(Y.reshape(Y.shape[0], -1), r)
        Y = torch.einsum("ijt,ia->ajt", X, factors[0])                                 # X x_0 U0^T
        factors[1] = _svd_left(Y.transpose(0, 1).reshape(Y.shape[1], -1), r)
        core = torch.einsum("ijt,ia,jb->abt", X, *factors)
        errors.append(float((norm_x ** 2 - torch.linalg.vector_norm(core) ** 2).abs().sqrt() / norm_x))
        if it > 1 and abs(errors[-2] - errors[-1]) < 1e-6:
            break
    U0, U1 = U_B @ factors[0], Vh_A.T @ factors[1]
    merged = merge([U0.T @ B @ A @ U1 for A, B in zip(As, Bs)])
    return U0 @ merged @ U1.T, it + 1


def _authors_ties(cores, topK):
    flat = torch.stack([c.flatten() for c in cores])                                   # [T, d]
    d = flat.shape[1]
    kth = flat.abs().kthvalue(d - int(d * topK / 100), dim=1, keepdim=True).values
    pruned = flat * (flat.abs() >= kth)                                                # keeps int(d K) + 1
    sign = torch.sign(pruned.sum(dim=0))
    sign[sign == 0] = torch.sign(sign.sum())
    agree = torch.where(sign > 0, pruned > 0, pruned < 0)
    picked = pruned * agree
    return (picked.sum(dim=0) / (picked != 0).sum(dim=0).clamp(min=1)).reshape(cores[0].shape)


def _rel(a, b):
    return float(torch.linalg.matrix_norm(a.double() - b.double()) / torch.linalg.matrix_norm(b.double()))


@pytest.mark.parametrize("beta", [0.0, 0.25, 0.75, 1.0])
@pytest.mark.parametrize("inner", ["task_arithmetic", "ties"])
def test_ctm_matches_the_authors_code(beta, inner):
    """Fixed random factors of very different norms (so beta matters), T = 4, rank 5 -> r = 5."""
    g = torch.Generator().manual_seed(11)
    deltas = [LowRankDelta(torch.randn(48, 5, generator=g, dtype=F64) * s, torch.randn(5, 36, generator=g, dtype=F64))
              for s in (0.2, 1.0, 3.0, 0.6)]
    As, Bs = [d.A for d in deltas], [d.B for d in deltas]
    lam, topK = 0.7, 30
    if inner == "ties":
        want, sweeps = _authors_ctm(As, Bs, 5, beta, lambda cs: lam * _authors_ties(cs, topK))
        k = int(25 * topK / 100) + 1                       # the entries their mask keeps, of r^2 = 25
        params = {"density": (k + 0.5) / 25, "scale": lam}
        weights = [1.0] * 4
    else:
        want, sweeps = _authors_ctm(As, Bs, 5, beta, lambda cs: lam * sum(cs))
        params, weights = {}, [lam] * 4
    assert 3 <= sweeps < 1000
    got = get_rule("ctm").fn(deltas, weights, torch.Generator(), 5, inner=inner, beta=beta, **params)
    assert _rel(got.dense(), want) < 1e-6
    # the tolerance can tell stop rules apart: one sweep fewer than theirs is measurably another answer
    capped = get_rule("ctm").fn(deltas, weights, torch.Generator(), 5, inner=inner, beta=beta, iters=sweeps - 1,
                                **params)
    assert _rel(capped.dense(), want) > 1e-6


def test_tucker2_stop_rule_and_cap():
    from malleable.deltas.linalg import tucker2

    X = torch.randn(3, 4, 20, 16, generator=torch.Generator().manual_seed(2), dtype=F64)   # [G, T, m, n]
    X[2] = 0                                                            # an all-zero tensor runs no sweep
    P, Q, sweeps = tucker2(X, 4)
    assert P.shape == (3, 20, 4) and Q.shape == (3, 16, 4)
    assert sweeps[0] >= 3 and sweeps[1] >= 3 and sweeps[2] == 0
    assert_close(P[0].T @ P[0], torch.eye(4, dtype=F64))
    assert tucker2(X, 4, max_sweeps=2)[2].max() == 2
    # one tensor alone or in the batch: the same sweeps and subspaces
    P1, Q1, s1 = tucker2(X[1:2], 4)
    assert s1[0] == sweeps[1]
    assert_close(P1[0] @ P1[0].T, P[1] @ P[1].T, rtol=0, atol=1e-10)


def _jobs():
    from malleable.merge.registry import LoraJob

    g = torch.Generator().manual_seed(3)
    jobs = []
    for i, (out, inp, ranks) in enumerate([(40, 30, (4, 4, 4)), (24, 30, (4, 4, 4)), (40, 30, (4, 4, 4)),
                                           (40, 30, (2, 6, 4)), (8, 30, (4, 4, 4)), (40, 30, (3, 3, 3))]):
        deltas = [LowRankDelta(torch.randn(out, r, generator=g), torch.randn(r, inp, generator=g), 0.5 + t)
                  for t, r in enumerate(ranks)]
        if i == 2:                                          # rank-deficient B stack: the QR fallback
            deltas[1] = LowRankDelta(deltas[0].B * 2, deltas[1].A, 1.0)
        jobs.append(LoraJob(deltas, [1.0, 0.5, 2.0], torch.Generator().manual_seed(i), 4 if i != 5 else None,
                            {"inner": "ties", "beta": 0.25 * (i % 4), "density": 0.5}))
    return jobs


def test_ctm_batch_equals_the_per_module_rule_and_is_deterministic():
    from malleable.merge.ctm import ctm_batch

    jobs = _jobs()
    batched = ctm_batch(jobs)
    again = ctm_batch(_jobs())
    for job, b, b2 in zip(jobs, batched, again):
        one = get_rule("ctm").fn(job.deltas, job.weights, torch.Generator().manual_seed(0), job.rank, **job.params)
        assert b.shape == job.deltas[0].shape and b.rank <= 4
        assert _rel(b.dense(), one.dense()) < 1e-6
        assert torch.equal(b.B, b2.B) and torch.equal(b.A, b2.A)     # same inputs, same bytes
    # the Cholesky core space and the QR + SVD one give the same CtM (it does not depend on the basis)
    from malleable.merge import ctm as ctm_module

    job = jobs[0]
    ref = ctm_batch([job])[0]
    old, ctm_module._CHOL_MIN = ctm_module._CHOL_MIN, 2.0           # no factor passes: always the QR path
    try:
        qr = ctm_batch([job])[0]
    finally:
        ctm_module._CHOL_MIN = old
    assert _rel(qr.dense(), ref.dense()) < 1e-6
