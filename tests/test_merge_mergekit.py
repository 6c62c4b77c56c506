"""mergekit's merge methods: slerp, nearswap, model_stock, breadcrumbs, breadcrumbs_ties, della, della_linear, sce,
nuslerp, multislerp, karcher, arcee_fusion, ram, ramplus_tl.

The main venv cannot import mergekit, so each reference below is mergekit 0.1.5's code transcribed (named by file
and function, stacked as mergekit stacks); bench/mergekit_parity.py runs mergekit itself on the same YAML.
Three kinds of test: the rule on small hand-made tensors (and random ones) against the transcription, the
mergekit YAML read into our recipe, and `malleable merge` of mergekit YAMLs on the tiny fixtures.
"""

from __future__ import annotations

import math

import pytest
import torch
import yaml
from torch.testing import assert_close
from typer.testing import CliRunner

from malleable.api import merge as run_merge
from malleable.cli import app
from malleable.errors import RecipeError
from malleable.io.checkpoint import Checkpoint
from malleable.merge import get_rule
from malleable.merge.della import keep_probabilities
from malleable.recipes.merge import load_recipe, parse_recipe


def rule(name, tensors, weights=None, seed=0, **params):
    """Call a rule the way the engine does: every parameter given, per-input ones as lists."""
    r = get_rule(name)
    n = len(tensors) - (r.uses_base == "raw")
    kwargs = {k: [p.default] * n if p.per_input else p.default for k, p in r.params.items()}
    kwargs.update({k: ([v] * n if r.params[k].per_input and not isinstance(v, list) else v) for k, v in params.items()})
    return r.fn([t.clone() for t in tensors], list(weights or [1.0] * n), torch.Generator().manual_seed(seed), **kwargs)


def rand(*shape, seed=0, n=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(n)]


# ---------------------------------------------------------------------------------------------------------------
# mergekit 0.1.5, transcribed
# ---------------------------------------------------------------------------------------------------------------
def mk_slerp(t, v0, v1, dot_threshold=0.9995, eps=1e-8):
    """merge_methods/slerp.py: slerp (one group: leading axis of 1; one chunk)."""
    a, b = v0.reshape(1, -1), v1.reshape(1, -1)
    t = torch.tensor(t).reshape(-1, 1).float()
    norm_a = torch.linalg.vector_norm(a, dim=1, keepdim=True)
    norm_b = torch.linalg.vector_norm(b, dim=1, keepdim=True)
    norm_a = torch.where(norm_a > eps, norm_a, 1)
    norm_b = torch.where(norm_b > eps, norm_b, 1)
    dot = ((a / norm_a) * (b / norm_b)).sum(dim=1, keepdim=True).clamp(-1, 1)
    linear = dot.abs() > dot_threshold
    theta = torch.acos(torch.where(linear, 0, dot))
    sin_theta = torch.sin(theta)
    coef_a = torch.where(linear, 1 - t, torch.sin((1 - t) * theta) / sin_theta)
    coef_b = torch.where(linear, t, torch.sin(t * theta) / sin_theta)
    return (coef_a * a + coef_b * b).reshape(v0.shape)


def mk_nearswap(t, a, b):
    """merge_methods/nearswap.py: nearswap_merge."""
    weight = (t / torch.abs(a - b).clamp(min=1e-6)).clamp(min=0, max=1)
    return weight * b + (1 - weight) * a


def mk_model_stock(w_0, ws, filter_wise=False):
    """merge_methods/model_stock.py: model_stock_merge_method."""
    out_shape = w_0.shape
    if filter_wise:
        if w_0.dim() == 1:
            w_0, ws = w_0.unsqueeze(0), [w.unsqueeze(0) for w in ws]
    else:
        w_0, ws = w_0.reshape(-1), [w.reshape(-1) for w in ws]
    offsets = [w - w_0 for w in ws]
    cos_thetas = []
    for idx, a in enumerate(offsets):
        for b in offsets[idx + 1:]:
            norm_product = torch.norm(a, dim=-1) * torch.norm(b, dim=-1)
            cos_thetas.append(((a * b).sum(dim=-1) / norm_product.clamp(min=1e-6)).clamp(-1, 1))
    cos_theta = torch.stack(cos_thetas).mean(dim=0).unsqueeze(-1)
    count = len(ws)
    denominator = 1 + (count - 1) * cos_theta
    singular = denominator.abs() < 1e-6
    t = torch.where(singular, torch.zeros_like(cos_theta),
                    count * cos_theta / torch.where(singular, torch.ones_like(denominator), denominator))
    return (t * (sum(ws) / count) + (1 - t) * w_0).reshape(out_shape)


def mk_rescaled(tensor, mask, rescale, eps=1e-7):
    """sparsify.py: rescaled_masked_tensor with RescaleNorm.l1 (rescale) or None."""
    masked = tensor * mask
    if not rescale:
        return masked
    before, after = tensor.abs().sum(), masked.abs().sum()
    return masked if (before < eps or after < eps) else masked * (before / after)


def mk_magnitude_outliers(tensor, density, gamma=0.01, rescale=False):
    """sparsify.py: magnitude_outliers."""
    if density >= 1:
        return tensor
    n = tensor.numel()
    target_n, n_top = int(density * n), int(gamma * n)
    n_bot = max(0, n - target_n - n_top)
    indices = torch.sort(tensor.abs().reshape(-1), descending=False).indices
    mask = torch.zeros(n)
    mask[indices[n_bot:n_bot + target_n]] = 1
    return mk_rescaled(tensor, mask.reshape_as(tensor), rescale)


