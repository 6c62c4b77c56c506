"""Vocabulary merging (mergekit's tokenizer_source and tokenizer:), on tiny Llamas whose tokenizers differ.

base: <pad> <unk> <s> </s> w0..w99 (104 tokens); a: the same plus added x1, x2 and special <sp> (107); b: w0..w95
plus x2, y1 (102). Each embedding has one row per token. Expected rows are written out per token from mergekit's
rules (tokenizer/embed.py), not recomputed by the code under test; bench/mergekit_parity.py runs mergekit itself.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from torch.testing import assert_close
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from malleable.api import merge as run_merge
from malleable.recipes.merge import load_recipe
from hostile import refused

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from mergekit_parity import word_tokenizer  # noqa: E402 (the bench folder is not a package; its cases use the same tokenizers)

EMB, HEAD = "model.embed_tokens.weight", "lm_head.weight"


@pytest.fixture(scope="module")
def vocab_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("vocab")
    specs = {"base": word_tokenizer(100), "a": word_tokenizer(100, ["x1", "x2"], ["<sp>"]),
             "b": word_tokenizer(96, ["x2", "y1"]), "big": word_tokenizer(510)}
    out = {}
    for seed, (name, tok) in enumerate(specs.items()):
        torch.manual_seed(seed)
        cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=64,
                          tie_word_embeddings=False)
        LlamaForCausalLM(cfg).eval().save_pretrained(root / name)
        tok.save_pretrained(root / name)
        out[name] = root / name
    return out


def rows(path, name=EMB):
    """token -> that model's row of tensor `name`."""
    t = load_file(path / "model.safetensors")[name]
    return {tok: t[i] for tok, i in AutoTokenizer.from_pretrained(path).get_vocab().items()}


def merge(tmp_path, data):
    (tmp_path / "mk.yml").write_text(yaml.safe_dump(data))
    out = tmp_path / "out"
    run_merge(load_recipe(tmp_path / "mk.yml"), out, progress=False)
    return out


def test_union_lays_out_rows_with_mergekits_defaults(vocab_models, tmp_path):
    m = {k: str(v) for k, v in vocab_models.items()}
    out = merge(tmp_path, {"merge_method": "linear", "base_model": m["base"], "tokenizer_source": "union",
                           "models": [{"model": m["a"], "parameters": {"weight": 0.3}},
                                      {"model": m["b"], "parameters": {"weight": 0.5}},
                                      {"model": m["base"], "parameters": {"weight": 0.2}}], "dtype": "float32"})
    vocab = AutoTokenizer.from_pretrained(out).get_vocab()
    assert set(vocab) == set(rows(vocab_models["a"])) | set(rows(vocab_models["b"])) | {"w96"}
    assert len(vocab) == 108 and json.loads((out / "config.json").read_text())["vocab_size"] == 108
    added = {a.content: a.special for a in AutoTokenizer.from_pretrained(out).added_tokens_decoder.values()}
    assert added["<sp>"] and not added["y1"]  # added with each one's own settings, as mergekit
    for name in (EMB, HEAD):
        got = rows(out, name)
        base, a, b = (rows(vocab_models[k], name) for k in ("base", "a", "b"))
        assert load_file(out / "model.safetensors")[name].shape[0] == 108
        assert_close(got["w5"], 0.2 * base["w5"] + 0.3 * a["w5"] + 0.5 * b["w5"])  # everyone has it
        assert_close(got["w97"], (0.2 + 0.5) * base["w97"] + 0.3 * a["w97"])  # b lacks it: the base's row
        assert_close(got["x1"], a["x1"])  # only a has it: a's row for every model
        assert_close(got["<sp>"], a["<sp>"])
        assert_close(got["y1"], b["y1"])
        x2 = (a["x2"] + b["x2"]) / 2  # a and b have it, the base not: their mean for the base
        assert_close(got["x2"], 0.2 * x2 + 0.3 * a["x2"] + 0.5 * b["x2"])
    ids = AutoTokenizer.from_pretrained(out)("x1 w3 y1")["input_ids"]
    assert ids == [vocab["x1"], vocab["w3"], vocab["y1"]]


