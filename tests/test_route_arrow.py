"""Arrow (route/arrow.py) against PEFT's own Arrow on a tiny Llama with three tiny LoRAs: the prototypes and
the per-token routing weights; then `route build` with `arrow: true` and the `arrow` router."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from conftest import make_adapter, tiny_llama, tiny_tokenizer, toy_records, write_jsonl
from test_route_build import invoke, tiny_encoder

from malleable.route.arrow import prototypes, query_scores, token_weights

TARGETS = ["q_proj", "v_proj", "down_proj"]


def gapped_adapter(base_dir, path, seed, r=4):
    """A LoRA whose every delta B @ A has singular values 10, 1, 0.5, 0.2 (a clear top gap, so PEFT's 15
    power-iteration steps converge to float precision) in random directions."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    model = get_peft_model(LlamaForCausalLM.from_pretrained(base_dir),
                           LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS))
    g = torch.Generator().manual_seed(seed)
    s = torch.tensor([10.0, 1.0, 0.5, 0.2])
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "lora_A") and "default" in module.lora_A:
                A, B = module.lora_A["default"].weight, module.lora_B["default"].weight
                qa, _ = torch.linalg.qr(torch.randn(A.shape[1], r, generator=g))
                qb, _ = torch.linalg.qr(torch.randn(B.shape[0], r, generator=g))
                A.copy_(s[:, None] * qa.T)
                B.copy_(qb)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def library(tmp_path_factory, tiny_lm):
    root = tmp_path_factory.mktemp("arrow")
    base = tiny_lm
    adapters = [gapped_adapter(base, root / f"lora{i}", seed=i) for i in range(3)]
    return {"root": root, "base": base, "adapters": adapters}


def peft_arrow(library, top_k, temperature, prompt_ids):
    """PEFT's Arrow model run on `prompt_ids`: per LoRA module (our naming), its prototypes and, per token, the
    input x and the mixing weights PEFT applied, recovered from its output delta = sum_e w_e scale_e B_e A_e x."""
    from peft import ArrowConfig, create_arrow_model
    from transformers import LlamaForCausalLM

    model = create_arrow_model(LlamaForCausalLM.from_pretrained(library["base"]),
                               [str(a) for a in library["adapters"]],
                               ArrowConfig(top_k=top_k, router_temperature=temperature, rng_seed=0))
    seen, handles = {}, []
    for name, module in model.named_modules():
        if hasattr(module, "lora_arrow"):
            key = name.removeprefix("base_model.model.")

            def record(arrow, args, kwargs, out, key=key, module=module):
                x = args[0].reshape(-1, args[0].shape[-1])
                names = arrow.task_adapter_names
                y = torch.stack([module.scaling[n] * module.lora_B[n](module.lora_A[n](x)) for n in names], dim=1)
                w = torch.linalg.lstsq(y.transpose(1, 2).double(), out.reshape(len(x), -1, 1).double()).solution
                seen[key] = {"x": x.detach(), "weights": w.squeeze(-1), "prototypes": arrow.prototypes.detach()}

            handles.append(module.lora_arrow["arrow_router"].register_forward_hook(record, with_kwargs=True))
    with torch.no_grad():
        model(input_ids=prompt_ids)
    for h in handles:
        h.remove()
    return seen


