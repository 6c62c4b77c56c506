"""Router metrics: pure functions over a quality matrix Y (queries x candidates), a cost matrix C of the same
shape, a router's choices (one candidate index per query), and the (cost, quality) points of a router's sweep.

* `accuracy_and_cost`: the mean quality and mean cost of the chosen candidates.
* `rank_score`: the weighted harmonic mean of accuracy and log-normalised cost (RouterArena's score, which
  VL-RouterBench reports as its rank score). RouterArena (`compute_arena_score`, llm_evaluation/run.py) writes
  ``C_norm = (log2 c_max - log2 c) / (log2 c_max - log2 c_min)`` and ``S = (1 + beta) A C_norm / (beta A +
  C_norm)`` with beta = 0.1 and fixed bounds of its own price list; VL-RouterBench (routers/cer/metrics.py,
  ``accuracy_cost_summary``) passes the bounds as ``cmin = nanmin(C)``, ``cmax = nanmax(C)`` of the cost matrix,
  which is our default. Its ``routers/utils/rank_score.py`` (read in yutao1024/SCOPE-Router, which carries
  VL-RouterBench's routers/ tree, commit 35c43e4) is the same formula with the cost clipped into
  [cmin, cmax], C_norm and the score clipped into [0, 1] and 1e-12 added to both denominators; ours clips
  alike, has no epsilon (a zero denominator gives 0), and, since log2(0) is not finite, raises a zero c_min
  to the smallest positive cost (or 1e-12).
* `aiq`: RouterBench's Average Improvement in Quality, the area under the non-decreasing convex hull of a
  router's (cost, quality) points. RouterBench (withmartian/routerbench, evaluation/AIQ.py, commit cc67d10)
  builds the hull point by point (each point raised to the chord above it, then every point lower than the one
  before it dropped), extends every router's hull flat to the largest cost of all routers compared, and
  divides the trapezoid area from the router's cheapest point by that largest cost (so its cost axis runs
  from 0). Ours computes the same hull (upper concave envelope up to its highest point, then flat) and
  divides by ``hi - lo``; ``lo=0, hi=largest cost`` is RouterBench's code exactly, and the default ``lo`` =
  the cheapest point is the paper's normalisation to [c_min, c_max], under which a single point's AIQ is its
  quality.
* `apgr` and `cpt`: RouteLLM's average performance gap recovered and call-performance threshold
  (lm-sys/RouteLLM, routellm/evals/evaluate.py ``generate_results``, commit 0b64fda): for a curve of (share of
  calls to the strong model, accuracy), APGR = (AUC - weak AUC) / (strong AUC - weak AUC) with trapezoids over
  the share, and CPT(p) = the share at which the curve reaches weak + p (strong - weak), by ``np.interp``
  over the accuracies as RouteLLM writes it.
* `oracle_choice`, `oracle_gap`: the cheapest best candidate per query (VL-RouterBench's ``oracle_routing``:
  the cheapest correct one, else the cheapest), and how far a router's accuracy falls below it.
"""

from __future__ import annotations

import math

import numpy as np

BETA = 0.1  # RouterArena's and VL-RouterBench's weight of cost against accuracy


def accuracy_and_cost(Y: np.ndarray, C: np.ndarray, choice: np.ndarray) -> tuple[float, float]:
    """Mean quality and mean cost of the candidate chosen for each query."""
    rows = np.arange(len(choice))
    return float(np.mean(Y[rows, choice])), float(np.mean(C[rows, choice]))


def cost_bounds(C: np.ndarray) -> tuple[float, float]:
    """VL-RouterBench's rank-score bounds: the smallest and largest cost in the matrix (a zero minimum raised to
    the smallest positive cost, so that its log is finite)."""
    C = np.asarray(C, dtype=np.float64)
    hi = float(C.max())
    positive = C[C > 0]
    lo = float(C.min()) if C.min() > 0 else (float(positive.min()) if positive.size else 1e-12)
    return lo, max(hi, lo)


def rank_score(accuracy: float, cost: float, c_min: float, c_max: float, beta: float = BETA) -> float:
    """(1 + beta) A C_n / (beta A + C_n), C_n = (log2 c_max - log2 c) / (log2 c_max - log2 c_min) in [0, 1]."""
    if c_max <= c_min:
        c_norm = 1.0
    else:
        c = min(max(cost, c_min), c_max)
        c_norm = (math.log2(c_max) - math.log2(c)) / (math.log2(c_max) - math.log2(c_min))
    accuracy = min(max(accuracy, 0.0), 1.0)
    denominator = beta * accuracy + c_norm
    return (1 + beta) * accuracy * c_norm / denominator if denominator > 0 else 0.0


