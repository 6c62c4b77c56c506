#!/usr/bin/env python
"""Parity of malleable's mergekit methods with mergekit 0.1.5 itself, on the same mergekit YAML.

For each method: tiny random Llama checkpoints (a base and three seeded "fine-tunes", 4 layers, float32, saved
with save_pretrained) and one mergekit YAML per case (the method's main parameters at non-default values; slerp
also with a per-layer `t` gradient inside a filter list, the form published merges use). Both tools run as
subprocesses on the same file:

    mergekit-yaml RECIPE OUT --random-seed 0 --no-copy-tokenizer --quiet    (/work/mergekit-venv, CPU)
    python -m malleable merge RECIPE OUT -q                                  (this repo's sources)

and every tensor of the two outputs is compared in float32: max |a - b|, and whether every element is within
1e-5 relative (|a - b| <= 1e-5 * |a| + 1e-7). Random methods (della, della_linear) run twice: once with
`torch.bernoulli` replaced, in BOTH tools, by the same deterministic stand-in (keep an entry where its
probability exceeds a fixed low-discrepancy sequence over its position), which compares everything except the
random draws exactly (probabilities, rank normalisation, L1 rescale, sign election, normalisation); and once
with their own RNGs, compared statistically (mean |merged - base| over all tensors, which should agree to a
few percent).

Usage:
  bench/setup_mergekit.sh                   # once: mergekit 0.1.5 in /work/mergekit-venv
  PYTHONPATH=src python bench/mergekit_parity.py [--only slerp,nearswap] [--name RESULTS]
Writes bench/results/mergekit_parity.{json,md} (with --only: mergekit_parity_partial, or RESULTS).
The vocabulary-merging cases with slices (vocab_slices_*) were added after the last full run; their rows are in
bench/results/mergekit_parity_vocab_slices.{json,md}; the per-slice base_model cases (*_slice_bases) in
bench/results/mergekit_parity_slice_bases.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, _version, machine, write_results  # noqa: E402

MERGEKIT_VENV = Path(os.environ.get("MERGEKIT_VENV", "/work/mergekit-venv"))
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=128, max_position_embeddings=64, tie_word_embeddings=False)
RTOL, ATOL = 1e-5, 1e-7
BF16_RTOL = 2.0 ** -7  # one bfloat16 ulp, relative: both tools compute in float32 and round once

# torch.bernoulli stand-in for the deterministic della comparison: the same in both tools, so the masks agree
# wherever the keep probabilities agree. Injected with `python -c` before either tool imports its merge code.
PATCH = ("import torch\n"
         "def _bernoulli(p, *a, **k):\n"
         "    u = torch.frac(torch.arange(1, p.numel() + 1, dtype=torch.float64) * 0.6180339887498949)\n"
         "    return (p.double().reshape(-1) > u).to(p.dtype).reshape(p.shape)\n"
         "torch.bernoulli = _bernoulli\n")


def build_models(root: Path) -> dict[str, Path]:
    """A base and three fine-tunes (base + seeded noise of scale 0.02), as tests/conftest.py builds them, in
    float32 (`base`, `ft0`..) and the same rounded to bfloat16 (`base_bf16`, `ft0_bf16`..)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(**TINY)).eval()
    out = {}
    for i in range(-1, 3):
        name = "base" if i < 0 else f"ft{i}"
        model = base
        if i >= 0:
            g = torch.Generator().manual_seed(100 + i)
            sd = {k: v + torch.randn(v.shape, generator=g) * 0.02 for k, v in base.state_dict().items()}
            model = LlamaForCausalLM(LlamaConfig(**TINY)).eval()
            model.load_state_dict(sd)
        model.save_pretrained(root / name)
        model.to(torch.bfloat16).save_pretrained(root / f"{name}_bf16")
        out[name], out[f"{name}_bf16"] = root / name, root / f"{name}_bf16"
    word_tokenizer().save_pretrained(root / "base")  # for the chat_template cases (mergekit reserialises it)
    # a Qwen3 (its config lists layer_types, one per layer) for a frankenmerge that must re-lay them out
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(1)
    qcfg = Qwen3Config(**{k: v for k, v in TINY.items()}, head_dim=16,
                       layer_types=["full_attention", "sliding_attention"] * 2, sliding_window=16,
                       use_sliding_window=True, max_window_layers=2)
    Qwen3ForCausalLM(qcfg).eval().save_pretrained(root / "qwen3")
    out["qwen3"] = root / "qwen3"
    # models whose tokenizers differ, for vocabulary merging (one embedding row per token, independent seeds):
    # v_base w0..w99 (104 tokens), v_a the same plus x1, x2 and special <sp>, v_b w0..w95 plus x2, y1,
    # v_big 514 tokens (for pad_to_multiple_of)
    for seed, (name, tok) in enumerate({"v_base": word_tokenizer(), "v_a": word_tokenizer(100, ["x1", "x2"], ["<sp>"]),
                                        "v_b": word_tokenizer(96, ["x2", "y1"]), "v_big": word_tokenizer(510)}.items()):
        torch.manual_seed(10 + seed)
        LlamaForCausalLM(LlamaConfig(**{**TINY, "vocab_size": len(tok)})).eval().save_pretrained(root / name)
        tok.save_pretrained(root / name)
        out[name] = root / name
    return out


