"""Calibrated unlearning (forget/stopping.py): the rule stops at the documented point, goes back when a check
overshoots, never trains on its calibration rows, and says which side of the retrain target a model is on."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from hostile import refused
from test_forget_cli import invoke, recipe_file, target  # noqa: F401  (the fine-tuned tiny target fixture)

from malleable.errors import InputError
from malleable.forget.run import split_calibration, verdict
from malleable.forget.stopping import StopRule, search_step_size, side


def scripted(aucs: list[float], retain: list[float] | None = None, **kw) -> tuple[StopRule, torch.nn.Linear]:
    """A rule whose measurements are `aucs` in turn (and retain losses `retain`, against a limit of 1.0), over a
    model whose weight is the check's index."""
    guard = {"retain": [4, 5], "retain_limit": 1.0} if retain is not None else {}
    rule = StopRule("indistinguishable", [0, 1], None, calibration=[2, 3], tolerance=0.05, check_every=5,
                    **guard, **kw)
    seq, losses = iter(aucs), iter(retain or [])
    rule.measure = lambda model: {"forget_loss": 0.0, "membership_auc": next(seq)} | (
        {"retain_loss": next(losses)} if retain is not None else {})
    return rule, torch.nn.Linear(1, 1, bias=False)


def drive(rule: StopRule, model: torch.nn.Linear, steps: int) -> None:
    for step in range(1, steps + 1):
        with torch.no_grad():
            model.weight.fill_(step)
        if rule(model, step, step == steps):
            return


def test_inside_the_band_the_rule_keeps_closing_in_and_stops_at_the_target():
    rule, model = scripted([0.9, 0.7, 0.54, 0.5, 0.3])
    drive(rule, model, 40)
    assert rule.stopped_at == 20 and rule.restored_to is None  # 0.54 is within 0.05 but 0.5 is closer still
    assert [p["step"] for p in rule.curve] == [5, 10, 15, 20] and rule.report()["verdict"] == "calibrated"
    assert float(model.weight) == 20


def test_a_check_inside_the_band_that_no_longer_improves_goes_back_to_the_closest():
    rule, model = scripted([0.9, 0.53, 0.54])
    drive(rule, model, 40)
    assert (rule.stopped_at, rule.restored_to, float(model.weight)) == (15, 10, 10)
    assert rule.report()["verdict"] == "calibrated"


def test_a_tie_goes_back_to_the_earlier_check():
    rule, model = scripted([0.9, 0.54, 0.54])  # a few rows give few distinct AUCs: ties are common
    drive(rule, model, 40)
    assert (rule.stopped_at, rule.restored_to, float(model.weight)) == (15, 10, 10)


def test_noise_out_of_the_band_does_not_lose_the_closest_check():
    rule, model = scripted([0.9, 0.54, 0.62, 0.45])  # 0.62: short again, keep going; 0.45 is 0.05 off
    drive(rule, model, 40)
    assert (rule.stopped_at, rule.restored_to, float(model.weight)) == (20, 10, 10)


def test_a_budget_that_ends_short_keeps_the_closest_check():
    rule, model = scripted([0.9, 0.54, 0.62])
    drive(rule, model, 15)
    assert (rule.stopped_at, rule.restored_to, float(model.weight)) == (None, 10, 10)
    assert rule.report()["verdict"] == "calibrated"


def test_an_overshoot_goes_back_to_the_closer_earlier_check():
    rule, model = scripted([0.9, 0.58, 0.1])
    drive(rule, model, 40)
    assert rule.stopped_at == 15 and rule.restored_to == 10
    assert float(model.weight) == 10  # the weights of step 10 (AUC 0.58, 0.08 off) beat step 15's (0.40 off)
    assert rule.report()["verdict"] == "under-unlearned"  # 0.58 is still above 0.5 + 0.05: said plainly


def test_an_overshoot_closer_than_the_earlier_check_is_kept():
    rule, model = scripted([0.9, 0.42])
    drive(rule, model, 40)
    assert (rule.stopped_at, rule.restored_to, float(model.weight)) == (10, None, 10)
    assert rule.report()["verdict"] == "over-unlearned"


