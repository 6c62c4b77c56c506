#!/usr/bin/env python
"""Benchmark: the preference-utility curves of steering methods on SmolLM2-135M-Instruct (sentiment contrast pairs,
on the CPU), over seeds: CAA, PCA (repeng's pca_diff), ITI, SPLIT in its three forms (vector, LoRA, local weight)
and the SFT baseline of each form (the same training with w_neg = gamma = 0), and the paper's three claims
checked whichever way they land.

Per seed: data.steering's sentiment pairs (the seed shuffles them and picks the split: 80 training / 20
validation pairs of the 100), every method built through `steer.engine.steer` (what `malleable steer` runs) on
the training pairs at one layer (`--layer`, default 19, the layer the linear probe ranks best for these pairs in
the README's CAA run; ITI chooses its heads among every layer's, as its recipe does by default), then PrefOdds =
L_neg - L_pos and UtilOdds on the validation pairs only (whole-sequence NLLs, `steer.sweep.pair_nll`, through
`steer.applied`) at m = f x M for each f in --fractions. M is each method's own scale: SPLIT and SFT the largest
training strength (the authors' 20 for the vector, 2.0 for LoRA and local weight), the others `--tops` x the
artefact's default strength (CAA 8 x its mean difference, PCA 32 x the pairs' mean separation along its unit
direction, ITI 4 x its alpha: chosen on a one-seed pilot so that every curve reaches past its preference
gain's bend without the model falling apart at f = 1). Since one m means different things for different
methods, the comparisons read the curves at matched preference: the UtilOdds where the PrefOdds gain over m = 0
first reaches a target on the m > 0 side (linear interpolation between measured strengths; n/a when the curve
never gets there).

The claims (Xu et al., "Why Steering Works"), each per seed, then mean and 95% t interval over seeds:
- preference rises then saturates: the PrefOdds gain at f = 1 (> 0: rises), and late slope / early slope, the
  slope of PrefOdds over the last positive step of the grid over its slope over the first (< 1: saturating);
- utility peaks near m = 0 and falls: the f where UtilOdds is highest, and UtilOdds(f = 0) - UtilOdds(f = +-1);
- at equal preference SPLIT keeps more utility than SFT: UtilOdds(SPLIT) - UtilOdds(SFT) at each matched gain,
  paired by seed, per form; a curve that never reaches a gain gives no reading there, so also the same frontier
  read the other way, defined for every run: the largest PrefOdds gain bought for at most B nats of UtilOdds
  (within the swept strengths), SPLIT - SFT paired by seed.
Plus the paper's fitted curves (evaluate.preference.fit_curves) on each method's seed-mean curve, with R^2.

Every (seed, method) run is kept in the results JSON as it finishes; a later call with more --seeds adds to it.

Usage:
  python bench/steer_split.py --seeds 0,1,2   # (a --fractions list starting with "-" needs "=")  writes bench/results/steer_split.{json,md,png}
  python bench/steer_split.py --report        # re-aggregate the stored runs only
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS_DIR, fmt, loadavg, machine, paired_t, write_results  # noqa: E402

NAME = "steer_split"
SFT = {"w_neg": 0.0, "gamma": 0.0}
# label -> (steering method, parameters, M: the largest training strength, or None for a multiple of the default)
METHODS = {
    "caa": ("caa", {}, None),
    "pca_diff": ("pca_diff", {}, None),
    "iti": ("iti", {}, None),
    "split_vector": ("split_vector", {}, 20.0),
    "sft_vector": ("split_vector", SFT, 20.0),
    "split_lora": ("split_lora", {}, 2.0),
    "sft_lora": ("split_lora", SFT, 2.0),
    "split_weight": ("split_weight", {}, 2.0),
    "sft_weight": ("split_weight", SFT, 2.0),
}
BUDGETS = (1.0, 5.0, 20.0)  # nats of UtilOdds a user gives up for preference (gain_within)
PAIRED = (("split_vector", "sft_vector"), ("split_lora", "sft_lora"), ("split_weight", "sft_weight"),
          ("split_vector", "caa"))


def matched(rows: list[dict], gains: list[float]) -> dict[str, float | None]:
    """UtilOdds where PrefOdds - PrefOdds(0) first reaches each gain on the m >= 0 side (interpolated)."""
    pos = sorted((r for r in rows if r["strength"] >= 0), key=lambda r: r["strength"])
    base = pos[0]["pref_odds"]
    out = {}
    for g in gains:
        out[str(g)] = None
        for a, b in zip(pos, pos[1:]):
            ga, gb = a["pref_odds"] - base, b["pref_odds"] - base
            if ga < g <= gb:
                t = (g - ga) / (gb - ga)
                out[str(g)] = a["util_odds"] + t * (b["util_odds"] - a["util_odds"])
                break
    return out


def gain_within(rows: list[dict], budget: float) -> float:
    """The largest PrefOdds gain over m = 0 on the m >= 0 side at which UtilOdds has lost at most `budget` nats
    (a point of the frontier; linear between measured strengths, so a segment that crosses the budget counts up
    to the crossing). 0 when every m > 0 costs more."""
    pos = sorted((r for r in rows if r["strength"] >= 0), key=lambda r: r["strength"])
    p0, u0 = pos[0]["pref_odds"], pos[0]["util_odds"]
    pts = [(r["pref_odds"] - p0, u0 - r["util_odds"]) for r in pos]  # (gain, utility lost)
    best = 0.0
    for (ga, la), (gb, lb) in zip(pts, pts[1:]):
        if la <= budget:
            best = max(best, ga)
        if lb <= budget:
            best = max(best, gb)
        elif la <= budget < lb:  # the segment leaves the budget: count it up to the crossing
            best = max(best, ga + (budget - la) / (lb - la) * (gb - ga))
    return best


def claims(rows: list[dict]) -> dict[str, float]:
    """One run's readings of the paper's claims (see the module docstring)."""
    by_f = {r["fraction"]: r for r in rows}
    pos = sorted(f for f in by_f if f >= 0)

    def slope(a, b):
        return (by_f[b]["pref_odds"] - by_f[a]["pref_odds"]) / (b - a)

    early, late = slope(pos[0], pos[1]), slope(pos[-2], pos[-1])
    peak = max(rows, key=lambda r: r["util_odds"])
    return {"pref_gain_at_1": by_f[1.0]["pref_odds"] - by_f[0.0]["pref_odds"],
            "pref_drop_at_minus_1": by_f[0.0]["pref_odds"] - by_f[-1.0]["pref_odds"],
            "late_over_early_slope": late / early if early else float("nan"),
            "util_peak_fraction": peak["fraction"],
            "util_drop_at_1": by_f[0.0]["util_odds"] - by_f[1.0]["util_odds"],
            "util_drop_at_minus_1": by_f[0.0]["util_odds"] - by_f[-1.0]["util_odds"]}


def interval(xs: list[float]) -> dict:
    """Mean of xs with a 95% t interval over the seeds (paired_t against zeros)."""
    return paired_t([0.0] * len(xs), xs)


def run_key(seed: int, label: str, args) -> str:
    return json.dumps([seed, label, args.layer, args.limit, args.fractions, args.top_of.get(label)])


def build_and_sweep(label: str, seed: int, args, files: dict, model_cache: dict) -> dict:
    import torch

    from malleable.evaluate.preference import pref_odds, util_odds
    from malleable.models.smollm2 import smollm2_checkpoint
    from malleable.recipes.steer import parse_steer_recipe
    from malleable.steer import applied, load_artefact
    from malleable.steer.engine import load, read_pairs, steer
    from malleable.steer.sweep import pair_nll

    method, params, top = METHODS[label]
    torch.manual_seed(seed)
    recipe = parse_steer_recipe({
        "model": str(smollm2_checkpoint()), "method": method, "parameters": params,
        "layers": "auto" if method == "iti" else [args.layer], "seed": seed,
        "read_position": "mean" if method in ("caa", "pca_diff") else None,
        "data": {"train": str(files["train"]), "validation": str(files["validation"])}})
    with tempfile.TemporaryDirectory() as out:
        t = time.perf_counter()
        report = steer(recipe, Path(out) / label, progress=False)
        build_s = time.perf_counter() - t
        artefact = load_artefact(Path(out) / label)
    if "model" not in model_cache:
        model_cache["model"] = load(recipe)
    model, tokenizer = model_cache["model"]
    default = artefact.config["default_strength"]
    scale = top or args.top_of[label] * default
    val = read_pairs(files["validation"])
    rows, t = [], time.perf_counter()
    for f in args.fraction_list:
        with applied(model, artefact, strength=f * scale):
            l_pos, l_neg = pair_nll(model, tokenizer, val)
        rows.append({"fraction": f, "strength": f * scale, "pref_odds": float(np.mean(pref_odds(l_pos, l_neg))),
                     "util_odds": float(np.mean(util_odds(l_pos, l_neg))),
                     "positive_preferred": float(np.mean(l_pos < l_neg))})
    return {"seed": seed, "label": label, "method": method, "parameters": report["artefact"]["parameters"],
            "layers": report["artefact"]["layers"], "default_strength": default, "top_strength": scale,
            "build_s": round(build_s, 1), "train_s": report["seconds"].get("train"),
            "sweep_s": round(time.perf_counter() - t, 1), "rows": rows}


def summarise(runs: list[dict], labels: list[str], gains: list[float]) -> dict:
    from malleable.evaluate.preference import fit_curves

    out: dict = {"methods": {}, "paired": {}, "paired_gain": {}}
    seeds_of = {lab: sorted(r["seed"] for r in runs if r["label"] == lab) for lab in labels}
    for lab in labels:
        mine = sorted((r for r in runs if r["label"] == lab), key=lambda r: r["seed"])
        if not mine:
            continue
        fractions = [x["fraction"] for x in mine[0]["rows"]]
        curve = [{"fraction": f,
                  "strength": statistics.fmean(r["rows"][i]["strength"] for r in mine),
                  "pref_odds": interval([r["rows"][i]["pref_odds"] for r in mine]),
                  "util_odds": interval([r["rows"][i]["util_odds"] for r in mine]),
                  "positive_preferred": statistics.fmean(r["rows"][i]["positive_preferred"] for r in mine)}
                 for i, f in enumerate(fractions)]
        per_seed = [claims(r["rows"]) for r in mine]
        at_runs = [matched(r["rows"], gains) for r in mine]
        out["methods"][lab] = {
            "seeds": seeds_of[lab], "top_strength": [r["top_strength"] for r in mine],
            "build_s": statistics.median(r["build_s"] for r in mine), "curve": curve,
            "claims": {k: interval([c[k] for c in per_seed]) for k in per_seed[0]},
            "util_peak_fractions": [c["util_peak_fraction"] for c in per_seed],
            "matched": {str(g): [at[str(g)] for at in at_runs] for g in gains},
            "gain_within": {str(b): interval([gain_within(r["rows"], b) for r in mine]) for b in BUDGETS},
            "fits": fit_curves([c["fraction"] for c in curve], [c["pref_odds"]["mean"] for c in curve],
                               [c["util_odds"]["mean"] for c in curve])}
    for a, b in PAIRED:
        if a not in out["methods"] or b not in out["methods"]:
            continue
        ra = {r["seed"]: r for r in runs if r["label"] == a}
        rb = {r["seed"]: r for r in runs if r["label"] == b}
        both = sorted(set(ra) & set(rb))
        at_a = {s: matched(ra[s]["rows"], gains) for s in both}
        at_b = {s: matched(rb[s]["rows"], gains) for s in both}
        cells = {}
        for g in gains:
            pairs = [(at_b[s][str(g)], at_a[s][str(g)]) for s in both]
            pairs = [p for p in pairs if None not in p]
            cells[str(g)] = {**paired_t([p[0] for p in pairs], [p[1] for p in pairs]), "of": len(both)} \
                if pairs else {"n": 0, "of": len(both)}
        out["paired"][f"{a} - {b}"] = cells
        out["paired_gain"][f"{a} - {b}"] = {
            str(u): {**paired_t([gain_within(rb[s]["rows"], u) for s in both],
                                [gain_within(ra[s]["rows"], u) for s in both]), "of": len(both)} for u in BUDGETS}
    return out


def plot(path: Path, summary: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    colour = {}  # one colour per form: SPLIT solid, its SFT baseline dashed
    for lab, m in summary["methods"].items():
        form = lab.split("_")[-1] if lab.startswith(("split", "sft")) else lab
        colour.setdefault(form, f"C{len(colour)}")
        style = dict(color=colour[form], ls="--" if lab.startswith("sft") else "-", marker=".", label=lab)
        f = [c["fraction"] for c in m["curve"]]
        pref = np.array([c["pref_odds"]["mean"] for c in m["curve"]])
        util = np.array([c["util_odds"]["mean"] for c in m["curve"]])
        axes[0].plot(f, pref, **style)
        axes[1].plot(f, util, **style)
        zero = f.index(0.0)
        axes[2].plot(pref[zero:] - pref[zero], util[zero:], **style)
    for ax, x, y in ((axes[0], "m / M", "PrefOdds (nats)"), (axes[1], "m / M", "UtilOdds"),
                     (axes[2], "PrefOdds gain over m = 0 (m >= 0)", "UtilOdds")):
        ax.set_xlabel(x)
        ax.set_ylabel(y)
        ax.grid(alpha=0.3)
    axes[2].set_title("preference-utility frontier", fontsize=9)
    axes[1].legend(fontsize=7)
    fig.suptitle("SmolLM2-135M-Instruct, sentiment pairs: means over seeds", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def ci(c: dict, nd: int = 2) -> str:
    if not c.get("n"):
        return "n/a"
    if c["n"] < 2:
        return fmt(c["mean"], nd)
    return f"{fmt(c['mean'], nd)} [{fmt(c['lo'], nd)}, {fmt(c['hi'], nd)}]"


def markdown(d: dict) -> str:
    s = d["summary"]
    seeds = sorted({r["seed"] for r in d["runs"]})
    lines = [f"# steer_split: preference-utility curves on SmolLM2-135M-Instruct (sentiment pairs, seeds {seeds})",
             "",
             f"Layer {d['layer']} (ITI: heads chosen among every layer's); per seed {d['pairs']['train']} training "
             f"and {d['pairs']['validation']} validation pairs (scored), split by the seed. m = f x M, M each "
             f"method's own scale (SPLIT/SFT: the largest training strength; the others a multiple of the "
             f"artefact's default strength: {d['tops']}). PrefOdds = L_neg - L_pos, UtilOdds = "
             "log((p_pos + p_neg) / (1 - p_pos - p_neg)), whole-sequence NLLs with EOS, means over the validation "
             "pairs; then mean and 95% t interval over seeds.", "",
             f"Machine: {d['machine'].get('cpu', d['machine'])}, one torch thread; load average "
             f"{d['loadavg']}.", "",
             "## Curves (mean over seeds)", "",
             "| method | seeds | M | " + " | ".join(f"f={f:g}" for f in d["fractions"]) + " |",
             "|---|---|---|" + "---|" * len(d["fractions"])]
    for lab, m in s["methods"].items():
        top = statistics.fmean(m["top_strength"])
        lines.append(f"| {lab} PrefOdds | {len(m['seeds'])} | {fmt(top)} | "
                     + " | ".join(fmt(c["pref_odds"]["mean"]) for c in m["curve"]) + " |")
        lines.append(f"| {lab} UtilOdds | | | " + " | ".join(fmt(c["util_odds"]["mean"]) for c in m["curve"]) + " |")
    lines += ["", "![PrefOdds, UtilOdds and the frontier](steer_split.png)", "",
              "## The paper's claims, per method (mean [95% t interval] over seeds)", "",
              "| method | PrefOdds gain at f=1 | PrefOdds drop at f=-1 | late / early slope (f >= 0) "
              "| f of peak UtilOdds (per seed) | UtilOdds drop at f=1 | UtilOdds drop at f=-1 |",
              "|---|---|---|---|---|---|---|"]
    for lab, m in s["methods"].items():
        c = m["claims"]
        lines.append(f"| {lab} | {ci(c['pref_gain_at_1'])} | {ci(c['pref_drop_at_minus_1'])} | "
                     f"{ci(c['late_over_early_slope'])} | {', '.join(f'{x:g}' for x in m['util_peak_fractions'])} | "
                     f"{ci(c['util_drop_at_1'])} | {ci(c['util_drop_at_minus_1'])} |")
    lines += ["", "## Utility at matched preference", "",
              "UtilOdds where the PrefOdds gain over m = 0 first reaches each target (m > 0 side; per seed, n/a "
              "where a seed's curve never gets there; mean over the seeds that do):", "",
              "| method | " + " | ".join(f"gain {g:g}" for g in d["gains"]) + " | build s (median) |",
              "|---|" + "---|" * (len(d["gains"]) + 1)]
    for lab, m in s["methods"].items():
        cells = []
        for g in d["gains"]:
            xs = [x for x in m["matched"][str(g)] if x is not None]
            cells.append(f"{fmt(statistics.fmean(xs))} ({len(xs)}/{len(m['seeds'])})" if xs else "n/a")
        lines.append(f"| {lab} | " + " | ".join(cells) + f" | {fmt(m['build_s'], 1)} |")
    lines += ["", "Paired by seed (first minus second; > 0: the first keeps more utility at that preference):", "",
              "| pair | " + " | ".join(f"gain {g:g}" for g in d["gains"]) + " |",
              "|---|" + "---|" * len(d["gains"])]
    for pair, cells in s["paired"].items():
        lines.append(f"| {pair} | " + " | ".join(f"{ci(c)} (n={c.get('n', 0)}/{c['of']})"
                                                    for c in (cells[str(g)] for g in d["gains"])) + " |")
    lines += ["", "## Preference bought within a utility budget", "",
              "The largest PrefOdds gain over m = 0 (m >= 0 side) at which UtilOdds has lost at most B nats: a "
              "point of each run's preference-utility frontier, defined for every run whatever its scale "
              "(0 when every m > 0 costs more).", "",
              "| method | " + " | ".join(f"B = {b:g}" for b in BUDGETS) + " |", "|---|" + "---|" * len(BUDGETS)]
    for lab, m in s["methods"].items():
        lines.append(f"| {lab} | " + " | ".join(ci(m["gain_within"][str(b)]) for b in BUDGETS) + " |")
    lines += ["", "Paired by seed (first minus second; > 0: the first buys more preference for the same utility):",
              "", "| pair | " + " | ".join(f"B = {b:g}" for b in BUDGETS) + " |", "|---|" + "---|" * len(BUDGETS)]
    for pair, cells in s["paired_gain"].items():
        lines.append(f"| {pair} | " + " | ".join(f"{ci(cells[str(b)])} (n={cells[str(b)]['n']})"
                                                    for b in BUDGETS) + " |")
    lines += ["", "## Fitted curves on the seed-mean curve (x = f)", "",
              "PrefOdds = b + a f D(f), UtilOdds = b + c D(f), D(f) = (1 + f²/(2 p scale²))^-p, each side with "
              "its points and f = 0 (evaluate/preference.py).", "",
              "| method | PrefOdds R² f>=0 | f<=0 | UtilOdds R² f>=0 | f<=0 |", "|---|---|---|---|---|"]
    for lab, m in s["methods"].items():
        r2 = [m["fits"][k][side].get("r2") for k in ("pref", "util") for side in ("positive", "negative")]
        lines.append(f"| {lab} | " + " | ".join(fmt(x, 3) for x in r2) + " |")
    lines += [""] + [f"- {n}" for n in d.get("notes", [])]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"of {','.join(METHODS)}")
    ap.add_argument("--layer", type=int, default=19)
    ap.add_argument("--fractions", default="-1.5,-1,-0.75,-0.5,-0.25,-0.1,0,0.1,0.25,0.5,0.75,1,1.5")
    ap.add_argument("--limit", type=int, default=100, help="pairs in all (a fifth held out for validation)")
    ap.add_argument("--tops", default="caa=8,pca_diff=32,iti=4",
                    help="methods without a training strength: M in units of the artefact's default strength")
    ap.add_argument("--gains", default="1,2,4,8")
    ap.add_argument("--note", action="append", default=[])
    ap.add_argument("--report", action="store_true", help="only re-aggregate the stored runs")
    args = ap.parse_args()
    args.fraction_list = [float(x) for x in args.fractions.split(",")]
    args.top_of = {k: float(v) for k, v in (x.split("=") for x in args.tops.split(","))}
    if 0.0 not in args.fraction_list or 1.0 not in args.fraction_list or -1.0 not in args.fraction_list:
        ap.error("--fractions must include -1, 0 and 1")
    gains = [float(x) for x in args.gains.split(",")]
    labels = args.methods.split(",")
    stored_path = RESULTS_DIR / f"{NAME}.json"
    stored = json.loads(stored_path.read_text()) if stored_path.exists() else {}
    runs = stored.get("runs", [])
    loads = stored.get("loadavg", [])
    pairs = stored.get("pairs", {})

    def save():
        data = {"benchmark": NAME, "model": "SmolLM2-135M-Instruct", "layer": args.layer,
                "fractions": args.fraction_list, "tops": args.top_of, "gains": gains,
                "pairs": pairs, "machine": machine(), "loadavg": loads, "notes": args.note or stored.get("notes", []),
                "runs": runs, "summary": summarise(runs, list(METHODS), gains)}
        write_results(NAME, data, markdown(data))
        plot(RESULTS_DIR / f"{NAME}.png", data["summary"])

    if not args.report:
        from malleable.data.steering import write_contrast_pairs
        from malleable.steer.engine import read_pairs

        done = {r["key"] for r in runs}
        model_cache: dict = {}
        for seed in (int(s) for s in args.seeds.split(",")):
            with tempfile.TemporaryDirectory() as tmp:
                files = write_contrast_pairs("sentiment", tmp, seed=seed, limit=args.limit)
                pairs = {"train": len(read_pairs(files["train"])), "validation": len(read_pairs(files["validation"]))}
                for label in labels:
                    key = run_key(seed, label, args)
                    if key in done:
                        continue
                    loads.append(loadavg())
                    run = build_and_sweep(label, seed, args, files, model_cache)
                    runs.append({"key": key, **run})
                    print(f"seed {seed} {label}: built {run['build_s']} s, swept {run['sweep_s']} s", flush=True)
                    save()
    save()


if __name__ == "__main__":
    main()
