"""The training loop every verb shares (learn now; forget and continual learning later), on `accelerate`.

Read top to bottom: load and check everything (model, tokenizer, data, method, batch plan) before writing
anything; train; write the output atomically with its report. The same code runs on a CPU, one GPU, or
several processes under `accelerate launch` (DDP, or FSDP with `training.sharding: fsdp`):

* `training.batch_size` is the GLOBAL batch of one optimiser step. Each process takes its slice of it and
  goes through it in micro-batches of `micro_batch_size`; gradients accumulate locally and are averaged
  across processes once per step (under FSDP, into the shards after every micro-batch). Losses are sums
  over units (target tokens) divided by the units of the whole global batch, so 1 process x 8 examples and
  2 processes x 4 give the same gradient.
* The data order is a pure function of the seed and the step (a seeded permutation per epoch), so a run
  resumed from a checkpoint sees exactly the batches it would have seen.
* Work files live in `OUT.run/` (metrics.jsonl, checkpoints, snapshots). A killed run leaves them for
  `--resume`; a finished run moves the metrics and the snapshots (`training.snapshot_every`: the model as a
  loadable folder every N steps, what `merge`'s twa averages) into OUT and deletes the rest (unless
  `training.keep_checkpoints`).
* Early stopping (`training.patience`): the validation loss is computed every `eval_every` steps; once it has
  not improved for `patience` evaluations in a row the loop stops, and the weights of the best evaluation
  (kept in memory: the trainable parameters only) are the output. A resumed run restarts the count.
* Under FSDP (`shard`) each process holds 1/N of the weights, gradients and optimiser state; checkpoints
  and the output are gathered whole onto the main process, so they are the same files as an unsharded run's.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import math
import os
import shutil
import time
from pathlib import Path

import torch

from malleable.errors import InputError, MalleableError, RecipeError, reason
from malleable.io.atomic import atomic_dir
from malleable.io.hashing import sha256_file
from malleable.learn.checkpoint import (PREFIX, check_same_recipe, latest_checkpoint, load_checkpoint, output_state,
                                       run_folder, save_checkpoint, save_snapshot)
from malleable.learn.data import Examples, collate, load_examples
from malleable.learn.loss import task_loss
from malleable.learn.registry import Method, get_method
from malleable.models.checkpoints import Trust, load_model, load_tokenizer
from malleable.recipes.learn import LearnRecipe, load_learn_recipe
from malleable.report import environment, peak_rss_mb, trusted, trusted_lines, write_report

SCHEMA = "malleable.learn/1"
SNAPSHOTS = "snapshots"  # OUT/snapshots/step-N/: the loadable models of `training.snapshot_every`


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the base learning rate at optimiser step `step` (0-based)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return 1.0


def batch_indices(step: int, batch_size: int, n: int, seed: int) -> list[int]:
    """The examples of global step `step`: a slice of the concatenated seeded permutations, one per epoch."""
    out: list[int] = []
    start = step * batch_size
    while len(out) < batch_size:
        epoch, offset = divmod(start + len(out), n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
        out += perm[offset: offset + batch_size - len(out)]
    return out


def _units(target) -> int:
    return 1 if isinstance(target, int) else sum(t != -100 for t in target)


class BatchPlan:
    """How one optimiser step's global batch splits over processes and micro-batches."""

    def __init__(self, training, processes: int, n_train: int):
        b = training.batch_size
        if b % processes:
            raise RecipeError(f"training.batch_size: {b} does not split over {processes} processes")
        self.per_process = b // processes
        self.micro = min(training.micro_batch_size or self.per_process, self.per_process)
        if self.per_process % self.micro:
            raise RecipeError(f"training.micro_batch_size: {self.micro} does not divide the {self.per_process} "
                              f"examples each of {processes} processes gets per step")
        self.accumulation = self.per_process // self.micro
        self.batch_size, self.processes = b, processes
        self.steps = training.steps or max(1, math.ceil(training.epochs * n_train / b))

    def as_dict(self) -> dict:
        return {"batch_size": self.batch_size, "processes": self.processes, "per_process": self.per_process,
                "micro_batch_size": self.micro, "accumulation_steps": self.accumulation, "steps": self.steps}


