"""The preference-utility analysis of a steering strength sweep (Xu et al., "Why Steering Works: Toward a
Unified View of Language Model Parameter Dynamics", arXiv:2602.02343): pure functions over likelihoods.

For a polarity pair (prompt, matching answer, non-matching answer), L_pos and L_neg are the whole-sequence
negative log-likelihoods (nats) of each answer given the prompt, p = exp(-L):

    PrefOdds = L_neg - L_pos = log(p_pos / p_neg)                       how much the model prefers the match
    UtilOdds = log((p_pos + p_neg) / (1 - p_pos - p_neg))              how much mass stays on the two answers

PrefOdds is the logit of the preference P(pos | pos or neg). UtilOdds is the logit of the mass on the pair.

Why whole-sequence likelihoods: UtilOdds compares p_pos + p_neg with the rest of the probability, so both must
be probabilities of events of one distribution that cannot overlap. The answers' full token sequences,
each closed by the end-of-sequence token, are such events (two different complete texts are disjoint), so
p_pos + p_neg <= 1 always holds. A per-token mean or an unterminated prefix has no such bound (one answer
may be a prefix of the other, and a geometric mean is not a probability), and the "rest" 1 - p_pos - p_neg
would be meaningless or negative.

Numerics: L is often large (tens of nats), so e^-L underflows; and for a model that puts nearly all its mass
on the pair, 1 - p_pos - p_neg cancels catastrophically. We work in log space: log(p_pos + p_neg) =
logaddexp(-L_pos, -L_neg) = -S, and log(1 - e^-S) is computed as log(-expm1(-S)) for small S (mass near 1)
and log1p(-e^-S) for large S (mass near 0), the standard stable `log1mexp` split at log 2. UtilOdds is then
-S - log1mexp(S). As p_pos + p_neg -> 1 (S -> 0+) UtilOdds -> +inf; S == 0 (a model certain of the pair, only
reachable through rounding) gives +inf, reported as such, never a NaN.

The fitted curves (the paper's Eq. 12-15 as we read them; we could not find the authors' code, so this follows
the paper's description and a third-party reading of it): the logit of preference is linear in m times a
rational-quadratic decay, and utility is a decay on top of a floor,

    D(m) = (1 + m^2 / (2 p scale^2)) ** -p                (rational quadratic; -> Gaussian as p -> inf)
    PrefOdds(m) = b + a * m * D(m)
    UtilOdds(m) = b_u + c_u * D_u(m)

fitted separately for m >= 0 and m < 0 with scipy.optimize.curve_fit, R^2 reported per side. Where we differ:
the decay is centred at m = 0 and the preference's offset folded into one constant b (the paper's
(alpha m + beta) D(m) + b has beta and b indistinguishable near m = 0 on a short sweep), and each side's fit
also uses the m = 0 point (the unsteered model belongs to both branches; with m < 0 alone, a five-point sweep
leaves two points). A side with fewer points than parameters + 1 is not fitted (R^2 would be 1 by
construction); its entry says so.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

LN2 = math.log(2.0)


def pref_odds(l_pos, l_neg) -> np.ndarray:
    """PrefOdds = L_neg - L_pos (nats): positive when the matching answer is the likelier."""
    return np.asarray(l_neg, dtype=np.float64) - np.asarray(l_pos, dtype=np.float64)


def log1mexp(s) -> np.ndarray:
    """log(1 - e^-s) for s >= 0, stable at both ends (Maechler's split at s = log 2); -inf at s == 0."""
    s = np.asarray(s, dtype=np.float64)
    with np.errstate(divide="ignore"):
        small = np.log(-np.expm1(-np.minimum(s, LN2)))
        large = np.log1p(-np.exp(-np.maximum(s, LN2)))
    return np.where(s <= LN2, small, large)


def util_odds(l_pos, l_neg) -> np.ndarray:
    """UtilOdds = log((p_pos + p_neg) / (1 - p_pos - p_neg)) from the NLLs, in log space (module doc)."""
    l_pos, l_neg = np.asarray(l_pos, dtype=np.float64), np.asarray(l_neg, dtype=np.float64)
    if np.any(l_pos < 0) or np.any(l_neg < 0):
        raise ValueError("negative log-likelihoods must be >= 0")
    s = -np.logaddexp(-l_pos, -l_neg)  # -log(p_pos + p_neg) >= 0 when the answers are disjoint events
    if np.any(s < -1e-12):
        raise ValueError("p_pos + p_neg > 1: the likelihoods are not of two disjoint complete sequences")
    s = np.maximum(s, 0.0)
    with np.errstate(divide="ignore"):
        return np.where(s == 0, np.inf, -s - log1mexp(s))


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct-n (Li et al. 2016): distinct word n-grams over all n-grams of the texts pooled (whitespace words,
    lower-cased); 0 when there are none."""
    grams = [tuple(w[i:i + n]) for w in (t.lower().split() for t in texts) for i in range(len(w) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def rq_decay(m, scale, p) -> np.ndarray:
    """The rational-quadratic decay (1 + m^2 / (2 p scale^2))^-p: 1 at m = 0, length scale `scale`, shape p."""
    m = np.asarray(m, dtype=np.float64)
    return (1.0 + m * m / (2.0 * p * scale * scale)) ** -p


def pref_curve(m, b, a, scale, p):
    return b + a * np.asarray(m, dtype=np.float64) * rq_decay(m, scale, p)


def util_curve(m, b, c, scale, p):
    return b + c * rq_decay(m, scale, p)


CURVES = {"pref": (pref_curve, ("b", "a", "scale", "p")), "util": (util_curve, ("b", "c", "scale", "p"))}


def r_squared(y, fit) -> float:
    y, fit = np.asarray(y, dtype=np.float64), np.asarray(fit, dtype=np.float64)
    total = float(np.sum((y - y.mean()) ** 2))
    resid = float(np.sum((y - fit) ** 2))
    return 1.0 - resid / total if total > 0 else (1.0 if resid == 0 else 0.0)


def fit_side(kind: str, m, y) -> dict:
    """One branch's fit of `kind` ("pref" or "util") to points (m, y): {"params", "r2", "points"}, or
    {"points", "fitted": False, "reason"} when there are too few finite points or the fit fails."""
    from scipy.optimize import curve_fit

    f, names = CURVES[kind]
    m, y = np.asarray(m, dtype=np.float64), np.asarray(y, dtype=np.float64)
    ok = np.isfinite(y)
    m, y = m[ok], y[ok]
    if len(m) < len(names) + 1:
        return {"points": int(len(m)), "fitted": False,
                "reason": f"{len(m)} finite points for {len(names)} parameters"}
    span = float(np.max(np.abs(m))) or 1.0
    y0 = float(y[np.argmin(np.abs(m))])
    near = int(np.argmin(np.where(m == 0, np.inf, np.abs(m))))
    far = float(y[np.argmax(np.abs(m))])
    bounds = ([-np.inf, -np.inf, 1e-6 * span, 1e-3], [np.inf, np.inf, 1e3 * span, 1e3])
    best, error = None, "no start converged"
    for scale in (0.1, 0.3, 1.0, 3.0):  # a few starting length scales: the fit is not convex in l and p
        if kind == "pref":
            p0 = [y0, (float(y[near]) - y0) / (float(m[near]) or 1.0), scale * span, 1.0]
        else:
            p0 = [far, y0 - far, scale * span, 1.0]
        try:
            params, _ = curve_fit(f, m, y, p0=p0, bounds=bounds, maxfev=20000)
        except (RuntimeError, ValueError) as e:
            error = str(e)
            continue
        r2 = r_squared(y, f(m, *params))
        if best is None or r2 > best[1]:
            best = (params, r2)
    if best is None:
        return {"points": int(len(m)), "fitted": False, "reason": f"curve_fit: {error}"}
    params, r2 = best
    return {"params": dict(zip(names, map(float, params))), "r2": r2,
            "points": int(len(m)), "fitted": True}


def fit_curves(strengths, pref, util) -> dict:
    """{"pref": {"positive": fit, "negative": fit}, "util": ...}: each curve fitted on m >= 0 and on m <= 0."""
    m = np.asarray(strengths, dtype=np.float64)
    out = {}
    for kind, y in (("pref", pref), ("util", util)):
        y = np.asarray(y, dtype=np.float64)
        out[kind] = {"positive": fit_side(kind, m[m >= 0], y[m >= 0]),
                     "negative": fit_side(kind, m[m <= 0], y[m <= 0])}
    return out
