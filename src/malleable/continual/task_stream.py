"""The task stream: continual LoRA post-training of a language model, one task after another.

Read top to bottom: check the recipe and the output; read every task's training and test rows, the composed
(two-skill) test rows and the probe text; load the model and add the LoRA adapter (learn's `lora` parameters);
score the starting model (row 0). Then for every task: the strategy's `begin_task`, training through learn's
in-memory loop (`learn.engine.fit`: the seeded batch order, AdamW, the schedule, clipping) on the examples the
strategy picks, its `end_task`, and the scores of row t + 1: every task's test rows (exact match under teacher
forcing, `evaluate.scoring.forced_match`), the composed rows, and the probe's perplexity. After every task the
stream's adapter is written as a PEFT adapter and the whole state checkpointed (`OUT.run/step-<t>/`, atomic), so
`--resume` continues after the newest finished task and ends identical to an unbroken stream.

The report carries the accuracy matrix R[i][j] (task j's test exact match after task i; row 0 the starting
model) and its metrics (evaluate/continual.py: average accuracy, forgetting, backward and forward transfer,
plasticity), the generality probe per row (perplexity on text none of the tasks is about, and its ratio to the
starting model's) and the cross-task rows per row: T2I-ConBench's four dimensions (retention, plasticity,
generality, cross-task generalisation) on a language model.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from malleable.continual.adapters import AdapterStrategy, adapter_params
from malleable.continual.registry import METHODS, get_method
from malleable.errors import InputError, RecipeError, reason
from malleable.evaluate.continual import summary
from malleable.io.atomic import atomic_dir
from malleable.recipes.continual import TaskStreamRecipe
from malleable.learn.checkpoint import check_same_recipe, latest_checkpoint, run_folder
from malleable.report import run_fields, write_report

SCHEMA = "malleable.continual.tasks/1"
STEP = "step-"
UNSUPPORTED = {"eval_every": "validation during a task", "patience": "early stopping",
               "checkpoint_every": "checkpoints inside a task (the stream checkpoints after every task)"}


def check_recipe(recipe: TaskStreamRecipe):
    """(strategy, LoRA parameters): everything checked without data."""
    from malleable.learn.registry import METHODS as LEARN

    method = get_method(recipe.method, recipe.parameters)
    if method.stream != "tasks":
        strategies = sorted(n for n, cls in METHODS.items() if cls.stream == "tasks")
        raise RecipeError(f"method: {recipe.method} is an online classifier method; a `tasks:` stream takes an "
                          f"adapter strategy ({', '.join(strategies)})")
    lora = LEARN.build("lora", recipe.lora, prefix="lora").p
    t = recipe.training
    for key, what in UNSUPPORTED.items():
        if getattr(t, key):
            raise RecipeError(f"training.{key}: {what} is not part of a task stream; remove it")
    if t.sharding != "none":
        raise RecipeError("training.sharding: a task stream runs in one process; use sharding: none")
    return method, lora


def plan(recipe: TaskStreamRecipe) -> str:
    """The `--dry-run` text."""
    method, lora = check_recipe(recipe)
    t, e = recipe.training, recipe.evaluate
    length = f"{t.steps} steps" if t.steps else f"{t.epochs} epochs"
    composed = f"; composed tests {', '.join(c.name for c in e.composed)}" if e.composed else ""
    return (f"continual {recipe.method} {json.dumps(method.p)} on {recipe.model}: LoRA {json.dumps(lora)}; "
            f"{len(recipe.tasks)} tasks {' -> '.join(x.name for x in recipe.tasks)}; {length} per task, batch "
            f"{t.batch_size}, lr {t.lr}; probe {e.probe or 'none'}{composed}; seed {recipe.seed}")


def _test_rows(path: Path, spec, limit: int | None) -> list[dict]:
    """A test file's rows as {prompt, completion} records (at most `limit`)."""
    from malleable.data.files import load_table

    rows, where = load_table(path)
    out = []
    for row, at in zip(rows, where):
        p, c = row.get(spec.prompt_field), row.get(spec.completion_field)
        if not isinstance(p, str) or not isinstance(c, str) or not p.strip() or not c.strip():
            raise InputError(f"{path}: {at}: needs text fields '{spec.prompt_field}' and '{spec.completion_field}'")
        out.append({"prompt": p, "completion": c})
    if not out:
        raise InputError(f"{path}: no rows")
    return out[:limit]


