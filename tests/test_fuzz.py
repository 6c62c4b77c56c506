"""Random damage, seeded: each case mutates one input (a safetensors header, a sharded index, an adapter config,
a recipe), runs the command, and asserts the promises of tests/hostile.py whatever the mutation did: the run
either succeeds or ends with exit 2 and one `error:` line, never with a traceback (exit 1 is a bug in
malleable), and every input is byte-identical afterwards. A fast subset runs by default; `pytest -m fuzz`
runs every seed.
"""

from __future__ import annotations

import json
import random
import shutil
import struct
from pathlib import Path

import pytest
import yaml
from hostile import digest
from typer.testing import CliRunner

from malleable.cli import app

FAST, ALL = 12, 150
ODD_VALUES = [None, True, -1, 0, 1e9, 10**30, float("nan"), float("inf"), -0.0, "", "x", "../../etc",
              [], [1, "a"], {}, {"a": {"b": []}}, "\u0000", 3.5]


def seeds(kind: str):
    return [pytest.param(s, id=f"{kind}-{s}", marks=() if s < FAST else pytest.mark.fuzz) for s in range(ALL)]


def replace_somewhere(rng: random.Random, node, depth: int = 0):
    """`node` with one randomly chosen value (at any depth) replaced by an odd one, or a key added or removed."""
    if isinstance(node, dict) and node and depth < 6:
        key = rng.choice(sorted(node, key=str))
        roll = rng.random()
        if roll < 0.15:
            return {k: v for k, v in node.items() if k != key}
        if roll < 0.25:
            return {**node, rng.choice(["extra", "lora", "__proto__", key + "_"]): rng.choice(ODD_VALUES)}
        if roll < 0.6 and isinstance(node[key], (dict, list)) and node[key]:
            return {**node, key: replace_somewhere(rng, node[key], depth + 1)}
        return {**node, key: rng.choice(ODD_VALUES)}
    if isinstance(node, list) and node and depth < 6:
        i = rng.randrange(len(node))
        copy = list(node)
        copy[i] = replace_somewhere(rng, node[i], depth + 1) if rng.random() < 0.6 else rng.choice(ODD_VALUES)
        return copy
    return rng.choice(ODD_VALUES)


def check(args: list, inputs: list[Path], out: Path | None) -> None:
    before = {p: digest(p) for p in inputs}
    result = CliRunner().invoke(app, [str(a) for a in args])
    detail = f"exit {result.exit_code} for {[str(a) for a in args]}:\n{result.stderr[-1500:]}"
    assert result.exit_code in (0, 2), detail
    if result.exit_code == 2:
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), detail
        if out is not None:
            assert not out.exists(), detail
    assert "Traceback" not in result.output, detail
    if out is not None and out.parent.is_dir():
        assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")], detail
    assert {p: digest(p) for p in inputs} == before, detail


@pytest.fixture()
def work(models, adapters, tmp_path) -> dict[str, Path]:
    return {name: Path(shutil.copytree(src, tmp_path / name)) for name, src in {**models, **adapters}.items()}


def merge_models(work, tmp_path, recipe: dict | None = None) -> None:
    recipe = recipe or {"method": "ties", "base": str(work["base"]),
                        "inputs": [{"path": str(work["ft0"])}, {"path": str(work["ft1"])}]}
    path = tmp_path / "recipe.yml"
    path.write_text(yaml.safe_dump(recipe) if isinstance(recipe, dict) else recipe)
    inputs = [work[k] for k in ("base", "ft0", "ft1", "lora0", "lora1")] + [path]
    check(["merge", path, tmp_path / "out", "-q"], inputs, tmp_path / "out")