def word_tokenizer(n_words=100, extra=(), special=()):
    """A word-level tokenizer (as tests/conftest.py builds one), with no chat template of its own; `extra` and
    `special` tokens added after the words."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(n_words)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    out = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                  eos_token="</s>")
    if extra:
        out.add_tokens(list(extra))
    if special:
        out.add_special_tokens({"additional_special_tokens": list(special)})
    return out


def _models(m, names_params):
    lines = ["models:"]
    for name, params in names_params:
        lines.append(f"  - model: {m[name]}")
        if params:
            lines.append(f"    parameters: {json.dumps(params)}")
    return lines


def cases(m: dict[str, Path]) -> dict[str, dict]:
    """name -> {yaml, random, note}. YAML is written by hand (JSON flow style for the parameters)."""
    c: dict[str, dict] = {}

    def add(name, lines, random=False, note="", dtype="float32", rtol=RTOL, info=False, tokenizer=False,
            layers=None, multi=False, vocab=False):
        c[name] = {"yaml": "\n".join(lines + ([f"dtype: {dtype}"] if dtype else [])) + "\n", "random": random,
                   "note": note, "rtol": rtol, "info": info, "tokenizer": tokenizer or vocab, "layers": layers,
                   "multi": multi, "vocab": vocab}

    def src(model, layers, params=None):
        out = ["  - sources:", f"      - model: {m[model]}", f"        layer_range: {json.dumps(layers)}"]
        return out + ([f"        parameters: {json.dumps(params)}"] if params else [])

    add("slerp", [
        "merge_method: slerp", f"base_model: {m['base']}",
        "slices:", "  - sources:",
        f"      - model: {m['base']}", "        layer_range: [0, 4]",
        f"      - model: {m['ft0']}", "        layer_range: [0, 4]",
        "parameters:", "  t:",
        "    - filter: self_attn", "      value: [0, 0.5, 0.3, 0.7, 1]",
        "    - filter: mlp", "      value: [1, 0.5, 0.7, 0.3, 0]",
        "    - value: 0.35",
    ], note="slices form, t as per-filter per-layer gradients with a default")
    add("slerp_bf16", [
        "merge_method: slerp", f"base_model: {m['base_bf16']}",
        *_models(m, [("base_bf16", None), ("ft0_bf16", None)]),
        "parameters:", "  t:", "    - filter: mlp", "      value: [0.1, 0.9]", "    - value: [0.7, 0.3, 0.5]",
    ], dtype="bfloat16", rtol=BF16_RTOL,
        note="bfloat16 checkpoints and dtype (the usual published form); pass: within one bfloat16 ulp")
    add("slerp_scalar", ["merge_method: slerp", f"base_model: {m['base']}",
                         *_models(m, [("base", None), ("ft1", None)]), "parameters: {t: 0.8}"])
    add("nearswap", ["merge_method: nearswap", f"base_model: {m['base']}",
                     *_models(m, [("ft0", None)]), "parameters: {t: 0.015}"])
    add("model_stock", ["merge_method: model_stock", f"base_model: {m['base']}",
                        *_models(m, [("ft0", None), ("ft1", None), ("ft2", None)])])
    add("model_stock_filter_wise", ["merge_method: model_stock", f"base_model: {m['base']}",
                                    *_models(m, [("ft0", None), ("ft1", None), ("ft2", None)]),
                                    "parameters: {filter_wise: true}"])
    add("breadcrumbs", ["merge_method: breadcrumbs", f"base_model: {m['base']}",
                        *_models(m, [("ft0", {"weight": 0.6, "density": 0.7, "gamma": 0.05}),
                                     ("ft1", {"weight": 0.3, "density": 0.5}),
                                     ("ft2", {"weight": 0.4, "density": 0.9, "gamma": 0.02})]),
                        "parameters: {gamma: 0.1, lambda: 1.3, normalize: true, rescale: true}"])
    add("breadcrumbs_ties", ["merge_method: breadcrumbs_ties", f"base_model: {m['base']}",
                             *_models(m, [("ft0", {"weight": 0.6, "density": 0.7, "gamma": 0.05}),
                                          ("ft1", {"weight": 0.5, "density": 0.5}),
                                          ("ft2", {"weight": 0.4, "density": 0.9})]),
                             "parameters: {gamma: 0.03, lambda: 0.9}"])
    add("sce", ["merge_method: sce", f"base_model: {m['base']}",
                *_models(m, [("ft0", None), ("ft1", None), ("ft2", None)]), "parameters: {select_topk: 0.4}"])
    add("nuslerp", ["merge_method: nuslerp", f"base_model: {m['base']}",
                    *_models(m, [("ft0", {"weight": 0.3}), ("ft1", {"weight": 0.5})])],
        note="with a base: slerp of the task vectors, flattened (mergekit's default)")
    add("nuslerp_rows_no_base", ["merge_method: nuslerp",
                                 *_models(m, [("ft0", {"weight": [0.2, 0.8]}), ("ft1", {"weight": 0.6})]),
                                 "parameters: {nuslerp_flatten: false}"],
        note="no base: slerp of the weights, row by row; weight as a per-layer gradient")
    add("nuslerp_columns", ["merge_method: nuslerp", f"base_model: {m['base']}",
                            *_models(m, [("ft0", {"weight": 0.7}), ("ft2", {"weight": 0.4})]),
                            "parameters: {nuslerp_flatten: false, nuslerp_row_wise: true}"])
    add("multislerp", ["merge_method: multislerp", f"base_model: {m['base']}",
                       *_models(m, [("ft0", {"weight": 0.5}), ("ft1", {"weight": 0.3}), ("ft2", {"weight": 0.9})])])
    add("multislerp_no_base", ["merge_method: multislerp",
                               *_models(m, [("ft0", {"weight": 1.0}), ("ft1", {"weight": 2.0})]),
                               "parameters: {normalize_weights: false}"])
    add("karcher", ["merge_method: karcher", f"base_model: {m['base']}",
                    *_models(m, [("ft0", None), ("ft1", None), ("ft2", None)]),
                    "parameters: {max_iter: 20, tol: 1.0e-6}"], note="base_model is one more input, as in mergekit")
    add("arcee_fusion", ["merge_method: arcee_fusion", f"base_model: {m['base']}", *_models(m, [("ft1", None)])])
    add("ram", ["merge_method: ram", f"base_model: {m['base']}",
                *_models(m, [("ft0", None), ("ft1", None), ("ft2", None)]), "parameters: {epsilon: 0.02}"],
        note="epsilon 0.02 (the fine-tunes' noise scale): a mix of unique and shared entries")
    add("ramplus_tl", ["merge_method: ramplus_tl", f"base_model: {m['base']}",
                       *_models(m, [("ft0", None), ("ft1", None), ("ft2", None)]),
                       "parameters: {epsilon: 0.025, r: 0.5, alpha: 0.9}"])
    add("ramplus_tl_defaults", ["merge_method: ramplus_tl", f"base_model: {m['base']}",
                                *_models(m, [("ft0", None), ("ft2", None)])],
        note="mergekit's defaults (r 0.1, alpha 0.2, epsilon 1e-5)")
    # Informational (not pass/fail): with `dtype: bfloat16`, mergekit's group methods compute in bfloat16 (the task
    # vectors, the sort, the sums); malleable computes in float32 and rounds once at the end.
    bf16_note = "informational: mergekit computes this method in bfloat16, malleable in float32 (rounded once)"
    add("model_stock_bf16", ["merge_method: model_stock", f"base_model: {m['base_bf16']}",
                             *_models(m, [("ft0_bf16", None), ("ft1_bf16", None), ("ft2_bf16", None)])],
        dtype="bfloat16", rtol=BF16_RTOL, info=True, note=bf16_note)
    add("breadcrumbs_ties_bf16", ["merge_method: breadcrumbs_ties", f"base_model: {m['base_bf16']}",
                                  *_models(m, [("ft0_bf16", {"weight": 0.6, "density": 0.7}),
                                               ("ft1_bf16", {"weight": 0.5, "density": 0.5})]),
                                  "parameters: {gamma: 0.03}"], dtype="bfloat16", rtol=BF16_RTOL, info=True,
        note=bf16_note)
    add("nearswap_bf16", ["merge_method: nearswap", f"base_model: {m['base_bf16']}",
                          *_models(m, [("ft0_bf16", None)]), "parameters: {t: 0.015}"],
        dtype="bfloat16", rtol=BF16_RTOL, info=True, note=bf16_note)
    # passthrough and frankenmerges (layer slices stacked into a deeper model)
    add("passthrough_copy", ["merge_method: passthrough", *_models(m, [("ft1", {"scale": 0.5})])],
        note="one model, scaled by 0.5")
    add("passthrough_repeat", ["merge_method: passthrough", "slices:", *src("ft0", [0, 3]), *src("ft0", [1, 4])],
        note="a 4-layer model stacked as layers 0-2 then 1-3 (6 layers; layers 1 and 2 repeated)")
    add("passthrough_two_models", ["merge_method: passthrough", f"base_model: {m['base']}", "slices:",
                                   *src("ft0", [0, 2]), *src("ft1", [1, 3], {"scale": [
                                       {"filter": "o_proj", "value": 0.5}, {"filter": "down_proj", "value": [0.2, 1.0]},
                                       {"value": 1.0}]}),
                                   *src("ft2", [3, 4])],
        note="three models (embeddings from the first slice's, norm and lm_head from the last's), a filtered "
             "and per-layer scale in one slice, config from base_model")
    add("passthrough_truncate", ["merge_method: passthrough", "slices:", *src("ft2", [1, 3])],
        note="one slice of 2 of the 4 layers (layer pruning)")
    add("passthrough_dtypes", ["merge_method: passthrough", "slices:", *src("ft0", [0, 3]), *src("ft1", [2, 4]),
                               "out_dtype: float32"], dtype="bfloat16",
        note="dtype bfloat16 (inputs rounded to it), out_dtype float32 (written)")
    add("passthrough_fp16", ["merge_method: passthrough", "slices:", *src("ft0", [0, 2]), *src("ft0", [2, 4])],
        dtype="float16", note="dtype float16 (written float16; config.json says so)")
    add("passthrough_qwen3", ["merge_method: passthrough", "slices:", *src("qwen3", [0, 3]), *src("qwen3", [1, 4])],
        layers=("qwen3", [0, 1, 2, 1, 2, 3]),
        note="Qwen3, whose config lists layer_types: mergekit 0.1.5 stops (its config keeps 4 layer_types for 6 "
             "layers, which transformers refuses to save), so malleable's output is checked against the source "
             "layers themselves, and loaded and run")
    # merges over layer ranges: each slice merges several models' equally long ranges, slices stacked
    def msrc(pairs, params=None):
        out = ["  - sources:"]
        for model, layers, p in pairs:
            out += [f"      - model: {m[model]}", f"        layer_range: {json.dumps(layers)}"]
            out += [f"        parameters: {json.dumps(p)}"] if p else []
        return out + ([f"    parameters: {json.dumps(params)}"] if params else [])

    add("slerp_slices", ["merge_method: slerp", f"base_model: {m['base']}", "slices:",
                         *msrc([("base", [0, 2], None), ("ft0", [0, 2], None)], {"t": [0, 1]}),
                         *msrc([("base", [1, 4], None), ("ft1", [0, 3], None)],
                               {"t": [{"filter": "mlp", "value": 0.3}, {"value": [0.2, 0.8]}]})],
        note="slerp per slice (5 layers): t gradients run over each slice; the base's range differs from the "
             "other model's in the second slice")
    add("ties_slices", ["merge_method: ties", f"base_model: {m['base']}", "slices:",
                        *msrc([("ft0", [0, 2], {"weight": 0.7}), ("ft1", [0, 2], {"weight": 0.4}),
                               ("base", [0, 2], None)], {"density": 0.6}),
                        *msrc([("ft0", [2, 4], {"weight": 0.5, "density": 0.3}), ("ft2", [1, 3], {"weight": 0.5}),
                               ("base", [2, 4], None)]),
                        "parameters: {density: 0.8}"],
        note="ties over layer ranges; slice and per-source parameters over the top-level ones")
    add("linear_slices", ["merge_method: linear", "slices:",
                          *msrc([("ft0", [0, 3], {"weight": 2.0}), ("ft1", [1, 4], None)], {"weight": 0.5}),
                          *msrc([("ft2", [3, 4], {"weight": 1.0}), ("ft0", [0, 1], {"weight": 3.0})])],
        note="linear over layer ranges, no base; a slice-level weight for the sources without their own")
    add("task_arithmetic_slice_bases", ["merge_method: task_arithmetic", f"base_model: {m['base']}", "slices:",
                                        *msrc([("base", [0, 2], None), ("ft0", [0, 2], {"weight": 0.7})]),
                                        *msrc([("ft1", [2, 4], None), ("ft2", [1, 3], {"weight": 1.5})]),
                                        f"    base_model: {m['ft1']}"],
        note="a slice with its own base_model (ft1, at its own layer range) beside one on the top-level base")
    add("ties_slice_bases", ["merge_method: ties", "slices:",
                             *msrc([("ft0", [0, 2], {"weight": 0.6}), ("ft1", [0, 2], {"weight": 0.6}),
                                    ("base", [0, 2], None)], {"density": 0.5}),
                             f"    base_model: {m['base']}",
                             *msrc([("ft2", [2, 4], {"weight": 1.0}), ("ft0", [2, 4], None)], {"density": 0.7}),
                             f"    base_model: {m['ft0']}"],
        note="ties with no top-level base: each slice names its own base_model")
    add("multi", ["name: first", "merge_method: slerp", f"base_model: {m['base']}",
                  *_models(m, [("base", None), ("ft0", None)]), "parameters: {t: 0.3}", "dtype: float32", "---",
                  "name: second", "merge_method: ties", f"base_model: {m['base']}",
                  *_models(m, [("ft1", {"weight": 0.6, "density": 0.5}), ("ft2", {"weight": 0.4, "density": 0.7})]),
                  "dtype: float32", "---",
                  "merge_method: passthrough", "slices:", "  - sources:", "      - model: first",
                  "        layer_range: [0, 3]", "  - sources:", "      - model: second", "        layer_range: [1, 4]"],
        multi=True, note="mergekit-multi: two named merges, then a frankenmerge of them (mergekit-multi vs "
                         "`malleable merge` of the same three-document file)")
    add("linear_chat_literal", ["merge_method: linear", f"base_model: {m['base']}", *_models(m, [("base", {"weight": 1.0}), ("ft0", {"weight": 1.0})]),
                                "chat_template: \"{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\\n"
                                "{% endfor %}\""], tokenizer=True, note="a literal Jinja chat template")
    # vocabulary merging: rows compared token by token (mergekit's ids for tokens the base lacks follow hash order)
    add("vocab_union_linear", ["merge_method: linear", f"base_model: {m['v_base']}",
                               *_models(m, [("v_a", {"weight": 0.3}), ("v_b", {"weight": 0.5}),
                                            ("v_base", {"weight": 0.2})]), "tokenizer_source: union"], vocab=True,
        note="union of three vocabularies; missing rows from the one model that has the token, the base, or the mean")
    add("vocab_base_task_arithmetic", ["merge_method: task_arithmetic", f"base_model: {m['v_base']}",
                                       *_models(m, [("v_a", {"weight": 0.3}), ("v_b", {"weight": 0.5})]),
                                       "tokenizer_source: base"], vocab=True)
    add("vocab_model_source", ["merge_method: linear", *_models(m, [("v_a", {"weight": 0.3}), ("v_b", {"weight": 0.5})]),
                               f"tokenizer_source: {m['v_a']}"], vocab=True, note="no base; a model's tokenizer")
    add("vocab_tokens_ties", ["merge_method: ties", f"base_model: {m['v_base']}",
                              *_models(m, [("v_a", {"weight": 0.6, "density": 0.5}),
                                           ("v_b", {"weight": 0.5, "density": 0.7})]),
                              "tokenizer:", "  source: union", "  pad_to_multiple_of: 16", "  tokens:",
                              f"    x1: {{source: {m['v_a']}}}", "    w3: {source: {kind: zero}, force: true}",
                              f"    newtok: {{source: {{kind: model_token, model: {m['v_b']}, token: w5}}}}",
                              f"    y1: {{source: {{kind: model_token, model: {m['v_a']}, token_id: 7}}}}"],
        vocab=True, note="per-token sources (a model, zero forced, another token by name and by id), padded to 16")
    add("vocab_pad_514_to_528", ["merge_method: linear", *_models(m, [("v_big", {"weight": 1.0})]),
                                 "tokenizer: {pad_to_multiple_of: 16}"], vocab=True,
        note="a 514-token vocabulary padded to 528 rows (each model's mean row)")
    # vocabulary merging with slices: the embeddings merge the first slice's sources, lm_head the last slice's,
    # each laid out over the output vocabulary with the default rows of its own models
    two_slices = [*src("v_a", [0, 3]), *src("v_b", [1, 4])]
    add("vocab_slices_passthrough_union", ["merge_method: passthrough", f"base_model: {m['v_base']}", "slices:",
                                           *two_slices, "tokenizer_source: union"], vocab=True,
        note="frankenmerge of v_a and v_b over the union (base_model lends config.json and starts the union)")
    add("vocab_slices_passthrough_base", ["merge_method: passthrough", f"base_model: {m['v_base']}", "slices:",
                                          *two_slices, "tokenizer_source: base"], vocab=True,
        note="frankenmerge written with the base's tokenizer")
    add("vocab_slices_passthrough_model", ["merge_method: passthrough", "slices:", *src("v_a", [0, 3]),
                                           *src("v_b", [1, 4], {"scale": 0.5}), f"tokenizer_source: {m['v_b']}"],
        vocab=True, note="no base; v_b's tokenizer; the last slice's scale on lm_head")
    add("vocab_slices_linear_union", ["merge_method: linear", f"base_model: {m['v_base']}", "slices:",
                                      *msrc([("v_a", [0, 2], {"weight": 0.3}), ("v_b", [0, 2], {"weight": 0.7})]),
                                      *msrc([("v_b", [2, 4], {"weight": 0.6}), ("v_base", [1, 3], {"weight": 0.4})]),
                                      "tokenizer_source: union"], vocab=True,
        note="linear over two sources per slice; lm_head's default rows prefer the base, which is one of its models")
    add("vocab_slices_slerp_union", ["merge_method: slerp", f"base_model: {m['v_base']}", "slices:",
                                     *msrc([("v_base", [0, 2], None), ("v_a", [0, 2], None)], {"t": 0.3}),
                                     *msrc([("v_base", [2, 4], None), ("v_b", [1, 3], None)], {"t": [0.2, 0.9]}),
                                     "tokenizer_source: union"], vocab=True,
        note="slerp per slice between the base and v_a, then the base and v_b")
    add("vocab_slices_ties_tokens", ["merge_method: ties", f"base_model: {m['v_base']}", "slices:",
                                     *msrc([("v_a", [0, 4], {"weight": 0.6, "density": 0.5}),
                                            ("v_b", [0, 4], {"weight": 0.5, "density": 0.7}), ("v_base", [0, 4], None)]),
                                     *msrc([("v_b", [3, 4], {"weight": 0.6, "density": 0.5}),
                                            ("v_a", [2, 3], {"weight": 0.3}), ("v_base", [3, 4], None)]),
                                     "tokenizer:", "  source: union", "  pad_to_multiple_of: 16", "  tokens:",
                                     f"    x1: {{source: {m['v_a']}}}", "    w3: {source: {kind: zero}, force: true}",
                                     f"    newtok: {{source: {{kind: model_token, model: {m['v_b']}, token: w5}}}}"],
        vocab=True, note="ties over slices with per-token sources and padding to 16 rows")
    add("vocab_slices_bf16", ["merge_method: passthrough", f"base_model: {m['v_base']}", "slices:", *two_slices,
                              "tokenizer_source: union"], dtype="bfloat16", vocab=True,
        note="dtype bfloat16: written bfloat16, config.json says so")
    add("vocab_slices_out_fp16", ["merge_method: linear", f"base_model: {m['v_base']}", "slices:",
                                  *msrc([("v_a", [0, 2], {"weight": 0.5}), ("v_b", [0, 2], {"weight": 0.5})]),
                                  *msrc([("v_b", [2, 4], {"weight": 1.0}), ("v_a", [2, 4], {"weight": 0.5})]),
                                  "tokenizer_source: union", "out_dtype: float16"], vocab=True,
        note="computed in float32, written float16 (out_dtype); config.json says so")
    for name in ("della", "della_linear"):
        lines = ["merge_method: " + name, f"base_model: {m['base']}",
                 *_models(m, [("ft0", {"weight": 0.6, "density": 0.6, "epsilon": 0.1}),
                              ("ft1", {"weight": 0.5, "density": 0.4}),
                              ("ft2", {"weight": 0.3, "density": 0.7, "epsilon": 0.2})]),
                 "parameters: {epsilon: 0.25, lambda: 1.1}"]
        add(name, lines, random=True)
    return c


def run_tool(tool: str, recipe: Path, out: Path, patch: bool, tokenizer: bool = False, multi: bool = False) -> None:
    if tool == "mergekit" and multi:
        py = str(MERGEKIT_VENV / "bin" / "python")
        entry = ("from mergekit.scripts.multimerge import main\nimport sys\nsys.argv[0] = 'mergekit-multi'\n"
                 "main()\n")
        args = [str(recipe), "--intermediate-dir", str(out) + "-intermediate", "--out-path", str(out),
                "--random-seed", "0", "--quiet", "--no-write-model-card", "--no-copy-tokenizer"]
        env = dict(os.environ)
    elif tool == "mergekit":
        py = str(MERGEKIT_VENV / "bin" / "python")
        entry = "from mergekit.scripts.run_yaml import main\nimport sys\nsys.argv[0] = 'mergekit-yaml'\nmain()\n"
        args = [str(recipe), str(out), "--random-seed", "0", "--quiet", "--no-write-model-card"]
        args += [] if tokenizer else ["--no-copy-tokenizer"]
        env = dict(os.environ)
    else:
        py = sys.executable
        entry = "from malleable.cli import app\nimport sys\nsys.argv[0] = 'malleable'\napp()\n"
        args = ["merge", str(recipe), str(out), "-q"]
        env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    code = (PATCH if patch else "") + entry
    proc = subprocess.run([py, "-c", code, *args], capture_output=True, text=True, env=env, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"{tool} failed on {recipe.name} (exit {proc.returncode}):\n{proc.stderr[-3000:]}")


def read_all(d: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(f))
    return out


CONFIG_KEYS = ("num_hidden_layers", "dtype", "torch_dtype", "vocab_size", "layer_types", "max_window_layers")


def compare_config(mk_dir: Path, ours_dir: Path) -> dict:
    """The config.json keys that must agree (layer count, dtype, per-layer lists), and the dtypes written."""
    from safetensors import safe_open

    def dtypes(d):
        out = set()
        for f in d.glob("*.safetensors"):
            with safe_open(f, "pt") as fh:
                out |= {str(fh.get_slice(k).get_dtype()) for k in fh.keys()}
        return sorted(out)

    a, b = (json.loads((d / "config.json").read_text()) for d in (mk_dir, ours_dir))
    diff = {k: [a.get(k), b.get(k)] for k in CONFIG_KEYS if a.get(k) != b.get(k)}
    res = {"differing_keys": diff, "tensor_dtypes": [dtypes(mk_dir), dtypes(ours_dir)],
           "num_hidden_layers": b.get("num_hidden_layers"), "dtype": b.get("dtype", b.get("torch_dtype"))}
    res["pass"] = not diff and res["tensor_dtypes"][0] == res["tensor_dtypes"][1]
    return res


def compare_vocab(mk_dir: Path, ours_dir: Path, rtol: float = RTOL) -> dict:
    """Vocabulary merging: the same tokens (and added tokens' special flags), config.json's vocab_size and the row
    count, and every tensor, embedding and lm_head rows matched by token (padding rows by position)."""
    from transformers import AutoTokenizer

    toks = [AutoTokenizer.from_pretrained(d) for d in (mk_dir, ours_dir)]
    vocabs = [t.get_vocab() for t in toks]
    added = [{a.content: a.special for a in t.added_tokens_decoder.values()} for t in toks]
    sizes = [json.loads((d / "config.json").read_text())["vocab_size"] for d in (mk_dir, ours_dir)]
    a, b = read_all(mk_dir), read_all(ours_dir)
    order = sorted(vocabs[0])
    same = set(vocabs[0]) == set(vocabs[1])
    if same:
        for n in a:
            if a[n].shape[0] == sizes[0] and b[n].shape[0] == sizes[1] and (".embed_tokens." in n or "lm_head" in n):
                ia = [vocabs[0][t] for t in order] + list(range(len(order), sizes[0]))
                ib = [vocabs[1][t] for t in order] + list(range(len(order), sizes[1]))
                a[n], b[n] = a[n][ia], b[n][ib]
    res = compare(a, b, rtol) if same else {"pass": False}
    res.update({"same_tokens": same, "same_ids": vocabs[0] == vocabs[1], "same_added_flags": added[0] == added[1],
                "vocab_size": sizes, "tokens": len(vocabs[1])})
    res["pass"] = res["pass"] and res["same_added_flags"] and sizes[0] == sizes[1]
    return res


def compare_chat_template(mk_dir: Path, ours_dir: Path) -> dict:
    from transformers import AutoTokenizer

    a, b = (AutoTokenizer.from_pretrained(d).chat_template for d in (mk_dir, ours_dir))
    files = [sorted(p.name for p in d.iterdir() if "token" in p.name or "chat" in p.name) for d in (mk_dir, ours_dir)]
    return {"mergekit": a, "malleable": b, "files": files, "pass": a == b and a is not None}


def expected_stack(src_dir: Path, layers: list[int]) -> dict[str, torch.Tensor]:
    """The frankenmerge of one model by hand: output layer i is source layer layers[i], the rest copied."""
    import re

    src, out = read_all(src_dir), {}
    for name, t in src.items():
        m = re.search(r"\.layers\.(\d+)\.", name)
        if m is None:
            out[name] = t
            continue
        for i, j in enumerate(layers):
            if j == int(m.group(1)):
                out[name[:m.start(1)] + str(i) + name[m.end(1):]] = t
    return out


def loads_and_runs(d: Path, layers: list[int], src_dir: Path) -> dict:
    """Load the output with transformers, run a forward pass, and check the config's per-layer lists."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg, src = AutoConfig.from_pretrained(d), AutoConfig.from_pretrained(src_dir)
    model = AutoModelForCausalLM.from_pretrained(d).eval()
    with torch.no_grad():
        logits = model(torch.arange(8)[None]).logits
    want = [src.layer_types[j] for j in layers]
    return {"num_hidden_layers": cfg.num_hidden_layers, "layer_types": cfg.layer_types,
            "logits_finite": bool(torch.isfinite(logits).all()),
            "pass": cfg.num_hidden_layers == len(layers) and cfg.layer_types == want and
            bool(torch.isfinite(logits).all())}


def compare(mk: dict, ours: dict, rtol: float = RTOL) -> dict:
    res = {"only_in_mergekit": sorted(set(mk) - set(ours)), "only_in_malleable": sorted(set(ours) - set(mk))}
    max_abs, worst, n_bad, n_total, n_diff = 0.0, None, 0, 0, 0
    for n in sorted(set(mk) & set(ours)):
        a, b = mk[n].float(), ours[n].float()
        if a.shape != b.shape:
            res.setdefault("shape_mismatch", []).append(n)
            continue
        d = (a - b).abs()
        m = float(d.max()) if d.numel() else 0.0
        if m > max_abs or worst is None:
            max_abs, worst = max(m, max_abs), n
        n_bad += int((d > rtol * a.abs() + ATOL).sum())
        n_diff += int((d > 0).sum())
        n_total += d.numel()
    res.update({"max_abs_diff": max_abs, "worst_tensor": worst, "elements_outside_tolerance": n_bad,
                "elements_total": n_total, "elements_differing": n_diff, "rtol": rtol})
    res["pass"] = (n_bad == 0 and not res["only_in_mergekit"] and not res["only_in_malleable"]
                   and "shape_mismatch" not in res)
    return res


def mean_abs_delta(out: dict, base: dict) -> float:
    num = sum(float((out[n].float() - base[n].float()).abs().sum()) for n in base)
    return num / sum(base[n].numel() for n in base)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="", help="comma-separated case names")
    ap.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    ap.add_argument("--name", default=None, help="results file name (default: mergekit_parity, or "
                    "mergekit_parity_partial with --only)")
    args = ap.parse_args(argv)
    if not (MERGEKIT_VENV / "bin" / "mergekit-yaml").exists():
        raise SystemExit(f"no mergekit-yaml in {MERGEKIT_VENV}: run bench/setup_mergekit.sh first")
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        root = Path(tmp)
        models = build_models(root / "models")
        base = read_all(models["base"])
        all_cases = cases(models)
        only = [s for s in args.only.split(",") if s]
        results = {}
        for name, case in all_cases.items():
            if only and name not in only:
                continue
            recipe = root / f"{name}.yml"
            recipe.write_text(case["yaml"])
            row = {"yaml": case["yaml"], "note": case["note"], "informational": case["info"]}
            for patched in ([True, False] if case["random"] else [False]):
                outs, dirs = {}, {}
                if case["layers"]:  # mergekit cannot run it: check against the source layers directly
                    try:
                        run_tool("mergekit", recipe, root / f"out-{name}-mergekit", False)
                        row["mergekit"] = "ran"
                    except RuntimeError as e:
                        row["mergekit"] = "fails: " + str(e).strip().splitlines()[-1][-300:]
                    out = root / f"out-{name}-malleable"
                    run_tool("malleable", recipe, out, False)
                    src_key, layers = case["layers"]
                    row["against_source"] = compare(expected_stack(models[src_key], layers), read_all(out))
                    row["loads"] = loads_and_runs(out, layers, models[src_key])
                    break
                for tool in ("mergekit", "malleable"):
                    out = dirs[tool] = root / f"out-{name}-{tool}-{int(patched)}"
                    run_tool(tool, recipe, out, patched, case["tokenizer"], case["multi"])
                    outs[tool] = read_all(out)
                if case["random"] and not patched:
                    mk, ours = mean_abs_delta(outs["mergekit"], base), mean_abs_delta(outs["malleable"], base)
                    row["statistical"] = {"mean_abs_delta_mergekit": mk, "mean_abs_delta_malleable": ours,
                                          "relative_difference": abs(mk - ours) / mk, "pass": abs(mk - ours) / mk < 0.05}
                elif case["vocab"]:
                    row["vocab"] = compare_vocab(dirs["mergekit"], dirs["malleable"], case["rtol"])
                else:
                    row["deterministic" if not case["random"] else "fixed_draws"] = compare(
                        outs["mergekit"], outs["malleable"], case["rtol"])
                if not case["random"]:
                    row["config"] = compare_config(dirs["mergekit"], dirs["malleable"])
                if case["tokenizer"] and not case["vocab"]:
                    row["chat_template"] = compare_chat_template(dirs["mergekit"], dirs["malleable"])
            parts = [v for k, v in row.items() if k in ("deterministic", "fixed_draws", "statistical", "config", "vocab",
                                                         "chat_template", "against_source", "loads")]
            row["pass"] = all(p["pass"] for p in parts)
            results[name] = row
            verdict = "info" if case["info"] else "PASS" if row["pass"] else "FAIL"
            print(f"{name:26s} {verdict} "
                  + " ".join(f"{k}={v.get('max_abs_diff', v.get('relative_difference')):.3g}"
                             for k, v in row.items() if k in ("deterministic", "fixed_draws", "statistical",
                                                             "against_source", "vocab")
                             and ("max_abs_diff" in v or "relative_difference" in v))
                  + " ".join(f" {k}={'ok' if row[k]['pass'] else row[k]}" for k in ("config", "chat_template", "loads")
                             if k in row),
                  flush=True)
    data = {"benchmark": "mergekit_parity", "tolerance": {"rtol": RTOL, "atol": ATOL},
            "machine": machine({"mergekit": _version("mergekit", str(MERGEKIT_VENV / "bin" / "python")),
                                "torch (mergekit venv)": _version("torch", str(MERGEKIT_VENV / "bin" / "python"))}),
            "models": {"config": TINY, "dtype": "float32 (and bfloat16 copies for *_bf16 cases)",
                       "fine-tunes": "base + N(0, 0.02^2) noise, seeds 100-102"},
            "results": results}
    name = args.name or ("mergekit_parity" if not only else "mergekit_parity_partial")
    write_results(name, data, markdown(data))
    return 0 if all(r["pass"] for r in results.values() if not r["informational"]) else 1


