"""steer: extraction through the real engine on a tiny random Llama, the artefact, and the three ways of applying
it (hooks, a baked checkpoint, a llama.cpp control-vector GGUF) giving the same logits."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from conftest import tiny_tokenizer, tree_digest, write_jsonl
from malleable.errors import InputError, OutputError, RecipeError
from malleable.steer import applied, bake, export_gguf, load_artefact
from malleable.steer.apply import bake_model
from malleable.cli import app
from malleable.steer.engine import steer


def pairs(n: int, seed: int) -> list[dict]:
    """Contrast pairs on the tiny vocabulary: the positive ends in words from w50..w59, the negative in w60..w69."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        prompt = " ".join(f"w{rng.randrange(10, 40)}" for _ in range(3))
        rows.append({"prompt": prompt, "positive": f" w{rng.randrange(50, 60)} w{rng.randrange(0, 7) + 7}",
                     "negative": f" w{rng.randrange(60, 70)} w{rng.randrange(0, 7) + 7}"})
    return rows


@pytest.fixture(scope="module")
def setup(tiny_lm, tmp_path_factory):
    root = tmp_path_factory.mktemp("steer")
    write_jsonl(root / "train.jsonl", pairs(24, 0))
    write_jsonl(root / "val.jsonl", pairs(12, 1))
    return root


def recipe(tiny_lm, root, **kw) -> dict:
    from malleable.recipes.steer import parse_steer_recipe

    data = {"model": str(tiny_lm), "method": "caa", "data": {"train": str(root / "train.jsonl"),
                                                                 "validation": str(root / "val.jsonl")},
            "layers": [1], "read_position": "last"} | kw
    return parse_steer_recipe(data)


@pytest.fixture(scope="module")
def artefact(tiny_lm, setup):
    out = setup / "caa"
    steer(recipe(tiny_lm, setup, strength=3.0), out, progress=False)
    return out


def model(tiny_lm):
    return AutoModelForCausalLM.from_pretrained(tiny_lm, dtype=torch.float32).eval()


def hooked_logits(tiny_lm, artefact, strength: float):
    """(a two-text batch, the tiny model's logits on it steered through the hooks): what a baked checkpoint or an
    exported adapter must reproduce."""
    m, tok = model(tiny_lm), tiny_tokenizer()
    batch = tok(["w1 w2 w3", "w4 w5 w6"], return_tensors="pt")
    with applied(m, artefact, strength=strength):
        return batch, m(**batch).logits


def test_artefact_and_report(artefact, tiny_lm):
    a = load_artefact(artefact)
    assert a.config["layers"] == [1] and a.vectors[1].shape == (64,) and a.default_strength == 3.0
    assert a.config["model"]["hidden_size"] == 64 and a.config["model"]["architecture"] == "LlamaForCausalLM"
    report = json.loads((artefact / "report.json").read_text())
    assert set(report["probe_accuracy"]) == {"0", "1"}
    assert all(0 <= v <= 1 for v in report["probe_accuracy"].values())
    assert "Linear probe per layer" in (artefact / "report.md").read_text()


def test_caa_is_the_mean_difference_at_the_read_position(artefact, tiny_lm, setup):
    """Recomputed by hand with output_hidden_states (layer 0's output is hidden_states[1]) one pair at a time."""
    m, tok = model(tiny_lm), tiny_tokenizer()
    rows = [json.loads(x) for x in (setup / "train.jsonl").read_text().splitlines()]
    diffs = []
    for r in rows:
        h = [m(**tok(r["prompt"] + r[k], return_tensors="pt"), output_hidden_states=True).hidden_states[1][0, -1]
             for k in ("positive", "negative")]
        diffs.append(h[0] - h[1])
    m0 = torch.stack(diffs).mean(0)
    out = setup / "caa0"
    steer(recipe(tiny_lm, setup, layers=[0]), out, progress=False)
    torch.testing.assert_close(load_artefact(out).vectors[0], m0.detach(), rtol=1e-5, atol=1e-6)


