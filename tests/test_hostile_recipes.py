"""Damaged recipes and options for every verb, each refused before any work through `hostile.refused`: one line
naming the key (or the file), exit 2, nothing written, the recipe and the models byte-identical."""

from __future__ import annotations

import copy
import os
import re
import time
from pathlib import Path

import pytest
import yaml
from conftest import toy_records, write_jsonl
from hostile import refused
from typer.testing import CliRunner

from malleable.cli import app

INF, NAN = float("inf"), float("nan")


def put(recipe: dict, path: str, value) -> dict:
    """A copy of `recipe` with the dotted key `path` set to `value` (`...=None` deletes it)."""
    out = copy.deepcopy(recipe)
    *parents, last = path.split(".")
    node = out
    for p in parents:
        node = node[int(p)] if isinstance(node, list) else node.setdefault(p, {})
    if value is None:
        del node[last]
    elif isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return out


def write(path: Path, recipe: dict | str | bytes) -> Path:
    if isinstance(recipe, dict):
        recipe = yaml.safe_dump(recipe)
    path.write_bytes(recipe if isinstance(recipe, bytes) else recipe.encode())
    return path


# ----------------------------------------------------------------------------------------------- merge


@pytest.fixture(scope="module")
def full(models) -> dict:
    return {"method": "ties", "base": str(models["base"]),
            "inputs": [{"path": str(models["ft0"])}, {"path": str(models["ft1"])}]}


@pytest.fixture(scope="module")
def loras(adapters) -> dict:
    return {"method": "ctm", "inputs": [{"path": str(adapters["lora0"])}, {"path": str(adapters["lora1"])}]}


def refuse(verb: str, tmp_path: Path, recipe, mentions, inputs: list, *flags: str) -> None:
    """`malleable VERB RECIPE OUT *flags` on `recipe` written to VERB.yml: refused naming the file and `mentions`,
    the recipe among the inputs."""
    path = write(tmp_path / f"{verb}.yml", recipe)
    mentions = [mentions] if isinstance(mentions, str) else mentions
    refused([verb, path, tmp_path / "out", *flags], mentions=[f"{path}: ", *mentions], inputs=[path, *inputs],
            out=tmp_path / "out")


def refuse_merge(tmp_path, recipe, mentions, inputs):
    refuse("merge", tmp_path, recipe, mentions, inputs, "--dry-run", "-q")


@pytest.mark.parametrize("key, value, mentions", [
    ("parameters.density", INF, "parameters.density"),
    ("parameters.density", NAN, "parameters.density"),
    ("parameters.scale", NAN, "parameters.scale"),
    ("parameters.density", [0.5, INF], "parameters.density.1"),
    ("parameters.density", [{"filter": "mlp", "value": NAN}], "parameters.density.0.value"),
    ("parameters.density", [{"filter": "mlp", "value": 0.5, "colour": 1}], "parameters.density.0.colour"),
    ("parameters.density", [], "parameters.density"),
    ("inputs.0.weight", INF, "inputs.0.weight"),
    ("inputs.0.weight", NAN, "inputs.0.weight"),
    ("inputs.0.weight", [], "inputs.0.weight"),
    ("inputs.0.weight", [1.0, NAN], "inputs.0.weight.1"),
    ("inputs.0.weight", {"a": 1}, "inputs.0.weight"),
    ("inputs.1.parameters", {"density": NAN}, "inputs.1.parameters.density"),
    ("output.dtype", "int8", "output.dtype"),
    ("output.dtype", "float99", "output.dtype"),
    ("output.dtype", 16, "output.dtype"),
    ("output.max_shard_size", "lots", "output.max_shard_size"),
    ("output.max_shard_size", 0, "output.max_shard_size"),
    ("output.max_shard_size", -5, "output.max_shard_size"),
    ("output.max_shard_size", "0GB", "output.max_shard_size"),
    ("output.max_shard_size", "9" * 400 + "GB", "output.max_shard_size"),
    ("output.rank", 3.5, "output.rank"),
    ("output.rank", 2**40, "output.rank"),
    ("output.rank", 4, "output.rank"),  # full checkpoints merge into a model: a rank would be ignored
    ("output.kind", "lora", "output.kind"),
    ("seed", -1, "seed"),
    ("seed", 2**40, "seed"),
    ("inputs", [], "inputs"),
    ("method", ["ties"], "method"),
])
def test_merge_recipe(full, models, tmp_path, key, value, mentions):
    refuse_merge(tmp_path, put(full, key, value), mentions, [models["ft0"], models["ft1"]])


