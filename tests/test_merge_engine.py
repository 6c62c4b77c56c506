"""End to end through the real engine: checkpoints and adapters in, loadable checkpoints and adapters out."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tree_digest
from peft import PeftModel
from safetensors.torch import load_file
from transformers import LlamaForCausalLM

from malleable.api import merge, merge_plan
from malleable.io.adapter import read_adapter
from malleable.io.checkpoint import Checkpoint


def state(path) -> dict[str, torch.Tensor]:
    ck = Checkpoint(path)
    return {n: ck.read(n) for n in ck.names}


def test_task_arithmetic_full_models(models, tmp_path):
    recipe = {"method": "task_arithmetic", "base": str(models["base"]),
              "inputs": [{"path": str(models["ft0"]), "weight": 0.5}, {"path": str(models["ft1"]), "weight": 0.3}],
              "parameters": {"scale": 2.0}}
    before = {k: tree_digest(v) for k, v in models.items()}
    report = merge(recipe, tmp_path / "out", progress=False)
    base, a, b, out = (state(p) for p in (models["base"], models["ft0"], models["ft1"], tmp_path / "out"))
    for name in base:
        want = base[name] + 2.0 * (0.5 * (a[name] - base[name]) + 0.3 * (b[name] - base[name]))
        torch.testing.assert_close(out[name], want, rtol=1e-5, atol=1e-6)
    assert {k: tree_digest(v) for k, v in models.items()} == before
    model = LlamaForCausalLM.from_pretrained(tmp_path / "out")
    assert model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, do_sample=False).shape == (1, 7)
    # the report records every input file with its hash
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["schema"] == "malleable.merge.report/1" and saved == json.loads(json.dumps(report))
    import hashlib

    f = saved["inputs"][1]["files"][0]
    assert hashlib.sha256(open(f["path"], "rb").read()).hexdigest() == f["sha256"]


def test_sharded_in_and_out(models, tmp_path):
    """A sharded input reads like a single file; a small max_shard_size writes a correct index."""
    LlamaForCausalLM.from_pretrained(models["ft1"]).save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    recipe = {"method": "linear", "inputs": [{"path": str(models["ft0"])}, {"path": str(tmp_path / "sharded")}],
              "output": {"max_shard_size": "60KB", "dtype": "bfloat16"}}
    merge(recipe, tmp_path / "out", progress=False)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2
    loaded = {}
    for f in files:
        loaded.update(load_file(tmp_path / "out" / f))
    assert set(loaded) == set(index["weight_map"])
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in loaded.values())
    a, b = state(models["ft0"]), state(models["ft1"])
    for name, t in loaded.items():
        assert t.dtype == torch.bfloat16
        torch.testing.assert_close(t, ((a[name] + b[name]) / 2).to(torch.bfloat16))
    LlamaForCausalLM.from_pretrained(tmp_path / "out")


def _merged_delta_via_peft(base_dir, adapter_dir):
    """Dense delta per weight, as PEFT itself applies the adapter (merge_and_unload)."""
    base = LlamaForCausalLM.from_pretrained(base_dir)
    merged = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base_dir), adapter_dir).merge_and_unload()
    b, m = base.state_dict(), merged.state_dict()
    return {k: m[k] - b[k] for k in b if not torch.equal(m[k], b[k])}


def test_concat_adapter_reloads_in_peft_with_the_exact_sum(models, adapters, tmp_path):
    recipe = {"method": "concat", "inputs": [{"path": str(adapters["lora0"]), "weight": 0.7},
                                             {"path": str(adapters["lora2"]), "weight": 1.5}]}
    merge(recipe, tmp_path / "cat", progress=False)
    got = _merged_delta_via_peft(models["base"], tmp_path / "cat")
    want0 = _merged_delta_via_peft(models["base"], adapters["lora0"])
    want2 = _merged_delta_via_peft(models["base"], adapters["lora2"])
    assert set(got) == set(want0) == set(want2) and got
    for k in got:
        torch.testing.assert_close(got[k], 0.7 * want0[k] + 1.5 * want2[k], rtol=1e-4, atol=1e-5)
    cfg = json.loads((tmp_path / "cat" / "adapter_config.json").read_text())
    assert cfg["r"] == 4 + 8


def test_adapter_into_model_matches_peft_merge(models, adapters, tmp_path):
    recipe = {"method": "task_arithmetic", "base": str(models["base"]),
              "inputs": [{"path": str(adapters["lora0"])}, {"path": str(adapters["lora1"])}],
              "output": {"kind": "model"}}
    merge(recipe, tmp_path / "model", progress=False)
    out, base = state(tmp_path / "model"), state(models["base"])
    d0 = _merged_delta_via_peft(models["base"], adapters["lora0"])
    d1 = _merged_delta_via_peft(models["base"], adapters["lora1"])
    for name in base:
        want = base[name] + d0.get(name, 0) + d1.get(name, 0)
        torch.testing.assert_close(out[name], want, rtol=1e-5, atol=1e-5)
    LlamaForCausalLM.from_pretrained(tmp_path / "model").generate(torch.tensor([[5, 6]]), max_new_tokens=3)


def test_rank_alpha_patterns_and_rslora_are_honoured(models, tmp_path):
    """Our reading of r / lora_alpha / rank_pattern / alpha_pattern / use_rslora equals PEFT's own delta."""
    from conftest import make_adapter

    path = make_adapter(models["base"], tmp_path / "patterned", seed=7, r=4, alpha=16, use_rslora=True,
                        rank_pattern={"q_proj": 2}, alpha_pattern={"layers.1.self_attn.v_proj": 3})
    ours = {f"{m}.weight": d.dense() for m, d in read_adapter(path).deltas.items()}
    peft = _merged_delta_via_peft(models["base"], path)
    assert set(ours) == set(peft)
    for k in ours:
        torch.testing.assert_close(ours[k], peft[k], rtol=1e-4, atol=1e-6)
    # and a merge of it written back (mixed ranks -> rank_pattern) reloads to the same delta
    merge({"method": "concat", "inputs": [{"path": str(path)}]}, tmp_path / "rewritten", progress=False)
    again = _merged_delta_via_peft(models["base"], tmp_path / "rewritten")
    for k in ours:
        torch.testing.assert_close(again[k], peft[k], rtol=1e-4, atol=1e-6)


