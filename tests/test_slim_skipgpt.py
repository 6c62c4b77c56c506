"""SkipGPT on tiny random Llamas: open gates are the base model bit for bit; the really-skipped path equals the
layer run with the module removed for those tokens (prefill and cached decoding); the routers' file round-trips
and the loader applies it; the sparsity term pulls the mean gate to the target; bad input is one line, exit 2."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from typer.testing import CliRunner

from conftest import TINY, tiny_llama, tiny_tokenizer, tree_digest
from malleable.cli import app
from malleable.errors import InputError
from malleable.models.checkpoints import load_model
from malleable.models.routed import (ROUTERS_FILE, LayerRouters, install, load_routers, routing_of, save_routers,
                                     uninstall)
from malleable.recipes.slim import parse_slim_recipe
from malleable.slim.engine import slim
from test_slim import recipe, text


def routers_for(model, seed: int = 3, execute_bias: float = 0.0) -> nn.ModuleList:
    torch.manual_seed(seed)
    r = nn.ModuleList(LayerRouters(model.config.hidden_size) for _ in model.model.layers)
    with torch.no_grad():
        for layer in r:
            for t in (layer.attention, layer.mlp):
                t.out.bias.add_(torch.tensor([execute_bias, 0.0]))
    return r.eval().requires_grad_(False)


def gated_reference(model, routers, ids: torch.Tensor) -> torch.Tensor:
    """The layers written out with each module removed for the tokens its router sends around it: the
    authors' forward with the argmax decision as a 0/1 gate multiplying the module's output (every token's keys
    and values present), computed densely."""
    m = model.model
    x = m.embed_tokens(ids)
    pos = torch.arange(ids.shape[1])[None]
    emb = m.rotary_emb(x, position_ids=pos)
    for layer, r in zip(m.layers, routers):
        la, lm = r.attention(x), r.mlp(x)
        ga, gm = (la[..., 0] >= la[..., 1]).float(), (lm[..., 0] >= lm[..., 1]).float()
        h = layer.self_attn(hidden_states=layer.input_layernorm(x), position_embeddings=emb, attention_mask=None)[0]
        x = x + h * ga[..., None]
        x = x + layer.mlp(layer.post_attention_layernorm(x)) * gm[..., None]
    return model.lm_head(m.norm(x))


def decode(model, ids: torch.Tensor, prefill: int) -> torch.Tensor:
    """Logits of a prefill of `prefill` tokens then one token at a time through the KV cache."""
    out = model(input_ids=ids[:, :prefill], use_cache=True)
    steps = [out.logits]
    for t in range(prefill, ids.shape[1]):
        out = model(input_ids=ids[:, t:t + 1], cache=out.cache, use_cache=True)
        steps.append(out.logits)
    return torch.cat(steps, 1)


@torch.no_grad()
def test_open_gates_equal_the_base_bit_for_bit():
    model = tiny_llama(0)
    ids = torch.randint(0, 128, (2, 14), generator=torch.Generator().manual_seed(0))
    base, base_decode = model(input_ids=ids).logits, decode(model, ids[:1], 5)
    routing = install(model, routers_for(model), "open")
    assert torch.equal(model(input_ids=ids).logits, base)
    assert torch.equal(decode(model, ids[:1], 5), base_decode)
    uninstall(model)
    routing = install(model, routers_for(model, execute_bias=1e4), "hard")  # every argmax says execute
    assert torch.equal(model(input_ids=ids).logits, base)
    assert torch.equal(decode(model, ids[:1], 5), base_decode)
    assert routing.skip_rates() == {"attention": 0.0, "mlp": 0.0}


@torch.no_grad()
def test_skipped_path_equals_the_layer_without_the_module_for_those_tokens():
    model = tiny_llama(0)
    ids = torch.randint(0, 128, (3, 16), generator=torch.Generator().manual_seed(1))
    routers = routers_for(model, seed=5)
    want = gated_reference(model, routers, ids)
    routing = install(model, routers, "hard")
    got = model(input_ids=ids).logits
    rates = routing.skip_rates()
    assert 0.1 < rates["attention"] < 0.9 and 0.1 < rates["mlp"] < 0.9, rates  # really a mix of both paths
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # cached decoding: a token that skips attention still writes its key and value, so one token at a time
    # through the cache gives what the whole sequence gives
    for row in range(3):
        torch.testing.assert_close(decode(model, ids[row:row + 1], 4), want[row:row + 1], rtol=1e-5, atol=1e-5)
    # all routed around: the layer is the identity
    uninstall(model)
    install(model, routers_for(model, execute_bias=-1e4), "hard")
    x = model.model.embed_tokens(ids)
    assert torch.equal(model(input_ids=ids).logits, model.lm_head(model.model.norm(x)))


@torch.no_grad()
def test_a_left_padded_batch_and_generate_match_each_row_alone():
    model = tiny_llama(0)
    install(model, routers_for(model, seed=5), "hard")
    a = torch.randint(3, 128, (1, 10), generator=torch.Generator().manual_seed(0))
    b = torch.randint(3, 128, (1, 6), generator=torch.Generator().manual_seed(1))
    ids = torch.cat([a, torch.cat([torch.zeros(1, 4, dtype=torch.long), b], 1)])
    mask = torch.cat([torch.ones(1, 10), torch.cat([torch.zeros(1, 4), torch.ones(1, 6)], 1)]).long()
    out = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0)).logits
    torch.testing.assert_close(out[:1], model(input_ids=a).logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[1:, 4:], model(input_ids=b).logits, rtol=1e-5, atol=1e-5)
    both = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False)[:, 10:]
    assert both[0].tolist() == model.generate(a, max_new_tokens=5, do_sample=False)[0, 10:].tolist()
    assert both[1].tolist() == model.generate(b, max_new_tokens=5, do_sample=False)[0, 6:].tolist()


@torch.no_grad()
def test_a_deep_copy_routes_through_its_own_layers():
    import copy

    model = tiny_llama(0)
    install(model, routers_for(model, seed=5), "hard")
    twin = copy.deepcopy(model)
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(2))
    want = model(input_ids=ids).logits
    assert torch.equal(twin(input_ids=ids).logits, want)
    assert routing_of(twin) is not routing_of(model) and routing_of(twin).tokens == 2 * 12
    with torch.no_grad():
        twin.model.layers[1].mlp.down_proj.weight.zero_()
    assert torch.equal(model(input_ids=ids).logits, want)


def test_router_file_round_trips_and_rejects_a_foreign_model(tmp_path):
    model = tiny_llama(0)
    routers = routers_for(model, seed=9)
    save_routers(routers, tmp_path, {"sparsity": 0.25})
    back = load_routers(tmp_path, 64, 2)
    for a, b in zip(routers.state_dict().values(), back.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(InputError, match="do not fit the model"):
        load_routers(tmp_path, 64, 3)
    with pytest.raises(InputError, match="do not fit the model"):
        load_routers(tmp_path, 32, 2)


@torch.no_grad()
def test_mlp_only_routers_never_skip_attention_and_equal_the_full_pair_with_attention_open(tmp_path):
    model = tiny_llama(0)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    full = routers_for(model, seed=5)
    torch.manual_seed(0)
    mlp_only = nn.ModuleList(LayerRouters(model.config.hidden_size, ("mlp",)) for _ in model.model.layers)
    with torch.no_grad():
        for a, b in zip(mlp_only, full):
            a.mlp.load_state_dict(b.mlp.state_dict())
            b.attention.out.bias.copy_(torch.tensor([1e4, 0.0]))  # its attention router always says execute
    mlp_only.eval().requires_grad_(False)
    x = torch.randn(3, 5, model.config.hidden_size)
    assert torch.equal(mlp_only[0].decide(x), full[0].decide(x))
    want = gated_reference(model, full, ids)
    routing = install(model, mlp_only, "hard")
    torch.testing.assert_close(model(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)
    rates = routing.skip_rates()
    assert rates["attention"] == 0 and 0.1 < rates["mlp"] < 0.9, rates
    torch.testing.assert_close(decode(model, ids[:1], 4), want[:1], rtol=1e-5, atol=1e-5)
    # the file holds the MLP routers only, says so, and loads back as they were
    save_routers(mlp_only, tmp_path, {"sparsity": 0.25})
    back = load_routers(tmp_path, 64, 2)
    assert back[0].routed == ("mlp",) and set(back.state_dict()) == set(mlp_only.state_dict())
    assert all(k.split(".")[1] == "mlp" for k in back.state_dict())
    # training gates: the unrouted attention's are ones, the MLP's are samples
    ga, gm = mlp_only[0].gates(x, 1.0)
    assert torch.equal(ga, torch.ones(3, 5)) and set(gm.unique().tolist()) <= {0.0, 1.0}


def test_routing_the_mlp_alone_reaches_the_budget_through_the_mlp(tmp_path):
    """The authors' loss with the attention gates fixed open: a quarter of all module executions is half the MLP's."""
    root = tmp_path
    torch.manual_seed(1)
    LlamaForCausalLM(LlamaConfig(**(TINY | {"num_hidden_layers": 2}))).eval().save_pretrained(root / "model")
    tiny_tokenizer().save_pretrained(root / "model")
    (root / "cal.txt").write_text(text(0, 4000))
    (root / "held.txt").write_text(text(1))
    data = recipe(root, method="skipgpt", parameters={"sparsity": 0.25, "modules": "mlp", "steps": 30, "lr": 1e-2,
                                                      "batch_size": 4})
    data["calibration"] |= {"n_samples": 8}
    report = slim(parse_slim_recipe(data | {"evaluate": None}), root / "out", force=True, progress=False)
    last = report["routing"]["history"]["stage1"][-1]
    assert last["keep_attention"] == 1.0 and abs(last["keep_mlp"] - 0.5) < 0.15, last
    assert report["routing"]["calibration_skip_rates"]["attention"] == 0
    model = load_model(root / "out", "causal_lm", tiny_tokenizer().pad_token_id)
    assert routing_of(model).routers[0].routed == ("mlp",)
    assert "routing mlp" in (root / "out" / "report.md").read_text()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 4-layer tiny Llama slimmed with skipgpt through the real engine (a short toy run)."""
    root = tmp_path_factory.mktemp("skipgpt")
    torch.manual_seed(1)
    LlamaForCausalLM(LlamaConfig(**(TINY | {"num_hidden_layers": 4}))).eval().save_pretrained(root / "model")
    tiny_tokenizer().save_pretrained(root / "model")
    (root / "cal.txt").write_text(text(0, 4000))
    (root / "held.txt").write_text(text(1))
    data = recipe(root, method="skipgpt", parameters={"sparsity": 0.5, "steps": 40, "lr": 1e-2, "batch_size": 4})
    data["calibration"] |= {"n_samples": 16}
    report = slim(parse_slim_recipe(data), root / "out", force=True, progress=False)
    return root, report


