"""The learn engine on tiny models: it learns, it resumes exactly, 2 processes equal 1, bad input is refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import toy_records, tree_digest, write_jsonl
from safetensors.torch import load_file
from typer.testing import CliRunner

from malleable.api import learn
from malleable.cli import app


def recipe(model: Path, train: Path, **training) -> dict:
    return {"model": str(model), "method": "lora", "parameters": {"r": 8},
            "data": {"train": str(train)},
            "training": {"steps": 40, "batch_size": 16, "lr": 5e-3, "log_every": 5, **training}}


def losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture()
def train_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "train.jsonl", toy_records(64))


@pytest.mark.parametrize("method,lr", [("lora", 5e-3), ("full", 1e-3)])
def test_loss_decreases_and_the_output_loads(tiny_lm, train_file, tmp_path, method, lr):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    r = recipe(tiny_lm, train_file, lr=lr, schedule="constant")
    r["method"] = method
    if method == "full":
        r["parameters"] = {}
    report = learn(r, tmp_path / "out", progress=False)
    curve = losses(tmp_path / "out")
    assert curve[-1] < curve[0] - 0.2, curve
    assert report["batches"]["steps"] == 40 and report["data"]["train"]["examples"] == 64
    assert report["final"]["train_loss"] == curve[-1]
    assert {"report.json", "report.md", "metrics.jsonl"} <= {p.name for p in (tmp_path / "out").iterdir()}
    assert not (tmp_path / "out.run").exists()  # work files are gone after a finished run
    base = AutoModelForCausalLM.from_pretrained(tiny_lm)
    loaded = PeftModel.from_pretrained(base, tmp_path / "out") if method == "lora" else \
        AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert loaded(input_ids=torch.tensor([[7, 8, 9]])).logits.shape == (1, 3, 128)


def test_gradient_accumulation_equals_one_big_batch(tiny_lm, train_file, tmp_path):
    learn(recipe(tiny_lm, train_file, steps=4), tmp_path / "one", progress=False)
    learn(recipe(tiny_lm, train_file, steps=4, micro_batch_size=4), tmp_path / "four", progress=False)
    a = load_file(tmp_path / "one" / "adapter_model.safetensors")
    b = load_file(tmp_path / "four" / "adapter_model.safetensors")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6)


def crash_at(monkeypatch, crash_step: int, run) -> None:
    """`run()` killed (KeyboardInterrupt) when the learn engine reaches step `crash_step`; the engine is mended
    afterwards, so the next call trains normally."""
    from malleable.learn import engine

    real = engine.batch_indices

    def crashing(step, *args):
        if step == crash_step:
            raise KeyboardInterrupt
        return real(step, *args)

    monkeypatch.setattr(engine, "batch_indices", crashing)
    with pytest.raises(KeyboardInterrupt):
        run()
    monkeypatch.setattr(engine, "batch_indices", real)


def test_resume_after_a_crash_ends_with_the_same_weights(tiny_lm, train_file, tmp_path, monkeypatch):
    r = recipe(tiny_lm, train_file, steps=12, checkpoint_every=5)
    r["parameters"]["dropout"] = 0.2  # the RNG state must be restored too
    learn(r, tmp_path / "straight", progress=False)

    crash_at(monkeypatch, 8, lambda: learn(r, tmp_path / "resumed", progress=False))
    assert not (tmp_path / "resumed").exists()
    assert [p.name for p in (tmp_path / "resumed.run").glob("step-*")] == ["step-000005"]
    with pytest.raises(Exception, match="--resume"):
        learn(r, tmp_path / "resumed", progress=False)
    report = learn(r, tmp_path / "resumed", resume=True, progress=False)
    assert report["resumed"]
    a = load_file(tmp_path / "straight" / "adapter_model.safetensors")
    b = load_file(tmp_path / "resumed" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def torchrun(procs: int, *args) -> None:
    """`args` (a module and its arguments, or a script and its) on `procs` CPU processes; fails on a non-zero exit."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs), "--master_port",
           str(29500 + os.getpid() % 1000), *map(str, args)]
    done = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def test_two_processes_give_the_one_process_loss_curve(tiny_lm, train_file, tmp_path):
    import yaml

    r = recipe(tiny_lm, train_file, steps=6, log_every=1, batch_size=8)
    (tmp_path / "r.yml").write_text(yaml.safe_dump(r))
    for procs, out in ((1, "one"), (2, "two")):
        torchrun(procs, "-m", "malleable", "learn", tmp_path / "r.yml", tmp_path / out, "-q")
    assert json.loads((tmp_path / "two" / "report.json").read_text())["batches"]["processes"] == 2
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), abs=1e-5)
    a = load_file(tmp_path / "one" / "adapter_model.safetensors")
    b = load_file(tmp_path / "two" / "adapter_model.safetensors")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6)


