"""RAIN-Merging: the null-space projection, the GQA grouping, the closed-form coefficients and the CLI path on a
tiny random Llama with grouped-query attention (4 query heads, 2 KV heads)."""

from __future__ import annotations

import json
import random

import pytest
import torch
import yaml
from conftest import TINY, save_finetune, tiny_llama, tiny_tokenizer, tree_digest
from typer.testing import CliRunner

from malleable.cli import app
from malleable.merge import rain
from malleable.merge import rain_nullspace as ns

P = rain.rain_params({})


def tokenizer():
    tok = tiny_tokenizer()
    tok.add_tokens(["<think>", "</think>"])
    return tok


def words(rng, n):
    return " ".join(f"w{rng.randrange(10, 100)}" for _ in range(n))


def reasoning_rows(n=12, seed=0):
    rng = random.Random(seed)
    return [{"text": f"<user> {words(rng, 5)} <assistant> <think> {words(rng, 9)} </think> {words(rng, 4)}"}
            for _ in range(n)]


def instruction_rows(n=6, seed=1):
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        ask, related, unrelated = words(rng, 3), words(rng, 2), words(rng, 2)
        text = f"<user> {words(rng, 2)} {ask} {words(rng, 2)} {related} <assistant> <think> {words(rng, 4)} " \
               f"</think> {related} {unrelated}"
        rows.append({"text": text, "related_prompt_list": [{"prompt_spans": [ask], "response_spans": [related],
                                                            "unrelated_response_spans": [unrelated]}]})
    return rows


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("rain")
    base = tiny_llama(0)
    base.save_pretrained(root / "base")
    tokenizer().save_pretrained(root / "base")
    for name, seed, scale in (("reasoning", 1, 0.02), ("instruction", 2, 0.05)):
        save_finetune(base, root / name, seed=seed, scale=scale)
        tokenizer().save_pretrained(root / name)
    write_jsonl(root / "reasoning.jsonl", reasoning_rows())
    write_jsonl(root / "instruction.jsonl", instruction_rows())
    return root


def recipe(root, **parameters) -> dict:
    return {"method": "rain", "base": str(root / "base"),
            "inputs": [{"path": str(root / "reasoning")}, {"path": str(root / "instruction")}],
            "data": {"train": str(root / "reasoning.jsonl"), "validation": str(root / "instruction.jsonl")},
            "parameters": parameters}


def invoke(root, r: dict, out, *extra):
    (root / "r.yaml").write_text(yaml.safe_dump(r))
    return CliRunner().invoke(app, ["merge", str(root / "r.yaml"), str(out), "-q", *extra])


def test_projection_meets_the_constraints_and_no_rows_keep_tau():
    g = torch.Generator().manual_seed(0)
    tau = torch.randn(16, 64, generator=g)
    rows = ns.Rows()
    for _ in range(40):
        rows.add(torch.randn(16, generator=g), torch.randn(64, generator=g), 0.25)
    out, before, after = ns.project(tau, rows, 1e-4)
    assert before > 1 and after / before < 1e-4
    assert 0.5 < float(out.norm() / tau.norm()) < 1  # only the constrained directions are removed
    same, b0, a0 = ns.project(tau, ns.Rows(), 1e-4)
    assert same is tau and b0 == a0 == 0.0


