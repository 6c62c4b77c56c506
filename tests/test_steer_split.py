"""SPLIT (steer/split.py and its three forms): the loss against hand-written numbers, the swapped rows, the SFT
setting, training through learn's engine on a tiny random Llama, the artefact round trip, strength 0, baking and
bad input."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from conftest import tiny_tokenizer, write_jsonl
from malleable.cli import app
from malleable.errors import RecipeError
from malleable.params import check_params
from malleable.steer import applied, load_artefact
from malleable.steer.apply import bake_model
from malleable.steer.engine import steer
from malleable.steer.registry import METHODS, get_method
from malleable.steer.split import split_loss
from malleable.steer.sweep import pair_nll

FORMS = {"split_vector": "vector", "split_lora": "lora", "split_weight": "local_weight"}
# the toy set separates at strengths the tiny model feels: a few quick epochs, strengths near 1
FAST = {"epochs": 6, "lr": 0.05, "m_min": 0.5, "m_max": 1.5, "m_count": 3, "dropout": 0.0, "batch_size": 4}


def pairs(n: int, seed: int) -> list[dict]:
    """Separable pairs on the tiny vocabulary: the positive is one of w50..w54, the negative one of w60..w64."""
    rng = random.Random(seed)
    return [{"prompt": " ".join(f"w{rng.randrange(10, 40)}" for _ in range(3)),
             "positive": f" w{rng.randrange(50, 55)}", "negative": f" w{rng.randrange(60, 65)}"} for _ in range(n)]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("split")
    write_jsonl(root / "train.jsonl", pairs(16, 0))
    write_jsonl(root / "val.jsonl", pairs(8, 1))
    return root


def recipe(tiny_lm, root, method, **kw):
    from malleable.recipes.steer import parse_steer_recipe

    return parse_steer_recipe({"model": str(tiny_lm), "method": method, "layers": [1],
                               "data": {"train": str(root / "train.jsonl"), "validation": str(root / "val.jsonl")},
                               "parameters": FAST | kw.pop("parameters", {})} | kw)


@pytest.fixture(scope="module")
def trained(tiny_lm, data):
    out = {}
    for name in FORMS:
        steer(recipe(tiny_lm, data, name), data / name, progress=False)
        out[name] = data / name
    return out


def model(tiny_lm):
    return AutoModelForCausalLM.from_pretrained(tiny_lm, dtype=torch.float32).eval()


def test_loss_equals_the_formula_on_hand_made_nlls():
    l_pos, l_neg = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1.5, 1.0, 3.1])
    p = {"w_pos": 1.0, "w_neg": 0.5, "gamma": 8.0, "theta": 0.3, "w_ref": 0.0}
    # row 1: 1 + 0.75 + 8 relu(0.3 - 0.5) = 1.75; row 2: 2 + 0.5 + 8 (0.3 + 1) = 12.9; row 3: 3 + 1.55 + 8 0.2 = 6.15
    assert torch.allclose(split_loss(l_pos, l_neg, p), torch.tensor([1.75, 12.9, 6.15]))
    ref_pos, ref_neg = torch.tensor([0.5, 2.5, 3.0]), torch.tensor([2.0, 0.5, 3.0])
    # reference terms, w_ref 2: row 1 2 (0.5 + 0) = 1; row 2 2 (0 + 0.5) = 1; row 3 2 (0 + 0.1) = 0.2
    got = split_loss(l_pos, l_neg, p | {"w_ref": 2.0}, ref_pos, ref_neg)
    assert torch.allclose(got, torch.tensor([2.75, 13.9, 6.35]))


def test_swapped_rows_carry_the_answers_swapped_at_minus_m(tiny_lm):
    method = get_method("split_lora", {"m_min": 0.2, "m_max": 2.0, "m_count": 10})
    item = {"positive": ([1, 2, 3], [-100, -100, 3]), "negative": ([1, 2, 4, 5], [-100, -100, 4, 5])}
    batch = method.collate([item, item], pad_id=0)
    assert batch["sign"].tolist() == [1.0, -1.0, 1.0, -1.0]
    assert batch["win"]["labels"][1].tolist()[-2:] == [4, 5] and batch["lose"]["labels"][1].tolist()[-1] == 3
    assert batch["win"]["labels"][0].tolist()[-1] == 3
    seen = []

    class Probe:  # records the strengths the hooks would get
        def __setattr__(self, k, v):
            seen.append(v)

    method.strength, method.generator = Probe(), torch.Generator().manual_seed(0)
    method.loss(lambda **kw: type("O", (), {"logits": torch.zeros(4, kw["logits_to_keep"], 8)})(), batch)
    m = seen[0]
    assert (m[0::2] > 0).all() and (m[1::2] < 0).all()
    grid = set(np.round(np.linspace(0.2, 2.0, 10), 6))
    assert set(np.round(m.abs().numpy(), 6)) <= grid
    no_swap = get_method("split_weight", {})
    assert not no_swap.p["swapped"] and no_swap.collate([item], 0)["sign"].tolist() == [1.0]


def test_sft_setting_has_no_negative_or_hinge_gradient(tiny_lm):
    """w_neg = gamma = 0: each row's other completion never enters the loss, so the gradient is that of w_pos L_pos
    alone (rows without the swap, whose preferred completion is the negative); with SPLIT's defaults it does."""
    tok, m = tiny_tokenizer(), model(tiny_lm)
    rows = pairs(4, 3)
    grads = []
    for setting, negatives in [(sft, neg) for sft in ({"w_neg": 0, "gamma": 0}, {}) for neg in ("w60", "w61 w62")]:
        method = get_method("split_vector", setting | {"dropout": 0.0, "swapped": False})
        from malleable.steer.split import encode

        items = [encode(tok, r | {"negative": f" {negatives}"}) for r in rows]
        method.layers, method.generator = [1], torch.Generator().manual_seed(0)
        torch.manual_seed(0)
        steered = method.prepare(m, "causal_lm")
        loss = method.loss(steered, method.collate(items, tok.pad_token_id))
        loss.backward()
        grads.append(method.deltas["1"].v.grad.clone())
        for h in method.handles:
            h.remove()
    assert grads[0].abs().sum() > 0 and torch.equal(grads[0], grads[1])
    assert not torch.allclose(grads[2], grads[3])


