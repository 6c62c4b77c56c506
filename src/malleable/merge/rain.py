"""RAIN-Merging: an instruction-tuned model's task vector added to a reasoning model without breaking its thinking.

Huang et al., "RAIN-Merging: A Gradient-Free Method to Enhance Instruction Following in Large Reasoning Models
with Preserved Thinking Format" (ICLR 2026); the authors' code is github.com/K1nght/RAIN-Merging
(nullspace_merge_qkvo_ffn.py, qp_true_forward_fast.py, unified_model_merge.py, scripts/run_stage*.sh).
Recipe: `base` is the common base, `inputs[0]` the reasoning model, `inputs[1]` the instruction model;
`data.train` the reasoning calibration file, `data.validation` the instruction calibration file (below).

1. Null-space projection. tau = instruction - base for q/k/v/o (per head) and gate/up/down of the chosen layers.
   Forward hooks on the reasoning model capture, per calibration text, the features at the thinking boundaries
   and their neighbourhoods (`radius` tokens after the opening marker and before the closing one). Constraint
   rows: Q/K, the attention logits between a boundary and its neighbours (`q_rows`, `k_rows` pairs a text);
   V/O, the head's output at `v_rows` / `o_rows` positions read along `readout_dirs` random unit directions;
   gate/up/down, the projections at `ffn_rows` positions along random directions. Each row's scale is the
   authors' (1/sqrt(head_dim), 1/sqrt(d_ff)). tau' = tau - A^T (A A^T + lambda I)^-1 A tau (Cholesky), and the
   report gives ||A tau'|| / ||A tau|| per module block.
2. Coefficients (the authors' two-pass variant). On the instruction calibration set, per head, the attention
   mass from each instruction's tokens to its related spans (a) and to unrelated spans (u), on the reasoning
   model (pass 1) and with tau' added at alpha = `prior` (pass 2). b = sum(a1 - a0) - rho_du * sum(u1 - u0),
   H = S * h_lambda + h_mu * sum(u1); alpha = clip((b + l2_prior * prior) / (H + l2_prior), alpha_min,
   alpha_max), i.e. (b + 0.1) / (H + 0.1) clipped to [0, 1.5] with the defaults (the authors' diagonal QP).
   Q and K share the head's alpha, V and O reuse it, the MLP takes the layer's mean.
3. Merge: W = W_reasoning + alpha * tau' on the chosen layers; every other tensor is the reasoning model's.

Calibration files (JSONL; the text is exactly what the model reads, chat template included, no tokens added):
* reasoning: {"text": "...<think>steps</think>answer"}: exactly one `think_open` then one `think_close`.
* instruction: {"text": ..., "related_prompt_list": [{"prompt_spans": [...], "response_spans": [...],
  "unrelated_response_spans": [...]}], "unrelated_response_spans": [...]} (the authors' fields): every span a
  substring of the text; prompt_spans are the instruction's tokens, prompt + response spans its related ones.

Where ours differs from the authors' code, and why:
* Grouped-query attention: K and V are projected once per KV head with the constraints of every query head
  that reads it, under HF's repeat_kv grouping (query head h reads KV head h // (heads / kv_heads)); their
  alpha is the mean of those heads' alphas. The authors map h to h % kv_heads (another head's keys for GQA)
  and add one projected copy of the KV head's delta per query head (heads / kv_heads times).
* Q/K pairs are (later token, earlier token): query at a neighbour after <think> with the key at <think>, and
  the query at </think> with keys at its neighbours before. The authors pair (<think>, later token) and
  (earlier token, </think>), logits the causal mask removes.
* The Q/K rows go through RoPE (the logit is (R_i q_i).(R_j k_j)) with q/k biases included, and the V/O rows
  use the model's own attention probabilities (eager attention); the authors' rows use unrotated projections
  and recompute the attention from them without RoPE.
* One forward per calibration text for all layers (theirs: one per text per layer): the same features.
* The solve is a float64 Cholesky for every size (theirs: float32, Cholesky up to 4000 rows, CG beyond).
* The down projection's task vector is added in pass 2 too (the authors' pass 2 looks it up under a key their
  stage 1 never writes, so it is left out there).
* The authors' per-row weights w_q ... w_ffn (all 1 in their scripts) are not exposed.
* Every layer by default (`layers_tail: 0`); the authors' script takes the last 27 of Qwen2.5-7B's 28.
Note, kept as the authors compute it: with causal attention, instruction tokens in the prompt give no
attention to response tokens, so a and u count only the spans that occur in or before the prompt.
"""

