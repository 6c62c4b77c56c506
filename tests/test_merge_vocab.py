"""Vocabulary merging (mergekit's tokenizer_source and tokenizer:), on tiny Llamas whose tokenizers differ.

base: <pad> <unk> <s> </s> w0..w99 (104 tokens); a: the same plus added x1, x2 and special <sp> (107); b: w0..w95
plus x2, y1 (102). Each embedding has one row per token. Expected rows are written out per token from mergekit's
rules (tokenizer/embed.py), not recomputed by the code under test; bench/mergekit_parity.py runs mergekit itself.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from torch.testing import assert_close
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

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
