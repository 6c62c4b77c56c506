"""`forget_classifier.py --calibrated`: every classifier objective at its tuned fixed budget vs calibrated stopping.

    PYTHONPATH=src python bench/forget_classifier.py --calibrated            # 3 seeds, lrs from the stored results
    PYTHONPATH=src python bench/forget_classifier.py --calibrated --methods ga,npo --seeds 0

Issue 13's headline on the classifier protocol: for each objective, scenario (class-wise, random 10%) and seed, a
copy of the original is unlearned twice with the SAME lr and step budget (the tuned values stored in
bench/results/forget_classifier.json, 8% of retraining's examples): once for the whole budget (fixed) and once with
`StopRule("indistinguishable")`, which may stop earlier (calibrated). Both are scored by the protocol (Avg. Gap to
the retrained model over UA, RA, TA, MIA-efficacy) and both get a verdict: `forget.stopping.side` of the loss
attack's AUC of the forget rows against never-trained rows, on the same tolerance.

Which never-trained rows, and why:
* the rule's calibration rows are the tuning validation split (Fashion-MNIST TRAIN images 12,000..16,999, never in
  any model's training set, read by no reported metric in seeds 0-2; the tuning seed that chose the lrs used them as
  its "test" set): class-wise only those of the forgotten class (a model retrained without class 0 cannot classify
  any class-0 image, so against other classes' unseen rows it is far from AUC 0.5; against unseen class-0 rows it
  sits at 0.5), random the first `CALIBRATION_CAP` of them;
* the verdict's rows are official TEST rows (the evaluation side, like the MIA's non-members): class-wise the test
  rows of the forgotten class (the ones the protocol drops from TA), random the first `VERDICT_CAP` test rows. So
  the verdict does not read the rows the rule stopped on.

Settings (not tuned on test metrics): two calibrated arms, tolerance 0.025 and 0.05, each judged by the verdict at
its own tolerance (the fixed run's verdict is read from its AUC at each). 0.025 is about two standard errors of the
AUC of a model with no membership signal at these row counts (~1,200 forget rows against ~600 calibration rows:
0.015; against 1,000-3,000 verdict rows: 0.010-0.012), the finest the attack resolves; 0.05 is the brief's example.
A first launch ran 0.05 alone and was stopped before any unlearning run: the originals' own AUC against the verdict
rows (0.546 class-wise, 0.530 random on seed 0) already sat inside 0.5 +- 0.05, so that arm has nearly nothing to
do on this model. A check every 5 steps (the forget CLI's default; budgets are 101..204 steps).

Originals and retrains are cached by their settings under /work/bench-cache/forget_classifier/ (safetensors), and
each finished (method, seed, scenario) pair of runs under .../rows/, so a rerun resumes; the results are rewritten
after every method, marked partial until all are done.
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from _common import fmt, loadavg, machine, paired_t, write_results
from malleable.forget.stopping import VERSION as STOP_RULE
from malleable.forget.stopping import side
from malleable.io.atomic import write_text_atomic
from malleable.protocols.forget_classifier import (SCENARIOS, make_split, membership, score, train_model,
                                                  unlearn_and_score, unseen_rows)

NAME = "forget_classifier_calibrated"
CACHE = Path(os.environ.get("MALLEABLE_BENCH_CACHE", "/work/bench-cache")) / "forget_classifier"
TOLERANCES = (0.025, 0.05)
CHECK_EVERY = 5
CALIBRATION_CAP = 2000
VERDICT_CAP = 3000
# the brief's order: these first, so that a run cut short has them for every seed
FIRST = ("ga", "graddiff", "npo", "simnpo", "rl", "salun", "sfr_on", "l1_sparse")
SIDES = ("under-unlearned", "calibrated", "over-unlearned")
TITLES = {"class": "class-wise", "random": "random 10%"}


def _key(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:20]


def cached_model(make_model, examples, recipe: dict, seed: int, settings: dict) -> tuple[torch.nn.Module, float]:
    """`train_model`, or its weights and time from the cache when these `settings` were trained before."""
    folder = CACHE / _key({**settings, "recipe": recipe, "seed": seed, "rows": len(examples)})
    weights, meta = folder / "model.safetensors", folder / "meta.json"
    if weights.exists() and meta.exists():
        model = make_model()
        model.load_state_dict(load_file(str(weights)))
        return model.eval(), json.loads(meta.read_text())["seconds"]
    model, seconds = train_model(make_model, examples, recipe, seed)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".model.{os.getpid()}.tmp"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    os.replace(tmp, weights)
    write_text_atomic(meta, json.dumps({"seconds": seconds, "settings": settings, "seed": seed, "recipe": recipe}))
    return model, seconds


def _ms(xs: list[float]) -> dict:
    return {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0}


def stop_step(row: dict) -> int:
    """The step whose weights the calibrated run kept: the check it rolled back to, else the last step run."""
    return row["stopping"]["restored_to"] or row["steps_run"]


def summarise(rows: dict, seeds: list[int], tolerance: float) -> dict:
    """{scenario: {method: aggregate}} of the arm at `tolerance`, over the seeds each method has finished; the fixed
    run's verdict is read from its AUC at the same tolerance."""
    out = {}
    for scenario in SCENARIOS:
        out[scenario] = {}
        for name, per_seed in rows.items():
            done = [per_seed[(s, scenario)] for s in seeds if (s, scenario) in per_seed]
            if not done:
                continue
            fx, cal = [r["fixed"] for r in done], [r["calibrated"][str(tolerance)] for r in done]
            fixed_sides = [side(r["membership_auc"], tolerance) if r["membership_auc"] == r["membership_auc"]
                           else r["side"] for r in fx]
            out[scenario][name] = {
                "seeds": len(done), "budget": done[0]["fixed"]["steps_run"],
                "gap_fixed": _ms([r["gap"] for r in fx]), "gap_calibrated": _ms([r["gap"] for r in cal]),
                "gap_difference": paired_t([r["gap"] for r in fx], [r["gap"] for r in cal]),
                "UA_fixed": _ms([r["UA"] for r in fx]), "UA_calibrated": _ms([r["UA"] for r in cal]),
                "stop_step": _ms([stop_step(r) for r in cal]),
                "stopped_early": sum(stop_step(r) < r0["steps_run"] for r, r0 in zip(cal, fx)),
                "auc_fixed": _ms([r["membership_auc"] for r in fx]),
                "auc_calibrated": _ms([r["membership_auc"] for r in cal]),
                "over_fixed": fixed_sides.count("over-unlearned"),
                "over_calibrated": sum(r["side"] == "over-unlearned" for r in cal),
                "under_fixed": fixed_sides.count("under-unlearned"),
                "under_calibrated": sum(r["side"] == "under-unlearned" for r in cal),
            }
    return out


