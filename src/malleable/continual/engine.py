"""The stream runner: one pass over each step's data in fixed-size batches, a method's loss, and a checkpoint per step.

Read top to bottom: check the recipe and the output, load the stream's data, build the model from the seed;
then for every step walk the step's examples (a seeded order that depends only on the seed and the step) in
batches of `training.batch_size`, each with a batch drawn from the reservoir buffer for replay methods, take one
SGD step, and offer the incoming batch to the buffer AFTER the step (ER's rule). After every step the model is
scored on every task's test images (row i of the accuracy matrix; row 0 is the starting model, so forward
transfer has its baseline) and the whole state is checkpointed.

A `{forget: ...}` step (a class, an earlier learn step or a seeded sample; continual/stream.py `resolve` has the
rules) runs continual/unlearning.py's `forget_step`: the forgotten examples leave the buffer, the method unlearns
them (by default the recipe's `forget` objective through `malleable forget`'s engine), and the step is scored
with the classifier protocol's UA / RA / TA / MIA against a model retrained from scratch on what should be known.
Forgotten examples are never replayed, never walked by a later step (joint's included) and never in a retrain.
The accuracy matrix has a row after every step, learn or forget, and a column per learn step; a cell scores
the column's classes that are not forgotten at that row, and is None ("forgotten") when all of them are. The
summary metrics (average accuracy, forgetting, ...) are taken over the rows after learn steps, None cells left out.

What is learn's and what is not:
* the optimiser step is learn's `optimizer_step` (loss, backward, finite-loss check; called with one unit, as
  a method's loss is already a mean), and the accelerator its `make_accelerator`. The optimiser is plain SGD
  (`training.lr`, `training.momentum`, default 0), not a learn method's AdamW: the online continual-learning
  codes (mammoth, which the LAS authors build on, and Caccia et al.'s) train with SGD, and their step sizes
  mean SGD's. No augmentation is applied, so the buffer stores the stream's images as they came;
* checkpoints are learn's `save_checkpoint` / `load_checkpoint` (weights, optimiser, scheduler, RNG, no
  pickle), one per stream step, all kept while the stream runs. The stream's own state (the buffer and its
  generator, the method's running numbers, the matrix rows so far) goes into `OUT.run/stream-<step>/`, written
  atomically BEFORE learn's checkpoint, which is the commit point: `--resume` restarts after the newest learn
  checkpoint and reads the stream state of the same step, so a killed stream ends identical to an unbroken one;
* learn's loop itself (`learn.engine.learn`) is not reused: it walks one dataset of tokenised examples for a
  number of optimiser steps with a global batch split over processes; a stream needs per-step data, a replay
  batch per step drawn from state that changes after every step, and evaluation between steps. The stream
  runs in ONE process (online learning is sequential); `accelerate launch` with several is refused.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from malleable.continual.buffer import Reservoir
from malleable.continual.registry import ContinualMethod, get_method
from malleable.continual.stream import StreamStep, Task, load_tasks, resolve, stream_classes, stream_steps
from malleable.continual.unlearning import forget_step, score_step
from malleable.errors import InputError, RecipeError, reason
from malleable.evaluate.classification import accuracy
from malleable.evaluate.continual import summary
from malleable.io.atomic import atomic_dir
from malleable.learn.checkpoint import (PREFIX, check_same_recipe, latest_checkpoint, load_checkpoint, run_folder,
                                       save_checkpoint)
from malleable.learn.engine import check_finite_weights, make_accelerator, optimizer_step
from malleable.recipes.continual import (AnyContinualRecipe, ContinualRecipe, TaskStreamRecipe,
                                         load_continual_recipe)
from malleable.report import run_fields, write_report

SCHEMA = "malleable.continual/1"
STREAM = "stream-"


def check_recipe(recipe: ContinualRecipe) -> tuple[ContinualMethod, list[StreamStep]]:
    """Everything that can be checked without data: the method, its parameters, the stream's steps, and for a
    stream with forget steps the forget objective, its parameters and mask."""
    method = get_method(recipe.method, recipe.parameters)
    if method.stream != "classes":
        raise RecipeError(f"method: {recipe.method} is a LoRA post-training strategy; give it a language model and "
                          "a `tasks:` list instead of a classifier stream")
    steps = stream_steps(recipe)
    t = recipe.training
    if method.replay and (t.buffer_size == 0 or t.replay_batch_size == 0):
        key = "buffer_size" if t.buffer_size == 0 else "replay_batch_size"
        raise RecipeError(f"training.{key}: {recipe.method} replays from a buffer; set it above 0 (finetune is "
                          "the method without replay)")
    if any(s.kind == "forget" for s in steps) and type(method).forget is ContinualMethod.forget:
        from malleable.forget.registry import get_mask, get_objective

        f = recipe.forget
        try:
            objective = get_objective(f.objective, f.parameters)
            if f.mask is not None:
                get_mask(f.mask)
        except RecipeError as e:  # name the recipe's section
            raise RecipeError(f"forget.{e}") from None
        if "classifier" not in objective.kinds:
            raise RecipeError(f"forget.objective: {f.objective} is for language models, not this classifier")
        keeps = method.retain(Reservoir(0, 0), [0])  # None: the method holds no data to keep training on
        if objective.needs_retain and keeps is None:
            raise RecipeError(f"forget.objective: {f.objective} needs retain data and {recipe.method} keeps none "
                              "(no buffer); use a replay method or an objective without retain data (ga)")
    return method, steps


def _check(recipe: AnyContinualRecipe):
    if isinstance(recipe, TaskStreamRecipe):
        from malleable.continual.task_stream import check_recipe as check_tasks

        return check_tasks(recipe)
    return check_recipe(recipe)


def read_recipe(path: str | Path) -> AnyContinualRecipe:
    """A continual recipe file, validated, its method and stream included (problems name the file)."""
    return load_continual_recipe(path, _check)


def plan(recipe: AnyContinualRecipe) -> str:
    """The `--dry-run` text."""
    if isinstance(recipe, TaskStreamRecipe):
        from malleable.continual.task_stream import plan as plan_tasks

        return plan_tasks(recipe)
    method, steps = check_recipe(recipe)
    classes = stream_classes(recipe)
    t = recipe.training
    replay = f", replay {t.replay_batch_size} from a reservoir of {t.buffer_size}" if method.replay else ""
    shown = " ".join(str(classes[s.task]) if s.kind == "learn" else f"forget{json.dumps(s.request)}" for s in steps)
    text = (f"continual {recipe.method} {json.dumps(method.p)} on {recipe.model} (width {recipe.width}), "
            f"{recipe.dataset}" + (f" ({recipe.stream})" if isinstance(recipe.stream, str) else "")
            + f": {len(steps)} steps {shown}; batch {t.batch_size}{replay}; SGD lr {t.lr}; seed {recipe.seed}")
    if any(s.kind == "forget" for s in steps):
        f, e = recipe.forget, recipe.evaluate
        mask = f" mask {json.dumps(f.mask)}" if f.mask else ""
        how = (f"{recipe.method}'s own update" if type(method).forget is not ContinualMethod.forget else
               f"objective {f.objective} {json.dumps(f.parameters)}{mask}")
        text += (f"; forget steps: {how}, {f.steps} steps, lr {f.lr}, batch {f.batch_size}; retrain gold standard: "
                 f"{e.retrain}" + ("" if e.retrain == "off" else f" ({e.retrain_epochs} epochs)"))
    return text


def _order(n: int, seed: int, step: int, passes: int) -> list[int]:
    """The step's example order: one seeded permutation per pass, a function of (seed, step, pass) only."""
    out: list[int] = []
    for p in range(passes):
        g = torch.Generator().manual_seed(seed * 1_000_003 + step * 1_009 + p)
        out += torch.randperm(n, generator=g).tolist()
    return out