def test_zeroth_order_on_two_processes_follows_one_and_the_replicas_agree(tiny_lm, train_file, tmp_path):
    """SPSA's step is one scalar times shared noise: every process must use the GLOBAL loss difference."""
    import yaml
    from safetensors import safe_open

    r = recipe(tiny_lm, train_file, steps=8, log_every=1, batch_size=8, lr=1e-3)
    r["method"], r["parameters"] = "zo", {"trainable": "full"}
    (tmp_path / "r.yml").write_text(yaml.safe_dump(r))
    driver = Path(__file__).with_name("learn_replicas.py")
    for procs, out in ((1, "one"), (2, "two")):
        torchrun(procs, driver, tmp_path / "r.yml", tmp_path / out)
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), abs=1e-5)
    one, rank0, rank1 = (load_file(tmp_path / f"{name}.safetensors")
                         for name in ("one.rank0", "two.rank0", "two.rank1"))
    base = load_file(tiny_lm / "model.safetensors")
    assert one.keys() == rank0.keys() == base.keys()
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)  # the replicas hold the same weights
    for k in one:
        assert (one[k] - base[k]).abs().max() > 1e-4, k  # every tensor moved far beyond the tolerance below
        # the global loss difference is summed over processes in another order than in one: 1.1e-6 seen once
        torch.testing.assert_close(rank0[k], one[k], rtol=1e-4, atol=1e-5)
    with safe_open(tmp_path / "two.rank0.safetensors", "pt") as f:
        assert f.metadata()["model"] != "DistributedDataParallel"  # no gradient buckets for a gradient-free method


