"""`malleable forget RECIPE OUT`: files in, an unlearned model and its evidence out.

Everything is loaded and checked before any training: the model and its tokenizer, every data file (bad rows
named by file and line; a classifier's labels must be the model's own classes), that forget and retain share
no row, and that a reference model speaks the same tokenizer. The output (a checkpoint, or a PEFT adapter when
unlearning through LoRA) is written atomically with report.json, report.md and evidence.png.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

from malleable.errors import InputError, RecipeError
from malleable.evaluate.unlearning import evidence, gaps
from malleable.forget.engine import unlearn
from malleable.forget.data import prompt_completion_records
from malleable.forget.registry import get_mask, get_objective
from malleable.forget.stopping import MIN_ROWS, StopRule, retain_bound, search_step_size, side
from malleable.io.atomic import atomic_dir, check_output
from malleable.io.hashing import sha256_file
from malleable.learn.data import collate, load_examples
from malleable.learn.lora import LORA_PARAMS
from malleable.models.checkpoints import Trust, load_model, load_tokenizer, model_labels
from malleable.params import check_params
from malleable.recipes.forget import ForgetRecipe, load_forget_recipe
from malleable.recipes.learn import DataFormat
from malleable.report import environment, peak_rss_mb, trusted, trusted_lines, write_report

SCHEMA = "malleable.forget/1"


def load_sets(paths: dict[str, Path | None], spec: DataFormat, tokenizer, labels: list[str] | None) -> dict:
    """Tokenised examples of each given file; forget must be non-empty and must not share rows with retain."""
    sets = {name: load_examples(p, spec, tokenizer, labels=labels) if p else None for name, p in paths.items()}
    if labels is not None:
        for name, ex in sets.items():
            if ex is not None and ex.format != "text_label":
                raise InputError(f"{ex.path}: a classifier needs text/label rows, found {ex.format}")
    forget, retain = sets["forget"], sets.get("retain")
    if retain is not None:
        shared = {(tuple(i), str(t)) for i, t in forget.items} & {(tuple(i), str(t)) for i, t in retain.items}
        if shared:
            raise InputError(f"{forget.path}: {len(shared)} row(s) also in {retain.path}; forget and retain "
                             f"must not overlap")
    return sets


def check_same_tokenizer(tokenizer, other, where: Path) -> None:
    if tokenizer.get_vocab() != other.get_vocab():
        raise InputError(f"{where}: its tokenizer differs from the model's; the two cannot be compared")


def _retrain(recipe: ForgetRecipe, out: Path, force: bool, progress: bool) -> Path:
    """Run the recipe's `retrain` learn recipe on data.retain; the gold standard lands in OUT.retrain."""
    from malleable.learn.engine import learn
    from malleable.learn.engine import read_recipe as read_learn_recipe

    if recipe.retrain is None:
        raise RecipeError("retrain: --reference retrain needs a `retrain:` learn recipe in the forget recipe")
    if recipe.data.retain is None:
        raise RecipeError("data.retain: --reference retrain trains on the retain set; none was given")
    spec = read_learn_recipe(recipe.retrain)
    spec.data.train = recipe.data.retain
    target = out.with_name(out.name + ".retrain")
    learn(spec, target, force=force, progress=progress)
    return target


def check_recipe(recipe: ForgetRecipe):
    """Everything about the recipe that can be checked without loading anything; returns the objective."""
    objective = get_objective(recipe.objective, recipe.parameters)
    if recipe.mask is not None:
        get_mask(recipe.mask)
    if recipe.lora is not None:
        check_params(LORA_PARAMS, recipe.lora, "lora")
    kind = "classifier" if recipe.task == "classification" else "causal_lm"
    if kind not in objective.kinds:
        names = {"causal_lm": "language models", "classifier": "classifiers"}
        raise RecipeError(f"objective: {recipe.objective} does not apply to task {recipe.task} (it is for "
                          f"{' and '.join(sorted(names[k] for k in objective.kinds))} only)")
    if objective.needs_retain and recipe.data.retain is None:
        raise RecipeError(f"data.retain: {recipe.objective} needs retain data and none was given")
    if recipe.training.retain_limit is not None and recipe.data.retain is None:
        raise RecipeError("data.retain: training.retain_limit guards the retain set's loss; none was given")
    if recipe.training.stop_at == "indistinguishable" and recipe.data.holdout is None:
        raise RecipeError("data.holdout: training.stop_at: indistinguishable measures the forget rows against "
                          "holdout rows; none were given")
    return objective