def mk_della_magprune(tensor, density, epsilon, rescale=True):
    """sparsify.py: della_magprune (draws with torch.bernoulli; tests fix the draws)."""
    if density >= 1:
        return tensor
    orig_shape = tensor.shape
    if tensor.dim() < 2:
        tensor = tensor.unsqueeze(0)
    ranks = torch.argsort(tensor.abs(), dim=1, descending=False).argsort(dim=1).float() + 1
    lo, hi = ranks.min(dim=1, keepdim=True).values, ranks.max(dim=1, keepdim=True).values
    probs = (density - epsilon) + ((ranks - lo) / (hi - lo)).clamp(0, 1) * 2 * epsilon
    return mk_rescaled(tensor, torch.bernoulli(probs), rescale).reshape(orig_shape)


def mk_gta(base, tensors, weights, sparsify, consensus, normalize, lam=1.0):
    """merge_methods/generalized_task_arithmetic.py: GeneralizedTaskArithmeticMerge.merge_group + get_mask."""
    deltas = torch.stack([sparsify(i, t - base) for i, t in enumerate(tensors)])
    w = torch.tensor(weights).view(-1, *[1] * base.dim())
    deltas = deltas * w
    if consensus:
        majority = (deltas.sum(dim=0) >= 0).float() * 2 - 1
        mask = (deltas.sign() == majority).float()
        mixed, divisor = (deltas * mask).sum(dim=0), (w * mask).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed, divisor = deltas.sum(dim=0), w.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    if normalize:
        mixed = mixed / divisor
    return base + lam * mixed


def mk_sce(base, tensors, select_topk=1.0):
    """merge_methods/sce.py: sce_merge, sce_mask, sce_weight."""
    tvs = torch.stack([t - base for t in tensors])
    if select_topk < 1:
        var = torch.var(tvs, dim=0, unbiased=False)
        k = int(torch.count_nonzero(var) * select_topk)
        mask = torch.zeros_like(var)
        if k:
            mask.view(-1)[torch.topk(var.abs().view(-1), k=k, largest=True).indices] = 1
        tvs = tvs * mask.unsqueeze(0)
    majority = (tvs.sum(dim=0) >= 0).float() * 2 - 1
    erase = (tvs.sign() == majority).float()
    weights = tvs.square().reshape(tvs.shape[0], -1).mean(dim=1)
    total = weights.sum().item()
    weights = torch.ones_like(weights) / len(weights) if abs(total) < 1e-6 else weights / total
    erased = weights.view(-1, *[1] * base.dim()) * erase
    return base + (tvs * erased).sum(dim=0) / erased.sum(dim=0).clamp(min=1e-6)


def mk_nuslerp(t, v0, v1, dim=-1, eps=1e-8, flatten=False):
    """merge_methods/nuslerp.py: nuslerp."""
    out_shape = v0.shape

    def _normalize(x, eps=1e-7):
        return x / torch.norm(x, dim=-1, keepdim=True).clamp(min=eps)

    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif dim != -1:
        v0, v1 = v0.transpose(dim, -1), v1.transpose(dim, -1)
    cos_theta = torch.sum(_normalize(v0) * _normalize(v1), dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos_theta.square()) <= eps ** 2
    theta = torch.acos(torch.where(colinear, 0, cos_theta))
    result = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    result = torch.where(colinear, (1 - t) * v0 + t * v1, result)
    if dim != -1 and not flatten:
        result = result.transpose(dim, -1)
    return result.reshape(out_shape)


def mk_nuslerp_merge(base, tensors, weights, row_wise=False, flatten=True):
    """merge_methods/nuslerp.py: nuslerp_merge_method."""
    total = sum(weights)
    t = 0.5 if abs(total) < 1e-6 else weights[1] / total
    dim = 0 if row_wise else -1
    if base is None:
        return mk_nuslerp(t, tensors[0], tensors[1], dim=dim, flatten=flatten)
    return base + mk_nuslerp(t, tensors[0] - base, tensors[1] - base, dim=dim, flatten=flatten)


def mk_multislerp(base, tensors, weight, normalize_weights=True, eps=1e-8):
    """merge_methods/multislerp.py: multislerp."""
    if len(tensors) == 1:
        return tensors[0]
    tensors = torch.stack(tensors, dim=0)
    if base is not None:
        tensors = tensors - base
    flat = tensors.view(tensors.shape[0], -1)
    weights = torch.tensor(weight)
    if normalize_weights:
        weights = weights / weights.sum()
    norms = torch.norm(flat, dim=-1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * weights.view(-1, 1)).sum(0)
    mean = mean / torch.norm(mean)
    dots = (units * mean).sum(-1, keepdim=True)
    tangent = ((units - dots * mean) * weights.view(-1, 1)).sum(0)
    tangent_norm = torch.norm(tangent) + eps
    result = mean * torch.cos(tangent_norm) + tangent * (torch.sin(tangent_norm) / tangent_norm)
    result = (result * (norms.squeeze(-1) * weights).sum()).view(tensors.shape[1:])
    return result if base is None else result + base