def test_base_source_and_token_overrides(vocab_models, tmp_path):
    m = {k: str(v) for k, v in vocab_models.items()}
    out = merge(tmp_path, {"merge_method": "task_arithmetic", "base_model": m["base"],
                           "models": [{"model": m["a"], "parameters": {"weight": 0.5}},
                                      {"model": m["b"], "parameters": {"weight": 0.25}}],
                           "tokenizer": {"source": "base", "tokens": {
                               "w3": {"source": {"kind": "zero"}, "force": True},
                               "w1": {"source": m["a"], "force": True},
                               "new": {"source": {"kind": "model_token", "model": m["b"], "token": "x2"}}}},
                           "dtype": "float32"})
    vocab = AutoTokenizer.from_pretrained(out).get_vocab()
    assert len(vocab) == 105 and set(rows(vocab_models["base"])) | {"new"} == set(vocab)
    got, base, a, b = rows(out), *(rows(vocab_models[k]) for k in ("base", "a", "b"))
    assert_close(got["w5"], base["w5"] + 0.5 * (a["w5"] - base["w5"]) + 0.25 * (b["w5"] - base["w5"]))
    assert_close(got["w98"], base["w98"] + 0.5 * (a["w98"] - base["w98"]))  # b takes the base's row: no change
    assert torch.count_nonzero(got["w3"]) == 0  # forced zero in every model
    assert_close(got["w1"], a["w1"])  # forced to a's row in every model: no task vector
    assert_close(got["new"], b["x2"])


def test_pad_to_multiple_of_gives_mean_rows(vocab_models, tmp_path):
    out = merge(tmp_path, {"merge_method": "linear", "models": [{"model": str(vocab_models["big"])}],
                           "tokenizer": {"pad_to_multiple_of": 16}, "dtype": "float32"})
    src = load_file(vocab_models["big"] / "model.safetensors")
    got = load_file(out / "model.safetensors")
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 528
    for name in (EMB, HEAD):
        assert src[name].shape[0] == 514 and got[name].shape[0] == 528
        assert_close(got[name][:514], src[name])
        assert_close(got[name][514:], src[name].mean(dim=0).expand(14, -1))
    assert torch.equal(got["model.norm.weight"], src["model.norm.weight"])
    from malleable.merge.engine import describe, plan_merge

    text = describe(plan_merge(load_recipe(tmp_path / "mk.yml")))
    assert "vocabulary: 514 tokens (tokenizer source union), 528 embedding rows" in text


@pytest.mark.parametrize("tokenizer, mentions", [
    ({"source": "base", "tokens": {"x1": {"source": "B"}}}, "tokenizer.tokens.x1.source: "),
    ({"source": "base", "tokens": {"w1": {"force": True}}}, "tokenizer.tokens.w1: the token is missing"),
    ({"source": "base", "tokens": {"w1": {"source": "ELSEWHERE"}}}, "is not one of the merged models"),
    ({"source": "ELSEWHERE"}, "tokenizer.source: cannot load its tokenizer"),
])
def test_bad_tokenizer_settings_are_one_line(vocab_models, tmp_path, tokenizer, mentions):
    m = {k: str(v) for k, v in vocab_models.items()}
    tokenizer = json.loads(json.dumps(tokenizer).replace('"B"', json.dumps(m["b"]))
                           .replace("ELSEWHERE", str(tmp_path / "nowhere")))
    data = {"merge_method": "task_arithmetic", "base_model": m["base"], "tokenizer": tokenizer,
            "models": [{"model": m["a"]}, {"model": m["b"]}]}
    (tmp_path / "mk.yml").write_text(yaml.safe_dump(data))
    out = tmp_path / "out"
    refused(["merge", tmp_path / "mk.yml", out], mentions=mentions, inputs=[vocab_models["a"]], out=out)


