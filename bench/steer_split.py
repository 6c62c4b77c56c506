#!/usr/bin/env python
"""Benchmark: SPLIT (vector, LoRA, local weight; and the SFT baseline of the vector form) against CAA on
SmolLM2-135M-Instruct, sentiment contrast pairs, on the CPU. ONE seed: a first measurement, not a comparison
with confidence intervals.

Every method steers the same layer (`--layer`, default 19: the layer the linear probe ranks best for these pairs
in the README's CAA run) and is trained or read on the same training pairs (data.steering's sentiment builder,
seed 0, `--limit` pairs of which a fifth are held out: 80 / 20 by default, to fit a busy 2-core machine);
PrefOdds and UtilOdds are scored on the held-out validation pairs only, through
`steer.applied` and the sweep's `pair_nll`, at strengths m = f * M for f in --fractions, M each method's largest
training strength (SPLIT: the authors' 20 for the vector, 2.0 for LoRA and local weight) or, for CAA, `--caa-top`.
Since one m means different things for different methods, the table also reads each curve at matched preference:
the UtilOdds where the PrefOdds gain over m = 0 first reaches a target (linear interpolation between measured
strengths on the m > 0 side; n/a when the curve never gets there).

Usage:
  python bench/steer_split.py                 # writes bench/results/steer_split.{json,md}
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import fmt, loadavg, machine, write_results  # noqa: E402

NAME = "steer_split"
METHODS = {  # name -> (steering method, parameters, largest training strength or None for --caa-top)
    "caa": ("caa", {}, None),
    "split_vector": ("split_vector", {}, 20.0),
    "sft_vector": ("split_vector", {"w_neg": 0.0, "gamma": 0.0}, 20.0),
    "split_lora": ("split_lora", {}, 2.0),
    "split_weight": ("split_weight", {}, 2.0),
}


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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layer", type=int, default=19)
    ap.add_argument("--fractions", default="-1,-0.5,0,0.5,1")
    ap.add_argument("--limit", type=int, default=100, help="pairs in all (a fifth held out for validation)")
    ap.add_argument("--caa-top", type=float, default=8.0)
    ap.add_argument("--methods", default="caa,split_vector,split_lora", help=f"of {','.join(METHODS)}")
    ap.add_argument("--gains", default="1,2,4")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--name", default=NAME, help="results file name (two runs side by side on a busy machine)")
    args = ap.parse_args()
    fractions = [float(x) for x in args.fractions.split(",")]
    gains = [float(x) for x in args.gains.split(",")]

    import torch

    from malleable.data.steering import write_contrast_pairs
    from malleable.models.smollm2 import smollm2_checkpoint
    from malleable.recipes.steer import parse_steer_recipe
    from malleable.steer import applied, load_artefact
    from malleable.steer.engine import load, read_pairs, steer
    from malleable.steer.sweep import pair_nll

    torch.manual_seed(args.seed)
    checkpoint = smollm2_checkpoint()
    load_before = loadavg()
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        files = write_contrast_pairs("sentiment", tmp, seed=args.seed, limit=args.limit)
        val, n_train = read_pairs(files["validation"]), len(read_pairs(files["train"]))
        recipe_of = {}
        for label in args.methods.split(","):
            method, params, top = METHODS[label]
            recipe = parse_steer_recipe({"model": str(checkpoint), "method": method, "parameters": params,
                                         "layers": [args.layer], "seed": args.seed,
                                         "read_position": "mean" if method == "caa" else None,
                                         "data": {"train": str(files["train"]), "validation": str(files["validation"])}})
            recipe_of[label] = recipe
            t = time.perf_counter()
            report = steer(recipe, Path(tmp) / label, progress=True)
            results[label] = {"method": method, "parameters": report["artefact"]["parameters"],
                              "top_strength": top or args.caa_top, "build_s": round(time.perf_counter() - t, 1),
                              "train_s": report["seconds"].get("train"), "training": report["training"]}
            print(f"{label}: built in {results[label]['build_s']} s", flush=True)
        model, tokenizer = load(next(iter(recipe_of.values())))
        for label, r in results.items():
            artefact = load_artefact(Path(tmp) / label)
            rows = []
            t = time.perf_counter()
            for f in fractions:
                m = f * r["top_strength"]
                with applied(model, artefact, strength=m):
                    l_pos, l_neg = pair_nll(model, tokenizer, val)
                from malleable.evaluate.preference import pref_odds, util_odds

                rows.append({"fraction": f, "strength": m, "pref_odds": float(np.mean(pref_odds(l_pos, l_neg))),
                             "util_odds": float(np.mean(util_odds(l_pos, l_neg))),
                             "positive_preferred": float(np.mean(l_pos < l_neg))})
            r["rows"], r["sweep_s"] = rows, round(time.perf_counter() - t, 1)
            r["util_at_pref_gain"] = matched(rows, gains)
            print(f"{label}: swept in {r['sweep_s']} s", flush=True)
    data = {"benchmark": NAME, "seeds": [args.seed], "layer": args.layer,
            "pairs": {"train": n_train, "validation": len(val)},
            "fractions": fractions, "gains": gains, "methods": results, "machine": machine(),
            "loadavg_before": load_before, "loadavg_after": loadavg()}
    write_results(args.name, data, markdown(data))


def markdown(d: dict) -> str:
    lines = [f"# steer_split: SPLIT vs CAA on SmolLM2-135M-Instruct (sentiment pairs, ONE seed: {d['seeds'][0]})", "",
             f"Layer {d['layer']}; {d['pairs']['train']} training pairs, {d['pairs']['validation']} validation pairs "
             "(scored). m = fraction x the method's largest training strength (CAA: the --caa-top value). Mean "
             "PrefOdds = L_neg - L_pos and UtilOdds over the validation pairs (whole-sequence NLLs with EOS).", "",
             f"Machine: {d['machine'].get('cpu', d['machine'])}; load average {d['loadavg_before']} before, "
             f"{d['loadavg_after']} after.", "",
             "| method | M | " + " | ".join(f"f={f:g}" for f in d["fractions"]) + " |",
             "|---|---|" + "---|" * len(d["fractions"])]
    for label, r in d["methods"].items():
        lines.append(f"| {label} PrefOdds | {r['top_strength']:g} | "
                     + " | ".join(fmt(x["pref_odds"]) for x in r["rows"]) + " |")
        lines.append(f"| {label} UtilOdds | | " + " | ".join(fmt(x["util_odds"]) for x in r["rows"]) + " |")
    lines += ["", "UtilOdds at matched preference (PrefOdds gain over m = 0 on the m > 0 side; n/a: not reached):",
              "", "| method | " + " | ".join(f"gain {g:g}" for g in d["gains"]) + " | train s | sweep s |",
              "|---|" + "---|" * (len(d["gains"]) + 2)]
    for label, r in d["methods"].items():
        lines.append(f"| {label} | " + " | ".join(fmt(r["util_at_pref_gain"][str(g)]) for g in d["gains"])
                     + f" | {fmt(r['train_s'])} | {fmt(r['sweep_s'])} |")
    lines += ["", "One seed, one layer, one concept: a first reading, not evidence that one method beats another."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