def _inputs(recipe: TaskStreamRecipe) -> list[Path]:
    paths = [recipe.model] + [p for t in recipe.tasks for p in (t.train, t.test)] + [c.test for c in
                                                                                     recipe.evaluate.composed]
    probe = recipe.evaluate.probe
    return paths + ([Path(probe)] if probe and probe.endswith(".txt") else [])


class _Scorer:
    """Row t of the report: every task's and composed test's exact match (%), and the probe's perplexity."""

    def __init__(self, tokenizer, tests: dict[str, list[dict]], composed: dict[str, list[dict]], windows, chat: bool,
                 batch_size: int):
        self.tokenizer, self.tests, self.composed, self.windows = tokenizer, tests, composed, windows
        self.chat, self.batch_size = chat, batch_size

    def _match(self, model, records) -> float:
        from malleable.evaluate.scoring import forced_match

        hits = forced_match(model, self.tokenizer, records, chat=self.chat, batch_size=self.batch_size)
        return round(100.0 * sum(hits) / len(hits), 4)

    @torch.no_grad()
    def row(self, model) -> dict:
        from malleable.evaluate.perplexity import perplexity, window_nll

        model.eval()
        out = {"tasks": [self._match(model, r) for r in self.tests.values()],
               "composed": [self._match(model, r) for r in self.composed.values()]}
        if self.windows is not None:
            out["probe_ppl"] = round(perplexity(window_nll(model, self.windows), self.windows.shape[1]), 4)
        return out


def _write_adapter(directory: Path, deltas, base: Path) -> None:
    from malleable.io.adapter import write_adapter

    directory.mkdir(parents=True)
    write_adapter(directory, deltas, {"base_model_name_or_path": str(base), "task_type": "CAUSAL_LM"},
                  torch.float32)


def _checkpoint(run_dir: Path, step: int, model, method: AdapterStrategy, state: dict, base: Path) -> None:
    """Everything after task `step` in one atomic folder: the trainable adapter, the strategy's state, the rows so
    far, and the stream's adapter as PEFT writes it."""
    with atomic_dir(run_dir / f"{STEP}{step:06d}", force=True) as tmp:
        tensors = {f"adapter.{k}": p.detach().cpu().contiguous() for k, p in adapter_params(model).items()}
        save_file(tensors | {k: v.detach().cpu().contiguous() for k, v in method.state().items()},
                  tmp / "state.safetensors")
        (tmp / "state.json").write_text(json.dumps(state))
        _write_adapter(tmp / "adapter", method.adapter(model), base)


def _resume(run_dir: Path, recipe_json: dict, model, method: AdapterStrategy, total: int) -> tuple[int, dict]:
    """(tasks done, the rows so far) from the newest finished step; (0, {}) when there is none."""
    found = latest_checkpoint(run_dir, STEP)
    if found is None:
        return 0, {}
    check_same_recipe(run_dir, recipe_json)
    try:
        step = int(found.name[len(STEP):])
        if not 0 < step <= total:
            raise ValueError(f"step {step} outside 1..{total}")
        tensors = load_file(found / "state.safetensors")
        with torch.no_grad():
            for k, p in adapter_params(model).items():
                p.copy_(tensors.pop(f"adapter.{k}"))
        method.load_state(tensors, model)
        state = json.loads((found / "state.json").read_text())
    except Exception as e:  # safetensors, json, torch and a strategy each raise their own types
        raise InputError(f"{found}: damaged checkpoint, cannot resume ({reason(e, typed=True)}); "
                         "--force starts over") from None
    return step, state