def test_sparsity_term_pulls_the_mean_gate_to_the_target(trained):
    _, report = trained
    h = report["routing"]["history"]["stage1"]
    first, last = h[0], h[-1]
    assert first["temperature"] > 4 and last["temperature"] < 1.2  # annealed 5 -> 1
    keep = lambda row: (row["keep_attention"] + row["keep_mlp"]) / 2  # noqa: E731
    assert abs(keep(last) - 0.5) < 0.1, h
    # the loss controls the sampled gates; the argmax decisions follow them only as far as the routers' logits
    # separate (on this toy run they stay near a tie), so here they are only checked to skip something
    rates = report["routing"]["calibration_skip_rates"]
    assert 0 < (rates["attention"] + rates["mlp"]) / 2 < 1, rates
    assert report["routing"]["budget"]["stage1"]["tokens"] == 40 * 4 * 24


def test_loader_applies_the_routers_and_plain_transformers_gives_the_dense_model(trained):
    root, report = trained
    out = root / "out"
    assert (out / ROUTERS_FILE).is_file()
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["malleable_skipgpt"]["routers"] == ROUTERS_FILE
    tok = tiny_tokenizer()
    model = load_model(out, "causal_lm", tok.pad_token_id)
    routing = routing_of(model)
    assert routing is not None and routing.mode == "hard"
    ids = torch.tensor([[7 + (i * 13) % 100 for i in range(20)]])
    with torch.no_grad():
        got = model(input_ids=ids).logits
        dense = AutoModelForCausalLM.from_pretrained(root / "model").eval()(input_ids=ids).logits
        plain = AutoModelForCausalLM.from_pretrained(out).eval()(input_ids=ids).logits
        want = gated_reference(AutoModelForCausalLM.from_pretrained(out).eval(), routing.routers, ids)
    assert torch.equal(plain, dense)  # the weights are the base's (no stage 2): routing is the only change
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, dense)
    assert report["evaluation"]["perplexity"]["slim"] > 0 and "evaluation_skip_rates" in report["routing"]
    assert "training budget" in (out / "report.md").read_text()