@pytest.mark.parametrize("method, key, value, mentions", [
    ("ctm", "output.rank", 10**9, "output.rank"),  # was clamped to the sum of the input ranks (8)
    ("knots", "output.rank", 9, "output.rank"),
    ("concat", "output.rank", 100, "output.rank"),
    ("ctm", "parameters.iters", 3.5, "parameters.iters"),
    ("ctm", "parameters.iters", INF, "parameters.iters"),
    ("ctm", "parameters.beta", NAN, "parameters.beta"),
    ("ctm", "parameters.inner", 5, "parameters.inner"),
])
def test_merge_adapters_recipe(loras, adapters, tmp_path, method, key, value, mentions):
    refuse_merge(tmp_path, put({**loras, "method": method}, key, value), mentions,
                 [adapters["lora0"], adapters["lora1"]])


@pytest.fixture(scope="module")
def mergekit(models) -> dict:
    return {"merge_method": "ties", "base_model": str(models["base"]),
            "models": [{"model": str(models["ft0"]), "parameters": {"weight": 0.5, "density": 0.5}}],
            "parameters": {"normalize": True}}


@pytest.mark.parametrize("key, value, mentions", [
    ("models", "abc", "models"),
    ("models.0", ["m"], "models.0"),
    ("models.0.parameters", [1], "models.0.parameters"),
    ("models.0.parameters.weight", {"a": 1}, "models.0.parameters.weight"),
    ("models.0.parameters.density", NAN, "models.0.parameters.density"),
    ("models.0.model", 3, "models.0.model"),
    ("parameters", [1], "parameters"),
    ("parameters.weight", INF, "parameters.weight"),
    ("dtype", 16, "dtype"),
    ("dtype", "int8", "dtype"),
    ("base_model", ["b"], "base_model"),
    ("merge_method", 3, "merge_method"),
    ("slices", "x", "slices"),
    ("name", {"a": 1}, "name"),
])
def test_mergekit_recipe(mergekit, models, tmp_path, key, value, mentions):
    refuse_merge(tmp_path, put(mergekit, key, value), mentions, [models["ft0"]])


@pytest.mark.parametrize("source, mentions", [
    ({"model": ["m"], "layer_range": [0, 2]}, "slices.0.sources.0.model"),
    ({"model": "m", "layer_range": "all"}, "slices.0.sources.0.layer_range"),
    ({"model": "m", "layer_range": [0, 2], "colour": 1}, "slices.0.sources.0.colour"),
])
def test_mergekit_slices(mergekit, models, tmp_path, source, mentions):
    recipe = {**put(mergekit, "models", None), "slices": [{"sources": [source]}]}
    refuse_merge(tmp_path, recipe, mentions, [models["ft0"]])


# ------------------------------------------------------------------------------------------------ YAML

BOMB = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{b}: &{b} [{', '.join(['*' + a] * 10)}]\n" for a, b in zip("abcdefgh", "bcdefghi"))


@pytest.mark.parametrize("text, mentions", [
    (BOMB, "expands to more than"),  # 10**9 values from nine lines
    ("a: &a [*a]\n", "expands to more than"),  # a list holding itself
    (b"method: linear\ninputs: [{path: \xff\xfe}]\n", "not UTF-8"),
    ("method: " + "x" * 1_000_001 + "\n", "larger than 1 MB"),
    ("a: " + "[" * 5000 + "]" * 5000 + "\n", "nested too deeply"),
    ("- method: linear\n", "a YAML mapping"),
    ("method: [ties\n", "not valid YAML"),
])
def test_yaml(models, tmp_path, text, mentions):
    start = time.perf_counter()
    refuse_merge(tmp_path, text, ["merge.yml", mentions], [])
    assert time.perf_counter() - start < 10


@pytest.mark.parametrize("verb", ["merge", "learn", "forget", "continual"])
def test_recipe_that_is_a_fifo_does_not_block(tmp_path, verb):
    fifo = tmp_path / "recipe.yml"
    os.mkfifo(fifo)
    refused([verb, fifo, tmp_path / "out"], mentions=[str(fifo), "not a regular file"], inputs=[],
            out=tmp_path / "out")


