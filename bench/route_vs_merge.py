"""Route against merge on merge_quality's 8-task zoo (issue 17): the same eight SmolLM2-135M LoRAs either merged
into one adapter (merge_quality's merges at their validation-chosen setting and scale) or kept apart and one of
them picked per query by a router.

* Candidates: the base model, the 8 task adapters and the best merges of merge_quality (task arithmetic and
  TIES merge-then-compress, CtM (TIES), KnOTS (the form with the better validation score), Core Space (TIES)),
  each at its chosen setting and scale; a merge at scale s is its merged adapter with lora_alpha times s (its
  LoRA scaling times s, as merge_quality's `Evaluator.scale` applies it).
* Queries: the 8 tasks' 200 test items each (`malleable.data.generated` with the zoo's data seed), scored by the
  real `route build` path with metric `forced` (every answer token the argmax under teacher forcing, as
  merge_quality scores), the zoo's plain prompts (chat_template off), Arrow scores over the 8 task adapters,
  all-MiniLM-L6-v2 embeddings. Every candidate is priced the same per token (a rank-16 LoRA on the same base
  costs the same forward as another), so the routers are compared on quality: each one's willingness to pay
  has nothing to trade.
* Routers fitted by the route engine (`fit_routers`) on 3 seeds of a 60/20/20 split stratified by task; every
  router and every merge scored on the same test rows.
* Normalised accuracy: per task, accuracy / the task's own adapter's accuracy on the same rows (tasks whose
  adapter gets none of them right have no ratio and are left out, as in merge_quality), mean over tasks; share
  of oracle = normalised / the oracle router's normalised. 95% CIs: 2000 paired bootstrap resamples of each
  task's test rows (the same resamples for every router and merge), per seed; the tables give the mean over
  seeds of the estimate and of each CI end.
* Overhead: per query, embedding (all-MiniLM-L6-v2, one query at a time) + routing (the router's `choose` on
  one query) against generating the answer with the task's adapter (greedy, the zoo's max_new_tokens, one
  query at a time), interleaved over a sample of test queries, medians; Arrow's overhead is one forward of the
  base with hooks.

    python bench/route_vs_merge.py          # writes bench/results/route_vs_merge.{json,md,png}
    python bench/route_vs_merge.py --smoke  # 20 items per task, 4 overhead queries: the plumbing, nothing written
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parent))
import numpy as np  # noqa: E402
from _common import RESULTS_DIR, loadavg, machine, write_results  # noqa: E402
from merge_quality import CACHE as MQ_CACHE  # noqa: E402
from merge_quality import ZOO, best_by_validation, slug, unpacked  # noqa: E402

from malleable.io.atomic import write_text_atomic  # noqa: E402
from malleable.protocols.zoo import load_data  # noqa: E402

CACHE = Path(os.environ.get("MALLEABLE_BENCH_CACHE", "/work/bench-cache")) / "route_vs_merge"
SEEDS = (0, 1, 2)
BOOTSTRAP = 2000
LEARNED = ("knn", "prknn", "kmeans", "linear", "mlp", "mf", "soft_label", "centroid")
ROUTERS = ("oracle", "strongest", "strongest_per_task", "random") + LEARNED + ("arrow",)
# merge_quality's labels -> our candidate names (KnOTS: the form chosen on validation, see merges())
MERGES = {"task_arithmetic -> r16 (merge-then-compress)": "merge.task_arithmetic",
          "ties -> r16 (merge-then-compress)": "merge.ties", "ctm (ties) -> r16": "merge.ctm_ties",
          "core_space (ties), own rank": "merge.core_space"}
KNOTS = ("knots original (ties) -> r16", "knots per_layer (ties) -> r16")
PRICE = 1e-6  # per token in and out, every candidate


def log(msg: str, start: float) -> None:
    print(f"[{time.strftime('%H:%M:%S')} +{time.perf_counter() - start:.0f}s] {msg}", flush=True)


def merges(mq: dict) -> dict[str, dict]:
    """name -> {label, setting, scale, path at scale 1} of the merges taken from merge_quality's results."""
    seed = mq["seeds"][0]
    by_label = {m["label"]: m for m in seed["methods"]}
    knots = best_by_validation([by_label[k] for k in KNOTS if k in by_label])
    chosen = dict(MERGES)
    if knots is not None:
        chosen[knots["label"]] = "merge.knots_" + ("original" if "original" in knots["label"] else "per_layer")
    root = MQ_CACHE / f"merges-{seed['zoo_key']}"
    out = {}
    for label, name in chosen.items():
        m = by_label[label]
        setting = m["chosen"]["setting"]
        path = root / slug(f"{label}-{json.dumps(setting, sort_keys=True)}")
        if not (path / "adapter_config.json").is_file():
            raise SystemExit(f"{path}: merge_quality's merge is missing (run bench/merge_quality.py first)")
        out[name] = {"label": label, "setting": setting, "scale": m["chosen"]["scale"], "path": str(path),
                     "test_items": m["test_items"]}
    return out


