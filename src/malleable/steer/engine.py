"""The steer engine, written once for every method: read the contrast pairs, read each decoder layer's output at
the read position with forward hooks, score a linear probe per layer on the validation pairs, run the method on
the chosen layers, and write the artefact and the report (with sample generations at each --strengths value).

Output folder:
    steering.safetensors, steering.json     the artefact (steer/artefact.py)
    report.json, report.md                  probe accuracy per layer, the directions' norms, samples
    preference.png                          with --strengths: PrefOdds and UtilOdds against m (steer/sweep.py)
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from malleable.errors import InputError, RecipeError
from malleable.io.atomic import atomic_dir, check_output
from malleable.learn.data import chat_prompt, uses_chat_template
from malleable.recipes.steer import SteerRecipe
from malleable.report import environment, peak_rss_mb, trusted, trusted_lines, write_report
from malleable.steer.apply import applied, check_strength, decoder_layers
from malleable.steer.artefact import Artefact, model_identity, write_artefact
from malleable.steer.registry import SteeringMethod, get_method
from malleable.steer.sweep import markdown as sweep_markdown
from malleable.steer.sweep import number
from malleable.steer.sweep import plot as sweep_plot
from malleable.steer.sweep import sweep

SCHEMA = "malleable.steer/1"
FIELDS = ("prompt", "positive", "negative")


def check_recipe(recipe: SteerRecipe) -> SteeringMethod:
    """The recipe's method built with checked parameters (an unknown name or parameter is an error), and its
    read and intervention positions checked against what the method reads."""
    method = get_method(recipe.method, recipe.parameters)
    read = method.read if recipe.read_position is None else recipe.read_position
    if (read == "all") != (method.read == "all"):
        raise RecipeError(f"read_position: {read!r} does not fit method {recipe.method} (it reads {method.read!r})")
    if (recipe.intervene or method.intervene) != method.intervene:
        raise RecipeError(f"intervene: {recipe.intervene!r} does not fit method {recipe.method}: 'first' adds a "
                          "per-position vector (actadd), 'all' one vector at every position")
    return method


def read_pairs(path: Path) -> list[dict]:
    """Contrast pairs from a JSONL / CSV / Parquet file: rows {prompt, positive, negative} of strings, positive
    and negative non-empty and different; `prompt` may be empty (or absent) for plain-text pairs."""
    from malleable.data.files import load_table

    rows, where = load_table(path)
    if not rows:
        raise InputError(f"{path}: no contrast pairs in it")
    out = []
    for row, at in zip(rows, where):
        for key in FIELDS:
            value = row.get(key, "" if key == "prompt" else None)
            if not isinstance(value, str) or (key != "prompt" and not value):
                raise InputError(f"{path}: {at}: '{key}' must be a non-empty string" if key != "prompt" else
                                 f"{path}: {at}: 'prompt' must be a string (empty for plain-text pairs)")
        if row["positive"] == row["negative"]:
            raise InputError(f"{path}: {at}: positive and negative are the same text; a pair must contrast")
        out.append({k: row.get(k) or "" for k in FIELDS})
    return out


def _read_index(last: int, start: int, read) -> int | tuple[int, int]:
    """The token index (or the [start, last] span for "mean") to read in a text whose last token is `last` and
    whose completion starts at `start`."""
    if read == "last":
        return last
    if read == "mean":
        return (min(start, last), last)
    i = last + 1 + read
    if i < 0:
        raise InputError(f"read_position: {read} lies before the start of a text of {last + 1} tokens")
    return i


def collect(model, tokenizer, rows: list[dict], read, batch_size: int = 16, progress: bool = False,
            desc: str = "reading", modules: list[torch.nn.Module] | None = None,
            inputs: bool = False) -> dict[str, dict[int, np.ndarray]]:
    """{"positive": {layer: activations}, "negative": ...} for every decoder layer: (pairs, hidden) at `read`
    ("last", "mean", a negative index), or, for read "all", (positions, hidden) of one pair whose two texts are
    brought to the same length by padding the shorter with space tokens (ActAdd). `modules` (one per key, in
    place of the decoder layers) reads other modules' outputs, or with `inputs` their inputs (ITI: o_proj's)."""
    layers = decoder_layers(model) if modules is None else modules
    n = len(layers)
    if read == "all":
        return _collect_positions(model, tokenizer, rows[0], n)
    starts = [len(tokenizer(r["prompt"])["input_ids"]) for r in rows]
    out: dict[str, dict[int, np.ndarray]] = {}
    from tqdm import tqdm

    side = tokenizer.padding_side
    tokenizer.padding_side = "right"
    bar = tqdm(total=2 * math.ceil(len(rows) / batch_size), desc=desc, disable=not progress, leave=False)
    try:
        for member in ("positive", "negative"):
            texts = [r["prompt"] + r[member] for r in rows]
            # batches of similar length waste little on padding; the rows go back to their order after
            order = sorted(range(len(texts)), key=lambda k: len(tokenizer(texts[k])["input_ids"]))
            acts: dict[int, list] = {i: [None] * len(texts) for i in range(n)}
            for b in range(0, len(order), batch_size):
                rows_b = order[b:b + batch_size]
                batch = tokenizer([texts[k] for k in rows_b], return_tensors="pt", padding=True)
                hidden = _hidden(model, layers, batch, inputs)
                bar.update(1)
                lasts = (batch["attention_mask"].sum(1) - 1).tolist()
                for j, (k, last) in enumerate(zip(rows_b, lasts)):
                    at = _read_index(last, starts[k], read)
                    for i in range(n):
                        h = hidden[i][j]
                        acts[i][k] = h[at[0]:at[1] + 1].mean(0) if isinstance(at, tuple) else h[at]
            out[member] = {i: torch.stack(a).double().numpy() for i, a in acts.items()}
    finally:
        bar.close()
        tokenizer.padding_side = side
    return out


def _hidden(model, layers, batch, inputs: bool = False) -> list[torch.Tensor]:
    """Every decoder layer's output (or given modules' outputs, or with `inputs` their first inputs) for `batch`,
    caught by forward hooks (float32, on the CPU). The decoder stack runs without the language-model head
    (`base_model`): the vocabulary projection is a fifth of a small model's compute and nothing here reads
    logits."""
    caught: list[torch.Tensor | None] = [None] * len(layers)

    def keep(i):
        def hook(module, args, output=None):
            h = args[0] if inputs else output[0] if isinstance(output, tuple) else output
            caught[i] = h.detach().float().cpu()
        return hook

    handles = [layer.register_forward_pre_hook(keep(i)) if inputs else layer.register_forward_hook(keep(i))
               for i, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            device = next(model.parameters()).device
            getattr(model, "base_model", model)(**{k: v.to(device) for k, v in batch.items()})
    finally:
        for h in handles:
            h.remove()
    return caught


def _collect_positions(model, tokenizer, row: dict, n: int) -> dict[str, dict[int, np.ndarray]]:
    ids = [tokenizer(row["prompt"] + row[m])["input_ids"] for m in ("positive", "negative")]
    space = tokenizer(" ", add_special_tokens=False)["input_ids"]
    filler = space[-1] if space else tokenizer.pad_token_id
    length = max(map(len, ids))
    out = {}
    layers = decoder_layers(model)
    for member, seq in zip(("positive", "negative"), ids):
        seq = seq + [filler] * (length - len(seq))
        hidden = _hidden(model, layers, {"input_ids": torch.tensor([seq])})
        out[member] = {i: hidden[i][0].double().numpy() for i in range(n)}
    return out


def probe_accuracy(train: dict[str, np.ndarray], val: dict[str, np.ndarray], alpha: float = 1.0) -> float:
    """A linear probe's pair accuracy: a ridge classifier (what scikit-learn's RidgeClassifier(alpha=1) fits:
    least squares on labels +1 / -1 with an intercept, here on standardised inputs and solved in its dual form,
    pairs x pairs, so every layer of a model is scored in milliseconds where a logistic regression took seconds
    per layer) fitted to tell train positives from negatives, scored as the share of validation pairs whose
    positive it scores above the negative."""
    x = np.concatenate([train["positive"], train["negative"]])
    y = np.r_[np.ones(len(train["positive"])), -np.ones(len(train["negative"]))]
    mean, std = x.mean(0), x.std(0)
    std[std < 1e-12] = 1.0
    z = (x - mean) / std
    zc = z - z.mean(0)
    w = zc.T @ np.linalg.solve(zc @ zc.T + alpha * np.eye(len(zc)), y - y.mean())

    def score(a):
        return ((a - mean) / std) @ w

    return float(np.mean(score(val["positive"]) > score(val["negative"])))


def direction_accuracy(d: np.ndarray, pos: np.ndarray, neg: np.ndarray) -> float:
    """The share of pairs whose positive projects above its negative on the direction (ActAdd's per-position rows
    averaged into one)."""
    v = d.reshape(-1, d.shape[-1]).mean(0)
    return float(np.mean(pos @ v > neg @ v))


def choose_layer(accuracy: dict[int, float]) -> int:
    """The layer whose probe is most accurate on validation; among equals the one nearest the middle of the model
    (where steering works best in the CAA and repeng experiments), then the earlier."""
    n = len(accuracy)
    return min(accuracy, key=lambda i: (-accuracy[i], abs(i - (n - 1) / 2), i))


def measured_strength(directions: dict[int, np.ndarray], pos: dict[int, np.ndarray], neg: dict[int, np.ndarray]
                      ) -> float:
    """For unit-norm directions: the pairs' mean separation along the direction, averaged over layers, so that
    the default strength moves an activation as far as a typical pair differs."""
    return float(np.mean([np.mean((pos[i] - neg[i]) @ d) for i, d in directions.items()]))


def load(recipe: SteerRecipe):
    from malleable.models.checkpoints import Trust, load_model, load_tokenizer

    trust = Trust(recipe.trust_remote_code, recipe.allow_pickle)
    tokenizer = load_tokenizer(recipe.model, trust)
    model = load_model(recipe.model, "causal_lm", tokenizer.pad_token_id, trust=trust)
    return model, tokenizer


def plan(recipe: SteerRecipe, method: SteeringMethod) -> str:
    read = method.read if recipe.read_position is None else recipe.read_position
    if method.fitted:
        auto = "every layer" if method.every_layer else f"chosen by the probe, read at {read}"
        return (f"steer {recipe.model} with {recipe.method} {json.dumps(method.p)}: "
                f"{method.fitting.format(form=method.form)} on pairs {recipe.data.train} (validation "
                f"{recipe.data.validation}); layers {recipe.layers} (auto: {auto}); "
                f"strength {recipe.strength if recipe.strength is not None else 'default'}")
    return (f"steer {recipe.model} with {recipe.method} {json.dumps(method.p)}: pairs {recipe.data.train} "
            f"(validation {recipe.data.validation}); layers {recipe.layers}; read at {read}, add at "
            f"{recipe.intervene or method.intervene} positions; strength "
            f"{recipe.strength if recipe.strength is not None else 'default'}")


def steer(recipe: SteerRecipe, out: str | Path, force: bool = False, strengths: list[float] | None = None,
          progress: bool = True) -> dict:
    """Read the recipe's pairs, extract the method's direction on its layers, write the artefact and report."""
    method = check_recipe(recipe)
    strengths = [check_strength(s, "--strengths") for s in (strengths or [])]
    inputs = [recipe.model, recipe.data.train, recipe.data.validation]
    check_output(out, force, inputs=inputs)
    start = time.perf_counter()
    train, val = read_pairs(recipe.data.train), read_pairs(recipe.data.validation)
    model, tokenizer = load(recipe)
    chat = uses_chat_template(tokenizer, recipe.chat_template, "chat_template")
    render = chat_renderer(tokenizer) if chat else None
    if render:
        train, val = ([{**r, "prompt": render(r["prompt"])} for r in rows] for rows in (train, val))
    n_layers = len(decoder_layers(model))
    if recipe.layers != "auto" and max(recipe.layers) >= n_layers:
        raise RecipeError(f"layers: {max(recipe.layers)} is out of range; the model has {n_layers} decoder layers "
                          f"(0..{n_layers - 1})")
    if recipe.layers != "auto":
        layers = list(recipe.layers)
    else:
        layers = list(range(n_layers)) if method.every_layer else None  # None: the probe chooses, below
    method.check_model(model, method.pairs(train), layers)
    read = method.read if recipe.read_position is None else recipe.read_position
    intervene = recipe.intervene or method.intervene
    probe_read = "last" if read == "all" else read
    seconds = {"load": round(time.perf_counter() - start, 3)}
    t = time.perf_counter()
    acts = {split: collect(model, tokenizer, rows, probe_read, recipe.batch_size, progress, f"reading {split}")
            for split, rows in (("train", train), ("validation", val))}
    accuracy = {i: probe_accuracy({m: acts["train"][m][i] for m in acts["train"]},
                                  {m: acts["validation"][m][i] for m in acts["validation"]}) for i in range(n_layers)}
    seconds["read_and_probe"] = round(time.perf_counter() - t, 3)
    layers = layers or [choose_layer(accuracy)]
    used = method.pairs(train)
    training = None
    if method.fitted:  # SPLIT trained through learn's engine, ITI's probes per head: not a direction per layer
        t = time.perf_counter()
        tensors, training = method.fit(model, tokenizer, used, layers, recipe.seed, progress, read,
                                       recipe.batch_size)
        seconds["train"] = round(time.perf_counter() - t, 3)
        layers = sorted(tensors)
        directions = {i: v.double().numpy() for i, v in tensors.items() if isinstance(v, torch.Tensor)}
    else:
        src = acts["train"] if read == probe_read and used is train else collect(model, tokenizer, used, read,
                                                                                 recipe.batch_size)
        directions = {i: np.asarray(method.direction(src["positive"][i], src["negative"][i]), dtype=np.float64)
                      for i in layers}
        tensors = {i: torch.from_numpy(d).float() for i, d in directions.items()}
    for i, d in directions.items():
        if not np.isfinite(d).all() or not np.any(d):
            raise InputError(f"{recipe.data.train}: the {recipe.method} direction at layer {i} is zero or not "
                             "finite (the pairs do not differ there)")
    if recipe.strength is not None:
        strength = recipe.strength
    elif method.unit_norm:
        strength = measured_strength(directions, acts["train"]["positive"], acts["train"]["negative"])
    else:
        strength = method.default_strength()
    direction_acc = {i: direction_accuracy(d, acts["validation"]["positive"][i], acts["validation"]["negative"][i])
                     for i, d in directions.items()}
    config = {"form": method.form, "method": recipe.method, "parameters": method.p,
              "model": {"path": str(recipe.model), **model_identity(model)}, "layers": layers,
              "default_strength": strength, "read_position": read, "intervene": intervene,
              "pairs": {"train": len(used), "validation": len(val)}, "chat_template": chat,
              **method.artefact_config()}
    artefact = Artefact(tensors, config)
    t = time.perf_counter()
    samples = generate_samples(model, tokenizer, artefact, recipe, val, strengths, render) if strengths else []
    seconds["samples"] = round(time.perf_counter() - t, 3)
    t = time.perf_counter()
    preference = sweep(model, tokenizer, artefact, val, samples, recipe.batch_size) if strengths else None
    seconds["preference"] = round(time.perf_counter() - t, 3)
    report = {"schema": SCHEMA, "recipe": recipe.model_dump(mode="json"), "artefact": config,
              "layer_choice": "auto" if recipe.layers == "auto" else "given",
              "probe_accuracy": {str(i): a for i, a in accuracy.items()},
              "direction_accuracy": {str(i): a for i, a in direction_acc.items()},
              "direction_norm": {str(i): float(np.linalg.norm(d)) for i, d in directions.items()},
              "training": training, "fit_summary": method.summary(training),
              "strengths": strengths, "samples": samples, "preference": preference, "trusted": trusted(recipe),
              "seconds": seconds, "wall_time_s": round(time.perf_counter() - start, 3), "peak_rss_mb": peak_rss_mb(),
              "environment": environment()}
    with atomic_dir(out, force, inputs=inputs) as tmp:
        write_artefact(tmp, artefact)
        write_report(tmp, report, markdown(report))
        if preference:
            sweep_plot(tmp / "preference.png", preference, f"{recipe.method} on {Path(str(recipe.model)).name}, "
                       f"layers {layers}")
    report["output"] = {"path": str(Path(out).absolute())}
    return report


def chat_renderer(tokenizer) -> Callable[[str], str]:
    """A prompt as a user turn and the assistant header, without a leading BOS the tokenizer adds itself on
    encoding (every path here encodes with the tokenizer's special tokens), so that no text starts with two."""
    bos = tokenizer.bos_token
    strip = bos if bos is not None and tokenizer("x")["input_ids"][:1] == [tokenizer.bos_token_id] else ""

    def render(prompt: str) -> str:
        text = chat_prompt(tokenizer, prompt)
        return text[len(strip):] if strip and text.startswith(strip) else text

    return render


def sample_prompts(recipe: SteerRecipe, val: list[dict], k: int = 8,
                   render: Callable[[str], str] | None = None) -> list[str]:
    """The recipe's generation prompts (through `render`, the chat template, when given), else the first
    distinct validation prompts (already rendered), else (plain-text pairs) the first three words of the first
    validation positives."""
    if recipe.generation.prompts:
        return [render(p) if render else p for p in recipe.generation.prompts]
    prompts = list(dict.fromkeys(r["prompt"] for r in val if r["prompt"]))[:k]
    return prompts or list(dict.fromkeys(" ".join(r["positive"].split()[:3]) for r in val))[:k]


def generate_samples(model, tokenizer, artefact: Artefact, recipe: SteerRecipe, val: list[dict],
                     strengths: list[float], render: Callable[[str], str] | None = None) -> list[dict]:
    """Greedy continuations of a few prompts at each strength, through the hooks (left padding)."""
    from malleable.evaluate.generation import generate

    prompts = sample_prompts(recipe, val, render=render)
    out = []
    for m in strengths:
        with applied(model, artefact, strength=m):
            texts = generate(model, tokenizer, prompts, max_new_tokens=recipe.generation.max_new_tokens,
                             batch_size=len(prompts), chat=False)
        out.append({"strength": m, "generations": [{"prompt": p, "text": t} for p, t in zip(prompts, texts)]})
    return out


def markdown(report: dict) -> str:
    a = report["artefact"]
    lines = [f"# steer: {a['method']}", "",
             f"- model: `{a['model']['path']}` ({a['model']['architecture']}, hidden size {a['model']['hidden_size']})",
             f"- layers: {a['layers']} ({report['layer_choice']}); read at {a['read_position']}, added at "
             f"{a['intervene']} positions", f"- default strength: {number(a['default_strength'])}",
             f"- pairs: {a['pairs']['train']} train, {a['pairs']['validation']} validation"
             f"{' (prompts as user turns of the chat template)' if a.get('chat_template') else ''}",
             *trusted_lines(report["trusted"]), *report.get("fit_summary", []),
             "", "## Linear probe per layer (validation pair accuracy)", "",
             "| layer | probe accuracy | direction accuracy | direction norm |", "|---|---|---|---|"]
    for i, acc in report["probe_accuracy"].items():
        lines.append(f"| {i}{' (steered)' if int(i) in a['layers'] else ''} | {number(acc)} | "
                     f"{number(report['direction_accuracy'].get(i))} | {number(report['direction_norm'].get(i))} |")
    lines += ["", "Probe: a ridge classifier on the train activations; direction: the extracted vector itself. "
              "Accuracy is the share of validation pairs scored positive above negative."]
    if report["samples"]:
        lines += ["", "## Samples (greedy; the first three prompts, all of them in report.json)", ""]
        for s in report["samples"]:
            lines.append(f"### strength {s['strength']:g}")
            lines += [f"- `{g['prompt']}` → {json.dumps(g['text'])}" for g in s["generations"][:3]]
            lines.append("")
    if report.get("preference"):
        lines += sweep_markdown(report["preference"])
    lines += ["", f"Wall time {report['wall_time_s']} s, peak RSS {report['peak_rss_mb']} MB."]
    return "\n".join(lines) + "\n"