def test_chat_template_pairs_read_the_rendered_prompt(tiny_lm, setup, tmp_path):
    """chat_template: on reads each member at the end of `user turn + assistant header + completion`."""
    m, tok = model(tiny_lm), tiny_tokenizer()
    rows = [json.loads(x) for x in (setup / "train.jsonl").read_text().splitlines()]
    diffs = []
    for r in rows:
        head = tok.apply_chat_template([{"role": "user", "content": r["prompt"]}], tokenize=False,
                                       add_generation_prompt=True)
        h = [m(**tok(head + r[k], return_tensors="pt"), output_hidden_states=True).hidden_states[1][0, -1]
             for k in ("positive", "negative")]
        diffs.append(h[0] - h[1])
    report = steer(recipe(tiny_lm, setup, layers=[0], read_position="last", chat_template="on",
                          generation={"prompts": ["w1 w2"], "max_new_tokens": 2}), tmp_path / "chat",
                   strengths=[1.0], progress=False)
    a = load_artefact(tmp_path / "chat")
    assert a.config["chat_template"] is True
    torch.testing.assert_close(a.vectors[0], torch.stack(diffs).mean(0).detach(), rtol=1e-5, atol=1e-6)
    assert report["samples"][0]["generations"][0]["prompt"] == "<user> w1 w2 <assistant> "
    steer(recipe(tiny_lm, setup, layers=[0], read_position="last"), tmp_path / "plain", progress=False)
    plain = load_artefact(tmp_path / "plain")
    assert plain.config["chat_template"] is False and not torch.allclose(plain.vectors[0], a.vectors[0])


