"""Training checkpoints without pickle: tensors in safetensors, everything else in JSON, written atomically.

A checkpoint `step-000120/` holds the trainable parameters, the optimiser state (its tensors flattened to
`state.<param index>.<key>`, its scalars and param groups in JSON), the scheduler's state, and each
process's torch RNG state (dropout). The data order is a function of the seed and the step, so nothing
else is needed to resume a run exactly where it stopped.

Under FSDP each process holds a shard (a DTensor) of every parameter and optimiser tensor. Saving gathers
them whole, one tensor at a time, onto the main process's CPU, and loading cuts each process's shard back
out of the whole tensor, so the files are the same as an unsharded run's and either kind resumes from them.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch.distributed.tensor import DTensor, distribute_tensor

from malleable.errors import RecipeError
from malleable.io.atomic import atomic_dir

PREFIX = "step-"


def whole(tensors: dict[str, torch.Tensor], keep: bool) -> dict[str, torch.Tensor]:
    """Whole CPU copies of `tensors`. Gathering an FSDP shard is collective: every process calls this with the
    same names in the same order, and only where `keep` are the copies kept (the main process's memory).
    Names of one tensor (tied weights) share one copy, so savers see them tied as in the model."""
    out, copies = {}, {}
    for name, t in tensors.items():
        if id(t) not in copies:
            full = t.full_tensor() if isinstance(t, DTensor) else t
            copies[id(t)] = full.detach().cpu().contiguous() if keep else None
        if keep:
            out[name] = copies[id(t)]
    return out


def shard_like(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This process's shard of the whole `value` when `like` is sharded (read locally, nothing sent)."""
    if isinstance(like, DTensor):
        return distribute_tensor(value, like.device_mesh, like.placements, src_data_rank=None)
    return value


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _flatten_optimizer(state: dict, keep: bool) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for idx, entry in state["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{idx}.{key}"] = value
            else:
                scalars[f"{idx}.{key}"] = value
    return whole(tensors, keep), {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = value
    for name, value in meta["scalars"].items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(directory: Path, step: int, model, optimizer, scheduler, rng_states: list[torch.Tensor],
                    write: bool, keep: int = 1) -> None:
    """Write `directory/step-<step>/` atomically and delete all but the newest `keep` checkpoints.

    Every process calls it (gathering FSDP shards takes them all); only the one with `write` writes.
    """
    trainable = whole(trainable_state(model), write)
    tensors, meta = _flatten_optimizer(optimizer.state_dict(), write)
    if not write:
        return
    target = directory / f"{PREFIX}{step:06d}"
    with atomic_dir(target, force=True) as tmp:
        save_file(trainable, tmp / "trainable.safetensors")
        save_file(tensors, tmp / "optimizer.safetensors")
        save_file({f"rank{i}": s for i, s in enumerate(rng_states)}, tmp / "rng.safetensors")
        sched = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
        (tmp / "state.json").write_text(json.dumps({"step": step, "optimizer": meta, "scheduler": sched}))
    for old in sorted(directory.glob(f"{PREFIX}*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def run_folder(out: str | Path, *, force: bool, resume: bool, inputs=()) -> tuple[Path, Path]:
    """(output, its run folder `OUT.run`) checked before any work: the output may be written (`check_output`),
    the run folder is no input, an earlier run's folder needs --resume or --force, and --force deletes only a
    folder malleable wrote."""
    from malleable.errors import OutputError
    from malleable.io.atomic import check_not_input, check_output, replaceable

    out = check_output(out, force=force, inputs=inputs)
    run_dir = out.with_name(out.name + ".run")
    check_not_input(run_dir, inputs, "run folder")
    if run_dir.exists() and not (resume or force):
        raise OutputError(f"{run_dir}: an earlier run's checkpoints (pass --resume to continue it, --force to "
                          "start over)")
    if force and not resume and run_dir.exists() and not ((run_dir / "recipe.json").is_file()
                                                           or replaceable(run_dir)):
        raise OutputError(f"{run_dir}: exists and is not an earlier run's folder; --force deletes only those")
    return out, run_dir


def output_state(model, adapter: bool, sharded: bool, keep: bool) -> dict[str, torch.Tensor] | None:
    """What a saver writes for a sharded model: whole tensors gathered from the shards (an adapter needs only the
    trainable ones), kept where `keep`; None when unsharded (the saver reads the model itself). Collective."""
    if not sharded:
        return None
    return whole(trainable_state(model) if adapter else model.state_dict(keep_vars=True), keep)


def save_snapshot(directory: Path, step: int, save, model, adapter: bool, sharded: bool, write: bool) -> None:
    """Write the model as it is at `step` to `directory/step-<step>/` (atomically) with `save(model, folder,
    state_dict)`, the method's own saver, so a snapshot loads as the finished output does. Every process calls
    it (gathering FSDP shards takes them all); only the one with `write` writes."""
    state = output_state(model, adapter, sharded, write)
    if write:
        with atomic_dir(directory / f"{PREFIX}{step:06d}", force=True) as tmp:
            save(model, tmp, state)


def check_same_recipe(run_dir: Path, recipe_json: dict) -> None:
    """Refuse to resume checkpoints written under another recipe (run_dir/recipe.json, saved beside them)."""
    try:
        saved = json.loads((run_dir / "recipe.json").read_text())
    except (OSError, ValueError):
        saved = None
    if saved != recipe_json:
        raise RecipeError(f"{run_dir}: its checkpoints come from a different recipe (--force starts over)")


def latest_checkpoint(directory: Path, prefix: str = PREFIX) -> Path | None:
    """The newest complete checkpoint named `prefix` + step (an interrupted write is a hidden temporary
    directory, never listed)."""
    found = sorted(p for p in directory.glob(f"{prefix}*") if (p / "state.json").is_file())
    return found[-1] if found else None


def load_checkpoint(path: Path, model, optimizer, scheduler, rank: int) -> tuple[int, torch.Tensor | None]:
    """Restore the state saved at `path`; returns (step, this process's RNG state or None)."""
    state = json.loads((path / "state.json").read_text())
    params = dict(model.named_parameters())
    for name, value in load_file(path / "trainable.safetensors").items():
        with torch.no_grad():
            params[name].copy_(shard_like(value, params[name]))
    optim = _unflatten_optimizer(load_file(path / "optimizer.safetensors"), state["optimizer"])
    ordered = [p for group in optimizer.param_groups for p in group["params"]]  # the indices of optim["state"]
    for idx, entry in optim["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor) and value.shape == ordered[idx].shape:  # not Adam's scalar step
                entry[key] = shard_like(value, ordered[idx])
    optimizer.load_state_dict(optim)
    scheduler.load_state_dict({**scheduler.state_dict(), **state["scheduler"]})
    rng = load_file(path / "rng.safetensors").get(f"rank{rank}")
    return state["step"], rng