def hull(costs, qualities) -> np.ndarray:
    """The non-decreasing convex hull of (cost, quality) points, as (m, 2) rows sorted by cost: the upper
    concave envelope, from the cheapest point up to its highest point (RouterBench's NDCH)."""
    pts = np.column_stack([np.asarray(costs, dtype=np.float64), np.asarray(qualities, dtype=np.float64)])
    pts = pts[np.lexsort((-pts[:, 1], pts[:, 0]))]  # by cost, the best quality first at equal cost
    pts = pts[np.r_[True, pts[1:, 0] != pts[:-1, 0]]]  # one point per cost: the best
    upper: list[np.ndarray] = []
    for p in pts:  # Andrew's monotone chain, upper half
        while len(upper) >= 2:
            (x1, y1), (x2, y2) = upper[-2], upper[-1]
            if (x2 - x1) * (p[1] - y1) - (y2 - y1) * (p[0] - x1) >= 0:  # upper[-1] lies on or below the chord
                upper.pop()
            else:
                break
        upper.append(p)
    out = np.array(upper)
    top = int(np.argmax(out[:, 1]))  # first highest point: beyond it the envelope falls, and is cut
    return out[: top + 1]


def aiq(costs, qualities, lo: float | None = None, hi: float | None = None) -> float:
    """Area under the non-decreasing convex hull, extended flat to `hi`, over [lo, hi] divided by hi - lo.
    Defaults: lo the cheapest point, hi the dearest (pass the bounds of every router compared, as RouterBench
    extends each hull to the largest cost of all). Before its cheapest point a router has no area."""
    h = hull(costs, qualities)
    lo = float(h[0, 0]) if lo is None else float(lo)
    hi = float(np.max(costs)) if hi is None else float(hi)
    if hi <= lo:
        return float(h[-1, 1])
    h = h[h[:, 0] <= hi]
    xs, ys = np.r_[h[:, 0], hi], np.r_[h[:, 1], h[-1, 1]]
    area = float(np.sum((xs[1:] - xs[:-1]) * (ys[1:] + ys[:-1]) / 2))
    return area / (hi - lo)


def _curve(share, accuracy) -> tuple[np.ndarray, np.ndarray]:
    share, accuracy = np.asarray(share, dtype=np.float64), np.asarray(accuracy, dtype=np.float64)
    order = np.argsort(share, kind="stable")
    return share[order], accuracy[order]


def apgr(share, accuracy, weak: float, strong: float) -> float:
    """RouteLLM's APGR of a curve of (share of calls to the strong model in [0, 1], accuracy)."""
    x, y = _curve(share, accuracy)
    width = x[-1] - x[0]
    area = float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2))
    if strong == weak or width == 0:
        return float("nan")
    return (area - weak * width) / ((strong - weak) * width)


def cpt(share, accuracy, weak: float, strong: float, fraction: float) -> float:
    """RouteLLM's call-performance threshold: the share of strong calls (in [0, 1]) at which the curve reaches
    weak + fraction (strong - weak), interpolated over the accuracies as RouteLLM does."""
    x, y = _curve(share, accuracy)
    return float(np.interp(fraction * (strong - weak) + weak, y, x))


def oracle_choice(Y: np.ndarray, C: np.ndarray) -> np.ndarray:
    """Per query, the cheapest candidate with the query's best quality (for 0/1 quality: the cheapest correct
    one, else the cheapest of all, as VL-RouterBench's `oracle_routing`)."""
    best = Y >= Y.max(axis=1, keepdims=True)
    return np.argmin(np.where(best, C, np.inf), axis=1)


def oracle_gap(Y: np.ndarray, C: np.ndarray, choice: np.ndarray) -> float:
    """Oracle accuracy minus the router's (>= 0: no router beats the oracle's quality)."""
    return accuracy_and_cost(Y, C, oracle_choice(Y, C))[0] - accuracy_and_cost(Y, C, choice)[0]


def point_metrics(Y: np.ndarray, C: np.ndarray, choice: np.ndarray, bounds: tuple[float, float],
                  beta: float = BETA) -> dict:
    """One operating point: accuracy, cost, rank score and oracle gap."""
    acc, cost = accuracy_and_cost(Y, C, choice)
    return {"accuracy": acc, "cost": cost, "rank_score": rank_score(acc, cost, *bounds, beta=beta),
            "oracle_gap": oracle_gap(Y, C, choice)}