def _scores(model: torch.nn.Module, tasks: list[Task], forgotten: frozenset[int] = frozenset()) -> list[float | None]:
    """Row of the matrix: each task's test images of its classes not in `forgotten` (None: all forgotten)."""
    row = []
    for task in tasks:
        test = [ex for ex in task.test if ex[1] not in forgotten]
        row.append(round(accuracy(model, test), 4) if test else None)
    return row


def _seen_tests(tasks: list[Task], upto: int, forgotten: frozenset[int] = frozenset()) -> list:
    return [ex for task in tasks[:upto] for ex in task.test if ex[1] not in forgotten]


def _resume_state(run_dir: Path, recipe_json: dict, model, optimizer, scheduler, buffer, method,
                  total: int) -> tuple[int, dict]:
    """Restore the newest finished step; returns (step, the stream's JSON state at it)."""
    found = latest_checkpoint(run_dir)
    if found is None:
        return 0, {}
    check_same_recipe(run_dir, recipe_json)
    try:  # our own files, but a crash, a full disk or a user's edit can leave anything in them
        step, rng = load_checkpoint(found, model, optimizer, scheduler, 0)
        if not isinstance(step, int) or not 0 < step <= total:
            raise ValueError(f"step {step!r} outside 1..{total}")
        own = run_dir / f"{STREAM}{step:06d}"
        tensors = load_file(own / "state.safetensors")
        buffer.load_state(tensors)
        method.load_state(tensors)
        state = json.loads((own / "state.json").read_text())
        if rng is not None:
            torch.set_rng_state(rng)
    except Exception as e:  # safetensors, json, torch and the optimizer each raise their own types
        raise InputError(f"{found}: damaged checkpoint, cannot resume ({reason(e, typed=True)}); "
                         "--force starts over") from None
    return step, state