@pytest.mark.parametrize("name", sorted(FORMS))
def test_training_separates_the_training_pairs_both_ways(trained, tiny_lm, data, name):
    """After a few steps PrefOdds on the training pairs rises at +m and falls at -m (vs the unsteered model)."""
    rows = [json.loads(x) for x in (data / "train.jsonl").read_text().splitlines()]
    m, tok = model(tiny_lm), tiny_tokenizer()
    a = load_artefact(trained[name])
    assert a.form == FORMS[name] and a.config["layers"] == [1]

    def pref(strength):
        with applied(m, a, strength=strength):
            l_pos, l_neg = pair_nll(m, tok, rows)
        return float(np.mean(l_neg - l_pos))

    top = FAST["m_max"]
    base, plus, minus = pref(0.0), pref(top), pref(-top)
    assert plus > base + 0.5 and minus < base - 0.3, (base, plus, minus)
    report = json.loads((trained[name] / "report.json").read_text())
    assert report["training"] and report["training"][-1]["step"] == 24  # 6 epochs x 16 pairs / 4
    assert "trained through learn's engine" in (trained[name] / "report.md").read_text()


@pytest.mark.parametrize("name", sorted(FORMS))
def test_strength_zero_is_the_base_model_exactly(trained, tiny_lm, name):
    m, tok = model(tiny_lm), tiny_tokenizer()
    batch = tok(["w11 w12 w13", "w20"], return_tensors="pt", padding=True)
    base = m(**batch).logits
    with applied(m, trained[name], strength=0.0):
        assert torch.equal(m(**batch).logits, base)
    with applied(m, trained[name], strength=1.0):
        assert not torch.allclose(m(**batch).logits, base)
    assert torch.equal(m(**batch).logits, base)  # the hooks are gone afterwards


