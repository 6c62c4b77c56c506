"""Online class-incremental split Fashion-MNIST: finetune, er, er_ace, las and joint through `malleable continual`.

    PYTHONPATH=src python bench/continual_online.py                      # the full stream, 5 seeds
    PYTHONPATH=src python bench/continual_online.py --max-per-class 1000  # a reduced stream (marked as such)

Every run is the verb itself (`malleable.continual.engine.continual`, checkpoints and report included) on the
`split_fashion_mnist` scenario: 5 tasks of 2 classes, one pass, batch 10, replay batch 10, SGD lr 0.03, the
small CNN of forget's classifier benchmark, buffers 200 and 500 for the replay methods. Runs are interleaved
(seed outer, method inner) so that machine load falls on every method alike; a seed fixes the initial weights,
the stream's order and the buffer's draws, so methods are compared PAIRED by seed. Reported: mean and 95%
t-interval over seeds of the final average accuracy, forgetting, average incremental accuracy and plasticity,
the paired differences LAS - ER, LAS - ER-ACE (and MIR-LAS against all three when it runs), and the median
time of a run's training (evaluations apart). Results are written after every run (`--out`), so a run stopped
early leaves what it measured, marked partial.

The side-by-side with Avalanche (its own virtualenv) is bench/continual_vs_avalanche.py; mir and mir_las run here
with --methods.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import RESULTS_DIR, fmt, loadavg, machine, median, paired_t, write_results  # noqa: E402

from malleable.continual.engine import continual  # noqa: E402
from malleable.recipes.continual import parse_continual_recipe  # noqa: E402

NAME = "continual_online"
METRICS = ("average_accuracy", "forgetting", "average_incremental_accuracy", "plasticity")


def arms(buffers: list[int], methods: list[str]) -> list[tuple[str, int | None]]:
    out = []
    for m in methods:
        out += [(m, b) for b in buffers] if m in ("er", "er_ace", "las", "mir", "mir_las") else [(m, None)]
    return out


def label(method: str, buffer: int | None) -> str:
    return method if buffer is None else f"{method} (M={buffer})"


def run_one(method: str, buffer: int | None, seed: int, args, work: Path) -> dict:
    training = {"batch_size": args.batch_size, "replay_batch_size": args.batch_size, "lr": args.lr,
                "buffer_size": buffer or 0, "max_per_class": args.max_per_class,
                "test_per_class": args.test_per_class}
    recipe = parse_continual_recipe({"method": method, "stream": args.scenario, "seed": seed,
                                     "training": {k: v for k, v in training.items() if v is not None}})
    out = work / f"{method}-{buffer}-{seed}"
    load = loadavg()
    start = time.perf_counter()
    report = continual(recipe, out, force=True, progress=False)
    wall = time.perf_counter() - start
    shutil.rmtree(out, ignore_errors=True)
    return {"method": method, "buffer": buffer, "seed": seed, "metrics": report["metrics"],
            "accuracy_matrix": report["accuracy_matrix"], "train_seconds": report["train_seconds"],
            "wall_s": round(wall, 2), "loadavg_before": load, "loadavg_after": loadavg()}


def ci(xs: list[float]) -> dict:
    from scipy.stats import t

    mean = statistics.fmean(xs)
    half = t.ppf(0.975, len(xs) - 1) * statistics.stdev(xs) / len(xs) ** 0.5 if len(xs) > 1 else float("nan")
    return {"mean": mean, "lo": mean - half, "hi": mean + half, "n": len(xs)}


def aggregate(runs: list[dict], planned: list[tuple[str, int | None]]) -> dict:
    table, paired = {}, {}
    for method, buffer in planned:
        rows = [r for r in runs if r["method"] == method and r["buffer"] == buffer]
        if not rows:
            continue
        table[label(method, buffer)] = {
            **{k: ci([r["metrics"][k] for r in rows]) for k in METRICS if rows[0]["metrics"][k] is not None},
            "train_seconds_median": median([r["train_seconds"] for r in rows]), "seeds": [r["seed"] for r in rows]}
    for challenger, base in (("las", "er"), ("las", "er_ace"), ("mir_las", "er"), ("mir_las", "er_ace"),
                             ("mir_las", "las")):
        for buffer in sorted({b for _, b in planned if b is not None}):
            a = {r["seed"]: r for r in runs if r["method"] == base and r["buffer"] == buffer}
            b = {r["seed"]: r for r in runs if r["method"] == challenger and r["buffer"] == buffer}
            seeds = sorted(set(a) & set(b))
            if len(seeds) >= 2:
                paired[f"{challenger} - {base} (M={buffer})"] = {
                    k: paired_t([a[s]["metrics"][k] for s in seeds], [b[s]["metrics"][k] for s in seeds])
                    for k in ("average_accuracy", "forgetting")}
    return {"table": table, "paired": paired}


def markdown(data: dict) -> str:
    s = data["settings"]
    stream = ("the full stream (12,000 training images per task)" if s["max_per_class"] is None else
              f"a REDUCED stream: the first {s['max_per_class']} training images per class "
              f"({2 * s['max_per_class']:,} per task)")
    tests = ("the whole test set (2,000 images per task)" if s["test_per_class"] is None else
             f"the first {s['test_per_class']} test images per class")
    scenario = s.get("scenario", "split_fashion_mnist")
    blurry = scenario.startswith("blurry")
    lines = [f"# Online class-incremental {'blurry (Blurry10) ' if blurry else 'split '}Fashion-MNIST"
             f"{' (partial)' if data['partial'] else ''}", "",
             f"`malleable continual` on {scenario}: 5 tasks of 2 classes"
             f"{' (10% of every class moved to the other tasks, see continual/stream.py)' if blurry else ''}, "
             f"one pass, {stream}, scored on {tests}; "
             f"batch "
             f"{s['batch_size']}, replay batch {s['batch_size']}, SGD lr {s['lr']}, small_cnn (width 16). "
             f"Seeds {s['seeds']} (each fixes the initial weights, the stream order and the buffer draws; methods are "
             "paired by seed), runs interleaved seed by seed. Mean and 95% t-interval over seeds; accuracy in %.",
             "", "| method | final avg. accuracy | forgetting | avg. incremental acc. | plasticity | train s (median) | seeds |",
             "|---|---|---|---|---|---|---|"]
    for name, row in data["summary"]["table"].items():
        cells = [f"{fmt(row[k]['mean'])} [{fmt(row[k]['lo'])}, {fmt(row[k]['hi'])}]" if k in row else "-"
                 for k in METRICS]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {fmt(row['train_seconds_median'], 1)} | "
                     f"{len(row['seeds'])} |")
    if data["summary"]["paired"]:
        lines += ["", "Paired differences (same seed), mean and 95% t-interval:", "",
                  "| comparison | avg. accuracy | forgetting |", "|---|---|---|"]
        for name, d in data["summary"]["paired"].items():
            lines.append(f"| {name} | " + " | ".join(f"{fmt(d[k]['mean'])} [{fmt(d[k]['lo'])}, {fmt(d[k]['hi'])}]"
                                                     for k in ("average_accuracy", "forgetting")) + " |")
    loads = [r["loadavg_before"][0] for r in data["runs"]] + [r["loadavg_after"][0] for r in data["runs"]]
    m = data["machine"]
    lines += ["", f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['versions']['torch']}, git "
                  f"{m['malleable_git']}; 1-minute load average during the runs {min(loads):.1f} to {max(loads):.1f} "
                  "(the machine is shared: wall times are indicative only). Total "
                  f"{sum(r['wall_s'] for r in data['runs']) / 60:.1f} min for {len(data['runs'])} runs.",
              "", "The Avalanche side-by-side is bench/continual_vs_avalanche.py."]
    return "\n".join(lines)


def cache_dataset() -> None:
    """Read Fashion-MNIST once per benchmark process, not once per run (every run gets the same tensors)."""
    import functools

    import malleable.data.vision as vision

    vision.load_image_dataset = functools.lru_cache(maxsize=2)(vision.load_image_dataset)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--buffers", type=int, nargs="+", default=[200, 500])
    p.add_argument("--methods", nargs="+", default=["finetune", "er", "er_ace", "las", "joint"])
    p.add_argument("--batch-size", type=int, default=10)
    p.add_argument("--lr", type=float, default=0.03)
    p.add_argument("--max-per-class", type=int, default=None)
    p.add_argument("--test-per-class", type=int, default=None)
    p.add_argument("--work", type=Path, default=Path("/work/bench-cache/continual_online"))
    p.add_argument("--out", type=Path, default=RESULTS_DIR)
    p.add_argument("--name", default=NAME, help="results file name (bench/results/<name>.{json,md})")
    p.add_argument("--scenario", default="split_fashion_mnist", choices=["split_fashion_mnist", "blurry_fashion_mnist"])
    args = p.parse_args()
    planned = arms(args.buffers, args.methods)
    settings = {"seeds": list(range(args.seeds)), "buffers": args.buffers, "methods": args.methods,
                "batch_size": args.batch_size, "lr": args.lr, "max_per_class": args.max_per_class,
                "test_per_class": args.test_per_class, "scenario": args.scenario}
    args.work.mkdir(parents=True, exist_ok=True)
    cache_dataset()
    runs: list[dict] = []
    total = args.seeds * len(planned)
    for seed in range(args.seeds):
        for method, buffer in planned:
            runs.append(run_one(method, buffer, seed, args, args.work))
            r = runs[-1]
            print(f"[{len(runs)}/{total}] seed {seed} {label(method, buffer)}: avg acc "
                  f"{r['metrics']['average_accuracy']:.2f}, {r['wall_s']:.0f} s, load {r['loadavg_after'][0]}",
                  flush=True)
            data = {"settings": settings, "partial": len(runs) < total, "machine": machine(), "runs": runs,
                    "summary": aggregate(runs, planned)}
            write_results(args.name, data, markdown(data), args.out)


if __name__ == "__main__":
    main()