def test_without_a_tokenizer_setting_different_vocabularies_are_refused(vocab_models, tmp_path):
    data = {"merge_method": "linear", "models": [{"model": str(vocab_models["a"])}, {"model": str(vocab_models["b"])}]}
    (tmp_path / "mk.yml").write_text(yaml.safe_dump(data))
    out = tmp_path / "out"
    refused(["merge", tmp_path / "mk.yml", out], mentions="vocab_size", inputs=[vocab_models["a"]], out=out)


def test_native_recipe_tokenizer_section(vocab_models, tmp_path):
    """Our own recipe form: `tokenizer.base` names the model whose rows shared tokens take (linear has no base)."""
    a, b = str(vocab_models["a"]), str(vocab_models["b"])
    out = merge(tmp_path, {"method": "linear", "inputs": [{"path": b, "weight": 1.0}, {"path": a, "weight": 3.0}],
                           "tokenizer": {"source": "union", "base": a}})
    got, ra, rb = rows(out), rows(vocab_models["a"]), rows(vocab_models["b"])
    assert len(got) == 107 + 1  # a's 107 tokens and b's y1
    assert_close(got["w97"], ra["w97"])  # b lacks it: a's row (the tokenizer's base) for b too
    assert_close(got["x2"], 0.25 * rb["x2"] + 0.75 * ra["x2"])
    assert_close(got["y1"], rb["y1"])
    ids = AutoTokenizer.from_pretrained(out).get_vocab()
    assert ids["x1"] == AutoTokenizer.from_pretrained(a).get_vocab()["x1"] and ids["y1"] == 107  # a's, then b's


def test_mergekit_multi_names_a_merge_as_tokenizer_source(vocab_models, tmp_path):
    """A named union merge `ab` is the output's tokenizer source and the source of a forced token's row."""
    m = {k: str(v) for k, v in vocab_models.items()}
    def weighted(*models):
        return [{"model": x, "parameters": {"weight": w}} for x, w in models]

    ab = {"merge_method": "linear", "tokenizer_source": "union", "dtype": "float32",
          "models": weighted((m["a"], 0.5), (m["b"], 0.5))}
    final = {"merge_method": "linear", "dtype": "float32", "models": weighted((m["base"], 1.0), ("ab", 1.0)),
             "tokenizer": {"source": "ab", "tokens": {"x1": {"source": "ab", "force": True}}}}
    multi = tmp_path / "multi"
    multi.mkdir()
    (multi / "mk.yml").write_text("---\n".join(yaml.safe_dump(d) for d in (final, {"name": "ab", **ab})))
    run_merge(multi / "mk.yml", multi / "out", progress=False)
    ab_rows = rows(merge(tmp_path, ab))  # the same merge alone
    got, base = rows(multi / "out"), rows(vocab_models["base"])
    assert set(got) == set(ab_rows) and len(got) == 108  # the named merge's vocabulary
    assert_close(got["w5"], (base["w5"] + ab_rows["w5"]) / 2)
    assert_close(got["x1"], ab_rows["x1"])  # forced to ab's row in both models
    assert sorted(p.name for p in multi.iterdir()) == ["mk.yml", "out"]  # the named merge's folder is gone


# vocabulary merging with `slices:` (mergekit's plan.py: the embeddings are merged from the first slice's sources, the
# norm and lm_head from the last slice's; its PermutedVocabulary lays out the rows over those models alone)

def layer(path, name, i):
    return load_file(path / "model.safetensors")[name.replace(".layers.0.", f".layers.{i}.")]


def slice_of(*sources):
    return {"sources": [{"model": str(m), "layer_range": r, **({"parameters": p} if p else {})}
                        for m, r, p in sources]}


