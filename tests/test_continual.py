"""`malleable continual`: the methods' defining properties, the reservoir, resume, the CLI and bad input.

The streams are split digits (scikit-learn's 8x8 images, 30-40 per class): seconds per run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from malleable.cli import app
from malleable.continual import engine, get_method
from malleable.continual.buffer import Reservoir
from malleable.continual.engine import continual
from malleable.recipes.continual import parse_continual_recipe

TINY = {"method": "er", "dataset": "digits", "stream": [{"learn": {"classes": [0, 1]}}, {"learn": {"classes": [2, 3]}},
                                                        {"learn": {"classes": [4, 5]}}],
        "width": 4, "training": {"batch_size": 10, "replay_batch_size": 10, "buffer_size": 30, "lr": 0.1,
                                 "max_per_class": 30, "test_per_class": 15}}


def recipe(**changes) -> dict:
    return changed(TINY, **changes)


def changed(base: dict, **changes) -> dict:
    """A deep copy of `base` with `section__key=value` (or `section=value`) changes."""
    r = json.loads(json.dumps(base))
    for key, value in changes.items():
        section, _, name = key.partition("__")
        if name:
            r[section][name] = value
        else:
            r[section] = value
    return r


def run(tmp_path: Path, name: str, **changes) -> tuple[dict, dict]:
    report = continual(parse_continual_recipe(recipe(**changes)), tmp_path / name, progress=False)
    return report, load_file(tmp_path / name / "model.safetensors")


class Fixed(torch.nn.Module):
    """A 'model' whose logits are a parameter, one row per example id (x holds the ids): the gradient on each
    logit is directly readable."""

    def __init__(self, rows: int, classes: int = 10):
        super().__init__()
        self.z = torch.nn.Parameter(torch.randn(rows, classes, generator=torch.Generator().manual_seed(0)))

    def forward(self, x):
        return self.z[x[:, 0].long()]


def part(labels: list[int], first: int = 0) -> dict:
    """Examples with ids first, first + 1, ... (their rows of Fixed's logits)."""
    return {"x": torch.arange(first, first + len(labels)).view(-1, 1), "labels": torch.tensor(labels)}


def test_las_at_tau_0_is_er_bit_for_bit(tmp_path):
    er, er_weights = run(tmp_path, "er")
    las, las_weights = run(tmp_path, "las", method="las", parameters={"tau": 0.0})
    assert er_weights.keys() == las_weights.keys()
    assert all(torch.equal(er_weights[k], las_weights[k]) for k in er_weights)
    assert er["accuracy_matrix"] == las["accuracy_matrix"]
    las1, las1_weights = run(tmp_path, "las1", method="las")  # and tau 1 changes the run
    assert not all(torch.equal(er_weights[k], las1_weights[k]) for k in er_weights)


def test_las_window_1_gives_absent_classes_no_gradient():
    method = get_method("las", {"tau": 1.0, "window": 1})
    method.setup(10)
    model = Fixed(6)
    loss = method.loss(model, {"stream": part([0, 0, 1, 1]), "replay": part([3, 1], 4)})
    loss.backward()
    g = model.z.grad
    present = [0, 1, 3]
    absent = [c for c in range(10) if c not in present]
    assert torch.isfinite(loss)
    assert torch.count_nonzero(g[:, absent]) == 0
    assert torch.all(g[:, present].abs().sum(0) > 0)
    # tau 0 is plain cross-entropy over every class: the absent classes do get gradient
    plain = get_method("las", {"tau": 0.0})
    plain.setup(10)
    model0 = Fixed(6)
    plain.loss(model0, {"stream": part([0, 0, 1, 1]), "replay": part([3, 1], 4)}).backward()
    assert torch.count_nonzero(model0.z.grad[:, absent]) > 0


def test_las_prior_counts_include_replayed_labels_over_the_window():
    method = get_method("las", {"window": 2})
    method.setup(5)
    model = Fixed(4, 5)
    method.loss(model, {"stream": part([0, 0]), "replay": part([3, 4], 2)})
    method.loss(model, {"stream": part([1, 1]), "replay": part([3, 3], 2)})
    assert method.recent.sum(0).tolist() == [2, 2, 0, 3, 1]
    method.loss(model, {"stream": part([2, 2]), "replay": None})  # the first batch leaves the window of 2
    assert method.recent.sum(0).tolist() == [0, 2, 2, 2, 0]
    # the adjustment is exactly tau * log(counts) on the present classes: compare with the formula
    model.zero_grad()
    method.recent = torch.zeros(0, 5)
    loss = method.loss(model, {"stream": part([0, 1]), "replay": part([1, 4], 2)})
    logits = model.z.detach() + torch.log(torch.tensor([[1.0, 2.0, 0.0, 0.0, 1.0]]))
    assert loss.item() == pytest.approx(F.cross_entropy(logits, torch.tensor([0, 1, 1, 4])).item(), rel=1e-6)


def test_mir_las_at_tau_0_is_mir_bit_for_bit_and_retrieval_changes_las(tmp_path):
    mir, mir_weights = run(tmp_path, "mir", method="mir", parameters={"subsample": 20})
    tau0, tau0_weights = run(tmp_path, "mir_las0", method="mir_las", parameters={"subsample": 20, "tau": 0.0})
    assert all(torch.equal(mir_weights[k], tau0_weights[k]) for k in mir_weights)
    assert mir["accuracy_matrix"] == tau0["accuracy_matrix"]
    _, mir_las_weights = run(tmp_path, "mir_las", method="mir_las", parameters={"subsample": 20})
    _, las_weights = run(tmp_path, "las", method="las")  # the same loss, uniform retrieval: another run
    assert not all(torch.equal(las_weights[k], mir_las_weights[k]) for k in las_weights)


def test_mir_replays_the_stored_examples_whose_loss_the_virtual_step_raises_most():
    # a linear model without bias: the virtual step on one incoming example e0 of class 0 moves W by
    # -lr * (softmax - onehot) e0^T, so a stored example a * e0 of class 1 gains loss in proportion to a, and
    # one of class 0 loses loss; both are computed here from that formula, independently of the method
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 4, bias=False)
    e0 = torch.tensor([[1.0, 0.0, 0.0]])
    scale = torch.tensor([0.5, 3.0, -1.0, 2.0, 0.2, 1.0, 2.5, -2.0])
    x = scale.view(-1, 1) * e0 + torch.tensor([0.0, 0.3, 0.0])  # the same second feature for all
    y = torch.tensor([1, 1, 1, 0, 1, 0, 1, 2])
    buffer = Reservoir(8, 0)
    buffer.add(x, y)
    lr = 0.5
    W = model.weight.detach()
    grad = (torch.softmax(e0 @ W.T, 1) - F.one_hot(torch.tensor([0]), 4).float()).T @ e0
    rise = (F.cross_entropy(x @ (W - lr * grad).T, y, reduction="none") - F.cross_entropy(x @ W.T, y, reduction="none"))
    method = get_method("mir", {"subsample": 8})
    method.setup(4)
    picked = method.retrieve(model, {"x": e0, "labels": torch.tensor([0])}, buffer, 3, lr)
    expected = torch.argsort(rise, descending=True)[:3]
    assert rise[expected].min() > rise[[i for i in range(8) if i not in expected.tolist()]].max()  # a clear top 3
    assert sorted(picked["x"][:, 0].tolist()) == sorted(scale[expected].tolist())
    assert picked["labels"].tolist() == y[expected].tolist()  # largest rise first
    assert model.weight.grad is None  # the virtual step leaves no gradient behind
    assert set(scale[expected].tolist()) == {3.0, 2.5, 0.5}  # the class-1 examples furthest along +e0
    # with a subsample of 2 only two of the stored examples are scored, and the better of those two is replayed
    one = get_method("mir_las", {"subsample": 2}).retrieve(model, {"x": e0, "labels": torch.tensor([0])}, buffer, 1,
                                                          lr)
    assert len(one["labels"]) == 1
    assert get_method("mir", {}).retrieve(model, {"x": e0, "labels": torch.tensor([0])}, Reservoir(4, 0), 3, lr) is None