def mk_karcher(tensors, alphas, max_iter=10, tol=1e-5):
    """merge_methods/karcher.py: karcher_merge_tensors."""
    norms = [torch.linalg.vector_norm(t) for t in tensors]
    units = [torch.zeros_like(t) if n.item() == 0 else t / n for t, n in zip(tensors, norms)]
    valid = [i for i, n in enumerate(norms) if n.item() > tol]
    alpha_sum = sum(alphas[i] for i in valid)
    va, vu = [alphas[i] / alpha_sum for i in valid], [units[i] for i in valid]
    mean = torch.zeros_like(vu[0])
    for a, u in zip(va, vu):
        mean += a * u
    mean_norm = torch.linalg.vector_norm(mean)
    mean = vu[0].clone() if mean_norm.item() < tol else mean / mean_norm
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for a, u in zip(va, vu):
            dot = torch.clamp(torch.dot(mean.flatten(), u.flatten()), -1.0, 1.0)
            theta = torch.arccos(dot)
            if theta.item() < tol:
                continue
            tangent += a * (theta / torch.sin(theta)) * (u - dot * mean)
        tangent_norm = torch.linalg.vector_norm(tangent)
        if tangent_norm.item() < tol:
            break
        mean = torch.cos(tangent_norm) * mean + torch.sin(tangent_norm) * (tangent / tangent_norm)
        unit_norm = torch.linalg.vector_norm(mean)
        if unit_norm.item() > tol:
            mean = mean / unit_norm
    return sum(a * n for a, n in zip(alphas, norms)) * mean


def mk_arcee_fusion(base, other):
    """merge_methods/arcee_fusion.py: _compute_importance, DynamicThresholdFusion, arcee_fusion_merge_method
    (tensors of at most 1M entries: exact quartiles)."""
    p = torch.softmax(other, dim=-1) + 1e-8
    q = torch.softmax(base, dim=-1) + 1e-8
    scores = (other - base).abs() * torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
    s = torch.sort(scores.reshape(-1)).values
    q1, median, q3 = s[(torch.tensor([0.25, 0.5, 0.75]) * (s.numel() - 1)).long()]
    mask = (scores >= median + 1.5 * (q3 - q1)).float()
    return base + (other - base) * mask


def mk_ram(base, tensors, epsilon=1e-5, plus=False, r=0.1, alpha=0.2):
    """merge_methods/ram.py: _prepare_ram_vectors, ram_merge (plus=False), ramplus_tl_merge (plus=True)."""
    tv = torch.stack([t - base for t in tensors]).view(len(tensors), -1)
    nonzero = tv.abs() > epsilon
    counts = nonzero.sum(dim=0, keepdim=True)
    overlap, unique = counts > 1, counts == 1
    tv_z = tv * nonzero
    scale = 1
    if plus:
        rho = (nonzero & overlap).sum(dim=1) / (nonzero & unique).sum(dim=1).clamp(min=epsilon)
        scale = (1 + r * rho.clamp(min=0, max=alpha)).unsqueeze(-1)
    merged = ((tv_z * unique * scale) + (tv_z * overlap / counts.clamp(min=1))).sum(dim=0, keepdim=True)
    return base + merged.reshape_as(base)


def fixed_bernoulli(p, *args, **kwargs):
    """Deterministic stand-in for torch.bernoulli: keep where p exceeds a fixed sequence over the positions."""
    u = torch.frac(torch.arange(1, p.numel() + 1, dtype=torch.float64) * 0.6180339887498949)
    return (p.double().reshape(-1) > u).to(p.dtype).reshape(p.shape)


# ---------------------------------------------------------------------------------------------------------------
# rules on hand-made tensors
# ---------------------------------------------------------------------------------------------------------------
def test_slerp_hand_values_and_mergekit_formula():
    # orthogonal unit vectors, t = 0.5: the 45-degree point on the circle; collinear ones interpolate linearly
    assert_close(rule("slerp", [torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])], t=0.5),
                 torch.tensor([math.sqrt(0.5), math.sqrt(0.5)]))
    assert_close(rule("slerp", [torch.tensor([1.0, 2.0]), torch.tensor([2.0, 4.0])], t=0.25),
                 torch.tensor([1.25, 2.5]))
    # norms interpolate too: coefficients multiply the raw tensors (mergekit), not the normalised ones
    assert_close(rule("slerp", [torch.tensor([2.0, 0.0]), torch.tensor([0.0, 4.0])], t=0.5),
                 torch.tensor([2 * math.sqrt(0.5), 4 * math.sqrt(0.5)]))
    for shape, t in [((37,), 0.3), ((16, 12), 0.8), ((4, 6, 5), 0.0), ((4, 6), 1.0)]:
        v0, v1, _ = rand(*shape)
        assert_close(rule("slerp", [v0, v1], t=t), mk_slerp(t, v0, v1), rtol=1e-5, atol=1e-6)
    zero = torch.zeros(5)
    assert_close(rule("slerp", [zero, torch.ones(5)], t=0.4), mk_slerp(0.4, zero, torch.ones(5)))


def test_nearswap_hand_values_and_mergekit_formula():
    base, other = torch.tensor([0.0, 0.0, 0.0, 1.0]), torch.tensor([0.5, 0.01, -0.02, 1.0])
    assert_close(rule("nearswap", [base, other], t=0.1), torch.tensor([0.1, 0.01, -0.02, 1.0]))
    a, b, _ = rand(16, 12)
    assert_close(rule("nearswap", [a, b], t=0.7), mk_nearswap(0.7, a, b))


def test_model_stock_hand_values_and_mergekit_formula():
    # task vectors [1, 0] and [1, 1]: cos = 1/sqrt2, t = 2 cos / (1 + cos), result = t * mean
    c = 1 / math.sqrt(2)
    t = 2 * c / (1 + c)
    assert_close(rule("model_stock", [torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0])]),
                 torch.tensor([t, 0.5 * t]))
    for shape in [(37,), (16, 12), (4, 6, 5)]:
        w0, *ws = rand(*shape, n=4)
        for fw in (False, True):
            got = w0 + rule("model_stock", [w - w0 for w in ws], filter_wise=fw)
            assert_close(got, mk_model_stock(w0, ws, fw), rtol=1e-5, atol=1e-6)
    # opposite task vectors: 1 + (n - 1) cos = 0, the base is kept
    assert_close(rule("model_stock", [torch.tensor([1.0, 2.0]), torch.tensor([-1.0, -2.0])]), torch.zeros(2))