def test_the_last_step_is_always_checked():
    rule, model = scripted([0.9, 0.8])
    drive(rule, model, 7)
    assert [p["step"] for p in rule.curve] == [5, 7] and rule.stopped_at is None
    assert rule.report()["verdict"] == "under-unlearned"


def test_a_check_past_the_retain_limit_is_never_kept_and_the_run_goes_on():
    # 0.6 breaks the limit: not kept, the run goes on; 0.5 reaches the target past the limit: stop, back to 0.7
    rule, model = scripted([0.9, 0.7, 0.6, 0.5], retain=[0.5, 0.8, 1.2, 1.3])
    drive(rule, model, 40)
    assert (rule.broken_at, rule.stopped_at, rule.restored_to, float(model.weight)) == (15, 20, 10, 10)
    assert rule.reached and not rule.kept_broken  # the target was reached; larger step sizes would break sooner
    report = rule.report()
    assert report["verdict"] == "under-unlearned" and report["broken_at"] == 15 and report["retain_limit"] == 1.0


def test_a_retain_loss_that_recovers_lets_the_run_reach_the_target():
    rule, model = scripted([0.9, 0.7, 0.52, 0.5], retain=[1.4, 0.9, 1.1, 0.95])  # past the limit at 5 and 15
    drive(rule, model, 40)
    assert (rule.broken_at, rule.stopped_at, rule.restored_to, float(model.weight)) == (5, 20, None, 20)
    assert rule.reached and rule.report()["verdict"] == "calibrated"


def test_a_guarded_run_that_reaches_the_target_within_the_limit_is_untouched():
    rule, model = scripted([0.9, 0.5], retain=[0.5, 0.9])
    drive(rule, model, 40)
    assert (rule.broken_at, rule.stopped_at, rule.restored_to) == (None, 10, None) and rule.reached


def test_a_run_past_the_limit_at_every_check_ends_there_and_never_counts_as_reached():
    rule, model = scripted([0.8, 0.5], retain=[2.0, 2.5])  # at the target, but nothing within the limit to keep
    drive(rule, model, 40)
    assert (rule.broken_at, rule.stopped_at) == (5, 10) and rule.kept_broken and not rule.reached
    assert float(model.weight) == 10


def test_the_retain_guard_needs_retain_rows():
    with pytest.raises(InputError, match="training.retain_limit"):
        StopRule("indistinguishable", [0, 1], None, calibration=[2, 3], tolerance=0.05, check_every=5,
                 retain_limit=1.2)


def scripted_search(curves: dict[float, list[float]], steps: int = 15, retain: dict[float, list[float]] | None = None):
    """`search_step_size` over scripted rules: step size lr's checks measure `curves[lr]` in turn (and retain
    losses `retain[lr]` when given)."""
    from types import SimpleNamespace

    rules = iter([scripted(curve, None if retain is None else retain[lr])[0] for lr, curve in curves.items()])

    def run(lr, stop):
        drive(stop, torch.nn.Linear(1, 1, bias=False), steps)
        return SimpleNamespace(steps=len(stop.curve) * 5, seconds=1.0, lr=lr)

    return search_step_size(list(curves), run, lambda: next(rules))


def test_the_search_keeps_the_first_step_size_that_reaches_the_target_and_tries_no_more():
    lr, result, stop, tried = scripted_search({1e-6: [0.9, 0.9, 0.85], 1e-4: [0.9, 0.6, 0.5], 1e-2: [0.1]})
    assert lr == result.lr == 1e-4 and stop.stopped_at == 15 and stop.reached
    assert [t["lr"] for t in tried] == [1e-6, 1e-4]  # 1e-2 never ran
    assert tried[0]["stopped_at"] is None and tried[0]["distance"] == pytest.approx(0.35)


def test_the_search_keeps_the_closest_when_none_reaches_the_target():
    lr, _, stop, tried = scripted_search({1e-6: [0.9, 0.9, 0.85], 1e-4: [0.9, 0.8, 0.7], 1e-3: [0.9, 0.8, 0.75]})
    assert lr == 1e-4 and not stop.reached and stop.report()["verdict"] == "under-unlearned"
    assert [t["distance"] for t in tried] == pytest.approx([0.35, 0.2, 0.25])