def _checkpoint(run_dir: Path, step: int, model, optimizer, scheduler, buffer: Reservoir, method: ContinualMethod,
                state: dict, keep: int) -> None:
    """The stream's state first (atomic), then learn's checkpoint of the same step (the commit point)."""
    with atomic_dir(run_dir / f"{STREAM}{step:06d}", force=True) as tmp:
        save_file({k: v.contiguous() for k, v in (buffer.state() | method.state()).items()},
                  tmp / "state.safetensors")
        (tmp / "state.json").write_text(json.dumps(state))
    save_checkpoint(run_dir, step, model, optimizer, scheduler, [torch.get_rng_state()], write=True, keep=keep)


def continual(recipe: AnyContinualRecipe, out: str | Path, *, force: bool = False, resume: bool = False,
              progress: bool = True) -> dict:
    """Run the recipe's stream; write the final model, one weights file per step and the report to `out`. A
    `tasks:` recipe (LoRA post-training of a language model) runs continual/task_stream.py instead."""
    if isinstance(recipe, TaskStreamRecipe):
        from malleable.continual.task_stream import run_tasks

        return run_tasks(recipe, out, force=force, resume=resume, progress=progress)
    from tqdm.auto import tqdm

    from malleable.models.vision import small_cnn

    start = time.perf_counter()
    method, steps = check_recipe(recipe)
    t = recipe.training
    out, run_dir = run_folder(out, force=force, resume=resume)
    tasks, num_classes, shape = load_tasks(recipe, stream_classes(recipe))
    plan_ = resolve(steps, tasks, recipe.seed)
    lookup = {i: ex for task in tasks for i, ex in zip(task.ids, task.train)}
    stream_size = sum(len(task.train) for task in tasks)
    if method.replay and t.buffer_size > stream_size:
        raise RecipeError(f"training.buffer_size: {t.buffer_size} is larger than the whole stream ({stream_size} "
                          "examples); the buffer would hold every example, which is not replay but joint training")
    accelerator = make_accelerator()
    if accelerator.num_processes > 1:
        raise RecipeError("continual: an online stream runs in one process; launch it without accelerate's "
                          f"{accelerator.num_processes} processes")
    device = accelerator.device

    def make_model() -> torch.nn.Module:  # the stream's initial weights when the seed was just set
        return small_cnn(shape[0], num_classes, shape[1], recipe.width).to(device)

    torch.manual_seed(recipe.seed)
    model = make_model()
    method.setup(num_classes)
    model = method.prepare(model, "classification")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=t.lr, momentum=t.momentum)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    buffer = Reservoir(t.buffer_size if method.replay else 0, recipe.seed + 1)

    recipe_json = json.loads(recipe.model_dump_json())
    if force and not resume and run_dir.exists():
        shutil.rmtree(run_dir)
    done, state = (_resume_state(run_dir, recipe_json, model, optimizer, scheduler, buffer, method, len(steps))
                   if resume and run_dir.exists() else (0, {}))
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "recipe.json").write_text(json.dumps(recipe_json))
    state = state or {"matrix": [_scores(model, tasks)], "anytime": [], "steps": []}
    state.setdefault("forget", [])  # a run checkpointed by an older version has neither
    state.setdefault("every_step", [])

    for k in range(done, len(steps)):
        now = plan_[k]
        if now.step.kind == "forget":
            entry = forget_step(model, method, buffer, now, lookup, tasks, recipe, make_model, recipe.seed + k, k)
            check_finite_weights(params, accelerator)
            state["matrix"].append(_scores(model, tasks, now.forgotten_classes))
            state["forget"].append({"step": k + 1, **entry})
            state["steps"].append({"step": k + 1, "kind": "forget", "request": now.step.request,
                                   "examples": len(now.ids), "batches": 0, "seconds": entry["method"]["seconds"]})
            _checkpoint(run_dir, k + 1, model, optimizer, scheduler, buffer, method, state, keep=len(steps) + 1)
            continue
        task = tasks[now.step.task]
        before = plan_[k - 1].learned if k else frozenset()
        seen = list(dict.fromkeys(j for r in plan_[:k] if r.step.kind == "learn" for j in r.ids if j in before))
        # the method picks examples as (image, label, id) triples; the id goes to the buffer, not to the model
        examples, passes = method.examples([(*lookup[j], j) for j in now.ids], [(*lookup[j], j) for j in seen])
        order = _order(len(examples), recipe.seed, k, passes)
        batches = [order[i:i + t.batch_size] for i in range(0, len(order), t.batch_size)]
        step_start, losses = time.perf_counter(), []
        model.train()
        for b, idx in enumerate(tqdm(batches, disable=not progress, desc=f"step {k + 1}/{len(tasks)} {recipe.method}",
                                     unit="batch", dynamic_ncols=True, leave=False)):
            incoming = {"x": torch.stack([examples[i][0] for i in idx]),
                        "labels": torch.tensor([examples[i][1] for i in idx])}
            incoming_ids = torch.tensor([examples[i][2] for i in idx])
            replay = method.retrieve(model, incoming, buffer, t.replay_batch_size, t.lr) if method.replay else None
            batch = {name: None if part is None else {n: v.to(device) for n, v in part.items()}
                     for name, part in (("stream", incoming), ("replay", replay))}
            loss, _ = optimizer_step(method, model, optimizer, params, [batch], 1, accelerator, None)
            optimizer.zero_grad(set_to_none=True)
            if method.replay:
                buffer.add(incoming["x"], incoming["labels"], incoming_ids)
            losses.append(loss)
            if t.eval_every and (b + 1) % t.eval_every == 0:
                state["anytime"].append({"step": k + 1, "batch": b + 1, "accuracy": round(accuracy(
                    model, _seen_tests(tasks, now.step.task + 1, now.forgotten_classes)), 4)})
                model.train()
        check_finite_weights(params, accelerator)
        trained = time.perf_counter()
        model.eval()
        state["matrix"].append(_scores(model, tasks, now.forgotten_classes))
        if recipe.evaluate.retrain == "every_step":
            forgotten = sorted(now.forgotten - now.learned)
            state["every_step"].append({"step": k + 1, **score_step(model, now, forgotten, lookup, tasks, recipe,
                                                                    make_model, None)})
        state["steps"].append({"step": k + 1, "kind": "learn", "classes": task.classes, "examples": len(examples),
                               "passes": passes,
                               "batches": len(batches), "mean_loss": round(sum(losses) / max(1, len(losses)), 6),
                               "seconds": round(trained - step_start, 3),  # training (anytime evaluations included)
                               "eval_seconds": round(time.perf_counter() - trained, 3)})
        _checkpoint(run_dir, k + 1, model, optimizer, scheduler, buffer, method, state, keep=len(steps) + 1)

    model.eval()
    R = state["matrix"]
    learn_rows = [0] + [k + 1 for k, r in enumerate(plan_) if r.step.kind == "learn"]
    learn_steps = [s for s in state["steps"] if s.get("kind", "learn") == "learn"]
    report = {
        "schema": SCHEMA,
        "method": recipe.method,
        "parameters": method.p,
        "recipe": recipe_json,
        "stream": {"scenario": recipe.stream if isinstance(recipe.stream, str) else None, "dataset": recipe.dataset,
                   "steps": [task.classes for task in tasks], "train_examples": [len(task.train) for task in tasks],
                   "test_examples": [len(task.test) for task in tasks],
                   "batches": sum(s["batches"] for s in state["steps"]),
                   "plan": [{"learn": tasks[r.step.task].classes} if r.step.kind == "learn" else
                            {"forget": r.step.request} for r in plan_]},
        "model": {"name": recipe.model, "in_channels": shape[0], "num_classes": num_classes,
                  "image_size": shape[1], "width": recipe.width, "parameters": sum(p.numel() for p in params)},
        "buffer": {"size": t.buffer_size, "filled": len(buffer), "seen": buffer.seen} if method.replay else None,
        "accuracy_matrix": R,  # a row after every step, learn or forget; None: the column's classes are forgotten
        "learn_rows": learn_rows,  # the rows after learn steps (row 0 the start): what `metrics` is taken over
        "metrics": summary([R[i] for i in learn_rows]),
        "forget_steps": state.get("forget", []),
        "every_step": state.get("every_step", []),
        "evaluate": recipe_json["evaluate"],
        "anytime": state["anytime"],
        **run_fields(state["steps"], done, device, start, out),
    }
    with atomic_dir(out, force=force) as tmp:
        save_file({n: p.detach().cpu().contiguous() for n, p in model.state_dict().items()},
                  tmp / "model.safetensors")
        (tmp / "model.json").write_text(json.dumps(report["model"], indent=2) + "\n")
        (tmp / "steps").mkdir()
        for k in range(1, len(steps) + 1):
            shutil.copy(run_dir / f"{PREFIX}{k:06d}" / "trainable.safetensors", tmp / "steps" / f"step-{k}.safetensors")
        write_report(tmp, report, markdown(report))
        from malleable.continual.plots import plot_matrix, plot_stream

        plot_matrix(tmp / "accuracy_matrix.png", R, [task.classes for task in tasks], recipe.method,
                    _row_labels(plan_))
        plot_stream(tmp / "accuracy_stream.png", [R[i] for i in learn_rows], state["anytime"], learn_steps,
                    recipe.method)
    if not recipe.keep_checkpoints:
        shutil.rmtree(run_dir, ignore_errors=True)
    return report