def test_breadcrumbs_drops_outliers_and_the_smallest():
    tv = torch.tensor([0.1, -0.5, 0.3, 2.0, -0.05, 0.2, 0.4, -0.35, 0.01, 1.0])
    # density 0.5, gamma 0.1: keep sorted positions 4..8 (0.3 .. 1.0): the outlier 2.0 and the 4 smallest go
    got = rule("breadcrumbs", [tv], density=0.5, gamma=0.1)
    assert_close(got, torch.tensor([0.0, -0.5, 0.3, 0.0, 0.0, 0.0, 0.4, -0.35, 0.0, 1.0]))
    assert_close(rule("breadcrumbs", [tv], density=0.5, gamma=0.1, rescale=True),
                 mk_magnitude_outliers(tv, 0.5, 0.1, True))
    assert_close(rule("breadcrumbs", [tv], density=0.95, gamma=0.1), mk_magnitude_outliers(tv, 0.95, 0.1))  # n_bot 0


@pytest.mark.parametrize("name, consensus", [("breadcrumbs", False), ("breadcrumbs_ties", True)])
@pytest.mark.parametrize("normalize, rescale", [(False, False), (True, True)])
def test_breadcrumbs_match_mergekit(name, consensus, normalize, rescale):
    base = torch.zeros(16, 12)
    tvs, weights, dens, gam = rand(16, 12), [0.6, -0.3, 0.4], [0.7, 0.5, 0.9], [0.05, 0.01, 0.2]
    norm = ("weights" if normalize else "none") if consensus else normalize
    got = rule(name, tvs, weights, density=dens, gamma=gam, rescale=rescale, normalize=norm, scale=1.3)
    want = mk_gta(base, tvs, weights, lambda i, d: mk_magnitude_outliers(d, dens[i], gam[i], rescale), consensus,
                  normalize, 1.3)
    assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_della_keep_probabilities_hand_values():
    # magnitude ranks 1, 3, 2 of 3: probabilities density - eps, density + eps, density
    assert_close(keep_probabilities(torch.tensor([0.1, -0.4, 0.2]), 0.5, 0.1), torch.tensor([[0.4, 0.6, 0.5]]))
    rows = keep_probabilities(torch.tensor([[3.0, -1.0], [0.5, 2.0]]), 0.5, 0.2)  # ranked within each row
    assert_close(rows, torch.tensor([[0.7, 0.3], [0.3, 0.7]]))


@pytest.mark.parametrize("shape", [(300,), (40, 64), (6, 5, 3, 3), (8, 1)])
def test_della_keep_probabilities_are_mergekits_bit_for_bit_with_ties(shape):
    """Ours scatters i / (n - 1) through one argsort where mergekit argsorts twice: the same float32 values,
    ties included (bf16 task vectors repeat magnitudes often; the kept draws depend on every bit)."""
    t = (torch.randn(shape, generator=torch.Generator().manual_seed(3)) * 4).round() / 4  # few distinct magnitudes
    x = t.unsqueeze(0) if t.dim() < 2 else t
    ranks = torch.argsort(x.abs(), dim=1, descending=False).argsort(dim=1).float() + 1  # mk_della_magprune's lines
    lo, hi = ranks.min(dim=1, keepdim=True).values, ranks.max(dim=1, keepdim=True).values
    want = (0.4 - 0.15) + ((ranks - lo) / (hi - lo)).clamp(0, 1).nan_to_num(0.5) * 2 * 0.15
    assert torch.equal(keep_probabilities(t, 0.4, 0.15), want)


@pytest.mark.parametrize("name, consensus, normalize", [("della", True, True), ("della_linear", False, False),
                                                        ("della_linear", False, True)])
@pytest.mark.parametrize("shape", [(37,), (16, 12)])
def test_della_matches_mergekit_with_the_same_draws(monkeypatch, name, consensus, normalize, shape):
    monkeypatch.setattr(torch, "bernoulli", fixed_bernoulli)
    base = torch.zeros(shape)
    tvs, weights, dens, eps = rand(*shape), [0.6, 0.5, 0.3], [0.6, 0.4, 0.7], [0.1, 0.25, 0.2]
    norm = ("weights" if normalize else "none") if consensus else normalize
    got = rule(name, tvs, weights, density=dens, epsilon=eps, normalize=norm, scale=1.1)
    want = mk_gta(base, tvs, weights, lambda i, d: mk_della_magprune(d, dens[i], eps[i]), consensus, normalize, 1.1)
    assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_della_draws_follow_the_probabilities_and_the_seed():
    tv = torch.randn(200, 100, generator=torch.Generator().manual_seed(3))
    kept = [rule("della_linear", [tv], density=0.4, epsilon=0.3, rescale=False, seed=s) != 0 for s in (0, 0, 1)]
    assert torch.equal(kept[0], kept[1]) and not torch.equal(kept[0], kept[2])
    assert abs(kept[0].float().mean().item() - 0.4) < 0.01
    ranks = tv.abs().argsort(dim=1).argsort(dim=1)  # the largest fifth of each row keeps ~0.64, the smallest ~0.16
    assert abs(kept[0][ranks >= 80].float().mean().item() - 0.64) < 0.03
    assert abs(kept[0][ranks < 20].float().mean().item() - 0.16) < 0.03


