"""The unlearning loop: learn's optimiser step, fed with (forget, retain) batches, plus masks and a reference.

`unlearn` works on a model in memory (the protocols and benchmarks call it); `malleable forget` (forget/run.py)
loads files, calls it and writes the result. `fit` is plain training through the same loop: the protocols
train their original and retrained-from-scratch models with it, so the gold standard and the unlearning run
share every line of the step.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import torch

from malleable.errors import InputError, RecipeError
from malleable.forget.data import set_batches
from malleable.forget.registry import Objective, get_mask, get_objective
from malleable.learn.engine import batch_indices, check_finite_weights, lr_factor, make_accelerator, optimizer_step
from malleable.learn.registry import Method


@dataclass
class UnlearnResult:
    model: torch.nn.Module
    seconds: float
    steps: int
    history: list[dict] = field(default_factory=list)
    mask_fraction: float | None = None


class Reference:
    """The original model, frozen: the same PEFT model with its adapter off, or else a deep copy."""

    def __init__(self, model: torch.nn.Module):
        self.peft = hasattr(model, "disable_adapter")
        self.model = model if self.peft else copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def __call__(self, fn: Callable, *args) -> Any:
        if self.peft:
            with self.model.disable_adapter():
                return fn(self.model, *args)
        return fn(self.model, *args)


def _kind(collate: Callable, example) -> str:
    part = collate([example])
    return "causal_lm" if part["labels"].ndim == 2 else "classifier"


def _optimizer(objective: Objective, params: list, name: str | None, lr: float, weight_decay: float,
               momentum: float):
    """The objective's own optimiser (None: AdamW unless it brings one, like SOUL's Sophia), or the one named."""
    own = type(objective).optimizer is not Method.optimizer
    if name is not None and own:
        raise RecipeError(f"training.optimizer: {objective.name} brings its own optimiser; leave "
                          f"training.optimizer unset")
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name not in (None, "adamw"):
        raise RecipeError(f"training.optimizer: '{name}' is not one of ['adamw', 'sgd']")
    return objective.optimizer(params, SimpleNamespace(lr=lr, weight_decay=weight_decay))


def _keep_masked(model: torch.nn.Module, optimizer: torch.optim.Optimizer, masks: dict[str, torch.Tensor]) -> list:
    """Zero the gradients outside the mask and, after every step, put those weights back bit for bit
    (weight decay and momentum would otherwise still move them). Returns the hook handles to remove."""
    frozen, handles = [], []
    for name, p in model.named_parameters():
        if name in masks:
            m = masks[name].to(p.device)
            handles.append(p.register_hook(lambda g, m=m: g * m))
            frozen.append((p, ~m, p.detach()[~m].clone()))

    def restore(*_):
        with torch.no_grad():
            for p, where, values in frozen:
                p[where] = values

    return handles + [optimizer.register_step_post_hook(restore)]


def _run(model: torch.nn.Module, objective: Objective, draw: Callable[[int], dict], steps: int, accelerator, *,
         lr: float, optimizer: str | None, schedule: str, warmup_steps: int, weight_decay: float, momentum: float,
         max_grad_norm: float | None, masks: dict[str, torch.Tensor] | None, progress: bool, desc: str,
         log_every: int, stop: Callable | None = None) -> tuple[list[dict], float, int]:
    """The shared loop: `draw(step)` gives this process's share of the step's batch; learn's optimizer_step
    does the rest (under several processes DDP averages the shares' gradients). `stop(model, step, last)`,
    when given, may end the run early (every process computes the same answer on its identical replica).
    Returns (history, seconds, steps run)."""
    from tqdm.auto import tqdm

    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise RecipeError(f"objective: {objective.name} leaves no parameter to train")
    opt = _optimizer(objective, params, optimizer, lr, weight_decay, momentum)
    handles = _keep_masked(model, opt, masks) if masks is not None else []
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, steps, warmup_steps, schedule))
    prepared, opt = accelerator.prepare(model, opt)
    history, start, done = [], time.perf_counter(), 0
    prepared.train()
    for step in tqdm(range(steps), disable=not (progress and accelerator.is_main_process), desc=desc, unit="step",
                     dynamic_ncols=True):
        objective.progress = step / steps
        batch = {k: None if v is None else {n: t.to(accelerator.device) for n, t in v.items()}
                 for k, v in draw(step).items()}
        loss, grad_norm = optimizer_step(objective, prepared, opt, params, [batch],
                                         accelerator.num_processes, accelerator, max_grad_norm)
        scheduler.step()
        opt.zero_grad(set_to_none=True)
        done = step + 1
        if done % log_every == 0 or done == steps:
            history.append({"step": done, "loss": round(loss, 6), "lr": scheduler.get_last_lr()[0],
                            "elapsed_s": round(time.perf_counter() - start, 3)}
                           | ({"grad_norm": round(grad_norm, 4)} if grad_norm is not None else {}))
        if stop is not None:
            finished = stop(accelerator.unwrap_model(prepared), done, done == steps)
            prepared.train()
            if finished:
                break
    prepared.eval()
    for handle in handles:
        handle.remove()
    check_finite_weights(params, accelerator)
    return history, time.perf_counter() - start, done


def _steps(steps: int | None, epochs: float | None, n: int, batch_size: int) -> int:
    if (steps is None) == (epochs is None):
        raise RecipeError("set exactly one of training.steps and training.epochs")
    return steps or max(1, math.ceil(epochs * n / batch_size))


def _sampler(examples: Sequence, collate: Callable, batch_size: int, seed: int, accelerator,
             name: str) -> Callable[[int], dict]:
    """This process's equal share of each step's global batch of `examples` (the whole of it on one process):
    the objectives' losses are means over a batch, so DDP's mean of the shares' gradients is the global one."""
    size, world = min(batch_size, len(examples)), accelerator.num_processes
    if size % world:
        raise RecipeError(f"training.batch_size: the {size} {name} examples of a step do not split over {world} "
                          f"processes")
    share = size // world
    at = accelerator.process_index * share
    return lambda step: collate([examples[i] for i in batch_indices(step, size, len(examples), seed)[at:at + share]])


def unlearn(model: torch.nn.Module, *, forget: Sequence, retain: Sequence | None, collate: Callable,
            objective: str, parameters: dict | None = None, mask: dict | None = None, lora: dict | None = None,
            steps: int | None = None, epochs: float | None = None, batch_size: int = 8, lr: float = 1e-5,
            optimizer: str | None = None, schedule: str = "constant", warmup_steps: int = 0, weight_decay: float = 0.0,
            momentum: float = 0.9, max_grad_norm: float | None = 1.0, seed: int = 0, progress: bool = False,
            log_every: int = 10, stop: Callable | None = None) -> UnlearnResult:
    """Unlearn `forget` from `model` (in place; a LoRA-wrapped model is returned when `lora` is given).

    Examples are whatever `collate` turns into a part: (input_ids, labels) pairs with learn.data.collate for
    language models, (image, label) pairs with forget.data.collate_classification for classifiers. One epoch
    walks the forget set (the retain set for retain-only objectives); each step draws `batch_size` examples
    from each set, in a seeded order that depends only on the seed and the step, and several processes
    (`accelerate launch`) split them evenly, so they follow the one-process run. `stop` (a
    forget.stopping.StopRule) ends the run once it reaches the retrain target; `steps` is then the most it may run.
    """
    obj = get_objective(objective, parameters or {})
    if not forget:
        raise InputError("forget set: empty; there is nothing to forget")
    if obj.needs_retain and not retain:
        raise InputError(f"retain set: {objective} needs retain data and none was given")
    kind = _kind(collate, forget[0])
    if kind not in obj.kinds:
        names = {"causal_lm": "causal language models", "classifier": "classifiers"}
        raise RecipeError(f"objective: {objective} is for {' and '.join(names[k] for k in sorted(obj.kinds))}, "
                          f"not {names[kind]}")
    accelerator = make_accelerator()
    torch.manual_seed(seed)
    if lora is not None:
        from malleable.learn.lora import LORA_PARAMS, with_lora
        from malleable.params import check_params

        model = with_lora(model, check_params(LORA_PARAMS, lora, "lora"),
                          "causal_lm" if kind == "causal_lm" else "classification", prefix="lora")
    elif not hasattr(model, "peft_config"):  # an adapter given as the model: its own trainable factors train
        model = obj.prepare(model, kind)
    # setup, the reference and the mask read the original model where training happens, in eval mode (dropout
    # off, batch-norm statistics fixed), as SFR-on's, WAGLE's and NatMU's official codes do
    model = model.to(accelerator.device).eval()
    obj.setup(model, forget, retain, collate)
    if obj.needs_reference:
        obj.reference = Reference(model)
    sets = {"forget": forget, "retain": retain}
    masks = fraction = None
    if mask is not None:
        fn, mask_params = get_mask(mask)
        masks = fn(model, set_batches(sets, collate, batch_size, f"mask {mask['name']}"), **mask_params)
        if accelerator.num_processes > 1:  # one mask for all: GPU gradient sums need not agree to the last bit
            from accelerate.utils import broadcast

            masks = {n: m.bool() for n, m in broadcast({n: m.to(accelerator.device, torch.uint8)
                                                        for n, m in masks.items()}).items()}
        fraction = sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())
    original = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    total = _steps(steps, epochs, len(sets[obj.epochs_over] or forget), batch_size)
    draw_forget = _sampler(forget, collate, batch_size, seed, accelerator, "forget")
    draw_retain = _sampler(retain, collate, batch_size, seed + 1, accelerator, "retain") if retain else None

    def draw(step: int) -> dict:
        return {"forget": draw_forget(step), "retain": draw_retain(step) if draw_retain else None}

    history, seconds, done = _run(model, obj, draw, total, accelerator, lr=lr, optimizer=optimizer,
                                  schedule=schedule, warmup_steps=warmup_steps, weight_decay=weight_decay,
                                  momentum=momentum, max_grad_norm=max_grad_norm, masks=masks, progress=progress,
                                  desc=f"forget {objective}", log_every=log_every, stop=stop)
    obj.finish(model, original)
    return UnlearnResult(model, seconds, done, history, fraction)