def read_recipe(path: str | Path) -> ForgetRecipe:
    """A forget recipe file, validated, its objective, mask and LoRA settings included (problems name the file)."""
    return load_forget_recipe(path, check_recipe)


def forget(recipe: ForgetRecipe, out: str | Path, *, force: bool = False, reference: str | Path | None = None,
           progress: bool = True) -> dict:
    """Unlearn as the recipe says; write the model (or adapter) and its evidence to `out`."""
    start = time.perf_counter()
    objective = check_recipe(recipe)
    d = recipe.data
    reference = reference if reference is not None else recipe.reference
    inputs = [recipe.model] + [p for p in (d.forget, d.retain, d.holdout, recipe.retrain) if p] + \
        ([Path(reference)] if reference not in (None, "retrain") else [])
    out = check_output(out, force=force, inputs=inputs)
    trust = Trust(recipe.trust_remote_code, recipe.allow_pickle)
    tokenizer = load_tokenizer(recipe.model, trust)
    labels = model_labels(recipe.model, recipe.task)
    sets = load_sets({"forget": d.forget, "retain": d.retain, "holdout": d.holdout}, d, tokenizer, labels)
    items = {name: ex.items if ex else [] for name, ex in sets.items()}
    items["forget"] = objective.examples(items["forget"], tokenizer, seed=recipe.seed,  # e.g. DPO's preferred answers
                                         records=prompt_completion_records(sets["forget"].rows, d),
                                         chat_template=d.chat_template)
    pad = tokenizer.pad_token_id

    def batch(b):
        return collate(b, pad)

    if reference not in (None, "retrain"):
        check_same_tokenizer(tokenizer, load_tokenizer(Path(reference), trust), Path(reference))
    model = load_model(recipe.model, recipe.task, pad, trust=trust)
    if reference == "retrain":
        reference = _retrain(recipe, out, force, progress)
    ref_model = (load_model(Path(reference), recipe.task, pad, trust=trust)
                 if reference else None)

    size = recipe.training.batch_size
    t = recipe.training
    if t.stop_at == "reference" and ref_model is None:
        raise RecipeError("training.stop_at: reference needs a reference model (--reference or `reference:`)")
    calibration = split_calibration(items, t.calibration, recipe.seed) if t.stop_at == "indistinguishable" else []
    before = evidence(model, items, batch, size)
    guard = guard_rows(items["retain"], recipe.seed) if t.retain_limit is not None else []
    retain_limit = retain_bound(model, guard, batch, t.retain_limit, size) if guard else None
    # the reference is measured before unlearning: `stop_at: reference` stops at its forget loss
    reference_row = evidence(ref_model, items, batch, size) if ref_model is not None else None
    reference_loss = reference_row["forget"]["loss"] if reference_row else None
    unlearn_settings = dict(objective=recipe.objective, parameters=recipe.parameters, mask=recipe.mask,
                            lora=recipe.lora, steps=t.steps, epochs=t.epochs, batch_size=t.batch_size,
                            optimizer=t.optimizer, schedule=t.schedule, warmup_steps=t.warmup_steps,
                            weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm, seed=recipe.seed,
                            progress=progress)
    fresh = [model]  # the loaded model for the first step size; every later one starts from the original again

    def run_at(lr, stop):
        start_from = fresh.pop() if fresh else load_model(recipe.model, recipe.task, pad, trust=trust)
        return unlearn(start_from, forget=items["forget"], retain=items["retain"] or None, collate=batch, lr=lr,
                       stop=stop, **unlearn_settings)

    del model
    if t.stop_at:
        lr, result, stop, tried = search_step_size(
            t.lr if isinstance(t.lr, list) else [t.lr], run_at,
            lambda: StopRule(t.stop_at, items["forget"], batch, tolerance=t.tolerance, check_every=t.check_every,
                             calibration=calibration, batch_size=size, reference_loss=reference_loss,
                             retain=guard, retain_limit=retain_limit))
    else:
        lr, stop, tried = t.lr, None, None
        result = run_at(lr, None)
    after = evidence(result.model, items, batch, size)
    rows = {"original": before, "unlearned": after, **({"reference": reference_row} if reference_row else {})}
    report = {
        "schema": SCHEMA,
        "objective": recipe.objective,
        "trusted": trusted(recipe),
        "recipe": json.loads(recipe.model_dump_json()),
        "model": str(recipe.model),
        "data": {name: {"path": str(ex.path), "sha256": sha256_file(ex.path), "examples": len(ex),
                        "bad_rows": len(ex.bad_rows)} for name, ex in sets.items() if ex is not None},
        "steps": result.steps,
        "unlearning_seconds": round(result.seconds, 2),
        "mask_fraction": result.mask_fraction,
        "evidence": rows,
        "gap_to_reference": gaps(after, rows["reference"]) if "reference" in rows else None,
        "reference": str(reference) if reference is not None else None,
        "history": result.history,
        "lr": lr,
        "lr_search": tried if isinstance(t.lr, list) else None,
        "calibration": stop.report() if stop else None,
        "verdict": verdict(after, rows.get("reference"), t.tolerance),
        "wall_time_s": round(time.perf_counter() - start, 1),
        "peak_rss_mb": peak_rss_mb(),
        "environment": environment(),
        "output": {"path": str(out), "kind": "adapter" if hasattr(result.model, "peft_config") else "model"},
    }
    from accelerate import PartialState  # the state `unlearn` set up: one process writes under torchrun

    state = PartialState()
    if state.is_main_process:
        with atomic_dir(out, force=force) as tmp:
            result.model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            write_report(tmp, report, report_markdown(f"forget: {recipe.objective}", report))
            evidence_plot(tmp / "evidence.png", rows, title=f"{recipe.objective}: {report['verdict']}")
    state.wait_for_everyone()
    return report