def test_kv_head_is_hf_repeat_kv_grouping():
    from transformers.models.llama.modeling_llama import repeat_kv

    heads, kv = 8, 2
    k = torch.arange(kv).float().view(1, kv, 1, 1).expand(1, kv, 3, 4)
    expanded = repeat_kv(k, heads // kv)  # what query head h attends with
    for h in range(heads):
        assert int(expanded[0, h, 0, 0]) == ns.kv_head(h, heads, kv)
    assert any(ns.kv_head(h, heads, kv) != h % kv for h in range(heads))  # the authors' mapping differs


def _logits(model, ids, pairs):
    """Every query head's real attention logit at each (query, key) pair, from the model's own rotated q and k."""
    f = ns.capture(model, ids, [0])[0]
    heads = model.config.num_attention_heads
    g = [ns.kv_head(h, heads, model.config.num_key_value_heads) for h in range(heads)]
    return torch.stack([torch.stack([f["q"][h, i] @ f["k"][g[h], j] for i, j in pairs]) for h in range(heads)])


@pytest.mark.parametrize("proj, mapping", [("k", "ours"), ("k", "authors"), ("q", "ours")])
def test_gqa_constraints_reach_the_kv_head_each_query_head_reads(work, proj, mapping, monkeypatch):
    from transformers import AutoModelForCausalLM

    tok = tokenizer()
    spec = type("Spec", (), {"text_field": "text", "max_length": 64})
    samples = ns.reasoning_samples(work / "reasoning.jsonl", tok, spec, P, random.Random(0))
    model = AutoModelForCausalLM.from_pretrained(work / "reasoning", attn_implementation="eager").eval()
    with monkeypatch.context() as m:
        if mapping == "authors":  # query head h constrains KV head h % kv (their code)
            m.setattr(ns, "kv_head", lambda h, heads, kv: h % kv)
        rows = ns.layer_rows(model, samples, [0], P, proj, seed=0)[0]
    w = model.model.layers[0].self_attn.get_submodule(f"{proj}_proj").weight
    hd = model.model.layers[0].self_attn.head_dim
    tau = torch.randn(w.shape, generator=torch.Generator().manual_seed(3)) * 0.1
    projected = tau.clone()
    for g in range(w.shape[0] // hd):  # KV heads for k, query heads for q
        projected[g * hd:(g + 1) * hd], _, _ = ns.project(tau[g * hd:(g + 1) * hd], rows[f"{proj}.{g}"], 1e-4)
    s = samples[0]
    before = _logits(model, s.ids, s.pairs[:8])
    with torch.no_grad():
        w += tau
    raw = _logits(model, s.ids, s.pairs[:8]) - before
    with torch.no_grad():
        w += projected - tau
    kept = _logits(model, s.ids, s.pairs[:8]) - before
    ratio = kept.norm(dim=1) / raw.norm(dim=1)  # per query head
    if mapping == "ours":
        assert float(ratio.max()) < 1e-3, ratio
    else:
        assert float(ratio.max()) > 0.1, ratio  # some query head's logits move: its real KV head was not constrained


def test_alpha_closed_form_on_hand_numbers():
    b = torch.tensor([1.0, -2.0, 10.0, 0.0])
    H = torch.tensor([2.0, 1.0, 1.0, 0.9])
    alpha = rain.closed_form_alpha(b, H, P)
    assert torch.allclose(alpha, torch.tensor([1.1 / 2.1, 0.0, 1.5, 0.1 / 1.0]))


def test_attention_mass_counts_instruction_rows_over_spans(work):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(work / "reasoning", attn_implementation="eager").eval()
    sample = ns.InstructionSample(ids=[5, 6, 7, 8], instructions=[{"I": [2, 3], "R": [0, 1], "U": [2], "nR": 2,
                                                                    "nU": 1}], unrelated=[3], n_unrelated=1)
    a, u = rain.attention_mass(model, [sample], [1])
    attn = {}
    hook = model.model.layers[1].self_attn.register_forward_hook(lambda m, i, o: attn.update(A=o[1][0]))
    model(input_ids=torch.tensor([[5, 6, 7, 8]]))
    hook.remove()
    A = attn["A"].double()
    assert torch.allclose(a[0], A[:, 2:4, 0:2].sum((1, 2)) / 2)
    assert torch.allclose(u[0], A[:, 2:4, 2].sum(1) + A[:, 2:4, 3].sum(1))


def test_merge_cli_dry_run_then_a_loadable_model(work, tmp_path):
    from transformers import AutoModelForCausalLM

    before = [tree_digest(work / n) for n in ("base", "reasoning", "instruction")]
    dry = invoke(work, recipe(work), tmp_path / "dry", "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert "q_proj (per head) 96" in dry.stdout and "k_proj (per KV head) 192" in dry.stdout, dry.stdout
    assert "v_proj (per KV head) 192" in dry.stdout and "down_proj 96" in dry.stdout
    assert not (tmp_path / "dry").exists()
    out = tmp_path / "out"
    result = invoke(work, recipe(work, layers_tail=1, lambda_ridge=1e-8), out)  # tiny features: a tiny ridge
    assert result.exit_code == 0, result.output
    merged = AutoModelForCausalLM.from_pretrained(out).state_dict()
    reasoning = AutoModelForCausalLM.from_pretrained(work / "reasoning").state_dict()
    report = json.loads((out / "report.json").read_text())["rain"]
    assert report["layers"] == [1] and len(report["alpha"][0]) == 4
    assert 0 < report["residual_ratio_max"] < 1e-2, report["residual_ratio_max"]
    assert {k for k in report["residual"]} >= {"model.layers.1.self_attn.k_proj.weight[1]",
                                               "model.layers.1.mlp.down_proj.weight"}
    for name, t in merged.items():  # layer 0, embeddings, norms, lm_head: the reasoning model's
        if "layers.1." not in name or "norm" in name:
            assert torch.equal(t, reasoning[name]), name
    assert not torch.equal(merged["model.layers.1.self_attn.q_proj.weight"],
                           reasoning["model.layers.1.self_attn.q_proj.weight"])
    assert [tree_digest(work / n) for n in ("base", "reasoning", "instruction")] == before


def test_no_constraints_and_alpha_one_give_task_arithmetic(work, tmp_path):
    from transformers import AutoModelForCausalLM

    none = {k: 0 for k in ("q_rows", "k_rows", "v_rows", "o_rows", "ffn_rows")}
    result = invoke(work, recipe(work, coefficients=False, **none), tmp_path / "out")
    assert result.exit_code == 0, result.output
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out").state_dict()
    sds = {n: AutoModelForCausalLM.from_pretrained(work / n).state_dict() for n in ("base", "reasoning", "instruction")}
    for name, t in merged.items():
        if any(m in name for m in ns.PROJ.values()):
            want = sds["reasoning"][name] + (sds["instruction"][name] - sds["base"][name])
            assert torch.allclose(t, want, atol=1e-6), name
        else:
            assert torch.equal(t, sds["reasoning"][name]), name


def test_bad_input_is_one_line_exit_2_nothing_written(work, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    odd = tmp_path / "odd"
    LlamaForCausalLM(LlamaConfig(**{**TINY, "intermediate_size": 96})).save_pretrained(odd)
    tokenizer().save_pretrained(odd)
    rows = reasoning_rows(4)
    rows[2] = {"text": "<user> w11 w12 <assistant> w13 w14"}
    write_jsonl(tmp_path / "noboundary.jsonl", rows)
    (tmp_path / "empty.jsonl").write_text("\n")
    r = recipe(work)
    cases = [
        ({**r, "data": {**r["data"], "train": str(tmp_path / "noboundary.jsonl")}}, "noboundary.jsonl line 3"),
        ({**r, "data": {**r["data"], "train": str(tmp_path / "empty.jsonl")}}, "empty"),
        ({**r, "data": {**r["data"], "validation": str(tmp_path / "empty.jsonl")}}, "empty"),
        ({**r, "inputs": [r["inputs"][0], {"path": str(odd)}]}, "has shape [64, 96]"),
        ({**r, "inputs": r["inputs"][:1]}, "exactly 2"),
        (recipe(work, merge_types="qx"), "parameters.merge_types"),
        (recipe(work, layers_tail=3), "parameters.layers_tail"),
        ({k: v for k, v in r.items() if k != "data"}, "data"),
        ({**r, "data": {"train": r["data"]["train"]}}, "data.validation"),
    ]
    for case, mentions in cases:
        for extra in ((), ("--dry-run",)):
            out = tmp_path / "out"
            result = invoke(work, case, out, *extra)
            assert result.exit_code == 2, (mentions, result.output, result.exception)
            assert result.stderr.count("\n") == 1 and mentions in result.stderr, (mentions, result.stderr)
            assert not out.exists()