@pytest.mark.parametrize("name", sorted(FORMS))
def test_artefact_round_trip_and_bake(trained, tiny_lm, name):
    from malleable.steer.artefact import write_artefact

    a = load_artefact(trained[name])
    again = trained[name].parent / f"{name}-again"
    again.mkdir()
    write_artefact(again, a)
    b = load_artefact(again)
    assert b.config == a.config
    for i in a.vectors:
        x, y = a.vectors[i], b.vectors[i]
        assert all(torch.equal(x[k], y[k]) for k in x) if isinstance(x, dict) else torch.equal(x, y)
    m, tok = model(tiny_lm), tiny_tokenizer()
    batch = tok(["w11 w12 w13 w14"], return_tensors="pt")
    with applied(m, a, strength=1.3):
        hooked = m(**batch).logits
    baked = bake_model(model(tiny_lm), a, 1.3)(**batch).logits
    assert torch.allclose(hooked, baked, atol=1e-5)


def test_sweep_runs_unchanged_on_a_trained_form(tiny_lm, data, tmp_path):
    report = steer(recipe(tiny_lm, data, "split_weight", generation={"max_new_tokens": 3}), tmp_path / "o",
                   strengths=[-1.0, 0.0, 1.0], progress=False)
    rows = report["preference"]["rows"]
    assert [r["strength"] for r in rows] == [-1.0, 0.0, 1.0]
    assert rows[0]["pref_odds"] < rows[1]["pref_odds"] < rows[2]["pref_odds"]
    assert (tmp_path / "o" / "preference.png").is_file()


def test_defaults_are_the_authors():
    p = {n: check_params(METHODS[n].params, {}) for n in FORMS}
    assert (p["split_vector"]["lr"], p["split_vector"]["gamma"], p["split_vector"]["theta"]) == (0.08, 8.0, 0.3)
    assert (p["split_vector"]["m_min"], p["split_vector"]["m_max"], p["split_vector"]["epochs"]) == (2.0, 20.0, 2.0)
    assert (p["split_vector"]["w_pos"], p["split_vector"]["w_neg"]) == (1.0, 0.5)
    for n in ("split_lora", "split_weight"):
        assert (p[n]["lr"], p[n]["gamma"], p[n]["theta"], p[n]["m_min"], p[n]["m_max"]) == (0.01, 5.0, 0.4, 0.2, 2.0)


@pytest.mark.parametrize("method, params, needle", [
    ("split_nope", {}, "unknown steering method 'split_nope'"),
    ("split_vector", {"theta": -0.1}, "parameters.theta: -0.1 is below the minimum 0"),
    ("split_lora", {"gamma": -1}, "parameters.gamma: -1 is below the minimum 0"),
    ("split_weight", {"m_min": 3.0}, "parameters.m_min: 3.0 is above m_max"),
    ("split_lora", {"module": "mlp.nowhere"}, "parameters.module: layer 0"),
    ("split_vector", {"micro_batch_size": 3}, "parameters.micro_batch_size: 3 does not divide batch_size (4)"),
])
def test_cli_bad_recipe_is_one_line_exit_2(tiny_lm, data, tmp_path, method, params, needle):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"model": str(tiny_lm), "method": method, "parameters": params, "layers": [1],
                                    "data": {"train": str(data / "train.jsonl"),
                                             "validation": str(data / "val.jsonl")}}))
    result = CliRunner().invoke(app, ["steer", str(path), str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert needle in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_cli_empty_pairs_is_one_line_exit_2(tiny_lm, data, tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"model": str(tiny_lm), "method": "split_vector", "layers": [1],
                                    "data": {"train": str(tmp_path / "empty.jsonl"),
                                             "validation": str(data / "val.jsonl")}}))
    result = CliRunner().invoke(app, ["steer", str(path), str(tmp_path / "out")])
    assert result.exit_code == 2 and "empty.jsonl" in result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_a_lora_artefact_on_another_width_is_refused(trained, tiny_lm):
    a = load_artefact(trained["split_lora"])
    a.vectors[1] = {"A": torch.zeros(7, 4), "B": torch.zeros(4, 64)}
    with pytest.raises(Exception, match="reads 7 features"):
        with applied(model(tiny_lm), a, strength=1.0):
            pass