def test_stage_two_lora_merges_into_the_weights(trained, tmp_path):
    root, _ = trained
    data = recipe(root, method="skipgpt", parameters={"sparsity": 0.25, "steps": 3, "batch_size": 2,
                                                      "lora_steps": 3, "lora_lr": 1e-2, "lora_r": 2})
    report = slim(parse_slim_recipe(data | {"evaluate": None}), tmp_path / "o", force=True, progress=False)
    assert report["routing"]["budget"]["stage2"]["steps"] == 3
    before = AutoModelForCausalLM.from_pretrained(root / "model").state_dict()
    after = AutoModelForCausalLM.from_pretrained(tmp_path / "o").state_dict()
    assert set(before) == set(after)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.endswith(("q_proj.weight", "v_proj.weight", "gate_proj.weight")) for k in changed)


def test_dry_run_says_what_it_will_train(trained, tmp_path):
    root, _ = trained
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe(root, method="skipgpt", parameters={"lora_steps": 5})))
    res = cli("slim", path, tmp_path / "out", "--dry-run")
    assert res.exit_code == 0 and "train 8 routers" in res.output and "5 LoRA steps" in res.output, res.output
    assert not (tmp_path / "out").exists()


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


BAD = [
    ({"sparsity": 1.0}, "parameters.sparsity: 1.0 is outside [0, 1)"),
    ({"sparsity": -0.1}, "parameters.sparsity"),
    ({"steps": 0}, "parameters.steps"),
    ({"batch_size": 4, "micro_batch_size": 3}, "parameters.micro_batch_size"),
    ({"lora_targets": ["nowhere_proj"], "lora_steps": 1, "steps": 1}, "'nowhere_proj' names no linear module"),
    ({"temperatur_start": 3}, "parameters.temperatur_start: unknown parameter"),
    ({"modules": "ffn"}, "parameters.modules: 'ffn' is not a routable module"),
    ({"modules": " , "}, "parameters.modules: names no module"),
    ({"modules": "mlp", "sparsity": 0.5}, "parameters.sparsity: 0.5 is not below 0.5"),
]


