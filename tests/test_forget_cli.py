"""`malleable forget` and `malleable audit` end to end on a tiny fine-tuned Llama; bad input is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import toy_records, tree_digest, write_jsonl
from typer.testing import CliRunner

from malleable.api import learn
from malleable.cli import app


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def target(tiny_lm, tmp_path_factory) -> dict[str, Path]:
    """A tiny Llama fully fine-tuned on 40 toy rows; rows 0-7 are to be forgotten, 40-47 were never seen."""
    root = tmp_path_factory.mktemp("forget")
    rows = toy_records(48)
    files = {"forget": write_jsonl(root / "forget.jsonl", rows[:8]),
             "retain": write_jsonl(root / "retain.jsonl", rows[8:40]),
             "holdout": write_jsonl(root / "holdout.jsonl", rows[40:]),
             "all": write_jsonl(root / "all.jsonl", rows[:40])}
    learn({"model": str(tiny_lm), "method": "full", "data": {"train": str(files["all"])},
           "training": {"steps": 80, "batch_size": 8, "lr": 3e-3, "schedule": "constant"}}, root / "model",
          progress=False)
    return {**files, "model": root / "model", "root": root}


def recipe_file(path: Path, target: dict, **changes) -> Path:
    r = {"model": str(target["model"]), "objective": "npo",
         "data": {"forget": str(target["forget"]), "retain": str(target["retain"]),
                  "holdout": str(target["holdout"])},
         "training": {"steps": 15, "batch_size": 8, "lr": 2e-3}}
    for key, value in changes.items():
        section, _, name = key.partition("__")
        if name:
            r[section][name] = value
        elif value is None:
            r.pop(section)
        else:
            r[section] = value
    path.write_text(yaml.safe_dump(r))
    return path


def test_forget_writes_a_model_whose_forget_set_is_gone_with_its_evidence(target, tmp_path):
    before = tree_digest(target["model"])
    result = invoke("forget", recipe_file(tmp_path / "r.yaml", target), tmp_path / "out", "-q")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    e = report["evidence"]
    assert report["schema"] == "malleable.forget/1" and report["steps"] == 15
    assert e["original"]["forget"]["accuracy"] > 0.9  # the target had memorised it
    assert e["unlearned"]["forget"]["accuracy"] < e["original"]["forget"]["accuracy"] - 0.3
    assert e["unlearned"]["forget"]["loss"] > e["original"]["forget"]["loss"] + 1.0
    assert e["unlearned"]["retain"]["accuracy"] > 0.5
    assert {"membership_auc"} <= e["original"].keys() and e["original"]["membership_auc"] > 0.9
    for name in ("model.safetensors", "config.json", "tokenizer.json", "report.md", "evidence.png"):
        assert (tmp_path / "out" / name).is_file(), name
    assert tree_digest(target["model"]) == before


def test_forget_through_lora_writes_an_adapter_and_compares_with_a_reference(target, tmp_path):
    result = invoke("forget", recipe_file(tmp_path / "r.yaml", target, lora={"r": 4, "alpha": 8},
                                          training__lr=5e-3), tmp_path / "out", "-q",
                    "--reference", target["model"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["output"]["kind"] == "adapter"
    gap = report["gap_to_reference"]["forget"]["accuracy"]
    e = report["evidence"]
    assert gap == pytest.approx(abs(e["unlearned"]["forget"]["accuracy"] - e["reference"]["forget"]["accuracy"]))


def test_audit_measures_membership_and_relearning(target, tmp_path):
    forgot = tmp_path / "forgot"
    assert invoke("forget", recipe_file(tmp_path / "r.yaml", target, objective="ga", data__retain=None),
                  forgot, "-q").exit_code == 0
    result = invoke("audit", forgot, "--forget", target["forget"], "--retain", target["retain"], "--holdout",
                    target["holdout"], "--original", target["model"], "--relearn-steps", "10",
                    "--relearn-fraction", "0.25", "--relearn-lr", "3e-3", "--out", tmp_path / "audit")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "audit" / "report.json").read_text())
    attack = report["relearning"]["audited"]
    assert attack["trained_on"] == 2 and attack["measured_on"] == 6
    assert report["evidence"]["audited"]["forget"]["accuracy"] < report["evidence"]["original"]["forget"]["accuracy"]
    assert "share_of_removed_recovered" in report["recovered"]
    assert (tmp_path / "audit" / "evidence.png").is_file()


@pytest.mark.parametrize("case", ["overlap", "empty_forget", "bad_row", "unknown_objective", "bad_parameter",
                                  "retain_missing", "tokenizer_mismatch", "unknown_key"])
def test_bad_input_is_one_line_exit_2_and_nothing_written(target, tiny_lm, tmp_path, case):
    changes, extra = {}, []
    if case == "overlap":
        changes["data__retain"] = str(write_jsonl(tmp_path / "retain.jsonl", toy_records(12)))
    elif case == "empty_forget":
        (tmp_path / "empty.jsonl").write_text("")
        changes["data__forget"] = str(tmp_path / "empty.jsonl")
    elif case == "bad_row":
        changes["data__forget"] = str(write_jsonl(tmp_path / "f.jsonl", [{"prompt": "map: w1", "completion": ""}]))
    elif case == "unknown_objective":
        changes["objective"] = "forget_everything"
    elif case == "bad_parameter":
        changes["parameters"] = {"beta": -1}
    elif case == "retain_missing":
        changes["data__retain"] = None
    elif case == "tokenizer_mismatch":
        from transformers import AutoTokenizer

        other = tmp_path / "other"
        __import__("shutil").copytree(target["model"], other)
        tok = AutoTokenizer.from_pretrained(other)
        tok.add_tokens(["zzz"])
        tok.save_pretrained(other)
        extra = ["--reference", other]
    elif case == "unknown_key":
        changes["training__learning_rate"] = 1e-3
    r = recipe_file(tmp_path / "r.yaml", target, **changes)
    if case == "retain_missing":
        r.write_text(yaml.safe_dump({**yaml.safe_load(r.read_text()), "data": {
            "forget": str(target["forget"])}}))
    before = tree_digest(target["model"])
    result = invoke("forget", r, tmp_path / "out", "-q", *extra)
    assert result.exit_code == 2, result.output
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: "), result.stderr
    assert not (tmp_path / "out").exists()
    assert tree_digest(target["model"]) == before
    expected = {"overlap": "must not overlap", "empty_forget": "empty.jsonl", "bad_row": "f.jsonl: line 1: empty field",
                "unknown_objective": "forget_everything", "bad_parameter": "parameters.beta",
                "retain_missing": "data.retain: npo needs retain", "tokenizer_mismatch": "tokenizer differs",
                "unknown_key": "learning_rate"}[case]
    assert expected in result.stderr, result.stderr


def test_a_classifier_refuses_labels_outside_its_classes(tiny_lm, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(tiny_lm, num_labels=2, id2label={0: "a", 1: "b"},
                                                               label2id={"a": 0, "b": 1})
    model.save_pretrained(tmp_path / "clf")
    AutoTokenizer.from_pretrained(tiny_lm).save_pretrained(tmp_path / "clf")
    forget = write_jsonl(tmp_path / "f.jsonl", [{"text": "w1 w2", "label": "a"}, {"text": "w3", "label": "c"}])
    r = tmp_path / "r.yaml"
    r.write_text(yaml.safe_dump({"model": str(tmp_path / "clf"), "task": "classification", "objective": "ga",
                                 "data": {"forget": str(forget)}, "training": {"steps": 1}}))
    result = invoke("forget", r, tmp_path / "out", "-q")
    assert result.exit_code == 2 and "f.jsonl: line 2" in result.stderr and "'c'" in result.stderr, result.stderr
    assert not (tmp_path / "out").exists()


def test_reference_retrain_trains_the_gold_standard_on_retain_and_reports_the_gap(target, tiny_lm, tmp_path):
    learn_recipe = tmp_path / "learn.yaml"
    learn_recipe.write_text(yaml.safe_dump({"model": str(tiny_lm), "method": "full",
                                            "data": {"train": "replaced by data.retain"},
                                            "training": {"steps": 20, "batch_size": 8, "lr": 3e-3}}))
    r = recipe_file(tmp_path / "r.yaml", target, retrain=str(learn_recipe))
    result = invoke("forget", r, tmp_path / "out", "-q", "--reference", "retrain")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    retrained = json.loads((tmp_path / "out.retrain" / "report.json").read_text())
    assert retrained["data"]["train"]["path"] == str(target["retain"])
    assert report["reference"] == str(tmp_path / "out.retrain")
    e = report["evidence"]
    assert e["reference"]["forget"]["accuracy"] < e["original"]["forget"]["accuracy"]  # never saw the forget rows
    assert report["gap_to_reference"]["retain"]["loss"] == pytest.approx(
        abs(e["unlearned"]["retain"]["loss"] - e["reference"]["retain"]["loss"]), abs=1e-6)


def test_language_model_evidence_includes_the_min_k_attack(target, tmp_path):
    result = invoke("audit", target["model"], "--forget", target["forget"], "--holdout", target["holdout"],
                    "--relearn-steps", "1", "--out", tmp_path / "a")
    assert result.exit_code == 0, result.output
    assert "min-k%" in result.stdout
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    auc = report["evidence"]["audited"]["membership_auc_min_k"]
    assert auc > 0.8  # the target memorised its forget rows and never saw the holdout rows


def test_dry_run_checks_the_recipe_and_writes_nothing(target, tmp_path):
    result = invoke("forget", recipe_file(tmp_path / "r.yaml", target, mask={"name": "salun", "ratio": 0.2}),
                    tmp_path / "out", "--dry-run")
    assert result.exit_code == 0, result.output
    assert "npo" in result.stdout and '"beta": 0.1' in result.stdout and "salun" in result.stdout
    assert not (tmp_path / "out").exists()
    bad = invoke("forget", recipe_file(tmp_path / "r.yaml", target, mask={"name": "salun", "ratio": 2}),
                 tmp_path / "out", "--dry-run")
    assert bad.exit_code == 2 and "mask.ratio" in bad.stderr, bad.stderr


def test_forget_under_two_processes_writes_one_output(target, tmp_path):
    """`malleable forget` runs under torchrun and ends with one complete output. Only the main process writes
    it; two writers usually get away with replacing each other's directory, so this checks the run, not the race."""
    import os
    import subprocess
    import sys

    recipe = recipe_file(tmp_path / "r.yaml", target, training={"steps": 4, "batch_size": 8, "lr": 2e-3})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(29700 + os.getpid() % 1000), "-m", "malleable", "forget", str(recipe), str(tmp_path / "out"), "-q"]
    done = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((tmp_path / "out" / "report.json").read_text())["steps"] == 4
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no stray temporary directory