def test_the_search_ranks_a_run_that_ends_past_the_retain_limit_last():
    # neither reaches the target within 15 steps; 1e-3 ends closer (0.55), but past the limit at every check
    lr, _, stop, tried = scripted_search({1e-4: [0.9, 0.8, 0.7], 1e-3: [0.7, 0.6, 0.55]},
                                         retain={1e-4: [0.5, 0.9, 0.95], 1e-3: [3.0, 3.0, 3.0]})
    assert lr == 1e-4 and not stop.kept_broken and not stop.reached
    assert [(t["lr"], t["broken_at"]) for t in tried] == [(1e-4, None), (1e-3, 5)]
    assert [t["distance"] for t in tried] == pytest.approx([0.2, 0.05])


@pytest.mark.parametrize("auc, words", [(0.9, "under-unlearned"), (0.53, "calibrated"), (0.47, "calibrated"),
                                        (0.1, "over-unlearned")])
def test_side_follows_the_privleak_sign(auc, words):
    assert side(auc, 0.05) == words


def test_a_model_compared_with_itself_is_calibrated():
    row = {"membership_auc": 0.93}
    assert verdict(row, row, 0.05) == "calibrated"
    assert verdict({"membership_auc": 0.2}, row, 0.05) == "over-unlearned"


def test_calibration_rows_leave_the_evidence_and_never_reach_training():
    items = {"forget": ["f"] * 4, "retain": ["r"] * 4, "holdout": [f"h{i}" for i in range(10)]}
    calibration = split_calibration(items, 0.3, seed=0)
    assert len(calibration) == 3 and len(items["holdout"]) == 7
    assert not set(calibration) & set(items["holdout"])
    assert split_calibration({"holdout": [f"h{i}" for i in range(10)]}, 0.3, seed=0) == calibration  # seeded


def test_forget_stops_at_the_target_and_reports_the_curve(target, tmp_path):  # noqa: F811
    r = recipe_file(tmp_path / "r.yaml", target, training={"steps": 40, "batch_size": 8, "lr": 2e-3,
                                                           "stop_at": "indistinguishable", "check_every": 2,
                                                           "tolerance": 0.1, "calibration": 0.5})
    result = invoke("forget", r, tmp_path / "out", "-q")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    c = report["calibration"]
    assert c["calibration_rows"] == 4 and report["data"]["holdout"]["examples"] == 8
    assert c["curve"] and c["curve"][-1]["step"] == c["stopped_at"] == report["steps"] <= 40
    assert report["verdict"] in ("under-unlearned", "calibrated", "over-unlearned")
    assert "calibrated stopping" in (tmp_path / "out" / "report.md").read_text()
    assert "verdict" in result.stdout


@pytest.mark.parametrize("training, data, mentions", [
    ({"stop_at": "indistinguishable", "tolerance": 0.5}, {}, "training.tolerance"),
    ({"stop_at": "indistinguishable", "tolerance": 0}, {}, "training.tolerance"),
    ({"stop_at": "indistinguishable"}, {"holdout": None}, "data.holdout"),
    ({"stop_at": "reference"}, {}, "needs a reference model"),
    ({"stop_at": "indistinguishable", "calibration": 0.99}, {}, "at least 2"),
    ({"stop_at": "sometime"}, {}, "training.stop_at"),
    ({"lr": [1e-5, 1e-4]}, {}, "needs training.stop_at"),
    ({"stop_at": "indistinguishable", "lr": [1e-5, 1e-5]}, {}, "listed twice"),
    ({"stop_at": "indistinguishable", "lr": [1e-5, -1.0]}, {}, "greater than 0"),
    ({"retain_limit": 1.2}, {}, "set stop_at"),
    ({"stop_at": "indistinguishable", "retain_limit": 1.0}, {}, "training.retain_limit"),
    ({"stop_at": "indistinguishable", "retain_limit": 1.2}, {"retain": None}, "data.retain"),
])
def test_bad_stopping_settings_are_one_line(target, tmp_path, training, data, mentions):  # noqa: F811
    r = recipe_file(tmp_path / "r.yaml", target, training={"steps": 4, "batch_size": 8, "lr": 2e-3, **training})
    if data:
        cfg = yaml.safe_load(r.read_text())
        cfg["data"] = {k: v for k, v in cfg["data"].items() if k not in data}
        r.write_text(yaml.safe_dump(cfg))
    refused(["forget", r, tmp_path / "out", "-q"], mentions=mentions,
            inputs=[r, target["model"], target["forget"], target["retain"], target["holdout"]],
            out=tmp_path / "out")