def guard_rows(retain: list, seed: int, most: int = 64) -> list:
    """The retain rows the retain guard measures at each check: a seeded sample, so a check costs the same
    however large the retain set is (they stay in training; the guard watches utility, not membership)."""
    return random.Random(seed).sample(retain, min(most, len(retain)))


def split_calibration(items: dict, share: float, seed: int) -> list:
    """Take a seeded `share` of the holdout rows out of `items` for the stopping rule (they never enter the
    evidence, so the reported attack is not the one the rule tuned on); returns them."""
    rows = list(items["holdout"])
    random.Random(seed).shuffle(rows)
    n = max(MIN_ROWS, round(share * len(rows)))
    if len(rows) - n < 1:
        raise InputError(f"data.holdout: {len(rows)} rows; training.stop_at needs at least {MIN_ROWS} for calibration "
                         f"and 1 for the evidence (training.calibration takes {n})")
    items["holdout"] = rows[n:]
    return rows[:n]


def verdict(after: dict, reference: dict | None, tolerance: float) -> str | None:
    """Which side of the retrain target the unlearned model is on, in words: against the retrained model's
    membership AUC when there is one (MUSE's PrivLeak sign), else against 0.5."""
    if "membership_auc" not in after:
        return None
    target = reference["membership_auc"] if reference and "membership_auc" in reference else 0.5
    return side(after["membership_auc"] - target + 0.5, tolerance)