def run_tasks(recipe: TaskStreamRecipe, out: str | Path, *, force: bool = False, resume: bool = False,
              progress: bool = True) -> dict:
    """Run the task stream; write the final adapter, one adapter per task and the report to `out`."""
    from accelerate.utils import set_seed

    from malleable.data.corpus import consecutive_windows
    from malleable.learn.data import collate, load_examples, uses_chat_template
    from malleable.learn.engine import BatchPlan, _units, fit, make_accelerator
    from malleable.learn.lora import with_lora
    from malleable.models.checkpoints import Trust, load_model, load_tokenizer

    start = time.perf_counter()
    method, lora = check_recipe(recipe)
    if not (recipe.model / "config.json").is_file():
        raise InputError(f"{recipe.model}: not a transformers checkpoint (no config.json)")
    inputs = _inputs(recipe)
    out, run_dir = run_folder(out, force=force, resume=resume, inputs=inputs)

    trust = Trust(recipe.trust_remote_code, recipe.allow_pickle)
    tokenizer = load_tokenizer(recipe.model, trust)
    spec, e = recipe.data, recipe.evaluate
    train = {}
    for i, task in enumerate(recipe.tasks):
        examples = load_examples(task.train, spec, tokenizer)
        if examples.format != "prompt_completion":
            raise InputError(f"{task.train}: tasks[{i}] needs prompt/completion rows, not {examples.format}")
        train[task.name] = examples.items
    tests = {t.name: _test_rows(t.test, spec, e.max_test) for t in recipe.tasks}
    composed = {c.name: _test_rows(c.test, spec, e.max_test) for c in e.composed}
    windows = consecutive_windows(tokenizer, e.probe, e.probe_length, e.probe_windows) if e.probe else None
    scorer = _Scorer(tokenizer, tests, composed, windows, uses_chat_template(tokenizer, spec.chat_template),
                     e.batch_size)
    pad = tokenizer.pad_token_id

    def batch(items: list) -> dict:
        return collate(items, pad)

    device = make_accelerator(recipe.training.mixed_precision).device
    model = load_model(recipe.model, "causal_lm", pad, trust=trust).to(device)
    set_seed(recipe.seed)
    model = with_lora(model, lora, "causal_lm", prefix="lora")
    method.setup(0)
    method.seed, method.workdir, method.base = recipe.seed, run_dir, recipe.model

    recipe_json = json.loads(recipe.model_dump_json())
    if force and not resume and run_dir.exists():
        shutil.rmtree(run_dir)
    done, state = _resume(run_dir, recipe_json, model, method, len(recipe.tasks)) if resume and run_dir.exists() \
        else (0, {})
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "recipe.json").write_text(json.dumps(recipe_json))
    state = state or {"rows": [scorer.row(model)], "steps": []}

    names = [t.name for t in recipe.tasks]
    for t in range(done, len(names)):
        step_start = time.perf_counter()
        method.begin_task(model, t)
        items, passes = method.examples(train[names[t]], [train[n] for n in names[:t]])
        # `passes` scales a fixed number of steps (joint: steps x tasks); epochs already run over all the items
        steps = BatchPlan(recipe.training, 1, len(items)).steps * (passes if recipe.training.steps else 1)
        training = recipe.training.model_copy(update={"steps": steps, "epochs": None})
        history = fit(model, method, items, batch, [_units(y) for _, y in items], training,
                      recipe.seed * 1_009 + t, progress=progress, desc=f"task {t + 1}/{len(names)} {recipe.method}")
        method.end_task(model, t, train[names[t]], batch)
        trained = time.perf_counter()
        with method.evaluating(model):
            state["rows"].append(scorer.row(model))
        state["steps"].append({"step": t + 1, "task": names[t], "examples": len(items), "steps": steps,
                               "final_loss": history[-1]["loss"], "seconds": round(trained - step_start, 3),
                               "eval_seconds": round(time.perf_counter() - trained, 3)})
        _checkpoint(run_dir, t + 1, model, method, state, recipe.model)

    sizes = {"train": {n: len(v) for n, v in train.items()}, "test": {n: len(v) for n, v in tests.items()},
             "composed": {n: len(v) for n, v in composed.items()}}
    report = _report(recipe, recipe_json, method, lora, state, sizes, done, start, device, out)
    with atomic_dir(out, force=force) as tmp:
        shutil.copytree(run_dir / f"{STEP}{len(names):06d}" / "adapter", tmp / "adapter")
        (tmp / "steps").mkdir()
        for k in range(1, len(names) + 1):
            shutil.copytree(run_dir / f"{STEP}{k:06d}" / "adapter", tmp / "steps" / f"step-{k}")
        write_report(tmp, report, markdown(report))
        from malleable.continual.plots import plot_matrix

        plot_matrix(tmp / "accuracy_matrix.png", report["accuracy_matrix"], names, recipe.method)
    if not recipe.keep_checkpoints:
        shutil.rmtree(run_dir, ignore_errors=True)
    return report