def test_della_epsilon_out_of_range_names_the_key():
    with pytest.raises(RecipeError, match="parameters.epsilon"):
        rule("della", rand(8), density=0.1, epsilon=0.15)


def test_sce_hand_values_and_mergekit_formula():
    a, b = torch.tensor([1.0, -1.0, 0.5]), torch.tensor([0.5, 2.0, 0.5])
    # weights: mean squares 0.75 and 1.5 -> 1/3, 2/3; the sum's sign is + everywhere, so a's -1 is erased
    want = torch.tensor([(1 / 3 + 2 / 3 * 0.5) / 1.0, 2.0, 0.5])
    assert_close(rule("sce", [a, b]), want)
    for shape in [(37,), (16, 12)]:
        tvs = rand(*shape)
        for k in (1.0, 0.4):
            assert_close(rule("sce", tvs, select_topk=k), mk_sce(torch.zeros(shape), tvs, k), rtol=1e-5, atol=1e-6)


def test_nuslerp_hand_values_and_mergekit_formula():
    # weights 1 and 3: t = 0.75 of the way from [1, 0] to [0, 1]
    got = rule("nuslerp", [torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])], [1.0, 3.0])
    assert_close(got, torch.tensor([math.sin(math.pi / 8), math.sin(3 * math.pi / 8)]))
    a, b = torch.tensor([[1.0, 0.0], [2.0, 0.0]]), torch.tensor([[0.0, 1.0], [4.0, 0.0]])
    rows = rule("nuslerp", [a, b], [1.0, 1.0], nuslerp_flatten=False)  # row 2 is colinear: linear
    assert_close(rows, torch.tensor([[math.sqrt(0.5), math.sqrt(0.5)], [3.0, 0.0]]))
    for shape in [(37,), (16, 12), (4, 6, 5)]:
        base, x, y = rand(*shape)
        for fl, rw in [(True, False), (False, False), (False, True)]:
            for b in (base, None):
                got = rule("nuslerp", [x - b if b is not None else x, y - b if b is not None else y], [0.3, 0.5],
                           nuslerp_flatten=fl, nuslerp_row_wise=rw)
                got = got + b if b is not None else got
                assert_close(got, mk_nuslerp_merge(b, [x, y], [0.3, 0.5], rw, fl), rtol=1e-5, atol=1e-6)
    assert_close(rule("nuslerp", [x, y], [0.5, -0.5]), mk_nuslerp(0.5, x, y, flatten=True))  # weights sum to 0: t = 0.5


def test_multislerp_hand_values_and_mergekit_formula():
    # equal weights on orthogonal unit vectors: the mean direction, at the mean norm
    got = rule("multislerp", [torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])], [1.0, 1.0])
    assert_close(got, torch.tensor([math.sqrt(0.5), math.sqrt(0.5)]))
    for shape in [(37,), (16, 12)]:
        base, *xs = rand(*shape, n=4)
        w = [0.5, 0.3, 0.9]
        for norm in (True, False):
            got = base + rule("multislerp", [x - base for x in xs], w, normalize_weights=norm)
            assert_close(got, mk_multislerp(base, xs, w, norm), rtol=1e-5, atol=1e-5)
            assert_close(rule("multislerp", xs, w, normalize_weights=norm), mk_multislerp(None, xs, w, norm),
                         rtol=1e-5, atol=1e-5)
    # antipodal inputs with balancing weights: two fall back to the weighted sum, three are an error
    x = torch.tensor([1.0, 2.0])
    assert_close(rule("multislerp", [x, -x], [1.0, 1.0]), torch.zeros(2))
    with pytest.raises(Exception, match="directions is zero"):
        rule("multislerp", [x, -x, x, -x], [1.0] * 4)


def test_karcher_hand_values_and_mergekit_formula():
    # two orthogonal vectors of norms 1 and 3: the geodesic midpoint, at the mean norm 2
    got = rule("karcher", [torch.tensor([1.0, 0.0]), torch.tensor([0.0, 3.0])], [5.0, 1.0])  # weights ignored
    assert_close(got, torch.tensor([2 * math.sqrt(0.5), 2 * math.sqrt(0.5)]), rtol=1e-4, atol=1e-4)
    for shape in [(37,), (16, 12)]:
        xs = rand(*shape, n=4)
        for it, tol in [(10, 1e-5), (3, 1e-6)]:
            assert_close(rule("karcher", xs, max_iter=it, tol=tol), mk_karcher(xs, [0.25] * 4, it, tol),
                         rtol=1e-5, atol=1e-6)


def test_arcee_fusion_hand_values_and_mergekit_formula():
    # one row: KL is one number, so importance ranks |other - base|; only the outlier passes the fence
    base, other = torch.zeros(9), torch.tensor([0.1, 0.12, 0.14, 0.16, 0.18, 0.2, 0.22, 0.24, 5.0])
    assert_close(rule("arcee_fusion", [base, other]), torch.tensor([0.0] * 8 + [5.0]))
    for shape in [(37,), (16, 12), (4, 6, 5)]:
        b, o, _ = rand(*shape)
        o = b + 0.05 * o
        got = rule("arcee_fusion", [b, o])
        want = mk_arcee_fusion(b, o)
        assert_close(got, want)
        assert 0 < int((got == o).sum()) < o.numel() // 2  # some entries swapped, most kept


