"""Learning-unlearning cycles: ug_clu against the verb-by-verb baselines (ER, then a `forget` objective) at every
forget step, each against a model retrained from scratch at that point.

    nice -n 10 env PYTHONPATH=src python bench/continual_unlearning.py            # digits + reduced Fashion-MNIST
    PYTHONPATH=src python bench/continual_unlearning.py --scenarios digits --seeds 2   # a quick look

Every run is the verb itself (`malleable.continual.engine.continual`, report included). The stream, on
split digits (scikit-learn, all 1,797 images) and on a REDUCED split Fashion-MNIST (the first 200 training and
200 test images per class): learn t0 (classes 0, 1), learn t1 (2, 3), forget class 1 (task-agnostic, a class of
an earlier task), learn t2 (4, 5), forget step 2 (task-aware: everything t1 brought), learn t3 (6, 7).

Arms (the same forget budget for all: `forget.steps` SGD steps at `forget.lr`, momentum 0.9, batch 32 forget +
32 retain examples; the retain set is the ER buffer minus the forgotten examples, which is all an online learner
keeps):
* ug_clu: ER learn steps, its own forget update (continual/ug_clu.py);
* er + npo: NPO (beta 0.1) with its NLL retain term;
* er + salun: SalUn as `malleable forget` runs it (random labels on the forget set + the SalUn mask, ratio 0.5,
  as bench/forget_classifier.py);
* er + sfr_on: SFR-on (its defaults; no global clip, as its paper).
At each forget step the verb reports the classifier protocol's UA, RA, TA and MIA for the method and for the
retrained gold standard (same initial weights, trained offline on everything learned and not forgotten,
`evaluate.retrain_epochs` passes), the gap |method - retrain| and the forget step's time over the retrain's.
Runs are interleaved (seed outer, arm inner); a seed fixes the initial weights, the stream order, the buffer and
the forget draws, so arms are paired by seed. Mean and 95% t-interval over seeds (bench/_common.paired_t against
zero for a mean). Results are written after every run, marked partial until the last.
"""

from __future__ import annotations

import argparse
import functools
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import RESULTS_DIR, fmt, loadavg, machine, median, paired_t, write_results  # noqa: E402

from malleable.continual.engine import continual  # noqa: E402
from malleable.recipes.continual import parse_continual_recipe  # noqa: E402

NAME = "continual_unlearning"
STREAM = [{"learn": {"classes": [0, 1]}}, {"learn": {"classes": [2, 3]}}, {"forget": {"classes": [1]}},
          {"learn": {"classes": [4, 5]}}, {"forget": {"step": 2}}, {"learn": {"classes": [6, 7]}}]
METRICS = ("UA", "RA", "TA", "MIA")  # the protocol's four, percent; their mean gap is "avg"
SCORES = (*METRICS, "MIA_AUC")  # and the membership AUC (0-1) of forgotten against unseen images of their classes
ARMS = {
    "ug_clu": ("ug_clu", {}),
    "er + npo": ("er", {"objective": "npo"}),
    "er + salun": ("er", {"objective": "rl", "mask": {"name": "salun", "ratio": 0.5}}),
    "er + sfr_on": ("er", {"objective": "sfr_on"}),
}
SCENARIOS = {  # dataset, online training; digits' 8x8 images need momentum to learn anything in one pass
    "digits": ("digits", {"lr": 0.1, "momentum": 0.5, "buffer_size": 100}),
    "fashion_mnist": ("fashion_mnist", {"lr": 0.03, "momentum": 0.0, "buffer_size": 200, "max_per_class": 200,
                                        "test_per_class": 200}),
}


def recipe(scenario: str, arm: str, seed: int, args) -> dict:
    dataset, training = SCENARIOS[scenario]
    method, forget = ARMS[arm]
    return {"method": method, "dataset": dataset, "width": 16, "seed": seed, "stream": STREAM,
            "training": {"batch_size": 10, "replay_batch_size": 10, **training},
            "forget": {"steps": args.forget_steps, "lr": args.forget_lr, "batch_size": 32, "momentum": 0.9,
                       **forget},
            "evaluate": {"retrain": "forget_steps", "retrain_epochs": args.retrain_epochs, "mia_max_shadow": 1000}}


def run_one(scenario: str, arm: str, seed: int, args) -> dict:
    out = args.work / f"{scenario}-{arm.replace(' ', '')}-{seed}"
    load = loadavg()
    start = time.perf_counter()
    report = continual(parse_continual_recipe(recipe(scenario, arm, seed, args)), out, force=True, progress=False)
    wall = time.perf_counter() - start
    shutil.rmtree(out, ignore_errors=True)
    steps = [{"step": f["step"], "request": f["request"], "forgotten": f["forgotten"], "before": f["before"],
              "method": f["method"],
              "retrain": f["retrain"], "gap": f["gap"], "time_ratio": f["time_ratio"]} for f in report["forget_steps"]]
    return {"scenario": scenario, "arm": arm, "seed": seed, "forget_steps": steps,
            "final_average_accuracy": report["metrics"]["average_accuracy"], "accuracy_matrix": report["accuracy_matrix"],
            "train_seconds": report["train_seconds"], "wall_s": round(wall, 2), "loadavg_before": load,
            "loadavg_after": loadavg()}


