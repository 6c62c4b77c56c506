"""Trainable Weight Averaging against soups on eight LoRA fine-tunes of SmolLM2-135M-Instruct (issue 19, TWA half,
benchmark 2 on a language model; `bench/merge_twa.py` is the same comparison on the Fashion-MNIST CNN).

Per seed (the generated data's split, the adapters' initialisation and data order follow it):
* Task: the zoo's generated `profession` task (a rule about invented people; the base model scores 0 and the
  zoo's rank-16 adapter 61% after 40 steps, so an average has room both ways): N_TRAIN training, N_VAL
  validation (greedy soup's and TWA-v's data) and N_TEST test items, disjoint; no chat template, as the zoo
  trains.
* Ingredients: 8 rank-8 LoRAs (alpha 16, q/k/v/o) trained with `malleable learn`, 40 steps of batch 8, all from
  the seed's one initialisation and data order (a soup's ingredients share their start), differing in their
  hyperparameters `GRID` (learning rate x schedule).
* Methods: the best single fine-tune (by validation), uniform soup (the mean of the adapters' factors, TWA's
  starting point), greedy soup (validation, strict improvement), and TWA-v through the CLI (`malleable merge`
  with `method: twa_v`, the authors' defaults: AdamW lr 1e-3, wd 0, batch 32, 5 epochs over the validation
  file, cosine with 20% warm-up, one block per tensor) with the projection in float32 and at 8 / 4 / 2 / 1
  bits, and at lr 1e-2 (float32) as a check of the authors' lr, which was set for 72 CLIP models.
* Scoring: exact match under teacher forcing (`evaluate.scoring.forced_match`) of every test item.
* Memory: each TWA-v run is its own `malleable merge` process under GNU time (peak RSS of the whole run: the
  base model, the eight adapters' factors, the projection, training), and its report's projection bytes.

Reported: mean test accuracy over seeds with a t-based 95% CI; TWA-v minus greedy soup and minus uniform soup,
paired per seed (t) and per test item (a bootstrap that resamples each seed's items, 2000 draws); peak RSS and
projection bytes per variant; the machine and its load. Each seed's results are cached (`--work`), so the seeds
can run in separate processes and `--report` aggregates them without training.

    PYTHONPATH=src python bench/merge_twa_lora.py --seeds 0 1 2     # writes bench/results/merge_twa_lora.*
    PYTHONPATH=src python bench/merge_twa_lora.py --seeds 0 1 2 --report
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spinning OpenMP threads crawl on a shared CPU
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _checkpoints import smollm2_base  # noqa: E402
from _common import loadavg, machine, paired_t, thread_env, timed_run, write_results  # noqa: E402

import torch  # noqa: E402
import yaml  # noqa: E402

NAME = "merge_twa_lora"
CACHE = Path(os.environ.get("MALLEABLE_BENCH_CACHE", "/work/bench-cache")) / NAME
TASK, N_TRAIN, N_VAL, N_TEST = "profession", 400, 96, 200
STEPS, BATCH, RANK = 40, 8, 8
GRID = [(lr, schedule) for lr in (5e-4, 1e-3, 2e-3, 4e-3) for schedule in ("constant", "cosine")]
TWA_V = [("TWA-v fp32", {"bits": 32}), ("TWA-v 8-bit", {"bits": 8}), ("TWA-v 4-bit", {"bits": 4}),
         ("TWA-v 2-bit", {"bits": 2}), ("TWA-v 1-bit", {"bits": 1}), ("TWA-v fp32 lr 1e-2", {"bits": 32, "lr": 1e-2})]


def train_ingredients(base: Path, root: Path, seed: int, files: dict) -> list[Path]:
    """The 8 fine-tunes (cached): `malleable learn` recipes that differ only in GRID's hyperparameters."""
    from malleable.learn.engine import learn
    from malleable.recipes.learn import parse_learn_recipe

    paths = []
    for k, (lr, schedule) in enumerate(GRID):
        out = root / f"ft{k}"
        if not (out / "adapter_config.json").is_file():
            learn(parse_learn_recipe({
                "model": str(base), "method": "lora", "seed": seed,
                "parameters": {"r": RANK, "alpha": 2 * RANK, "targets": ["q_proj", "k_proj", "v_proj", "o_proj"]},
                "data": {"train": str(files["train"]), "chat_template": "off"},
                "training": {"steps": STEPS, "batch_size": BATCH, "lr": lr, "schedule": schedule,
                             "warmup_steps": 0 if schedule == "constant" else 4, "log_every": 10}}),
                out, force=True, progress=False)
        paths.append(out)
    return paths


