"""Full-space merge rules: oracle tests against PEFT's merge_utils, mergekit's TIES arithmetic on a hand-worked
example, and the algebraic properties of TSV-M and Iso-C."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch
from peft.utils import merge_utils as peft
from torch.testing import assert_close

from malleable.merge import RULES, get_rule
from malleable.merge.dare import dare_masks
from malleable.merge.ties import trim_magnitude

SHAPES = [(37,), (16, 12), (4, 6, 5)]
WEIGHTS = [(0.5, 1.25, 0.8), (1.0, -0.6, 0.3)]


def task_vectors(shape, seed=0, n=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(n)]


def merge(name, tensors, weights, seed=0, **params):
    """Call a rule the way the engine does: every parameter given, per-input ones as lists."""
    rule = get_rule(name)
    kwargs = {k: [p.default] * len(tensors) if p.per_input else p.default for k, p in rule.params.items()}
    kwargs.update(params)
    return rule.fn([t.clone() for t in tensors], list(weights), torch.Generator().manual_seed(seed), **kwargs)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("weights", WEIGHTS)
def test_task_arithmetic_matches_peft(shape, weights):
    tvs = task_vectors(shape)
    assert_close(merge("task_arithmetic", tvs, weights), peft.task_arithmetic(tvs, torch.tensor(weights)))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("weights", WEIGHTS)
@pytest.mark.parametrize("sign_method", ["total", "frequency"])
def test_ties_matches_peft(shape, weights, sign_method):
    tvs = task_vectors(shape)
    got = merge("ties", tvs, weights, density=[0.4] * 3, sign_method=sign_method)
    assert_close(got, peft.ties(tvs, torch.tensor(weights), 0.4, sign_method))


def test_ties_per_input_density_matches_peft_parts():
    tvs, weights, density = task_vectors((16, 12)), (0.5, 1.25, 0.8), [0.2, 0.5, 0.9]
    trimmed = torch.stack([peft.prune(t, d, "magnitude") for t, d in zip(tvs, density)])
    mask = peft.calculate_majority_sign_mask(trimmed, "total")
    w = peft.reshape_weight_task_tensors(trimmed, torch.tensor(weights))
    assert_close(merge("ties", tvs, weights, density=density), peft.disjoint_merge(trimmed * w, mask))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("weights", WEIGHTS)
def test_magnitude_prune_matches_peft(shape, weights):
    tvs = task_vectors(shape)
    got = merge("magnitude_prune", tvs, weights, density=[0.3] * 3)
    assert_close(got, peft.magnitude_prune(tvs, torch.tensor(weights), 0.3))


def full_mask(t, density, generator):
    """The keep-mask our DARE draws for `t`, block by block, as one tensor."""
    return torch.cat([m.view(-1) for m in dare_masks(t, density, generator)]).view(t.shape)


def peft_with_our_masks(monkeypatch, fn, tvs, weights, density, seed, *args):
    """Run PEFT's DARE with torch.bernoulli returning the masks our rule draws from `seed`, input by input."""
    g = torch.Generator().manual_seed(seed)
    masks = iter([full_mask(t, density, g) for t in tvs])
    with monkeypatch.context() as m:
        m.setattr(peft.torch, "bernoulli", lambda probs: next(masks))
        return fn(tvs, torch.tensor(weights), density, *args)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("weights", WEIGHTS)
def test_dare_linear_matches_peft_with_same_mask(monkeypatch, shape, weights):
    tvs = task_vectors(shape)
    expected = peft_with_our_masks(monkeypatch, peft.dare_linear, tvs, weights, 0.3, 7)
    assert_close(merge("dare_linear", tvs, weights, seed=7, density=[0.3] * 3), expected)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("weights", WEIGHTS)
@pytest.mark.parametrize("sign_method", ["total", "frequency"])
def test_dare_ties_matches_peft_with_same_mask(monkeypatch, shape, weights, sign_method):
    tvs = task_vectors(shape)
    expected = peft_with_our_masks(monkeypatch, peft.dare_ties, tvs, weights, 0.3, 7, sign_method)
    got = merge("dare_ties", tvs, weights, seed=7, density=[0.3] * 3, sign_method=sign_method)
    assert_close(got, expected)


# mergekit's TIES (generalized_task_arithmetic.py, `ties`): signs elected from the weighted deltas; the disjoint
# sum divided by the sum of the agreeing weights, a zero divisor replaced by 1. Worked by hand:
#   weighted: [1, -2, .5, 3], [1, 2, -2, 0], [1, .5, .5, 0]  -> elected signs (sum) +, +, -, +
#   entry 0: 3/3.5; entry 1: (2 + .5)/(2 + .5); entry 2: -2/2; entry 3: 3/1
CASE_TVS = [torch.tensor([1.0, -2.0, 0.5, 3.0]), torch.tensor([0.5, 1.0, -1.0, 0.0]),
            torch.tensor([2.0, 1.0, 1.0, 0.0])]