def test_chat_template_on_without_a_template_is_one_line(tiny_lm, setup, tmp_path):
    bare = tmp_path / "bare"
    import shutil

    shutil.copytree(tiny_lm, bare)
    cfg = json.loads((bare / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(cfg))
    (bare / "chat_template.jinja").unlink(missing_ok=True)
    with pytest.raises(RecipeError, match="chat_template: on, but the model's tokenizer has no chat template"):
        steer(recipe(bare, setup, layers=[0], chat_template="on"), tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists()


def test_strength_zero_is_bit_identical(artefact, tiny_lm):
    m, tok = model(tiny_lm), tiny_tokenizer()
    batch = tok(["w1 w2 w3", "w4 w5"], return_tensors="pt", padding=True)
    plain = m(**batch).logits
    with applied(m, artefact, strength=0.0):
        zero = m(**batch).logits
    with applied(m, artefact, strength=2.0):
        steered = m(**batch).logits
    assert torch.equal(plain, zero) and not torch.allclose(plain, steered)
    assert torch.equal(m(**batch).logits, plain)  # the hooks are gone after the block


@pytest.mark.parametrize("side", ["right", "left"])
def test_padding_either_side_matches_one_text_at_a_time(artefact, tiny_lm, side):
    m, tok = model(tiny_lm), tiny_tokenizer()
    tok.padding_side = side
    texts = ["w1 w2 w3 w4", "w5 w6"]
    batch = tok(texts, return_tensors="pt", padding=True)
    pos = (batch["attention_mask"].cumsum(1) - 1).clamp(min=0)
    with applied(m, artefact, strength=2.0):
        logits = m(**batch, position_ids=pos).logits
        for i, t in enumerate(texts):
            alone = m(**tok(t, return_tensors="pt")).logits[0]
            keep = batch["attention_mask"][i].bool()
            torch.testing.assert_close(logits[i][keep], alone, rtol=1e-4, atol=1e-5)


def test_baked_checkpoint_gives_the_hook_logits(artefact, tiny_lm, tmp_path):
    batch, hooked = hooked_logits(tiny_lm, artefact, 2.5)
    out = bake(artefact, tiny_lm, tmp_path / "baked", strength=2.5)
    baked = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()  # plain, no custom code
    assert baked.config.mlp_bias and torch.count_nonzero(baked.model.layers[0].mlp.down_proj.bias) == 0
    torch.testing.assert_close(baked(**batch).logits, hooked, rtol=1e-4, atol=1e-5)
    assert (out / "tokenizer_config.json").is_file()


def test_peft_adapter_gives_the_hook_logits_and_bad_input_is_refused(artefact, tiny_lm, tmp_path):
    from peft import PeftModel

    from malleable.steer.peft_export import export_peft

    batch, hooked = hooked_logits(tiny_lm, artefact, 2.5)
    before = tree_digest(artefact)
    result = CliRunner().invoke(app, ["steer-peft", str(artefact), str(tiny_lm), str(tmp_path / "adapter"),
                                      "--strength", "2.5"])
    assert result.exit_code == 0, result.output
    out = tmp_path / "adapter"
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["target_modules"] == ["model.layers.1.mlp.down_proj"] and config["lora_bias"] is True
    torch.testing.assert_close(PeftModel.from_pretrained(model(tiny_lm), out).eval()(**batch).logits, hooked,
                               rtol=1e-4, atol=1e-5)
    assert tree_digest(artefact) == before
    for target, args, words in [("zero", ["--strength", "0"], "nothing to export"),
                                ("nan", ["--strength", "nan"], "not a finite"), ("adapter", [], "output exists")]:
        again = CliRunner().invoke(app, ["steer-peft", str(artefact), str(tiny_lm), str(tmp_path / target), *args])
        assert again.exit_code == 2 and words in again.output and "Traceback" not in again.output, again.output
    assert not (tmp_path / "zero").exists() and not (tmp_path / "nan").exists()
    with pytest.raises(InputError, match="nothing to export"):
        export_peft(artefact, tiny_lm, tmp_path / "zero", strength=0.0)


def test_gguf_control_vector_has_repeng_keys(artefact, tmp_path):
    import gguf

    path = export_gguf(artefact, tmp_path / "cv.gguf", strength=2.0)
    r = gguf.GGUFReader(str(path))
    arch = r.get_field("general.architecture")
    assert bytes(arch.parts[-1]).decode() == "controlvector"
    assert bytes(r.get_field("controlvector.model_hint").parts[-1]).decode() == "llama"
    assert int(r.get_field("controlvector.layer_count").parts[-1][0]) == 1
    (t,) = r.tensors
    assert t.name == "direction.1"
    np.testing.assert_allclose(np.asarray(t.data), 2.0 * load_artefact(artefact).vectors[1].numpy(), rtol=1e-6)
    with pytest.raises(OutputError):
        export_gguf(artefact, path)


def test_actadd_adds_over_the_first_positions(tiny_lm, setup):
    out = setup / "actadd"
    steer(recipe(tiny_lm, setup, method="actadd", read_position=None, layers=[0]), out, progress=False)
    a = load_artefact(out)
    v = a.vectors[0]
    assert v.dim() == 2 and a.config["intervene"] == "first"
    m, tok = model(tiny_lm), tiny_tokenizer()
    long = tok("w1 w2 w3 w4 w5 w6 w7 w8", return_tensors="pt")
    caught = []

    def catch(mod, args, o):
        caught.append(o[0] if isinstance(o, tuple) else o)

    h = m.model.layers[0].register_forward_hook(catch)
    m(**long)
    h.remove()
    with applied(m, a, strength=1.5):  # hooks run in the order they were registered: catch after the steering
        h = m.model.layers[0].register_forward_hook(catch)
        m(**long)
    h.remove()
    delta = caught[1][0] - caught[0][0]
    p = v.shape[0]
    torch.testing.assert_close(delta[:p], 1.5 * v, rtol=1e-4, atol=1e-5)
    assert torch.count_nonzero(delta[p:]) == 0
    with pytest.raises(InputError, match="cannot be baked"):
        bake_model(m, a, 1.0)


@pytest.mark.parametrize("method", ["pca_diff", "pca_center", "logistic"])
def test_unit_norm_methods_and_auto_layer(tiny_lm, setup, method):
    out = setup / method
    report = steer(recipe(tiny_lm, setup, method=method, layers="auto"), out, progress=False)
    a = load_artefact(out)
    (layer,) = a.config["layers"]
    acc = report["probe_accuracy"]
    assert acc[str(layer)] == max(acc.values())
    v = a.vectors[layer].double()
    assert abs(v.norm().item() - 1) < 1e-5 and a.default_strength > 0  # measured: the pairs' mean separation


def test_samples_at_strengths(tiny_lm, setup):
    report = steer(recipe(tiny_lm, setup, generation={"max_new_tokens": 3}), setup / "samples",
                   strengths=[0.0, 4.0], progress=False)
    (s0, s4) = report["samples"]
    assert s0["strength"] == 0 and len(s0["generations"]) == 8
    assert all(isinstance(g["text"], str) for g in s4["generations"])


def test_preference_sweep_on_validation_pairs(tiny_lm, setup):
    """--strengths sweeps PrefOdds / UtilOdds on the validation pairs; strength 0 is the unsteered model's
    numbers exactly, other strengths move them, and the report holds the fits (too few points on a five-point
    sweep: said so) and the plot."""
    from transformers import AutoTokenizer

    from malleable.evaluate.preference import pref_odds, util_odds
    from malleable.steer.engine import read_pairs
    from malleable.steer.sweep import pair_nll, perplexity

    out = setup / "sweep"
    strengths = [-8.0, -4.0, 0.0, 4.0, 8.0]
    report = steer(recipe(tiny_lm, setup, generation={"max_new_tokens": 3}), out, strengths=strengths,
                   progress=False)
    rows = report["preference"]["rows"]
    assert [r["strength"] for r in rows] == strengths and report["preference"]["pairs"] == 12
    lm, tok = model(tiny_lm), AutoTokenizer.from_pretrained(tiny_lm)
    val = read_pairs(setup / "val.jsonl")
    l_pos, l_neg = pair_nll(lm, tok, val)
    zero = rows[2]
    assert zero["pref_odds"] == float(np.mean(pref_odds(l_pos, l_neg)))
    assert zero["util_odds"] == float(np.mean(util_odds(l_pos, l_neg)))
    assert zero["nll_positive"] == float(np.mean(l_pos)) and zero["nll_negative"] == float(np.mean(l_neg))
    gens = report["samples"][2]["generations"]
    assert zero["sample_perplexity"] == perplexity(lm, tok, [g["prompt"] for g in gens], [g["text"] for g in gens])
    # a random model need not prefer the positives more when pushed, but steering must move the likelihoods
    assert all(r["nll_positive"] != zero["nll_positive"] for r in rows if r["strength"] != 0)
    assert all(0 <= r["distinct_1"] <= 1 and 0 <= r["distinct_2"] <= 1 for r in rows)
    fits = report["preference"]["fits"]
    assert fits["pref"]["positive"] == {"points": 3, "fitted": False, "reason": "3 finite points for 4 parameters"}
    assert (out / "preference.png").stat().st_size > 1000
    md = (out / "report.md").read_text()
    assert "| m | PrefOdds | UtilOdds |" in md and "not fitted" in md
    assert json.loads((out / "report.json").read_text())["preference"]["rows"][2]["pref_odds"] == zero["pref_odds"]


def test_other_architecture_or_hidden_size_is_refused(artefact):
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    from conftest import TINY

    wide = LlamaForCausalLM(LlamaConfig(**(TINY | {"hidden_size": 32, "intermediate_size": 64})))
    with pytest.raises(InputError, match="hidden_size 64"):
        with applied(wide, artefact):
            pass
    other = MistralForCausalLM(MistralConfig(**TINY))
    with pytest.raises(InputError, match="architecture"):
        with applied(other, artefact):
            pass
    with pytest.raises(RecipeError, match="strength"):
        with applied(model_like(artefact), artefact, strength=float("nan")):
            pass


def model_like(artefact):
    from transformers import LlamaConfig, LlamaForCausalLM

    from conftest import TINY

    return LlamaForCausalLM(LlamaConfig(**TINY))


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def write_recipe(path, tiny_lm, root, **kw):
    data = {"model": str(tiny_lm), "method": "caa", "data": {"train": str(root / "train.jsonl"),
                                                                 "validation": str(root / "val.jsonl")},
            "layers": [1]} | kw
    path.write_text(yaml.safe_dump(data))
    return path


def test_cli_steer_dry_run_and_run(tiny_lm, setup, tmp_path):
    r = write_recipe(tmp_path / "r.yaml", tiny_lm, setup, layers="auto")
    res = cli("steer", r, tmp_path / "out", "--dry-run", "--strengths", "0,2")
    assert res.exit_code == 0 and "caa" in res.output and not (tmp_path / "out").exists()
    res = cli("steer", r, tmp_path / "out", "--strengths", "0,2")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "out" / "steering.safetensors").is_file() and "best probe layer" in res.output
    layer = json.loads((tmp_path / "out" / "steering.json").read_text())["layers"][0]
    res = cli("steer-gguf", tmp_path / "out", tmp_path / "cv.gguf")
    if layer == 0:  # llama.cpp has no control-vector slot for layer 0
        assert res.exit_code == 2 and "layer 0" in res.output and not (tmp_path / "cv.gguf").exists()
    else:
        assert res.exit_code == 0 and (tmp_path / "cv.gguf").is_file()


BAD_ROWS = {
    "empty": "",
    "malformed": '{"prompt": "w1", "positive": " w2", "negative": " w3"}\nnot json\n',
    "same": '{"prompt": "w1", "positive": " w2", "negative": " w2"}\n',
    "missing": '{"prompt": "w1", "positive": " w2"}\n',
}


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_cli_bad_pairs_file(tiny_lm, setup, tmp_path, case):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(BAD_ROWS[case])
    r = write_recipe(tmp_path / "r.yaml", tiny_lm, setup, data={"train": str(bad),
                                                                 "validation": str(setup / "val.jsonl")})
    before = tree_digest(tmp_path)
    res = cli("steer", r, tmp_path / "out")
    assert res.exit_code == 2, res.output
    assert str(bad) in res.output and len(res.output.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists() and tree_digest(tmp_path) == before


@pytest.mark.parametrize("kw, needle", [
    ({"layers": [2]}, "layers"), ({"layers": [-1]}, "layers"), ({"strength": float("nan")}, "strength"),
    ({"strength": float("inf")}, "strength"), ({"method": "nope"}, "method"),
    ({"parameters": {"C": 1.0}}, "parameters.C"), ({"intervene": "first"}, "intervene"),
    ({"read_position": 0}, "read_position"), ({"method": "actadd", "read_position": "last"}, "read_position"),
])
def test_cli_bad_recipe(tiny_lm, setup, tmp_path, kw, needle):
    r = write_recipe(tmp_path / "r.yaml", tiny_lm, setup, **kw)
    res = cli("steer", r, tmp_path / "out")
    assert res.exit_code == 2 and needle in res.output and len(res.output.strip().splitlines()) == 1, res.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("value", ["nan", "1,inf", "a,b"])
def test_cli_bad_strengths(tiny_lm, setup, tmp_path, value):
    r = write_recipe(tmp_path / "r.yaml", tiny_lm, setup)
    res = cli("steer", r, tmp_path / "out", "--strengths", value)
    assert res.exit_code == 2 and "--strengths" in res.output and not (tmp_path / "out").exists()


def test_cli_existing_output_without_force(tiny_lm, setup, tmp_path, artefact):
    r = write_recipe(tmp_path / "r.yaml", tiny_lm, setup)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    before = tree_digest(tmp_path)
    res = cli("steer", r, tmp_path / "out")
    assert res.exit_code == 2 and "--force" in res.output and tree_digest(tmp_path) == before
    res = cli("steer-bake", artefact, tiny_lm, tmp_path / "out")
    assert res.exit_code == 2 and tree_digest(tmp_path) == before


def test_cli_bake_onto_another_hidden_size(tmp_path, artefact):
    from transformers import LlamaConfig, LlamaForCausalLM

    from conftest import TINY

    LlamaForCausalLM(LlamaConfig(**(TINY | {"hidden_size": 32, "intermediate_size": 64}))).save_pretrained(
        tmp_path / "wide")
    res = cli("steer-bake", artefact, tmp_path / "wide", tmp_path / "out")
    assert res.exit_code == 2 and "hidden_size" in res.output and not (tmp_path / "out").exists()


@pytest.mark.parametrize("concept", ["sentiment", "news", "register"])
def test_contrast_pair_builders(concept, tmp_path):
    from malleable.data.steering import chat_lines, encyclopedic_sentences, polarity_sentences, write_contrast_pairs
    from malleable.steer.engine import read_pairs

    files = write_contrast_pairs(concept, tmp_path, seed=0)
    train, val = read_pairs(files["train"]), read_pairs(files["validation"])
    assert len(train) >= 4 * len(val) > 0
    texts = lambda rows: {r[k] for r in rows for k in ("positive", "negative")}  # noqa: E731
    assert not texts(train) & texts(val)  # no sentence is in both splits
    reviews = polarity_sentences()
    if concept == "sentiment":
        assert all(r["positive"].strip() in reviews["pos"] and r["negative"].strip() in reviews["neg"]
                   for r in train + val)
        assert len({r["prompt"] for r in train}) > 1
    elif concept == "register":
        chat = set(chat_lines())
        assert all(r["prompt"] == "" and r["positive"] in encyclopedic_sentences() and r["negative"] in chat
                   for r in train + val)
        assert not any("[1]" in r["positive"] for r in train + val)
        assert len({r["negative"] for r in train + val}) == len(train + val)  # each chat line used once
    else:
        assert all(r["prompt"] == "" and r["negative"] in reviews["pos"] + reviews["neg"] for r in train + val)
        assert all(r["positive"] == r["positive"].lower() for r in train)
    again = write_contrast_pairs(concept, tmp_path / "again", seed=0)
    assert again["train"].read_bytes() == files["train"].read_bytes()


@pytest.mark.slow
def test_sentiment_on_smollm2(tmp_path):
    """The real thing: CAA on SmolLM2-135M-Instruct from the sentiment pairs, layer chosen by the probe."""
    from malleable.data.steering import write_contrast_pairs
    from malleable.models.smollm2 import smollm2_checkpoint

    files = write_contrast_pairs("sentiment", tmp_path)
    r = recipe(smollm2_checkpoint(), tmp_path, layers="auto", read_position="mean",
               data={"train": str(files["train"]), "validation": str(files["validation"])},
               generation={"max_new_tokens": 12})
    report = steer(r, tmp_path / "out", strengths=[-4.0, 0.0, 4.0], progress=False)
    assert max(report["probe_accuracy"].values()) > 0.8


def test_probe_is_scikit_learns_ridge_classifier():
    from sklearn.linear_model import RidgeClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from malleable.steer.engine import probe_accuracy

    rng = np.random.default_rng(1)
    train = {"positive": rng.normal(size=(30, 50)) + 0.3, "negative": rng.normal(size=(30, 50))}
    val = {"positive": rng.normal(size=(40, 50)) + 0.3, "negative": rng.normal(size=(40, 50))}
    x = np.concatenate([train["positive"], train["negative"]])
    p = make_pipeline(StandardScaler(), RidgeClassifier(alpha=1.0)).fit(x, np.r_[np.ones(30), np.zeros(30)])
    theirs = float(np.mean(p.decision_function(val["positive"]) > p.decision_function(val["negative"])))
    assert probe_accuracy(train, val) == theirs and 0.5 < theirs < 1


def test_choose_layer_prefers_accuracy_then_the_middle():
    from malleable.steer.engine import choose_layer

    assert choose_layer({0: 0.9, 1: 0.7, 2: 0.8, 3: 0.6}) == 0
    assert choose_layer({0: 0.9, 1: 0.8, 2: 0.9, 3: 0.9, 4: 0.9, 5: 0.9}) == 2  # middle 2.5: 2 and 3 tie, the earlier


def test_api_steer_takes_a_dict_recipe(tiny_lm, setup, tmp_path):
    import malleable.api as api

    data = {"model": str(tiny_lm), "method": "pca_diff", "layers": [0, 1], "read_position": "mean",
            "data": {"train": str(setup / "train.jsonl"), "validation": str(setup / "val.jsonl")}}
    report = api.steer(data, tmp_path / "out", progress=False)
    assert report["artefact"]["layers"] == [0, 1] and report["artefact"]["read_position"] == "mean"
    assert sorted(load_artefact(tmp_path / "out").vectors) == [0, 1]


def test_gguf_into_a_missing_folder_is_one_line(artefact, tmp_path):
    res = cli("steer-gguf", artefact, tmp_path / "nowhere" / "cv.gguf")
    assert res.exit_code == 2 and "existing folder" in res.output