class Scorer:
    """One PeftModel on the base; any set of the adapters' factors is copied in and scored item by item."""

    def __init__(self, paths: list[Path]):
        from malleable.merge.twa import adapter_states
        from malleable.models.checkpoints import Trust, load_model, load_tokenizer

        self.tokenizer = load_tokenizer(paths[0])
        self.model = load_model(paths[0], "causal_lm", self.tokenizer.pad_token_id)
        self.states = adapter_states(self.model, paths, Trust())

    def hits(self, state: dict, records: list[dict]) -> list[int]:
        from malleable.evaluate.scoring import forced_match

        with torch.no_grad():
            for n, t in self.model.named_parameters():
                if n in state:
                    t.copy_(state[n])
        return [int(x) for x in forced_match(self.model.eval(), self.tokenizer, records, chat=False, batch_size=50)]

    def adapter(self, path: Path) -> dict:
        """A written adapter's factors under the scorer's names."""
        from malleable.merge.twa import read_adapter

        return read_adapter(self.model, path, str(path))


def twa_cli(root: Path, paths: list[Path], files: dict, seed: int, label: str, params: dict) -> tuple[Path, dict]:
    """One TWA-v merge through the CLI in its own process: (its output adapter, wall / RSS / report numbers)."""
    name = label.replace(" ", "_").replace("-", "").lower()
    recipe = root / f"{name}.yaml"
    recipe.write_text(yaml.safe_dump({
        "method": "twa_v", "seed": seed, "inputs": [{"path": str(p)} for p in paths],
        "data": {"train": str(files["train"]), "validation": str(files["validation"]), "chat_template": "off"},
        "parameters": params}))
    out = root / name
    run = timed_run([sys.executable, "-m", "malleable", "merge", str(recipe), str(out), "--force", "-q"],
                    env=thread_env(1))
    if run["rc"] != 0:
        raise SystemExit(f"{label}: malleable merge failed:\n{run.get('stderr_tail')}")
    return out, {"wall_s": run["wall_s"], "peak_rss_mib": run["max_rss_mib"], **report_numbers(out)}


def report_numbers(out: Path) -> dict:
    """From a TWA-v output's report: the projection's bytes, the last logged loss, and the largest trained
    coefficient |X| (how far training moved the average from the checkpoints' mean)."""
    twa = json.loads((out / "report.json").read_text())["twa"]
    return {"projection_bytes": twa["projection_bytes"], "final_loss": twa["history"][-1]["loss"],
            "max_abs_coefficient": max(abs(x) for chunk in twa["coefficients"] for row in chunk for x in row)}