def test_passthrough_slices_union(vocab_models, tmp_path):
    """a's layers 0-1 then b's layer 1: embeddings are a's rows alone, lm_head b's alone; a token the slice's one
    model lacks gets zeros (no model of that tensor has it), wherever the union has it. base_model lends config.json
    and starts the union."""
    m = vocab_models
    out = merge(tmp_path, {"merge_method": "passthrough", "base_model": str(m["base"]), "tokenizer_source": "union",
                           "slices": [slice_of((m["a"], [0, 2], None)), slice_of((m["b"], [1, 2], None))]})
    tok = AutoTokenizer.from_pretrained(out)
    vocab = tok.get_vocab()
    assert len(vocab) == 108 and set(vocab) == set(rows(m["a"])) | set(rows(m["b"]))
    assert all(vocab[t] == i for t, i in AutoTokenizer.from_pretrained(m["base"]).get_vocab().items())  # base's ids
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["vocab_size"] == 108 and cfg["num_hidden_layers"] == 3
    emb, head, a, b = rows(out, EMB), rows(out, HEAD), rows(m["a"], EMB), rows(m["b"], HEAD)
    for t in vocab:
        assert torch.equal(emb[t], a[t] if t in a else torch.zeros(64)), t  # y1: only b has it, b is not merged here
        assert torch.equal(head[t], b[t] if t in b else torch.zeros(64)), t  # w96-w99, x1, <sp>: zeros
    q = "model.layers.0.self_attn.q_proj.weight"
    got = load_file(out / "model.safetensors")
    assert torch.equal(got[q.replace(".0.", ".1.")], layer(m["a"], q, 1))
    assert torch.equal(got[q.replace(".0.", ".2.")], layer(m["b"], q, 1))
    assert torch.equal(got["model.norm.weight"], layer(m["b"], "model.norm.weight", 0))
    model = AutoModelForCausalLM.from_pretrained(out)
    ids = tok("x1 w3 y1", return_tensors="pt")["input_ids"]
    assert ids.tolist() == [[vocab["x1"], vocab["w3"], vocab["y1"]]]
    assert model(ids).logits.shape == (1, 3, 108)


@pytest.mark.parametrize("source", ["base", "b"])
def test_passthrough_slices_base_or_a_models_tokenizer(vocab_models, tmp_path, source):
    m = vocab_models
    out = merge(tmp_path, {"merge_method": "passthrough", "base_model": str(m["base"]),
                           "tokenizer_source": source if source == "base" else str(m[source]),
                           "slices": [slice_of((m["a"], [0, 2], None)), slice_of((m["b"], [1, 2], {"scale": 0.5}))]})
    want = AutoTokenizer.from_pretrained(m["base" if source == "base" else source]).get_vocab()
    assert AutoTokenizer.from_pretrained(out).get_vocab() == want  # that tokenizer, its ids
    assert json.loads((out / "config.json").read_text())["vocab_size"] == len(want)
    emb, head, a, b = rows(out, EMB), rows(out, HEAD), rows(m["a"], EMB), rows(m["b"], HEAD)
    for t in want:
        assert torch.equal(emb[t], a[t] if t in a else torch.zeros(64)), t
        assert torch.equal(head[t], 0.5 * b[t] if t in b else torch.zeros(64)), t  # the last slice's scale