def test_er_ace_incoming_softmax_is_over_the_incoming_classes_only():
    method = get_method("er_ace", {})
    model = Fixed(6)
    stream, replay = part([2, 2, 5, 2]), part([0, 7], 4)
    loss = method.loss(model, {"stream": stream, "replay": replay})
    z = model.z.detach()
    incoming = F.cross_entropy(z[:4][:, [2, 5]], torch.tensor([0, 0, 1, 0]))
    expected = (F.cross_entropy(z[-2:], torch.tensor([0, 7])) + incoming) / 2
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    loss.backward()
    absent = [c for c in range(10) if c not in (2, 5)]
    g = model.z.grad
    # rows 0-3 are the incoming examples, rows 4-5 the replayed ones
    assert torch.count_nonzero(g[:4][:, absent]) == 0
    assert torch.count_nonzero(g[4:]) > 0
    # no replayed batch yet: plain cross-entropy over every class
    alone = method.loss(Fixed(4), {"stream": stream, "replay": None})
    assert alone.item() == pytest.approx(F.cross_entropy(Fixed(4).z.detach(), stream["labels"]).item(), rel=1e-6)


def test_reservoir_keeps_each_seen_example_with_probability_capacity_over_seen():
    capacity, n, trials = 20, 200, 600
    kept = torch.zeros(n)
    for seed in range(trials):
        r = Reservoir(capacity, seed)
        for start in range(0, n, 10):  # offered in batches of 10, as the engine does
            ids = torch.arange(start, start + 10)
            r.add(ids.float().view(-1, 1), ids)
        assert len(r) == capacity and r.seen == n
        assert len(set(r.y.tolist())) == capacity  # each slot a distinct example
        kept[r.y] += 1
    p = capacity / n
    expected, sd = trials * p, (trials * p * (1 - p)) ** 0.5
    assert kept.sum() == trials * capacity
    assert (kept - expected).abs().max() < 5 * sd  # every example, early or late, near M/n
    first, last = kept[:50].mean() / trials, kept[-50:].mean() / trials
    assert abs(first - p) < 0.015 and abs(last - p) < 0.015
    # chi-square of the counts against M/n: fixed seeds, so a fixed statistic; a broken rule gives thousands
    chi2 = float(((kept - expected) ** 2 / expected).sum())
    assert chi2 < 300, chi2  # 199 degrees of freedom: the 0.9999 quantile is about 290