def one_seed(seed: int, base: Path, work: Path) -> dict:
    from malleable.data.files import write_jsonl
    from malleable.data.generated import generated_task
    from malleable.merge.soups import greedy_soup
    from malleable.merge.twa import mean_state

    cached = work / f"seed{seed}.json"
    if cached.is_file():
        return json.loads(cached.read_text())
    root = work / f"seed{seed}"
    root.mkdir(parents=True, exist_ok=True)
    load, start = loadavg(), time.perf_counter()
    data = generated_task(TASK, seed=seed, n_test=N_TEST, n_validation=N_VAL, n_train=N_TRAIN)
    files = {split: write_jsonl(root / f"{split}.jsonl", records) for split, records in data.items()}
    paths = train_ingredients(base, root, seed, files)
    train_s = time.perf_counter() - start
    scorer = Scorer(paths)
    val = [statistics.fmean(scorer.hits(s, data["validation"])) for s in scorer.states]
    test = [scorer.hits(s, data["test"]) for s in scorer.states]
    best = max(range(len(val)), key=lambda i: val[i])
    methods = {"best single (val)": {"hits": test[best], "ingredient": best},
               "uniform soup": {"hits": scorer.hits(mean_state(scorer.states), data["test"])}}
    t = time.perf_counter()
    soup, chosen = greedy_soup(scorer.states, lambda s: statistics.fmean(scorer.hits(s, data["validation"])))
    methods["greedy soup"] = {"hits": scorer.hits(soup, data["test"]), "ingredients": chosen,
                              "seconds": round(time.perf_counter() - t, 1)}
    for label, params in TWA_V:
        out, numbers = twa_cli(root, paths, files, seed, label, params)
        state = scorer.adapter(out)
        methods[label] = {"hits": scorer.hits(state, data["test"]),
                          "val": statistics.fmean(scorer.hits(state, data["validation"])), **numbers}
    row = {"seed": seed, "loadavg_start": load, "loadavg_end": loadavg(), "train_s": round(train_s, 1),
           "wall_s": round(time.perf_counter() - start, 1), "grid": GRID, "individual_val": val,
           "individual_test": [statistics.fmean(h) for h in test],
           "training_s": [json.loads((p / "report.json").read_text())["wall_time_s"] for p in paths],
           "methods": methods}
    cached.write_text(json.dumps(row))
    return row


def bootstrap_diff(rows: list[dict], a: str, b: str, draws: int = 2000) -> tuple[float, float, float]:
    """Mean of a - b over all test items (seeds pooled), and a 95% interval resampling each seed's items."""
    rng = random.Random(0)
    diffs = [[x - y for x, y in zip(r["methods"][a]["hits"], r["methods"][b]["hits"])] for r in rows]
    point = statistics.fmean(d for seed in diffs for d in seed)
    means = sorted(statistics.fmean(d for seed in diffs for d in rng.choices(seed, k=len(seed)))
                   for _ in range(draws))
    return point, means[int(0.025 * draws)], means[int(0.975 * draws) - 1]


def summarise(rows: list[dict]) -> dict:
    names = list(rows[0]["methods"])
    acc = {m: [100 * statistics.fmean(r["methods"][m]["hits"]) for r in rows] for m in names}
    out = {"accuracy": {}, "vs": {}}
    for m in names:
        ci = paired_t([0.0] * len(rows), acc[m])
        out["accuracy"][m] = {"mean": ci["mean"], "lo": ci["lo"], "hi": ci["hi"], "per_seed": acc[m]}
        for ref in ("greedy soup", "uniform soup"):
            if m.startswith("TWA-v"):
                t = paired_t(acc[ref], acc[m])
                point, lo, hi = bootstrap_diff(rows, m, ref)
                out["vs"][f"{m} - {ref}"] = {"seeds": [t["mean"], t["lo"], t["hi"]],
                                             "items": [100 * point, 100 * lo, 100 * hi]}
    return out


