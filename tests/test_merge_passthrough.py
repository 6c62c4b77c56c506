"""mergekit's passthrough and layer slices (frankenmerges), dtype / out_dtype, chat_template, and the mergekit keys
refused rather than ignored. Expectations are mergekit 0.1.5's behaviour (plan.py: embeddings from the first
slice's model, final norm and lm_head from the last slice's; merge.py: num_hidden_layers and torch_dtype in
config.json); bench/mergekit_parity.py runs mergekit itself on the same kind of YAML."""

from __future__ import annotations

import json
import re

import pytest
import torch
import yaml
from conftest import CHAT_TEMPLATE
from hostile import refused
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from malleable.api import merge as run_merge


def write(tmp_path, data, name="mk.yml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data) if isinstance(data, dict) else data)
    return path


def src(model, layers, **params):
    s = {"model": str(model), "layer_range": layers}
    return {"sources": [{**s, "parameters": params} if params else s]}


def layer_of(name):
    m = re.search(r"\.layers\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def renamed(name, i):
    return re.sub(r"\.layers\.\d+\.", f".layers.{i}.", name)


def test_frankenmerge_stacks_layers_renamed_and_loads(models, tmp_path):
    """ft0 layers 0-1, ft0 layer 1 again, ft1 layer 0: a 4-layer model from two 2-layer ones."""
    data = {"merge_method": "passthrough",
            "slices": [src(models["ft0"], [0, 2]), src(models["ft0"], [1, 2]), src(models["ft1"], [0, 1])]}
    out = tmp_path / "out"
    run_merge(write(tmp_path, data), out, progress=False)
    got = load_file(out / "model.safetensors")
    a, b = load_file(models["ft0"] / "model.safetensors"), load_file(models["ft1"] / "model.safetensors")
    layer_map = [(a, 0), (a, 1), (a, 1), (b, 0)]
    want = {}
    for i, (sd, j) in enumerate(layer_map):
        want.update({renamed(n, i): t for n, t in sd.items() if layer_of(n) == j})
    want["model.embed_tokens.weight"] = a["model.embed_tokens.weight"]  # the first slice's model
    want["model.norm.weight"], want["lm_head.weight"] = b["model.norm.weight"], b["lm_head.weight"]  # the last's
    assert sorted(got) == sorted(want)
    for n in want:
        assert torch.equal(got[n], want[n]), n
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 4
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert len(model.model.layers) == 4
    with torch.no_grad():
        assert torch.isfinite(model(torch.arange(6)[None]).logits).all()


def test_slice_parameters_scale_filtered_and_per_layer(models, tmp_path):
    """scale set on one slice: a filter list with a per-layer gradient read over the slice's own layers."""
    data = {"merge_method": "passthrough", "slices": [
        src(models["ft0"], [0, 2]),
        src(models["ft2"], [0, 2], scale=[{"filter": "o_proj", "value": 0.5},
                                          {"filter": "down_proj", "value": [0.2, 1.0]}, {"value": 1.0}])]}
    out = tmp_path / "out"
    run_merge(write(tmp_path, data), out, progress=False)
    got = load_file(out / "model.safetensors")
    c = load_file(models["ft2"] / "model.safetensors")
    assert torch.equal(got["model.layers.2.self_attn.o_proj.weight"], c["model.layers.0.self_attn.o_proj.weight"] * 0.5)
    assert torch.equal(got["model.layers.2.mlp.down_proj.weight"], c["model.layers.0.mlp.down_proj.weight"] * 0.2)
    assert torch.equal(got["model.layers.3.mlp.down_proj.weight"], c["model.layers.1.mlp.down_proj.weight"])
    assert torch.equal(got["model.layers.3.mlp.up_proj.weight"], c["model.layers.1.mlp.up_proj.weight"])
    assert torch.equal(got["lm_head.weight"], c["lm_head.weight"])  # outside the layers: the gradient's first value


def test_linear_over_layer_ranges(models, tmp_path):
    """Each slice merges two models' equally long ranges; weights: the source's own, else the slice's."""
    data = {"merge_method": "linear", "slices": [
        {"sources": [{"model": str(models["ft0"]), "layer_range": [0, 2], "parameters": {"weight": 3.0}},
                     {"model": str(models["ft1"]), "layer_range": [0, 2]}], "parameters": {"weight": 1.0}},
        {"sources": [{"model": str(models["ft1"]), "layer_range": [1, 2], "parameters": {"weight": 1.0}},
                     {"model": str(models["ft1"]), "layer_range": [0, 1], "parameters": {"weight": 1.0}}]}]}
    out = tmp_path / "out"
    run_merge(write(tmp_path, data), out, progress=False)
    got = load_file(out / "model.safetensors")
    a, b = load_file(models["ft0"] / "model.safetensors"), load_file(models["ft1"] / "model.safetensors")
    n = "model.layers.{}.mlp.up_proj.weight"
    torch.testing.assert_close(got[n.format(1)], (3 * a[n.format(1)] + b[n.format(1)]) / 4)
    torch.testing.assert_close(got[n.format(2)], (b[n.format(1)] + b[n.format(0)]) / 2)  # one input, twice
    e = "model.embed_tokens.weight"
    torch.testing.assert_close(got[e], (3 * a[e] + b[e]) / 4)  # the first slice's merge
    torch.testing.assert_close(got["lm_head.weight"], b["lm_head.weight"])  # the last slice's: ft1 with itself
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 3


@pytest.mark.parametrize("t, want", [(0.0, "base"), (1.0, "ft0")])
def test_slerp_over_layer_ranges_reads_the_base_range(models, tmp_path, t, want):
    """base layers [1, 2) with ft0 layers [0, 1): t = 0 gives the base's layer 1, t = 1 ft0's layer 0."""
    data = {"merge_method": "slerp", "base_model": str(models["base"]), "parameters": {"t": t}, "slices": [
        {"sources": [{"model": str(models["base"]), "layer_range": [1, 2]},
                     {"model": str(models["ft0"]), "layer_range": [0, 1]}]}]}
    out = tmp_path / "out"
    run_merge(write(tmp_path, data), out, progress=False)
    got, sd = load_file(out / "model.safetensors"), load_file(models[want] / "model.safetensors")
    j = 1 if want == "base" else 0
    torch.testing.assert_close(got["model.layers.0.mlp.up_proj.weight"], sd[f"model.layers.{j}.mlp.up_proj.weight"])
    assert "model.layers.1.mlp.up_proj.weight" not in got


def test_a_slice_base_model_is_that_slices_base(models, tmp_path):
    """task_arithmetic over two slices: the first on the top-level base, the second on its own base_model (ft1),
    read at its own layer range, as mergekit's per-slice base_model; embeddings follow the first slice, lm_head
    the last (its base ft1)."""
    data = {"merge_method": "task_arithmetic", "base_model": str(models["base"]), "slices": [
        {"sources": [{"model": str(models["base"]), "layer_range": [0, 1]},
                     {"model": str(models["ft0"]), "layer_range": [0, 1], "parameters": {"weight": 0.5}}]},
        {"base_model": str(models["ft1"]),
         "sources": [{"model": str(models["ft1"]), "layer_range": [1, 2]},
                     {"model": str(models["ft2"]), "layer_range": [0, 1], "parameters": {"weight": 2.0}}]}]}
    out = tmp_path / "out"
    run_merge(write(tmp_path, data), out, progress=False)
    got = load_file(out / "model.safetensors")
    sd = {k: load_file(models[k] / "model.safetensors") for k in ("base", "ft0", "ft1", "ft2")}
    n = "model.layers.{}.mlp.up_proj.weight"
    torch.testing.assert_close(got[n.format(0)], sd["base"][n.format(0)]
                               + 0.5 * (sd["ft0"][n.format(0)] - sd["base"][n.format(0)]))
    torch.testing.assert_close(got[n.format(1)], sd["ft1"][n.format(1)]
                               + 2.0 * (sd["ft2"][n.format(0)] - sd["ft1"][n.format(1)]))
    e, h = "model.embed_tokens.weight", "lm_head.weight"
    torch.testing.assert_close(got[e], sd["base"][e] + 0.5 * (sd["ft0"][e] - sd["base"][e]))
    torch.testing.assert_close(got[h], sd["ft1"][h] + 2.0 * (sd["ft2"][h] - sd["ft1"][h]))


def test_a_slice_base_model_must_be_one_of_its_sources(models, tmp_path):
    data = {"merge_method": "task_arithmetic", "slices": [
        {"base_model": str(models["base"]), "sources": [{"model": str(models["ft0"]), "layer_range": [0, 2]},
                                                       {"model": str(models["ft1"]), "layer_range": [0, 2]}]},
        src(models["ft2"], [0, 1])]}
    path = write(tmp_path, data)
    line = refused(["merge", path, tmp_path / "out"], mentions="slices.0.base_model",
                   inputs=[path, models["base"], models["ft0"]], out=tmp_path / "out")
    assert "not one of the slice's sources" in line


def test_passthrough_without_slices_copies(models, tmp_path):
    out = tmp_path / "out"
    run_merge(write(tmp_path, {"merge_method": "passthrough", "models": [{"model": str(models["ft1"])}]}), out,
              progress=False)
    got, want = load_file(out / "model.safetensors"), load_file(models["ft1"] / "model.safetensors")
    assert sorted(got) == sorted(want) and all(torch.equal(got[n], want[n]) for n in want)


@pytest.mark.parametrize("keys, written, rounded", [
    ({"dtype": "float16"}, torch.float16, torch.float16),
    ({"dtype": "bfloat16", "out_dtype": "float32"}, torch.float32, torch.bfloat16),
    ({"out_dtype": "bfloat16"}, torch.bfloat16, torch.bfloat16),
])
def test_dtype_reads_out_dtype_writes_and_config_says_so(models, tmp_path, keys, written, rounded):
    data = {"merge_method": "passthrough", "slices": [src(models["ft0"], [0, 2]), src(models["ft0"], [1, 2])], **keys}
    out = tmp_path / "out"
    run_merge(write(tmp_path, data), out, progress=False)
    got, a = load_file(out / "model.safetensors"), load_file(models["ft0"] / "model.safetensors")
    assert {t.dtype for t in got.values()} == {written}
    n = "model.layers.2.mlp.up_proj.weight"
    assert torch.equal(got[n], a["model.layers.1.mlp.up_proj.weight"].to(rounded).to(written))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["dtype"] == str(written).removeprefix("torch.") and cfg["num_hidden_layers"] == 3


def test_dtype_alone_is_the_written_dtype_of_a_plain_merge(models, tmp_path):
    """The float16 merge used to keep the donor's "float32" in config.json."""
    data = {"merge_method": "linear", "dtype": "float16",
            "models": [{"model": str(models["ft0"]), "parameters": {"weight": 1.0}},
                       {"model": str(models["ft1"]), "parameters": {"weight": 1.0}}]}
    out = tmp_path / "out"
    run_merge(write(tmp_path, data), out, progress=False)
    assert json.loads((out / "config.json").read_text())["dtype"] == "float16"
    assert {t.dtype for t in load_file(out / "model.safetensors").values()} == {torch.float16}


@pytest.mark.parametrize("template", ["{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}"
                                                "{% endfor %}", "auto"])
def test_chat_template_is_written(tiny_lm, tmp_path, template):
    data = {"merge_method": "passthrough", "models": [{"model": str(tiny_lm)}], "chat_template": template}
    out = tmp_path / "out"
    run_merge(write(tmp_path, data), out, progress=False)
    want = CHAT_TEMPLATE.strip() if template == "auto" else template
    assert AutoTokenizer.from_pretrained(out).chat_template == want
    assert (out / "chat_template.jinja").read_text() == want


REFUSED = [
    ({"tokenizer": {"source": "base", "pad_to": 16}}, "tokenizer.pad_to: not a mergekit tokenizer key"),
    ({"chat_template": "chatml"}, "no tokenizer"),
    ({"slices": "two sources"}, "slices.0: method 'passthrough' merges exactly 1 input"),
    ({"slices": "past the end"}, "slices.1.layers"),
    ({"merge_method": "ties", "base_model": "base"}, "slices.0.base_layers: method 'ties' needs the base's layers"),
    ({"slices": "lengths differ"}, "slices.0: its sources' layer ranges differ in length"),
]


@pytest.mark.parametrize("change, mentions", REFUSED, ids=[m + str(i) for i, (_, m) in enumerate(REFUSED)])
def test_refused_settings_are_one_line(models, tmp_path, change, mentions):
    data = {"merge_method": "passthrough", "slices": [src(models["ft0"], [0, 2]), src(models["ft1"], [1, 2])]}
    if change.get("slices") == "two sources":
        data["slices"][0]["sources"].append({"model": str(models["ft1"]), "layer_range": [0, 2]})
    elif change.get("slices") == "lengths differ":
        two = [{"model": str(models[k]), "layer_range": r} for k, r in (("ft0", [0, 2]), ("ft1", [0, 1]))]
        data = {"merge_method": "linear", "slices": [{"sources": two}]}
    elif change.get("slices") == "past the end":
        data["slices"][1]["sources"][0]["layer_range"] = [1, 3]
    else:
        data.update({k: (str(models[v]) if k == "base_model" else v) for k, v in change.items()})
    out = tmp_path / "out"
    refused(["merge", write(tmp_path, data), out], mentions=mentions, inputs=[models["ft0"], models["ft1"]], out=out)


@pytest.mark.parametrize("template, why", [("chatmlx", "neither auto nor a Jinja template"),
                                           ("{{ too short }}", "neither auto nor a Jinja template"),
                                           ("a long string that is not a template", "neither auto nor a Jinja"),
                                           ("chatml", "mergekit ships")])
def test_chat_template_that_is_not_a_template_is_refused(tiny_lm, tmp_path, template, why):
    """mergekit's built-in names are refused too: their templates are mergekit's LGPL files, not copied here."""
    data = {"merge_method": "passthrough", "models": [{"model": str(tiny_lm)}], "chat_template": template}
    refused(["merge", write(tmp_path, data), tmp_path / "out"], mentions=["chat_template", why],
            inputs=[tiny_lm], out=tmp_path / "out")


def multi(*docs):
    return "---\n".join(yaml.safe_dump(d) for d in docs)


def test_mergekit_multi_runs_named_merges_first(models, tmp_path):
    """A named linear merge of ft0 and ft1, then the output: a frankenmerge of it and ft2 (documents out of order)."""
    final = {"merge_method": "passthrough", "slices": [src("avg", [0, 2]), src(models["ft2"], [1, 2])]}
    avg = {"name": "avg", "merge_method": "linear", "models": [
        {"model": str(models["ft0"]), "parameters": {"weight": 1.0}},
        {"model": str(models["ft1"]), "parameters": {"weight": 3.0}}]}
    final["slices"][0]["sources"][0]["model"] = "avg"
    out = tmp_path / "out"
    report = run_merge(write(tmp_path, multi(final, avg)), out, progress=False)
    assert list(report["intermediate_merges"]) == ["avg"]
    got = load_file(out / "model.safetensors")
    a, b, c = (load_file(models[k] / "model.safetensors") for k in ("ft0", "ft1", "ft2"))
    n = "model.layers.{}.self_attn.q_proj.weight"
    torch.testing.assert_close(got[n.format(1)], (a[n.format(1)] + 3 * b[n.format(1)]) / 4)
    assert torch.equal(got[n.format(2)], c[n.format(1)])
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mk.yml", "out"]  # the named merge's folder is gone


MULTI_REFUSED = [
    (lambda m: [m, m], "exactly one document must have no `name:`"),
    (lambda m: [{**m, "name": "a"}, m], "merge 'a' is used by no other document"),
    (lambda m: [{**m, "name": "a", "base_model": "b"}, {**m, "name": "b", "base_model": "a"}, m], "cycle"),
    (lambda m: [{**m, "name": "a/b"}, m], "not a usable merge name"),
    (lambda m: [{"method": "linear"}, m], "document 1: a file of several documents is read as mergekit-multi"),
    (lambda m: [{**m, "name": "a", "tokenizer": {"source": "base", "tokens": 3}}, {**m, "base_model": "a"}],
     "tokenizer.tokens"),
]


@pytest.mark.parametrize("docs, mentions", MULTI_REFUSED)
def test_mergekit_multi_mistakes_are_one_line_before_any_work(models, tmp_path, docs, mentions):
    m = {"merge_method": "passthrough", "models": [{"model": str(models["ft0"])}]}
    out = tmp_path / "out"
    refused(["merge", write(tmp_path, multi(*docs(m))), out], mentions=mentions, inputs=[models["ft0"]], out=out)


def test_several_documents_in_another_verbs_recipe_are_refused(tmp_path):
    recipe = write(tmp_path, "method: lora\n---\nmethod: lora\n", "learn.yml")
    refused(["learn", recipe, tmp_path / "out"], mentions="several YAML documents", inputs=[recipe],
            out=tmp_path / "out")


def test_native_recipe_slices_and_dry_run(models, tmp_path):
    """The same frankenmerge written as a malleable recipe; --dry-run lists the slices."""
    from malleable.api import merge_plan

    recipe = {"method": "passthrough", "inputs": [{"path": str(models["ft0"])}, {"path": str(models["ft1"])}],
              "slices": [{"input": 0, "layers": [0, 2]}, {"input": 1, "layers": [1, 2], "parameters": {"scale": 2.0}}]}
    text = merge_plan(recipe)
    assert "slice 1: inputs.1 layers [1, 2]" in text and "layers: 3 in the output" in text
    out = tmp_path / "out"
    run_merge(recipe, out, progress=False)
    got, b = load_file(out / "model.safetensors"), load_file(models["ft1"] / "model.safetensors")
    assert torch.equal(got["model.layers.2.mlp.up_proj.weight"], b["model.layers.1.mlp.up_proj.weight"] * 2.0)


def test_slices_of_lora_adapters_are_refused(adapters, tmp_path):
    recipe = write(tmp_path, {"method": "linear", "inputs": [{"path": str(adapters["lora0"])}],
                              "slices": [{"input": 0, "layers": [0, 1]}]}, "r.yml")
    refused(["merge", recipe, tmp_path / "out"], mentions="slices", inputs=[adapters["lora0"]], out=tmp_path / "out")


def test_a_single_source_weight_is_the_input_weight(models):
    from malleable.recipes.merge import parse_recipe

    recipe = parse_recipe({"merge_method": "linear", "slices": [
        {"sources": [{"model": str(models["ft0"]), "layer_range": [0, 2], "parameters": {"weight": 2.0}}]},
        {"sources": [{"model": str(models["ft1"]), "layer_range": [1, 2]}]}]}, "mk.yml")
    assert recipe.slices[0].sources[0].weight == 2.0 and recipe.slices[0].parameters == {}
    assert recipe.slices[1].input == 1 and recipe.slices[1].layers == (1, 2)


def test_gpt_neox_output_embedding_comes_from_the_last_slice(tmp_path):
    """embed_out (GPT-NeoX's lm_head) is merged with the final norm from the last slice's model, embed_in from the
    first's, as mergekit's gpt-neox architecture lists them."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        cfg = GPTNeoXConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                            vocab_size=96, max_position_embeddings=64, tie_word_embeddings=False)
        GPTNeoXForCausalLM(cfg).eval().save_pretrained(tmp_path / f"neox{seed}")
        paths.append(tmp_path / f"neox{seed}")
    data = {"merge_method": "passthrough", "slices": [src(paths[0], [0, 2]), src(paths[1], [1, 2])]}
    out = tmp_path / "out"
    run_merge(write(tmp_path, data), out, progress=False)
    got, a, b = (load_file(p / "model.safetensors") for p in (out, *paths))
    assert torch.equal(got["gpt_neox.embed_in.weight"], a["gpt_neox.embed_in.weight"])
    assert torch.equal(got["embed_out.weight"], b["embed_out.weight"])
    assert torch.equal(got["gpt_neox.final_layer_norm.weight"], b["gpt_neox.final_layer_norm.weight"])
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 3
