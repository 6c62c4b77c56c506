"""Continual LoRA post-training (`malleable continual` with a `tasks:` list): every strategy end to end on a tiny
Llama, the written adapter is the one scored, O-LoRA's and EWC's terms, resume, and bad input."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from malleable.cli import app
from malleable.continual import get_method
from malleable.continual.engine import continual
from malleable.recipes.continual import parse_continual_recipe
from tests.conftest import WORDS, write_jsonl

STRATEGIES = ["seq_lora", "inc_lora", "o_lora", "replay_lora", "l2_lora", "ewc_lora", "merge_each", "joint_lora"]


def mapping(seed: int, words: list[str]) -> list[dict]:
    rng = random.Random(seed)
    target = WORDS[:]
    rng.shuffle(target)
    return [{"prompt": f"map: {w}", "completion": target[i]} for i, w in enumerate(words)]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    """Two toy tasks (maps over disjoint words), a composed test and a probe text."""
    root = tmp_path_factory.mktemp("tasks")
    out = {}
    for name, seed, words in (("a", 1, WORDS[:24]), ("b", 2, WORDS[24:48])):
        rows = mapping(seed, words)
        write_jsonl(root / f"{name}-train.jsonl", rows)
        write_jsonl(root / f"{name}-test.jsonl", rows[:12])
        out[name] = (root / f"{name}-train.jsonl", root / f"{name}-test.jsonl")
    write_jsonl(root / "both.jsonl", mapping(1, WORDS[:6]) + mapping(2, WORDS[24:30]))
    (root / "probe.txt").write_text(" ".join(WORDS * 4))
    out["composed"], out["probe"] = root / "both.jsonl", root / "probe.txt"
    return out


def recipe(tiny_lm, files, method: str, **changes) -> dict:
    r = {"model": str(tiny_lm), "method": method, "lora": {"r": 8, "alpha": 16},
         "tasks": [{"name": n, "train": str(files[n][0]), "test": str(files[n][1])} for n in ("a", "b")],
         "data": {"chat_template": "off"},
         "training": {"steps": 100, "batch_size": 8, "lr": 0.003, "schedule": "constant"},
         "evaluate": {"probe": str(files["probe"]), "probe_windows": 2, "probe_length": 16,
                      "composed": [{"name": "both", "test": str(files["composed"])}]}, "seed": 0}
    r.update(changes)
    return r


def scores_of_adapter(tiny_lm, adapter: Path, tests: list[Path]) -> list[float]:
    """Exact match of base + the PEFT adapter loaded by PEFT itself, on each test file."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from malleable.evaluate.scoring import forced_match

    tok = AutoTokenizer.from_pretrained(tiny_lm)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_lm, dtype=torch.float32), adapter)
    model.eval()
    out = []
    for path in tests:
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        hits = forced_match(model, tok, rows, chat=False)
        out.append(round(100.0 * sum(hits) / len(hits), 4))
    return out


@pytest.mark.parametrize("method", STRATEGIES)
def test_every_strategy_runs_and_writes_the_adapter_it_scored(tiny_lm, files, tmp_path, method):
    report = continual(parse_continual_recipe(recipe(tiny_lm, files, method)), tmp_path / "out", progress=False)
    R = report["accuracy_matrix"]
    assert len(R) == 3 and all(len(row) == 2 for row in R)
    assert R[1][0] > R[0][0] + 20, R  # the first task is learned
    assert len(report["composed"]["matrix"]) == 3 and report["generality"]["ratio_to_start"][0] == 1.0
    assert report["steps"][1]["steps"] == (200 if method == "joint_lora" else 100)
    # PEFT's own loading of the written adapters gives the scores the stream reported after each task
    for k in (1, 2):
        adapter = tmp_path / "out" / ("adapter" if k == 2 else f"steps/step-{k}")
        assert scores_of_adapter(tiny_lm, adapter, [files["a"][1], files["b"][1]]) == R[k]
    assert not (tmp_path / "out.run").exists()


def test_inc_lora_stacks_the_task_adapters(tiny_lm, files, tmp_path):
    continual(parse_continual_recipe(recipe(tiny_lm, files, "inc_lora")), tmp_path / "out", progress=False)
    first = load_file(tmp_path / "out/steps/step-1/adapter_model.safetensors")
    final = load_file(tmp_path / "out/adapter/adapter_model.safetensors")
    config = json.loads((tmp_path / "out/adapter/adapter_config.json").read_text())
    assert config["r"] == 16  # two tasks of rank 8
    for key, value in first.items():  # the first task's factors are the first rank-8 block
        block = final[key][:8] if ".lora_A." in key else final[key][:, :8]
        torch.testing.assert_close(block, value)


