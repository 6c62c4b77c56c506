"""evaluate/preference.py on hand-made likelihoods, distinct-n by hand, and curve fits that recover known
parameters from synthetic curves."""

from __future__ import annotations

import math

import numpy as np
import pytest

from malleable.evaluate.preference import distinct_n, fit_curves, fit_side, pref_curve, pref_odds, util_curve, util_odds


def test_odds_on_hand_made_likelihoods():
    # p_pos = 1/2, p_neg = 1/4: preference log 2, utility log(0.75 / 0.25) = log 3
    assert pref_odds(math.log(2), math.log(4)) == pytest.approx(math.log(2), abs=1e-15)
    assert util_odds(math.log(2), math.log(4)) == pytest.approx(math.log(3), abs=1e-12)
    # p_pos = 0.1, p_neg = 0.3: utility log(0.4 / 0.6)
    assert util_odds(-math.log(0.1), -math.log(0.3)) == pytest.approx(math.log(0.4 / 0.6), abs=1e-12)
    # vectorised, and the sign of the preference follows the likelier answer
    np.testing.assert_allclose(pref_odds([1.0, 5.0], [3.0, 2.0]), [2.0, -3.0])


def test_utility_of_tiny_likelihoods_does_not_underflow():
    # p = e^-1000 underflows to 0 in float64; log space keeps it: -1000 + log(1 + e^-1)
    assert util_odds(1000.0, 1001.0) == pytest.approx(-1000 + math.log1p(math.exp(-1)), abs=1e-9)


def test_utility_as_the_pair_takes_all_the_mass():
    eps = 1e-9
    l_neg = -math.log(0.5 - eps)  # p_pos + p_neg = 1 - eps
    assert util_odds(math.log(2), l_neg) == pytest.approx(math.log((1 - eps) / eps), abs=1e-5)
    assert util_odds(math.log(2), math.log(2)) == math.inf  # exactly all the mass: +inf, not NaN
    with pytest.raises(ValueError, match="disjoint"):
        util_odds(0.1, 0.1)  # p_pos + p_neg = 1.81: not two complete sequences
    with pytest.raises(ValueError, match=">= 0"):
        util_odds(-1.0, 2.0)


def test_distinct_n_by_hand():
    texts = ["a b a b", "A b c", ""]
    assert distinct_n(texts, 1) == pytest.approx(3 / 7)   # a b a b a b c: 3 distinct of 7
    assert distinct_n(texts, 2) == pytest.approx(3 / 5)   # ab ba ab ab bc: 3 distinct of 5
    assert distinct_n([""], 2) == 0.0


def test_fit_recovers_known_parameters_on_each_side():
    m = np.linspace(-20, 20, 41)
    pos = dict(b=0.3, a=0.8, scale=5.0, p=2.0)
    neg = dict(b=0.3, a=0.5, scale=8.0, p=1.0)
    pref = np.where(m >= 0, pref_curve(m, **pos), pref_curve(m, **neg))
    util = np.where(m >= 0, util_curve(m, -2.0, 3.0, 4.0, 1.5), util_curve(m, -2.0, 3.0, 6.0, 0.7))
    fits = fit_curves(m, pref, util)
    for side, truth in (("positive", pos), ("negative", neg)):
        f = fits["pref"][side]
        assert f["fitted"] and f["r2"] > 0.99999 and f["points"] == 21
        np.testing.assert_allclose(list(f["params"].values()), list(truth.values()), rtol=1e-3)
    np.testing.assert_allclose(list(fits["util"]["positive"]["params"].values()), [-2, 3, 4, 1.5], rtol=1e-3)
    np.testing.assert_allclose(list(fits["util"]["negative"]["params"].values()), [-2, 3, 6, 0.7], rtol=1e-3)


def test_fit_r2_drops_on_a_curve_it_cannot_follow():
    m = np.linspace(0, 10, 11)
    fit = fit_side("pref", m, np.sin(3 * m))
    assert fit["fitted"] and fit["r2"] < 0.5


def test_too_few_points_are_not_fitted():
    fit = fit_side("pref", [0.0, 4.0, 8.0], [0.0, 1.0, 1.5])
    assert fit == {"points": 3, "fitted": False, "reason": "3 finite points for 4 parameters"}
    assert fit_side("util", [0, 1, 2, 3, 4], [0, np.inf, 1, 2, np.inf])["points"] == 3
