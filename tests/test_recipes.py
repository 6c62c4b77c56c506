"""Recipes: the mergekit YAML reader keeps mergekit's semantics; validation names the key."""

from __future__ import annotations

import re

import pytest
import torch
import yaml

from malleable.api import merge
from malleable.errors import RecipeError
from malleable.io.checkpoint import Checkpoint
from malleable.recipes.merge import load_recipe, parse_recipe

MERGEKIT_TIES = """
merge_method: ties
base_model: {base}
models:
  - model: {base}
  - model: {ft0}
    parameters: {{weight: 0.7, density: 0.5}}
  - model: {ft1}
    parameters: {{weight: 0.4, density: 0.8}}
parameters:
  normalize: true
  int8_mask: true
  lambda: 1.5
dtype: float32
"""


def mergekit_ties_reference(base, deltas, weights, densities, lam):
    """mergekit 0.1.5's ties, written out from its source: magnitude trim, weights before the sign
    election (sum, zero counts as +), sum of agreeing weighted deltas over the sum of their weights."""
    kept = []
    for d, k in zip(deltas, densities):
        n = int(k * d.numel())
        mask = torch.zeros(d.numel())
        mask[torch.argsort(d.abs().flatten(), descending=True)[:n]] = 1
        kept.append(d * mask.view_as(d))
    weighted = torch.stack([w * d for w, d in zip(weights, kept)])
    majority = torch.where(weighted.sum(0) >= 0, 1.0, -1.0)
    agree = weighted.sign() == majority
    w = torch.tensor(weights).view(-1, *[1] * base.dim())
    divisor = (w * agree).sum(0)
    divisor[divisor == 0] = 1
    return base + lam * (weighted * agree).sum(0) / divisor


def test_mergekit_ties_yaml_runs_unchanged_with_mergekit_semantics(models, tmp_path):
    path = tmp_path / "mergekit.yml"
    path.write_text(MERGEKIT_TIES.format(**{k: str(v) for k, v in models.items()}))
    recipe = load_recipe(path)
    assert recipe.method == "ties" and len(recipe.inputs) == 2  # the base contributes no task vector
    assert recipe.parameters == {"normalize": "weights", "weighted_election": True, "scale": 1.5}
    merge(recipe, tmp_path / "out", progress=False)
    out, base, a, b = (Checkpoint(p) for p in (tmp_path / "out", models["base"], models["ft0"], models["ft1"]))
    for name in base.names:
        x = base.read(name)
        want = mergekit_ties_reference(x, [a.read(name) - x, b.read(name) - x], [0.7, 0.4], [0.5, 0.8], 1.5)
        torch.testing.assert_close(out.read(name), want, rtol=1e-5, atol=1e-6)


def test_mergekit_linear_counts_base_model_as_an_input(models):
    recipe = parse_recipe({"merge_method": "linear", "base_model": str(models["base"]),
                           "models": [{"model": str(models["ft0"]), "parameters": {"weight": 2.0}}],
                           "parameters": {"weight": 1.0}})
    assert [str(i.path) for i in recipe.inputs] == [str(models["ft0"]), str(models["base"])]
    assert [i.weight for i in recipe.inputs] == [2.0, 1.0] and recipe.base is None


def test_mergekit_dare_ties_defaults(models):
    recipe = parse_recipe({"merge_method": "dare_ties", "base_model": "b",
                           "models": [{"model": "m", "parameters": {"weight": 1, "density": 0.3}}]})
    assert recipe.parameters == {"normalize": "none", "weighted_election": True}
    assert recipe.inputs[0].parameters == {"density": 0.3}


@pytest.mark.parametrize("data, key", [
    ({"merge_method": "frankenstein", "base_model": "b", "models": []}, "frankenstein"),
    ({"merge_method": "ties", "slices": []}, "slices"),
    ({"merge_method": "ties", "slices": [{"sources": [], "base": "b"}]}, "slices.0.base"),
    ({"merge_method": "ties", "modles": []}, "modles"),
    ({"merge_method": "ties", "models": [{"model": "m", "parameters": {"normalize": True}}]}, "models.0"),
])
def test_mergekit_mistakes_name_the_key(data, key):
    with pytest.raises(RecipeError, match=key):
        parse_recipe(data, "mk.yml")