def test_unknown_parameter_names_the_key():
    with pytest.raises(RecipeError, match="parameters.rank: unknown parameter"):
        get_method("split_vector", {"rank": 3})


def test_cli_split_run_then_bake(tiny_lm, data, tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"model": str(tiny_lm), "method": "split_lora", "layers": "auto",
                                    "parameters": FAST | {"epochs": 1},
                                    "data": {"train": str(data / "train.jsonl"),
                                             "validation": str(data / "val.jsonl")}}))
    runner = CliRunner()
    res = runner.invoke(app, ["steer", str(path), str(tmp_path / "out"), "--dry-run"])
    assert res.exit_code == 0 and "train its lora intervention" in res.output and not (tmp_path / "out").exists()
    res = runner.invoke(app, ["steer", str(path), str(tmp_path / "out"), "-q"])
    assert res.exit_code == 0, res.output
    assert "trained through learn's engine: 4 steps" in res.output
    config = json.loads((tmp_path / "out" / "steering.json").read_text())
    assert config["form"] == "lora" and config["module"] == "mlp.down_proj"
    res = runner.invoke(app, ["steer-bake", str(tmp_path / "out"), str(tiny_lm), str(tmp_path / "baked"),
                              "--strength", "1.5"])
    assert res.exit_code == 0, res.output
    baked = AutoModelForCausalLM.from_pretrained(tmp_path / "baked", dtype=torch.float32).eval()
    m, tok = model(tiny_lm), tiny_tokenizer()
    batch = tok(["w11 w12 w13 w14"], return_tensors="pt")
    with applied(m, tmp_path / "out", strength=1.5):
        assert torch.allclose(m(**batch).logits, baked(**batch).logits, atol=1e-5)
    # the LoRA form is not a control vector
    res = runner.invoke(app, ["steer-gguf", str(tmp_path / "out"), str(tmp_path / "cv.gguf")])
    assert res.exit_code == 2 and not (tmp_path / "cv.gguf").exists()


@pytest.mark.parametrize("name", sorted(FORMS))
def test_peft_adapter_gives_the_hook_logits(trained, tiny_lm, name, tmp_path):
    from peft import PeftModel

    from malleable.steer.peft_export import export_peft

    m, tok = model(tiny_lm), tiny_tokenizer()
    batch = tok(["w11 w12 w13 w14", "w20 w21 w22 w23"], return_tensors="pt")
    with applied(m, trained[name], strength=1.3):
        hooked = m(**batch).logits
    out = export_peft(trained[name], tiny_lm, tmp_path / "adapter", strength=1.3)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["target_modules"] == ["model.layers.1.mlp.down_proj"]  # only the steered module is wrapped
    assert config.get("lora_bias", False) == (name != "split_lora")
    rank = json.loads((out / "report.json").read_text())["modules"]["model.layers.1.mlp.down_proj"]["rank"]
    assert rank == (4 if name == "split_lora" else 1) or name == "split_weight"  # the LoRA's own rank, found again
    peft_model = PeftModel.from_pretrained(model(tiny_lm), out).eval()
    torch.testing.assert_close(peft_model(**batch).logits, hooked, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(m(**batch).logits, hooked)  # the base alone is not steered
    if name == "split_lora":  # a weak strength: the LoRA's rank, not the float32 rounding of the bake
        weak = export_peft(trained[name], tiny_lm, tmp_path / "weak", strength=1e-3)
        assert json.loads((weak / "report.json").read_text())["modules"]["model.layers.1.mlp.down_proj"]["rank"] == 4