def test_o_lora_penalty_is_the_authors_term():
    """Transcribed from the authors' trainer (github cmnfriend/O-LoRA, the `orthogonal_loss` and `l2_loss` terms
    of its training step): sum over modules of |A_old @ A_new^T|.sum(), and the Frobenius norm of every new
    factor, weighted by lambda_1 and lambda_2."""
    import peft
    from transformers import LlamaConfig, LlamaForCausalLM

    from malleable.continual.adapters import current, fold, reinit

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    model = peft.get_peft_model(model, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    method = get_method("o_lora", {"lambda_1": 0.5, "lambda_2": 0.1})
    method.setup(0)
    assert method.penalty(model).item() == pytest.approx(0.1 * sum(
        p.norm().item() for n, p in model.named_parameters() if "lora_" in n), rel=1e-5)  # no earlier adapter
    old = current(model)
    method.frozen.append(old)
    fold(model, old)
    reinit(model, 1)
    expect = 0.0
    for n, p in model.named_parameters():
        if "lora_A" in n:
            module = n.removeprefix("base_model.model.").split(".lora_A")[0]
            expect += 0.5 * (old[module].A @ p.T).abs().sum().item()
        if "lora_" in n:
            expect += 0.1 * p.norm().item()
    assert method.penalty(model).item() == pytest.approx(expect, rel=1e-5)


def test_ewc_weights_the_pull_by_the_fisher(tiny_lm, files, tmp_path):
    report = continual(parse_continual_recipe(recipe(tiny_lm, files, "ewc_lora", keep_checkpoints=True)),
                       tmp_path / "out", progress=False)
    state = load_file(tmp_path / "out.run/step-000001/state.safetensors")
    fisher = {k: v for k, v in state.items() if k.startswith("weight.")}
    anchors = {k for k in state if k.startswith("anchor.")}
    assert fisher and {k.replace("weight.", "anchor.") for k in fisher} == anchors
    assert all((v >= 0).all() for v in fisher.values()) and any(v.sum() > 0 for v in fisher.values())
    assert report["steps"][0]["final_loss"] > 0


@pytest.mark.parametrize("method", ["inc_lora", "ewc_lora", "merge_each"])
def test_resume_after_a_task_ends_identical(tiny_lm, files, tmp_path, method):
    r = parse_continual_recipe(recipe(tiny_lm, files, method, keep_checkpoints=True))
    whole = continual(r, tmp_path / "whole", progress=False)
    # a stream killed after its first task: the run folder holds step 1 only
    continual(r, tmp_path / "cut", progress=False)
    import shutil

    shutil.rmtree(tmp_path / "cut.run/step-000002")
    shutil.rmtree(tmp_path / "cut")
    resumed = continual(r, tmp_path / "cut", resume=True, progress=False)
    assert resumed["resumed_from_step"] == 1 and resumed["accuracy_matrix"] == whole["accuracy_matrix"]
    a = load_file(tmp_path / "whole/adapter/adapter_model.safetensors")
    b = load_file(tmp_path / "cut/adapter/adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_replay_mixes_a_share_of_every_earlier_task():
    method = get_method("replay_lora", {"share": 0.25})
    method.setup(0)
    items, passes = method.examples(list(range(100, 108)), [list(range(20)), list(range(20, 28))])
    assert passes == 1 and items[:8] == list(range(100, 108))
    memory = items[8:]
    assert len([x for x in memory if x < 20]) == 5 and len([x for x in memory if 20 <= x < 28]) == 2


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.mark.parametrize("change,mentions", [
    ({"method": "er"}, "method: er is an online classifier method"),
    ({"method": "nope"}, "unknown continual method 'nope'"),
    ({"training": {"steps": 4, "patience": 2}}, "training.patience"),
    ({"lora": {"r": 0}}, "lora.r"),
    ({"tasks": []}, "tasks"),
    ({"parameters": {"share": 2}}, "parameters.share"),
])
def test_bad_task_recipes_are_one_line_exit_2(tiny_lm, files, tmp_path, change, mentions):
    r = recipe(tiny_lm, files, "replay_lora" if "parameters" in change else "seq_lora")
    r.update(change)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(r))
    result = cli("continual", path, tmp_path / "out")
    assert result.exit_code == 2, (result.output, result.exception)
    assert mentions in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.run").exists()


def test_a_missing_task_file_is_named(tiny_lm, files, tmp_path):
    r = recipe(tiny_lm, files, "seq_lora")
    r["tasks"][1]["train"] = str(tmp_path / "missing.jsonl")
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(r))
    result = cli("continual", path, tmp_path / "out")
    assert result.exit_code == 2 and "missing.jsonl" in result.stderr, result.output
    assert not (tmp_path / "out").exists()


def test_a_strategy_is_refused_on_a_classifier_stream(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"method": "seq_lora", "dataset": "digits", "stream": "split_digits"}))
    result = cli("continual", path, tmp_path / "out", "--dry-run")
    assert result.exit_code == 2 and "LoRA post-training strategy" in result.stderr


def test_dry_run_prints_the_task_plan(tiny_lm, files, tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe(tiny_lm, files, "o_lora")))
    result = cli("continual", path, tmp_path / "out", "--dry-run")
    assert result.exit_code == 0 and "2 tasks a -> b" in result.output and not (tmp_path / "out").exists()