@pytest.mark.parametrize("top_k,temperature", [(2, 1.0), (3, 0.5)])
def test_prototypes_and_token_weights_equal_pefts(library, top_k, temperature):
    tok = tiny_tokenizer()
    from malleable.learn.data import chat_prompt

    ids = tok(chat_prompt(tok, "copy: w3 w9 w27"), return_tensors="pt", add_special_tokens=False).input_ids
    theirs = peft_arrow(library, top_k, temperature, ids)
    ours = prototypes(library["adapters"])
    assert sorted(ours) == sorted(theirs) and len(ours) == 2 * len(TARGETS)
    for module, p in ours.items():
        q = theirs[module]["prototypes"].double()
        sign = torch.sign((p * q).sum(dim=1, keepdim=True))  # a singular vector's sign is arbitrary
        assert torch.allclose(p * sign, q, atol=1e-5), module
        w = token_weights(theirs[module]["x"], p, top_k, temperature)
        assert torch.allclose(w, theirs[module]["weights"], atol=1e-5), module
        assert ((w > 0).sum(dim=1) == top_k).all()
    # the first layer's inputs are the base model's own, so query_scores (hooks on the base, no adapters) gives
    # PEFT's weights there, averaged over the prompt's tokens
    first = {m: p for m, p in ours.items() if m.startswith("model.layers.0.self_attn")}
    base = tiny_llama(0)
    got = query_scores(base, tok, ["copy: w3 w9 w27"], first, top_k=top_k, temperature=temperature)
    want = torch.stack([theirs[m]["weights"].mean(dim=0) for m in first]).mean(dim=0)
    assert np.allclose(got[0], want.numpy(), atol=1e-5)


def test_padding_does_not_change_a_querys_score(library):
    protos = prototypes(library["adapters"])
    tok, base = tiny_tokenizer(), tiny_llama(0)
    prompts = ["copy: w1", "copy: w3 w9 w27 w40 w41 w42", "map: w5 w6"]
    together = query_scores(base, tok, prompts, protos, batch_size=3)
    alone = np.concatenate([query_scores(base, tok, [p], protos) for p in prompts])
    assert np.allclose(together, alone, atol=1e-6) and np.allclose(together.sum(axis=1), 1)
    assert not np.allclose(together[0], together[1])


@pytest.fixture(scope="module")
def recipe(library):
    root = library["root"]
    other = make_adapter(library["base"], root / "plain", seed=9)  # another rank and target set
    data = write_jsonl(root / "map.jsonl", toy_records(12))
    cands = [{"name": "base", "model": str(library["base"])}, {"name": "other", "model": str(other)}]
    cands += [{"name": f"lora{i}", "model": str(a)} for i, a in enumerate(library["adapters"])]
    return {"candidates": cands, "tasks": [{"name": "map", "data": str(data)}], "metric": "forced",
            "encoder": str(tiny_encoder(root / "encoder")), "batch_size": 4,
            "arrow": {"adapters": ["lora0", "lora1", "lora2"], "top_k": 2}}


def test_build_writes_arrow_scores_and_the_router_picks_their_argmax(recipe, library, tmp_path):
    (tmp_path / "b.yaml").write_text(yaml.safe_dump(recipe))
    result = invoke("route", "build", tmp_path / "b.yaml", tmp_path / "m", "-q")
    assert result.exit_code == 0, result.output
    A = np.load(tmp_path / "m" / "arrow.npy")
    assert A.shape == (12, 5) and np.isnan(A[:, :2]).all() and np.allclose(A[:, 2:].sum(axis=1), 1)
    want = query_scores(tiny_llama(0), tiny_tokenizer(), [r["prompt"] for r in toy_records(12)],
                        prototypes(library["adapters"]), top_k=2)
    assert np.allclose(A[:, 2:], want, atol=1e-6)
    report = json.loads((tmp_path / "m" / "report.json").read_text())
    assert report["arrow"]["adapters"] == ["lora0", "lora1", "lora2"] and report["arrow"]["top_k"] == 2
    (tmp_path / "fit.yaml").write_text(yaml.safe_dump({"routers": ["oracle", "arrow"]}))
    result = invoke("route", "fit", tmp_path / "m", tmp_path / "f", "--recipe", tmp_path / "fit.yaml", "-q")
    assert result.exit_code == 0, result.output
    from malleable.route.engine import load_routers
    from malleable.route.matrices import read_matrices

    routers, _, _ = load_routers(tmp_path / "f")
    m = read_matrices(tmp_path / "m")
    assert (routers["arrow"].choose(m, None) == 2 + want.argmax(axis=1)).all()
    # served: RoutedModel computes the scores of the same prompts itself, through the pool's one PeftModel with
    # its adapters disabled, with the build's top_k, and routes as the fitted router did on the build's scores
    from malleable.route import RoutedModel

    served = RoutedModel.from_fitted(tmp_path / "f", "arrow")
    prompts = [r["prompt"] for r in toy_records(12)]
    assert served.arrow.top_k == 2 and np.allclose(served.arrow_scores(prompts), A, atol=1e-6, equal_nan=True)
    assert served.route(prompts) == [f"lora{j}" for j in want.argmax(axis=1)]