# ----------------------------------------------------------------------------------------------- learn


@pytest.fixture(scope="module")
def learn_recipe(tiny_lm, tmp_path_factory) -> dict:
    train = write_jsonl(tmp_path_factory.mktemp("hostile_learn") / "train.jsonl", toy_records(16))
    return {"model": str(tiny_lm), "method": "lora", "parameters": {"r": 4},
            "data": {"train": str(train)}, "training": {"steps": 2, "batch_size": 4, "lr": 1e-3}}


@pytest.mark.parametrize("key, value, mentions", [
    ("training.lr", INF, "training.lr"),
    ("training.lr", NAN, "training.lr"),
    ("training.weight_decay", NAN, "training.weight_decay"),
    ("training.max_grad_norm", INF, "training.max_grad_norm"),
    ("training.steps", 2.5, "training.steps"),
    ("training.steps", 10**400, "training.steps"),  # overflowed range() once training started
    ("training.lr", 10**400, "training.lr"),
    ("data.max_bad_rows", NAN, "data.max_bad_rows"),
    ("data.max_length", INF, "data.max_length"),
    ("data.labels", [], "data.labels"),
    ("seed", -1, "seed"),
    ("parameters.r", INF, "parameters.r"),
    ("parameters.r", NAN, "parameters.r"),
    ("parameters.r", 0, "parameters.r"),
    ("parameters.r", 3.5, "parameters.r"),
    ("parameters.r", 2**40, "parameters.r"),
    ("parameters.alpha", NAN, "parameters.alpha"),
    ("parameters.dropout", NAN, "parameters.dropout"),
    ("parameters.targets", [["q_proj"]], "parameters.targets"),
    ("parameters.targets", 5, "parameters.targets"),
    ("parameters.targets", [], "parameters.targets"),
    ("parameters.rslora", "yes", "parameters.rslora"),
])
def test_learn_recipe(learn_recipe, tiny_lm, tmp_path, key, value, mentions):
    refuse("learn", tmp_path, put(learn_recipe, key, value), mentions, [tiny_lm], "-q")


@pytest.mark.parametrize("key, value", [
    ("parameters.r", 100_000),  # wider than any layer of the model: memory, not a rank
    ("parameters.targets", ["no_such_module"]),
])
def test_learn_lora_against_the_model(learn_recipe, tiny_lm, tmp_path, key, value):
    """Checked once the model is loaded, before training: the line names the key (the model, not the file, is
    what the value does not fit)."""
    path = write(tmp_path / "learn.yml", put(learn_recipe, key, value))
    refused(["learn", path, tmp_path / "out", "-q"], mentions=key, inputs=[path, tiny_lm], out=tmp_path / "out")


def test_learn_epochs_infinite(learn_recipe, tiny_lm, tmp_path):
    recipe = put(put(learn_recipe, "training.steps", None), "training.epochs", INF)
    refuse("learn", tmp_path, recipe, "training.epochs", [tiny_lm], "-q")


# ---------------------------------------------------------------------------------------------- forget