def fit(model: torch.nn.Module, examples: Sequence, *, collate: Callable, steps: int | None = None,
        epochs: float | None = None, batch_size: int = 64, lr: float = 0.1, optimizer: str = "sgd",
        schedule: str = "cosine", warmup_steps: int = 0, weight_decay: float = 5e-4, momentum: float = 0.9,
        max_grad_norm: float | None = None, seed: int = 0, progress: bool = False,
        log_every: int = 50) -> UnlearnResult:
    """Plain training (cross-entropy on `examples`) through the unlearning loop: the original and the
    retrained-from-scratch gold standard of a protocol."""
    if not examples:
        raise InputError("training set: empty")
    obj = get_objective("ft", {})
    accelerator = make_accelerator()
    torch.manual_seed(seed)
    model = obj.prepare(model, _kind(collate, examples[0]))
    draw_examples = _sampler(examples, collate, batch_size, seed, accelerator, "training")
    total = _steps(steps, epochs, len(examples), batch_size)
    history, seconds, _ = _run(model, obj, lambda s: {"forget": None, "retain": draw_examples(s)}, total, accelerator,
                            lr=lr, optimizer=optimizer, schedule=schedule, warmup_steps=warmup_steps,
                            weight_decay=weight_decay, momentum=momentum, max_grad_norm=max_grad_norm, masks=None,
                            progress=progress, desc="fit", log_every=log_every)
    return UnlearnResult(model, seconds, total, history)