def ci(xs: list[float]) -> dict:
    """Mean and 95% t-interval (paired_t of the values against zero)."""
    return paired_t([0.0] * len(xs), xs)


def aggregate(runs: list[dict]) -> dict:
    out: dict = {}
    for scenario in SCENARIOS:
        for arm in ARMS:
            rows = [r for r in runs if r["scenario"] == scenario and r["arm"] == arm]
            if not rows:
                continue
            per_step = []
            for k, first in enumerate(rows[0]["forget_steps"]):
                at = [r["forget_steps"][k] for r in rows]
                per_step.append({
                    "step": first["step"], "request": first["request"],
                    "before": {m: ci([a["before"][m] for a in at]) for m in SCORES},
                    "method": {m: ci([a["method"][m] for a in at]) for m in SCORES},
                    "retrain": {m: ci([a["retrain"][m] for a in at]) for m in SCORES},
                    "gap": {m: ci([a["gap"][m] for a in at]) for m in (*SCORES, "avg")},
                    "time_ratio_median": median([a["time_ratio"] for a in at]),
                    "seconds_median": median([a["method"]["seconds"] for a in at]),
                    "retrain_seconds_median": median([a["retrain"]["seconds"] for a in at])})
            out.setdefault(scenario, {})[arm] = {
                "forget_steps": per_step, "final_average_accuracy": ci([r["final_average_accuracy"] for r in rows]),
                "seeds": [r["seed"] for r in rows]}
        if scenario in out and "ug_clu" in out[scenario]:  # paired by seed: ug_clu's gaps minus each baseline's
            mine = {r["seed"]: r for r in runs if r["scenario"] == scenario and r["arm"] == "ug_clu"}
            for arm in ARMS:
                theirs = {r["seed"]: r for r in runs if r["scenario"] == scenario and r["arm"] == arm}
                seeds = sorted(set(mine) & set(theirs))
                if arm == "ug_clu" or len(seeds) < 2:
                    continue
                for gap, key in (("avg", "paired"), ("MIA_AUC", "paired_auc")):
                    out[scenario].setdefault(key, {})[f"ug_clu - {arm}"] = [
                        paired_t([theirs[s]["forget_steps"][k]["gap"][gap] for s in seeds],
                                 [mine[s]["forget_steps"][k]["gap"][gap] for s in seeds])
                        for k in range(len(mine[seeds[0]]["forget_steps"]))]
    return out


def _ci(c: dict, nd: int = 1) -> str:
    return f"{fmt(c['mean'], nd)} [{fmt(c['lo'], nd)}, {fmt(c['hi'], nd)}]"


