"""Hostile model folders, outputs and data through learn, forget and audit: each refused with one line, exit 2,
nothing written, inputs byte-identical, nothing outside the given folders opened (see tests/hostile.py)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import make_adapter, toy_records, write_jsonl
from hostile import SECRET, digest, plant, refused
from safetensors.torch import load_file
from typer.testing import CliRunner

from malleable.cli import app


@pytest.fixture()
def lm(tiny_lm, tmp_path) -> Path:
    """A private copy of the tiny Llama with its tokenizer, free to be damaged."""
    return Path(shutil.copytree(tiny_lm, tmp_path / "model"))


@pytest.fixture()
def data(tmp_path) -> dict[str, Path]:
    rows = toy_records(24)
    return {"train": write_jsonl(tmp_path / "train.jsonl", rows[:16]),
            "forget": write_jsonl(tmp_path / "forget.jsonl", rows[:4]),
            "retain": write_jsonl(tmp_path / "retain.jsonl", rows[4:16]),
            "holdout": write_jsonl(tmp_path / "holdout.jsonl", rows[16:])}


def learn_recipe(tmp_path: Path, model: Path, data: dict, **top) -> Path:
    r = {"model": str(model), "method": "lora", "parameters": {"r": 4}, "data": {"train": str(data["train"])},
         "training": {"steps": 2, "batch_size": 4, "lr": 1e-3}, **top}
    path = tmp_path / "learn.yml"
    path.write_text(yaml.safe_dump(r))
    return path


def forget_recipe(tmp_path: Path, model: Path, data: dict, **top) -> Path:
    r = {"model": str(model), "objective": "npo", "training": {"steps": 2, "batch_size": 4, "lr": 1e-4},
         "data": {k: str(data[k]) for k in ("forget", "retain", "holdout")}, **top}
    path = tmp_path / "forget.yml"
    path.write_text(yaml.safe_dump(r))
    return path


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def every_input(tmp_path: Path) -> list[Path]:
    return [p for p in tmp_path.iterdir() if not p.name.startswith(("out", ".out"))]


def learn_refused(tmp_path, model, data, mentions, *extra, outside=None, **top) -> str:
    recipe = learn_recipe(tmp_path, model, data, **top)
    return refused(["learn", recipe, tmp_path / "out", "-q", *extra], mentions=mentions,
                   inputs=every_input(tmp_path), out=tmp_path / "out", outside=outside)


def forget_refused(tmp_path, model, data, mentions, *extra, outside=None, **top) -> str:
    recipe = forget_recipe(tmp_path, model, data, **top)
    return refused(["forget", recipe, tmp_path / "out", "-q", *extra], mentions=mentions,
                   inputs=every_input(tmp_path), out=tmp_path / "out", outside=outside)


# -- pickle through a back door ------------------------------------------------------------------------------


def _only_pickle(model: Path) -> None:
    torch.save(load_file(model / "model.safetensors"), model / "pytorch_model.bin")
    (model / "model.safetensors").unlink()


@pytest.mark.parametrize("verb", ["learn", "forget"])
def test_pickle_only_checkpoint_is_refused_without_the_flag(lm, data, tmp_path, verb):
    _only_pickle(lm)
    run = learn_refused if verb == "learn" else forget_refused
    assert "--allow-pickle" in run(tmp_path, lm, data, "pytorch_model.bin")


def test_pickle_only_checkpoint_learns_with_the_flag_and_the_report_says_so(lm, data, tmp_path):
    _only_pickle(lm)
    result = invoke("learn", learn_recipe(tmp_path, lm, data), tmp_path / "out", "-q",
                                      "--allow-pickle")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["trusted"] == {"trust_remote_code": False, "allow_pickle": True}
    assert "allow_pickle: on" in (tmp_path / "out" / "report.md").read_text()


def test_pickle_only_adapter_is_refused_by_audit(models, data, tmp_path):
    adapter = make_adapter(models["base"], tmp_path / "adapter", seed=1)
    torch.save(load_file(adapter / "adapter_model.safetensors"), adapter / "adapter_model.bin")
    (adapter / "adapter_model.safetensors").unlink()
    line = refused(["audit", adapter, "--forget", data["forget"], "--out", tmp_path / "out"],
                   mentions="adapter_model", inputs=every_input(tmp_path), out=tmp_path / "out")
    assert "pickle" in line


# -- nothing from a hub, nothing from outside the folder -----------------------------------------------------


def test_adapter_whose_base_is_a_hub_id_is_refused_at_once(models, data, tmp_path):
    adapter = make_adapter(models["base"], tmp_path / "adapter", seed=1)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "someone/some-model-on-a-hub"
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    line = refused(["audit", adapter, "--forget", data["forget"]], mentions="someone/some-model-on-a-hub",
                   inputs=every_input(tmp_path))
    assert "local" in line


@pytest.mark.parametrize("name", ["tokenizer.json", "tokenizer_config.json", "config.json", "model.safetensors"])
def test_a_file_of_the_model_folder_linking_outside_is_refused(lm, data, tmp_path, name):
    outside = plant(tmp_path.parent / f"{tmp_path.name}-outside")
    (outside / name).write_bytes((lm / name).read_bytes())  # a valid file, only in the wrong place
    (lm / name).unlink()
    os.symlink(outside / name, lm / name)
    learn_refused(tmp_path, lm, data, [str(lm / name), "outside"], outside=outside)


def test_the_output_carries_nothing_from_a_planted_folder(lm, data, tmp_path):
    """A good run next to a planted folder: its marker reaches no file of the output."""
    plant(tmp_path / "planted")
    result = invoke("learn", learn_recipe(tmp_path, lm, data), tmp_path / "out", "-q")
    assert result.exit_code == 0, result.output
    assert not [p for p in (tmp_path / "out").rglob("*") if p.is_file() and SECRET in p.read_bytes()]


# -- weights transformers would make up ----------------------------------------------------------------------


@pytest.mark.parametrize("layers", [3, 1500])
def test_config_declaring_more_layers_than_the_checkpoint_holds_is_refused(lm, data, tmp_path, layers):
    cfg = json.loads((lm / "config.json").read_text())
    cfg["num_hidden_layers"] = layers
    (lm / "config.json").write_text(json.dumps(cfg))
    assert "random" in learn_refused(tmp_path, lm, data, str(lm))


def test_config_with_a_larger_vocabulary_than_the_weights_is_refused(lm, data, tmp_path):
    cfg = json.loads((lm / "config.json").read_text())
    cfg["vocab_size"] = 4_000_000
    (lm / "config.json").write_text(json.dumps(cfg))
    forget_refused(tmp_path, lm, data, str(lm))


@pytest.mark.parametrize("content", [b"[1, 2]", b"\xff\xfe not json", b"{"])
def test_config_that_is_not_a_json_object_is_refused(lm, data, tmp_path, content):
    (lm / "config.json").write_bytes(content)
    learn_refused(tmp_path, lm, data, "config.json")


# -- chat templates ------------------------------------------------------------------------------------------


def _template(model: Path, template: str) -> None:
    cfg = json.loads((model / "tokenizer_config.json").read_text())
    cfg["chat_template"] = template
    (model / "tokenizer_config.json").write_text(json.dumps(cfg))
    (model / "chat_template.jinja").unlink(missing_ok=True)


@pytest.mark.parametrize("template, why", [
    ("{{ 'x' * 400000000 }}", "memory"),  # aborted the process (exit 134) before the bound
    ("{{ 'x' * 3000000 }}", "characters"),
    ("{% set ns = namespace(s='x') %}{% for i in range(60) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}",
     "memory"),
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "ran for more than"),
    ("{{ raise_exception('no chat here') }}", "no chat here"),
    ("{% for m in messages %}", "TemplateSyntaxError"),
    ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "RecursionError"),
])
def test_hostile_chat_template_is_one_line_naming_the_file(lm, data, tmp_path, monkeypatch, template, why):
    if why == "ran for more than":
        monkeypatch.setattr("malleable.models.chat.SECONDS", 1.0)
    _template(lm, template)
    learn_refused(tmp_path, lm, data, [str(lm / "tokenizer_config.json"), why])


def test_the_process_survives_a_template_bomb_and_renders_the_next_one(lm, data, tmp_path):
    """The memory ceiling and the deadline are lifted after each render: a good template still works."""
    import resource

    from conftest import CHAT_TEMPLATE

    before = resource.getrlimit(resource.RLIMIT_AS)
    _template(lm, "{{ 'x' * 400000000 }}")
    learn_refused(tmp_path, lm, data, "memory")
    assert resource.getrlimit(resource.RLIMIT_AS) == before
    _template(lm, CHAT_TEMPLATE)
    result = invoke("learn", tmp_path / "learn.yml", tmp_path / "out", "-q")
    assert result.exit_code == 0, result.output


# -- outputs never over an input -----------------------------------------------------------------------------


def test_force_never_replaces_the_input_model_through_a_link(lm, data, tmp_path):
    os.symlink(lm, tmp_path / "alias")
    recipe = learn_recipe(tmp_path, lm, data)
    refused(["learn", recipe, tmp_path / "alias", "--force", "-q"], mentions="would overwrite input",
            inputs=[lm, recipe, data["train"]])
    assert (tmp_path / "alias").is_symlink()


@pytest.mark.parametrize("where", ["dotdot", "holds_recipe", "inside_input", "holds_data"])
def test_force_never_replaces_or_writes_into_an_input(lm, data, tmp_path, where):
    (tmp_path / "sub").mkdir()
    recipe = learn_recipe(tmp_path, lm, data)
    out = {"dotdot": tmp_path / "sub" / ".." / "model", "holds_recipe": tmp_path,
           "inside_input": lm / "out", "holds_data": tmp_path}[where]
    refused(["learn", recipe, out, "--force", "-q"], mentions="would overwrite input",
            inputs=[lm, recipe, data["train"]])


def test_force_replaces_only_an_earlier_output(lm, data, tmp_path):
    mine = tmp_path / "out"
    mine.mkdir()
    (mine / "notes.txt").write_text("my own folder")
    recipe = learn_recipe(tmp_path, lm, data)
    refused(["learn", recipe, mine, "--force", "-q"], mentions="not an earlier malleable output",
            inputs=[lm, recipe, mine])
    shutil.rmtree(mine)
    for _ in range(2):  # the second run replaces the first one's output
        result = invoke("learn", recipe, mine, "--force", "-q")
        assert result.exit_code == 0, result.output


def test_learn_never_deletes_a_run_folder_that_is_its_input(lm, data, tmp_path):
    """OUT.run is learn's work folder; here it is the input model, which --force must not delete."""
    run_input = Path(shutil.copytree(lm, tmp_path / "x.run"))
    recipe = learn_recipe(tmp_path, run_input, data)
    refused(["learn", recipe, tmp_path / "x", "--force", "-q"], mentions="run folder would overwrite input",
            inputs=[run_input, recipe])