def scaled(path: Path, scale: float, dest: Path) -> Path:
    """A copy of adapter `path` whose LoRA scaling is `scale` times its own (lora_alpha and alpha_pattern)."""
    if (dest / "adapter_config.json").is_file():
        return dest
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg["lora_alpha"] = cfg.get("lora_alpha", 8) * scale
    cfg["alpha_pattern"] = {k: v * scale for k, v in (cfg.get("alpha_pattern") or {}).items()}
    (tmp / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
    shutil.copyfile(path / "adapter_model.safetensors", tmp / "adapter_model.safetensors")
    tmp.rename(dest)
    return dest


def build_matrices(mq: dict, pool: dict, base_dir: Path, start: float, per_task: int | None = None
                   ) -> tuple[Path, list[dict]]:
    """Write the tasks' test items and the build recipe, and run `route build` (resumable, cached)."""
    from malleable.api import route_build
    from malleable.data.files import write_jsonl

    settings = replace(ZOO, seed=mq["seeds"][0]["seed"])
    data = load_data(settings)
    tasks = list(settings.tasks)
    folder = CACHE / "tasks"
    folder.mkdir(parents=True, exist_ok=True)
    files = {t: folder / f"{t}.jsonl" for t in tasks}
    for t in tasks:
        data[t]["test"] = data[t]["test"][:per_task]
        write_jsonl(files[t], [{"prompt": r["prompt"], "completion": r["completion"]} for r in data[t]["test"]])
    adapters = mq["seeds"][0]["adapters"]
    cands = [{"name": "base", "model": str(base_dir)}] + [{"name": t, "model": adapters[t]["path"]} for t in tasks]
    cands += [{"name": n, "model": str(scaled(Path(m["path"]), m["scale"], CACHE / "merges" /
                                                f"{Path(m['path']).name}-x{m['scale']}"))} for n, m in pool.items()]
    for c in cands:
        c.update(price_in=PRICE, price_out=PRICE)
    recipe = {"candidates": cands, "tasks": [{"name": t, "data": str(files[t])} for t in tasks], "metric": "forced",
              "chat_template": settings.chat_template, "batch_size": 64,
              "arrow": {"adapters": tasks}, "seed": 0}
    out = CACHE / f"matrices-{per_task}"  # per item count: the task files' paths do not change with it
    key = json.dumps({**recipe, "per_task": per_task}, sort_keys=True)
    if (out / "recipe.json").is_file() and (out / "recipe.json").read_text() == key:
        log(f"matrices reused from {out}", start)
        return out, [json.loads(x) for x in (out / "queries.jsonl").read_text().splitlines()]
    (CACHE / "build.yaml").write_text(json.dumps(recipe, indent=1))
    log(f"route build: {len(cands)} candidates x {sum(len(data[t]['test']) for t in tasks)} queries", start)
    report = route_build(CACHE / "build.yaml", out, force=True, progress=False)
    log(f"route build done in {report['wall_time_s']:.0f} s", start)
    queries = [{"task": t, **r} for t in tasks for r in data[t]["test"]]
    write_text_atomic(out / "queries.jsonl", "".join(json.dumps(q) + "\n" for q in queries))
    write_text_atomic(out / "recipe.json", key)
    return out, queries


def seed_folder(matrices: Path, seed: int) -> Path:
    """The matrices with the split column of `seed` (a 60/20/20 split stratified by task)."""
    import pandas as pd

    from malleable.route.matrices import SPLITS, read_matrices, split_rows

    dest = CACHE / f"matrices-seed{seed}"
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(matrices, dest)
    m = read_matrices(matrices)
    m.split = None
    rows = split_rows(m, (0.6, 0.2, 0.2), seed)
    split = np.empty(len(m), dtype=object)
    for s in SPLITS:
        split[rows[s]] = s
    meta = pd.read_csv(dest / "meta.csv")
    meta["split"] = split
    meta.to_csv(dest / "meta.csv", index=False)
    return dest


def normalised(correct: dict[str, np.ndarray], own: np.ndarray, task: np.ndarray, n: int, seed: int,
               among: list[str] | None = None) -> dict:
    """Per method: the normalised accuracy over the tasks (of `among`, default all) whose own adapter gets
    some of these rows right, and its per-resample values (paired: the same draws for all)."""
    tasks = [t for t in sorted(set(task)) if own[task == t].sum() > 0 and (among is None or t in among)]
    rng = np.random.default_rng(seed)
    idx = {t: np.flatnonzero(task == t) for t in tasks}
    draws = {t: rng.integers(0, len(idx[t]), size=(n, len(idx[t]))) for t in tasks}
    out = {}
    for name, c in correct.items():
        point = np.mean([c[idx[t]].mean() / own[idx[t]].mean() for t in tasks])
        with np.errstate(divide="ignore", invalid="ignore"):
            boot = np.mean([np.nan_to_num(c[idx[t]][draws[t]].mean(1) / own[idx[t]][draws[t]].mean(1), nan=0.0,
                                          posinf=np.inf) for t in tasks], axis=0)
        out[name] = (float(point), boot)
    return {"tasks_used": tasks, "methods": out}


def ci(values: np.ndarray) -> list[float | None]:
    return [float(x) if np.isfinite(x) else None for x in np.percentile(values, [2.5, 97.5])]


def run_seed(matrices: Path, seed: int, routers: list[str], candidates: list[str], strong: list[str],
             merge_names: list[str]) -> dict:
    from malleable.recipes.route import RouteRecipe, RouterSpec
    from malleable.route.engine import fit_routers, load_routers
    from malleable.route.matrices import read_matrices, split_rows

    folder = seed_folder(matrices, seed)
    recipe = RouteRecipe(routers=[RouterSpec(name=r) for r in routers], seed=seed)
    fitted = CACHE / f"fit-seed{seed}"
    report = fit_routers(folder, recipe, fitted, force=True, progress=False)
    loaded, chosen, _ = load_routers(fitted)
    m = read_matrices(folder)
    test_rows = split_rows(m, (0.6, 0.2, 0.2), seed)["test"]
    test = m.subset(test_rows)
    col = {c: j for j, c in enumerate(candidates)}
    rows = np.arange(len(test))
    own = test.Y[rows, [col[t] for t in test.task]]
    picks = {r: loaded[r].choose(test, chosen[r]) for r in routers}
    correct = {f"router:{r}": test.Y[rows, p] for r, p in picks.items()}
    correct.update({f"merge:{n}": test.Y[:, col[n]] for n in merge_names})
    correct["base"] = test.Y[:, col["base"]]
    out = {"seed": seed, "test_queries": int(len(test_rows)), "fit_seconds": report["fit_seconds"],
           "chosen": chosen, "tasks_used": {}, "methods": {n: {"accuracy": float(c.mean()),
                                                              "validation_accuracy": _validation(report, n)}
                                                          for n, c in correct.items()}}
    for which, among in (("all", None), ("strong", strong)):
        res = normalised(correct, own, test.task, BOOTSTRAP, seed, among)
        out["tasks_used"][which] = res["tasks_used"]
        oracle = res["methods"]["router:oracle"]
        for name, (point, boot) in res["methods"].items():
            with np.errstate(divide="ignore", invalid="ignore"):
                share = np.nan_to_num(boot / oracle[1], nan=0.0)
            out["methods"][name][which] = {"normalised": point, "normalised_ci95": ci(boot),
                                           "share_of_oracle": point / oracle[0], "share_ci95": ci(share)}
    out["own_adapter_accuracy"] = float(own.mean())
    out["picks"] = {r: {c: int((p == col[c]).sum()) for c in candidates if (p == col[c]).any()}
                    for r, p in picks.items()}
    return out


def _validation(report: dict, name: str) -> float | None:
    """A router's validation accuracy at its chosen value (what picks the best learned router)."""
    if not name.startswith("router:"):
        return None
    r = report["routers"][name.split(":", 1)[1]]
    return next((p["accuracy"] for p in r["validation"] if p["value"] == r["chosen"]), None)


def overhead(matrices: Path, queries: list[dict], best: str, n: int, start: float) -> dict:
    """Per-query seconds through the serving code (route/serve.py's RoutedModel over the whole pool: base, the 8
    adapters and the merges in one PeftModel), one query at a time, interleaved, medians: routing with `best`,
    with knn and with Arrow (`route`: embedding + choose, or Arrow's base forward + choose), and answering with
    the query's own task adapter through the same PeftModel (`generate`, what `route run` then does); also
    answering with that adapter merged into a plain model (`generate_merged`: the fastest way to run one
    adapter alone, a stricter denominator)."""
    from malleable.evaluate.generation import generate
    from malleable.models.checkpoints import load_model, load_tokenizer
    from malleable.recipes.route import parse_route_run_recipe
    from malleable.route import RoutedModel

    build = json.loads((matrices / "report.json").read_text())
    pool = parse_route_run_recipe(build["recipe"], "build recipe")
    fitted = CACHE / "fit-seed0"
    served = {r: RoutedModel.from_fitted(fitted, r, pool, max_new_tokens=ZOO.max_new_tokens)
              for r in dict.fromkeys((best, "knn", "arrow"))}
    adapters = {c.name: c.model for c in pool.candidates}
    tok = load_tokenizer(Path(adapters["add"]))
    merged = {}
    rng = np.random.default_rng(0)
    sample = sorted(rng.choice(len(queries), size=n, replace=False).tolist())
    chat = build["recipe"]["chat_template"] != "off"
    times = {"route_best": [], "route_knn": [], "route_arrow": [], "generate": [], "generate_merged": []}
    for r in served.values():  # warm up: the encoder and the Arrow prototypes load at the first call
        r.route([queries[0]["prompt"]])
    for i in sample:
        q = queries[i]
        if q["task"] not in merged:
            merged[q["task"]] = load_model(Path(adapters[q["task"]]), "causal_lm", tok.pad_token_id)
        for key, r in (("route_best", best), ("route_knn", "knn"), ("route_arrow", "arrow")):
            t = time.perf_counter()
            served[r].route([q["prompt"]])
            times[key].append(time.perf_counter() - t)
        t = time.perf_counter()
        served[best].generate([q["prompt"]], [q["task"]])
        times["generate"].append(time.perf_counter() - t)
        t = time.perf_counter()
        generate(merged[q["task"]], tok, [q["prompt"]], max_new_tokens=ZOO.max_new_tokens, batch_size=1, chat=chat)
        times["generate_merged"].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    log(f"overhead medians {json.dumps({k: round(v, 4) for k, v in med.items()})}", start)
    return {"queries": n, "median_seconds": med, "router": best, "path": "RoutedModel (route/serve.py)",
            "overhead_ratio": med["route_best"] / med["generate"],
            "overhead_ratio_merged": med["route_best"] / med["generate_merged"],
            "overhead_ratio_knn": med["route_knn"] / med["generate"],
            "arrow_ratio": med["route_arrow"] / med["generate"], "max_new_tokens": ZOO.max_new_tokens,
            "loadavg": loadavg()}


def agreement(Y: np.ndarray, candidates: list[str], tasks: list[str], mq: dict, pool: dict, n: int) -> dict:
    """How often the build's forced exact match equals merge_quality's own per-item test scores (same items):
    the merges on all 8 tasks, each adapter on its own task."""
    col = {c: j for j, c in enumerate(candidates)}
    out = {}
    ind = unpacked(mq["seeds"][0]["individual"]["test"])
    mine = np.concatenate([Y[i * n:(i + 1) * n, col[t]] for i, t in enumerate(tasks)])
    out["adapters (own task)"] = float(np.mean(mine == np.concatenate([ind[t][:n] for t in tasks])))
    for name, m in pool.items():
        theirs = unpacked(m["test_items"])
        out[name] = float(np.mean(Y[:, col[name]] == np.concatenate([theirs[t][:n] for t in tasks])))
    return out


def summarise(seeds: list[dict]) -> dict:
    """Mean over seeds of each method's estimates and CI ends, for all tasks and the strong ones."""
    out = {}
    for name in seeds[0]["methods"]:
        rows = [s["methods"][name] for s in seeds]

        def mean(vals):
            return None if any(v is None for v in vals) else float(np.mean(vals))

        out[name] = {"accuracy": mean([r["accuracy"] for r in rows]),
                     "validation_accuracy": mean([r["validation_accuracy"] for r in rows])}
        for which in ("all", "strong"):
            part = [r[which] for r in rows]
            out[name][which] = {k: mean([p[k] for p in part]) for k in ("normalised", "share_of_oracle")}
            out[name][which].update({k: [mean([p[k][i] for p in part]) for i in (0, 1)]
                                     for k in ("normalised_ci95", "share_ci95")})
    return out


def verdict(summary: dict, best: str, merge_names: list[str], which: str) -> dict:
    """The issue's target on one task set: the router's share of oracle >= 0.95, and above the best merge."""
    b = summary[f"router:{best}"][which]
    best_merge = max(merge_names, key=lambda n: summary[f"merge:{n}"][which]["normalised"])
    bm = summary[f"merge:{best_merge}"][which]
    return {"share_of_oracle": b["share_of_oracle"], "share_ci95": b["share_ci95"],
            "router_normalised": b["normalised"], "router_ci95": b["normalised_ci95"], "best_merge": best_merge,
            "best_merge_normalised": bm["normalised"], "best_merge_ci95": bm["normalised_ci95"],
            "met_095_of_oracle": b["share_of_oracle"] >= 0.95,
            "met_095_of_oracle_at_ci_low": (b["share_ci95"][0] or 0) >= 0.95,
            "router_above_best_merge": b["normalised"] > bm["normalised"],
            "router_above_best_merge_at_ci": (b["normalised_ci95"][0] or 0) > (bm["normalised_ci95"][1] or np.inf)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--overhead-queries", type=int, default=24)
    ap.add_argument("--smoke", action="store_true", help="20 items per task, 4 overhead queries, nothing written")
    ap.add_argument("--per-task", type=int, default=200, help="the first N of each task's 200 test items")
    ap.add_argument("--report", action="store_true", help="only rewrite the md and png from the json")
    ap.add_argument("--overhead", action="store_true",
                    help="only measure the overhead again (the cached build and seed-0 fits) and update the results")
    args = ap.parse_args(argv)
    if args.overhead:
        return remeasure_overhead(args.overhead_queries)
    if args.report:
        results = json.loads((RESULTS_DIR / "route_vs_merge.json").read_text())
        write_results("route_vs_merge", results, markdown(results))
        plot(results, RESULTS_DIR / "route_vs_merge.png")
        return 0
    global CACHE
    if args.smoke:
        CACHE = CACHE / "smoke"
        args.overhead_queries = 4
    start = time.perf_counter()
    load_start = loadavg()
    from malleable.models.smollm2 import smollm2_checkpoint
    from malleable.route import ROUTERS as REGISTERED

    routers = [r for r in ROUTERS if r in REGISTERED]
    mq = json.loads((RESULTS_DIR / "merge_quality.json").read_text())
    pool = merges(mq)
    base_dir = smollm2_checkpoint()
    CACHE.mkdir(parents=True, exist_ok=True)
    per_task = 20 if args.smoke else args.per_task
    matrices, queries = build_matrices(mq, pool, base_dir, start, per_task)
    build = json.loads((matrices / "report.json").read_text())
    candidates = build["candidates"]
    tasks = list(ZOO.tasks)
    Y = np.load(matrices / "Y.npy")
    seeds = []
    for seed in SEEDS:
        seeds.append(run_seed(matrices, seed, routers, candidates, mq["seeds"][0]["strong_tasks"], list(pool)))
        log(f"seed {seed}: routers fitted and scored", start)
    summary = summarise(seeds)
    learned = [r for r in LEARNED if f"router:{r}" in summary]
    best = max(learned, key=lambda r: summary[f"router:{r}"]["validation_accuracy"])
    best_test = max(learned, key=lambda r: summary[f"router:{r}"]["strong"]["normalised"])
    over = overhead(matrices, queries, best, args.overhead_queries, start)
    target = {"best_learned_router": best, "chosen_by": "mean validation accuracy at the chosen value",
              "best_learned_router_on_test_strong": best_test,
              "strong": verdict(summary, best, list(pool), "strong"), "all": verdict(summary, best, list(pool), "all"),
              "overhead_ratio": over["overhead_ratio"], "overhead_met_5pct": over["overhead_ratio"] <= 0.05}
    results = {"schema": "malleable.bench.route_vs_merge/1", "zoo_key": mq["seeds"][0]["zoo_key"],
               "per_task": len(Y) // len(tasks),
               "candidates": candidates, "merges": {n: {k: v for k, v in m.items() if k != "test_items"}
                                                    for n, m in pool.items()},
               "build": {k: build[k] for k in ("queries", "metric", "accuracy", "wall_time_s", "arrow")},
               "agreement_with_merge_quality": agreement(Y, candidates, tasks, mq, pool, len(Y) // len(tasks)),
               "routers": routers, "seeds": seeds, "summary": summary,
               "target": target, "overhead": over, "bootstrap": BOOTSTRAP, "machine": machine(),
               "loadavg_start": load_start, "loadavg_end": loadavg(),
               "wall_time_s": round(time.perf_counter() - start, 1)}
    if args.smoke:
        print(markdown(results))
        plot(results, CACHE / "route_vs_merge.png")
        return 0
    write_results("route_vs_merge", results, markdown(results))
    plot(results, RESULTS_DIR / "route_vs_merge.png")
    log(f"done: {RESULTS_DIR / 'route_vs_merge.md'}", start)
    return 0


def remeasure_overhead(n: int) -> int:
    """The overhead part of route_vs_merge.json measured again on the cached build and fits, the rest kept."""
    start = time.perf_counter()
    results = json.loads((RESULTS_DIR / "route_vs_merge.json").read_text())
    matrices = CACHE / f"matrices-{results['per_task']}"
    queries = [json.loads(line) for line in (matrices / "queries.jsonl").read_text().splitlines()]
    over = overhead(matrices, queries, results["target"]["best_learned_router"], n, start)
    results["overhead"] = over
    results["target"].update(overhead_ratio=over["overhead_ratio"], overhead_met_5pct=over["overhead_ratio"] <= 0.05)
    write_results("route_vs_merge", results, markdown(results))
    return 0


def _f(x, fmt=".3f"):
    return "n/a" if x is None else f"{x:{fmt}}"


def _ci(pair, fmt=".3f"):
    return "[" + ", ".join("unbounded" if x is None else f"{x:{fmt}}" for x in pair) + "]"


def _target_lines(t: dict, which: str, label: str) -> list[str]:
    v = t[which]
    return [f"- {label}: **{t['best_learned_router']}** keeps {_f(v['share_of_oracle'])} {_ci(v['share_ci95'])} of "
            f"oracle routing's normalised accuracy: the 0.95 target is **{'met' if v['met_095_of_oracle'] else 'not met'}"
            f"**{' (also at the CI low end)' if v['met_095_of_oracle_at_ci_low'] else ' (not at the CI low end)'}; "
            f"its {_f(v['router_normalised'])} {_ci(v['router_ci95'])} is "
            f"{'above' if v['router_above_best_merge'] else 'not above'} the best merge ({v['best_merge']}, "
            f"{_f(v['best_merge_normalised'])} {_ci(v['best_merge_ci95'])})"
            f"{', CIs apart' if v['router_above_best_merge_at_ci'] else ', CIs overlapping'}."]


def markdown(r: dict) -> str:
    t, o, s = r["target"], r["overhead"], r["summary"]
    used = {w: sorted({x for seed in r["seeds"] for x in seed["tasks_used"][w]}) for w in ("all", "strong")}
    lines = ["# Route against merge: the 8-task zoo of merge_quality", "",
             f"{r['build']['queries']} queries (8 generated tasks x the first {r['per_task']} of their 200 test "
             f"items), {len(r['candidates'])} candidates (base, 8 task LoRAs, {len(r['merges'])} merges), built by "
             f"`route build` (metric {r['build']['metric']}, Arrow scores on; {r['build']['wall_time_s']:.0f} s). "
             f"Routers fitted by the route engine on {len(r['seeds'])} seeds of a 60/20/20 split stratified by task "
             f"({r['seeds'][0]['test_queries']} test queries per seed); every router and merge on the same test "
             "rows. Normalised accuracy = mean over tasks of accuracy / the task's own adapter's accuracy on the "
             "same rows, over two task sets: **strong** = merge_quality's 4 tasks whose adapter is right on >= 50% "
             f"of its validation items ({', '.join(used['strong'])}), the statistic merge_quality's README reports; "
             f"**all** = every task whose adapter gets some test row right ({', '.join(used['all'])}; the weak "
             "adapters are right on a few rows, so their ratios are noisy and can exceed 1). Share = / oracle "
             f"routing's. CIs: {r['bootstrap']} paired bootstrap resamples of each task's test rows per seed (a "
             "resample where the adapter gets none of a task right scores 0 there, as merge_quality); every "
             "number is the mean over seeds of the estimate and of each CI end.", "",
             "## Target", "", f"Best learned router chosen on validation accuracy: {t['best_learned_router']} "
             f"(on test, strong tasks: {t['best_learned_router_on_test_strong']})."]
    lines += _target_lines(t, "strong", "Strong tasks") + _target_lines(t, "all", "All tasks")
    lines += [f"- Overhead per query, through the serving code ({o['path']}): routing with {o['router']} "
              f"(embedding + choose) / answering with the query's adapter in the pool's PeftModel: "
              f"{_f(o['overhead_ratio'] * 100, '.2f')}% (target <= 5%: **{'met' if t['overhead_met_5pct'] else 'not met'}"
              f"**); against the adapter merged into a plain model (the fastest way to run it alone) "
              f"{_f(o['overhead_ratio_merged'] * 100, '.2f')}%; with knn {_f(o['overhead_ratio_knn'] * 100, '.2f')}%; "
              f"Arrow (a base forward + choose) {_f(o['arrow_ratio'] * 100, '.1f')}%. Medians over {o['queries']} "
              "test queries, one at a time, interleaved: "
              + ", ".join(f"{k} {v * 1000:.1f} ms" for k, v in o["median_seconds"].items())
              + f" (generation: greedy, at most {o['max_new_tokens']} new tokens; load average {o['loadavg']}).", "",
              "## Routers and merges (test, mean over seeds)", "",
              "| router / merge | normalised, strong [95% CI] | share of oracle, strong [95% CI] | normalised, all "
              "[95% CI] | share of oracle, all | accuracy | validation accuracy |", "|---|---:|---:|---:|---:|---:|---:|"]
    for n in sorted(s, key=lambda n: -(s[n]["strong"]["normalised"] or 0)):
        x, a = s[n]["strong"], s[n]["all"]
        lines.append(f"| {n} | {_f(x['normalised'])} {_ci(x['normalised_ci95'])} | {_f(x['share_of_oracle'])} "
                     f"{_ci(x['share_ci95'])} | {_f(a['normalised'])} {_ci(a['normalised_ci95'])} | "
                     f"{_f(a['share_of_oracle'])} | {_f(s[n]['accuracy'])} | {_f(s[n]['validation_accuracy'])} |")
    lines += ["", f"Build accuracy per candidate (all {r['build']['queries']} queries): " + ", ".join(
        f"{c} {a:.3f}" for c, a in r["build"]["accuracy"].items()) + ".", "",
        "Agreement of the build's forced exact match with merge_quality's own per-item test scores (same items, "
        "same metric, other batching): " + ", ".join(f"{k} {v:.4f}" for k, v in
                                                     r["agreement_with_merge_quality"].items()) + ".", "",
        "Merges (merge_quality's validation-chosen setting and scale): " + "; ".join(
            f"{n} = {m['label']} {m['setting'] or ''} x{m['scale']}" for n, m in r["merges"].items()) + ".", "",
        "Arrow: PEFT's prototypes and per-token weights (top_k "
        f"{r['build']['arrow']['top_k']}, temperature {r['build']['arrow']['temperature']}) over the 8 task "
        "adapters, averaged over each prompt's tokens and the adapted modules, read from one base forward; it picks "
        "one adapter per query where PEFT mixes the top-k per token. Zero-shot: nothing fitted. "
        "`strongest_per_task` reads the query's task label (a task-aware baseline, not a router of unlabelled "
        "queries); `random` is RouteLLM's random mix of the strong and weak candidate, which with equal costs are "
        "the same one.", ""]
    lines += ["Picks of each router on seed 0's test rows (top 4): " + "; ".join(
        f"{k}: " + ", ".join(f"{c} {v}" for c, v in sorted(p.items(), key=lambda cv: -cv[1])[:4])
        for k, p in r["seeds"][0]["picks"].items()) + ". (The oracle takes the first candidate, base, where "
        "none is right.)", "",
        f"Every candidate priced {PRICE:g} per token in and out, so costs are equal and no router trades quality "
        "for cost; the cost-aware comparison is bench/route_pool.py's.", "",
        f"Wall time of the run that wrote this {r['wall_time_s']:.0f} s, plus the build it reused "
        f"({r['build']['wall_time_s']:.0f} s, cached under the bench cache). Machine: {r['machine']['cpu']}, {r['machine']['cores']} cores, "
        f"shared with other jobs (load average {r['loadavg_start']} at the start, {r['loadavg_end']} at the end).",
        "", "![route vs merge](route_vs_merge.png)", ""]
    return "\n".join(lines)


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = {n: v["strong"] for n, v in r["summary"].items()}
    names = sorted(s, key=lambda n: -(s[n]["normalised"] or 0))
    means = [s[n]["normalised"] for n in names]
    lo = [m - (s[n]["normalised_ci95"][0] if s[n]["normalised_ci95"][0] is not None else m)
          for m, n in zip(means, names)]
    hi = [(s[n]["normalised_ci95"][1] if s[n]["normalised_ci95"][1] is not None else m) - m
          for m, n in zip(means, names)]
    colours = ["tab:orange" if n.startswith("merge:") else "tab:gray" if n == "base" else "tab:blue" for n in names]
    fig, ax = plt.subplots(figsize=(8, 6))
    ax.barh(range(len(names)), means, xerr=[lo, hi], capsize=3, color=colours)
    ax.axvline(s["router:oracle"]["normalised"] * 0.95, color="k", ls=":", label="0.95 x oracle routing")
    ax.axvline(1.0, color="gray", ls="--", label="each task's own adapter")
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("normalised accuracy on the 4 strong tasks (test, mean over 3 split seeds; 95% paired-bootstrap CI)",
                  fontsize=8)
    ax.set_title("8-task zoo: routing (blue) against merging (orange)", fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