@pytest.mark.parametrize("params,needle", BAD, ids=[b[1][:30] for b in BAD])
def test_bad_input_is_one_line_exit_2_and_nothing_written(trained, tmp_path, params, needle):
    root, _ = trained
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe(root, method="skipgpt", parameters=params) | {"evaluate": None}))
    before = tree_digest(root / "model")
    res = cli("slim", path, tmp_path / "out", "-q")
    assert res.exit_code == 2 and needle in res.output and len(res.output.strip().splitlines()) == 1, res.output
    assert not (tmp_path / "out").exists() and tree_digest(root / "model") == before


def test_a_skipgpt_checkpoint_without_its_router_file_is_refused(trained, tmp_path):
    root, _ = trained
    path = tmp_path / "again.yaml"  # and one with its routers is not slimmed again (its output would lose them)
    path.write_text(yaml.safe_dump(recipe(root, method="magnitude") | {"model": str(root / "out"), "evaluate": None}))
    res = cli("slim", path, tmp_path / "out", "-q")
    assert res.exit_code == 2 and "a SkipGPT checkpoint" in res.output, res.output
    broken = tmp_path / "broken"
    shutil.copytree(root / "out", broken)
    (broken / ROUTERS_FILE).unlink()
    with pytest.raises(InputError, match=f"{ROUTERS_FILE} is missing"):
        load_model(broken, "causal_lm", 0)
    path = tmp_path / "r.yaml"  # through the CLI: slimming it again loads it first
    path.write_text(yaml.safe_dump(recipe(root, method="magnitude") | {"model": str(broken), "evaluate": None}))
    res = cli("slim", path, tmp_path / "out", "-q")
    assert res.exit_code == 2 and "is missing" in res.output and len(res.output.strip().splitlines()) == 1, res.output
    assert not (tmp_path / "out").exists()


def test_temperature_and_curriculum_schedules_follow_the_authors():
    from malleable.models.routed import Routing
    from malleable.slim.registry import get_method
    from malleable.slim.skipgpt import RouterStage

    method = get_method("skipgpt", {"sparsity": 0.3, "steps": 10, "curriculum_every": 2})
    stage = RouterStage(method, Routing(nn.ModuleList()))
    seen = []
    for step in range(10):
        stage.step = step
        stage.set_temperature()
        seen.append((round(stage.routing.tau, 6), round(stage.target(), 6)))
    # tau = 5 - 4 * step / steps (their per-optimiser-step linear anneal); keep target 1.0, 0.9, ... floored at 0.7
    assert [t for t, _ in seen] == [round(5 - 0.4 * i, 6) for i in range(10)]
    assert [k for _, k in seen] == [1.0, 1.0, 0.9, 0.9, 0.8, 0.8, 0.7, 0.7, 0.7, 0.7]
    fixed = RouterStage(get_method("skipgpt", {"sparsity": 0.3}), Routing(nn.ModuleList()))
    assert fixed.target() == pytest.approx(0.7)


def test_kv_eviction_alone_measures_a_skipgpt_checkpoint_with_its_routers(trained, tmp_path):
    root, _ = trained
    data = {"model": str(root / "out"), "kv": {"policy": "streaming_llm", "budget": 12, "decode_interval": 4,
                                                "evaluate": {"source": str(root / "held.txt"), "context": 40,
                                                             "continuation": 8, "windows": 2, "needles": 0}}}
    report = slim(parse_slim_recipe(data), tmp_path / "kv", progress=False)
    k = report["kv"]
    assert k["summary"]["evicted"]["kl"] > 0 and k["kept_positions"] == 12
    assert not (tmp_path / "kv" / "model.safetensors").exists()  # eviction alone writes the report only
    dense = slim(parse_slim_recipe(data | {"model": str(root / "model")}), tmp_path / "dense", progress=False)
    assert dense["kv"]["summary"]["full"]["nll"] != k["summary"]["full"]["nll"]  # the routers were applied