def test_default_library_is_every_adapter_on_the_commonest_base(recipe, tmp_path):
    from malleable.recipes.route import parse_route_build_recipe
    from malleable.route.build import arrow_library

    r = parse_route_build_recipe({**recipe, "arrow": True})
    assert arrow_library(r)[0] == [1, 2, 3, 4] and r.arrow.top_k == 3 and r.arrow.temperature == 1.0


@pytest.mark.parametrize("case,words", [("one_adapter", "fewer than two PEFT LoRA adapters"),
                                        ("not_adapter", "'base' is not a PEFT LoRA adapter"),
                                        ("unknown", "'ghost' is not a candidate"),
                                        ("top_k", "arrow.top_k")])
def test_bad_arrow_recipes_are_one_line_exit_2(recipe, tmp_path, case, words):
    r = json.loads(json.dumps(recipe))
    if case == "one_adapter":
        r["candidates"], r["arrow"] = r["candidates"][:2], True
    elif case == "not_adapter":
        r["arrow"]["adapters"] = ["base", "lora0"]
    elif case == "unknown":
        r["arrow"]["adapters"] = ["ghost", "lora0"]
    else:
        r["arrow"]["top_k"] = 0
    (tmp_path / "b.yaml").write_text(yaml.safe_dump(r))
    result = invoke("route", "build", tmp_path / "b.yaml", tmp_path / "m", "-q")
    assert result.exit_code == 2 and result.stderr.count("\n") == 1 and words in result.stderr, result.output
    assert not (tmp_path / "m").exists()


def test_the_arrow_router_refuses_matrices_without_arrow_scores(tmp_path):
    rng = np.random.default_rng(0)
    m = tmp_path / "m"
    m.mkdir()
    np.save(m / "Y.npy", rng.integers(0, 2, (30, 3)).astype(float))
    np.save(m / "C.npy", np.ones((30, 3)))
    (tmp_path / "fit.yaml").write_text(yaml.safe_dump({"routers": ["oracle", "arrow"]}))
    result = invoke("route", "fit", m, tmp_path / "f", "--recipe", tmp_path / "fit.yaml", "-q")
    assert result.exit_code == 2 and result.stderr.count("\n") == 1 and "arrow.npy" in result.stderr, result.output
    assert not (tmp_path / "f").exists()
    np.save(m / "arrow.npy", np.full((30, 3), np.inf))
    result = invoke("route", "fit", m, tmp_path / "f", "--recipe", tmp_path / "fit.yaml", "-q")
    assert result.exit_code == 2 and "Arrow scores (arrow.npy) must be finite" in result.stderr, result.output


def test_serving_arrow_over_a_library_that_is_not_adapters_on_one_base_is_refused(library):
    from malleable.errors import InputError
    from malleable.route import ROUTERS, RoutedModel

    arrow = ROUTERS["arrow"]()
    arrow.info["adapters"] = [0, 1]  # 'base' is the base model itself, not an adapter
    served = RoutedModel({"base": library["base"], "lora0": library["adapters"][0]}, arrow)
    with pytest.raises(InputError, match="router 'arrow': its library \\(base, lora0\\) is not a set of PEFT"):
        served.route(["copy: w1"])