def evidence_plot(path: Path, rows: dict, title: str | None = None) -> None:
    """Bars per model: accuracy on each set and the membership AUC."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [(s, "accuracy") for s in ("forget", "retain", "holdout") if s in next(iter(rows.values()))]
    names = [f"{s} accuracy" for s, _ in metrics] + (["membership AUC"] if "membership_auc" in
                                                      next(iter(rows.values())) else [])
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(names), 3.2))
    width = 0.8 / len(rows)
    for j, (model, r) in enumerate(rows.items()):
        values = [r[s][m] for s, m in metrics] + ([r["membership_auc"]] if "membership_auc" in r else [])
        ax.bar([i + j * width for i in range(len(values))], values, width, label=model)
    ax.set_xticks([i + width * (len(rows) - 1) / 2 for i in range(len(names))], names)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report_markdown(title: str, r: dict) -> str:
    lines = [f"# {title}", "", f"- model: `{r['model']}`"] + trusted_lines(r.get("trusted", {}))
    lines += [f"- {name}: `{v['path']}` ({v['examples']} rows)" for name, v in r["data"].items()]
    rows = r["evidence"]
    sets = [s for s in ("forget", "retain", "holdout") if s in next(iter(rows.values()))]
    head = [f"{s} {m}" for s in sets for m in ("loss", "accuracy", "exact")] + ["membership AUC (loss)",
                                                                             "membership AUC (min-k%)"]
    lines += ["", "| model | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
    for name, e in rows.items():
        vals = [f"{e[s][m]:.4f}" for s in sets for m in ("loss", "accuracy", "exact")]
        vals += [f"{e[k]:.3f}" if k in e else "-" for k in ("membership_auc", "membership_auc_min_k")]
        lines.append(f"| {name} | " + " | ".join(vals) + " |")
    if r.get("relearning"):
        lines += ["", "Relearning attack (fine-tune on a part of the forget set, measure the rest):", ""]
        for name, a in r["relearning"].items():
            lines.append(f"- {name}: trained on {a['trained_on']} rows for {a['steps']} steps; held-out forget "
                         f"accuracy {a['before']['accuracy']:.4f} -> {a['after']['accuracy']:.4f}")
        lines.append(f"- recovered: {json.dumps(r['recovered'])}")
    if r.get("unlearning_seconds") is not None:
        lines += ["", f"- {r['steps']} steps in {r['unlearning_seconds']} s; wall time {r['wall_time_s']} s, "
                      f"peak RSS {r['peak_rss_mb']} MB"]
    if r.get("gap_to_reference"):
        lines.append(f"- gap to reference `{r['reference']}`: {json.dumps(r['gap_to_reference'])}")
    if r.get("verdict"):
        against = "the retrained model's membership AUC" if "reference" in rows else "0.5 (a retrained model's level)"
        lines.append(f"- verdict: **{r['verdict']}** (the membership attack against {against}: under-unlearned "
                     f"means the forget rows still stand out as members, over-unlearned that they stand out by "
                     f"being worse than unseen rows)")
    if r.get("lr_search"):
        tried = [f"{x['lr']} (" + (f"stopped at step {x['stopped_at']}" if x["stopped_at"] else
                                   f"ran all {x['steps']} steps")
                 + (f", retain limit first passed at step {x['broken_at']}" if x.get("broken_at") else "")
                 + f", distance {x['distance']})" for x in r["lr_search"]]
        lines.append(f"- step size: {r['lr']}, of {'; '.join(tried)} (the first that reaches the target, else the "
                     "closest at its end, one that ends within the retain limit before one that does not)")
    c = r.get("calibration")
    if c:
        where = f", then back to step {c['restored_to']} (closer to the target)" if c["restored_to"] else ""
        guard = ""
        if c.get("retain_limit") is not None:
            guard = f", keeping no check whose retain loss passes {c['retain_limit']:.4f}"
            if c["broken_at"]:
                where += (f"; the retain loss passed that limit first at step {c['broken_at']}"
                          + (" and the model ends past it" if c["kept_broken"] else ""))
        lines.append(f"- calibrated stopping ({c['rule']}, tolerance {c['tolerance']}, checked every "
                     f"{c['check_every']} steps on {c['calibration_rows']} calibration rows{guard}): stopped at "
                     f"step {c['stopped_at']}{where}; {c['verdict']} on the rule's own measure")
        lines.append("- curve: " + "; ".join(f"step {p['step']}: " + ", ".join(f"{k} {v}" for k, v in p.items()
                                                                            if k != "step") for p in c["curve"]))
    return "\n".join(lines) + "\n"
