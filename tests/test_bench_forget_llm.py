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