def test_ram_hand_values_and_mergekit_formula():
    # entry 0: only a touches it; 1: a and b (mean); 2: nobody above epsilon; 3: all three (mean)
    a, b, c = torch.tensor([2.0, 1.0, 0.05, 3.0]), torch.tensor([0.0, 3.0, -0.05, 6.0]), torch.tensor(
        [0.0, 0.0, 0.0, 0.0])
    c[3] = 9.0
    assert_close(rule("ram", [a, b, c], epsilon=0.1), torch.tensor([2.0, 2.0, 0.0, 6.0]))
    # ramplus_tl: a has 1 unique and 2 shared entries (rho 2, capped at alpha 0.2): its unique entry x (1 + r 0.2)
    assert_close(rule("ramplus_tl", [a, b, c], epsilon=0.1, r=0.5),
                 torch.tensor([2.0 * (1 + 0.5 * 0.2), 2.0, 0.0, 6.0]))
    # below the cap: 1 shared over 20 unique entries, rho 0.05
    x, y = torch.ones(21), torch.zeros(21)
    y[0] = 3.0
    want = torch.full((21,), 1 + 0.1 * 0.05)
    want[0] = 2.0
    assert_close(rule("ramplus_tl", [x, y]), want)
    for shape in [(37,), (16, 12), (4, 6, 5), (300, 1000)]:  # the last is larger than a block
        base, *fts = rand(*shape, n=4)
        fts = [base + torch.where(f.abs() > 1, f, torch.zeros(())) * 0.1 for f in fts]  # sparse task vectors
        for eps in (1e-5, 0.11):
            tvs = [f - base for f in fts]
            assert_close(base + rule("ram", tvs, epsilon=eps), mk_ram(base, fts, eps), rtol=1e-5, atol=1e-6)
            assert_close(base + rule("ramplus_tl", tvs, epsilon=eps, r=0.7, alpha=0.9),
                         mk_ram(base, fts, eps, True, 0.7, 0.9), rtol=1e-5, atol=1e-6)


def test_rules_on_tensors_larger_than_a_block():
    big = rand(300, 1000, seed=5)
    assert_close(rule("slerp", big[:2], t=0.3), mk_slerp(0.3, *big[:2]), rtol=1e-5, atol=1e-6)
    assert_close(rule("multislerp", big, [0.2, 0.5, 0.3]), mk_multislerp(None, big, [0.2, 0.5, 0.3]),
                 rtol=1e-5, atol=1e-6)
    assert_close(rule("sce", big, select_topk=0.3), mk_sce(torch.zeros(300, 1000), big, 0.3), rtol=1e-5, atol=1e-6)
    # karcher and arcee_fusion run mergekit's operations in the same order, in place: bit-identical
    assert torch.equal(rule("karcher", big), mk_karcher(big, [1 / 3] * 3))
    b, o = big[0], big[0] + 0.05 * big[1]
    assert torch.equal(rule("arcee_fusion", [b, o]), mk_arcee_fusion(b, o))