def test_reservoir_sample_draws_without_replacement_and_none_when_empty():
    r = Reservoir(8, 0)
    assert r.sample(4) is None
    r.add(torch.arange(5).float().view(-1, 1), torch.arange(5))
    s = r.sample(10)
    assert sorted(s["labels"].tolist()) == [0, 1, 2, 3, 4]


def kill_after(monkeypatch, last: int):
    """The engine stops (KeyboardInterrupt) right after saving step `last`'s checkpoint; returns the real save,
    to put back before resuming."""
    real = engine.save_checkpoint

    def save_then_stop(directory, step, *args, **kwargs):
        real(directory, step, *args, **kwargs)
        if step == last:
            raise KeyboardInterrupt

    monkeypatch.setattr(engine, "save_checkpoint", save_then_stop)
    return real


def test_a_killed_stream_resumes_at_its_last_finished_step_and_ends_identical(tmp_path, monkeypatch):
    whole, weights = run(tmp_path, "whole", method="las")
    real = kill_after(monkeypatch, 2)
    r = parse_continual_recipe(recipe(method="las"))
    with pytest.raises(KeyboardInterrupt):
        continual(r, tmp_path / "broken", progress=False)
    assert not (tmp_path / "broken").exists()
    assert sorted(p.name for p in (tmp_path / "broken.run").iterdir() if p.name.startswith("step-")) == \
        ["step-000001", "step-000002"]
    monkeypatch.setattr(engine, "save_checkpoint", real)
    resumed = continual(r, tmp_path / "broken", resume=True, progress=False)
    assert resumed["resumed_from_step"] == 2
    assert resumed["accuracy_matrix"] == whole["accuracy_matrix"]
    again = load_file(tmp_path / "broken" / "model.safetensors")
    assert all(torch.equal(weights[k], again[k]) for k in weights)
    for k in (1, 2, 3):
        a = load_file(tmp_path / "whole" / "steps" / f"step-{k}.safetensors")
        b = load_file(tmp_path / "broken" / "steps" / f"step-{k}.safetensors")
        assert all(torch.equal(a[n], b[n]) for n in a)
    assert not (tmp_path / "broken.run").exists()  # a finished run removes its checkpoints


