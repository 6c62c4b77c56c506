"""bench/continual_online.py's bookkeeping: paired differences by seed, intervals, the partial mark."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import continual_online as co  # noqa: E402 (the bench folder is not a package)


def run(method: str, buffer: int | None, seed: int, acc: float) -> dict:
    metrics = {"average_accuracy": acc, "forgetting": 100 - acc, "average_incremental_accuracy": acc,
               "plasticity": 90.0}
    return {"method": method, "buffer": buffer, "seed": seed, "metrics": metrics, "train_seconds": 1.0 + seed,
            "wall_s": 2.0, "loadavg_before": [1.0], "loadavg_after": [2.0]}


def test_arms_give_buffers_to_replay_methods_only():
    assert co.arms([200, 500], ["finetune", "er", "joint"]) == [("finetune", None), ("er", 200), ("er", 500),
                                                                ("joint", None)]


def test_aggregate_pairs_by_seed_and_gives_t_intervals():
    planned = co.arms([200], ["er", "las"])
    runs = [run("er", 200, s, a) for s, a in enumerate([50.0, 52.0, 54.0])]
    runs += [run("las", 200, s, a) for s, a in enumerate([55.0, 58.0, 57.0])]
    out = co.aggregate(runs, planned)
    er = out["table"]["er (M=200)"]["average_accuracy"]
    assert er["mean"] == pytest.approx(52.0) and er["n"] == 3
    # t(0.975, 2) = 4.303, sd 2, n 3: half width 4.303 * 2 / sqrt(3) = 4.969
    assert er["hi"] - er["mean"] == pytest.approx(4.969, abs=1e-3)
    d = out["paired"]["las - er (M=200)"]["average_accuracy"]
    assert d["mean"] == pytest.approx((5 + 6 + 3) / 3) and d["n"] == 3
    assert out["table"]["er (M=200)"]["train_seconds_median"] == 2.0


def test_markdown_marks_a_partial_reduced_run():
    planned = co.arms([200], ["er"])
    runs = [run("er", 200, 0, 50.0), run("er", 200, 1, 52.0)]
    data = {"settings": {"seeds": [0, 1, 2], "batch_size": 10, "lr": 0.03, "max_per_class": 200,
                         "test_per_class": None, "buffers": [200], "methods": ["er"]},
            "partial": True, "runs": runs, "summary": co.aggregate(runs, planned),
            "machine": {"cpu": "cpu", "cores": 2, "versions": {"torch": "x"}, "malleable_git": "abc"}}
    text = co.markdown(data)
    assert "(partial)" in text and "REDUCED stream" in text and "| er (M=200) | 51.00 [" in text


def test_aggregate_pairs_mir_las_against_each_baseline():
    planned = co.arms([200], ["er", "er_ace", "las", "mir_las"])
    runs = [run(m, 200, s, a + s) for m, a in (("er", 50.0), ("er_ace", 51.0), ("las", 53.0), ("mir_las", 56.0))
            for s in range(2)]
    paired = co.aggregate(runs, planned)["paired"]
    assert set(paired) == {"las - er (M=200)", "las - er_ace (M=200)", "mir_las - er (M=200)",
                           "mir_las - er_ace (M=200)", "mir_las - las (M=200)"}
    assert paired["mir_las - las (M=200)"]["average_accuracy"]["mean"] == pytest.approx(3.0)