@torch.no_grad()
def evaluate_loss(model, examples: Examples, micro: int, pad_id: int, accelerator, method: Method) -> float:
    """Mean task loss per unit over `examples`, split across processes.

    Every process runs as many forward passes as the busiest one (a process out of examples repeats its
    first and drops the result): under FSDP each pass gathers the weights from all processes.
    """
    model.eval()
    world = accelerator.num_processes
    mine = examples.items[accelerator.process_index::world]
    total = torch.zeros(2, device=accelerator.device, dtype=torch.float64)
    with method.evaluating(model):
        for i in range(0, math.ceil(len(examples) / world), micro):
            part = mine[i:i + micro]
            batch = {k: v.to(accelerator.device) for k, v in collate(part or examples.items[:1], pad_id).items()}
            losses = task_loss(model, batch)
            if part:
                total[0] += losses.sum()
                total[1] += losses.numel()
    total = accelerator.reduce(total, "sum")
    model.train()
    return float(total[0] / total[1].clamp(min=1))


def optimizer_step(method: Method, model, optimizer, params, micro: list[dict], step_units: int, accelerator,
                    max_grad_norm: float | None) -> tuple[float, float | None]:
    """One optimiser step over this process's micro-batches; returns (mean loss per unit, gradient norm).

    `closure()` evaluates the step's loss over every process and, for a method with gradients, leaves the
    clipped gradient of the whole global batch in `.grad`. A method with `closure = True` hands it to its
    optimiser, which evaluates where it needs (SPSA at theta +- eps z, SAM at theta and theta + eps).
    """
    world, norms = accelerator.num_processes, []
    # DDP averages gradients across processes once, after the last micro-batch. FSDP reduce-scatters every
    # micro-batch's gradient into the shards instead: holding whole gradients until the last one (its
    # set_requires_gradient_sync(False)) would cost the memory that sharding saves.
    deferred = method.backward and not is_sharded(model)

    def closure() -> torch.Tensor:
        total = torch.zeros((), device=accelerator.device)
        for j, batch in enumerate(micro):
            sync = accelerator.no_sync(model) if deferred and j < len(micro) - 1 else contextlib.nullcontext()
            with sync, torch.set_grad_enabled(method.backward):
                loss = method.loss(model, batch)
                if method.backward:
                    accelerator.backward(loss * (world / step_units))
            total += loss.detach()
        if method.backward and max_grad_norm:  # under FSDP the norm is a replicated DTensor: the global norm
            norms.append(float(accelerator.clip_grad_norm_(params, max_grad_norm)))
        return accelerator.reduce(total, "sum") / step_units

    if method.closure:
        loss = optimizer.optimizer.step(closure)  # past accelerate's wrapper, which drops the returned loss
    else:
        loss = closure()
        optimizer.step()
    loss = float(loss)
    # fp16's loss scaler skips a step whose values overflowed; anywhere else a non-finite loss has ruined the weights
    if not math.isfinite(loss) and accelerator.mixed_precision != "fp16":
        raise RecipeError(f"training.lr: the loss became {loss} (training diverged; lower the learning rate or "
                          "check the data); nothing was written")
    return loss, (norms[-1] if norms else None)


def check_finite_weights(params, accelerator) -> None:
    """Refuse to write weights that hold NaN or inf (every process checks its own shards, all agree)."""
    bad = sum(not bool(torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all()) for p in params)
    if accelerator.num_processes > 1:
        bad = int(accelerator.reduce(torch.tensor(bad, device=accelerator.device), "sum"))
    if bad:
        raise RecipeError("training.lr: training left NaN or inf in the weights (it diverged; lower the learning "
                          "rate); nothing was written")


def _to(batch, device):
    """`batch` (tensors, possibly in nested dicts) on `device`."""
    if isinstance(batch, dict):
        return {k: _to(v, device) for k, v in batch.items()}
    return batch.to(device) if isinstance(batch, torch.Tensor) else batch


