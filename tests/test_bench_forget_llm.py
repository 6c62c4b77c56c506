"""bench/forget_llm.py's bookkeeping: what came back is recomputed from the stored attack numbers, and an attack
made under other settings than its split's reference attack is dropped rather than compared with it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import forget_llm as fl  # noqa: E402 (the bench folder is not a package)

NOW = {"fraction": 0.25, "steps": 10, "lr": 1e-5, "batch_size": 4, "seed": 0}


def attack(before: float, after: float, settings: dict | None = None) -> dict:
    out = {"before": {"probability": before, "rouge_l": before}, "after": {"probability": after, "rouge_l": after},
           "recovered": "stale", "excess_gain": "stale"}
    return out | ({"settings": settings} if settings else {})


def test_rescore_recomputes_and_drops_attacks_under_other_settings():
    result = {"reference": {"forget10": {"target": {"relearn": attack(0.8, 0.8, NOW)},
                                         "retain": {"relearn": attack(0.4, 0.5, NOW)}}},
              "runs": [{"forget": "forget10", "relearn": attack(0.5, 0.65, NOW)},
                       {"forget": "forget10", "relearn": attack(0.5, 0.65, {**NOW, "lr": 1e-4})},
                       {"forget": "forget10"}]}
    fl.rescore_relearning(result)
    same, other, none = result["runs"]
    assert same["relearn"]["recovered"]["probability"] == pytest.approx(0.5)  # 0.15 of the 0.3 removed
    assert same["relearn"]["excess_gain"]["probability"] == pytest.approx(0.05)  # 0.15 gained, retain 0.10
    assert "relearn" not in other and "relearn" not in none
    retain = result["reference"]["forget10"]["retain"]["relearn"]
    assert retain["excess_gain"] == {"probability": 0.0, "rouge_l": 0.0}
    assert retain["recovered"]["probability"] == pytest.approx(0.25)


def test_privacy_leakage_is_recomputed_from_the_stored_aucs_and_legacy_runs_are_named():
    from malleable.evaluate.llm_forget import METRIC_DEFINITIONS

    summary = {"mia_auc_min_k": 0.9, "privacy_leakage": 80.0}  # stored under (AUC - AUC_r) / AUC_r
    result = {"reference": {"forget10": {"target": dict(summary), "retain": {"mia_auc_min_k": 0.5,
                                                                            "privacy_leakage": 0.0}}},
              "runs": [{"forget": "forget10", "summary": {"mia_auc_min_k": 0.2, "privacy_leakage": -60.0}},
                       {"forget": "forget10", "summary": dict(summary), "metric_definitions": METRIC_DEFINITIONS}]}
    fl.rescore_privacy(result)
    assert result["reference"]["forget10"]["target"]["privacy_leakage"] == pytest.approx(-80.0)  # under-unlearned
    assert [r["summary"]["privacy_leakage"] for r in result["runs"]] == pytest.approx([60.0, -80.0])
    assert fl.legacy_note(result).startswith("1 of 2 runs and the target/retain rows of forget10")
    result["runs"][0]["metric_definitions"] = result["reference"]["forget10"]["metric_definitions"] = METRIC_DEFINITIONS
    assert fl.legacy_note(result) is None


def test_a_calibrated_run_that_searched_step_sizes_is_compared_with_the_fixed_run_at_the_objectives_lr():
    summary = {m: 0.5 for m in fl.GAP_METRICS}
    fixed = {"forget": "forget10", "objective": "rmu", "seed": 0, "steps": 13,
             "settings": {"epochs": 5.0, "batch_size": 8, "lr": 1e-3}, "summary": {**summary, "mia_auc_min_k": 0.9}}
    other = {**fixed, "settings": {**fixed["settings"], "lr": 3e-3}, "summary": {**summary, "mia_auc_min_k": 0.1}}
    searched = {**fixed, "settings": {**fixed["settings"], "lr": [3e-3, 1e-2]}, "base_lr": 1e-3,
                "calibrate": {"tolerance": 0.1, "check_every": 2}, "summary": summary,
                "stopping": {"restored_to": None}, "lr_search": {"lr": 1e-2, "tried": []}}
    result = {"reference": {"forget10": {"retain": summary}}, "runs": [fixed, other, searched]}
    assert fl.label(searched) == "rmu (lr 0.003/0.01 searched), calibrated ±0.1"
    row = next(line for line in fl.calibration_section(result, "forget10") if line.startswith("| rmu"))
    cells = [c.strip() for c in row.split("|")]
    assert cells[3] == "13 at lr 0.01 (of 13)"
    assert cells[4] == "6.67" and cells[5] == "0.00"  # paired with the lr 1e-3 run (AUC 0.9), not the 3e-3 one
    # the same search under the retain guard: its own row, naming where the kept run first passed the limit
    guarded = {**searched, "calibrate": {**searched["calibrate"], "retain_limit": 1.25},
               "summary": {**summary, "model_utility": 0.4}, "stopping": {"restored_to": 6, "broken_at": 8}}
    result["runs"].append(guarded)
    assert fl.label(guarded) == "rmu (lr 0.003/0.01 searched), calibrated ±0.1, retain loss ≤ 1.25x"
    rows = [line for line in fl.calibration_section(result, "forget10") if line.startswith("| rmu")]
    cells = [c.strip() for c in rows[1].split("|")]
    assert len(rows) == 2 and cells[1] == fl.label(guarded) and cells[3] == "6 at lr 0.01 (limit passed at 8) (of 13)"
    assert cells[-3:-1] == ["0.500", "0.400"]  # model utility, fixed and guarded