def test_joint_walks_everything_seen_so_far_and_finetune_forgets(tmp_path):
    joint, _ = run(tmp_path, "joint", method="joint", parameters={"epochs": 2})
    assert [s["examples"] for s in joint["steps"]] == [60, 120, 180]
    assert [s["batches"] for s in joint["steps"]] == [12, 24, 36]
    fine, _ = run(tmp_path, "finetune", method="finetune")
    assert fine["buffer"] is None and [s["batches"] for s in fine["steps"]] == [6, 6, 6]
    # fine-tuning alone on the last task's two classes: the first task's images are no longer recognised
    assert fine["accuracy_matrix"][-1][0] < joint["accuracy_matrix"][-1][0]


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_cli_writes_the_model_the_steps_the_report_and_the_plots(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe(method="er_ace", training__eval_every=2)))
    result = invoke("continual", path, tmp_path / "out", "-q")
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "model.json", "report.json", "report.md", "accuracy_matrix.png",
            "accuracy_stream.png", "steps"} <= names
    assert sorted(p.name for p in (out / "steps").iterdir()) == [f"step-{k}.safetensors" for k in (1, 2, 3)]
    report = json.loads((out / "report.json").read_text())
    R = report["accuracy_matrix"]
    assert report["schema"] == "malleable.continual/1" and len(R) == 4 and all(len(row) == 3 for row in R)
    assert report["buffer"] == {"size": 30, "filled": 30, "seen": 180}
    assert [(a["step"], a["batch"]) for a in report["anytime"]] == [(k, b) for k in (1, 2, 3) for b in (2, 4, 6)]
    assert set(report["metrics"]) >= {"average_accuracy", "forgetting", "backward_transfer", "forward_transfer",
                                      "plasticity"}
    assert "| step 3 |" in (out / "report.md").read_text()
    dry = invoke("continual", path, tmp_path / "other", "--dry-run")
    assert dry.exit_code == 0 and "3 steps" in dry.output and not (tmp_path / "other").exists()