def markdown(data: dict) -> str:
    c, m = data["config"], data["machine"]
    lines = ["# Calibrated stopping vs the tuned fixed budget, classifier protocol (issue 13)", "",
             f"Machine: {m['cpu']}, {m['cores']} cores (shared; run under nice 15 beside other jobs), torch "
             f"{m['versions']['torch']}, {c['threads']} torch thread, load average at start {data['loadavg_start']}, "
             f"at the last write {data['loadavg_end']}, git {m['malleable_git']}, {m['date']}.", "",
             f"Protocol and models as bench/results/forget_classifier.md ({c['dataset']}, train subset "
             f"{c['train_size']}, small_cnn, recipe {c['recipe']}); each objective runs at the lr and step budget "
             f"stored there (tuned on the validation split), seeds {c['seeds']}. Fixed: the whole budget. "
             f"Calibrated: the same lr with the budget as its cap, stopped by `StopRule(\"indistinguishable\")` "
             f"(tolerance {' or '.join(map(str, c['tolerances']))}: one arm each, a check every {c['check_every']} "
             "steps, roll-back to the closer check) "
             f"on calibration rows from the tuning validation split (class-wise: its rows of class "
             f"{c['forget_class']}; random: its first {c['calibration_cap']} rows). Verdict of every final model: "
             f"`forget.stopping.side` of the loss attack's AUC, forget rows vs official test rows (class-wise: the "
             f"test rows of class {c['forget_class']}; random: the first {c['verdict_cap']}), at the arm's "
             "tolerance. Difference = calibrated - fixed Avg. Gap per seed, mean and 95% t interval over "
             "seeds (negative: calibration brought the run closer to retrain).", ""]
    if data.get("partial"):
        lines += [f"**Partial**: {data['partial']}", ""]
    for scenario, tol in ((s, t) for s in SCENARIOS for t in c["tolerances"]):
        ctx = data["context"][scenario]
        lines += [f"## {TITLES[scenario]} forgetting, tolerance {tol}", "",
                  f"AUC against the verdict rows: retrain {fmt(ctx['retrain_auc']['mean'])} ± "
                  f"{fmt(ctx['retrain_auc']['std'])}, original {fmt(ctx['original_auc']['mean'])} ± "
                  f"{fmt(ctx['original_auc']['std'])}; against the calibration rows: retrain "
                  f"{fmt(ctx['retrain_calibration_auc']['mean'])}, original "
                  f"{fmt(ctx['original_calibration_auc']['mean'])}. Retrain's verdict per seed: "
                  f"{', '.join(side(a, tol) for a in ctx['retrain_aucs'])}; the original's: "
                  f"{', '.join(side(a, tol) for a in ctx['original_aucs'])}.", "",
                  "| method | seeds | budget | stop step | Avg. Gap fixed | Avg. Gap calibrated | difference [95% CI] "
                  "| UA fixed | UA calibrated | AUC fixed | AUC calibrated | over-unlearned fixed | over-unlearned "
                  "calibrated | under-unlearned fixed / calibrated |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for name, r in data["summary"][str(tol)][scenario].items():
            d = r["gap_difference"]

            def ms(x):
                return f"{fmt(x['mean'])} ± {fmt(x['std'])}"

            lines.append(f"| {name} | {r['seeds']} | {r['budget']} | {ms(r['stop_step'])} | {ms(r['gap_fixed'])} | "
                         f"{ms(r['gap_calibrated'])} | {fmt(d['mean'])} [{fmt(d['lo'])}, {fmt(d['hi'])}] | "
                         f"{ms(r['UA_fixed'])} | {ms(r['UA_calibrated'])} | {ms(r['auc_fixed'])} | "
                         f"{ms(r['auc_calibrated'])} | {r['over_fixed']}/{r['seeds']} | "
                         f"{r['over_calibrated']}/{r['seeds']} | {r['under_fixed']} / {r['under_calibrated']} |")
        totals = data["totals"][str(tol)][scenario]
        lines += ["", f"Over-unlearned runs: {totals['over_fixed']} of {totals['runs']} fixed, "
                      f"{totals['over_calibrated']} of {totals['runs']} calibrated; under-unlearned "
                      f"{totals['under_fixed']} and {totals['under_calibrated']}. Calibrated Avg. Gap lower than "
                      f"fixed in {totals['closer']} of {totals['pairs']} objectives (mean over seeds).", ""]
    if data.get("findings"):
        lines += ["## Findings", "", data["findings"], ""]
    return "\n".join(lines)


def totals(summary: dict) -> dict:
    out = {}
    for scenario, rows in summary.items():
        out[scenario] = {k: sum(r[k] for r in rows.values()) for k in
                         ("over_fixed", "over_calibrated", "under_fixed", "under_calibrated")}
        out[scenario]["runs"] = sum(r["seeds"] for r in rows.values())
        out[scenario]["pairs"] = len(rows)
        out[scenario]["closer"] = sum(r["gap_calibrated"]["mean"] < r["gap_fixed"]["mean"] for r in rows.values())
    return out


def run(args, *, make_model, pool, validation, test, recipe, methods, spec) -> None:
    """The --calibrated mode of bench/forget_classifier.py (module docstring)."""
    stored = json.loads(Path(args.reuse_lr or RESULTS / "forget_classifier.json").read_text())["hyperparameters"]
    order = [n for n in FIRST if n in methods] + [n for n in methods if n not in FIRST and n != "mu_mis"] + \
        [n for n in methods if n == "mu_mis"]  # mu_mis costs about a retrain per run: last
    missing = [n for n in order if any(n not in stored.get(s, {}) for s in SCENARIOS)]
    order = [n for n in order if n not in missing]
    settings = {"dataset": args.dataset, "train_size": len(pool), "forget_class": args.forget_class}
    start_load, start = loadavg(), time.perf_counter()
    models, context_rows = {}, {s: [] for s in SCENARIOS}
    splits = {}
    for seed in args.seeds:
        original = cached_model(make_model, pool, recipe, seed, {**settings, "what": "original"})
        for scenario in SCENARIOS:
            split = make_split(pool, test, scenario, seed, args.forget_class)
            retrain = cached_model(make_model, split["retain"], recipe, seed, {**settings, "what": f"retrain {scenario}"})
            calibration = unseen_rows(validation, scenario, args.forget_class)[:CALIBRATION_CAP]
            verdict = unseen_rows(test, scenario, args.forget_class)[:VERDICT_CAP]
            gold = score(retrain[0], split, args.max_shadow)
            splits[(seed, scenario)] = (split, calibration, verdict, gold)
            models[seed] = original
            models[(seed, scenario)] = retrain
            cal_auc = membership(retrain[0], split["forget"], calibration, TOLERANCES[0])
            original_cal = membership(original[0], split["forget"], calibration, TOLERANCES[0])
            context_rows[scenario].append({"seed": seed, "retrain": membership(retrain[0], split["forget"], verdict,
                                                                               TOLERANCES[0]),
                                           "retrain_calibration_auc": cal_auc["membership_auc"],
                                           "original_calibration_auc": original_cal["membership_auc"],
                                           "original": membership(original[0], split["forget"], verdict,
                                                                  TOLERANCES[0]),
                                           "retrain_seconds": retrain[1], "original_seconds": original[1]})
            print(f"seed {seed} {scenario}: original {original[1]:.0f}s retrain {retrain[1]:.0f}s; "
                  f"AUC retrain {context_rows[scenario][-1]['retrain']['membership_auc']:.3f} original "
                  f"{context_rows[scenario][-1]['original']['membership_auc']:.3f} ({time.strftime('%H:%M:%S')})",
                  file=sys.stderr)
    context = {s: {"retrain_auc": _ms([r["retrain"]["membership_auc"] for r in rows]),
                   "retrain_calibration_auc": _ms([r["retrain_calibration_auc"] for r in rows]),
                   "original_calibration_auc": _ms([r["original_calibration_auc"] for r in rows]),
                   "original_auc": _ms([r["original"]["membership_auc"] for r in rows]),
                   "retrain_aucs": [r["retrain"]["membership_auc"] for r in rows],
                   "original_aucs": [r["original"]["membership_auc"] for r in rows], "per_seed": rows}
               for s, rows in context_rows.items()}

    rows: dict[str, dict] = {}
    for i, name in enumerate(order):
        objective, mask = methods[name]
        rows[name] = {}
        for seed in args.seeds:
            for scenario in SCENARIOS:
                split, calibration, verdict, gold = splits[(seed, scenario)]
                h = stored[scenario][name]
                method = spec(objective, mask, h["lr"], h["steps"], args.batch_size)
                key = _key({**settings, "recipe": recipe, "seed": seed, "scenario": scenario, "method": method,
                            "tolerances": TOLERANCES, "check_every": CHECK_EVERY, "calibration": len(calibration),
                            "verdict": len(verdict), "max_shadow": args.max_shadow, "stop_rule": STOP_RULE})
                path = CACHE / "rows" / f"{key}.json"
                if path.exists():
                    rows[name][(seed, scenario)] = json.loads(path.read_text())
                    continue
                if args.cached_only:
                    continue
                retrain_s = models[(seed, scenario)][1]
                common = {"seed": seed, "max_shadow": args.max_shadow, "unseen": verdict}
                pair = {"fixed": unlearn_and_score(models[seed][0], split, method, gold, retrain_s, **common,
                                                   tolerance=TOLERANCES[0]),
                        "calibrated": {str(tol): unlearn_and_score(models[seed][0], split, method, gold, retrain_s,
                                                                   **common, tolerance=tol,
                                                                   stop_at="indistinguishable",
                                                                   calibration=calibration, check_every=CHECK_EVERY)
                                       for tol in TOLERANCES},
                        "lr": h["lr"], "steps": h["steps"]}
                path.parent.mkdir(parents=True, exist_ok=True)
                write_text_atomic(path, json.dumps(pair))
                rows[name][(seed, scenario)] = pair
                f = pair["fixed"]
                print(f"{name:14s} seed {seed} {scenario:6s}: fixed gap {f['gap']:.2f} AUC {f['membership_auc']:.3f}"
                      + "".join(f"; tol {t}: gap {c['gap']:.2f} stop {stop_step(c)}/{f['steps_run']} AUC "
                                f"{c['membership_auc']:.3f} {c['side']}" for t, c in pair["calibrated"].items())
                      + f" ({time.strftime('%H:%M:%S')})", file=sys.stderr)
        want = len(args.seeds) * len(SCENARIOS)
        left = [n for n in order if len(rows.get(n, {})) < want]
        short = [f"{n} ({len(rows[n])} of {want} seed x scenario pairs)" for n in left if rows.get(n)]
        partial = (f"{len(left)} of {len(order)} objectives not complete: {', '.join(left)}" if left else "") + (
            f"; run in part: {', '.join(short)}" if short else "") + ("." if left else "") + (
            f" No stored lr for {', '.join(missing)}." if missing else "")
        done = [n for n in order[:i + 1] if rows[n]]
        if rows[name] or i == len(order) - 1:
            write(args, recipe, pool, {n: rows[n] for n in done}, context, done, partial.strip(), start_load, start)


def render(path: str) -> None:
    """Rewrite the .md of a results .json (e.g. after its "findings" were written)."""
    data = json.loads(Path(path).read_text())
    write_results(Path(path).stem, data, markdown(data))


def write(args, recipe, pool, rows, context, done, partial, start_load, start) -> None:
    summary = {str(tol): summarise(rows, args.seeds, tol) for tol in TOLERANCES}
    previous = RESULTS / f"{NAME}.json"
    findings = json.loads(previous.read_text()).get("findings") if previous.exists() else None
    data = {
        "machine": machine(), "loadavg_start": start_load, "loadavg_end": loadavg(),
        "wall_s": round(time.perf_counter() - start, 1), "partial": partial or None, "findings": findings,
        "config": {"dataset": args.dataset, "train_size": len(pool), "seeds": args.seeds, "recipe": recipe,
                   "batch_size": args.batch_size, "forget_class": args.forget_class, "max_shadow": args.max_shadow,
                   "threads": args.threads, "tolerances": list(TOLERANCES), "check_every": CHECK_EVERY,
                   "calibration_cap": CALIBRATION_CAP, "verdict_cap": VERDICT_CAP, "methods": done,
                   "lr_from": args.reuse_lr or "bench/results/forget_classifier.json"},
        "context": context, "summary": summary, "totals": {t: totals(s) for t, s in summary.items()},
        "runs": {name: [{"seed": s, "scenario": sc, **pair} for (s, sc), pair in per.items()]
                 for name, per in rows.items()},
    }
    write_results(args.out if args.out != "forget_classifier" else NAME, data, markdown(data))


RESULTS = Path(__file__).resolve().parent / "results"