def test_merge_then_compress_rank_and_reload(models, adapters, tmp_path):
    recipe = {"method": "ties", "inputs": [{"path": str(p)} for p in adapters.values()],
              "parameters": {"density": 0.5}, "output": {"rank": 3}}
    merge(recipe, tmp_path / "svd", progress=False)
    merged = read_adapter(tmp_path / "svd")
    assert {d.rank for d in merged.deltas.values()} == {3}
    PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(models["base"]), tmp_path / "svd")


def test_same_seed_same_bytes_other_seed_differs(models, tmp_path):
    recipe = {"method": "dare_ties", "base": str(models["base"]),
              "inputs": [{"path": str(models[f"ft{i}"])} for i in range(3)], "parameters": {"density": 0.5}}
    merge(recipe, tmp_path / "a", progress=False)
    merge(recipe, tmp_path / "b", progress=False)
    merge({**recipe, "seed": 1}, tmp_path / "c", progress=False)
    a, b, c = ((tmp_path / x / "model.safetensors").read_bytes() for x in "abc")
    assert a == b and a != c


def test_per_tensor_filters_and_layer_gradients(models, tmp_path):
    recipe = {"method": "task_arithmetic", "base": str(models["base"]),
              "inputs": [{"path": str(models["ft0"])}],
              "parameters": {"scale": [{"filter": "mlp", "value": 0.0}, {"value": [1.0, 3.0]}]}}
    merge(recipe, tmp_path / "out", progress=False)
    out, base, ft = state(tmp_path / "out"), state(models["base"]), state(models["ft0"])
    n = "model.layers.{}.{}"
    torch.testing.assert_close(out[n.format(0, "mlp.up_proj.weight")], base[n.format(0, "mlp.up_proj.weight")])
    for layer, s in [(0, 1.0), (1, 3.0)]:
        k = n.format(layer, "self_attn.q_proj.weight")
        torch.testing.assert_close(out[k], base[k] + s * (ft[k] - base[k]), rtol=1e-5, atol=1e-6)


def test_dry_run_validates_and_writes_nothing(models, adapters, tmp_path):
    text = merge_plan({"method": "ctm", "inputs": [{"path": str(p)} for p in adapters.values()],
                       "output": {"rank": 4}})
    assert "ctm" in text and "rank 4" in text and "estimated peak" in text
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "ties", "dare_linear", "dare_ties",
                                    "magnitude_prune", "tsv", "iso_c"])
def test_every_full_rule_produces_a_loadable_model(models, tmp_path, method):
    recipe = {"method": method, "base": str(models["base"]),
              "inputs": [{"path": str(models[f"ft{i}"])} for i in range(3)]}
    merge(recipe, tmp_path / "out", progress=False)
    LlamaForCausalLM.from_pretrained(tmp_path / "out")


@pytest.mark.parametrize("method", ["concat", "knots", "core_space", "ctm", "task_arithmetic", "tsv"])
def test_every_lora_path_produces_a_loadable_adapter(models, adapters, tmp_path, method):
    recipe = {"method": method, "inputs": [{"path": str(p)} for p in adapters.values()]}
    merge(recipe, tmp_path / "out", progress=False)
    model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(models["base"]), tmp_path / "out")
    model.generate(input_ids=torch.tensor([[1, 2]]), max_new_tokens=2)


@pytest.mark.parametrize("kind", ["adapter", "model"])
def test_ctm_engine_batches_all_modules_like_the_per_module_rule(models, adapters, tmp_path, monkeypatch, kind):
    """The engine hands every module to ctm's batch entry point in one call; the result equals the per-module
    rule with the same weights, parameters and per-module generator, to float tolerance."""
    import dataclasses

    from malleable.merge import RULES, get_rule
    from malleable.merge.engine import _generator

    rule = get_rule("ctm")
    calls = []

    def counting(jobs):
        calls.append(len(jobs))
        return rule.batch(jobs)

    monkeypatch.setitem(RULES, "ctm", dataclasses.replace(rule, batch=counting))
    recipe = {"method": "ctm", "inputs": [{"path": str(p)} for p in adapters.values()],
              "parameters": {"inner": "ties", "density": 0.5, "beta": 0.25}, "output": {"kind": kind, "rank": 4}}
    if kind == "model":
        recipe["base"] = str(models["base"])
    merge(recipe, tmp_path / "out", progress=False)
    ins = [read_adapter(p) for p in adapters.values()]
    assert calls == [len(ins[0].deltas)]
    base = state(models["base"]) if kind == "model" else None
    got_model = state(tmp_path / "out") if kind == "model" else None
    got_adapter = read_adapter(tmp_path / "out") if kind == "adapter" else None
    for m in ins[0].deltas:
        want = rule.fn([a.deltas[m] for a in ins], [1.0] * 3, _generator(0, m), 4, inner="ties", density=0.5,
                       beta=0.25).dense()
        if kind == "adapter":
            got = got_adapter.deltas[m].dense()
        else:
            w = ins[0].weight_name(m)
            got = got_model[w].float() - base[w].float()
        assert torch.allclose(got, want, rtol=0, atol=1e-5 * float(want.abs().max()))
