"""The command line: inspect, methods, dry run."""

from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from malleable.cli import app
from malleable.merge import RULES


def invoke(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_inspect_checkpoint(models, tmp_path):
    from transformers import LlamaForCausalLM

    LlamaForCausalLM.from_pretrained(models["base"]).save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    info = json.loads(invoke("inspect", tmp_path / "sharded", "--json").stdout)
    assert info["kind"] == "checkpoint" and info["architecture"] == "LlamaForCausalLM"
    assert info["layers"] == 2 and info["tensors"] == 21 and len(info["shards"]) > 1
    assert info["dtypes"] == {"float32": 21} and info["bytes"] == info["parameters"] * 4


def test_inspect_adapter(adapters):
    info = json.loads(invoke("inspect", adapters["lora2"], "--json").stdout)
    assert info["kind"] == "lora-adapter" and info["r"] == 8 and info["lora_alpha"] == 8
    assert sorted(info["target_modules"]) == ["q_proj", "v_proj"] and info["modules"] == 4
    text = invoke("inspect", adapters["lora2"]).stdout
    assert "lora_alpha" in text and "MB" in text


def test_inspect_missing_path_is_one_line(tmp_path):
    result = invoke("inspect", tmp_path / "nothing")
    assert result.exit_code == 2 and result.stderr.count("\n") == 1 and "nothing" in result.stderr


def test_methods_lists_every_rule_with_parameters():
    out = invoke("methods").stdout
    for name in RULES:
        assert f"{name}  [" in out
    assert "density = 1.0 (per input)" in out
    kv = out.split("KV-cache eviction policies")[1]
    for name in ("h2o", "knorm", "snapkv", "streaming_llm"):
        assert f"\n{name}  " in kv
    assert "window_size = 64" in kv


def test_dry_run_prints_the_plan_and_writes_nothing(models, tmp_path):
    recipe = {"method": "ties", "base": str(models["base"]), "parameters": {"density": 0.5},
              "inputs": [{"path": str(models["ft0"])}, {"path": str(models["ft1"]), "parameters": {"density": 0.3}}]}
    (tmp_path / "r.yml").write_text(yaml.safe_dump(recipe))
    result = invoke("merge", tmp_path / "r.yml", tmp_path / "out", "--dry-run")
    assert result.exit_code == 0, result.output
    assert "method: ties" in result.stdout and "'density': 0.3" in result.stdout and "shards: 1" in result.stdout
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_inspect_real_gguf():
    from malleable.models.smollm2 import smollm2_gguf

    info = json.loads(invoke("inspect", smollm2_gguf(), "--json").stdout)
    assert info["kind"] == "gguf" and info["architecture"] == "llama" and info["parameters"] > 100_000_000