def test_accelerates_fsdp_plugin_is_refused_for_the_recipe_switch(tiny_lm, train_file, tmp_path, monkeypatch):
    from malleable.errors import MalleableError

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch --use_fsdp` sets
    with pytest.raises(MalleableError, match="set `training.sharding: fsdp`"):
        learn(recipe(tiny_lm, train_file, steps=1), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_classification_on_text_label_rows(tiny_lm, tmp_path):
    rows = [{"text": f"copy: w{i} w{i + 1}", "label": "low" if i < 50 else "high"} for i in range(0, 98, 2)]
    train = write_jsonl(tmp_path / "cls.jsonl", rows)
    r = recipe(tiny_lm, train, steps=30, lr=1e-2, schedule="constant")
    r["task"] = "classification"
    report = learn(r, tmp_path / "out", progress=False)
    curve = losses(tmp_path / "out")
    assert report["data"]["train"]["format"] == "text_label"
    assert curve[-1] < curve[0], curve


def test_csv_and_parquet_read_like_jsonl(tmp_path):
    import datasets

    from malleable.data.files import load_table

    rows = toy_records(5)
    write_jsonl(tmp_path / "t.jsonl", rows)
    datasets.Dataset.from_list(rows).to_csv(tmp_path / "t.csv", index=False)
    datasets.Dataset.from_list(rows).to_parquet(tmp_path / "t.parquet")
    for name in ("t.jsonl", "t.csv", "t.parquet"):
        assert load_table(tmp_path / name)[0] == rows, name
    assert load_table(tmp_path / "t.csv")[1][0] == "line 2"  # after the header


def test_bad_rows_within_the_allowance_are_skipped_and_reported(tiny_lm, tmp_path):
    rows = toy_records(32) + [{"prompt": "map: w1"}]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    r = recipe(tiny_lm, train, steps=2)
    r["data"]["max_bad_rows"] = 1
    report = learn(r, tmp_path / "out", progress=False)
    assert report["data"]["train"]["bad_rows"] == 1
    assert report["data"]["train"]["bad_row_examples"] == ["line 33: missing field 'completion'"]


def _run_cli(args) -> tuple[int, str]:
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


BAD_DATA = {
    "missing field": ([{"prompt": "map: w1", "completion": "w2"}, {"prompt": "map: w3"}],
                      "line 2: missing field 'completion'"),
    "empty text": ([{"prompt": "map: w1", "completion": "  "}], "line 1: empty field 'completion'"),
    "not json": ("{\"prompt\": \"map: w1\", \"completion\": \"w2\"}\n{oops\n", "line 2: not valid JSON"),
    "label outside the set": ([{"text": "w1", "label": "low"}, {"text": "w2", "label": "mid"}],
                              "line 2: label 'mid' is not one of ['low', 'high']"),
    "too long": ([{"prompt": " ".join(["w1"] * 40), "completion": "w2"}], "more than data.max_length (16)"),
}


@pytest.mark.parametrize("case", sorted(BAD_DATA))
def test_bad_data_is_one_line_exit_2_and_nothing_written(tiny_lm, tmp_path, case):
    import yaml

    rows, expected = BAD_DATA[case]
    train = tmp_path / "train.jsonl"
    train.write_text(rows) if isinstance(rows, str) else write_jsonl(train, rows)
    r = recipe(tiny_lm, train, steps=2)
    if case == "label outside the set":
        r["task"], r["data"]["labels"] = "classification", ["low", "high"]
    if case == "too long":
        r["data"]["max_length"] = 16
    (tmp_path / "r.yml").write_text(yaml.safe_dump(r))
    before = tree_digest(tmp_path)
    code, output = _run_cli(["learn", tmp_path / "r.yml", tmp_path / "out"])
    assert code == 2, output
    lines = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and str(train) in lines[0] and expected in lines[0], output
    assert tree_digest(tmp_path) == before  # nothing written, inputs untouched


BAD_RECIPES = {
    "unknown key": ({"training": {"steps": 2, "batch_size": 4, "lr_rate": 1.0}}, "training.lr_rate: unknown key"),
    "steps and epochs": ({"training": {"steps": 2, "epochs": 1}}, "exactly one of training.steps"),
    "micro batch": ({"training": {"steps": 2, "batch_size": 6, "micro_batch_size": 4}},
                    "training.micro_batch_size: 4 does not divide"),
    "unknown method": ({"method": "lorax"}, "unknown learn method 'lorax'"),
    "method parameter": ({"parameters": {"r": 0}}, "parameters.r: 0 must be greater than 0"),
    "unknown parameter": ({"parameters": {"rank": 8}}, "parameters.rank: unknown parameter"),
    "missing data": ({"data": {"train": "missing.jsonl"}}, "missing.jsonl: no such data file"),
    "not a model": ({"model": "."}, "not a transformers checkpoint"),
    "fp16 under fsdp": ({"training": {"steps": 2, "sharding": "fsdp", "mixed_precision": "fp16"}},
                        "fp16 does not fit training.sharding: fsdp"),
}


@pytest.mark.parametrize("case", sorted(BAD_RECIPES))
def test_bad_recipes_are_one_line_exit_2_and_nothing_written(tiny_lm, train_file, tmp_path, case):
    import yaml

    change, expected = BAD_RECIPES[case]
    r = recipe(tiny_lm, train_file)
    for key, value in change.items():
        r[key] = value if not isinstance(value, dict) or key == "parameters" else {**r.get(key, {}), **value}
    if case == "steps and epochs" or case == "micro batch":
        r["training"] = change["training"]
    (tmp_path / "r.yml").write_text(yaml.safe_dump(r))
    before = tree_digest(tmp_path)
    code, output = _run_cli(["learn", tmp_path / "r.yml", tmp_path / "out"])
    assert code == 2, output
    lines = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and expected in lines[0], output
    assert tree_digest(tmp_path) == before


def test_epochs_and_bf16_autocast(tiny_lm, train_file, tmp_path):
    r = recipe(tiny_lm, train_file, lr=1e-2, schedule="constant", mixed_precision="bf16")
    del r["training"]["steps"]
    r["training"]["epochs"] = 5  # 64 examples, batch 16: 20 steps
    report = learn(r, tmp_path / "out", progress=False)
    curve = losses(tmp_path / "out")
    assert report["batches"]["steps"] == 20 and report["mixed_precision"] == "bf16"
    assert curve[-1] < curve[0], curve


def test_snapshots_are_the_model_at_their_steps_and_feed_twa(tiny_lm, train_file, tmp_path, monkeypatch):
    """`snapshot_every`: OUT/snapshots/step-N/ is the adapter after step N (a constant-lr run of N steps gives the
    same tensors), it survives a crash and resume unchanged, and the snapshots with the output are what
    `merge` twa_v averages."""
    import yaml

    r = recipe(tiny_lm, train_file, steps=6, snapshot_every=2, checkpoint_every=3, schedule="constant", log_every=1)
    report = learn(r, tmp_path / "out", progress=False)
    assert report["snapshots"] == ["snapshots/step-000002", "snapshots/step-000004"]
    snaps = [tmp_path / "out" / s for s in report["snapshots"]]
    learn(recipe(tiny_lm, train_file, steps=2, schedule="constant", log_every=1), tmp_path / "two", progress=False)
    a = load_file(snaps[0] / "adapter_model.safetensors")
    b = load_file(tmp_path / "two" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a[next(iter(a))], load_file(snaps[1] / "adapter_model.safetensors")[next(iter(a))])

    crash_at(monkeypatch, 5, lambda: learn(r, tmp_path / "resumed", progress=False))
    learn(r, tmp_path / "resumed", resume=True, progress=False)
    for s in report["snapshots"]:
        assert tree_digest(tmp_path / "resumed" / s) == tree_digest(tmp_path / "out" / s)

    write_jsonl(tmp_path / "val.jsonl", toy_records(8, seed=1))
    twa = {"method": "twa_v", "inputs": [{"path": str(p)} for p in [*snaps, tmp_path / "out"]],
           "data": {"train": str(train_file), "validation": str(tmp_path / "val.jsonl")},
           "parameters": {"epochs": 1, "batch_size": 4}}
    (tmp_path / "twa.yaml").write_text(yaml.safe_dump(twa))
    done = CliRunner().invoke(app, ["merge", str(tmp_path / "twa.yaml"), str(tmp_path / "avg"), "-q"])
    assert done.exit_code == 0, done.output
    assert json.loads((tmp_path / "avg" / "report.json").read_text())["twa"]["checkpoints"] == 3
