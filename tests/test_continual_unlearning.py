"""`malleable continual` with forget steps: the stream's rules, the buffer, the retrained gold standard, the
per-forget-step report, resume across a forget step, and forgetting that really happens (ug_clu and a baseline).

Split digits (scikit-learn's 8x8 images, 30 per class here): seconds per run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from malleable.cli import app
from malleable.continual import engine, unlearning
from malleable.continual.buffer import Reservoir
from malleable.continual.engine import continual
from malleable.continual.stream import load_tasks, resolve, stream_classes, stream_steps
from malleable.recipes.continual import parse_continual_recipe
from test_continual import changed, kill_after

STREAM = [{"learn": {"classes": [0, 1]}}, {"learn": {"classes": [2, 3]}}, {"forget": {"classes": [1]}},
          {"learn": {"classes": [4, 5]}}, {"forget": {"step": 2}}, {"forget": {"sample": 0.2}}]
BASE = {"method": "er", "dataset": "digits", "width": 16, "stream": STREAM,
        "training": {"batch_size": 10, "replay_batch_size": 10, "buffer_size": 40, "lr": 0.1, "momentum": 0.9,
                     "max_per_class": 30, "test_per_class": 15},
        "forget": {"objective": "npo", "steps": 20, "lr": 0.01, "batch_size": 16},
        "evaluate": {"retrain_epochs": 2, "mia_max_shadow": 200}}


def recipe(**changes) -> dict:
    return changed(BASE, **changes)


def plan_of(r: dict):
    rec = parse_continual_recipe(r)
    tasks, _, _ = load_tasks(rec, stream_classes(rec))
    return resolve(stream_steps(rec), tasks, rec.seed), tasks


@pytest.fixture(scope="module")
def er_run(tmp_path_factory):
    """One ER run of the whole stream, with its checkpoints kept (the buffer's state at every step)."""
    out = tmp_path_factory.mktemp("er") / "out"
    report = continual(parse_continual_recipe(recipe(keep_checkpoints=True)), out, progress=False)
    return report, out


def test_the_stream_resolves_each_request_to_the_images_it_names():
    plan, tasks = plan_of(recipe())
    label = {i: y for t in tasks for i, (_, y) in zip(t.ids, t.train)}
    assert [r.step.kind for r in plan] == ["learn", "learn", "forget", "learn", "forget", "forget"]
    assert sorted(plan[2].ids) == sorted(i for i in tasks[0].ids if label[i] == 1)  # class 1 (task-agnostic)
    assert plan[2].forgotten_classes == {1}
    assert plan[4].ids == sorted(tasks[1].ids)  # step 2 (task-aware): everything it learned
    assert plan[4].forgotten_classes == {1, 2, 3}
    n = len(plan[4].learned)
    assert len(plan[5].ids) == round(0.2 * n) and set(plan[5].ids) <= plan[4].learned  # a seeded sample
    assert plan[5].ids == plan_of(recipe())[0][5].ids and plan[5].ids != plan_of(recipe(seed=1))[0][5].ids
    assert not (plan[-1].learned & plan[-1].forgotten) and len(plan[-1].learned) == 180 - 30 - 60 - len(plan[5].ids)
    # a forgotten class named by a later learn step is learned again, its images included; a step forget's are not
    again, _ = plan_of(recipe(stream=STREAM[:3] + [{"learn": {"classes": [1, 4]}}]))
    assert {label[i] for i in again[3].ids} == {1, 4} and again[3].forgotten_classes == frozenset()
    with pytest.raises(Exception, match=r"stream\[3\].learn.classes: every training image of classes \[2, 3\]"):
        plan_of(recipe(stream=STREAM[:2] + [{"forget": {"step": 2}}, {"learn": {"classes": [2, 3]}}]))


def test_reservoir_forget_drops_the_slots_and_refills_them_first():
    r = Reservoir(6, 0)
    ids = torch.arange(10)
    r.add(ids.float().view(-1, 1), ids % 3, ids)
    before = [i for _, _, i in r.contents()]
    dropped = r.forget({before[0], before[3], 99})
    assert dropped == 2 and len(r) == 4 and r.seen == 7
    assert [i for _, _, i in r.contents()] == [i for i in before if i not in (before[0], before[3])]
    r.add(torch.tensor([[50.0], [51.0]]), torch.tensor([0, 1]), torch.tensor([50, 51]))
    assert [i for _, _, i in r.contents()][-2:] == [50, 51] and len(r) == 6  # the freed slots, first
    copy = Reservoir(6, 0)
    copy.load_state(r.state())
    assert copy.contents()[0][2] == r.contents()[0][2] and len(copy) == 6 and copy.seen == r.seen


def test_forgotten_examples_leave_the_buffer_and_the_report_has_the_gap(er_run):
    report, out = er_run
    plan, _ = plan_of(recipe())
    run = out.with_name(out.name + ".run")
    for k, r in enumerate(plan, start=1):
        held = load_file(run / f"stream-{k:06d}" / "state.safetensors")
        stored = set(held["buffer.ids"][:int(held["buffer.seen"][1])].tolist())
        assert stored and not stored & r.forgotten, k  # never a forgotten image in the buffer after the step
        assert stored <= r.learned
    rows = report["forget_steps"]
    assert [f["step"] for f in rows] == [3, 5, 6] and [f["forgotten"] for f in rows] == [len(plan[k].ids)
                                                                                         for k in (2, 4, 5)]
    assert rows[0]["buffer_dropped"] > 0 and rows[0]["unlearn"]["objective"] == "npo"
    for f in rows:
        assert set(f["gap"]) == {"UA", "RA", "TA", "MIA", "MIA_AUC", "avg"} and f["gap"]["avg"] >= 0
        assert f["gap"]["avg"] == pytest.approx(sum(f["gap"][k] for k in ("UA", "RA", "TA", "MIA")) / 4, abs=1e-3)
        assert f["gap"]["MIA_AUC"] == pytest.approx(abs(f["method"]["MIA_AUC"] - f["retrain"]["MIA_AUC"]), abs=1e-3)
        assert f["sizes"]["holdout"] > 0 and 0 <= f["method"]["MIA_AUC"] <= 1
        assert f["time_ratio"] == pytest.approx(f["method"]["seconds"] / f["retrain"]["seconds"], rel=1e-2)
        assert f["retrain"]["examples"] == f["sizes"]["retain"]
    assert rows[0]["retrain"]["UA"] == 100.0  # never saw class 1: gets none of it right
    R = report["accuracy_matrix"]
    assert len(R) == 7 and R[5][1] is None and R[6][1] is None and R[4][1] is not None  # task 2 forgotten at 5
    assert report["learn_rows"] == [0, 1, 2, 4] and report["metrics"]["average_accuracy"] is not None
    md = (out / "report.md").read_text()
    assert "| 5 | step 2 |" in md and "avg gap" in md and "forgotten" in md and "time / retrain" in md
    assert "AUC gap" in md


def test_the_membership_auc_ranks_forgotten_against_unseen_images():
    """MIA_AUC on a model whose true-label probability is set by hand: every forgotten image above every holdout
    image gives 1, below gives 0, and the same probabilities give 0.5."""
    from malleable.evaluate.unlearning import classifier_scores

    class Fixed(torch.nn.Module):  # logits [x, 0]: the class-0 probability is sigmoid(x)
        def __init__(self):
            super().__init__()
            self.unused = torch.nn.Parameter(torch.zeros(1))  # predict_proba reads the device from a parameter

        def forward(self, x):
            return torch.cat([x.reshape(len(x), -1)[:, :1], torch.zeros(len(x), 1)], dim=1)

    def images(values):
        return [(torch.full((1, 2, 2), float(v)), 0) for v in values]

    rest = {"retain": images([3, 4, 5, 6]), "test": images([-1, 0, 1, 2])}
    for forget, holdout, auc in (([3, 4], [0, 1, 2], 1.0), ([0, 1], [3, 4, 5], 0.0), ([1, 2], [1, 2], 0.5)):
        scores = classifier_scores(Fixed(), {**rest, "forget": images(forget), "holdout": images(holdout)})
        assert scores["MIA_AUC"] == pytest.approx(auc), (forget, holdout)
    assert "MIA_AUC" not in classifier_scores(Fixed(), {**rest, "forget": images([1])})


def test_the_retrain_never_sees_a_forgotten_image(tmp_path, monkeypatch):
    seen: list[list[int]] = []
    real = unlearning.retrain

    def spy(make_model, ids, lookup, rec):
        seen.append(list(ids))
        return real(make_model, ids, lookup, rec)

    monkeypatch.setattr(unlearning, "retrain", spy)
    report = continual(parse_continual_recipe(recipe(evaluate={"retrain": "every_step", "retrain_epochs": 1,
                                                               "mia_max_shadow": 100})), tmp_path / "o",
                       progress=False)
    plan, _ = plan_of(recipe())
    assert len(seen) == 6 and len(report["every_step"]) == 3  # every step, learn ones included
    everything = plan[-1].forgotten
    for ids, r in zip(seen, plan):
        assert set(ids) == r.learned and not set(ids) & r.forgotten
    assert not set(seen[-1]) & everything
    assert report["every_step"][1]["method"]["UA"] is None  # step 2: nothing forgotten yet


def test_retrain_off_leaves_the_stream_unchanged_and_reports_no_gap(tmp_path, er_run):
    off = continual(parse_continual_recipe(recipe(evaluate={"retrain": "off"})), tmp_path / "off", progress=False)
    assert off["accuracy_matrix"] == er_run[0]["accuracy_matrix"]  # the gold standard does not touch the stream
    a, b = load_file(tmp_path / "off" / "model.safetensors"), load_file(er_run[1] / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all("gap" not in f and "retrain" not in f for f in off["forget_steps"])


def _accuracy_on_class(out: Path, step: int, cls: int, tasks) -> float:
    from malleable.evaluate.classification import accuracy
    from malleable.models.vision import small_cnn

    model = small_cnn(1, 10, 8, 16)
    model.load_state_dict(load_file(out / "steps" / f"step-{step}.safetensors"))
    return accuracy(model.eval(), [ex for t in tasks for ex in t.train if ex[1] == cls])


@pytest.mark.parametrize("method, forget", [
    ("ug_clu", {"steps": 30, "lr": 0.01, "batch_size": 16}),
    ("er", {"objective": "npo", "steps": 30, "lr": 0.01, "batch_size": 16}),
])
def test_a_class_forget_really_forgets_with_ug_clu_and_a_baseline(tmp_path, method, forget):
    stream = STREAM[:3]  # forget class 1, which ER (all of digits' images, one pass) still knows after step 2
    r = recipe(method=method, stream=stream, forget=forget, evaluate={"retrain": "off"}, training__max_per_class=None)
    report = continual(parse_continual_recipe(r), tmp_path / method, progress=False)
    _, tasks = plan_of(r)
    before = _accuracy_on_class(tmp_path / method, 2, 1, tasks)
    after = _accuracy_on_class(tmp_path / method, 3, 1, tasks)
    row = report["forget_steps"][0]
    assert before >= 70 and after <= before - 50, (before, after)  # seeded: a real drop, not noise
    assert row["method"]["UA"] == pytest.approx(100 - after, abs=1e-3)
    assert row["method"]["RA"] >= 50  # and the rest is still known
    if method == "ug_clu":
        assert row["unlearn"]["objective"] == "ug_clu" and 0 < row["unlearn"]["mask_fraction"] < 1


def test_a_stream_killed_after_a_forget_step_resumes_identical(tmp_path, monkeypatch, er_run):
    whole = er_run[0]
    real = kill_after(monkeypatch, 3)
    r = parse_continual_recipe(recipe(keep_checkpoints=True))
    with pytest.raises(KeyboardInterrupt):
        continual(r, tmp_path / "broken", progress=False)
    monkeypatch.setattr(engine, "save_checkpoint", real)
    resumed = continual(r, tmp_path / "broken", resume=True, progress=False)
    assert resumed["resumed_from_step"] == 3
    assert resumed["accuracy_matrix"] == whole["accuracy_matrix"]
    strip = [{k: v for k, v in f["method"].items() if k != "seconds"} for f in whole["forget_steps"]]
    assert [{k: v for k, v in f["method"].items() if k != "seconds"} for f in resumed["forget_steps"]] == strip
    a, b = load_file(tmp_path / "broken" / "model.safetensors"), load_file(er_run[1] / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_dry_run_shows_the_forget_steps_and_how_they_are_done(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe()))
    dry = invoke("continual", path, tmp_path / "out", "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert 'forget{"classes": [1]}' in dry.output and 'forget{"step": 2}' in dry.output
    assert "objective npo" in dry.output and "retrain gold standard: forget_steps (2 epochs)" in dry.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("change, mentions", [
    ({"stream": STREAM[:2] + [{"forget": {"classes": [7]}}]}, "stream[2].forget.classes: class 7 was never learned"),
    ({"stream": STREAM[:2] + [{"forget": {"step": 3}}]}, "stream[2].forget.step: 3 is not an earlier learn step"),
    ({"stream": STREAM[:3] + [{"forget": {"step": 3}}]}, "stream[3].forget.step: 3 is not an earlier learn step"),
    ({"stream": STREAM[:2] + [{"forget": {}}]}, "stream[2].forget: an empty forget step"),
    ({"stream": STREAM[:2] + [{"forget": {"classes": []}}]}, "stream[2].forget.classes: empty"),
    ({"stream": STREAM[:2] + [{"forget": {"step": 1, "sample": 3}}]}, "stream[2].forget: give one of step"),
    ({"stream": STREAM[:2] + [{"forget": {"sample": 500}}]}, "stream[2].forget.sample: 500 is more than the 120"),
    ({"stream": STREAM[:2] + [{"forget": {"sample": 2.5}}]}, "stream[2].forget.sample: 2.5"),
    ({"stream": [{"forget": {"sample": 0.1}}]}, "stream[0].forget.sample: nothing is learned"),
    ({"stream": STREAM[:3] + [{"forget": {"classes": [1]}}]}, "stream[3].forget.classes: class 1 has nothing left"),
    ({"stream": [{"learn": {"classes": [0]}, "forget": {"step": 1}}]}, "stream[0]: give learn or forget"),
    ({"forget": {"objective": "nope"}}, "forget.objective: unknown unlearning objective 'nope'"),
    ({"forget": {"objective": "npo", "parameters": {"beta": -1}}}, "forget.parameters.beta"),
    ({"forget": {"objective": "graddiff", "mask": {"name": "nope"}}}, "forget.mask.name: unknown mask"),
    ({"method": "finetune", "forget": {"objective": "npo"}}, "forget.objective: npo needs retain data and finetune"),
    ({"evaluate": {"retrain": "always"}}, "evaluate.retrain"),
])
def test_bad_forget_steps_are_one_line_exit_2_and_nothing_written(tmp_path, change, mentions):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({**recipe(), **change}))
    result = invoke("continual", path, tmp_path / "out", "-q")
    assert result.exit_code == 2, (result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and mentions in lines[0], result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml"]