def _row_labels(plan_) -> list[str]:
    """The matrix rows' names: start, then "step k" or "step k forget {...}"."""
    return ["start"] + [f"step {k + 1}" + ("" if r.step.kind == "learn" else
                                           " forget " + ", ".join(f"{a} {b}" for a, b in r.step.request.items()))
                        for k, r in enumerate(plan_)]


def _cell(v) -> str:
    return "forgotten" if v is None else f"{v:.2f}"


def _num(v, nd: int = 2) -> str:
    return "-" if v is None else f"{v:.{nd}f}"


CELLS = ("UA", "RA", "TA", "MIA", "MIA_AUC")


def forget_table(rows: list[dict]) -> list[str]:
    """The per-forget-step table: the method vs the retrained gold standard, the gap and the times."""
    if not rows:
        return []
    gold = "retrain" in rows[0]
    head = "| step | request | forgotten | UA before | UA | RA | TA | MIA | MIA AUC |" + (
        " UA retrain | RA retrain | TA retrain | MIA retrain | MIA AUC retrain | avg gap | AUC gap | seconds | "
        "retrain s | time / retrain |" if gold else " seconds |")
    lines = ["", "Forget steps (UA = 100 - accuracy on the images forgotten at that step, RA = accuracy on the "
             "learned and not forgotten training images, TA = test accuracy on the classes that should be known, "
             "MIA = SalUn's MIA-efficacy on the forgotten images; percent; MIA AUC = membership AUC of the true "
             "label's probability, forgotten images against their classes' test images, 0.5 = they look unseen; "
             "avg gap = mean of the four percent gaps; UA before: the model as the learn steps left it):", "", head,
             "|---" * (head.count("|") - 1) + "|"]
    for f in rows:
        m = f["method"]
        req = ", ".join(f"{a} {b}" for a, b in f["request"].items())
        cells = [str(f["step"]), req, str(f["forgotten"]), _num(f.get("before", {}).get("UA"))] + [
            _num(m.get(k), 3 if k == "MIA_AUC" else 2) for k in CELLS]
        if gold:
            g = f["retrain"]
            cells += [_num(g.get(k), 3 if k == "MIA_AUC" else 2) for k in CELLS] + [
                _num(f["gap"]["avg"]), _num(f["gap"].get("MIA_AUC"), 3), _num(m["seconds"]), _num(g["seconds"]),
                _num(f["time_ratio"], 3)]
        else:
            cells.append(_num(m["seconds"]))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def markdown(r: dict) -> str:
    R, m = r["accuracy_matrix"], r["metrics"]
    T = len(R[0])
    s = r["stream"]
    plan_ = s.get("plan") or [{"learn": c} for c in s["steps"]]
    labels = ["start"] + [f"step {k + 1}" + ("" if "learn" in p else " forget " + ", ".join(
        f"{a} {b}" for a, b in p["forget"].items())) for k, p in enumerate(plan_)]
    lines = [f"# continual: {r['method']}", "",
             f"- stream: {s['scenario'] or 'custom'} on {s['dataset']}, {T} learn steps of classes "
             + ", ".join(str(c) for c in s["steps"]) + f" ({sum(s['train_examples'])} training images, one pass "
             f"for online methods)" + (f", {len(plan_) - T} forget steps" if len(plan_) > T else ""),
             f"- method: {r['method']} {json.dumps(r['parameters'])}; model {r['model']['name']} "
             f"({r['model']['parameters']:,} parameters)",
             f"- recipe training: {json.dumps(r['recipe']['training'])}; seed {r['recipe']['seed']}"]
    if r["buffer"]:
        lines.append(f"- buffer: {r['buffer']['filled']} of {r['buffer']['size']} slots filled, "
                     f"{r['buffer']['seen']} examples offered")
    lines += ["", "Accuracy matrix (%; row i = after step i, row 0 = the starting model; column j = task j's test "
              "images of its classes not forgotten at that row; forgotten: all of them are):", "",
              "| after | " + " | ".join(f"task {j + 1}" for j in range(T)) + " |", "|---" * (T + 1) + "|"]
    for label, row in zip(labels, R):
        lines.append(f"| {label} | " + " | ".join(_cell(v) for v in row) + " |")
    lines += ["", "| metric | value |", "|---|---|"]
    lines += [f"| {k.replace('_', ' ')} | {_num(v)} |" for k, v in m.items()]
    lines += forget_table(r.get("forget_steps", []))
    if r.get("every_step"):
        lines += ["", "Every learn step against the retrained gold standard (evaluate.retrain: every_step):", "",
                  "| step | RA | TA | RA retrain | TA retrain | avg gap | retrain s |", "|---" * 7 + "|"]
        lines += [f"| {e['step']} | {_num(e['method']['RA'])} | {_num(e['method']['TA'])} | "
                  f"{_num(e['retrain']['RA'])} | {_num(e['retrain']['TA'])} | {_num(e['gap']['avg'])} | "
                  f"{_num(e['retrain']['seconds'])} |" for e in r["every_step"]]
    lines += ["", f"- training {r['train_seconds']} s, wall time {r['wall_time_s']} s, peak RSS {r['peak_rss_mb']} MB, "
                  f"device {r['device']}" + (f"; resumed after step {r['resumed_from_step']}"
                                            if r["resumed_from_step"] else ""),
              "- plots: accuracy_matrix.png (heat map), accuracy_stream.png (accuracy over the stream)", ""]
    return "\n".join(lines)