from __future__ import annotations

import json
import math
import random
import time

import torch
from tqdm import tqdm

from malleable.errors import InputError, RecipeError
from malleable.merge import rain_nullspace as ns
from malleable.merge.registry import merge_rule
from malleable.params import Param, check_params

PARAMS = {
    "layers_tail": Param(0, "merge the last N layers (0: every layer)", ge=0),
    "merge_types": Param("qkvof", "the projections merged: letters of q, k, v, o and f (the MLP)"),
    "radius": Param(5, "neighbourhood of each thinking boundary, in tokens", ge=0),
    "lambda_ridge": Param(1e-4, "ridge of the null-space solve", gt=0),
    "q_rows": Param(8, "Q constraint pairs per text", ge=0),
    "k_rows": Param(8, "K constraint pairs per text", ge=0),
    "v_rows": Param(4, "V constraint positions per text", ge=0),
    "o_rows": Param(4, "O constraint positions per text", ge=0),
    "ffn_rows": Param(4, "MLP constraint positions per text", ge=0),
    "readout_dirs": Param(2, "random readout directions per position (V, O, MLP)", ge=1),
    "project": Param(True, "stage 1 (false: the raw task vector, an ablation)"),
    "coefficients": Param(True, "stage 2 (false: every alpha is `scale`, the authors' scaling-factor mode)"),
    "scale": Param(1.0, "alpha of every module when coefficients is false", ge=0),
    "prior": Param(1.0, "alpha prior: pass 2 adds tau' at this alpha; the ridge pulls alpha toward it"),
    "l2_prior": Param(0.1, "ridge toward the prior in the closed form", ge=0),
    "alpha_min": Param(0.0, "lower clip of alpha"),
    "alpha_max": Param(1.5, "upper clip of alpha"),
    "rho_du": Param(0.5, "weight of the leak change in b", ge=0),
    "h_lambda": Param(1.0, "per-sample constant of H", ge=0),
    "h_mu": Param(1.0, "weight of the post-merge leak in H", ge=0),
    "think_open": Param("<think>", "the marker opening the thinking block"),
    "think_close": Param("</think>", "the marker closing it"),
}


def rain_params(given: dict) -> dict:
    p = check_params(PARAMS, given)
    if not p["merge_types"] or set(p["merge_types"]) - set("qkvof"):
        raise RecipeError(f"parameters.merge_types: {p['merge_types']!r} is not made of q, k, v, o, f")
    if p["alpha_min"] > p["alpha_max"]:
        raise RecipeError("parameters.alpha_min: above alpha_max")
    return p


def closed_form_alpha(b: torch.Tensor, H: torch.Tensor, p: dict) -> torch.Tensor:
    """The authors' diagonal QP, min 0.5 a^T (H + l2) a - (b + l2 prior)^T a over [alpha_min, alpha_max]."""
    return ((b + p["l2_prior"] * p["prior"]) / (H + p["l2_prior"])).clamp(p["alpha_min"], p["alpha_max"])


# ---------------------------------------------------------------- stage 2: attention to related / unrelated spans