def test_wga_runs_under_the_calibrated_stopping_rule(target, tmp_path):  # noqa: F811
    """One of issue 13's objectives end to end through `malleable forget` with `stop_at: indistinguishable`."""
    r = recipe_file(tmp_path / "r.yaml", target, objective="wga",
                    training={"steps": 40, "batch_size": 8, "lr": 2e-3, "stop_at": "indistinguishable",
                              "check_every": 2, "tolerance": 0.1, "calibration": 0.5})
    result = invoke("forget", r, tmp_path / "out", "-q")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    c = report["calibration"]
    assert report["objective"] == "wga" and c["curve"] and c["curve"][-1]["step"] == c["stopped_at"] == report["steps"]
    e = report["evidence"]
    assert e["unlearned"]["forget"]["loss"] > e["original"]["forget"]["loss"]
    # it stops on its own before the step budget and keeps the check closest to AUC 0.5, within the tolerance
    kept = next(p for p in c["curve"] if p["step"] == (c["restored_to"] or c["stopped_at"]))
    assert report["steps"] < 40 and abs(kept["membership_auc"] - 0.5) <= 0.1
    assert abs(kept["membership_auc"] - 0.5) == min(abs(p["membership_auc"] - 0.5) for p in c["curve"])


def test_a_list_of_step_sizes_keeps_the_first_that_reaches_the_target(target, tmp_path):  # noqa: F811
    """1e-6 stays short of the target for all 40 steps; 2e-3 reaches it (as above) and is kept; each try starts
    from the original model, so the kept run is the one 2e-3 alone would give."""
    training = {"steps": 40, "batch_size": 8, "stop_at": "indistinguishable", "check_every": 2, "tolerance": 0.1,
                "calibration": 0.5}
    r = recipe_file(tmp_path / "r.yaml", target, training={**training, "lr": [1e-6, 2e-3]})
    assert invoke("forget", r, tmp_path / "out", "-q").exit_code == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    first, second = report["lr_search"]
    assert report["lr"] == second["lr"] == 2e-3 and first["stopped_at"] is None and first["steps"] == 40
    assert first["distance"] > 0.1 >= second["distance"]
    alone = recipe_file(tmp_path / "a.yaml", target, training={**training, "lr": 2e-3})
    assert invoke("forget", alone, tmp_path / "alone", "-q").exit_code == 0
    assert json.loads((tmp_path / "alone" / "report.json").read_text())["calibration"] == report["calibration"]
    assert "step size: 0.002" in (tmp_path / "out" / "report.md").read_text()


def test_the_retain_guard_through_malleable_forget(target, tmp_path):  # noqa: F811
    """A high step size with a tight guard (1.02x the original retain loss): checks past the limit are never
    kept, so the model ends on the closest check within it, and its retain loss is within it again."""
    r = recipe_file(tmp_path / "r.yaml", target, training={
        "steps": 40, "batch_size": 8, "lr": 2e-3, "stop_at": "indistinguishable", "check_every": 1,
        "tolerance": 0.1, "calibration": 0.5, "retain_limit": 1.02})
    result = invoke("forget", r, tmp_path / "out", "-q")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    c, e = report["calibration"], report["evidence"]
    assert c["retain_limit"] == pytest.approx(1.02 * e["original"]["retain"]["loss"], rel=1e-4)  # all retain rows
    assert c["broken_at"] is not None and c["restored_to"] is not None and not c["kept_broken"]
    within = [p for p in c["curve"] if p["retain_loss"] <= c["retain_limit"]]
    kept = next(p for p in c["curve"] if p["step"] == c["restored_to"])
    assert kept in within and abs(kept["membership_auc"] - 0.5) == min(abs(p["membership_auc"] - 0.5) for p in within)
    assert e["unlearned"]["retain"]["loss"] == pytest.approx(kept["retain_loss"], rel=1e-4)
    assert "the retain loss passed that limit first at step" in (tmp_path / "out" / "report.md").read_text()