def test_linear_slices_of_several_sources_union(vocab_models, tmp_path):
    """Embeddings merge the first slice's a and b (weights 0.3, 0.7), lm_head the last slice's b, a and base (0.5,
    0.3, 0.2); the default rows follow mergekit's rules over each tensor's own models: base_model's row only where
    the base is one of them."""
    m = vocab_models
    out = merge(tmp_path, {"merge_method": "linear", "base_model": str(m["base"]), "tokenizer_source": "union",
                           "dtype": "float32", "slices": [
                               slice_of((m["a"], [0, 2], {"weight": 0.3}), (m["b"], [0, 2], {"weight": 0.7})),
                               slice_of((m["b"], [1, 2], {"weight": 0.5}), (m["a"], [0, 1], {"weight": 0.3}),
                                        (m["base"], [1, 2], {"weight": 0.2}))]})
    assert len(AutoTokenizer.from_pretrained(out).get_vocab()) == 108
    emb, a, b = rows(out, EMB), rows(m["a"], EMB), rows(m["b"], EMB)
    assert_close(emb["w5"], 0.3 * a["w5"] + 0.7 * b["w5"])
    assert_close(emb["w97"], a["w97"])  # b lacks it, a alone has it among {a, b}: a's row for both
    assert_close(emb["y1"], b["y1"])
    assert_close(emb["x2"], 0.3 * a["x2"] + 0.7 * b["x2"])
    head, a, b, base = rows(out, HEAD), rows(m["a"], HEAD), rows(m["b"], HEAD), rows(m["base"], HEAD)
    assert_close(head["w5"], 0.5 * b["w5"] + 0.3 * a["w5"] + 0.2 * base["w5"])
    assert_close(head["w97"], (0.5 + 0.2) * base["w97"] + 0.3 * a["w97"])  # b lacks it: the base's row
    x2 = (a["x2"] + b["x2"]) / 2  # the base lacks it: the mean of a's and b's rows
    assert_close(head["x2"], 0.5 * b["x2"] + 0.3 * a["x2"] + 0.2 * x2)
    assert_close(head["x1"], a["x1"])
    assert_close(head["y1"], b["y1"])
    q = "model.layers.0.mlp.up_proj.weight"
    got = load_file(out / "model.safetensors")[q.replace(".0.", ".2.")]
    assert_close(got, 0.5 * layer(m["b"], q, 1) + 0.3 * layer(m["a"], q, 0) + 0.2 * layer(m["base"], q, 1))


def test_task_arithmetic_slices_read_the_base_rows(vocab_models, tmp_path):
    """A rule with a base: each slice's base range is read, and the base's rows join the tensor's models."""
    m = vocab_models
    out = merge(tmp_path, {"merge_method": "task_arithmetic", "base_model": str(m["base"]), "dtype": "float32",
                           "tokenizer_source": "union", "slices": [
                               slice_of((m["a"], [0, 2], {"weight": 0.5}), (m["base"], [0, 2], None)),
                               slice_of((m["b"], [0, 1], {"weight": 0.25}), (m["base"], [1, 2], None))]})
    emb, base, a = rows(out, EMB), rows(m["base"], EMB), rows(m["a"], EMB)
    assert_close(emb["w5"], base["w5"] + 0.5 * (a["w5"] - base["w5"]))
    assert_close(emb["x1"], a["x1"])  # a's row stands in for the base's: no task vector
    assert torch.count_nonzero(emb["y1"]) == 0  # neither the base nor a has it
    head, base, b = rows(out, HEAD), rows(m["base"], HEAD), rows(m["b"], HEAD)
    assert_close(head["w5"], base["w5"] + 0.25 * (b["w5"] - base["w5"]))
    assert_close(head["w97"], base["w97"])
    assert_close(head["y1"], b["y1"])
    assert torch.count_nonzero(head["x1"]) == 0


def test_native_recipe_slices_with_a_tokenizer_and_dry_run(vocab_models, tmp_path):
    """Our recipe form; without a base the first input's tokenizer starts the union."""
    from malleable.merge.engine import describe, plan_merge

    a, b = str(vocab_models["a"]), str(vocab_models["b"])
    recipe = {"method": "passthrough", "inputs": [{"path": b}, {"path": a}], "tokenizer": {"source": "union"},
              "slices": [{"input": 1, "layers": [0, 1]}, {"input": 0, "layers": [0, 2]}]}
    out = merge(tmp_path, recipe)
    vocab = AutoTokenizer.from_pretrained(out).get_vocab()
    assert all(vocab[t] == i for t, i in AutoTokenizer.from_pretrained(b).get_vocab().items())
    assert len(vocab) == 108
    text = describe(plan_merge(load_recipe(tmp_path / "mk.yml")))
    assert "vocabulary: 108 tokens (tokenizer source union), 108 embedding rows" in text and "layers: 3" in text