@torch.no_grad()
def attention_mass(model, samples: list[ns.InstructionSample], layers: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, u), each (layers, heads), summed over samples and instructions (qp_true_forward_fast's
    compute_align_leak_vectors_instruction_wise)."""
    heads = model.config.num_attention_heads
    a, u = torch.zeros(len(layers), heads, dtype=torch.float64), torch.zeros(len(layers), heads, dtype=torch.float64)
    for s in samples:
        attn, hooks = {}, []
        for li in layers:
            hooks.append(ns.layer_of(model, li).self_attn.register_forward_hook(
                lambda m, args, out, li=li: attn.__setitem__(li, out[1][0].double())))
        try:
            model(input_ids=torch.tensor([s.ids]), use_cache=False)
        finally:
            for h in hooks:
                h.remove()
        for n, li in enumerate(layers):
            for ins in s.instructions:
                rows = attn[li][:, ins["I"]]  # (heads, |I|, T)
                a[n] += rows[:, :, ins["R"]].sum((1, 2)) / max(1, ins["nR"])
                u[n] += rows[:, :, ins["U"]].sum((1, 2)) / max(1, ins["nU"])
                u[n] += rows[:, :, s.unrelated].sum((1, 2)) / max(1, s.n_unrelated)
    return a, u


# ---------------------------------------------------------------- stage 3 (and pass 2): W + alpha * tau'


@torch.no_grad()
def add_scaled(model, taus: dict[tuple[int, str], torch.Tensor], alpha: torch.Tensor, layers: list[int]) -> None:
    """W += alpha * tau' per block: q rows and o columns of head h by alpha[l, h], k and v rows of KV head g
    by the mean alpha of the heads that read it, the MLP by the layer's mean."""
    cfg = model.config
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    group = heads // kv
    for n, li in enumerate(layers):
        hd = ns.layer_of(model, li).self_attn.head_dim
        shared = alpha[n].view(kv, group).mean(1)
        per = {"q": alpha[n], "o": alpha[n], "k": shared, "v": shared}
        for name, path in ns.PROJ.items():
            tau = taus.get((li, name))
            if tau is None:
                continue
            w = ns.layer_of(model, li).get_submodule(path).weight
            if name in per:
                for h, a in enumerate(per[name].tolist()):
                    r, c = ns.block(name, h, hd)
                    w[r, c] += a * tau[r, c].to(w.dtype)
            else:
                w += float(alpha[n].mean()) * tau.to(w.dtype)


# ---------------------------------------------------------------- the rule


def _setup(plan):
    """Parameters, the chosen layers and the tokenizer, with every check that needs no model weights."""
    from malleable.models.checkpoints import Trust, load_tokenizer

    r = plan.recipe
    p = rain_params(r.model_dump(mode="json")["parameters"])
    if plan.input_kind != "model":
        raise RecipeError("inputs: rain merges full checkpoints (base, reasoning, instruction), not LoRA adapters")
    if any(i.model_dump(mode="json")["weight"] != 1.0 or i.parameters for i in r.inputs):
        raise RecipeError("inputs: rain computes its own coefficients; per-input weights and parameters do not apply")
    if r.slices is not None or r.tokenizer is not None:
        raise RecipeError("method: rain merges whole models (no slices or tokenizer merging)")
    if p["coefficients"] and r.data.validation is None:
        raise RecipeError("data.validation: rain's coefficients need the instruction calibration file")
    cfg = plan.models[0].config or {}
    heads, layers_n = cfg.get("num_attention_heads"), cfg.get("num_hidden_layers")
    if not isinstance(heads, int) or not isinstance(layers_n, int):
        raise InputError(f"{plan.models[0].path}: config.json has no num_attention_heads / num_hidden_layers")
    kv = cfg.get("num_key_value_heads") or heads
    tail = p["layers_tail"] or layers_n
    if tail > layers_n:
        raise RecipeError(f"parameters.layers_tail: {tail}, but the model has {layers_n} layers")
    layers = list(range(layers_n - tail, layers_n))
    for li in layers:
        for path in ns.PROJ.values():
            if f"model.layers.{li}.{path}.weight" not in plan.models[0].meta:
                raise InputError(f"{plan.models[0].path}: no tensor model.layers.{li}.{path}.weight; rain merges "
                                 "Llama-style layers (q/k/v/o_proj, gate/up/down_proj)")
        if any(f"model.layers.{li}.self_attn.{n}.weight" in plan.models[0].meta for n in ("q_norm", "k_norm")):
            raise InputError(f"{plan.models[0].path}: q/k norms in the attention are not supported by rain")
    tokenizer = load_tokenizer(plan.models[0].path, Trust(False, r.allow_pickle))
    return p, layers, heads, kv, tokenizer