def markdown(result: dict) -> str:
    s, rows = result["summary"], result["rows"]

    def num(r: dict, key: str):
        values = [row["methods"][r][key] for row in rows if key in row["methods"][r]]
        return statistics.median(values) if values else None

    lines = [f"# {NAME}: TWA-v against soups, eight LoRA fine-tunes of SmolLM2-135M-Instruct", "",
             *(["PARTIAL: not every planned seed has run.", ""] if result["partial"] else []),
             (__doc__ or "").split("\n\n")[1].strip(), "",
             f"Seeds {[r['seed'] for r in rows]}; {N_TRAIN} / {N_VAL} / {N_TEST} train / validation / test items; "
             f"grid (lr, schedule) {GRID}.", "",
             "| method | test accuracy (%), mean [95% CI over seeds] | per seed | TWA-v peak RSS (MiB, median) | "
             "projection bytes | TWA-v wall (s, median) | max abs coefficient (median) |",
             "|---|---:|---|---:|---:|---:|---:|"]
    for m, a in s["accuracy"].items():
        moved = num(m, "max_abs_coefficient")
        lines.append(f"| {m} | {a['mean']:.1f} [{a['lo']:.1f}, {a['hi']:.1f}] | "
                     f"{', '.join(f'{x:.1f}' for x in a['per_seed'])} | {num(m, 'peak_rss_mib') or ''} | "
                     f"{num(m, 'projection_bytes') or ''} | {num(m, 'wall_s') or ''} | "
                     f"{'' if moved is None else f'{moved:.4f}'} |")
    lines += ["", "Individual fine-tunes' test accuracy (%) per seed, in GRID's order: " + "; ".join(
        f"seed {r['seed']}: " + " ".join(f"{100 * x:.0f}" for x in r["individual_test"]) for r in rows),
              "Greedy soup's ingredients (GRID indices, in the order added): " + "; ".join(
                  f"seed {r['seed']}: {r['methods']['greedy soup']['ingredients']}" for r in rows), "",
              "| difference (points) | paired per seed: mean [95% t] | paired per item: mean [95% bootstrap] |",
              "|---|---:|---:|"]
    for k, v in s["vs"].items():
        a, b = v["seeds"], v["items"]
        lines.append(f"| {k} | {a[0]:+.1f} [{a[1]:+.1f}, {a[2]:+.1f}] | {b[0]:+.1f} [{b[1]:+.1f}, {b[2]:+.1f}] |")
    mach = result["machine"]
    lines += ["", f"Machine: {mach['cpu']}, {mach['cores']} cores, {mach['ram_gib']} GiB, shared with other jobs; load "
              f"average at each seed's start and end {[(r['loadavg_start'], r['loadavg_end']) for r in rows]}. "
              f"Training the 8 adapters took {[r['train_s'] for r in rows]} s per seed (a cached seed reports its "
              f"first run), each seed's whole run {[r['wall_s'] for r in rows]} s. Peak RSS is GNU time's maximum "
              "resident set of each TWA-v process (one thread).", "", "Verdict: " + result["verdict"], ""]
    return "\n".join(lines)


def verdict(s: dict) -> str:
    out = []
    for k, v in s["vs"].items():
        lo, hi = v["items"][1], v["items"][2]
        word = "above" if lo > 0 else "below" if hi < 0 else "not distinguishable from"
        out.append(f"{k.split(' - ')[0]} is {word} {k.split(' - ')[1]} per item ({v['items'][0]:+.1f} "
                   f"[{lo:+.1f}, {hi:+.1f}]; per seed {v['seeds'][0]:+.1f} [{v['seeds'][1]:+.1f}, {v['seeds'][2]:+.1f}])")
    return "; ".join(out) + "."


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--work", type=Path, default=CACHE / "runs", help="per-seed cache (adapters, merges, results)")
    ap.add_argument("--report", action="store_true", help="aggregate the cached seeds only, training nothing")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, a separate cache, no results written")
    args = ap.parse_args()
    if args.smoke:
        global N_TRAIN, N_VAL, N_TEST, STEPS
        N_TRAIN, N_VAL, N_TEST, STEPS = 16, 8, 8, 2
        args.work = CACHE / "smoke"
    torch.set_num_threads(1)
    base, _ = smollm2_base(CACHE.parent)  # the shared fp32 SmolLM2 checkpoint other benchmarks use
    rows = []
    for seed in args.seeds:
        cached = args.work / f"seed{seed}.json"
        if args.report and not cached.is_file():
            continue
        rows.append(one_seed(seed, base, args.work))
        print(f"seed {seed}: " + ", ".join(f"{m} {100 * statistics.fmean(v['hits']):.1f}"
                                           for m, v in rows[-1]["methods"].items()), flush=True)
    if not rows:
        raise SystemExit("no seed has run yet")
    result = {"benchmark": NAME, "machine": machine(), "seeds": [r["seed"] for r in rows], "rows": rows,
              "partial": len(rows) < len(args.seeds)}
    result["summary"] = summarise(rows)
    result["verdict"] = verdict(result["summary"]) if len(rows) > 1 else "one seed only"
    if args.smoke:
        print(markdown(result))
    else:
        write_results(NAME, result, markdown(result))


if __name__ == "__main__":
    main()
