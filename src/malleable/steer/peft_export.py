"""A steering artefact as a PEFT LoRA adapter: `PeftModel.from_pretrained(base, out)` steers the base model,
so steering ships wherever adapters are loaded (PEFT, its mixed-adapter batches, servers that load PEFT
adapters), beside the other adapters, without writing a new checkpoint.

Every form's bake (apply.py) changes a few linear layers of the base: a vector is a bias on the steered layer's
mlp.down_proj, ITI a bias on o_proj, SPLIT's LoRA and local weight a weight delta (and a bias) on mlp.down_proj.
The export bakes into a float32 copy, takes each changed linear layer's difference from the base, and writes it
as a LoRA on exactly that module: the weight difference by its SVD cut at its numerical rank (a bake in float32
rounds the base's weights, so singular values below `RANK_TOLERANCE` of the largest are that rounding, not the
intervention), the bias difference as PEFT's `lora_bias` (a bias on lora_B). Generic over forms on purpose: a new
form that can bake exports with no code here.

PEFT cannot merge a `lora_bias` adapter into a base layer without a bias (it says so when loading); unmerged, the
adapter's logits equal the baked checkpoint's. A vector added over the first positions only (ActAdd) cannot be
baked and so cannot be exported.
"""

from __future__ import annotations

from pathlib import Path

import torch

from malleable.deltas.linalg import split_balanced
from malleable.errors import InputError
from malleable.steer.apply import as_artefact, bake_in_place, check_strength, load_base
from malleable.steer.artefact import Artefact

RANK_TOLERANCE = 1e-6


def _linear_state(model) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    return {n: (m.weight.detach().clone(), None if m.bias is None else m.bias.detach().clone())
            for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def lora_of_bake(model, artefact: Artefact, strength: float):
    """(low-rank weight deltas, bias deltas), per module name, of baking `artefact` at `strength` into `model`
    (changed in place)."""
    before = _linear_state(model)
    bake_in_place(model, artefact, strength)
    deltas, biases = {}, {}
    for name, (w_after, b_after) in _linear_state(model).items():
        w0, b0 = before[name]
        dw = w_after.double() - w0.double()
        db = None if b_after is None else b_after.double() - (0 if b0 is None else b0.double())
        has_bias = db is not None and bool(db.any())
        if not dw.any() and not has_bias:
            continue
        u, s, vh = torch.linalg.svd(dw, full_matrices=False)
        k = max(1, int((s > RANK_TOLERANCE * s[0]).sum())) if s[0] > 0 else 1
        s = s[:k] if s[0] > 0 else torch.zeros(1, dtype=s.dtype)  # bias only: a rank-1 zero LoRA carries it
        deltas[name] = split_balanced(u[:, :k], s, vh[:k])
        if has_bias:
            biases[name] = db
    return deltas, biases


def export_peft(artefact: Artefact | str | Path, model_dir: str | Path, out: str | Path,
                strength: float | None = None, force: bool = False, allow_pickle: bool = False) -> Path:
    """Write `out`: a PEFT LoRA adapter for the checkpoint at `model_dir` that applies the artefact at `strength`
    (default: its default strength), with a report."""
    from malleable.io.adapter import write_adapter
    from malleable.io.atomic import atomic_dir, check_output
    from malleable.report import write_report

    artefact = as_artefact(artefact)
    inputs = [model_dir] + ([artefact.path] if artefact.path is not None else [])
    check_output(out, force, inputs=inputs)
    strength = check_strength(artefact.default_strength if strength is None else strength)
    if strength == 0:
        raise InputError("strength: 0 is the unsteered model; there is nothing to export")
    _, model = load_base(model_dir, allow_pickle, dtype=torch.float32)
    deltas, biases = lora_of_bake(model, artefact, strength)
    like = {"base_model_name_or_path": str(Path(model_dir).absolute()), "task_type": "CAUSAL_LM", "bias": "none",
            "inference_mode": True}
    modules = {m: {"rank": d.rank, "bias": m in biases} for m, d in sorted(deltas.items())}
    report = {"schema": "malleable.steer.peft/1", "artefact": artefact.where(), "model": str(model_dir),
              "strength": strength, "method": artefact.config["method"], "layers": sorted(artefact.vectors),
              "modules": modules}
    rows = "\n".join(f"| {m} | {v['rank']} | {'yes' if v['bias'] else 'no'} |" for m, v in modules.items())
    with atomic_dir(out, force, inputs=inputs) as tmp:
        write_adapter(tmp, deltas, like, torch.float32, biases=biases or None, exact_targets=True)
        write_report(tmp, report, f"# steering as a PEFT adapter\n\n{artefact.config['method']} at strength "
                                  f"{strength} for {model_dir}; load with `PeftModel.from_pretrained(base, out)`.\n\n"
                                  f"| module | rank | bias |\n|---|---:|---|\n{rows}\n")
    return Path(out)