def test_relative_paths_resolve_from_the_recipe_folder(models, tmp_path):
    (tmp_path / "r.yml").write_text(yaml.safe_dump({"method": "linear", "inputs": [{"path": "../x"}]}))
    assert str(load_recipe(tmp_path / "r.yml").inputs[0].path) == "../x"  # missing: left for the error
    link = tmp_path / "ft0"
    link.symlink_to(models["ft0"])
    (tmp_path / "r.yml").write_text(yaml.safe_dump({"method": "linear", "inputs": [{"path": "ft0"}]}))
    assert load_recipe(tmp_path / "r.yml").inputs[0].path == tmp_path / "ft0"


def test_mergekit_slices_taking_every_layer_read_as_models(models, tmp_path):
    data = yaml.safe_load(MERGEKIT_TIES.format(**{k: str(v) for k, v in models.items()}))
    as_models = parse_recipe(dict(data))
    top = data.pop("parameters")
    sources = [{**m, "layer_range": [0, 2]} for m in data.pop("models")]
    sliced = {**data, "parameters": {"lambda": 9.0}, "slices": [{"sources": sources, "parameters": top}]}
    assert parse_recipe(sliced) == as_models  # the slice's parameters win over the top-level ones


def test_mergekit_slices_that_stack_read_as_slices(models):
    """Two slices of (base, ft0) layers 0-1: ties over layer ranges, stacked; the base's range is base_layers."""
    sources = [{"model": str(models[n]), "layer_range": [0, 2]} for n in ("base", "ft0")]
    recipe = parse_recipe({"merge_method": "ties", "base_model": str(models["base"]),
                           "slices": [{"sources": sources}, {"sources": sources}]}, "mk.yml")
    assert [str(i.path) for i in recipe.inputs] == [str(models["ft0"])] and recipe.base == models["base"]
    assert [(s.base_layers, [(x.input, x.layers) for x in s.sources]) for s in recipe.slices] == \
        [((0, 2), [(0, (0, 2))])] * 2


@pytest.mark.parametrize("change, key", [
    (lambda s: s[0]["sources"][1].update(layer_range=[0, 1]), "slices.0: its sources' layer ranges differ"),
    (lambda s: s[0]["sources"][1].update(layer_range=[1, 3]), "slices.0.sources.0.layers: [1, 3] goes past"),
    (lambda s: s[0]["sources"][0].update(model="/nonexistent"), "/nonexistent"),
])
def test_mergekit_slices_are_checked_before_any_work(models, change, key):
    from malleable.errors import MalleableError
    from malleable.merge.engine import plan_merge

    sources = [{"model": str(models[n]), "layer_range": [0, 2]} for n in ("base", "ft0")]
    slices = [{"sources": sources}, {"sources": [dict(s) for s in sources]}]
    change(slices)
    with pytest.raises(MalleableError, match=re.escape(key)):
        plan_merge(parse_recipe({"merge_method": "ties", "base_model": str(models["base"]), "slices": slices},
                                "mk.yml"))


def test_learn_and_forget_recipes_resolve_every_path_field(tmp_path):
    from malleable.recipes.forget import load_forget_recipe
    from malleable.recipes.learn import load_learn_recipe

    for name in ("m", "train.jsonl", "val.jsonl", "forget.jsonl", "retain.jsonl", "ref"):
        (tmp_path / name).touch()
    (tmp_path / "learn.yml").write_text(yaml.safe_dump(
        {"model": "m", "method": "lora", "data": {"train": "train.jsonl", "validation": "val.jsonl"},
         "training": {"steps": 1}}))
    learn = load_learn_recipe(tmp_path / "learn.yml")
    assert (learn.model, learn.data.train, learn.data.validation) == (
        tmp_path / "m", tmp_path / "train.jsonl", tmp_path / "val.jsonl")
    (tmp_path / "forget.yml").write_text(yaml.safe_dump(
        {"model": "m", "objective": "graddiff", "reference": "ref",
         "data": {"forget": "forget.jsonl", "retain": "retain.jsonl", "holdout": "missing.jsonl"}}))
    forget = load_forget_recipe(tmp_path / "forget.yml")
    assert (forget.model, forget.reference, forget.data.forget, forget.data.retain) == (
        tmp_path / "m", tmp_path / "ref", tmp_path / "forget.jsonl", tmp_path / "retain.jsonl")
    assert str(forget.data.holdout) == "missing.jsonl"  # not there: left as written, for the error to name
