"""Router metrics (evaluate/routing.py): the identities of issue 17, RouterBench's hull and AIQ, and RouteLLM's
APGR / CPT checked against RouteLLM's own code (in its own virtualenv, bench/setup_routellm.sh)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from malleable.evaluate import routing
from malleable.route.matrices import Matrices
from malleable.route.random_mix import Random
from malleable.route.soft_label import soft_targets

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from _routellm import ROUTELLM_VENV, routellm_metrics  # noqa: E402 (the bench runs the same code on real curves)


@pytest.mark.parametrize("acc", [0.0, 0.3, 0.75, 1.0])
def test_rank_score_at_the_cost_bounds(acc):
    beta = routing.BETA
    assert routing.rank_score(acc, 0.5, 0.5, 20.0) == pytest.approx((1 + beta) * acc / (beta * acc + 1))
    assert routing.rank_score(acc, 20.0, 0.5, 20.0) == 0.0
    mid = routing.rank_score(acc, 3.0, 0.5, 20.0)
    assert (0 < mid < routing.rank_score(acc, 0.5, 0.5, 20.0)) if acc else mid == 0


def test_rank_score_is_log_normalised():
    """Halfway in log cost is C_norm = 1/2: S = 1.1 A 0.5 / (0.1 A + 0.5)."""
    acc = 0.8
    assert routing.rank_score(acc, 2.0, 1.0, 4.0) == pytest.approx(1.1 * acc * 0.5 / (0.1 * acc + 0.5))


def vl_routerbench_rank_score(acc, cost, cmin, cmax, beta=0.1, eps=1e-12):
    """A transcription of VL-RouterBench's routers/utils/rank_score.py `rank_score` (as carried by
    yutao1024/SCOPE-Router at 35c43e4005922a43c4e054a4a2ec56c1d5d1d9c4). Its docstring's examples (0.87, 0.45,
    0.48) do not follow from its own formula (0.886, 0.278, 0.516); the code is what we check against."""
    c = float(np.clip(cost, cmin, cmax))
    norm = float(np.clip((np.log2(cmax) - np.log2(c)) / (np.log2(cmax) - np.log2(cmin) + eps), 0, 1))
    a = float(np.clip(acc, 0, 1))
    return float(np.clip((1 + beta) * a * norm / (beta * a + norm + eps), 0, 1))


def test_rank_score_matches_vl_routerbench_code():
    rng = np.random.default_rng(0)
    for _ in range(200):
        cmin = rng.uniform(1e-4, 1)
        cmax = cmin * rng.uniform(1.5, 1e4)
        acc, cost = rng.uniform(0, 1), np.exp(rng.uniform(np.log(cmin / 3), np.log(cmax * 3)))
        assert routing.rank_score(acc, cost, cmin, cmax) == pytest.approx(vl_routerbench_rank_score(
            acc, cost, cmin, cmax), abs=1e-9)


@pytest.mark.parametrize("cost,quality", [(1.0, 0.4), (3.5, 0.9), (0.0, 0.1)])
def test_a_single_point_aiq_is_its_quality(cost, quality):
    assert routing.aiq([cost], [quality]) == pytest.approx(quality)
    assert routing.aiq([cost], [quality], hi=cost + 7.0) == pytest.approx(quality)


def routerbench_hull(points: np.ndarray) -> np.ndarray:
    """A transcription of RouterBench's get_non_descreasing_convex_hull_of (withmartian/routerbench,
    evaluation/AIQ.py, commit cc67d1008bd8f3cf1e8040cc3ba4034d31b93c0c): every interior point raised to the
    highest chord above it, the end points kept as the code keeps them, then each point lower than the one
    before it dropped."""
    pts = points[points[:, 0].argsort()]
    raised: dict[float, float] = {}
    for i in range(len(pts)):
        for j in range(i, len(pts)):
            (x1, y1), (x2, y2) = pts[i], pts[j]
            for x, y in pts:
                if x1 < x < x2:
                    y_line = np.interp(x, [x1, x2], [y1, y2])
                    raised[x] = max(raised.get(x, -np.inf), max(y, y_line))
    out = [list(p) for p in raised.items()]
    if pts[-1][0] not in raised and (not out or pts[-1][1] >= out[-1][1]):
        out.append(list(pts[-1]))
    if pts[0][0] not in raised:
        out = [list(pts[0])] + out
    out = np.array(sorted(out))
    drop = [i for i in range(1, len(out)) if out[i][1] < out[i - 1][1]]
    return np.delete(out, drop, axis=0)


def routerbench_aiq(points: np.ndarray, max_x: float) -> float:
    h = routerbench_hull(points)
    h = np.vstack([h, [max_x, h[-1, 1]]])
    return float(np.sum((h[1:, 0] - h[:-1, 0]) * (h[1:, 1] + h[:-1, 1]) / 2) / max_x)


@pytest.mark.parametrize("seed", range(6))
def test_aiq_matches_routerbench_with_its_normalisation(seed):
    rng = np.random.default_rng(seed)
    pts = np.column_stack([rng.uniform(0.1, 10, 9), rng.uniform(0, 1, 9)])
    max_x = float(pts[:, 0].max()) + rng.uniform(0, 3)
    assert routing.aiq(pts[:, 0], pts[:, 1], lo=0.0, hi=max_x) == pytest.approx(routerbench_aiq(pts, max_x))
    ours = routing.hull(pts[:, 0], pts[:, 1])
    theirs = routerbench_hull(pts)
    grid = np.linspace(ours[0, 0], ours[-1, 0], 50)  # the same polyline (theirs keeps the points on the edges)
    assert np.allclose(np.interp(grid, ours[:, 0], ours[:, 1]), np.interp(grid, theirs[:, 0], theirs[:, 1]))
    assert np.all(np.diff(ours[:, 1]) >= 0)


def pair_matrices(n: int = 4000, seed: int = 0) -> Matrices:
    """A weak (cost 1, 50% right) and a strong (cost 10, 80% right) model, independent per query."""
    rng = np.random.default_rng(seed)
    Y = np.column_stack([rng.random(n) < 0.5, rng.random(n) < 0.8]).astype(np.float64)
    C = np.tile([1.0, 10.0], (n, 1))
    return Matrices(Y, C, ["weak", "strong"], np.array(["t"] * n, dtype=object))


def test_a_random_router_recovers_half_the_gap():
    m = pair_matrices()
    r = Random()
    r.fit(m, seed=0)
    assert (r.info["strong"], r.info["weak"]) == (1, 0)
    ps = r.knob_values()
    accs = [routing.accuracy_and_cost(m.Y, m.C, r.choose(m, p))[0] for p in ps]
    weak, strong = m.Y[:, 0].mean(), m.Y[:, 1].mean()
    assert routing.apgr(ps, accs, weak, strong) == pytest.approx(0.5, abs=0.03)
    assert routing.cpt(ps, accs, weak, strong, 0.5) == pytest.approx(0.5, abs=0.08)
    assert routing.apgr(ps, [strong if p > 0 else weak for p in ps], weak, strong) > 0.9  # all the gap at once


def test_the_oracle_is_never_beaten():
    """No routing of any query to any candidate has a better quality at a lower cost than the oracle's
    Lagrangian sweep: for every willingness w, oracle quality * w - cost >= any routing's."""
    rng = np.random.default_rng(1)
    Y = (rng.random((300, 5)) < rng.uniform(0.2, 0.9, 5)).astype(np.float64)
    C = rng.uniform(0.5, 3, (300, 1)) * np.array([1, 2, 4, 8, 16.0])
    from malleable.route.registry import pick

    for w in [0.5, 2.0, 8.0, 40.0, None]:
        o_acc, o_cost = routing.accuracy_and_cost(Y, C, pick(Y, C, w))
        for _ in range(50):
            choice = rng.integers(0, 5, 300)
            acc, cost = routing.accuracy_and_cost(Y, C, choice)
            if w is None:
                assert acc <= o_acc + 1e-12
            else:
                assert acc * w - cost <= o_acc * w - o_cost + 1e-9
            assert routing.oracle_gap(Y, C, choice) >= 0
    best = routing.oracle_choice(Y, C)
    assert routing.accuracy_and_cost(Y, C, best)[0] == pytest.approx(Y.max(axis=1).mean())