CASE_W = (1.0, 2.0, 0.5)


@pytest.mark.parametrize("normalize,weighted_election,expected", [
    ("weights", True, [3 / 3.5, 1.0, -1.0, 3.0]),   # mergekit ties (normalize: true)
    ("none", True, [3.0, 2.5, -2.0, 3.0]),          # mergekit ties, normalize: false
    ("count", True, [1.0, 1.25, -2.0, 3.0]),
    ("count", False, [1.0, 1.25, 0.5, 3.0]),        # PEFT: unweighted sums 3.5, 0, .5, 3 elect +, +, +, +
])
def test_ties_normalize_and_election_by_hand(normalize, weighted_election, expected):
    got = merge("ties", CASE_TVS, CASE_W, normalize=normalize, weighted_election=weighted_election)
    assert_close(got, torch.tensor(expected))


def test_ties_weights_zero_divisor_counts_as_one():
    # weights 1 and -1 on opposite-signed entries agree (+1, +1) and their weights sum to 0 (mergekit: divisor 1)
    tvs = [torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 0.0]), torch.tensor([0.0, 0.0])]
    got = merge("ties", tvs, (1.0, -1.0, 2.0), normalize="weights", weighted_election=True)
    assert_close(got, torch.tensor([2.0, 0.0]))


def test_ties_weights_with_uniform_weights_is_peft_over_weight():
    tvs, c = task_vectors((16, 12)), 0.7
    got = merge("ties", tvs, (c,) * 3, density=[0.4] * 3, normalize="weights", weighted_election=True)
    assert_close(got, peft.ties(tvs, torch.tensor([c] * 3), 0.4) / c)


def test_ties_scale_multiplies():
    tvs = task_vectors((16, 12))
    assert_close(merge("ties", tvs, WEIGHTS[0], scale=2.5), 2.5 * merge("ties", tvs, WEIGHTS[0]))


@pytest.mark.parametrize("name", ["dare_linear", "dare_ties"])
def test_dare_is_deterministic_per_seed(name):
    tvs = task_vectors((16, 12))
    a = merge(name, tvs, WEIGHTS[0], seed=3, density=[0.5] * 3)
    assert torch.equal(a, merge(name, tvs, WEIGHTS[0], seed=3, density=[0.5] * 3))
    assert not torch.equal(a, merge(name, tvs, WEIGHTS[0], seed=4, density=[0.5] * 3))


def test_dare_mask_keeps_density_fraction():
    mask = full_mask(torch.zeros(200, 100), 0.3, torch.Generator().manual_seed(0))
    assert mask.dtype == torch.bool
    assert abs(mask.float().mean().item() - 0.3) < 0.01


def test_dare_linear_without_rescale_only_masks():
    tvs = task_vectors((16, 12))
    g = torch.Generator().manual_seed(5)
    masks = [full_mask(t, 0.5, g) for t in tvs]
    expected = sum(w * t * m for w, t, m in zip(WEIGHTS[0], tvs, masks))
    assert_close(merge("dare_linear", tvs, WEIGHTS[0], seed=5, density=[0.5] * 3, rescale=False), expected)


def test_tsv_single_task_full_fraction_is_identity():
    (tv,) = task_vectors((16, 12), n=1)
    assert_close(merge("tsv", [tv], (1.0,), fraction=1.0), tv, atol=1e-5, rtol=1e-5)


def truncated(t, k):
    u, s, vt = torch.linalg.svd(t, full_matrices=False)
    return (u[:, :k] * s[:k]) @ vt[:k]


def block_tasks(seed=0):
    """Three 24x18 task vectors living in disjoint row and column blocks: mutually orthogonal subspaces."""
    g, tvs = torch.Generator().manual_seed(seed), []
    for i in range(3):
        t = torch.zeros(24, 18)
        t[8 * i:8 * i + 8, 6 * i:6 * i + 6] = torch.randn(8, 6, generator=g)
        tvs.append(t)
    return tvs


