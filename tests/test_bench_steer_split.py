"""bench/steer_split.py's readings of a preference-utility curve: matched preference, the frontier within a
utility budget, the claims, and the pairing by seed."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import steer_split as ss  # noqa: E402 (the bench folder is not a package)


def curve(points: list[tuple[float, float, float]], scale: float = 2.0) -> list[dict]:
    """Rows (fraction, PrefOdds, UtilOdds) at strength fraction x scale."""
    return [{"fraction": f, "strength": f * scale, "pref_odds": p, "util_odds": u, "positive_preferred": 0.5}
            for f, p, u in points]


ROWS = curve([(-1.0, -3.0, -12.0), (0.0, 0.0, -10.0), (0.5, 2.0, -10.5), (1.0, 3.0, -13.0), (1.5, 3.5, -20.0)])


def test_matched_interpolates_utility_where_the_gain_is_first_reached():
    out = ss.matched(ROWS, [1.0, 2.5, 8.0])
    assert out["1.0"] == pytest.approx(-10.0 + 0.5 * (-10.5 + 10.0))  # halfway to f = 0.5
    assert out["2.5"] == pytest.approx(-10.5 + 0.5 * (-13.0 + 10.5))  # halfway from f = 0.5 to 1
    assert out["8.0"] is None  # never reached


def test_gain_within_a_budget_follows_the_frontier_to_the_crossing():
    assert ss.gain_within(ROWS, 0.5) == pytest.approx(2.0)  # f = 0.5 loses exactly 0.5
    # f = 0.5 -> 1 loses 0.5 -> 3.0: a budget of 1.75 is crossed halfway, gain 2.5
    assert ss.gain_within(ROWS, 1.75) == pytest.approx(2.5)
    assert ss.gain_within(ROWS, 100.0) == pytest.approx(3.5)
    assert ss.gain_within(curve([(0.0, 0.0, -10.0), (1.0, 3.0, -30.0)]), 0.0) == 0.0  # every m > 0 costs more


def test_claims_read_saturation_and_the_utility_peak():
    c = ss.claims(ROWS)
    assert c["pref_gain_at_1"] == 3.0 and c["pref_drop_at_minus_1"] == 3.0
    assert c["late_over_early_slope"] == pytest.approx((0.5 / 0.5) / (2.0 / 0.5))  # saturating: < 1
    assert c["util_peak_fraction"] == 0.0 and c["util_drop_at_1"] == 3.0 and c["util_drop_at_minus_1"] == 2.0


def test_summary_pairs_split_and_sft_by_seed():
    runs = [{"seed": s, "label": lab, "top_strength": 2.0, "build_s": 1.0,
             "rows": curve([(-1.0, -3.0, -12.0), (0.0, 0.0, -10.0), (0.5, k, -10.5), (1.0, k + 1, -13.0),
                            (1.5, k + 1.5, -20.0)])}
            for s in range(3) for lab, k in (("split_vector", 2.0 + s), ("sft_vector", 1.0))]
    out = ss.summarise(runs, ["split_vector", "sft_vector"], [1.0])
    assert set(out["methods"]) == {"split_vector", "sft_vector"}
    d = out["paired_gain"]["split_vector - sft_vector"]["20.0"]  # every step within 20 nats: gains k + 1.5
    assert d["n"] == 3 and d["mean"] == pytest.approx(2.0)  # (3.5 + s) - 2.5 for s = 0, 1, 2