@pytest.mark.parametrize("change, mentions", [
    ({"stream": [{"learn": {"classes": [0, 1]}}, {}]}, "stream[1]: an empty step"),
    ({"stream": [{"learn": {"classes": []}}]}, "stream.0.learn.classes"),
    ({"stream": []}, "stream: an empty list"),
    ({"stream": "split_cifar"}, "unknown scenario 'split_cifar'"),
    ({"stream": "split_fashion_mnist"}, "dataset: scenario split_fashion_mnist streams fashion_mnist"),
    ({"stream": [{"forget": {"classes": [0]}}]}, "stream[0].forget.classes: class 0 was never learned"),
    ({"stream": [{"learn": {"classes": [0, 12]}}]}, "stream[0].learn.classes: class 12"),
    ({"method": "gem"}, "unknown continual method 'gem'"),
    ({"parameters": {"tau": 1.0}}, "parameters.tau: unknown parameter"),
    ({"method": "las", "parameters": {"tau": -1.0}}, "parameters.tau"),
    ({"training": {**TINY["training"], "buffer_size": 1000}}, "training.buffer_size: 1000 is larger than the whole"),
    ({"training": {**TINY["training"], "buffer_size": 0}}, "training.buffer_size: er replays"),
    ({"training": {**TINY["training"], "batch": 10}}, "training.batch: unknown key"),
])
def test_bad_input_is_one_line_exit_2_and_nothing_written(tmp_path, change, mentions):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({**recipe(), **change}))
    result = invoke("continual", path, tmp_path / "out", "-q")
    assert result.exit_code == 2, (result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and mentions in lines[0], result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml"]


def test_an_existing_output_needs_force_and_an_old_run_needs_resume_or_force(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe(method="finetune")))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("keep")
    result = invoke("continual", path, tmp_path / "out", "-q")
    assert result.exit_code == 2 and "output exists (pass --force" in result.stderr
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["mine.txt"]
    result = invoke("continual", path, tmp_path / "out", "-q", "--force")  # not a malleable output: refused
    assert result.exit_code == 2 and "not an earlier malleable output" in result.stderr
    (tmp_path / "new.run").mkdir()
    (tmp_path / "new.run" / "x").write_text("x")
    result = invoke("continual", path, tmp_path / "new", "-q")
    assert result.exit_code == 2 and "pass --resume to continue it" in result.stderr
    assert not (tmp_path / "new").exists()


def test_the_python_api_takes_a_dict_or_a_file_and_never_writes_over_the_recipe(tmp_path):
    from malleable import api
    from malleable.errors import OutputError

    report = api.continual(recipe(method="finetune"), tmp_path / "out", progress=False)
    assert report["method"] == "finetune" and (tmp_path / "out" / "model.safetensors").is_file()
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe(method="finetune")))
    with pytest.raises(OutputError, match="would overwrite input"):
        api.continual(path, path, force=True, progress=False)
    again = api.continual(path, tmp_path / "out", force=True, progress=False)
    assert again["accuracy_matrix"] == report["accuracy_matrix"]  # same recipe and seed, same run


def test_blurry_stream_puts_m_percent_of_each_task_from_the_other_tasks_classes():
    from malleable.continual.stream import blurred, load_tasks, stream_classes

    labels = torch.arange(10).repeat_interleave(40)  # 40 images per class, class c at 40c .. 40c + 39
    split = [[i for i in range(400) if labels[i] in (2 * t, 2 * t + 1)] for t in range(5)]
    tasks = blurred(split, labels, 0.10, seed=3)
    assert sorted(i for t in tasks for i in t) == list(range(400))  # every image exactly once
    for t, task in enumerate(tasks):
        own = [i for i in task if labels[i] in (2 * t, 2 * t + 1)]
        assert len(task) == 80 and len(own) == 72  # 10% of the task from other tasks' classes
        minor = torch.bincount(labels[[i for i in task if i not in own]], minlength=10)
        assert minor[2 * t] == minor[2 * t + 1] == 0
        assert sorted(minor.tolist()) == [0, 0] + [1] * 8  # 4 moved per class, one to each other task
    assert tasks == blurred(split, labels, 0.10, seed=3) and tasks != blurred(split, labels, 0.10, seed=4)
    assert blurred(split[:1], labels, 0.10, seed=3) == [split[0]]  # one task: nothing to blur with
    # the scenario through the recipe: the same classes per step as the split stream, blurred training data
    r = parse_continual_recipe({**recipe(), "stream": "blurry_digits"})
    assert stream_classes(r) == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    loaded, _, _ = load_tasks(r, stream_classes(r))
    plain, _, _ = load_tasks(parse_continual_recipe({**recipe(), "stream": "split_digits"}), stream_classes(r))
    assert sum(len(t.train) for t in loaded) == sum(len(t.train) for t in plain) == 300
    assert all(torch.equal(torch.stack([x for x, _ in t.test]), torch.stack([x for x, _ in p.test]))
               for t, p in zip(loaded, plain))
    minor = [sum(y not in t.classes for _, y in t.train) for t in loaded]
    assert sum(minor) == 30 and all(m > 0 for m in minor)  # 3 of each class's 30 moved to other tasks