def _tensor_cells(c: dict) -> str:
    """A comparison's three table cells: max |difference|, elements differing, elements outside the tolerance."""
    return (f"{c.get('max_abs_diff', float('nan')):.3g} | {c.get('elements_differing', '-')} | "
            f"{c.get('elements_outside_tolerance', '-')} of {c.get('elements_total', '-')}")


def markdown(data: dict) -> str:
    mach = data["machine"]
    v = mach["versions"]
    lines = ["# malleable vs mergekit: parity of the merge methods", "",
             f"Machine: {mach['cpu']}, {mach['cores']} cores; torch {v.get('torch')} (malleable), "
             f"{v.get('torch (mergekit venv)')} (mergekit); mergekit {v.get('mergekit')}; malleable git "
             f"{mach.get('malleable_git')}; {mach['date']}.", "",
             "Tiny random Llama (4 layers, hidden 64, float32, and the same rounded to bfloat16), a base and three "
             "fine-tunes (base + N(0, 0.02^2)). "
             "Both tools run the same mergekit YAML as subprocesses; every output tensor is compared in float32. "
             f"Pass: every element within {data['tolerance']['rtol']:g} relative "
             f"(|a - b| <= {data['tolerance']['rtol']:g} |a| + {data['tolerance']['atol']:g}); bfloat16 cases (bfloat16 "
             "checkpoints, `dtype: bfloat16`): within one bfloat16 ulp (2^-7 relative).", "",
             "Random methods (della, della_linear): `fixed draws` replaces torch.bernoulli in both tools by the same "
             "deterministic stand-in (a fixed low-discrepancy threshold per position), so everything but the random "
             "draws is compared element by element; `own RNGs` runs both tools unpatched and compares the mean "
             "|merged - base| over all tensors (pass: within 5%).", "",
             f"config.json rows: the keys {', '.join(CONFIG_KEYS)} and the written tensors' dtypes must be the same "
             "in both outputs.", "",
             "| case | compared | max abs diff | elements differing at all | elements outside tolerance | result |",
             "|---|---|---|---|---|---|"]
    for name, r in data["results"].items():
        if "against_source" in r:
            c = r["against_source"]
            lines.append(f"| {name} | every tensor vs its source layer (mergekit {r['mergekit']}) | "
                         f"{_tensor_cells(c)} | {'pass' if c['pass'] else 'FAIL'} |")
            ld = r["loads"]
            lines.append(f"| {name} | loads in transformers and runs; layer_types re-laid out: {ld['layer_types']} | "
                         f"- | - | - | {'pass' if ld['pass'] else 'FAIL'} |")
        for kind, label in (("deterministic", "every tensor"), ("fixed_draws", "every tensor, fixed draws")):
            if kind in r:
                c = r[kind]
                verdict = "informational" if r["informational"] else "pass" if c["pass"] else "FAIL"
                lines.append(f"| {name} | {label} | {_tensor_cells(c)} | {verdict} |")
        if "vocab" in r:
            c = r["vocab"]
            lines.append(f"| {name} | vocabulary: {c['tokens']} tokens (same set: {c['same_tokens']}, same ids: "
                         f"{c['same_ids']}, same special flags: {c['same_added_flags']}), vocab_size {c['vocab_size'][1]}"
                         f"; every tensor, rows matched by token | {_tensor_cells(c)} | "
                         f"{'pass' if c['pass'] else 'FAIL'} |")
        if "config" in r:
            c = r["config"]
            what = (f"config.json: num_hidden_layers {c['num_hidden_layers']}, dtype {c['dtype']}; tensors written "
                    f"as {c['tensor_dtypes'][1]}")
            diff = "; ".join(f"{k}: {v[0]} (mergekit) vs {v[1]}" for k, v in c["differing_keys"].items())
            lines.append(f"| {name} | {what} | {diff or 'same'} | - | - | {'pass' if c['pass'] else 'FAIL'} |")
        if "chat_template" in r:
            c = r["chat_template"]
            lines.append(f"| {name} | chat template as loaded by AutoTokenizer; files {c['files'][1]} | "
                         f"{'identical' if c['pass'] else 'DIFFERENT'} | - | - | {'pass' if c['pass'] else 'FAIL'} |")
        if "statistical" in r:
            s = r["statistical"]
            lines.append(f"| {name} | own RNGs: mean abs delta {s['mean_abs_delta_mergekit']:.4g} (mergekit) vs "
                         f"{s['mean_abs_delta_malleable']:.4g} | relative {s['relative_difference']:.3g} | - | - | "
                         f"{'pass' if s['pass'] else 'FAIL'} |")
    lines += ["", "Informational rows (`*_bf16` other than slerp_bf16) are not pass/fail: with `dtype: bfloat16` "
              "mergekit computes these methods (its group kernels; its slerp kernel alone upcasts to float32) in "
              "bfloat16 - the "
              "task vectors, their sort, the sums - while malleable computes in float32 and rounds once at the "
              "end, so the two differ by bfloat16 arithmetic; for breadcrumbs the rounded task vectors also change "
              "which entries the magnitude sort keeps.", "",
              "passthrough_qwen3: mergekit 0.1.5 stops on a frankenmerge of a model whose config lists "
              "`layer_types` (it sets num_hidden_layers but keeps the source's list, which transformers refuses to "
              "save), so that case checks malleable's output against the source layers (output layer i equals "
              "source layer j, renamed), the re-laid-out layer_types, and a forward pass in transformers.", "",
              "vocab_* rows: vocabulary merging. The output tokenizers must hold the same tokens with the same "
              "special flags and config.json the same vocab_size; embedding and lm_head rows are matched by token "
              "(padding rows by position), since ids may differ for tokens the base lacks: mergekit adds them in "
              "the order of a set of models and of each tokenizer's hash-ordered vocabulary (`same ids: False` in "
              "vocab_union_linear), malleable in input order, each tokenizer's tokens by id.", "",
              "Recipes: see `results.<case>.yaml` in mergekit_parity.json."]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