def _report(recipe, recipe_json, method, lora, state, sizes, done, start, device, out) -> dict:
    rows = state["rows"]
    R = [r["tasks"] for r in rows]
    probe = [r.get("probe_ppl") for r in rows]
    return {
        "schema": SCHEMA,
        "method": recipe.method,
        "parameters": method.p,
        "lora": lora,
        "recipe": recipe_json,
        "model": str(recipe.model),
        "tasks": list(sizes["test"]),
        "rows": sizes,
        "accuracy_matrix": R,
        "metrics": summary(R),
        "composed": {"names": list(sizes["composed"]), "matrix": [r["composed"] for r in rows]},
        "generality": {"probe": recipe.evaluate.probe, "perplexity": probe,
                       "ratio_to_start": [None if p is None or probe[0] is None else round(p / probe[0], 4)
                                          for p in probe]},
        **run_fields(state["steps"], done, device, start, out),
    }


def _num(v, nd: int = 2) -> str:
    return "-" if v is None else f"{v:.{nd}f}"


def markdown(r: dict) -> str:
    names, R = r["tasks"], r["accuracy_matrix"]
    labels = ["start"] + [f"after {n}" for n in names]
    lines = [f"# continual: {r['method']} (LoRA post-training)", "",
             f"- model `{r['model']}`, LoRA {json.dumps(r['lora'])}; strategy {r['method']} "
             f"{json.dumps(r['parameters'])}; seed {r['recipe']['seed']}",
             f"- training per task: {json.dumps({k: v for k, v in r['recipe']['training'].items() if v})}", "",
             "Exact match (%, teacher forced) on each task's test rows after each task (row 0 the starting model):",
             "", "| after | " + " | ".join(names) + " | " + " | ".join(r["composed"]["names"])
             + " | probe ppl |", "|---" * (len(names) + len(r["composed"]["names"]) + 2) + "|"]
    for i, label in enumerate(labels):
        cells = [_num(v) for v in R[i]] + [_num(v) for v in r["composed"]["matrix"][i]]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {_num(r['generality']['perplexity'][i])} |")
    lines += ["", "| metric | value |", "|---|---|"]
    lines += [f"| {k.replace('_', ' ')} | {_num(v)} |" for k, v in r["metrics"].items()]
    ratio = r["generality"]["ratio_to_start"][-1]
    lines += [f"| probe perplexity, end / start | {_num(ratio, 3)} |", "",
              f"- training {r['train_seconds']} s, wall time {r['wall_time_s']} s, peak RSS {r['peak_rss_mb']} MB, "
              f"device {r['device']}" + (f"; resumed after task {r['resumed_from_step']}"
                                        if r["resumed_from_step"] else ""),
              "- adapter/: the stream's adapter after the last task (PEFT); steps/step-k/: after task k", ""]
    return "\n".join(lines)