def describe(plan) -> list[str]:
    """`--dry-run`: the roles, the calibration files and the constraint rows per module of each chosen layer."""
    p, layers, heads, kv, tokenizer = _setup(plan)
    r = plan.recipe
    lines = [f"rain: reasoning {r.inputs[0].path}, instruction {r.inputs[1].path}, layers {layers[0]}..{layers[-1]}"
             f" ({heads} heads, {kv} KV heads), merge_types {p['merge_types']}"]
    samples = ns.reasoning_samples(r.data.train, tokenizer, r.data, p, random.Random(r.seed))
    if p["project"]:
        counts = ns.row_counts(samples, p, p["merge_types"], heads, kv)
        lines.append(f"constraint rows per module block, each chosen layer ({len(samples)} reasoning texts): "
                     + ", ".join(f"{k} {v}" for k, v in counts.items()))
    if p["coefficients"]:
        lines.append(f"instruction calibration: {len(ns.instruction_samples(r.data.validation, tokenizer, r.data))} "
                     "texts (two passes)")
    meta = plan.models[0].meta
    model = sum(math.prod(m.shape) for m in meta.values())
    taus = sum(math.prod(meta[f"model.layers.{li}.{path}.weight"].shape) for li in layers for path in ns.PROJ.values())
    lines.append(f"rain holds the reasoning model in float32 and tau' of the chosen layers, about "
                 f"{4 * (model + taus) / 1e6:.0f} MB, plus the constraint rows (not the streaming estimate above)")
    return lines