@pytest.mark.parametrize("seed", seeds("header"))
def test_damaged_safetensors_header(work, tmp_path, seed):
    rng = random.Random(seed)
    f = work["ft1"] / "model.safetensors"
    raw = bytearray(f.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    if seed % 3 == 0:  # byte damage inside the header or the length field
        for _ in range(rng.randint(1, 4)):
            raw[rng.randrange(0, 8 + n)] = rng.randrange(256)
    else:  # structural damage, re-serialised with the same length so offsets stay put
        text = json.dumps(replace_somewhere(rng, header), allow_nan=True).encode()
        raw = bytearray(struct.pack("<Q", len(text)) + text + raw[8 + n:])
        if seed % 3 == 2:
            raw = raw[: rng.randrange(len(raw))]
    f.write_bytes(bytes(raw))
    merge_models(work, tmp_path)


@pytest.mark.parametrize("seed", seeds("index"))
def test_damaged_sharded_index(work, tmp_path, seed):
    from transformers import LlamaForCausalLM

    rng = random.Random(seed)
    shutil.rmtree(work["ft1"])
    LlamaForCausalLM.from_pretrained(work["ft0"]).save_pretrained(work["ft1"], max_shard_size="100KB")
    index = work["ft1"] / "model.safetensors.index.json"
    index.write_text(json.dumps(replace_somewhere(rng, json.loads(index.read_text())), allow_nan=True))
    merge_models(work, tmp_path)


@pytest.mark.parametrize("seed", seeds("adapter"))
def test_damaged_adapter_config(work, tmp_path, seed):
    rng = random.Random(seed)
    cfg = work["lora1"] / "adapter_config.json"
    cfg.write_text(json.dumps(replace_somewhere(rng, json.loads(cfg.read_text())), allow_nan=True))
    merge_models(work, tmp_path, {"method": "ties", "inputs": [{"path": str(work["lora0"])},
                                                               {"path": str(work["lora1"])}]})


@pytest.mark.parametrize("seed", seeds("recipe"))
def test_damaged_merge_recipe(work, tmp_path, seed):
    rng = random.Random(seed)
    recipe = {"method": rng.choice(["ties", "dare_ties", "linear", "task_arithmetic"]), "base": str(work["base"]),
              "inputs": [{"path": str(work["ft0"]), "weight": 0.5}, {"path": str(work["ft1"])}],
              "parameters": {"density": 0.5}, "output": {"dtype": "float16", "max_shard_size": "1MB"}, "seed": 0}
    merge_models(work, tmp_path, replace_somewhere(rng, recipe))


@pytest.mark.parametrize("seed", seeds("learn"))
def test_damaged_learn_recipe(tiny_lm, tmp_path, seed):
    from conftest import toy_records, write_jsonl

    rng = random.Random(seed)
    train = write_jsonl(tmp_path / "train.jsonl", toy_records(16))
    recipe = {"model": str(tiny_lm), "method": rng.choice(["lora", "full", "memft"]),
              "parameters": {"r": 4, "alpha": 8, "targets": ["q_proj"]} if seed % 2 else {},
              "data": {"train": str(train), "max_length": 64},
              "training": {"steps": 2, "batch_size": 4, "micro_batch_size": 2, "lr": 1e-3, "warmup_steps": 1},
              "seed": 0}
    recipe = replace_somewhere(rng, recipe)
    if isinstance(recipe, dict) and recipe.get("method") == "full":
        recipe["parameters"] = {}
    path = tmp_path / "learn.yml"
    path.write_text(yaml.safe_dump(recipe))
    check(["learn", path, tmp_path / "out", "-q"], [tiny_lm, train, path], tmp_path / "out")


@pytest.mark.parametrize("seed", seeds("forget"))
def test_damaged_forget_recipe(tiny_lm, tmp_path, seed):
    from conftest import toy_records, write_jsonl

    rng = random.Random(seed)
    rows = toy_records(24)
    files = {"forget": write_jsonl(tmp_path / "f.jsonl", rows[:4]),
             "retain": write_jsonl(tmp_path / "r.jsonl", rows[4:])}
    recipe = {"model": str(tiny_lm), "objective": rng.choice(["npo", "graddiff", "rmu", "simnpo"]),
              "parameters": {}, "mask": {"name": "salun", "ratio": 0.5}, "lora": {"r": 4, "alpha": 8},
              "data": {k: str(v) for k, v in files.items()},
              "training": {"steps": 2, "batch_size": 4, "lr": 1e-4}, "seed": 0}
    path = tmp_path / "forget.yml"
    path.write_text(yaml.safe_dump(replace_somewhere(rng, recipe)))
    check(["forget", path, tmp_path / "out", "--dry-run"], [tiny_lm, *files.values(), path], tmp_path / "out")