@pytest.mark.parametrize("fraction,k", [(None, 6), (0.2, 3)])  # default 1/T: int(18 / 3) = 6, full rank
def test_tsv_orthogonal_tasks_sum_their_truncations(fraction, k):
    # with already-orthogonal singular vectors the whitening is the identity: TSV-M = sum_i w_i trunc_k(tau_i)
    tvs, weights = block_tasks(), (0.5, 1.25, -0.8)
    expected = sum(w * truncated(t, k) for w, t in zip(weights, tvs))
    assert_close(merge("tsv", tvs, weights, fraction=fraction, scale=1.5), 1.5 * expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape", [(16, 12), (10, 21)])
def test_tsv_matches_scipy_polar_reference(shape):
    # independent float64 reference: numpy SVDs, scipy's polar factor as the whitening
    tvs, weights = task_vectors(shape), WEIGHTS[1]
    k = min(shape) // 3
    svds = [np.linalg.svd(w * t.double().numpy(), full_matrices=False) for w, t in zip(weights, tvs)]
    u_perp = scipy.linalg.polar(np.concatenate([u[:, :k] for u, _, _ in svds], axis=1))[0]
    vt_perp = scipy.linalg.polar(np.concatenate([vt[:k] for _, _, vt in svds], axis=0))[0]
    expected = u_perp @ np.diag(np.concatenate([s[:k] for _, s, _ in svds])) @ vt_perp
    got = merge("tsv", tvs, weights)
    assert_close(got, torch.from_numpy(expected).float(), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(got, sum(w * truncated(t, k) for w, t in zip(weights, tvs)), atol=1e-2)


@pytest.mark.parametrize("name", ["tsv", "iso_c"])
def test_non_matrix_tensors_get_the_weighted_mean(name):
    tvs, weights = task_vectors((37,)), WEIGHTS[0]
    expected = sum(w * t for w, t in zip(weights, tvs)) / sum(weights)
    assert_close(merge(name, tvs, weights, scale=2.0), 2.0 * expected)


@pytest.mark.parametrize("shape", [(16, 12), (9, 20)])
def test_iso_c_flattens_the_spectrum(shape):
    tvs, weights = task_vectors(shape), WEIGHTS[1]
    summed = sum(w * t for w, t in zip(weights, tvs))
    u, s, vt = torch.linalg.svd(summed, full_matrices=False)
    got = merge("iso_c", tvs, weights, scale=1.5)
    s_got = torch.linalg.svdvals(got)
    assert_close(s_got, torch.full_like(s, 1.5 * s.mean().item()))       # every singular value equal
    assert_close(s_got.sum(), 1.5 * s.sum())                             # nuclear norm kept (times scale)
    assert_close((s_got ** 2).sum(), len(s) * (1.5 * s.mean()) ** 2)     # Frobenius^2 = r * mean^2
    assert_close(u.T @ got @ vt.T, 1.5 * s.mean() * torch.eye(len(s)), atol=1e-4, rtol=1e-4)  # same subspaces


@pytest.mark.parametrize("shape", [(7,), (5, 4), (1, 6), (3, 4, 2)])
def test_every_full_rule_keeps_the_shape(shape):
    names = sorted(name for name, rule in RULES.items() if rule.space == "full")
    assert {"ties", "dare_linear", "dare_ties", "magnitude_prune", "tsv", "iso_c"} <= set(names)
    tvs = task_vectors(shape)
    for name in names:
        rule = RULES[name]
        n = min(3, rule.inputs[1] or 3) + (rule.uses_base == "raw")  # raw rules take the base first
        required = {k: 0.5 for k, p in rule.params.items() if p.required}
        out = merge(name, tvs[:n], WEIGHTS[0][:n], **required)
        assert out.shape == torch.Size(shape) and out.dtype == torch.float32, name


# Tensors larger than one block (ties.BLOCK): trimming selects by a threshold and the disjoint merge and DARE
# work block by block; the results must not depend on that.
BIG = (300, 1000)


def test_trim_magnitude_keeps_exactly_the_k_largest_with_ties():
    # bf16-rounded task vectors: many entries share the k-th magnitude, as in real bf16 checkpoints
    t = torch.randn(BIG, generator=torch.Generator().manual_seed(1)).bfloat16().float()
    k = int(0.37 * t.numel())
    kept = trim_magnitude(t.clone(), 0.37)
    nz = kept != 0
    assert int(nz.sum()) == k
    assert torch.equal(kept[nz], t[nz])
    kth = t.abs().flatten().topk(k).values[-1]
    assert kept.abs()[nz].min() == kth and t.abs()[~nz].max() <= kth
    tied_kept = (nz & (t.abs() == kth)).flatten().nonzero().flatten()
    tied_all = (t.abs() == kth).flatten().nonzero().flatten()
    assert torch.equal(tied_kept, tied_all[:tied_kept.numel()])  # ties kept in flattened order


@pytest.mark.parametrize("weights", WEIGHTS)
def test_ties_and_magnitude_prune_match_peft_on_multi_block_tensors(weights):
    tvs = task_vectors(BIG)
    assert_close(merge("ties", tvs, weights, density=[0.4] * 3), peft.ties(tvs, torch.tensor(weights), 0.4))
    assert_close(merge("magnitude_prune", tvs, weights, density=[0.3] * 3),
                 peft.magnitude_prune(tvs, torch.tensor(weights), 0.3))


def test_dare_ties_matches_peft_with_same_mask_on_multi_block_tensors(monkeypatch):
    tvs = task_vectors(BIG)
    expected = peft_with_our_masks(monkeypatch, peft.dare_ties, tvs, WEIGHTS[1], 0.3, 7, "total")
    assert_close(merge("dare_ties", tvs, WEIGHTS[1], seed=7, density=[0.3] * 3), expected)