@pytest.mark.parametrize("keys, written", [({"dtype": "bfloat16"}, torch.bfloat16),
                                           ({"dtype": "float32", "out_dtype": "float16"}, torch.float16),
                                           ({"out_dtype": "bfloat16", "legacy": True}, torch.bfloat16)])
def test_slices_with_a_tokenizer_write_the_dtype_into_config(vocab_models, tmp_path, keys, written):
    """config.json's dtype (and a donor's legacy torch_dtype key) names the written tensors' dtype."""
    m = dict(vocab_models)
    if keys.pop("legacy", False):  # a donor whose config.json says torch_dtype (transformers < 5)
        shutil.copytree(m["base"], tmp_path / "legacy")
        cfg = json.loads((tmp_path / "legacy" / "config.json").read_text())
        cfg["torch_dtype"] = cfg.pop("dtype")
        (tmp_path / "legacy" / "config.json").write_text(json.dumps(cfg))
        m["base"] = tmp_path / "legacy"
    out = merge(tmp_path, {"merge_method": "passthrough", "base_model": str(m["base"]), "tokenizer_source": "union",
                           "slices": [slice_of((m["a"], [0, 2], None)), slice_of((m["b"], [1, 2], None))], **keys})
    cfg = json.loads((out / "config.json").read_text())
    key = "dtype" if "dtype" in cfg else "torch_dtype"
    assert cfg[key] == str(written).removeprefix("torch.") and not ("dtype" in cfg and "torch_dtype" in cfg)
    got = load_file(out / "model.safetensors")
    assert {t.dtype for t in got.values()} == {written}
    assert_close(rows(out, EMB)["x1"].float(), rows(m["a"], EMB)["x1"].to(written).float(), rtol=0, atol=0)
    assert AutoModelForCausalLM.from_pretrained(out).dtype == written


def test_a_token_source_outside_the_tensors_models_is_refused(vocab_models, tmp_path):
    """x1's row comes from a, but lm_head merges only the last slice's b: mergekit stops mid-merge with a
    ValueError; we refuse before any work."""
    m = vocab_models
    data = {"merge_method": "passthrough", "base_model": str(m["base"]),
            "tokenizer": {"source": "union", "tokens": {"x1": {"source": str(m["a"])}}},
            "slices": [slice_of((m["a"], [0, 2], None)), slice_of((m["b"], [1, 2], None))]}
    (tmp_path / "mk.yml").write_text(yaml.safe_dump(data))
    out = tmp_path / "out"
    refused(["merge", tmp_path / "mk.yml", out], out=out, inputs=[m["a"], m["b"]],
            mentions=["tokenizer.tokens.x1.source", "not one of the models merged into 'lm_head.weight'"])


def test_a_per_slice_base_model_on_a_copied_slice_changes_nothing(vocab_models, tmp_path):
    """mergekit's slices[].base_model on a slice that only copies layers (passthrough reads no base): the output is
    the same as without it."""
    m = vocab_models
    outs = []
    for n, extra in enumerate(({}, {"base_model": str(m["base"])})):
        data = {"merge_method": "passthrough", "base_model": str(m["base"]), "tokenizer_source": "union",
                "slices": [slice_of((m["a"], [0, 2], None)), {**slice_of((m["b"], [1, 2], None)), **extra}]}
        (tmp_path / f"mk{n}.yml").write_text(yaml.safe_dump(data))
        run_merge(tmp_path / f"mk{n}.yml", tmp_path / f"out{n}", progress=False)
        outs.append(load_file(tmp_path / f"out{n}" / "model.safetensors"))
    assert outs[0].keys() == outs[1].keys() and all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0])
