"""Continual LoRA post-training of SmolLM2-135M-Instruct: every strategy's accuracy matrix over a stream of tasks.

    PYTHONPATH=src python bench/continual_lora.py                    # 8 strategies, 3 seeds
    PYTHONPATH=src python bench/continual_lora.py --methods seq_lora,o_lora --seeds 0
    PYTHONPATH=src python bench/continual_lora.py --tune --seeds 0 --methods "l2_lora:lam=1;l2_lora:lam=100"

A method may carry parameters, `name:key=value,key=value`, and training settings of its own after `@`
(`joint_lora@epochs=3,schedule=cosine`: an oracle trained to convergence); methods are separated by `;` when any
carries either, and each is reported under its whole label. The oracle the others are paired against is the
last joint_lora label given (`--oracle` names another). `--tune` scores held-out training items instead of the
test items (each task's last `--n-validation` training items scored, the rest trained on), into <name>_tuning.

Every run is the verb itself (`malleable continual` with a `tasks:` list). The stream: four generated tasks of
`malleable.data.generated`, the ones a 40-step adapter learns in the merge benchmark's zoo (`profession`, a rule
about invented people; `larger`; `first-letter`; `last-letter`; the starting model scores about 0 on each; train
and test items disjoint, the same for every seed), learned in that order with a rank-8 LoRA on the attention
projections, without a chat template (as the zoo trains them). Scored after every task: each task's test items
(exact match under teacher forcing), `first-and-last-letter` (both letter rules in one answer: the cross-task
test), and the perplexity of held-out news text (gensim's lee.cor; generality against the starting model).

A seed fixes the adapter's initialisation and the batch order; runs are interleaved (seed outer, strategy inner)
and compared PAIRED by seed against seq_lora. Reported: mean and 95% t-interval over seeds of average accuracy,
forgetting, backward transfer, plasticity, the final composed score and the probe's perplexity ratio; each
strategy's mean accuracy matrix. Each run's result is cached (`--work`), so a stopped bench resumes; results are
written after every run, marked partial until every planned run is in.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import RESULTS_DIR, fmt, loadavg, machine, paired_t, write_results  # noqa: E402
from continual_online import ci  # noqa: E402

from malleable.continual.engine import continual  # noqa: E402
from malleable.recipes.continual import parse_continual_recipe  # noqa: E402

NAME = "continual_lora"
STRATEGIES = ["seq_lora", "inc_lora", "o_lora", "replay_lora", "l2_lora", "ewc_lora", "merge_each", "joint_lora"]
TASKS = ["profession", "larger", "first-letter", "last-letter"]
COMPOSED = "first-and-last-letter"
METRICS = ("average_accuracy", "forgetting", "backward_transfer", "plasticity")


def write_data(root: Path, tasks: list[str], n_train: int, n_test: int, n_validation: int = 0) -> dict:
    """Each task's train/test JSONL (data seed 0) and the composed test; {name: (train, test)}. With
    `n_validation`, the last that many training items replace the test items (for tuning)."""
    from malleable.data.files import write_jsonl
    from malleable.data.generated import generated_task

    root.mkdir(parents=True, exist_ok=True)
    out = {}
    for task in tasks + [COMPOSED]:
        split = generated_task(task, seed=0, n_test=n_test, n_validation=0, n_train=0 if task == COMPOSED else n_train)
        if n_validation and task != COMPOSED:
            split = {"train": split["train"][:-n_validation], "test": split["train"][-n_validation:]}
        test = write_jsonl(root / f"{task}-test.jsonl", split["test"])
        train = None if task == COMPOSED else write_jsonl(root / f"{task}-train.jsonl", split["train"])
        out[task] = (train, test)
    return out


def parse_method(spec: str) -> tuple[str, dict, dict]:
    """`name[:key=value,...][@key=value,...]` -> (name, parameters, training settings); values read as numbers
    where they are."""
    def pairs(text: str) -> dict:
        out = {}
        for item in filter(None, text.split(",")):
            key, _, value = item.partition("=")
            try:
                out[key] = int(value) if value.lstrip("-").isdigit() else float(value)
            except ValueError:
                out[key] = value
        return out

    head, _, training = spec.partition("@")
    name, _, params = head.partition(":")
    return name, pairs(params), pairs(training)


def run_name(method: str, seed: int) -> str:
    """A method label and seed as a file name (the run's folder and its cached result)."""
    return f"{method.replace(':', '_').replace('@', '_at_')}-{seed}"


def recipe(model: Path, method: str, seed: int, data: dict, args) -> dict:
    method, params, own = parse_method(method)
    training = {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "schedule": "constant"} | own
    if "epochs" in own:
        training.pop("steps")
    return {"model": str(model), "method": method, "seed": seed, "parameters": params,
            "lora": {"r": args.rank, "alpha": 2 * args.rank, "targets": ["q_proj", "k_proj", "v_proj", "o_proj"]},
            "tasks": [{"name": t, "train": str(data[t][0]), "test": str(data[t][1])} for t in args.tasks],
            "data": {"chat_template": "off"},
            "training": training,
            "evaluate": {"probe": "lee", "probe_windows": 8, "probe_length": 128,
                         "composed": [{"name": COMPOSED, "test": str(data[COMPOSED][1])}]}}


def run_one(model: Path, method: str, seed: int, data: dict, args, work: Path) -> dict:
    out = work / run_name(method, seed)
    load = loadavg()
    start = time.perf_counter()
    report = continual(parse_continual_recipe(recipe(model, method, seed, data, args)), out, force=True,
                       progress=False)
    wall = time.perf_counter() - start
    shutil.rmtree(out, ignore_errors=True)
    return {"method": method, "seed": seed, "metrics": report["metrics"], "accuracy_matrix": report["accuracy_matrix"],
            "composed": report["composed"]["matrix"], "probe": report["generality"]["perplexity"],
            "probe_ratio": report["generality"]["ratio_to_start"], "steps": report["steps"],
            "train_seconds": report["train_seconds"], "wall_s": round(wall, 1), "loadavg_before": load,
            "loadavg_after": loadavg()}


def values(run: dict) -> dict[str, float | None]:
    out = {k: run["metrics"][k] for k in METRICS}
    out["composed_final"] = run["composed"][-1][0]
    out["probe_ratio_final"] = run["probe_ratio"][-1]
    return out


def paired(runs: list[dict], method: str, reference: str, keys: tuple[str, ...]) -> dict:
    """method - reference per seed (the seeds both have), mean and 95% t-interval per key."""
    ref = {r["seed"]: values(r) for r in runs if r["method"] == reference}
    mine = {r["seed"]: values(r) for r in runs if r["method"] == method and r["seed"] in ref}
    if len(mine) < 2:
        return {}
    return {k: paired_t([ref[s][k] for s in mine], [mine[s][k] for s in mine]) for k in keys}


def aggregate(runs: list[dict], methods: list[str], oracle: str = "joint_lora") -> dict:
    table, vs_seq, vs_joint, matrices = {}, {}, {}, {}
    for m in methods:
        rows = [r for r in runs if r["method"] == m]
        if not rows:
            continue
        vals = [values(r) for r in rows]
        table[m] = {k: ci([v[k] for v in vals if v[k] is not None]) for k in vals[0]
                    if any(v[k] is not None for v in vals) and k != "probe_ratio_final"}
        # perplexity ratios span orders of magnitude across seeds: the median and each seed's, no t-interval
        ratios = sorted(v["probe_ratio_final"] for v in vals)
        table[m]["probe_ratio_final"] = {"median": statistics.median(ratios), "per_seed": ratios}
        table[m]["train_seconds"] = statistics.median(r["train_seconds"] for r in rows)
        R = [r["accuracy_matrix"] for r in rows]
        matrices[m] = [[statistics.fmean(M[i][j] for M in R) for j in range(len(R[0][0]))] for i in range(len(R[0]))]
        if m != "seq_lora":
            vs_seq[m] = paired(runs, m, "seq_lora", ("average_accuracy", "forgetting"))
        if m != oracle:
            vs_joint[m] = paired(runs, m, oracle, ("average_accuracy",))
    start = runs[0]["accuracy_matrix"][0] if runs else []
    return {"table": table, "paired_vs_seq_lora": vs_seq, "paired_vs_joint_lora": vs_joint, "oracle": oracle,
            "mean_matrices": matrices, "start_scores": start,
            "start_composed": runs[0]["composed"][0][0] if runs else None}


def runs_start_ppl(runs: list[dict]) -> str:
    return "-" if not runs else f"{runs[0]['probe'][0]:.1f}"


def markdown(res: dict) -> str:
    a, s = res["aggregate"], res["settings"]
    lines = [f"# Continual LoRA post-training on SmolLM2-135M-Instruct{' (PARTIAL)' if res['partial'] else ''}", "",
             f"Stream: {' -> '.join(s['tasks'])} (generated tasks, " + (
                 f"TUNING: {s['n_train'] - s['n_validation']} training items each, scored on {s['n_validation']} "
                 "held-out training items instead of the test items" if s.get("tune") else
                 f"{s['n_train']} training and {s['n_test']} test items each") + "); "
             f"LoRA r={s['rank']} on q/k/v/o, {s['steps']} steps per task, batch {s['batch_size']}, "
             f"AdamW lr {s['lr']} constant, no chat template; seeds {s['seeds']}. Scores: exact match (%) under "
             f"teacher forcing. Composed: `{COMPOSED}` (both letter rules in one answer). Probe: "
             "perplexity on gensim's lee.cor (8 windows of 128 tokens), end / start.", "",
             "| strategy | seeds | average accuracy | forgetting | backward transfer | plasticity | composed (end) | "
             "probe ppl end/start: median (per seed) | train s (median) |", "|---" * 9 + "|"]
    for m, row in a["table"].items():
        def cell(k, nd=2):
            c = row.get(k)
            if c is None:
                return "-"
            return fmt(c["mean"], nd) + (f" [{fmt(c['lo'], nd)}, {fmt(c['hi'], nd)}]" if c["n"] > 1 else "")
        n = row["average_accuracy"]["n"]
        probe = row["probe_ratio_final"]
        lines.append(f"| {m} | {n} | {cell('average_accuracy')} | {cell('forgetting')} | "
                     f"{cell('backward_transfer')} | {cell('plasticity')} | {cell('composed_final')} | "
                     f"{probe['median']:.3g} ({', '.join(f'{v:.3g}' for v in probe['per_seed'])}) | "
                     f"{fmt(row['train_seconds'], 0)} |")
    def diff(p: dict, k: str, nd: int = 2) -> str:
        return f"{fmt(p[k]['mean'], nd)} [{fmt(p[k]['lo'], nd)}, {fmt(p[k]['hi'], nd)}]" if k in p else "-"

    lines += ["", "Paired by seed (mean [95% t-interval]): strategy minus seq_lora (the lower bound), and strategy "
              f"minus {a.get('oracle', 'joint_lora')} (the oracle):", "",
              f"| strategy | avg acc - seq_lora | forgetting - seq_lora | avg acc - {a.get('oracle', 'joint_lora')} |",
              "|---|---|---|---|"]
    for m in a["table"]:
        p, q = a["paired_vs_seq_lora"].get(m, {}), a["paired_vs_joint_lora"].get(m, {})
        lines.append(f"| {m} | {diff(p, 'average_accuracy')} | {diff(p, 'forgetting')} | "
                     f"{diff(q, 'average_accuracy')} |")
    lines += ["", f"Against the starting model (row 0): every task {a['start_scores']} (exact match, %), composed "
              f"{a['start_composed']}, probe ratio 1 by definition (starting perplexity "
              f"{runs_start_ppl(res['runs'])}); a strategy's generality is lost where its probe ratio is well above 1."]
    lines += ["", "Mean accuracy matrices (row i: after task i, row 0 the starting model):", ""]
    for m, M in a["mean_matrices"].items():
        lines += [f"**{m}**", "", "| after | " + " | ".join(s["tasks"]) + " |", "|---" * (len(s["tasks"]) + 1) + "|"]
        for i, row in enumerate(M):
            lines.append(f"| {'start' if i == 0 else s['tasks'][i - 1]} | " + " | ".join(f"{v:.1f}" for v in row)
                         + " |")
        lines.append("")
    m, runs = res["machine"], res["runs"]
    loads = [x for r in runs for x in (r["loadavg_before"][0], r["loadavg_after"][0])]
    lines += [f"Machine: {m.get('cpu')}, {m.get('cores')} cores; torch {m.get('versions', {}).get('torch')}; one "
              f"torch thread per run, up to four runs at once (1-minute load {min(loads, default=0):.1f} to "
              f"{max(loads, default=0):.1f}); {len(runs)} runs, {fmt(sum(r['wall_s'] for r in runs) / 60, 0)} "
              "minutes of wall time summed over them (the seconds are indicative only).", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default=",".join(STRATEGIES), help="comma-separated, or `;`-separated when a "
                    "method carries parameters or training settings (name:key=value,...@key=value,...)")
    ap.add_argument("--oracle", help="the label the others are paired against (default: the last joint_lora one)")
    ap.add_argument("--tune", action="store_true", help="score held-out training items, not the test items")
    ap.add_argument("--n-validation", type=int, default=40, help="with --tune: training items held out per task")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--n-train", type=int, default=200)
    ap.add_argument("--n-test", type=int, default=80)
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache/malleable/continual-lora")
    ap.add_argument("--results", type=Path, default=RESULTS_DIR)
    ap.add_argument("--name", default=NAME, help="results file name (bench/results/<name>.{json,md}; --tune adds "
                    "_tuning)")
    args = ap.parse_args(argv)
    args.tasks = args.tasks.split(",")
    methods = args.methods.split(";" if any(c in args.methods for c in ";:@") else ",")
    oracle = args.oracle or next((m for m in reversed(methods) if m.startswith("joint_lora")), "joint_lora")
    seeds = [int(s) for s in args.seeds.split(",")]
    from malleable.models.smollm2 import smollm2_checkpoint

    model = smollm2_checkpoint()
    key = f"s{args.steps}-b{args.batch_size}-lr{args.lr}-r{args.rank}-n{args.n_train}-{args.n_test}-" + "+".join(args.tasks)
    key += f"-tune{args.n_validation}" if args.tune else ""
    work = args.work / key
    data = write_data(work / "data", args.tasks, args.n_train, args.n_test, args.n_validation if args.tune else 0)
    name = args.name + ("_tuning" if args.tune else "")
    settings = {k: v for k, v in vars(args).items() if k not in ("work", "results", "methods", "seeds", "name",
                                                                 "oracle")
                and (args.tune or k != "n_validation")}
    settings |= {"seeds": seeds, "methods": methods}
    start, runs = time.perf_counter(), []
    for seed in seeds:
        for method in methods:
            cache = work / "runs" / f"{run_name(method, seed)}.json"
            if cache.is_file():
                runs.append(json.loads(cache.read_text()))
            else:
                run = run_one(model, method, seed, data, args, work / "out")
                cache.parent.mkdir(parents=True, exist_ok=True)
                cache.write_text(json.dumps(run))
                runs.append(run)
                print(f"{method} seed {seed}: {json.dumps(values(run))} in {run['wall_s']} s", flush=True)
            res = {"settings": settings, "runs": runs, "aggregate": aggregate(runs, methods, oracle),
                   "partial": len(runs) < len(methods) * len(seeds), "wall_s": time.perf_counter() - start,
                   "machine": machine()}
            write_results(name, res, markdown(res), args.results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