def fit(model: torch.nn.Module, method: Method, items: list, collate, units: list[int], training, seed: int,
        progress: bool = False, desc: str = "train") -> list[dict]:
    """Train `model` (already `method.prepare`d) in memory on `items` through this engine's step: the seeded
    order of `batch_indices`, `BatchPlan`'s micro-batches, the method's optimiser, `lr_factor`'s schedule,
    clipping and the finite-weights check. For a verb that holds its model and brings examples of its own shape
    (steer's SPLIT pairs): `collate(items)` makes a micro-batch for `method.loss` and `units[i]` counts item i's
    loss units. One process; no checkpoints. Returns the logged steps (every `training.log_every` and the last).
    """
    from tqdm.auto import tqdm

    accelerator = make_accelerator(training.mixed_precision)
    if accelerator.num_processes > 1:
        raise RecipeError("fit: in-memory training runs in one process (launch without accelerate)")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise RecipeError(f"method: {method.name} leaves no parameter to train")
    plan = BatchPlan(training, 1, len(items))
    optimizer = method.optimizer(params, training)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, plan.steps, training.warmup_steps, training.schedule))
    model, optimizer = accelerator.prepare(model, optimizer)
    history, start = [], time.perf_counter()
    model.train()
    for step in tqdm(range(plan.steps), disable=not progress, desc=desc, unit="step", dynamic_ncols=True):
        idx = batch_indices(step, plan.batch_size, len(items), seed)
        micro = [_to(collate([items[i] for i in idx[j:j + plan.micro]]), accelerator.device)
                 for j in range(0, len(idx), plan.micro)]
        loss, grad_norm = optimizer_step(method, model, optimizer, params, micro, sum(units[i] for i in idx),
                                         accelerator, training.max_grad_norm)
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % training.log_every == 0 or step + 1 == plan.steps:
            history.append({"step": step + 1, "loss": round(loss, 6), "lr": scheduler.get_last_lr()[0],
                            "elapsed_s": round(time.perf_counter() - start, 3), **method.metrics()}
                           | ({"grad_norm": round(grad_norm, 4)} if grad_norm is not None else {}))
    model.eval()
    check_finite_weights(params, accelerator)
    return history


def make_accelerator(mixed_precision: str = "no"):
    """An Accelerator for one run (shared by learn and forget): the processes, the device, DDP.

    FSDP is the recipe's `training.sharding: fsdp` (learn only), done by `shard` with torch's `fully_shard`,
    never by accelerate's FSDP plugin, so `accelerate launch --use_fsdp` is refused: with accelerate 1.15
    that plugin engages only on GPU-like devices (on a CPU-only machine it runs plain DDP without a word, and
    `--cpu --use_fsdp` is a launcher error), and it brings its own settings (wrap policy, offload, state-dict
    type) that this loop would have to honour or silently ignore. One path, the same on CPU (gloo) and GPU.
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        raise MalleableError("accelerate launch --use_fsdp: accelerate's FSDP plugin is not used; launch without "
                             "it and set `training.sharding: fsdp` in the learn recipe (forget does not shard)")

    # Without an accelerator, accelerate only forms a process group (gloo) when told it runs on the CPU.
    on_cpu = not (torch.cuda.is_available() or torch.backends.mps.is_available())
    # accelerate keeps its settings in a process-wide singleton; forget them (not the process group) so that
    # several runs in one Python process may use different mixed-precision settings.
    AcceleratorState._reset_state(reset_partial_state=False)
    accelerator = Accelerator(mixed_precision=mixed_precision, cpu=on_cpu)
    if accelerator.num_processes > 1:
        atexit.unregister(_close_process_group)  # once per process, however many runs it makes
        atexit.register(_close_process_group)
    return accelerator


def _close_process_group() -> None:
    """Let gloo's workers finish before the interpreter tears down, then destroy the process group.

    A gloo worker frees each finished collective after the caller's wait() has returned; freeing its tensors
    takes the GIL. If that falls during interpreter finalisation the worker thread is unwound through a
    noexcept destructor and the process aborts ("terminate called without an active exception", exit -6)
    after all its work is written: seen about once in 20 two-process runs here (torch 2.13, gloo; torch's own
    atexit fix, pytorch#179291, was abandoned). Destroying the group does not join the workers while a DDP
    reducer still holds it, so the main thread gives up the GIL for a moment first: a waiting worker takes
    it, frees its tensors and goes idle.
    """
    time.sleep(0.05)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def shard(model: torch.nn.Module, device: torch.device, mixed_precision: str) -> torch.nn.Module:
    """FSDP2 (`fully_shard`) over every process: each transformer block is one unit (the classes the model
    names in `_no_split_modules`, as accelerate's and transformers' wrap policies read them), the root holds
    the rest (embeddings, norm, head), so only one block's weights are whole at a time.

    bf16 is FSDP's mixed precision: the blocks compute with bf16 copies of the weights while the shards, the
    gradients' reduction and the optimiser stay fp32 (not autocast, so not bit-equal to an unsharded bf16 run).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if mixed_precision == "bf16" else None,
                                  reduce_dtype=torch.float32)
    blocks = {name for m in model.modules() for name in getattr(m, "_no_split_modules", None) or ()}
    for module in [m for m in model.modules() if type(m).__name__ in blocks]:
        fully_shard(module, mesh=mesh, mp_policy=policy)
    return fully_shard(model, mesh=mesh, mp_policy=policy)


