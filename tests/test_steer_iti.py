"""ITI (steer/iti.py): the per-head probes on a separable toy, the engine end to end on a tiny random Llama, the
hook touching only the chosen heads' slices of o_proj's input, the baked o_proj bias, strength 0, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from conftest import tiny_tokenizer, tree_digest, write_jsonl
from malleable.cli import app
from malleable.errors import InputError
from malleable.steer import applied, bake, export_gguf, load_artefact
from malleable.steer.engine import collect, steer
from malleable.steer.iti import probe_heads, scaled_direction, top_heads
from test_steer import hooked_logits, pairs

HEADS, HEAD_DIM = 4, 16  # conftest's tiny Llama: hidden 64, 4 attention heads


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("iti")
    write_jsonl(root / "train.jsonl", pairs(24, 0))
    write_jsonl(root / "val.jsonl", pairs(8, 1))
    return root


def recipe_dict(tiny_lm, root, **kw) -> dict:
    return {"model": str(tiny_lm), "method": "iti", "data": {"train": str(root / "train.jsonl"),
                                                             "validation": str(root / "val.jsonl")},
            "parameters": {"heads": 3}} | kw


@pytest.fixture(scope="module")
def artefact(tiny_lm, data):
    from malleable.recipes.steer import parse_steer_recipe

    steer(parse_steer_recipe(recipe_dict(tiny_lm, data)), data / "iti", progress=False)
    return data / "iti"


def model(tiny_lm):
    return AutoModelForCausalLM.from_pretrained(tiny_lm, dtype=torch.float32).eval()


def test_probes_find_the_one_separable_head():
    rng = np.random.default_rng(0)
    n, dim = 40, 8
    pos = {i: rng.normal(size=(n, 3, dim)) for i in (0, 1)}
    neg = {i: rng.normal(size=(n, 3, dim)) for i in (0, 1)}
    pos[1][:, 2, 0] += 4.0  # layer 1, head 2 tells the positives apart along its first coordinate
    fit, val = np.arange(30), np.arange(30, 40)
    accuracy, weights = probe_heads(pos, neg, fit, val)
    assert accuracy[1][2] == 1.0
    assert max(a for i in (0, 1) for h, a in enumerate(accuracy[i]) if (i, h) != (1, 2)) < 0.9
    assert top_heads(accuracy, 1) == [(1, 2)]
    assert np.argmax(np.abs(weights[1][2])) == 0 and weights[1][2][0] > 0
    # ties go to the later head, as the authors' np.argsort(acc)[::-1]
    assert top_heads({0: [0.5, 0.9], 1: [0.9, 0.1]}, 2) == [(1, 0), (0, 1)]


def test_scaled_direction_is_the_std_along_the_unit_direction():
    acts = np.array([[1.0, 0.0], [3.0, 0.0], [5.0, 9.0]])
    shift, std = scaled_direction(np.array([2.0, 0.0]), acts)
    assert std == pytest.approx(np.std([1.0, 3.0, 5.0])) and np.allclose(shift, [std, 0.0])


def test_artefact_holds_the_mass_mean_of_the_chosen_heads(artefact, tiny_lm, data):
    a = load_artefact(artefact)
    cfg = a.config
    assert a.form == "head_offsets" and cfg["module"] == "self_attn.o_proj" and cfg["default_strength"] == 4.0
    chosen = [(int(i), h) for i, hs in cfg["heads"].items() for h in hs]
    assert len(chosen) == 3 and sorted(a.vectors) == sorted({i for i, _ in chosen}) == cfg["layers"]
    report = json.loads((artefact / "report.json").read_text())
    assert [(c["layer"], c["head"]) for c in report["training"]["heads"]] == top_heads(
        {int(i): acc for i, acc in report["training"]["head_accuracy"].items()}, 3)
    assert "top 3 heads" in (artefact / "report.md").read_text()
    # the direction, read independently: o_proj's input at the last token of every training pair
    m, tok = model(tiny_lm), tiny_tokenizer()
    rows = [json.loads(line) for line in (data / "train.jsonl").read_text().splitlines()]
    o_projs = [layer.self_attn.o_proj for layer in m.model.layers]
    acts = collect(m, tok, rows, "last", modules=o_projs, inputs=True)
    for i, t in a.vectors.items():
        off = t["offset"].double().numpy().reshape(HEADS, HEAD_DIM)
        for h in range(HEADS):
            if h not in cfg["heads"][str(i)]:
                assert not off[h].any()
                continue
            p = acts["positive"][i].reshape(-1, HEADS, HEAD_DIM)[:, h]
            q = acts["negative"][i].reshape(-1, HEADS, HEAD_DIM)[:, h]
            want, std = scaled_direction(p.mean(0) - q.mean(0), np.concatenate([p, q]))
            np.testing.assert_allclose(off[h], want, rtol=1e-4, atol=1e-6)
            assert std > 0


def test_hook_shifts_only_the_chosen_heads_at_every_text_position(artefact, tiny_lm):
    a = load_artefact(artefact)
    first = min(a.vectors)  # its o_proj input does not depend on the shifts of the layers above
    m, tok = model(tiny_lm), tiny_tokenizer()
    tok.padding_side = "left"
    batch = tok(["w1 w2 w3 w4", "w5 w6"], return_tensors="pt", padding=True)
    seen = []
    lin = m.model.layers[first].self_attn.o_proj

    def read():  # a pre-hook registered last runs last: it sees the input the steering hook left
        handle = lin.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach().clone()))
        try:
            m(**batch)
        finally:
            handle.remove()

    read()
    with applied(m, a, strength=2.0):
        read()
    diff = (seen[1] - seen[0]).reshape(*seen[0].shape[:2], HEADS, HEAD_DIM)
    want = (2.0 * a.vectors[first]["offset"]).reshape(HEADS, HEAD_DIM)
    text = batch["attention_mask"].bool()
    torch.testing.assert_close(diff[text], want.expand(int(text.sum()), HEADS, HEAD_DIM), rtol=1e-5, atol=1e-6)
    assert not diff[~text].any()  # padding untouched
    others = [h for h in range(HEADS) if h not in a.config["heads"][str(first)]]
    assert others and not diff[:, :, others].any()


def test_strength_zero_and_alpha_zero_are_the_base_model_bit_for_bit(artefact, tiny_lm, data, tmp_path):
    from malleable.recipes.steer import parse_steer_recipe

    m, tok = model(tiny_lm), tiny_tokenizer()
    batch = tok(["w1 w2 w3", "w4 w5"], return_tensors="pt", padding=True)
    plain = m(**batch).logits
    with applied(m, artefact, strength=0.0):
        assert torch.equal(m(**batch).logits, plain)
    with applied(m, artefact):
        assert not torch.allclose(m(**batch).logits, plain)
    zero = tmp_path / "alpha0"
    steer(parse_steer_recipe(recipe_dict(tiny_lm, data, parameters={"heads": 3, "alpha": 0.0})), zero,
          progress=False)
    with applied(m, zero):
        assert torch.equal(m(**batch).logits, plain)
    assert torch.equal(m(**batch).logits, plain)  # the hooks are gone after the block


def test_baked_o_proj_bias_gives_the_hook_logits(artefact, tiny_lm, tmp_path):
    batch, hooked = hooked_logits(tiny_lm, artefact, 3.0)
    out = bake(artefact, tiny_lm, tmp_path / "baked", strength=3.0)
    baked = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()  # plain, no custom code
    steered = set(load_artefact(artefact).vectors)
    assert baked.config.attention_bias
    for i, layer in enumerate(baked.model.layers):
        assert not layer.self_attn.q_proj.bias.any() and bool(layer.self_attn.o_proj.bias.any()) == (i in steered)
    torch.testing.assert_close(baked(**batch).logits, hooked, rtol=1e-4, atol=1e-5)
    assert "o_proj" in json.loads((out / "report.json").read_text())["how"]


def test_gguf_export_and_a_damaged_offset_are_refused_in_one_line(artefact, tiny_lm, tmp_path):
    with pytest.raises(InputError, match="not a control vector"):
        export_gguf(artefact, tmp_path / "x.gguf")
    a = load_artefact(artefact)
    i = min(a.vectors)
    a.vectors[i] = {"offset": a.vectors[i]["offset"][:-1]}
    with pytest.raises(InputError, match="o_proj's input width"):
        with applied(model(tiny_lm), a):
            pass


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_cli_dry_run_and_run(tiny_lm, data, tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe_dict(tiny_lm, data, layers=[1])))
    res = cli("steer", path, tmp_path / "out", "--dry-run")
    assert res.exit_code == 0 and "probe per attention head" in res.output and not (tmp_path / "out").exists()
    res = cli("steer", path, tmp_path / "out", "-q")
    assert res.exit_code == 0, res.output
    config = json.loads((tmp_path / "out" / "steering.json").read_text())
    assert config["layers"] == [1] and len(config["heads"]["1"]) == 3  # only the layers given are candidates


@pytest.mark.parametrize("params, rows, needle", [
    ({"heads": 0}, 24, "parameters.heads"),
    ({"heads": 9}, 24, "parameters.heads"),  # 2 layers x 4 heads
    ({"direction": "random"}, 24, "parameters.direction"),
    ({"val_ratio": 1.5}, 24, "parameters.val_ratio"),
    ({}, 1, "parameters.val_ratio"),  # one pair cannot be split into probe training and ranking
])
def test_cli_bad_input_is_one_line(tiny_lm, data, tmp_path, params, rows, needle):
    train = tmp_path / "train.jsonl"
    write_jsonl(train, pairs(rows, 0))
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe_dict(tiny_lm, data, parameters={"heads": 3} | params,
                                               data={"train": str(train), "validation": str(data / "val.jsonl")})))
    before = tree_digest(tmp_path)
    res = cli("steer", path, tmp_path / "out")
    assert res.exit_code == 2 and needle in res.output and len(res.output.strip().splitlines()) == 1, res.output
    assert not (tmp_path / "out").exists() and tree_digest(tmp_path) == before


def test_peft_adapter_is_an_o_proj_bias_and_gives_the_hook_logits(artefact, tiny_lm, tmp_path):
    from peft import PeftModel

    from malleable.steer.peft_export import export_peft

    batch, hooked = hooked_logits(tiny_lm, artefact, 3.0)
    out = export_peft(artefact, tiny_lm, tmp_path / "adapter", strength=3.0)
    config = json.loads((out / "adapter_config.json").read_text())
    steered = sorted(load_artefact(artefact).vectors)
    assert config["target_modules"] == [f"model.layers.{i}.self_attn.o_proj" for i in steered]
    assert config["lora_bias"] is True
    torch.testing.assert_close(PeftModel.from_pretrained(model(tiny_lm), out).eval()(**batch).logits, hooked,
                               rtol=1e-4, atol=1e-5)