def run_plan(plan, out, force: bool = False, progress: bool = True) -> dict:
    """Stages 1-3 (see the module doc); writes the merged model, its tokenizer and report atomically."""
    from transformers import AutoModelForCausalLM

    from malleable.io.atomic import atomic_dir, check_output
    from malleable.io.checkpoint import dtype_from_name
    from malleable.io.hashing import sha256_file
    from malleable.report import environment, peak_rss_mb, write_report

    start = time.perf_counter()
    r = plan.recipe
    p, layers, heads, kv, tokenizer = _setup(plan)
    files = [r.data.train] + ([r.data.validation] if p["coefficients"] else [])
    out = check_output(out, force, inputs=[r.base, *(i.path for i in r.inputs), *files])
    reasoning = ns.reasoning_samples(r.data.train, tokenizer, r.data, p, random.Random(r.seed))
    instruction = ns.instruction_samples(r.data.validation, tokenizer, r.data) if p["coefficients"] else []
    base, target, instruct = plan.base, plan.models[0], plan.models[1]
    model = AutoModelForCausalLM.from_pretrained(target.path, dtype=torch.float32, attn_implementation="eager",
                                                 local_files_only=True, trust_remote_code=False,
                                                 use_safetensors=None if r.allow_pickle else True).eval()
    types = p["merge_types"]
    names = [n for n in ns.PROJ if n[0] in types or (n in ("gate", "up", "down") and "f" in types)]
    rows = {}
    if p["project"]:
        bar = tqdm(total=len(reasoning), desc="rain: boundary features", disable=not progress)
        rows = ns.layer_rows(model, reasoning, layers, p, types, r.seed, bar)
        bar.close()
    taus, residual = {}, {}
    for li in layers:
        hd = ns.layer_of(model, li).self_attn.head_dim
        for name in names:
            key = f"model.layers.{li}.{ns.PROJ[name]}.weight"
            tau = instruct.read(key).float() - base.read(key).float()
            blocks = range(heads if name in ("q", "o") else kv) if name in ("q", "k", "v", "o") else [None]
            for h in blocks:
                rws = rows.get(li, {}).get(name if h is None else f"{name}.{h}")
                rr, cc = ns.block(name, h or 0, hd)
                tau[rr, cc], before, after = ns.project(tau[rr, cc], rws, p["lambda_ridge"])
                if rws is not None:
                    residual[key + ("" if h is None else f"[{h}]")] = {
                        "rows": len(rws), "before": before, "after": after, "ratio": after / before if before else 0.0}
            taus[(li, name)] = tau
    stats = {}
    if p["coefficients"]:
        prior = torch.full((len(layers), heads), p["prior"])
        a0, u0 = attention_mass(model, instruction, layers)
        kept = {k: ns.layer_of(model, k[0]).get_submodule(ns.PROJ[k[1]]).weight.detach().clone() for k in taus}
        add_scaled(model, taus, prior, layers)
        a1, u1 = attention_mass(model, instruction, layers)
        with torch.no_grad():  # back to the reasoning model's own weights, bit for bit
            for k, w in kept.items():
                ns.layer_of(model, k[0]).get_submodule(ns.PROJ[k[1]]).weight.copy_(w)
        del kept
        b = (a1 - a0) - p["rho_du"] * (u1 - u0)
        H = len(instruction) * p["h_lambda"] + p["h_mu"] * u1 + 1e-6
        alpha = closed_form_alpha(b, H, p).float()
        stats = {"b": b.tolist(), "H": H.tolist(), "sum_dA": (a1 - a0).tolist(), "sum_dU": (u1 - u0).tolist()}
    else:
        alpha = torch.full((len(layers), heads), p["scale"])
    add_scaled(model, taus, alpha, layers)
    first = next(m.dtype for m in target.meta.values() if m.dtype.is_floating_point)
    model.to(dtype_from_name(r.output.dtype) if r.output.dtype else first)
    ratios = [v["ratio"] for v in residual.values()]
    report = {
        "schema": "malleable.merge/1", "method": "rain", "parameters": p,
        "inputs": {"base": str(r.base), "reasoning": str(target.path), "instruction": str(instruct.path)},
        "output": {"path": str(out), "kind": "model"},
        "tensors": {k: list(v.shape) for k, v in model.state_dict().items()},
        "data": {"reasoning": {"path": str(r.data.train), "sha256": sha256_file(r.data.train), "texts": len(reasoning)},
                 **({"instruction": {"path": str(r.data.validation), "sha256": sha256_file(r.data.validation),
                                     "texts": len(instruction)}} if p["coefficients"] else {})},
        "rain": {"layers": layers, "alpha": alpha.tolist(), "residual": residual, **stats,
                 "residual_ratio_max": max(ratios, default=0.0)},
        "wall_time_s": round(time.perf_counter() - start, 1), "peak_rss_mb": peak_rss_mb(),
        "environment": environment(),
    }
    with atomic_dir(out, force) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        write_report(tmp, report, _markdown(report))
    return report


def _markdown(rep: dict) -> str:
    a = torch.tensor(rep["rain"]["alpha"])
    lines = ["# merge: rain", "", f"- reasoning: `{rep['inputs']['reasoning']}`, instruction: "
             f"`{rep['inputs']['instruction']}`, base: `{rep['inputs']['base']}`",
             f"- layers {rep['rain']['layers']}, parameters {json.dumps(rep['parameters'])}",
             f"- alpha: mean {a.mean():.3f}, min {a.min():.3f}, max {a.max():.3f}",
             "", "| module | rows | ||A tau|| | ||A tau'|| / ||A tau|| |", "|---|---:|---:|---:|"]
    for k, v in rep["rain"]["residual"].items():
        lines.append(f"| `{k}` | {v['rows']} | {v['before']:.3g} | {v['ratio']:.2e} |")
    lines += ["", f"wall time {rep['wall_time_s']} s, peak RSS {rep['peak_rss_mb']} MB", ""]
    return "\n".join(lines)


@merge_rule("rain", space="learned", params=PARAMS, uses_base=True, inputs=(2, 2), describe=describe)
def rain_rule(plan, out, force: bool = False, progress: bool = True) -> dict:
    """RAIN-Merging (ICLR 2026): the instruction model's task vector projected into the null space of the
    reasoning model's features at its thinking boundaries, scaled per attention head from instruction attention;
    inputs: the reasoning model, then the instruction model; data: reasoning (train) and instruction
    (validation) calibration files."""
    return run_plan(plan, out, force, progress)
