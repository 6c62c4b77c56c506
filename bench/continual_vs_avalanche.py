"""malleable's online ER and ER-ACE side by side with Avalanche 0.6.0's, on the same split Fashion-MNIST stream;
then las and mir_las (ours) beside them, and joint.

    bash bench/setup_avalanche.sh                                        # once: Avalanche in its own virtualenv
    PYTHONPATH=src python bench/continual_vs_avalanche.py                # the full stream, buffers 200 and 500
    PYTHONPATH=src python bench/continual_vs_avalanche.py --max-per-class 300   # a reduced stream (marked as such)

Both tools see the same stream: 5 tasks of 2 classes, each task's training images in the order malleable's engine
walks them for that seed (Avalanche's online stream is built with shuffle=False from that order), batch 10 with 10
replayed, one pass, SGD lr 0.03, malleable's small_cnn with the same initial weights (torch.manual_seed(seed)
before building it in both tools), buffers of the same size. What each tool keeps in its buffer and when is its
own (ours: a reservoir updated after each step; Avalanche's ER: its ReservoirSamplingBuffer updated after each
sub-experience; its ER_ACE: a class-balanced buffer filled before each sub-experience); bench/_avalanche_worker.py
says how Avalanche is driven. Each run is its own process (malleable's: this file with --worker; Avalanche's: the
worker in /work/avalanche-venv), so peak RSS (VmHWM) is each run's own and both pay for loading the data.

Runs are interleaved: seed outer, then per buffer the two tools' ER and ER-ACE alternately (which tool goes first
alternates with the seed), then las, mir_las (ours) and, once per seed, joint. Reported: final average accuracy and
forgetting, mean and 95% t-interval over seeds; the paired (same seed) difference malleable - Avalanche; medians of
training time (time inside the training calls) and of each run's wall time, with the ratio of medians and the
median of per-seed ratios (target <= 1.0x); median peak RSS; las / mir_las against ER and ER-ACE (paired). Results
are written after every run (a stopped run leaves what it measured, marked partial).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import RESULTS_DIR, fmt, loadavg, machine, median, paired_t, ratio, write_results  # noqa: E402
from continual_online import ci  # noqa: E402

NAME = "continual_vs_avalanche"
HERE = Path(__file__).resolve().parent
AVALANCHE_PY = Path(os.environ.get("AVALANCHE_VENV", "/work/avalanche-venv")) / "bin" / "python"
PEERED = ("er", "er_ace")  # run by both tools
OURS = ("las", "mir_las")  # ours only, at each buffer


def plan(seed: int, buffers: list[int], joint: bool) -> list[tuple[str, str, int | None]]:
    """(tool, method, buffer) in the order this seed runs them."""
    tools = ("malleable", "avalanche") if seed % 2 == 0 else ("avalanche", "malleable")
    out = []
    for b in buffers:
        out += [(tool, m, b) for m in PEERED for tool in tools] + [("malleable", m, b) for m in OURS]
    return out + ([("malleable", "joint", None)] if joint else [])


def label(tool: str, method: str, buffer: int | None) -> str:
    return f"{tool} {method}" + ("" if buffer is None else f" (M={buffer})")


def stream_job(seed: int, max_per_class: int | None, test_per_class: int | None) -> list[dict]:
    """Per task, Fashion-MNIST's training indices in malleable's walking order for `seed`, and the test indices."""
    from malleable.continual.engine import _order
    from malleable.continual.stream import SPLIT, _per_class
    from malleable.data.vision import load_image_dataset

    data = load_image_dataset("fashion_mnist")
    tasks = []
    for k, classes in enumerate(SPLIT):
        train = _per_class(data["train"].labels, classes, max_per_class)
        tasks.append({"train": [train[i] for i in _order(len(train), seed, k, 1)],
                      "test": _per_class(data["test"].labels, classes, test_per_class)})
    return tasks


def run_malleable(job: dict) -> dict:
    """--worker: one `malleable continual` run in this process; JSON on stdout."""
    start = time.perf_counter()
    import torch

    from malleable.continual.engine import continual
    from malleable.recipes.continual import parse_continual_recipe
    from malleable.report import peak_rss_mb

    training = {"batch_size": job["batch_size"], "replay_batch_size": job["batch_size"], "lr": job["lr"],
                "buffer_size": job["buffer"] or 0, "max_per_class": job["max_per_class"],
                "test_per_class": job["test_per_class"]}
    recipe = parse_continual_recipe({"method": job["method"], "stream": "split_fashion_mnist", "seed": job["seed"],
                                     "training": {k: v for k, v in training.items() if v is not None}})
    report = continual(recipe, job["out"], force=True, progress=False)
    return {"accuracy_matrix": report["accuracy_matrix"], "train_seconds": report["train_seconds"],
            "wall_s": round(time.perf_counter() - start, 2), "peak_rss_mb": peak_rss_mb(),
            "threads": torch.get_num_threads()}


def run_one(tool: str, method: str, buffer: int | None, seed: int, args) -> dict:
    from malleable.evaluate.continual import summary

    job = {"method": method, "seed": seed, "buffer": buffer, "batch_size": args.batch_size,
           "replay_batch_size": args.batch_size, "lr": args.lr, "width": 16, "threads": args.threads}
    if tool == "malleable":
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker"]
        job |= {"max_per_class": args.max_per_class, "test_per_class": args.test_per_class,
                "out": str(args.work / f"{method}-{buffer}-{seed}")}
    else:
        cmd = [str(AVALANCHE_PY), str(HERE / "_avalanche_worker.py")]
        job["tasks"] = stream_job(seed, args.max_per_class, args.test_per_class)
    env = dict(os.environ, PYTHONPATH=str(HERE.parent / "src"), PYTHONWARNINGS="ignore",
               OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    load = loadavg()
    out = subprocess.run(cmd, input=json.dumps(job), capture_output=True, text=True, env=env)
    if tool == "malleable":
        shutil.rmtree(job["out"], ignore_errors=True)
    if out.returncode != 0:
        raise SystemExit(f"{label(tool, method, buffer)} seed {seed} failed:\n{out.stderr[-3000:]}")
    r = json.loads(out.stdout)
    return {"tool": tool, "method": method, "buffer": buffer, "seed": seed, **r, "metrics": summary(r["accuracy_matrix"]),
            "loadavg_before": load, "loadavg_after": loadavg()}


def pick(runs: list[dict], tool: str, method: str, buffer: int | None) -> dict[int, dict]:
    return {r["seed"]: r for r in runs if (r["tool"], r["method"], r["buffer"]) == (tool, method, buffer)}


def paired(a: dict[int, dict], b: dict[int, dict], key: str) -> dict | None:
    """b - a over the seeds both have, on metrics[key]."""
    seeds = sorted(set(a) & set(b))
    if len(seeds) < 2:
        return None
    return paired_t([a[s]["metrics"][key] for s in seeds], [b[s]["metrics"][key] for s in seeds])


def aggregate(runs: list[dict], buffers: list[int]) -> dict:
    arms = sorted({(r["tool"], r["method"], r["buffer"]) for r in runs}, key=lambda a: (a[2] or 0, a[1], a[0]))
    table = {}
    for tool, method, buffer in arms:
        rows = list(pick(runs, tool, method, buffer).values())
        table[label(tool, method, buffer)] = {
            "average_accuracy": ci([r["metrics"]["average_accuracy"] for r in rows]),
            "forgetting": ci([r["metrics"]["forgetting"] for r in rows]),
            "train_seconds_median": median([r["train_seconds"] for r in rows]),
            "wall_s_median": median([r["wall_s"] for r in rows]),
            "peak_rss_mb_median": median([r["peak_rss_mb"] for r in rows]), "seeds": sorted(r["seed"] for r in rows)}
    versus, ours = {}, {}
    for buffer in buffers:
        for method in PEERED:
            a, m = pick(runs, "avalanche", method, buffer), pick(runs, "malleable", method, buffer)
            seeds = sorted(set(a) & set(m))
            if not seeds:
                continue
            versus[f"{method} (M={buffer})"] = {
                "accuracy_difference": paired(a, m, "average_accuracy"),
                "forgetting_difference": paired(a, m, "forgetting"),
                "train_time_ratio_of_medians": ratio(median([m[s]["train_seconds"] for s in seeds]),
                                                     median([a[s]["train_seconds"] for s in seeds])),
                "train_time_ratio_median_per_seed": median([m[s]["train_seconds"] / a[s]["train_seconds"]
                                                            for s in seeds]),
                "wall_ratio_of_medians": ratio(median([m[s]["wall_s"] for s in seeds]),
                                               median([a[s]["wall_s"] for s in seeds])),
                "peak_rss_ratio_of_medians": ratio(median([m[s]["peak_rss_mb"] for s in seeds]),
                                                   median([a[s]["peak_rss_mb"] for s in seeds])),
                "same_starting_accuracy": all(m[s]["accuracy_matrix"][0] == a[s]["accuracy_matrix"][0] for s in seeds),
                "seeds": seeds}
        for new in OURS:
            for base in ("er", "er_ace", "las"):
                if new == base:
                    continue
                d = paired(pick(runs, "malleable", base, buffer), pick(runs, "malleable", new, buffer),
                           "average_accuracy")
                if d:
                    ours[f"{new} - {base} (M={buffer})"] = d
    return {"table": table, "versus": versus, "ours": ours}


def markdown(data: dict) -> str:
    s, summ = data["settings"], data["summary"]
    stream = ("the FULL stream (12,000 training images per task, all of Fashion-MNIST's training set)"
              if s["max_per_class"] is None else
              f"a REDUCED stream: the first {s['max_per_class']} training images per class ({2 * s['max_per_class']:,} "
              "per task)")
    tests = ("all 10,000 test images" if s["test_per_class"] is None else
             f"the first {s['test_per_class']} test images per class")
    lines = [f"# malleable vs Avalanche {data['avalanche_version']}: online split Fashion-MNIST"
             + (" (partial)" if data["partial"] else ""), "",
             f"5 tasks of 2 classes, {stream}, one pass, batch {s['batch_size']} + {s['batch_size']} replayed, SGD lr "
             f"{s['lr']}, small_cnn (width 16) with the same initial weights in both tools, scored on {tests}; "
             f"{s['threads']} torch thread(s) per run in both tools. Seeds "
             f"{s['seeds']}; runs interleaved (seed outer, the two tools alternately); every run its own process. "
             "Mean and 95% t-interval over seeds; accuracy in %.", "",
             "| arm | final avg. accuracy | forgetting | train s (median) | wall s (median) | peak RSS MB (median) | seeds |",
             "|---|---|---|---|---|---|---|"]
    for name, row in summ["table"].items():
        acc, fg = row["average_accuracy"], row["forgetting"]
        lines.append(f"| {name} | {fmt(acc['mean'])} [{fmt(acc['lo'])}, {fmt(acc['hi'])}] | {fmt(fg['mean'])} "
                     f"[{fmt(fg['lo'])}, {fmt(fg['hi'])}] | {fmt(row['train_seconds_median'], 1)} | "
                     f"{fmt(row['wall_s_median'], 1)} | {fmt(row['peak_rss_mb_median'], 0)} | {len(row['seeds'])} |")
    if summ["versus"]:
        lines += ["", "malleable against Avalanche, same seeds (difference malleable - Avalanche, 95% t-interval; time "
                      "and memory as ratios malleable / Avalanche, target <= 1.0x):", "",
                  "| method | accuracy diff. | forgetting diff. | train time (ratio of medians) | train time (median "
                  "per-seed ratio) | wall | peak RSS | same start | seeds |", "|---|---|---|---|---|---|---|---|---|"]
        for name, v in summ["versus"].items():
            cells = [f"{fmt(d['mean'])} [{fmt(d['lo'])}, {fmt(d['hi'])}]" if d else "-"
                     for d in (v["accuracy_difference"], v["forgetting_difference"])]
            lines.append(f"| {name} | " + " | ".join(cells) + " | " + " | ".join(
                f"{fmt(v[k], 3)}x" for k in ("train_time_ratio_of_medians", "train_time_ratio_median_per_seed",
                                              "wall_ratio_of_medians", "peak_rss_ratio_of_medians"))
                + f" | {'yes' if v['same_starting_accuracy'] else 'NO'} | {len(v['seeds'])} |")
    if summ["ours"]:
        lines += ["", "las and mir_las (ours) against the replay baselines, paired by seed (final average accuracy, "
                      "difference and 95% t-interval):", "", "| comparison | difference | seeds |", "|---|---|---|"]
        lines += [f"| {k} | {fmt(d['mean'])} [{fmt(d['lo'])}, {fmt(d['hi'])}] | {d['n']} |" for k, d in summ["ours"].items()]
    if data.get("merged_from"):
        skipped = sorted({m for part in data.get("part_settings", []) for m in part.get("skipped", [])})
        lines += ["", f"Merged from {', '.join(data['merged_from'])}: seeds run as separate processes side by side "
                      "(each interleaving its two tools as above); an arm's seed count is in the table"
                      + (f"; {', '.join(skipped)} left out of some of them" if skipped else "") + "."]
    loads = [x for r in data["runs"] for x in (r["loadavg_before"][0], r["loadavg_after"][0])]
    m = data["machine"]
    lines += ["", f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['versions']['torch']} (both tools), Avalanche "
                  f"{data['avalanche_version']}, git {m['malleable_git']}; 1-minute load average during the runs "
                  f"{min(loads):.1f} to {max(loads):.1f} (a shared machine: other jobs ran beside these). Total "
                  f"{sum(r['wall_s'] for r in data['runs']) / 60:.1f} min for {len(data['runs'])} runs."]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worker", action="store_true", help="internal: run one malleable job from stdin")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--seed-from", type=int, default=0, help="first seed (seeds seed-from .. seed-from + seeds - 1)")
    p.add_argument("--name", default=NAME, help="results file name (bench/results/<name>.{json,md})")
    p.add_argument("--merge", nargs="+", default=None, metavar="NAME",
                   help="combine the runs of these results files (e.g. seeds run as separate processes) into --name")
    p.add_argument("--buffers", type=int, nargs="+", default=[200, 500])
    p.add_argument("--no-joint", action="store_true")
    p.add_argument("--skip", nargs="+", default=[], choices=OURS, help="leave these of our methods out")
    p.add_argument("--only", nargs="+", default=None, choices=PEERED + OURS + ("joint",),
                   help="run only these methods' arms")
    p.add_argument("--resume", action="store_true", help="keep the runs already in the results file, run the rest")
    p.add_argument("--batch-size", type=int, default=10)
    p.add_argument("--lr", type=float, default=0.03)
    p.add_argument("--max-per-class", type=int, default=None)
    p.add_argument("--test-per-class", type=int, default=None)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads of every run, both tools (default 1: on a loaded 2-core machine two threads "
                        "spin-wait for each other; measured 35x slower for our ER at load 11)")
    p.add_argument("--work", type=Path, default=Path("/work/bench-cache/continual_vs_avalanche"))
    p.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = p.parse_args()
    if args.worker:
        json.dump(run_malleable(json.load(sys.stdin)), sys.stdout)
        return
    if args.merge:
        parts = [json.loads((args.out / f"{n}.json").read_text()) for n in args.merge]
        runs = [r for part in parts for r in part["runs"]]
        settings = {**parts[0]["settings"], "seeds": sorted({r["seed"] for r in runs})}
        data = {**parts[0], "settings": settings, "partial": any(part["partial"] for part in parts), "runs": runs,
                "merged_from": args.merge, "part_settings": [part["settings"] for part in parts],
                "summary": aggregate(runs, settings["buffers"])}
        write_results(args.name, data, markdown(data), args.out)
        return
    check = subprocess.run([str(AVALANCHE_PY), str(HERE / "_avalanche_worker.py")], input='{"check": true}',
                           capture_output=True, text=True, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    if check.returncode != 0:
        raise SystemExit(f"Avalanche's virtualenv is not ready (bash bench/setup_avalanche.sh):\n{check.stderr[-2000:]}")
    versions = json.loads(check.stdout)
    args.work.mkdir(parents=True, exist_ok=True)
    seeds = list(range(args.seed_from, args.seed_from + args.seeds))
    settings = {"seeds": seeds, "buffers": args.buffers, "batch_size": args.batch_size,
                "lr": args.lr, "max_per_class": args.max_per_class, "test_per_class": args.test_per_class,
                "threads": args.threads, "skipped": args.skip}
    previous = args.out / f"{args.name}.json"
    runs: list[dict] = json.loads(previous.read_text())["runs"] if args.resume and previous.is_file() else []
    done = {(r["tool"], r["method"], r["buffer"], r["seed"]) for r in runs}
    todo = [(seed, arm) for seed in seeds for arm in plan(seed, args.buffers, not args.no_joint)
            if arm[1] not in args.skip and (args.only is None or arm[1] in args.only)]
    total = len(todo)
    for seed, (tool, method, buffer) in todo:
        if (tool, method, buffer, seed) in done:
            continue
        runs.append(run_one(tool, method, buffer, seed, args))
        r = runs[-1]
        print(f"[{len(runs)}/{total}] seed {seed} {label(tool, method, buffer)}: avg acc "
              f"{r['metrics']['average_accuracy']:.2f}, train {r['train_seconds']:.0f} s, wall {r['wall_s']:.0f} s, "
              f"load {r['loadavg_after'][0]}", flush=True)
        data = {"settings": settings, "partial": len(runs) < total, "avalanche_version": versions["avalanche"],
                "machine": machine({"avalanche": versions["avalanche"]}), "runs": runs,
                "summary": aggregate(runs, args.buffers)}
        write_results(args.name, data, markdown(data), args.out)


if __name__ == "__main__":
    main()
