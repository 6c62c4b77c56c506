#!/usr/bin/env python
"""Benchmark: ITI's K (heads shifted) and alpha (strength, in standard deviations along each head's direction) on
SmolLM2-135M-Instruct (30 layers x 9 heads = 270 heads), sentiment contrast pairs, on the CPU: where the 7B
defaults (K = 48 of 1024 heads, alpha 15) land on a 135M model, and what `iti`'s defaults should be.

Per seed: data.steering's sentiment pairs (the seed shuffles them; 80 training / 20 validation pairs of the 100),
ITI's fit (what `malleable steer` runs for method iti) once at the largest K (every layer's heads are candidates;
the probes are fitted on 80% of the training pairs and ranked on the other 20%, as the authors; a smaller K keeps
the first K heads of that ranking, which is what a fit at that K gives), then PrefOdds = L_neg - L_pos and UtilOdds on the
20 validation pairs (whole-sequence NLLs, steer.sweep.pair_nll) through `steer.applied` at each alpha. Reported:
per (K, alpha), the mean over seeds of the change from the unsteered model (alpha 0) of mean PrefOdds and mean
UtilOdds, with a 95% t interval over seeds, and the share of validation pairs whose positive is the likelier.

Usage:
  python bench/steer_iti.py                  # writes bench/results/steer_iti_k_alpha.{json,md}
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import fmt, loadavg, machine, paired_t, write_results  # noqa: E402

NAME = "steer_iti_k_alpha"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--heads", default="6,12,24,48", help="values of K")
    ap.add_argument("--alphas", default="0,4,8,15,30", help="strengths (0 is the unsteered model)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--limit", type=int, default=100, help="pairs in all (a fifth held out for validation)")
    ap.add_argument("--util-loss", type=float, default=1.0,
                    help="the default's rule: largest PrefOdds gain with UtilOdds loss below this (nats)")
    args = ap.parse_args()
    ks = [int(x) for x in args.heads.split(",")]
    alphas = sorted({float(x) for x in args.alphas.split(",")} | {0.0})
    seeds = [int(x) for x in args.seeds.split(",")]

    from malleable.data.steering import write_contrast_pairs
    from malleable.evaluate.preference import pref_odds, util_odds
    from malleable.models.smollm2 import smollm2_checkpoint
    from malleable.recipes.steer import parse_steer_recipe
    from malleable.steer import applied
    from malleable.steer.apply import decoder_layers
    from malleable.steer.artefact import Artefact, model_identity
    from malleable.steer.engine import load, read_pairs
    from malleable.steer.iti import head_count
    from malleable.steer.registry import get_method
    from malleable.steer.sweep import pair_nll

    checkpoint = smollm2_checkpoint()
    load_before = loadavg()
    runs = []  # one per (seed, K): the chosen heads and the rows per alpha
    start = time.perf_counter()
    recipe = parse_steer_recipe({"model": str(checkpoint), "method": "iti", "data": {"train": ".", "validation": "."}})
    model, tokenizer = load(recipe)
    for seed in seeds:
        with tempfile.TemporaryDirectory() as tmp:
            files = write_contrast_pairs("sentiment", tmp, seed=seed, limit=args.limit)
            train, val = read_pairs(files["train"]), read_pairs(files["validation"])
        # one fit at the largest K, every layer's heads candidates (ITI's own `fit`, what `malleable steer` runs,
        # without the engine's residual-stream probes): the top-K heads of a smaller K are the first K of that
        # ranking, and the directions and stds do not depend on K, so each K keeps the first K heads' slices
        method = get_method("iti", {"heads": max(ks)})
        t = time.perf_counter()
        tensors, log = method.fit(model, tokenizer, train, list(range(len(decoder_layers(model)))), seed)
        build_s = round(time.perf_counter() - t, 1)
        full = Artefact(tensors, {"form": "head_offsets", "method": "iti", "model": model_identity(model),
                                  "layers": sorted(tensors), "default_strength": 4.0})
        ranked = [(c["layer"], c["head"]) for c in log["heads"]]

        def score(artefact, a):
            with applied(model, artefact, strength=a):
                l_pos, l_neg = pair_nll(model, tokenizer, val)
            return {"alpha": a, "pref_odds": float(np.mean(pref_odds(l_pos, l_neg))),
                    "util_odds": float(np.mean(util_odds(l_pos, l_neg))),
                    "positive_preferred": float(np.mean(l_pos < l_neg))}

        base = score(full, 0.0)
        for k in ks:
            artefact = first_heads(full, ranked[:k], head_count(model))
            rows = [base if a == 0 else score(artefact, a) for a in alphas]
            runs.append({"seed": seed, "heads": k, "build_s": build_s,
                         "chosen": [(c["layer"], c["head"], c["accuracy"]) for c in log["heads"][:k]], "rows": rows})
            print(f"seed {seed} K {k}: swept ({build_s} s to fit K = {max(ks)})", flush=True)
        done = sorted({r["seed"] for r in runs})  # written after every seed: a cut-short run keeps what it has
        summary = summarise(runs, ks, alphas, done)
        ok = [s for s in summary if s["alpha"] > 0 and s["util"]["mean"] > -args.util_loss]
        best = max(ok, key=lambda s: s["pref"]["mean"]) if ok else None
        data = {"benchmark": NAME, "model": "SmolLM2-135M-Instruct", "seeds": done, "seeds_planned": len(seeds),
                "heads": ks, "alphas": alphas,
                "pairs": {"train": len(train), "validation": len(val)},
                "rule": f"largest mean PrefOdds gain with mean UtilOdds loss < {args.util_loss} nats, alpha > 0",
                "best": best, "summary": summary, "runs": runs, "wall_s": round(time.perf_counter() - start, 1),
                "machine": machine(), "loadavg_before": load_before, "loadavg_after": loadavg()}
        write_results(NAME, data, markdown(data))


def first_heads(full, heads: list[tuple[int, int]], n_heads: int):
    """The artefact `full` with only `heads`' slices of each layer's offset kept."""
    from malleable.steer.artefact import Artefact

    vectors = {}
    for i, t in full.vectors.items():
        keep = [h for layer, h in heads if layer == i]
        if keep:
            off = t["offset"].clone().view(n_heads, -1)
            mask = torch.zeros(n_heads, 1)
            mask[keep] = 1.0
            vectors[i] = {"offset": (off * mask).reshape(-1)}
    return Artefact(vectors, full.config | {"layers": sorted(vectors)})


def summarise(runs: list[dict], ks: list[int], alphas: list[float], seeds: list[int]) -> list[dict]:
    """Per (K, alpha): PrefOdds and UtilOdds change from alpha 0, paired over seeds (95% t interval)."""
    out = []
    for k in ks:
        by_seed = {r["seed"]: {x["alpha"]: x for x in r["rows"]} for r in runs if r["heads"] == k}
        for a in alphas:
            base = [by_seed[s][0.0] for s in seeds]
            at = [by_seed[s][a] for s in seeds]
            out.append({"heads": k, "alpha": a,
                        "pref": paired_t([b["pref_odds"] for b in base], [x["pref_odds"] for x in at]),
                        "util": paired_t([b["util_odds"] for b in base], [x["util_odds"] for x in at]),
                        "positive_preferred": float(np.mean([x["positive_preferred"] for x in at]))})
    return out


def ci(x: dict) -> str:
    return f"{fmt(x['mean'])} [{fmt(x['lo'])}, {fmt(x['hi'])}]" if x["n"] > 1 else fmt(x["mean"])


def markdown(d: dict) -> str:
    lines = [f"# ITI's K and alpha on {d['model']} (sentiment pairs, seeds {d['seeds']})", "",
             f"{d['pairs']['train']} training pairs (probes on 80% of them, heads ranked on the other 20%), "
             f"{d['pairs']['validation']} validation pairs scored. Change from the unsteered model (alpha 0) of the "
             "mean PrefOdds = L_neg - L_pos and of the mean UtilOdds (whole-sequence NLLs, nats), mean over seeds "
             "[95% t interval over seeds]; 'pos. preferred': share of validation pairs whose positive is the "
             "likelier, mean over seeds.", "",
             f"Machine: {d['machine'].get('cpu', d['machine'])}; load average {d['loadavg_before']} before, "
             f"{d['loadavg_after']} after; {d['wall_s']} s in all.", "",
             "| K | alpha | PrefOdds change | UtilOdds change | pos. preferred |", "|---|---|---|---|---|"]
    for s in d["summary"]:
        lines.append(f"| {s['heads']} | {s['alpha']:g} | {ci(s['pref'])} | {ci(s['util'])} | "
                     f"{fmt(s['positive_preferred'])} |")
    b = d["best"]
    lines += ["", f"Rule: {d['rule']}: " + (f"K = {b['heads']}, alpha = {b['alpha']:g} (PrefOdds {ci(b['pref'])}, "
                                             f"UtilOdds {ci(b['util'])})." if b else "no setting passes.")]
    lines += ["", "Heads chosen (layer, head, ranking accuracy), K = the largest, per seed:"]
    top = max(d["heads"])
    for r in d["runs"]:
        if r["heads"] == top:
            lines.append(f"- seed {r['seed']}: " + ", ".join(f"{la}.{h} ({a:.2f})" for la, h, a in r["chosen"]))
    lines += ["", f"{len(d['seeds'])} seed(s) of {d.get('seeds_planned', len(d['seeds']))} planned, one concept, "
              f"{d['pairs']['validation']} validation pairs per seed: a reading of where the strength scale lies on "
              "this model, not a quality claim."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