def test_soft_labels_run_from_uniform_to_the_cheapest_correct():
    Y = np.array([[1, 0, 1], [0, 1, 1], [0, 0, 0]], dtype=float)
    C = np.array([[0.1, 0.2, 0.3], [0.1, 0.2, 0.3], [0.3, 0.1, 0.2]])
    assert np.allclose(soft_targets(Y, C, 0.0), [[0.5, 0, 0.5], [0, 0.5, 0.5], [0, 1, 0]])
    assert np.allclose(soft_targets(Y, C, 1000.0), [[1, 0, 0], [0, 1, 0], [0, 1, 0]])
    mid = soft_targets(Y, C, 10.0)
    assert mid[0, 0] == pytest.approx(1 / (1 + np.exp(-2.0))) and np.allclose(mid.sum(axis=1), 1)


def curves_case(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    share = np.linspace(0, 1, 11)
    curves = {}
    for i in range(4):  # monotone curves between weak 0.5 and strong 0.8, plus noise in the middle
        acc = 0.5 + 0.3 * share ** rng.uniform(0.3, 2.5) + np.r_[0, rng.normal(0, 0.01, 9), 0]
        curves[f"r{i}"] = {"share": share.tolist(), "accuracy": np.maximum.accumulate(acc).tolist()}
    return {"weak": 0.5, "strong": 0.8, "curves": curves}


@pytest.mark.skipif(not (ROUTELLM_VENV / "bin" / "python").exists(),
                    reason=f"RouteLLM's venv is not at {ROUTELLM_VENV} (create it with bench/setup_routellm.sh)")
def test_apgr_and_cpt_match_routellm_own_code():
    case = curves_case()
    theirs = routellm_metrics(case, ROUTELLM_VENV)
    for name, c in case["curves"].items():
        assert routing.apgr(c["share"], c["accuracy"], 0.5, 0.8) == pytest.approx(theirs[name]["apgr"], abs=1e-9)
        for f, key in ((0.5, "cpt50"), (0.8, "cpt80")):  # RouteLLM prints the share with 2 decimals (in %)
            assert routing.cpt(c["share"], c["accuracy"], 0.5, 0.8, f) == pytest.approx(theirs[name][key], abs=6e-5)


def test_apgr_and_cpt_match_a_transcription_of_routellm():
    """RouteLLM's apgr_metric and pct_call_metric (routellm/evals/evaluate.py, commit
    0b64fdafe049e596a3f5657c219329f24af24198) written out: trapezoids over the strong share in percent / 100,
    weak and strong AUC as constant curves over the same shares, np.interp over the accuracies."""
    case = curves_case(3)
    for c in case["curves"].values():
        pct, acc = np.array(c["share"]) * 100, np.array(c["accuracy"])
        auc = np.sum((pct[1:] - pct[:-1]) / 100 * (acc[1:] + acc[:-1]) / 2)
        width = (pct[-1] - pct[0]) / 100
        expected = (auc - 0.5 * width) / (0.8 * width - 0.5 * width)
        assert routing.apgr(c["share"], c["accuracy"], 0.5, 0.8) == pytest.approx(expected)
        cpt50 = np.interp(0.5 * (0.8 - 0.5) + 0.5, acc, pct) / 100
        assert routing.cpt(c["share"], c["accuracy"], 0.5, 0.8, 0.5) == pytest.approx(cpt50)
