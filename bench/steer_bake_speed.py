"""The baked steering checkpoint's generation speed as users run it: `malleable steer-bake`'s output and the plain
checkpoint, each loaded with plain `from_pretrained` in a fresh process, decode tokens/s paired round by round.

Arms, each a checkpoint folder on disk:
- `plain`: SmolLM2-135M-Instruct as `smollm2_checkpoint()` writes it;
- `plain_again`: the same folder in another process (the A/A control: how far two processes of one checkpoint
  differ on this machine, which bounds what any ratio below can resolve);
- `baked_zero`: the CAA vector baked at strength 0 (config `mlp_bias: true`, every bias zero): the cost of the
  biases' structure alone, with the plain model's outputs;
- `baked`: the CAA vector baked at strength 2 on layers 10-19 (the steer_peers bench's generation settings).

One round runs every arm once, each in its own process, in an order shuffled per round (seeded); a process
loads the checkpoint, runs one untimed warm-up, then `--runs` greedy runs of a 128-token prompt and 32 new
tokens through the KV cache (batch 1, one torch thread) and reports the median decode tokens/s. Reported: per
arm, the median over rounds of arm / plain in the same round, with a 95% bootstrap interval of that median
(2,000 resamples over rounds, seed 0), and how many rounds it was slower.

    python bench/steer_bake_speed.py [--rounds 15] [--runs 5]

Writes bench/results/steer_bake_speed.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _common import boot_median, fmt, loadavg, machine, thread_env, write_results  # noqa: E402

NAME = "steer_bake_speed"
ARMS = ("plain", "plain_again", "baked_zero", "baked")
LAYERS = list(range(10, 20))
STRENGTH = 2.0


def worker(folder: str, runs: int, new_tokens: int) -> None:
    """One process: plain transformers, as a user of the baked checkpoint runs it; prints the JSON result."""
    import torch
    from transformers import AutoModelForCausalLM

    from malleable.data.corpus import tokens
    from malleable.evaluate.perplexity import time_generation
    from malleable.models.checkpoints import load_tokenizer

    torch.set_num_threads(1)
    t = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    load_s = time.perf_counter() - t
    prompt = tokens(load_tokenizer(folder), "lee", 128)[:128].unsqueeze(0)
    with torch.no_grad():
        time_generation(model, prompt, 2)
        decode = [new_tokens / time_generation(model, prompt, new_tokens)[1] for _ in range(runs)]
    print(json.dumps({"decode_tokens_per_s": statistics.median(decode), "runs": decode, "load_s": load_s,
                      "mlp_bias": bool(getattr(model.config, "mlp_bias", False))}))


def build(work: Path, seed: int) -> dict[str, str]:
    """The checkpoints of every arm (the baked ones made now from a CAA artefact on the sentiment pairs)."""
    from malleable.api import steer
    from malleable.data.steering import write_contrast_pairs
    from malleable.models.smollm2 import smollm2_checkpoint
    from malleable.steer.apply import bake

    plain = str(smollm2_checkpoint())
    files = write_contrast_pairs("sentiment", work, seed=seed, limit=40)
    steer({"model": plain, "method": "caa", "layers": LAYERS, "read_position": "last", "batch_size": 16,
           "data": {"train": str(files["train"]), "validation": str(files["validation"])}}, work / "caa",
          force=True, progress=False)
    bake(work / "caa", plain, work / "baked", strength=STRENGTH, force=True)
    bake(work / "caa", plain, work / "baked_zero", strength=0.0, force=True)
    return {"plain": plain, "plain_again": plain, "baked_zero": str(work / "baked_zero"),
            "baked": str(work / "baked")}


def summary(rounds: list[dict]) -> dict:
    out = {}
    for arm in ARMS[1:]:
        r = [x[arm]["decode_tokens_per_s"] / x["plain"]["decode_tokens_per_s"] for x in rounds]
        out[arm] = {"ratio_median": statistics.median(r), "ratio_ci95": boot_median(r),
                    "slower_rounds": sum(v < 1 for v in r), "ratios": r}
    out["plain_tokens_per_s"] = statistics.median(x["plain"]["decode_tokens_per_s"] for x in rounds)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--runs", type=int, default=5, help="timed runs per process (their median is its reading)")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker, args.runs, args.new_tokens)
    env = thread_env(1)
    env["PYTHONPATH"] = str(HERE.parent / "src")
    rng = random.Random(args.seed)
    rounds: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        folders = build(Path(tmp), args.seed)
        before = loadavg()
        for r in range(args.rounds):
            order = list(ARMS)
            rng.shuffle(order)
            row = {"order": order, "loadavg": loadavg()}
            for arm in order:
                res = subprocess.run([sys.executable, __file__, "--worker", folders[arm], "--runs", str(args.runs),
                                      "--new-tokens", str(args.new_tokens)], env=env, capture_output=True, text=True)
                if res.returncode:
                    raise SystemExit(f"worker {arm} failed:\n{res.stderr[-3000:]}")
                row[arm] = json.loads(res.stdout.strip().splitlines()[-1])
            rounds.append(row)
            print(f"round {r}: " + ", ".join(f"{a} {row[a]['decode_tokens_per_s']:.2f}" for a in ARMS), flush=True)
            data = {"benchmark": NAME, "model": "SmolLM2-135M-Instruct (float32)", "layers": LAYERS,
                    "strength": STRENGTH, "settings": {"prompt_tokens": 128, "new_tokens": args.new_tokens,
                                                       "runs_per_process": args.runs, "threads": 1, "batch": 1,
                                                       "seed": args.seed},
                    "rounds": rounds, "summary": summary(rounds), "machine": machine(),
                    "loadavg_before": before, "loadavg_after": loadavg()}
            write_results(NAME, data, markdown(data))


def markdown(d: dict) -> str:
    s, st = d["summary"], d["settings"]
    lines = ["# The baked steering checkpoint's decode speed, as users run it", "",
             f"SmolLM2-135M-Instruct; `malleable steer-bake` of a CAA vector on layers {d['layers'][0]}-"
             f"{d['layers'][-1]} (sentiment pairs, seed {st['seed']}) at strength {d['strength']:g}, and at 0. Each "
             "checkpoint loaded with plain `from_pretrained` in its own process, arms shuffled per round; a process "
             f"times {st['runs_per_process']} greedy runs (batch 1, a {st['prompt_tokens']}-token prompt, "
             f"{st['new_tokens']} new tokens through the KV cache, {st['threads']} thread) after a warm-up and "
             f"reports their median. {len(d['rounds'])} rounds; plain decodes at "
             f"{fmt(s['plain_tokens_per_s'], 1)} tokens/s (median).", "",
             "| arm | what | decode tok/s vs plain, same round: median [95% bootstrap CI] | rounds slower |",
             "|---|---|---|---|"]
    what = {"plain_again": "the plain checkpoint again, another process (A/A control)",
            "baked_zero": "baked at strength 0: `mlp_bias` on, every bias zero",
            "baked": f"baked at strength {d['strength']:g}"}
    for arm in ARMS[1:]:
        a = s[arm]
        lo, hi = a["ratio_ci95"]
        lines.append(f"| {arm} | {what[arm]} | {fmt(a['ratio_median'], 3)} [{fmt(lo, 3)}, {fmt(hi, 3)}] | "
                     f"{a['slower_rounds']} of {len(a['ratios'])} |")
    m = d["machine"]
    lines += ["", f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['versions']['torch']}; load average (1 min) "
              f"{d['loadavg_before'][0]} before the rounds, {d['loadavg_after'][0]} after."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