def test_idkdpo_and_dpo_run_from_files_and_dpo_names_a_missing_alternate(target, tmp_path):
    rows = toy_records(48)[:8]
    result = invoke("forget", recipe_file(tmp_path / "r.yaml", target, objective="idkdpo",
                                          training={"steps": 4, "batch_size": 8, "lr": 2e-3}), tmp_path / "idk", "-q")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "idk" / "report.json").read_text())["steps"] == 4
    forget = write_jsonl(tmp_path / "f.jsonl", [{**r, "wrong": rows[(i + 1) % 8]["completion"]}
                                                for i, r in enumerate(rows)])
    r = recipe_file(tmp_path / "r.yaml", target, objective="dpo", parameters={"alternate_field": "wrong"},
                    data__forget=str(forget), training={"steps": 4, "batch_size": 8, "lr": 2e-3})
    result = invoke("forget", r, tmp_path / "dpo", "-q")
    assert result.exit_code == 0, result.output
    write_jsonl(forget, [{**r, "wrong": "w1"} for r in rows[:7]] + rows[7:])
    result = invoke("forget", r, tmp_path / "bad", "-q")
    assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "row 8 has no 'wrong' text" in result.stderr and not (tmp_path / "bad").exists()


def test_an_lm_only_objective_on_a_classifier_task_is_one_line(tiny_lm, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(tiny_lm, num_labels=2, id2label={0: "a", 1: "b"},
                                                               label2id={"a": 0, "b": 1})
    model.save_pretrained(tmp_path / "clf")
    AutoTokenizer.from_pretrained(tiny_lm).save_pretrained(tmp_path / "clf")
    forget = write_jsonl(tmp_path / "f.jsonl", [{"text": "w1 w2", "label": "a"}])
    for name in ("dpo", "idkdpo"):
        r = tmp_path / "r.yaml"
        r.write_text(yaml.safe_dump({"model": str(tmp_path / "clf"), "task": "classification", "objective": name,
                                     "data": {"forget": str(forget), "retain": str(forget)},
                                     "training": {"steps": 1}}))
        result = invoke("forget", r, tmp_path / "out", "-q")
        assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.stderr
        assert f"objective: {name} does not apply to task classification (it is for language models only)" \
            in result.stderr
        assert not (tmp_path / "out").exists()