def test_damaged_resume_state_is_one_line(lm, data, tmp_path):
    recipe = learn_recipe(tmp_path, lm, data)
    cfg = yaml.safe_load(recipe.read_text())
    cfg["training"] |= {"checkpoint_every": 1, "keep_checkpoints": True}
    recipe.write_text(yaml.safe_dump(cfg))
    assert invoke("learn", recipe, tmp_path / "out", "-q").exit_code == 0
    shutil.rmtree(tmp_path / "out")
    step = sorted((tmp_path / "out.run").glob("step-*"))[-1]
    (step / "optimizer.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
    refused(["learn", recipe, tmp_path / "out", "--resume", "-q"], mentions=[str(step), "--force"],
            inputs=[lm, recipe, tmp_path / "out.run"], out=tmp_path / "out")


# -- data ----------------------------------------------------------------------------------------------------


def test_a_fifo_as_data_file_is_refused_at_once(lm, data, tmp_path):
    data["train"].unlink()
    os.mkfifo(data["train"])
    learn_refused(tmp_path, lm, data, [str(data["train"]), "regular file"])


def test_forget_leaves_no_copy_of_the_forget_rows_anywhere_it_wrote(lm, data, tmp_path, monkeypatch):
    """datasets caches an Arrow copy of what it reads; after forget, the forget rows exist only in the user's
    file (and nowhere in the output, the caches or the temporary folder)."""
    import tempfile

    secret = "w3 w5 w7 SECRETROW"
    rows = [{"prompt": f"map: w{i}", "completion": f"{secret}{i}"} for i in range(4)]
    write_jsonl(data["forget"], rows)
    cache, tmp = tmp_path / "hf-cache", tmp_path / "tmp"
    tmp.mkdir()
    for var in ("HF_HOME", "HF_DATASETS_CACHE", "XDG_CACHE_HOME"):
        monkeypatch.setenv(var, str(cache))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache / "datasets")
    result = invoke("forget", forget_recipe(tmp_path, lm, data), tmp_path / "out", "-q")
    assert result.exit_code == 0, result.output
    holders = [p for p in tmp_path.rglob("*") if p.is_file() and p != data["forget"]
               and secret.encode() in p.read_bytes()]
    assert not holders, holders


