"""Bad input, each tried through the CLI: one clear line naming the file or key, exit 2, nothing written,
inputs byte-identical afterwards."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
import yaml
from conftest import make_adapter, tree_digest
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from malleable.cli import app


@pytest.fixture
def work(models, adapters, tmp_path) -> dict[str, Path]:
    """Private copies of the fixtures, free to be damaged."""
    out = {}
    for name, src in {**models, **adapters}.items():
        out[name] = tmp_path / name
        shutil.copytree(src, out[name])
    return out


def run_fails(tmp_path: Path, recipe: dict | str, *extra: str, mentions: str, out: Path | None = None) -> str:
    """Run `malleable merge`, expect exit 2 with one line on stderr that mentions `mentions`."""
    inputs = [p for p in tmp_path.iterdir() if p.is_dir()]
    before = {p: tree_digest(p) for p in inputs}
    recipe_path = tmp_path / "recipe.yml"
    recipe_path.write_text(recipe if isinstance(recipe, str) else yaml.safe_dump(recipe))
    out = out or tmp_path / "merged"
    existed = out.exists()
    result = CliRunner().invoke(app, ["merge", str(recipe_path), str(out), "-q", *extra])
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert mentions in lines[0], lines[0]
    assert "Traceback" not in result.output
    assert out.exists() == existed
    if out.parent.is_dir():
        assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")], "temporary left"
    assert {p: tree_digest(p) for p in inputs} == before, "an input changed"
    return lines[0]


def full(work, method="ties", **kw) -> dict:
    return {"method": method, "base": str(work["base"]),
            "inputs": [{"path": str(work["ft0"])}, {"path": str(work["ft1"])}], **kw}


def test_corrupt_header(work, tmp_path):
    f = work["ft1"] / "model.safetensors"
    raw = bytearray(f.read_bytes())
    raw[8:20] = b"{not json!!!"
    f.write_bytes(raw)
    run_fails(tmp_path, full(work), mentions=str(f))


def test_header_length_beyond_file(work, tmp_path):
    f = work["ft0"] / "model.safetensors"
    raw = bytearray(f.read_bytes())
    raw[:8] = struct.pack("<Q", 10**9)
    f.write_bytes(raw)
    run_fails(tmp_path, full(work), mentions=str(f))


def test_truncated_file(work, tmp_path):
    f = work["ft0"] / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    assert "truncated" in run_fails(tmp_path, full(work), mentions=str(f))


def _rewrite(path: Path, edit) -> None:
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_mismatched_shapes(work, tmp_path):
    name = "model.layers.0.mlp.up_proj.weight"
    _rewrite(work["ft1"] / "model.safetensors", lambda t: t.__setitem__(name, torch.zeros(3, 3)))
    line = run_fails(tmp_path, full(work), mentions=str(work["ft1"]))
    assert name in line and "shape" in line


def test_missing_tensor(work, tmp_path):
    name = "model.layers.1.self_attn.k_proj.weight"
    _rewrite(work["ft0"] / "model.safetensors", lambda t: t.pop(name))
    line = run_fails(tmp_path, full(work), mentions=str(work["ft0"]))
    assert name in line and "missing" in line


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_refused_unless_allowed(work, tmp_path, bad):
    name = "model.layers.1.mlp.down_proj.weight"

    def poison(t):
        t[name][0, 0] = bad

    _rewrite(work["ft1"] / "model.safetensors", poison)
    line = run_fails(tmp_path, full(work, "linear"), mentions=str(work["ft1"]))
    assert name in line
    recipe = tmp_path / "allowed.yml"
    recipe.write_text(yaml.safe_dump(full(work, "linear", allow_nonfinite=True)))
    result = CliRunner().invoke(app, ["merge", str(recipe), str(tmp_path / "ok"), "-q"])
    assert result.exit_code == 0, result.output


def test_different_architectures(work, tmp_path):
    cfg = json.loads((work["ft0"] / "config.json").read_text())
    cfg["num_hidden_layers"] = 3
    (work["ft0"] / "config.json").write_text(json.dumps(cfg))
    assert "num_hidden_layers" in run_fails(tmp_path, full(work), mentions=str(work["ft0"]))


def test_adapters_for_different_base_models(work, tmp_path):
    cfg_path = work["lora1"] / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = "someone/other-model"
    cfg_path.write_text(json.dumps(cfg))
    recipe = {"method": "ties", "inputs": [{"path": str(work["lora0"])}, {"path": str(work["lora1"])}]}
    assert "other-model" in run_fails(tmp_path, recipe, mentions=str(work["lora1"]))


def test_adapters_with_different_target_modules(work, models, tmp_path):
    other = make_adapter(models["base"], tmp_path / "lora_k", seed=9, target_modules=["k_proj"])
    recipe = {"method": "ctm", "inputs": [{"path": str(work["lora0"])}, {"path": str(other)}]}
    assert "modules" in run_fails(tmp_path, recipe, mentions=str(other))


@pytest.mark.parametrize("edit, mentions", [
    ({"method": "tiez"}, "tiez"),
    ({"parameters": {"densty": 0.5}}, "parameters.densty"),
    ({"parameters": {"density": 1.5}}, "parameters.density"),
    ({"parameters": {"density": "half"}}, "parameters.density"),
    ({"parameters": {"sign_method": "median"}}, "parameters.sign_method"),
    ({"colour": "blue"}, "colour"),
    ({"output": {"rank": -1}}, "output.rank"),
])
def test_recipe_mistakes_name_the_key(work, tmp_path, edit, mentions):
    run_fails(tmp_path, {**full(work), **edit}, mentions=mentions)


def test_per_input_parameter_out_of_range(work, tmp_path):
    recipe = full(work)
    recipe["inputs"][1]["parameters"] = {"density": -0.1}
    run_fails(tmp_path, recipe, mentions="inputs.1.parameters.density")


def test_missing_input(work, tmp_path):
    recipe = full(work)
    recipe["inputs"][0]["path"] = str(tmp_path / "nope")
    run_fails(tmp_path, recipe, mentions=str(tmp_path / "nope"))


def test_task_vector_rule_without_base(work, tmp_path):
    recipe = full(work)
    del recipe["base"]
    run_fails(tmp_path, recipe, mentions="base")


def test_rank_larger_than_possible(work, tmp_path):
    recipe = {"method": "ties", "inputs": [{"path": str(work["lora0"])}, {"path": str(work["lora1"])}],
              "output": {"rank": 100}}
    run_fails(tmp_path, recipe, mentions="output.rank")


def test_invalid_yaml(work, tmp_path):
    run_fails(tmp_path, "method: [ties\n", mentions="recipe.yml")


def test_output_exists(work, tmp_path):
    out = tmp_path / "existing"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    run_fails(tmp_path, full(work, "linear"), mentions="--force", out=out)
    assert (out / "keep.txt").read_text() == "mine"


def test_unwritable_output(work, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    run_fails(tmp_path, full(work, "linear"), mentions=str(blocker), out=blocker / "merged")


def test_failure_mid_stream_leaves_nothing(work, tmp_path):
    """A NaN found only while streaming (the last tensor) still leaves no partial output."""
    name = "lm_head.weight"
    _rewrite(work["ft0"] / "model.safetensors", lambda t: t[name].__setitem__((0, 0), float("nan")))
    run_fails(tmp_path, full(work, "linear"), mentions=name)


def test_pickle_checkpoint_refused_unless_allowed(work, tmp_path):
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(work["ft1"] / "config.json", pickled)
    torch.save(load_file(work["ft1"] / "model.safetensors"), pickled / "pytorch_model.bin")
    recipe = full(work, "linear")
    recipe["inputs"][1]["path"] = str(pickled)
    assert "--allow-pickle" in run_fails(tmp_path, recipe, mentions=str(pickled / "pytorch_model.bin"))
    result = CliRunner().invoke(app, ["merge", str(tmp_path / "recipe.yml"), str(tmp_path / "ok"), "-q",
                                      "--allow-pickle"])
    assert result.exit_code == 0, result.output


def test_force_never_overwrites_an_input(work, tmp_path):
    line = run_fails(tmp_path, full(work, "linear"), "--force", mentions="would overwrite input", out=work["ft0"])
    assert str(work["ft0"]) in line
