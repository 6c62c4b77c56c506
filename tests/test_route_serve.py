"""Routed serving on tiny random models: a base, three LoRAs on it and a whole-model fine-tune. The mixed-adapter
batch answers exactly as each candidate alone; `route run` end to end after `route build` and `route fit`; each
bad input refused with one line, exit 2, nothing written; the centroid router on a constructed case."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import make_adapter, save_finetune, tiny_llama, tiny_tokenizer, toy_records, write_jsonl
from test_route_build import invoke, tiny_encoder

from malleable.route import get_router
from malleable.route.matrices import Matrices
from malleable.route.serve import BASE, RoutedModel

PROMPTS = [f"copy: w{i} w{i + 3}" for i in range(6)] + [f"map: w{i}" for i in range(10, 16)]


def alone(path: Path, prompts: list[str], max_new_tokens: int = 4) -> list[str]:
    """Each prompt answered by the candidate in `path` loaded on its own (a checkpoint, or an adapter on its
    base through load_model), one prompt at a time."""
    from malleable.evaluate.generation import generate
    from malleable.models.checkpoints import load_model, load_tokenizer

    tok = load_tokenizer(path)
    model = load_model(path, "causal_lm", tok.pad_token_id)
    return [generate(model, tok, [p], max_new_tokens=max_new_tokens)[0] for p in prompts]


@pytest.fixture(scope="module")
def pool(tmp_path_factory, tiny_lm):
    root = tmp_path_factory.mktemp("serve")
    base = tiny_lm
    ft = save_finetune(tiny_llama(0), root / "ft", seed=5, scale=0.5)
    tiny_tokenizer().save_pretrained(ft)
    paths = {"base": base, "ft": ft}
    for i, (seed, r) in enumerate([(7, 4), (8, 4), (9, 8)]):
        paths[f"lora{i}"] = make_adapter(base, root / f"lora{i}", seed=seed, r=r)
    answers = {name: alone(p, PROMPTS) for name, p in paths.items()}
    return {"root": root, "paths": paths, "answers": answers}


def a_router(k: int):
    r = get_router("strongest", {})
    r.info["candidate"] = k - 1
    return r


def test_the_mixed_batch_answers_as_each_candidate_alone(pool, monkeypatch):
    import malleable.evaluate.generation as generation

    names = list(pool["paths"])
    answers = pool["answers"]
    for lora in ("lora0", "lora1", "lora2"):  # the adapters change what the base says: the test can fail
        assert answers[lora] != answers["base"]
    served = RoutedModel(pool["paths"], max_new_tokens=4, batch_size=64)  # no router: the routing is given
    assert len(served.groups) == 2  # the base with its three adapters, and the fine-tune
    calls, real = [], generation.generate
    monkeypatch.setattr(generation, "generate",
                        lambda *a, **k: (calls.append(k.get("adapter_names")), real(*a, **k))[1])
    chosen = [names[i % len(names)] for i in range(len(PROMPTS))]
    got = served.generate(PROMPTS, chosen)
    assert got == [answers[c][i] for i, c in enumerate(chosen)]
    mixed = [c for c in calls if c is not None]
    assert len(calls) == 2 and len(mixed) == 1 and set(mixed[0]) == {BASE, "lora0", "lora1", "lora2"}
    # the same prompts, every one to the base: the plain base model's answers
    assert served.generate(PROMPTS, ["base"] * len(PROMPTS)) == answers["base"]


def test_prompts_are_rendered_as_the_build_rendered_them(pool):
    """chat_template off (a zoo trained on bare prompts): the plain prompt, as generate(chat=False) alone."""
    from malleable.evaluate.generation import generate
    from malleable.models.checkpoints import load_model, load_tokenizer

    path = pool["paths"]["lora1"]
    tok = load_tokenizer(path)
    model = load_model(path, "causal_lm", tok.pad_token_id)
    plain = [generate(model, tok, [p], max_new_tokens=4, chat=False)[0] for p in PROMPTS]
    assert plain != pool["answers"]["lora1"]  # the template changes the answers: the test can fail
    served = RoutedModel(pool["paths"], max_new_tokens=4, chat_template="off")
    assert served.generate(PROMPTS, ["lora1"] * len(PROMPTS)) == plain


def test_answer_routes_then_generates_in_input_order(pool):
    names = list(pool["paths"])
    k = names.index("lora1")
    served = RoutedModel(pool["paths"], a_router(k + 1), names, max_new_tokens=4,
                         embedder=lambda ps: np.ones((len(ps), 3)))
    out = served.answer(PROMPTS)
    assert [a.prompt for a in out] == PROMPTS and {a.candidate for a in out} == {"lora1"}
    assert [a.answer for a in out] == pool["answers"]["lora1"]


def test_a_router_that_reads_the_task_gets_each_row_s_task(pool):
    names = list(pool["paths"])
    r = get_router("strongest_per_task", {})
    r.info.update(per_task={"copy": names.index("lora2")}, fallback=names.index("base"))
    served = RoutedModel(pool["paths"], r, names, max_new_tokens=4)
    out = served.answer(PROMPTS, ["copy"] * 6 + [""] * 6)  # an unknown task: the fallback
    assert [a.candidate for a in out] == ["lora2"] * 6 + ["base"] * 6
    assert [a.answer for a in out] == pool["answers"]["lora2"][:6] + pool["answers"]["base"][6:]


def test_a_pool_missing_a_routed_candidate_or_the_oracle_is_refused(pool):
    from malleable.errors import InputError

    with pytest.raises(InputError, match="no model for candidate 'ghost'"):
        RoutedModel(pool["paths"], a_router(1), ["base", "ghost"])
    with pytest.raises(InputError, match="cannot answer new queries"):
        RoutedModel(pool["paths"], get_router("oracle", {}), ["base"])


def test_centroid_picks_the_candidate_whose_queries_are_nearest():
    rng = np.random.default_rng(0)
    centres = np.eye(4, 16) * 5
    which = np.repeat(np.arange(4), 30)
    X = (centres[which] + rng.normal(size=(120, 16))).astype(np.float32)
    Y = np.zeros((120, 4))
    Y[np.arange(120), which] = 1.0
    Y[:, 3] = 0.5 * (which == 3)  # graded quality: a weight, not a threshold
    C = np.tile([1.0, 2.0, 3.0, 4.0], (120, 1))
    train = Matrices(Y, C, ["a", "b", "c", "d"], np.array(["t"] * 120, dtype=object), X=X)
    r = get_router("centroid", {})
    r.fit(train, 0)
    test_which = np.repeat(np.arange(4), 5)
    test = Matrices(np.zeros((20, 4)), np.ones((20, 4)), train.candidates, np.array(["t"] * 20, dtype=object),
                    X=(centres[test_which] + 0.5 * rng.normal(size=(20, 16))).astype(np.float32))
    assert np.array_equal(r.choose(test, None), test_which)
    assert (r.choose(test, r.knob_values()[0]) == 0).all()  # at the lowest willingness to pay: the cheapest
    assert np.allclose(np.linalg.norm(r.arrays["centroids"], axis=1), 1)
    raw = get_router("centroid", {"normalize": False})
    raw.fit(train, 0)  # LoraRetriever's score: the inner product with the mean of the unit embeddings
    Z = X / np.linalg.norm(X, axis=1, keepdims=True)
    assert np.allclose(raw.arrays["centroids"][0], Z[which == 0].mean(axis=0))


@pytest.fixture(scope="module")
def fitted(pool):
    """`route build` over the pool (task 'echo' labelled with lora0's answers, 'map' with lora1's), then
    `route fit`."""
    root, paths = pool["root"], pool["paths"]
    copies = [f"copy: w{i} w{i + 5}" for i in range(20, 32)]
    echo = write_jsonl(root / "echo.jsonl", [{"prompt": p, "completion": a} for p, a in
                                             zip(copies, alone(paths["lora0"], copies)) if a.strip()])
    records = toy_records(20)
    mapped = alone(paths["lora1"], [r["prompt"] for r in records])
    maps = write_jsonl(root / "map.jsonl", [{"prompt": r["prompt"], "completion": a}
                                            for r, a in zip(records, mapped) if a.strip()])
    recipe = {"candidates": [{"name": n, "model": str(paths[n])} for n in ("base", "lora0", "lora1", "ft")],
              "tasks": [{"name": "echo", "data": str(echo)}, {"name": "map", "data": str(maps)}],
              "encoder": str(tiny_encoder(root / "encoder")), "max_new_tokens": 4, "batch_size": 8}
    (root / "build.yaml").write_text(yaml.safe_dump(recipe))
    assert invoke("route", "build", root / "build.yaml", root / "m", "-q").exit_code == 0
    (root / "fit.yaml").write_text(yaml.safe_dump({"routers": ["oracle", "strongest", "knn", "centroid"]}))
    result = invoke("route", "fit", root / "m", root / "fitted", "--recipe", root / "fit.yaml", "-q")
    assert result.exit_code == 0, result.output
    queries = write_jsonl(root / "q.jsonl", [{"id": f"q{i}", "prompt": p} for i, p in enumerate(PROMPTS)])
    return {"fitted": root / "fitted", "queries": queries, "recipe": recipe, "build": root / "build.yaml"}


@pytest.mark.parametrize("router", ["centroid", "knn"])
def test_route_run_end_to_end(pool, fitted, tmp_path, router):
    out = tmp_path / "answers.jsonl"
    result = invoke("route", "run", fitted["fitted"], "--router", router, "--input", fitted["queries"], "--out", out)
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == [f"q{i}" for i in range(len(PROMPTS))] and [r["prompt"] for r in rows] == PROMPTS
    # the copy prompts go to lora0 (right on every 'echo' query it was fitted on), the map prompts to lora1
    assert [r["candidate"] for r in rows] == ["lora0"] * 6 + ["lora1"] * 6
    for i, r in enumerate(rows):
        assert r["answer"] == pool["answers"][r["candidate"]][i], r
    # the same through an explicit pool (the build recipe) and the Python API; an existing output needs --force
    before = out.read_bytes()
    result = invoke("route", "run", fitted["fitted"], "--router", router, "--input", fitted["queries"], "--out", out,
                    "--pool", fitted["build"])
    assert result.exit_code == 2 and "exists" in result.stderr and out.read_bytes() == before
    from malleable.api import route_run

    route_run(fitted["fitted"], router, fitted["queries"], out, pool=fitted["build"], force=True)
    assert out.read_bytes() == before


def bad_case(case: str, pool, fitted, tmp_path) -> list:
    args = ["--router", "centroid", "--input", fitted["queries"]]
    if case == "unknown_router":
        args[1] = "nope"
    elif case == "oracle":
        args[1] = "oracle"
    elif case == "no_prompt":
        args[3] = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "copy: w1"}, {"id": 2, "text": "copy: w2"}])
    elif case == "empty_input":
        args[3] = tmp_path / "empty.jsonl"
        args[3].write_text("")
    elif case == "broken_candidate":
        broken = tmp_path / "broken"
        broken.mkdir()
        adapter = pool["paths"]["lora1"]
        (broken / "adapter_config.json").write_text((adapter / "adapter_config.json").read_text())
        (broken / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json")
        recipe = json.loads(json.dumps(fitted["recipe"]))
        recipe["candidates"][2]["model"] = str(broken)
        (tmp_path / "pool.yaml").write_text(yaml.safe_dump(recipe))
        args += ["--pool", tmp_path / "pool.yaml"]
    elif case == "missing_candidate":
        recipe = {"candidates": [c for c in fitted["recipe"]["candidates"] if c["name"] != "ft"]}
        (tmp_path / "pool.yaml").write_text(yaml.safe_dump(recipe))
        args += ["--pool", tmp_path / "pool.yaml"]
    elif case == "over_input":
        return [fitted["fitted"], *args, "--out", fitted["queries"], "--force"]
    return [fitted["fitted"], *args, "--out", tmp_path / "out.jsonl"]


@pytest.mark.parametrize("case,words", [("unknown_router", "no router 'nope'"), ("oracle", "cannot answer new"),
                                        ("no_prompt", "line 2 has no prompt"), ("empty_input", "no queries"),
                                        ("broken_candidate", "candidate 'lora1'"),
                                        ("missing_candidate", "no model for candidate 'ft'"),
                                        ("over_input", "overwrite input")])
def test_bad_run_input_is_one_line_exit_2_nothing_written(pool, fitted, tmp_path, case, words):
    args = bad_case(case, pool, fitted, tmp_path)
    before = fitted["queries"].read_bytes()
    result = invoke("route", "run", *args)
    assert result.exit_code == 2 and result.stderr.count("\n") == 1 and words in result.stderr, result.output
    assert not (tmp_path / "out.jsonl").exists() and fitted["queries"].read_bytes() == before


def test_matrices_not_built_here_need_a_pool(tmp_path, pool, fitted):
    from test_route import synthetic, write_own

    Y, C, X, tasks = synthetic(60)
    m = write_own(tmp_path / "m", Y[:, :4], C, X, tasks)
    (m / "candidates.json").write_text(json.dumps(["base", "lora0", "lora1", "ft"]))
    (tmp_path / "fit.yaml").write_text(yaml.safe_dump({"routers": ["strongest"]}))
    assert invoke("route", "fit", m, tmp_path / "f", "--recipe", tmp_path / "fit.yaml", "-q").exit_code == 0
    args = ["route", "run", tmp_path / "f", "--router", "strongest", "--input", fitted["queries"]]
    result = invoke(*args, "--out", tmp_path / "a.jsonl")
    assert result.exit_code == 2 and result.stderr.count("\n") == 1 and "pass --pool" in result.stderr
    assert not (tmp_path / "a.jsonl").exists()
    result = invoke(*args, "--out", tmp_path / "a.jsonl", "--pool", fitted["build"])
    assert result.exit_code == 0, result.output
    assert len((tmp_path / "a.jsonl").read_text().splitlines()) == len(PROMPTS)