# -- the error boundary --------------------------------------------------------------------------------------


def test_a_bug_shows_its_traceback_and_asks_for_a_report(lm, data, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr("malleable.learn.engine.learn", broken)
    result = invoke("learn", learn_recipe(tmp_path, lm, data), tmp_path / "out", "-q")
    assert result.exit_code == 1
    assert "Traceback" in result.stderr and "ZeroDivisionError" in result.stderr
    assert "bug in malleable" in result.stderr.strip().splitlines()[-1]


def test_zoo_settings_refused_before_any_cache_exists(tmp_path):
    refused(["bench", "zoo", "--steps", "0", "--cache", tmp_path / "cache", "--out", tmp_path / "results"],
            mentions="steps", inputs=[], out=tmp_path / "cache")
    assert not (tmp_path / "results").exists()


def test_inputs_are_untouched_by_a_successful_forget(lm, data, tmp_path):
    before = {p: digest(p) for p in every_input(tmp_path)}
    result = invoke("forget", forget_recipe(tmp_path, lm, data), tmp_path / "out", "-q")
    assert result.exit_code == 0, result.output
    assert {p: digest(p) for p in every_input(tmp_path) if p in before} == before


def test_merge_copies_no_linked_file_from_outside_into_its_output(models, tmp_path):
    """merge copies the base's config and tokenizer files beside the merged weights: a link among them that
    leads outside is refused before anything is read."""
    outside = plant(tmp_path.parent / f"{tmp_path.name}-outside")
    base = Path(shutil.copytree(models["base"], tmp_path / "base"))
    os.symlink(outside / "tokenizer.json", base / "tokenizer.json")
    recipe = tmp_path / "merge.yml"
    recipe.write_text(yaml.safe_dump({"method": "task_arithmetic", "base": str(base),
                                      "inputs": [{"path": str(models["ft0"])}, {"path": str(models["ft1"])}]}))
    refused(["merge", recipe, tmp_path / "out", "-q"], mentions=[str(base / "tokenizer.json"), "outside"],
            inputs=[base, recipe, models["ft0"], models["ft1"]], out=tmp_path / "out", outside=outside)


def test_file_names_inside_tokenizer_config_never_reach_outside(lm, data, tmp_path):
    """tokenizer_config.json may name vocabulary files; names that lead outside the folder are never opened."""
    from hostile import recording_opens

    outside = plant(tmp_path.parent / f"{tmp_path.name}-outside")
    cfg = json.loads((lm / "tokenizer_config.json").read_text())
    cfg |= {"vocab_file": str(outside / "secret.txt"), "merges_file": "../../" + str(outside / "secret.txt"),
            "tokenizer_file": str(outside / "tokenizer.json")}
    (lm / "tokenizer_config.json").write_text(json.dumps(cfg))
    with recording_opens() as opened:
        result = invoke("learn", learn_recipe(tmp_path, lm, data), tmp_path / "out", "-q")
    assert result.exit_code in (0, 2) and "Traceback" not in result.output, result.output
    assert not [p for p in opened if p and p.startswith(str(outside.resolve()))]


@pytest.mark.parametrize("verb", ["learn", "forget"])
def test_training_that_diverges_writes_nothing(lm, data, tmp_path, verb):
    """A finite but absurd learning rate drives the weights to NaN: refused, no adapter of NaNs written."""
    training = {"steps": 3, "batch_size": 4, "lr": 1e30, "max_grad_norm": None}
    run = learn_refused if verb == "learn" else forget_refused
    run(tmp_path, lm, data, "training.lr", training=training)
