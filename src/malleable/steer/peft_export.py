"""A steering artefact as a PEFT LoRA adapter: `PeftModel.from_pretrained(base, out)` steers the base model,
so steering ships wherever adapters are loaded (PEFT, its mixed-adapter batches, servers that load PEFT
adapters), beside the other adapters, without writing a new checkpoint.

Every form's bake (apply.py) changes a few linear layers of the base: a vector is a bias on the steered layer's
mlp.down_proj, ITI a bias on o_proj, SPLIT's LoRA and local weight a weight delta (and a bias) on mlp.down_proj.
The export bakes into the base loaded in float32, takes each changed linear layer's change, and writes it as a
LoRA on exactly that module: the weight difference by its SVD cut at its numerical rank (a bake in float32
rounds the base's weights, so singular values below that rounding's size, or below `RANK_TOLERANCE` of the
largest, are not the intervention), the bias difference as PEFT's `lora_bias` (a bias on lora_B). Generic over
forms on purpose: a new form that can bake exports with no code here.

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


def _stamps(model) -> dict[str, tuple]:
    """Per linear layer, the identity and in-place version of its weight and bias: what a bake changes shows."""
    return {n: tuple(None if p is None else (id(p), p._version) for p in (m.weight, m.bias))
            for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def _values(model, names: list[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    modules = dict(model.named_modules())
    return {n: (modules[n].weight.detach().double(),
                None if modules[n].bias is None else modules[n].bias.detach().double()) for n in names}


def lora_of_bake(model, artefact: Artefact, strength: float):
    """(low-rank weight deltas, bias deltas), per module name, of baking `artefact` at `strength` into `model`
    (changed in place, twice over). Every form is linear in its strength (h + m f(x)), so baking a second time
    adds the same change again: the difference of the two bakes is the change, and only the modules the bake
    touched are ever copied (no copy of the whole model)."""
    before = _stamps(model)
    bake_in_place(model, artefact, strength)
    changed = [n for n, stamp in _stamps(model).items() if stamp != before[n]]
    once = _values(model, changed)
    bake_in_place(model, artefact, strength)
    deltas, biases = {}, {}
    for name, (w2, b2) in _values(model, changed).items():
        w1, b1 = once[name]
        dw = w2 - w1
        db = None if b2 is None else b2 - (0 if b1 is None else b1)
        has_bias = db is not None and bool(db.any())
        if not dw.any() and not has_bias:
            continue  # a zero bias the bake's config switch added beside the steered module
        u, s, vh = torch.linalg.svd(dw, full_matrices=False)
        if s[0] > 0:
            # float32 rounding of the baked weights: about eps |W| per entry, at most eps |W|max sqrt(n) in norm
            rounding = 4 * torch.finfo(torch.float32).eps * float(w2.abs().max()) * max(dw.shape) ** 0.5
            k = max(1, int((s > max(RANK_TOLERANCE * s[0], rounding)).sum()))
        else:  # a bias only: a rank-1 zero LoRA carries it
            k, s = 1, torch.zeros(1, dtype=s.dtype)
        deltas[name] = split_balanced(u[:, :k], s[:k], vh[:k])
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