@pytest.fixture(scope="module")
def forget_recipe(tiny_lm, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("hostile_forget")
    rows = toy_records(16)
    return {"model": str(tiny_lm), "objective": "npo",
            "data": {"forget": str(write_jsonl(root / "forget.jsonl", rows[:8])),
                     "retain": str(write_jsonl(root / "retain.jsonl", rows[8:]))},
            "training": {"steps": 2, "batch_size": 4, "lr": 1e-3}}


@pytest.mark.parametrize("key, value, mentions", [
    ("lora", {"r": 4, "rr": 8}, "lora.rr"),
    ("lora", {"r": NAN}, "lora.r"),
    ("lora", {"r": 2.5}, "lora.r"),
    ("lora", {"alpha": INF}, "lora.alpha"),
    ("lora", {"targets": [["q_proj"]]}, "lora.targets"),
    ("lora", [4], "lora"),
    ("mask", {"name": "salun", "ratio": NAN}, "mask.ratio"),
    ("mask", {"name": "salun", "ratio": 2}, "mask.ratio"),
    ("mask", {"name": "salun", "bogus": 1}, "mask.bogus"),
    ("mask", {"name": ["salun"]}, "mask.name"),
    ("mask", {"ratio": 0.5}, "mask.name"),
    ("parameters", {"beta": NAN}, "parameters.beta"),
    ("parameters", {"beta": INF}, "parameters.beta"),
    ("parameters", {"beta": "big"}, "parameters.beta"),
    ("training.lr", NAN, "training.lr"),
    ("training.batch_size", 0, "training.batch_size"),
    ("training.steps", 2**63, "training.steps"),
    ("parameters", {"beta": 10**400}, "parameters.beta"),
    ("training.optimizer", "adam", "training.optimizer"),
    ("data.max_length", NAN, "data.max_length"),
    ("seed", 2**32, "seed"),
    ("objective", "npoo", "objective"),
])
def test_forget_recipe(forget_recipe, tiny_lm, tmp_path, key, value, mentions):
    refuse("forget", tmp_path, put(forget_recipe, key, value), mentions, [tiny_lm], "--dry-run")


def test_forget_objective_parameter_not_whole(forget_recipe, tiny_lm, tmp_path):
    recipe = put({**forget_recipe, "objective": "soul_npo"}, "parameters", {"hessian_every": 2.5})
    refuse("forget", tmp_path, recipe, "parameters.hessian_every", [tiny_lm], "--dry-run")


# ----------------------------------------------------------------------------------------------- audit


@pytest.mark.parametrize("option, value", [
    ("--relearn-steps", "0"), ("--relearn-steps", "-3"),
    ("--relearn-lr", "nan"), ("--relearn-lr", "inf"), ("--relearn-lr", "0"), ("--relearn-lr", "-1e-4"),
    ("--relearn-fraction", "nan"), ("--relearn-fraction", "inf"), ("--relearn-fraction", "1"),
    ("--seed", "-1"),
])
def test_audit_options(forget_recipe, tiny_lm, tmp_path, option, value):
    forget = Path(forget_recipe["data"]["forget"])
    refused(["audit", tiny_lm, "--forget", forget, option, value, "--out", tmp_path / "out"], mentions=option,
            inputs=[tiny_lm, forget], out=tmp_path / "out")


# ------------------------------------------------------------------------------------------- positives


def test_recipe_with_anchors_still_loads(models, tmp_path):
    path = write(tmp_path / "recipe.yml", f"""
method: ties
base: {models["base"]}
inputs:
  - {{path: {models["ft0"]}, parameters: &p {{density: 0.5}}}}
  - {{path: {models["ft1"]}, parameters: *p}}
parameters: {{density: 0.7, scale: &s 1.0}}
""")
    result = CliRunner().invoke(app, ["merge", str(path), str(tmp_path / "out"), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "out").exists()


def test_readme_example_recipes_validate():
    from malleable.continual.engine import check_recipe as check_continual_recipe
    from malleable.continual.task_stream import check_recipe as check_task_recipe
    from malleable.forget.run import check_recipe
    from malleable.learn.registry import get_method
    from malleable.recipes.continual import parse_continual_recipe
    from malleable.recipes.forget import parse_forget_recipe
    from malleable.recipes.learn import parse_learn_recipe
    from malleable.recipes.merge import parse_recipe
    from malleable.recipes.slim import parse_slim_recipe
    from malleable.slim.engine import check_recipe as check_slim_recipe

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    blocks = [yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", readme, re.S)]
    kinds = {"inputs": parse_recipe, "calibration": parse_slim_recipe, "stream": parse_continual_recipe,
             "tasks": parse_continual_recipe, "method": parse_learn_recipe, "objective": parse_forget_recipe}
    parsed = [next(parse for key, parse in kinds.items() if key in b)(b, "README") for b in blocks]
    assert len(parsed) == 7  # three continual blocks: a stream, one with forget steps, a LoRA task stream
    for recipe in parsed:
        if hasattr(recipe, "calibration"):
            check_slim_recipe(recipe)
        elif hasattr(recipe, "tasks"):
            check_task_recipe(recipe)
        elif hasattr(recipe, "stream"):
            check_continual_recipe(recipe)
        elif hasattr(recipe, "objective"):
            check_recipe(recipe)
        elif hasattr(recipe, "training"):
            get_method(recipe.method, recipe.parameters)
