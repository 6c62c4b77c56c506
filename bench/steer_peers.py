#!/usr/bin/env python
"""Benchmark: malleable's steering-vector extraction and hooked generation against repeng 0.4.0 and
steering-vectors 0.12.2 (bench/setup_steering.sh makes their virtualenv, /work/steering-venv or $STEERING_VENV),
on SmolLM2-135M-Instruct and the same sentiment contrast pairs, on the CPU.

Extraction: each (tool, vector) runs in its own fresh process (bench/_steer_peers_worker.py), the runs interleaved
and their order rotated each repeat: load the checkpoint, read the last token of `prompt + completion` of the
training pairs on decoder layers 0..28 (repeng's hidden_states[layer + 1]; the last layer is left out because
hidden_states' last entry is after the final norm), batch 16 for every tool, and compute
- the mean difference: ours `caa` (read_position last) against steering-vectors' mean_aggregator;
- the PCA vector: ours `pca_diff` against repeng's pca_diff (its default); with --with-sv-pca also
  steering-vectors' pca_aggregator (an uncentred PCA of the +/- differences: a different formula, its cosine is
  reported, not expected to be 1).
The peers run transformers 4, which does not read the `rope_parameters` that transformers 5 writes into the
checkpoint's config; the worker hands them rope_theta (100000 for SmolLM2), else they would run another model.
`ours` is the extraction itself (steer.engine.collect + the method's formula); with --with-steer also
`ours_steer`, the whole `malleable steer` command, which also reads the validation pairs, fits a probe on every
layer and writes the report. Reported per run: the process's wall time (start to exit, as the driver sees it), the extraction's own
time, and the process's peak RSS (VmHWM from /proc/self/status at exit); medians over the repeats, and the
ratios ours / peer per repeat (paired by repeat: median and range).

Generation (after the first repeat): one process per tool, batch 1, greedy, exactly --new-tokens tokens, the unsteered model and the
steered one (ours: also the baked checkpoint and the PEFT adapter `steer-peft` writes) interleaved over --rounds
rounds after a warm-up, all steering the
same vectors (ours' mean difference, layers --gen-layers, strength --strength). Tokens/s and the per-round ratio
steered / unsteered, median.

Usage:
  bash bench/setup_steering.sh && python bench/steer_peers.py     # writes bench/results/steer_peers.{json,md}
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import fmt, loadavg, machine, thread_env, write_results  # noqa: E402

NAME = "steer_peers"
WORKER = HERE / "_steer_peers_worker.py"
RUNS = [("ours", "mean"), ("sv", "mean"), ("ours", "pca"), ("repeng", "pca")]
SV_PCA_RUNS = [("sv", "pca")]  # with --with-sv-pca: another formula (uncentred PCA), its cosine for information
STEER_RUNS = [("ours_steer", "mean"), ("ours_steer", "pca")]  # with --with-steer
# (ours, peer) pairs compared: the vector each reads
VERSUS = [("mean", "ours", "sv"), ("pca", "ours", "repeng")]
SV_PCA_VERSUS = [("pca", "ours", "sv")]
STEER_VERSUS = [("mean", "ours_steer", "sv"), ("pca", "ours_steer", "repeng")]
PROMPT = "Review of the film:"


def span(text: str) -> list[int]:
    a, b = (int(x) for x in text.split("-"))
    return list(range(a, b + 1))


def run_worker(tool: str, args: list[str], out: str, peer_python: str, threads: int) -> dict:
    python = sys.executable if tool.startswith("ours") else peer_python
    env = thread_env(threads) or dict(os.environ)
    if tool.startswith("ours"):
        env["PYTHONPATH"] = str(HERE.parent / "src")
    else:
        env.pop("PYTHONPATH", None)
    t = time.perf_counter()
    res = subprocess.run([python, str(WORKER), tool, *args], env=env, capture_output=True, text=True)
    wall = round(time.perf_counter() - t, 3)
    if res.returncode != 0:
        raise SystemExit(f"worker {tool} {args[:2]} failed:\n{res.stderr[-3000:]}")
    return json.loads(Path(out + ".json").read_text()) | {"process_wall_s": wall}


def cosines(a: dict, b: dict) -> dict:
    cos = [float(np.dot(a[k], b[k]) / (np.linalg.norm(a[k]) * np.linalg.norm(b[k]))) for k in sorted(a)]
    return {"min": min(cos), "median": statistics.median(cos), "per_layer": cos}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--limit", type=int, default=40, help="pairs in all (a fifth held out for validation)")
    ap.add_argument("--layers", default="0-28")
    ap.add_argument("--gen-layers", default="10-19")
    ap.add_argument("--strength", type=float, default=2.0)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-generation", action="store_true")
    ap.add_argument("--with-steer", action="store_true", help="also time the whole `malleable steer` command")
    ap.add_argument("--with-sv-pca", action="store_true", help="also steering-vectors' pca_aggregator")
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads of every tool's process (the same for "
                    "all; 1 keeps a shared, oversubscribed machine from making the timings meaningless)")
    args = ap.parse_args()
    peer_python = str(Path(os.environ.get("STEERING_VENV", "/work/steering-venv")) / "bin" / "python")
    if not Path(peer_python).is_file():
        raise SystemExit(f"{peer_python}: missing; run bench/setup_steering.sh first")

    from safetensors.numpy import load_file

    from malleable.data.steering import write_contrast_pairs
    from malleable.models.smollm2 import smollm2_checkpoint

    checkpoint = str(smollm2_checkpoint())
    layers = ",".join(map(str, span(args.layers)))
    load_before = loadavg()
    runs: list[dict] = []
    vectors: dict[tuple[str, str], dict] = {}
    generation: dict = {}
    configs = RUNS + (SV_PCA_RUNS if args.with_sv_pca else []) + (STEER_RUNS if args.with_steer else [])
    versus = VERSUS + (SV_PCA_VERSUS if args.with_sv_pca else []) + (STEER_VERSUS if args.with_steer else [])
    same = [("mean", "ours", "ours_steer"), ("pca", "ours", "ours_steer")] if args.with_steer else []
    peers = {"repeng": _peer_version("repeng", peer_python),
             "steering-vectors": _peer_version("steering-vectors", peer_python),
             "transformers (peers)": _peer_version("transformers", peer_python)}
    with tempfile.TemporaryDirectory() as tmp:
        files = write_contrast_pairs("sentiment", tmp, seed=args.seed, limit=args.limit)
        n_train = sum(1 for _ in open(files["train"]))
        for r in range(args.repeats):
            order = configs[r % len(configs):] + configs[:r % len(configs)]
            for tool, method in order:
                out = f"{tmp}/{tool}.{method}.{r}"
                info = run_worker(tool, ["extract", method, checkpoint, tmp, layers, out], out, peer_python,
                                  args.threads)
                runs.append({"repeat": r, "tool": tool, "vector": method, **info, "loadavg": loadavg()})
                vectors.setdefault((tool, method), {int(k.split(".")[1]): v
                                                    for k, v in load_file(out + ".safetensors").items()})
                print(f"repeat {r}: {tool} {method}: {info['process_wall_s']} s, {info['vmhwm_mb']} MB", flush=True)
            if r == 0 and not args.skip_generation:  # early, so that a run cut short still has it
                for tool in ("ours", "repeng", "sv"):
                    out = f"{tmp}/gen.{tool}"
                    generation[tool] = run_worker(tool, ["generate", f"{tmp}/ours.mean.0.safetensors", checkpoint,
                                                         PROMPT, ",".join(map(str, span(args.gen_layers))), out,
                                                         str(args.strength), str(args.new_tokens), str(args.rounds)],
                                                  out, peer_python, args.threads)
                    print(f"generation {tool}: {generation[tool]['tokens_per_s']}", flush=True)
            # written after every repeat: a run cut short keeps the repeats it finished
            cos = {f"{m}: {a} vs {b}": cosines(vectors[(a, m)], vectors[(b, m)]) for m, a, b in versus + same}
            data = {"benchmark": NAME, "model": "SmolLM2-135M-Instruct", "pairs": {"train": n_train},
                    "seed": args.seed, "layers": span(args.layers), "repeats": r + 1, "threads": args.threads,
                    "runs": runs, "summary": summarise(runs, configs), "ratios": ratios(runs, versus),
                    "cosine": cos, "generation": generation_summary(generation), "generation_settings": {
                        "layers": span(args.gen_layers), "strength": args.strength, "new_tokens": args.new_tokens,
                        "rounds": args.rounds, "prompt": PROMPT, "batch": 1},
                    "machine": machine(peers), "loadavg_before": load_before, "loadavg_after": loadavg()}
            write_results(NAME, data, markdown(data))


def _peer_version(dist: str, python: str) -> str | None:
    res = subprocess.run([python, "-c", f"import importlib.metadata as m; print(m.version('{dist}'))"],
                         capture_output=True, text=True)
    return res.stdout.strip() or None


KEYS = ("process_wall_s", "extract_s", "vmhwm_mb")


def summarise(runs: list[dict], configs: list[tuple[str, str]]) -> dict:
    out = {}
    for tool, method in configs:
        mine = [r for r in runs if r["tool"] == tool and r["vector"] == method]
        out[f"{tool} {method}"] = {k: statistics.median(r[k] for r in mine) for k in KEYS} | {"n": len(mine)}
    return out


def ratios(runs: list[dict], versus: list[tuple[str, str, str]]) -> dict:
    """ours / peer per repeat (paired by repeat), for each compared pair and measure: median, min, max."""
    by = {(r["repeat"], r["tool"], r["vector"]): r for r in runs}
    repeats = sorted({r["repeat"] for r in runs})
    out = {}
    for m, a, b in versus:
        out[f"{m}: {a} / {b}"] = {}
        for k in KEYS:
            xs = [by[(r, a, m)][k] / by[(r, b, m)][k] for r in repeats]
            out[f"{m}: {a} / {b}"][k] = {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}
    return out


def generation_summary(gen: dict) -> dict:
    out = {}
    for tool, info in gen.items():
        per = info["tokens_per_s"]
        base = per["unsteered"]
        out[tool] = {"tokens_per_s": {k: statistics.median(v) for k, v in per.items()},
                     "ratio_to_unsteered": {k: {"median": statistics.median(a / b for a, b in zip(v, base)),
                                                "min": min(a / b for a, b in zip(v, base)),
                                                "max": max(a / b for a, b in zip(v, base))}
                                            for k, v in per.items() if k != "unsteered"},
                     "per_round": per, "vmhwm_mb": info["vmhwm_mb"], "threads": info["threads"]}
    return out


def markdown(d: dict) -> str:
    mc = d["machine"]
    v = mc["versions"]
    lines = [f"# steer vs repeng and steering-vectors on {d['model']} (CPU)", "",
             f"{d['pairs']['train']} training sentiment pairs (data.steering, seed {d['seed']}); layers "
             f"{d['layers'][0]}..{d['layers'][-1]}, last token, batch 16, {d['threads']} thread(s) per process; "
             f"{d['repeats']} repeats, each tool in its own fresh process, interleaved with the order rotated per repeat. repeng "
             f"{v.get('repeng')}, steering-vectors {v.get('steering-vectors')} (transformers "
             f"{v.get('transformers (peers)')}; ours {v.get('transformers')}).", "",
             f"Machine: {mc.get('cpu', mc)}; load average {d['loadavg_before']} before, {d['loadavg_after']} after "
             "(the machine is shared: other jobs ran beside this one).", "",
             "## Extraction: medians over repeats", "",
             "| tool | vector | process wall s | extraction s | peak RSS MB |", "|---|---|---|---|---|"]
    for key, s in d["summary"].items():
        tool, vec = key.split()
        lines.append(f"| {tool} | {vec} | {fmt(s['process_wall_s'])} | {fmt(s['extract_s'])} | "
                     f"{fmt(s['vmhwm_mb'], 0)} |")
    lines += ["", "Ratios ours / peer, paired by repeat: median [min, max] (below 1: ours is faster / smaller).", "",
              "| comparison | process wall | extraction | peak RSS |", "|---|---|---|---|"]
    for key, r in d["ratios"].items():
        lines.append(f"| {key} | " + " | ".join(f"{fmt(r[k]['median'])} [{fmt(r[k]['min'])}, {fmt(r[k]['max'])}]"
                                               for k in KEYS) + " |")
    lines += ["", "## Cosine of the vectors, per layer (min / median over layers)", "",
              "| vectors | min | median |", "|---|---|---|"]
    for key, c in d["cosine"].items():
        lines.append(f"| {key} | {c['min']:.6f} | {c['median']:.6f} |")
    if any("ours vs sv" in k and k.startswith("pca") for k in d["cosine"]):
        lines += ["", "steering-vectors' pca_aggregator is an uncentred PCA of the +/- pair differences; ours and "
                  "repeng's pca_diff centre the differences first, so that row measures two formulas, not one."]
    if not d["generation"]:
        lines += ["", "Generation throughput: not measured in this run (--skip-generation)."]
    if d["generation"]:
        g = d["generation_settings"]
        lines += ["", f"## Generation throughput (batch 1, greedy, {g['new_tokens']} new tokens, layers "
                  f"{g['layers'][0]}..{g['layers'][-1]} steered at strength {g['strength']:g}, {g['rounds']} "
                  "interleaved rounds after a warm-up)", "",
                  "| tool | unsteered tok/s | steered tok/s | steered / unsteered | baked tok/s | baked / unsteered | "
                  "PEFT adapter tok/s | PEFT adapter / unsteered |", "|---|---|---|---|---|---|---|---|"]
        for tool, s in d["generation"].items():
            t, r = s["tokens_per_s"], s["ratio_to_unsteered"]

            def cell(k, r=r):
                return f"{fmt(r[k]['median'], 3)} [{fmt(r[k]['min'], 3)}, {fmt(r[k]['max'], 3)}]" if k in r else "-"

            lines.append(f"| {tool} | {fmt(t['unsteered'], 1)} | {fmt(t['steered'], 1)} | {cell('steered')} | "
                         f"{fmt(t.get('baked'), 1) if 'baked' in t else '-'} | {cell('baked')} | "
                         f"{fmt(t.get('peft'), 1) if 'peft' in t else '-'} | {cell('peft')} |")
        lines += ["", "Each tool's unsteered baseline is its own process and transformers version (ours 5.x, the "
                  "peers 4.x): compare the ratios across tools, the absolute tokens/s only within a row."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