def read_recipe(path: str | Path) -> LearnRecipe:
    """A learn recipe file, validated, its method's parameters included (every problem names the file)."""
    return load_learn_recipe(path, lambda r: get_method(r.method, r.parameters))


def learn(recipe: LearnRecipe, out: str | Path, *, force: bool = False, resume: bool = False,
          progress: bool = True) -> dict:
    """Train as the recipe says and write the result to `out` (an adapter or a checkpoint) with its report."""
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    start = time.perf_counter()
    t = recipe.training
    method = get_method(recipe.method, recipe.parameters)
    if t.sharding == "fsdp" and not method.shardable:
        raise RecipeError(f"training.sharding: fsdp does not fit method {recipe.method}, which works on whole "
                          f"parameter tensors (use sharding: none)")
    if not (recipe.model / "config.json").is_file():
        raise InputError(f"{recipe.model}: not a transformers checkpoint (no config.json)")
    inputs = [recipe.model, recipe.data.train] + ([recipe.data.validation] if recipe.data.validation else [])
    out, run_dir = run_folder(out, force=force, resume=resume, inputs=inputs)

    accelerator = make_accelerator(t.mixed_precision)
    main = accelerator.is_main_process
    set_seed(recipe.seed)
    spec = recipe.data
    trust = Trust(recipe.trust_remote_code, recipe.allow_pickle)
    tokenizer = load_tokenizer(recipe.model, trust)
    train = load_examples(spec.train, spec, tokenizer)
    if (recipe.task == "classification") != (train.format == "text_label"):
        raise RecipeError(f"task: {recipe.task} does not fit {spec.train}'s {train.format} rows")
    val = load_examples(spec.validation, spec, tokenizer, labels=train.labels) if spec.validation else None
    model = load_model(recipe.model, recipe.task, tokenizer.pad_token_id, labels=train.labels,
                       trust=trust)  # train's label set sizes a classifier head
    plan = BatchPlan(t, accelerator.num_processes, len(train))

    set_seed(recipe.seed)  # the method's fresh parameters (LoRA's A) start from the recipe's seed
    model = method.prepare(model, recipe.task)
    sharded = t.sharding == "fsdp" and accelerator.num_processes > 1  # one process has nothing to shard
    if sharded:  # before the optimiser, whose parameters must be the shards
        model = shard(model, accelerator.device, t.mixed_precision)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise RecipeError(f"method: {recipe.method} leaves no parameter to train")
    optimizer = method.optimizer(params, t)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, plan.steps, t.warmup_steps, t.schedule))
    if sharded:  # FSDP already synchronises the gradients: no DDP on top
        optimizer = accelerator.prepare_optimizer(optimizer)
    elif method.backward:
        model, optimizer = accelerator.prepare(model, optimizer)
    else:  # no DDP: its gradient buckets, as large as the trainable parameters, would never be used. The
        # replicas still agree: they start from the same seeded weights and every step's loss is reduced globally.
        model = accelerator.prepare_model(model, evaluation_mode=True)
        optimizer = accelerator.prepare_optimizer(optimizer)

    recipe_json = json.loads(recipe.model_dump_json())
    step, first = 0, True
    if main and force and run_dir.exists() and not resume:
        shutil.rmtree(run_dir)
    accelerator.wait_for_everyone()
    found = latest_checkpoint(run_dir) if resume and run_dir.exists() else None
    if found is not None:
        check_same_recipe(run_dir, recipe_json)
        try:  # our own files, but a crash, a full disk or a user's edit can leave anything in them
            step, rng = load_checkpoint(found, accelerator.unwrap_model(model), optimizer, scheduler,
                                        accelerator.process_index)
            if not isinstance(step, int) or not 0 < step <= plan.steps:
                raise ValueError(f"step {step!r} outside 1..{plan.steps}")
            if rng is not None:
                torch.set_rng_state(rng)
        except Exception as e:  # safetensors, json, torch and the optimizer each raise their own types
            raise InputError(f"{found}: damaged checkpoint, cannot resume ({reason(e, typed=True)}); "
                             "--force starts over") from None
        first = False
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "recipe.json").write_text(json.dumps(recipe_json))
    log = open(run_dir / "metrics.jsonl", "a") if main else None

    units = [_units(y) for _, y in train.items]
    pad = tokenizer.pad_token_id
    rank = accelerator.process_index
    bar = tqdm(total=plan.steps, initial=step, disable=not (progress and main), desc=f"learn {recipe.method}",
               unit="step", dynamic_ncols=True)
    window_loss, window_steps, tokens, t_window = 0.0, 0, 0, time.perf_counter()
    t_loop, tokens_seen = t_window, 0
    last: dict = {}
    best, bad = None, 0  # early stopping: (validation loss, step, weights) of the best evaluation so far
    model.train()
    try:
        while step < plan.steps:
            idx = batch_indices(step, plan.batch_size, len(train), recipe.seed)
            step_units = sum(units[i] for i in idx)
            mine = [train.items[i] for i in idx[rank * plan.per_process:(rank + 1) * plan.per_process]]
            micro = [{k: v.to(accelerator.device) for k, v in collate(mine[j:j + plan.micro], pad).items()}
                     for j in range(0, len(mine), plan.micro)]
            step_tokens = sum(len(train.items[i][0]) for i in idx)
            tokens, tokens_seen = tokens + step_tokens, tokens_seen + step_tokens
            step_loss, grad_norm = optimizer_step(method, model, optimizer, params, micro, step_units, accelerator,
                                                   t.max_grad_norm)
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            bar.update(1)
            window_loss, window_steps = window_loss + step_loss, window_steps + 1
            val_loss = None
            if val is not None and t.eval_every and step % t.eval_every == 0:
                val_loss = round(evaluate_loss(model, val, plan.micro, pad, accelerator, method), 6)
                if t.patience and (best is None or val_loss < best[0]):
                    best, bad = (val_loss, step, [p.detach().clone() for p in params]), 0
                elif t.patience:
                    bad += 1
            if step % t.log_every == 0 or step == plan.steps or val_loss is not None:
                elapsed = time.perf_counter() - t_window
                last = {"step": step, "loss": round(window_loss / window_steps, 6),
                        "lr": scheduler.get_last_lr()[0], "tokens_per_s": round(tokens / max(elapsed, 1e-9), 1),
                        "tokens": tokens_seen, "elapsed_s": round(time.perf_counter() - t_loop, 3)}
                if grad_norm is not None:
                    last["grad_norm"] = round(grad_norm, 4)
                last.update(method.metrics())
                if val_loss is not None:
                    last["val_loss"] = val_loss
                bar.set_postfix(loss=f"{last['loss']:.4f}", tok_s=f"{last['tokens_per_s']:.0f}")
                if log:
                    log.write(json.dumps(last) + "\n")
                    log.flush()
                window_loss, window_steps, tokens, t_window = 0.0, 0, 0, time.perf_counter()
            if t.patience and bad >= t.patience:
                break
            if t.checkpoint_every and step % t.checkpoint_every == 0 and step < plan.steps:
                states = accelerator.gather(torch.get_rng_state().unsqueeze(0)) if accelerator.num_processes > 1 else \
                    torch.get_rng_state().unsqueeze(0)
                save_checkpoint(run_dir, step, accelerator.unwrap_model(model), optimizer, scheduler,
                                list(states.cpu()), write=main)
                accelerator.wait_for_everyone()
            if t.snapshot_every and step % t.snapshot_every == 0 and step < plan.steps:
                save_snapshot(run_dir / SNAPSHOTS, step, lambda m, folder, sd: method.save(m, folder, tokenizer, sd),
                              accelerator.unwrap_model(model), method.output == "adapter", sharded, main)
                accelerator.wait_for_everyone()
    finally:
        bar.close()
        if log:
            log.close()

    final = {"train_loss": last.get("loss"), **method.metrics()}
    if best is not None:  # early stopping keeps the weights of the best validation loss
        with torch.no_grad():
            for p, saved in zip(params, best[2]):
                p.copy_(saved)
        final.update(best_step=best[1], stopped_at=step, best_val_loss=best[0])
    check_finite_weights(params, accelerator)
    if val is not None:
        final["val_loss"] = round(evaluate_loss(model, val, plan.micro, pad, accelerator, method), 6)
    model = accelerator.unwrap_model(model)
    state = output_state(model, method.output == "adapter", sharded, main)
    report = {
        "schema": SCHEMA,
        "trusted": trusted(recipe),
        "method": recipe.method,
        "parameters": method.p,
        "recipe": recipe_json,
        "model": str(recipe.model),
        "data": {name: {"path": str(ex.path), "sha256": sha256_file(ex.path), "format": ex.format,
                        "examples": len(ex), "bad_rows": len(ex.bad_rows), "bad_row_examples": ex.bad_rows[:20]}
                 for name, ex in (("train", train), ("validation", val)) if ex is not None},
        "batches": plan.as_dict(),
        "sharding": "fsdp" if sharded else "none",
        "resumed": not first,
        "trainable_parameters": sum(p.numel() for p in params),
        "final": final,
        "device": str(accelerator.device),
        "mixed_precision": t.mixed_precision,
        "wall_time_s": round(time.perf_counter() - start, 1),
        "peak_rss_mb": peak_rss_mb(),
        "environment": environment(),
        "output": {"path": str(out), "kind": method.output},
        "snapshots": sorted(f"{SNAPSHOTS}/{p.name}" for p in (run_dir / SNAPSHOTS).glob(f"{PREFIX}*")),
        "main_process": main,
    }
    if torch.cuda.is_available():
        report["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    if main:
        with atomic_dir(out, force=force) as tmp:
            method.save(model, tmp, tokenizer, state)
            shutil.copy(run_dir / "metrics.jsonl", tmp / "metrics.jsonl")
            if (run_dir / SNAPSHOTS).is_dir():
                shutil.copytree(run_dir / SNAPSHOTS, tmp / SNAPSHOTS)
            write_report(tmp, report, _markdown(report))
        if not t.keep_checkpoints:
            shutil.rmtree(run_dir, ignore_errors=True)
    accelerator.wait_for_everyone()
    return report


def _markdown(r: dict) -> str:
    b, f = r["batches"], r["final"]
    lines = [f"# learn: {r['method']}", "", f"- model: `{r['model']}`", *trusted_lines(r["trusted"]),
             f"- parameters: {json.dumps(r['parameters'])}",
             "- data: " + "; ".join(f"{k} `{v['path']}` ({v['examples']} examples, {v['bad_rows']} bad rows skipped)"
                                     for k, v in r["data"].items()),
             f"- steps: {b['steps']} x batch {b['batch_size']} ({b['processes']} process(es), micro-batch "
             f"{b['micro_batch_size']}, accumulation {b['accumulation_steps']}, sharding {r['sharding']})",
             f"- trainable parameters: {r['trainable_parameters']:,}",
             "- final: " + ", ".join(f"{k} {v}" for k, v in f.items() if v is not None),
             f"- wall time {r['wall_time_s']} s, peak RSS {r['peak_rss_mb']} MB, device {r['device']}",
             f"- output: `{r['output']['path']}` ({r['output']['kind']})",
             *([f"- snapshots: {len(r['snapshots'])} loadable {r['output']['kind']}s, `{r['snapshots'][0]}` .. "
                f"`{r['snapshots'][-1]}`"] if r["snapshots"] else []), ""]
    return "\n".join(lines)