def test_sorted_at_is_the_exact_sorted_entry():
    from malleable.merge.arcee_fusion import sorted_at
    g = torch.Generator().manual_seed(3)
    x = torch.randn(300_001, generator=g)  # more than two blocks, negative and positive
    x[::7] = x[5]  # many ties
    x[1], x[2], x[3], x[4] = -0.0, 0.0, float("inf"), -float("inf")
    for t in (x, x.abs(), torch.full((200_000,), 2.5), x[:11]):
        want = torch.sort(t).values
        pos = [0, 1, t.numel() // 4, t.numel() // 2, (3 * t.numel()) // 4, t.numel() - 1]
        assert [float(v) for v in sorted_at(t, pos)] == [float(want[i]) for i in pos]


# ---------------------------------------------------------------------------------------------------------------
# mergekit YAML -> our recipe
# ---------------------------------------------------------------------------------------------------------------
SLERP_YAML = """
slices:
  - sources:
      - model: {base}
        layer_range: [0, 2]
      - model: {ft0}
        layer_range: [0, 2]
merge_method: slerp
base_model: {base}
parameters:
  t:
    - filter: self_attn
      value: [0.2, 0.9]
    - filter: mlp
      value: [0.8, 0.1]
    - value: 0.35
dtype: float32
"""


def paths(models):
    return {k: str(v) for k, v in models.items()}


def test_slerp_yaml_reads_as_our_recipe(models, tmp_path):
    (tmp_path / "mk.yml").write_text(SLERP_YAML.format(**paths(models)))
    r = load_recipe(tmp_path / "mk.yml")
    assert r.method == "slerp" and r.base == models["base"] and [i.path for i in r.inputs] == [models["ft0"]]
    assert [(f.filter, f.value) for f in r.parameters["t"]] == [("self_attn", [0.2, 0.9]), ("mlp", [0.8, 0.1]),
                                                                (None, 0.35)]


@pytest.mark.parametrize("method, params, model_params, want, want_inputs", [
    ("nearswap", {"t": 0.01}, [{}], {"t": 0.01}, [{}]),
    ("model_stock", {"filter_wise": True}, [{}, {}], {"filter_wise": True}, [{}, {}]),
    ("breadcrumbs", {"gamma": 0.02, "lambda": 1.2, "normalize": True, "int8_mask": True},
     [{"weight": 0.5, "density": 0.7}, {"weight": 0.3, "gamma": 0.1}],
     {"normalize": True, "rescale": False, "gamma": 0.02, "scale": 1.2},
     [{"density": 0.7}, {"gamma": 0.1}]),
    ("breadcrumbs_ties", {"normalize": True, "rescale": True}, [{"weight": 1, "density": 0.5}, {"weight": 1}],
     {"normalize": "weights", "rescale": True}, [{"density": 0.5}, {}]),
    ("della", {"epsilon": 0.05, "normalize": False}, [{"weight": 1, "density": 0.4, "epsilon": 0.1}, {"weight": 1}],
     {"normalize": "none", "rescale": True, "epsilon": 0.05}, [{"density": 0.4, "epsilon": 0.1}, {}]),
    ("della_linear", {"lambda": 0.9}, [{"weight": 1, "density": 0.4}, {"weight": 1}],
     {"normalize": False, "rescale": True, "scale": 0.9}, [{"density": 0.4}, {}]),
    ("sce", {"select_topk": 0.3, "int8_mask": True}, [{}, {}], {"select_topk": 0.3}, [{}, {}]),
    ("nuslerp", {"nuslerp_row_wise": True}, [{"weight": 0.3}, {"weight": 0.6}], {"nuslerp_row_wise": True},
     [{}, {}]),
    ("multislerp", {"eps": 1e-6}, [{"weight": 1}, {"weight": 2}], {"eps": 1e-6}, [{}, {}]),
    ("arcee_fusion", {}, [{}], {}, [{}]),
    ("ram", {"epsilon": 0.01}, [{}, {}], {"epsilon": 0.01}, [{}, {}]),
    ("ramplus_tl", {"r": 0.3, "alpha": 0.5}, [{}, {}], {"r": 0.3, "alpha": 0.5}, [{}, {}]),
])
def test_mergekit_yaml_reads_with_mergekit_defaults(method, params, model_params, want, want_inputs):
    models = [{"model": "b"}] + [{"model": f"m{i}", "parameters": p} for i, p in enumerate(model_params)]
    r = parse_recipe({"merge_method": method, "base_model": "b", "models": models, "parameters": params})
    assert r.method == method and str(r.base) == "b"
    assert [str(i.path) for i in r.inputs] == ["m0", "m1"][:len(want_inputs)]
    defaults = {"model_stock": {"filter_wise": False}, "breadcrumbs": {"normalize": False, "rescale": False},
                "breadcrumbs_ties": {"normalize": "none", "rescale": False},
                "della": {"normalize": "weights", "rescale": True},
                "della_linear": {"normalize": False, "rescale": True}, "sce": {"select_topk": 1.0},
                "nuslerp": {"nuslerp_flatten": True, "nuslerp_row_wise": False},
                "multislerp": {"normalize_weights": True}}.get(method, {})
    assert r.parameters == {**defaults, **want}
    assert [i.parameters for i in r.inputs] == want_inputs


def test_karcher_takes_base_model_as_an_input_and_optional_bases_stay_optional():
    models = [{"model": "m0"}, {"model": "m1"}]
    r = parse_recipe({"merge_method": "karcher", "base_model": "b", "models": models})
    assert r.base is None and [str(i.path) for i in r.inputs] == ["m0", "m1", "b"]
    assert r.parameters == {"max_iter": 10, "tol": 1e-5}
    for method in ("nuslerp", "multislerp"):
        assert parse_recipe({"merge_method": method, "models": models}).base is None


# ---------------------------------------------------------------------------------------------------------------
# end to end: `malleable merge` of mergekit YAMLs on the tiny fixtures
# ---------------------------------------------------------------------------------------------------------------
def slerp_t(name):
    """The YAML's t for one tensor, resolved by hand (2 layers: the gradient's ends)."""
    layer = 1 if ".layers.1." in name else 0
    if "self_attn" in name:
        return [0.2, 0.9][layer]
    if "mlp" in name:
        return [0.8, 0.1][layer]
    return 0.35


def test_slerp_yaml_end_to_end_through_the_cli(models, tmp_path):
    (tmp_path / "mk.yml").write_text(SLERP_YAML.format(**paths(models)))
    result = CliRunner().invoke(app, ["merge", str(tmp_path / "mk.yml"), str(tmp_path / "out"), "-q"])
    assert result.exit_code == 0, result.output
    out, base, ft = (Checkpoint(p) for p in (tmp_path / "out", models["base"], models["ft0"]))
    assert out.names == base.names
    for name in base.names:
        want = mk_slerp(slerp_t(name), base.read(name), ft.read(name))
        assert_close(out.read(name), want, rtol=1e-5, atol=1e-7)


def reference(method, base, fts, p):
    if method == "nearswap":
        return mk_nearswap(p["t"], base, fts[0])
    if method == "model_stock":
        return mk_model_stock(base, fts)
    if method == "sce":
        return mk_sce(base, fts, p["select_topk"])
    if method == "nuslerp":
        return mk_nuslerp_merge(base, fts, [0.6, 0.5], flatten=False)
    if method == "multislerp":
        return mk_multislerp(None, fts, [0.6, 0.5, 0.3])
    if method == "karcher":
        return mk_karcher(fts + [base], [0.25] * 4)
    if method == "arcee_fusion":
        return mk_arcee_fusion(base, fts[0])
    if method.startswith("ram"):
        return mk_ram(base, fts, p["epsilon"], method == "ramplus_tl", p.get("r", 0.1), p.get("alpha", 0.2))
    w, d = [0.6, 0.5, 0.3], [0.6, 0.4, 0.7]
    if method.startswith("breadcrumbs"):
        return mk_gta(base, fts, w, lambda i, x: mk_magnitude_outliers(x, d[i], 0.05), method.endswith("ties"),
                      False, 1.2)
    return mk_gta(base, fts, w, lambda i, x: mk_della_magprune(x, d[i], 0.2), method == "della",
                  method == "della", 1.2)


@pytest.mark.parametrize("method, params", [
    ("nearswap", {"t": 0.02}), ("model_stock", {}), ("sce", {"select_topk": 0.5}),
    ("breadcrumbs", {"gamma": 0.05, "lambda": 1.2}), ("breadcrumbs_ties", {"gamma": 0.05, "lambda": 1.2}),
    ("della", {"epsilon": 0.2, "lambda": 1.2}), ("della_linear", {"epsilon": 0.2, "lambda": 1.2}),
    ("nuslerp", {"nuslerp_flatten": False}), ("multislerp", {}), ("karcher", {}), ("arcee_fusion", {}),
    ("ram", {"epsilon": 0.02}), ("ramplus_tl", {"epsilon": 0.02, "r": 0.5, "alpha": 0.8}),
])
def test_mergekit_yaml_end_to_end(models, tmp_path, monkeypatch, method, params):
    monkeypatch.setattr(torch, "bernoulli", fixed_bernoulli)  # della: the same draws as the reference
    n = {"nearswap": 1, "arcee_fusion": 1, "nuslerp": 2}.get(method, 3)
    if method in ("nearswap", "model_stock", "sce", "karcher", "arcee_fusion", "ram", "ramplus_tl"):
        per = [{}] * 3
    elif method in ("nuslerp", "multislerp"):
        per = [{"weight": w} for w in [0.6, 0.5, 0.3]]
    else:
        per = [{"weight": w, "density": d} for w, d in zip([0.6, 0.5, 0.3], [0.6, 0.4, 0.7])]
    entries = [{"model": str(models[f"ft{i}"]), **({"parameters": per[i]} if per[i] else {})} for i in range(n)]
    data = {"merge_method": method, "base_model": str(models["base"]), "models": entries, "parameters": params,
            "dtype": "float32"}
    if method == "multislerp":
        del data["base_model"]  # the no-base form: the weights themselves
    (tmp_path / "mk.yml").write_text(yaml.safe_dump(data))
    run_merge(load_recipe(tmp_path / "mk.yml"), tmp_path / "out", progress=False)
    out, base = Checkpoint(tmp_path / "out"), Checkpoint(models["base"])
    fts = [Checkpoint(models[f"ft{i}"]) for i in range(n)]
    for name in base.names:
        want = reference(method, base.read(name), [f.read(name) for f in fts], params)
        assert_close(out.read(name), want, rtol=1e-5, atol=1e-6, msg=f"{method} {name}")


# ---------------------------------------------------------------------------------------------------------------
# bad input: one line, exit 2, nothing written
# ---------------------------------------------------------------------------------------------------------------
def fails(tmp_path, data, mentions):
    (tmp_path / "mk.yml").write_text(yaml.safe_dump(data))
    result = CliRunner().invoke(app, ["merge", str(tmp_path / "mk.yml"), str(tmp_path / "out"), "-q"])
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and mentions in lines[0], result.stderr
    assert not (tmp_path / "out").exists()


def slerp_data(models, **kw):
    return {"merge_method": "slerp", "base_model": str(models["base"]),
            "models": [{"model": str(models["base"])}, {"model": str(models["ft0"])}], "parameters": {"t": 0.5},
            **kw}


@pytest.mark.parametrize("change, mentions", [
    (lambda d, m: d["models"].append({"model": str(m["ft1"])}), "exactly 1 input"),
    (lambda d, m: d.update(parameters={"t": 1.5}), "parameters.t: 1.5 is above the maximum"),
    (lambda d, m: d.update(parameters={"t": [{"filter": "mlp", "value": [0.0, -0.5]}, {"value": 0.5}]}),
     "parameters.t: -0.5 is below the minimum"),
    (lambda d, m: d.update(parameters={}), "parameters.t"),
    (lambda d, m: d.pop("base_model"), "needs a base model"),
    (lambda d, m: d.update(merge_method="model_stock", models=[{"model": str(m["ft0"])}], parameters={}),
     "at least 2 input"),
    (lambda d, m: d.update(merge_method="della", parameters={"density": 0.1, "epsilon": 0.15}),
     "parameters.epsilon"),
    (lambda d, m: d.update(merge_method="nearswap", parameters={"t": -1}), "parameters.t"),
    (lambda d, m: d.update(merge_method="nuslerp", parameters={}), "exactly 2 input"),
    (lambda d, m: d.update(merge_method="arcee_fusion", parameters={}, base_model=None), "needs a base model"),
])
def test_bad_mergekit_yaml_is_one_line(models, tmp_path, change, mentions):
    data = slerp_data(models)
    change(data, models)
    fails(tmp_path, data, mentions)


def test_slerp_refuses_lora_adapters(models, adapters, tmp_path):
    fails(tmp_path, {"method": "slerp", "base": str(models["base"]), "inputs": [{"path": str(adapters["lora0"])}],
                     "parameters": {"t": 0.5}}, "not LoRA adapters")


def test_gradient_positions_follow_mergekit():
    from malleable.merge.params import _gradient

    # mergekit plan.py: layer i of n sits at t = i / (n - 1), a one-layer model at t = 1; evaluate_setting then
    # interpolates linearly between the list's neighbouring values
    assert _gradient([0.0, 0.5, 0.3, 0.7, 1.0], 1, 4) == pytest.approx(0.5 + (0.3 - 0.5) * (1 / 3 * 4 - 1))
    assert _gradient([0.0, 0.5, 0.3, 0.7, 1.0], 2, 4) == pytest.approx(0.3 + (0.7 - 0.3) * (2 / 3 * 4 - 2))
    assert _gradient([0.2, 0.9], 0, 1) == 0.9 and _gradient([0.2, 0.9], None, 4) == 0.2