def markdown(data: dict) -> str:
    s = data["settings"]
    lines = [f"# Continual learning-unlearning: ug_clu vs ER + forget objectives{' (partial)' if data['partial'] else ''}",
             "", "`malleable continual`, stream: learn [0, 1], learn [2, 3], forget class 1, learn [4, 5], forget "
             "step 2 (the [2, 3] task), learn [6, 7]; one pass, batch 10 + 10 replayed, small_cnn width 16. Forget "
             f"steps: {s['forget_steps']} SGD steps at lr {s['forget_lr']} (momentum 0.9, batch 32 + 32 retain from "
             f"the buffer); retrain: {s['retrain_epochs']} epochs on everything learned and not forgotten, from the "
             f"same initial weights. Seeds {s['seeds']}, paired, interleaved. Mean and 95% t-interval over seeds, "
             "percent. UA = 100 - accuracy on the images forgotten at that step, RA = accuracy on the learned and not "
             "forgotten training images, TA = test accuracy on the classes that should be known, MIA = SalUn's "
             "MIA-efficacy; AUC = the membership AUC of the true label's probability, the forgotten images against "
             "their classes' test images (0.5: they look unseen; 0-1); gap = |method - retrain|, avg = mean of the "
             "four percent gaps (lower is better), AUC gap beside it. Time = the forget "
             "step's wall time over the retrain's (median). Before: the method's model as its learn steps left it, on "
             "the same sets (mean), which separates what the online learner lost on its own from what the forget "
             "step did."]
    for scenario, arms in data["summary"].items():
        name = {"digits": "split digits (all 1,797 images)",
                "fashion_mnist": "split Fashion-MNIST, REDUCED (200 training, 200 test images per class)"}[scenario]
        lines += ["", f"## {name}", ""]
        lines += ["| forget step | arm | UA | RA | TA | MIA | AUC | avg gap | AUC gap | gap UA / RA / TA / MIA | "
                  "time / retrain | before: UA / RA / AUC |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        steps = next(iter(a for k, a in arms.items() if not k.startswith("paired")))["forget_steps"]
        for k, first in enumerate(steps):
            req = ", ".join(f"{a} {b}" for a, b in first["request"].items())
            gold = first["retrain"]
            lines.append(f"| {first['step']} ({req}) | retrain | " + " | ".join(_ci(gold[m]) for m in METRICS)
                         + f" | {_ci(gold['MIA_AUC'], 3)} | 0 | 0 | - | 1 ({fmt(first['retrain_seconds_median'], 2)} s) "
                         "| - |")
            for arm, row in arms.items():
                if arm.startswith("paired"):
                    continue
                f = row["forget_steps"][k]
                lines.append(f"| | {arm} | " + " | ".join(_ci(f["method"][m]) for m in METRICS)
                             + f" | {_ci(f['method']['MIA_AUC'], 3)} | {_ci(f['gap']['avg'])} | "
                             + f"{_ci(f['gap']['MIA_AUC'], 3)} | "
                             + " / ".join(fmt(f["gap"][m]["mean"], 1) for m in METRICS)
                             + f" | {fmt(f['time_ratio_median'], 3)} | {fmt(f['before']['UA']['mean'], 1)} / "
                             f"{fmt(f['before']['RA']['mean'], 1)} / {fmt(f['before']['MIA_AUC']['mean'], 3)} |")
        lines += ["", "| arm | final average accuracy (learn rows; forgotten tasks left out) |", "|---|---|"]
        lines += [f"| {arm} | {_ci(row['final_average_accuracy'])} |" for arm, row in arms.items()
                  if not arm.startswith("paired")]
        for key, what, nd in (("paired", "avg gap", 1), ("paired_auc", "AUC gap", 3)):
            if arms.get(key):
                lines += ["", f"Paired (same seed) difference of the {what}, ug_clu minus the baseline (negative: "
                          "ug_clu closer to retrain):", "", "| comparison | " + " | ".join(
                              f"step {f['step']}" for f in steps) + " |", "|---" * (len(steps) + 1) + "|"]
                lines += [f"| {name} | " + " | ".join(_ci(d, nd) for d in diffs) + " |"
                          for name, diffs in arms[key].items()]
    cells = [f["method"]["MIA"] for r in data["runs"] for f in r["forget_steps"]] + [
        f["retrain"]["MIA"] for r in data["runs"] for f in r["forget_steps"]]
    lines += ["", f"MIA-efficacy was exactly 0 or 100 in {sum(v in (0.0, 100.0) for v in cells)} of {len(cells)} "
              "(run, forget step) scores, method and retrain alike: the SVC on the one confidence feature calls "
              "every forgotten image a member or every one a non-member, so the MIA gap is 0 or 100 per run and "
              "dominates the avg gap; the RA and TA gaps carry that comparison, and the AUC is the continuous "
              "membership measure."]
    loads = [r["loadavg_before"][0] for r in data["runs"]] + [r["loadavg_after"][0] for r in data["runs"]]
    m = data["machine"]
    lines += ["", f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['versions']['torch']}, git "
                  f"{m['malleable_git']}; 1-minute load average during the runs {min(loads):.1f} to {max(loads):.1f} "
                  "(a shared machine: times are indicative). Total "
                  f"{sum(r['wall_s'] for r in data['runs']) / 60:.1f} min for {len(data['runs'])} runs."]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=list(SCENARIOS))
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    p.add_argument("--forget-steps", type=int, default=60)
    p.add_argument("--forget-lr", type=float, default=0.01)
    p.add_argument("--retrain-epochs", type=int, default=5)
    p.add_argument("--work", type=Path, default=Path("/work/bench-cache/continual_unlearning"))
    p.add_argument("--out", type=Path, default=RESULTS_DIR)
    p.add_argument("--name", default=NAME)
    p.add_argument("--markdown-only", action="store_true", help="rewrite the .md from the saved .json, no runs")
    args = p.parse_args()
    if args.markdown_only:
        import json

        data = json.loads((args.out / f"{args.name}.json").read_text())
        write_results(args.name, data, markdown(data), args.out)
        return
    settings = {"seeds": list(range(args.seeds)), "scenarios": args.scenarios, "arms": args.arms,
                "forget_steps": args.forget_steps, "forget_lr": args.forget_lr, "retrain_epochs": args.retrain_epochs}
    args.work.mkdir(parents=True, exist_ok=True)
    import malleable.data.vision as vision

    vision.load_image_dataset = functools.lru_cache(maxsize=2)(vision.load_image_dataset)  # read each dataset once
    runs: list[dict] = []
    total = args.seeds * len(args.scenarios) * len(args.arms)
    for scenario in args.scenarios:
        for seed in range(args.seeds):
            for arm in args.arms:
                runs.append(run_one(scenario, arm, seed, args))
                r = runs[-1]
                print(f"[{len(runs)}/{total}] {scenario} seed {seed} {arm}: avg gap "
                      + ", ".join(f"{f['gap']['avg']:.1f}" for f in r["forget_steps"])
                      + f"; {r['wall_s']:.0f} s, load {r['loadavg_after'][0]}", flush=True)
                data = {"settings": settings, "partial": len(runs) < total, "machine": machine(), "runs": runs,
                        "summary": aggregate(runs)}
                write_results(args.name, data, markdown(data), args.out)


if __name__ == "__main__":
    main()
