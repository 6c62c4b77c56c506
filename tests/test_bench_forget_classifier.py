"""bench/forget_classifier.py's bookkeeping: --update merges rows tuned over another lr grid and says so."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import forget_classifier as fc  # noqa: E402 (the bench folder is not a package)

SETTINGS = {"dataset": "digits", "train_size": 100, "validation_size": 20, "test_size": 50, "seeds": [0],
            "tune_seed": 100, "recipe": {"epochs": 1}, "batch_size": 8, "forget_class": 0, "max_shadow": 10,
            "relearning": None, "budget": 0.08}


def result(methods: dict[str, tuple[list[float], float]], ua: float, git: str) -> dict:
    """A results dict in the bench's layout: {method: (tuned grid, chosen lr)}, every metric = `ua`."""
    row = {k: ua for k in (*fc.METRICS, "gap", "seconds", "time_ratio")}
    return {
        "machine": {"malleable_git": git, "date": "today"}, "wall_s": 1.0, "loadavg_start": [0.5, 0.5, 0.5],
        "config": {**SETTINGS, "methods": {n: {"objective": n, "mask": None} for n in methods}},
        "hyperparameters": {s: {n: {"lr": lr, "steps": 3, "grid": {str(x): 1.0 for x in grid}}
                                for n, (grid, lr) in methods.items()} for s in fc.SCENARIOS},
        "summary": {s: {n: {k: {"mean": v, "std": 0.0} for k, v in row.items()} for n in methods}
                    for s in fc.SCENARIOS},
        "runs": [{"seed": 0, "scenario": s, "methods": {n: dict(row) for n in methods}} for s in fc.SCENARIOS],
    }


def test_update_accepts_a_new_grid_and_records_it():
    old = result({"ga": ([1e-4, 1e-3], 1e-4), "ft": ([1e-4, 1e-3], 1e-3)}, 1.0, "aaa")
    old["config"]["lr_grid"] = [1e-4, 1e-3]  # what runs before per-method grids recorded
    new = result({"ft": ([1e-4, 1e-3, 1e-2], 1e-2)}, 2.0, "bbb")
    out = fc.merged(copy.deepcopy(old), new, "old.json")
    assert out["summary"]["class"]["ft"]["UA"]["mean"] == 2.0 and out["summary"]["class"]["ga"]["UA"]["mean"] == 1.0
    assert out["runs"][0]["methods"]["ft"]["UA"] == 2.0
    assert out["config"]["updates"][-1]["lr_grids"] == {"ft": [1e-4, 1e-3, 1e-2]}
    assert out["config"]["updates"][-1]["git"] == "bbb"
    sentence = fc.grids_sentence(out["hyperparameters"])
    assert sentence == "from [0.0001, 0.001] for ga; from [0.0001, 0.001, 0.01] for ft"
    assert fc.lr_cell(out["hyperparameters"]["class"]["ft"]) == "0.01 (grid top)"


def test_update_refuses_other_settings():
    old = result({"ga": ([1e-4], 1e-4)}, 1.0, "aaa")
    new = result({"ga": ([1e-4], 1e-4)}, 1.0, "bbb")
    new["config"]["seeds"] = [0, 1]
    with pytest.raises(SystemExit, match="seeds"):
        fc.merged(old, new, "old.json")


def test_identical_rows_are_named():
    runs = result({"graddiff": ([1e-4], 1e-4), "wagle": ([1e-4], 1e-4), "ga": ([1e-4], 1e-4)}, 1.0, "a")["runs"]
    for r in runs:
        r["methods"]["ga"]["UA"] = 3.0
    assert fc.identical_rows(runs) == ["wagle scores exactly as graddiff in every seed, scenario and metric."]
    runs[-1]["methods"]["wagle"]["MIA"] = 0.5  # one scenario differs in one metric: not identical any more
    assert fc.identical_rows(runs) == []


def test_calibrated_summary_counts_sides_and_pairs_seeds():
    import forget_classifier_calibrated as fcc

    def row(gap, side, steps, restored=None):
        auc = 0.3 if side == "over-unlearned" else 0.5
        return {"gap": gap, "UA": 50.0, "membership_auc": auc, "side": side, "steps_run": steps,
                "stopping": {"restored_to": restored}}

    rows = {"ga": {(s, sc): {"fixed": row(3.0 + s, "over-unlearned", 100), "calibrated": {
        "0.05": row(1.0 + s, "calibrated", 20 + s, restored=15 if s == 1 else None)}}
                   for s in (0, 1, 2) for sc in fc.SCENARIOS}}
    out = fcc.summarise(rows, [0, 1, 2], 0.05)["class"]["ga"]
    assert out["seeds"] == 3 and out["over_fixed"] == 3 and out["over_calibrated"] == 0
    assert out["gap_difference"]["mean"] == pytest.approx(-2.0) and out["gap_difference"]["lo"] == pytest.approx(-2.0)
    assert out["stop_step"]["mean"] == pytest.approx((20 + 15 + 22) / 3) and out["stopped_early"] == 3
    assert fcc.totals(fcc.summarise(rows, [0, 1, 2], 0.05))["random"] == {
        "over_fixed": 3, "over_calibrated": 0, "under_fixed": 0, "under_calibrated": 0, "runs": 3, "pairs": 1,
        "closer": 1}
    one = fcc.paired_t([1.0], [0.5])
    assert one["mean"] == -0.5 and one["lo"] != one["lo"]  # no interval from one seed
