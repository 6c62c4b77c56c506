"""SkipGPT (Zhao et al., ICML 2025, "SkipGPT: Each Token is One of a Kind"; code: github.com/EIT-NLP/SkipGPT):
per-token routers decide which tokens skip each decoder layer's attention and MLP.

Followed from the authors' code (router_attn_mlp.py, custom_trainer.py, main.py, train_processing_two_stages.py):
- per layer two routers, Linear(d, d/4), ReLU, Linear(d/4, 2) (Kaiming-uniform weights, zero biases), both
  reading the layer's input hidden states; index 0 of the two logits is "execute", index 1 "skip";
- training gates are hard Gumbel-softmax samples (straight-through) multiplying the module's output:
  h = h + gate * module(norm(h)); the temperature falls linearly from 5 to 1 over the stage's optimiser steps;
- loss = LM loss + 20 |(1 - s) - mean gate|, the mean gate averaged over tokens, then over the attention and MLP
  gates of every layer (their `target_sparsity` method; `curriculum_every` gives their `curriculum` variant);
- stage 1 trains the routers alone, base frozen: AdamW lr 2e-3, weight decay 0.01, cosine schedule with 10%
  warm-up, gradient-norm clip 1.0, global batch 8 (their 1 x 8 accumulation);
- stage 2 (optional): LoRA r 16, alpha 32, dropout 0.1 on q_proj, v_proj, gate_proj, lr 2e-4, routers frozen,
  LM loss only (their post_training method).

Where ours differs, and why:
- Inference takes the argmax decision and really skips the module for the tokens routed around it
  (models/routed.py); the reference always runs both modules and multiplies, sampling Gumbel noise at temperature
  1 even when evaluating. Keys and values are still computed and cached for every token, as the reference's
  multiplied attention leaves them (see models/routed.py).
- Stage 2 routes with the same argmax decisions as inference (the reference samples at temperature 1), so the
  LoRA learns to repair the model that will run; the LoRA is merged into the weights, so the output is a plain
  checkpoint plus the routers' file.
- Budget: the reference trains 10,000 steps of 8 x 4,096 tokens of RedPajama on GPUs; on a CPU the defaults are
  200 steps of 8 windows of the recipe's calibration text (calibration.seq_len tokens each), stated in the report.
- The curriculum variant lowers the target keep rate by 0.1 every `curriculum_every` steps from 1.0, as theirs
  (every 500 steps), but stops at 1 - sparsity instead of going on to 0.1.
- The reference's `--sparsity` is typed int with a default of 0.2; ours is a float in [0, 1), default 0.25.
- `modules` (ours; the reference always routes both): routing only the MLP keeps the loss above with the attention
  gates fixed open, so `sparsity` stays the share of ALL module executions skipped (0.25 with `mlp`: half the
  MLP executions). Why: a token routed around attention still computes its key and value, so a skipped MLP
  saves about four times the multiply-adds of a skipped attention in a Llama-style decode step; a budget counted
  in module executions buys the most time when it is spent on MLPs.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from malleable.errors import RecipeError
from malleable.learn.registry import Method
from malleable.models.routed import (CONFIG_KEY, FORMAT, MODULES, ROUTERS_FILE, LayerRouters, Routing,
                                     decoder_layers, install, routing_of, save_routers)
from malleable.params import Param
from malleable.slim.registry import ModuleSkipper, slim_method


@slim_method("skipgpt", params={
    "sparsity": Param(0.25, "target share of module executions skipped (attention and MLP of every layer, "
                      "averaged, a module without a router counting as executed), in [0, 1)", ge=0),
    "modules": Param("attention,mlp", "the modules routers may skip: attention, mlp or both (the authors: both; "
                     "mlp alone spends the budget where a skip saves the most time)", many=True),
    "steps": Param(200, "stage 1 (routers) optimiser steps (the authors: 10,000)", ge=1),
    "lr": Param(2e-3, "stage 1 learning rate", gt=0),
    "batch_size": Param(8, "calibration windows per optimiser step (both stages)", ge=1),
    "micro_batch_size": Param(0, "windows per forward pass (0: calibration.batch_size)", ge=0),
    "penalty": Param(20.0, "weight of |(1 - sparsity) - mean gate| in the loss", ge=0),
    "temperature_start": Param(5.0, "Gumbel-softmax temperature at the first step", gt=0),
    "temperature_end": Param(1.0, "Gumbel-softmax temperature reached at the last step", gt=0),
    "warmup": Param(0.1, "share of each stage's steps of linear learning-rate warm-up", ge=0, le=1),
    "weight_decay": Param(0.01, "AdamW weight decay (matrices)", ge=0),
    "curriculum_every": Param(0, "0: a fixed target; n > 0: the authors' curriculum, the target keep rate 1.0 "
                              "lowered by 0.1 every n steps down to 1 - sparsity", ge=0),
    "lora_steps": Param(0, "stage 2 LoRA optimiser steps (0: no stage 2)", ge=0),
    "lora_lr": Param(2e-4, "stage 2 learning rate", gt=0),
    "lora_r": Param(16, "stage 2 LoRA rank", ge=1),
    "lora_alpha": Param(32.0, "stage 2 LoRA alpha", gt=0),
    "lora_dropout": Param(0.1, "stage 2 LoRA dropout", ge=0, le=1),
    "lora_targets": Param("q_proj,v_proj,gate_proj", "stage 2 LoRA target modules (a list, or comma-separated)",
                          many=True),
})
class SkipGPT(ModuleSkipper):
    """SkipGPT: routers per layer for attention and MLP, trained with Gumbel-softmax gates towards a target
    sparsity (stage 1, base frozen), optionally followed by LoRA (stage 2); at inference the argmax decision
    skips the module's computation for the tokens routed around it."""

    def check(self) -> None:
        p = self.p
        if not 0 <= p["sparsity"] < 1:
            raise RecipeError(f"parameters.sparsity: {p['sparsity']} is outside [0, 1)")
        if p["micro_batch_size"] and p["batch_size"] % p["micro_batch_size"]:
            raise RecipeError(f"parameters.micro_batch_size: {p['micro_batch_size']} does not divide batch_size "
                              f"{p['batch_size']}")
        for key in ("lora_targets", "modules"):
            if isinstance(p[key], str):
                p[key] = [t.strip() for t in p[key].split(",") if t.strip()]
        p["modules"] = list(dict.fromkeys(p["modules"]))  # each routed module once
        bad = [f"'{m}' is not a routable module" for m in p["modules"] if m not in MODULES]
        if bad or not p["modules"]:
            raise RecipeError(f"parameters.modules: {bad[0] if bad else 'names no module'} (choose from "
                              f"{', '.join(MODULES)})")
        share = len(p["modules"]) / len(MODULES)
        if p["sparsity"] >= share:
            raise RecipeError(f"parameters.sparsity: {p['sparsity']} is not below {share:g}, the share of module "
                              f"executions the routed modules ({', '.join(p['modules'])}) make up")

    # -- plan --------------------------------------------------------------------------------------------------
    def plan(self, model) -> dict:
        from malleable.models.routed import check_layer

        layers = decoder_layers(model)
        for i, layer in enumerate(layers):
            check_layer(layer, f"model: decoder layer {i}")
        if self.p["lora_steps"]:
            names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)}
            missing = [t for t in self.p["lora_targets"] if t not in names]
            if missing:
                raise RecipeError(f"parameters.lora_targets: '{missing[0]}' names no linear module of the model "
                                  f"(e.g. {', '.join(sorted(names)[:6])})")
        d = model.config.hidden_size
        per = sum(p.numel() for p in LayerRouters(d, tuple(self.p["modules"])).parameters())
        n = len(self.p["modules"]) * len(layers)
        return {"routers": n, "router_parameters": per * len(layers), "bytes_saved": 0,
                "summary": f"train {n} routers ({per * len(layers):,} parameters, {' and '.join(self.p['modules'])}) "
                           f"for {len(layers)} decoder layers towards skipping {self.p['sparsity']:g} of the module "
                           f"executions, {self.p['steps']} steps"
                           + (f", then {self.p['lora_steps']} LoRA steps" if self.p["lora_steps"] else "")
                           + f"; the weights are written unchanged{' (LoRA merged)' if self.p['lora_steps'] else ''}"
                           f" with {ROUTERS_FILE} beside them"}

    # -- training ----------------------------------------------------------------------------------------------
    def spec(self, steps: int, lr: float, calibration):
        from malleable.recipes.learn import TrainingSpec

        p = self.p
        micro = p["micro_batch_size"] or min(calibration.batch_size, p["batch_size"])
        while p["batch_size"] % micro:
            micro -= 1
        return TrainingSpec(steps=steps, batch_size=p["batch_size"], micro_batch_size=micro, lr=lr,
                            schedule="cosine", warmup_steps=int(round(p["warmup"] * steps)),
                            weight_decay=p["weight_decay"], max_grad_norm=1.0, log_every=max(1, steps // 20))

    def train(self, model, windows: torch.Tensor, calibration, seed: int, progress: bool) -> dict:
        """Stage 1 (and 2) on the calibration windows through learn's engine; leaves `model` routed (hard mode,
        its config marked) and returns the report's `routing` section."""
        from malleable.learn.engine import fit

        p = self.p
        if len(windows) < 1:
            raise RecipeError("calibration.n_samples: no calibration windows to train the routers on")
        d, layers = model.config.hidden_size, decoder_layers(model)
        torch.manual_seed(seed)
        routers = nn.ModuleList(LayerRouters(d, tuple(p["modules"])) for _ in layers)
        routing = install(model, routers, "train")
        items = list(windows)
        units = [len(w) - 1 for w in windows]
        out: dict = {"budget": {}}
        model.requires_grad_(False)
        holder = _Holder(model, routers)
        stage1 = RouterStage(self, routing)
        t = time.perf_counter()
        history = fit(holder, stage1, items, collate, units, self.spec(p["steps"], p["lr"], calibration), seed,
                      progress, "skipgpt routers")
        out["budget"]["stage1"] = {"steps": p["steps"], "windows_per_step": p["batch_size"],
                                   "tokens": p["steps"] * p["batch_size"] * windows.shape[1],
                                   "wall_time_s": round(time.perf_counter() - t, 3)}
        out["history"] = {"stage1": history}
        routers.requires_grad_(False).eval()
        routing.mode = "hard"
        if p["lora_steps"]:
            model = self.stage2(model, items, units, calibration, seed, progress, out, windows.shape[1])
        routing.reset()
        with torch.no_grad():
            for chunk in windows.split(calibration.batch_size):
                model(input_ids=chunk, use_cache=False)
        out["calibration_skip_rates"] = routing.skip_rates()
        routing.reset()
        model.config.__dict__[CONFIG_KEY] = {"routers": ROUTERS_FILE, "format": FORMAT, "sparsity": p["sparsity"]}
        out["routers"] = {"file": ROUTERS_FILE, "parameters": sum(x.numel() for x in routers.parameters())}
        return out

    def stage2(self, model, items, units, calibration, seed, progress, out, seq_len):
        from malleable.learn.engine import fit
        from malleable.learn.lora import with_lora

        p = self.p
        lora = {"r": p["lora_r"], "alpha": p["lora_alpha"], "dropout": p["lora_dropout"],
                "targets": p["lora_targets"], "rslora": False}
        peft_model = with_lora(model, lora, "causal_lm")
        t = time.perf_counter()
        history = fit(peft_model, LMStage(), items, collate, units, self.spec(p["lora_steps"], p["lora_lr"],
                                                                              calibration),
                      seed + 1, progress, "skipgpt LoRA")
        out["budget"]["stage2"] = {"steps": p["lora_steps"], "windows_per_step": p["batch_size"],
                                   "tokens": p["lora_steps"] * p["batch_size"] * seq_len,
                                   "wall_time_s": round(time.perf_counter() - t, 3), "lora": lora}
        out["history"]["stage2"] = history
        model = peft_model.merge_and_unload()
        return model.requires_grad_(False).eval()

    def write(self, model, folder) -> None:
        routing = routing_of(model)
        save_routers(routing.routers, folder, {"sparsity": self.p["sparsity"], "layers": len(routing.routers),
                                                "hidden_size": model.config.hidden_size})

    def finish(self, model) -> dict:
        """Skip rates of the hard decisions over everything the evaluation ran (held-out windows and the speed
        runs' prompt and decoded tokens)."""
        routing = routing_of(model)
        return {"evaluation_skip_rates": routing.skip_rates(), "evaluation_tokens_routed": routing.tokens}


def collate(windows: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    ids = torch.stack(windows)
    labels = ids.clone()
    labels[:, 0] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


class _Holder(nn.Module):
    """The frozen model and its routers as one module, so learn's engine finds the routers' parameters."""

    def __init__(self, model, routers: nn.ModuleList):
        super().__init__()
        self.model, self.routers = model, routers

    def forward(self, **kw):
        return self.model(**kw)


class LMStage(Method):
    """Stage 2: the LM loss only (LoRA factors trainable, routers frozen, argmax routing)."""

    name = "skipgpt-lora"


class RouterStage(Method):
    """Stage 1: LM loss + penalty * |target keep rate - mean gate| per micro-batch (summed per target token, as
    learn's engine expects), the Gumbel temperature annealed per optimiser step."""

    name = "skipgpt-routers"

    def __init__(self, skip: SkipGPT, routing: Routing):
        super().__init__()
        self.skip, self.routing, self.step, self.last = skip, routing, 0, {}
        self.set_temperature()

    def set_temperature(self) -> None:
        p = self.skip.p
        a, b = p["temperature_start"], p["temperature_end"]
        self.routing.tau = a - (a - b) * self.step / p["steps"]

    def target(self) -> float:
        p = self.skip.p
        keep = 1 - p["sparsity"]
        if p["curriculum_every"]:
            return max(keep, 1.0 - 0.1 * (self.step // p["curriculum_every"]))
        return keep

    def optimizer(self, params, training):
        opt = super().optimizer(params, training)

        def advanced(*_):
            self.step += 1
            self.set_temperature()

        opt.register_step_post_hook(advanced)
        return opt

    def loss(self, model, batch) -> torch.Tensor:
        from malleable.learn.loss import task_loss

        self.routing.gates.clear()
        nll = task_loss(model, batch).sum()
        gates = self.routing.gates
        rates = {m: torch.stack([g[i].mean() for g in gates]).mean() for i, m in enumerate(MODULES)}
        shown = {m: round(float(v.detach()), 4) for m, v in rates.items()}
        gate = (rates["attention"] + rates["mlp"]) / 2
        target = self.target()
        units = int((batch["labels"] != -100).sum())
        self.last = {"keep_attention": shown["attention"], "keep_mlp": shown["mlp"],
                     "target_keep": round(target, 4), "temperature": round(self.routing.tau, 4),
                     "lm_loss": round(float(nll.detach()) / max(1, units), 4)}
        self.routing.gates.clear()
        return nll + units * self.skip.p["penalty"] * (target - gate).abs()

    def metrics(self) -> dict:
        return dict(self.last)


def routing_lines(r: dict, p: dict) -> list[str]:
    """The report's SkipGPT lines: the training budget and the skip rates reached."""
    budget = "; ".join(f"{stage}: {b['steps']} steps x {b['windows_per_step']} windows = {b['tokens']:,} tokens, "
                       f"{b['wall_time_s']:.0f} s" for stage, b in r["budget"].items())
    lines = [f"- routers: {r['routers']['parameters']:,} parameters in `{r['routers']['file']}` beside the weights "
             f"(applied by malleable's loader; plain `from_pretrained` gives the dense model)",
             f"- training budget: {budget}",
             f"- target: skip {p['sparsity']:g} of the module executions, routing "
             f"{' and '.join(p.get('modules', MODULES))}"]
    for key, what in (("calibration_skip_rates", "on the calibration windows"),
                      ("evaluation_skip_rates", "over the evaluation")):
        if key in r:
            s = r[key]
            lines.append(f"- skipped {what} (argmax): attention {s['attention']:.3f}, MLP {s['mlp']:.3f}, mean "
                         f"{(s['attention'] + s['mlp']) / 2:.3f}")
    return lines
