"""`malleable slim` against llm-compressor (issue 16): Wanda and SparseGPT at 50% unstructured and 2:4 on
SmolLM2-135M-Instruct, the same calibration token ids for both tools.

* Calibration: `data/corpus.random_windows` of gensim's lee_background (the windows `malleable slim` draws from
  its recipe), handed to llm-compressor as a tokenised dataset, unshuffled, so both tools calibrate on the same
  ids. Both prune the Linear modules of the decoder layers, layer after layer on the already pruned layers'
  outputs (llm-compressor's sequential pipeline), embeddings and lm_head dense (llm-compressor: `ignore:
  [lm_head]`).
* Compared: the zero masks of every pruned module (share of mask entries that agree, and modules whose masks are
  identical); perplexity on held-out text (gensim's lee, consecutive 128-token windows) of both outputs, as a
  ratio; the pruning call's seconds (malleable: the report's `seconds.slim`; llm-compressor: its `oneshot` call)
  and the peak RSS of each tool's process (each runs in a fresh process: `python -m malleable slim` and
  bench/_llmcompressor_worker.py in llm-compressor's own virtualenv, bench/setup_llmcompressor.sh; it pins
  transformers <= 5.17). Repeats run interleaved (ours, theirs, ours, ...); time and RSS are medians.
* llm-compressor 0.14's Wanda zeroes exactly `int(columns * sparsity)` per row, as ours; SparseGPT's threshold
  and ours may differ on ties (ours zeroes exactly the requested count).

* Teacher-forced check (`--teacher-forced`, on llm-compressor's stored outputs, no tool re-run): for every
  decoder layer i, malleable's method prunes the DENSE layer i calibrated on the inputs that llm-compressor's
  pruned layers 0..i-1 produce (its weights loaded into the model), and the masks are compared with
  llm-compressor's layer i. The full run compares two chains that each prune on their own pruned outputs, so one
  near-tie decided differently early on changes every later layer's inputs; this check separates that
  propagation from a per-layer difference in the rule.

* Rounding floor (`--rounding-floor`): malleable against itself, calibrated in batches of 8 and of 1 (the same
  math; only the float rounding of the forward passes differs), compared exactly as the two tools are: how far
  two runs of one correct implementation drift apart through the chain.

    python bench/slim_vs_llmcompressor.py [--repeats 3] [--only wanda-50]   # --only keeps the other rows
    python bench/slim_vs_llmcompressor.py --teacher-forced [--only wanda-50]  # adds the check to the stored rows
    python bench/slim_vs_llmcompressor.py --rounding-floor [--only wanda-50]  # likewise
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from _common import RESULTS_DIR, loadavg, machine, write_results  # noqa: E402

CONFIGS = {"wanda-50": ("wanda", {"sparsity": 0.5}, "0:0"), "wanda-2:4": ("wanda", {"pattern": "2:4"}, "2:4"),
           "sparsegpt-50": ("sparsegpt", {"sparsity": 0.5}, "0:0"),
           "sparsegpt-2:4": ("sparsegpt", {"pattern": "2:4"}, "2:4")}
CALIBRATION = {"source": "lee_background", "n_samples": 16, "seq_len": 128, "batch_size": 8,
               "chat_template": "off"}  # plain windows: llm-compressor gets these same ids
EVAL_SEQ, EVAL_WINDOWS = 128, 16
VENV = Path(os.environ.get("LLMCOMPRESSOR_VENV", "/work/llmcompressor-venv"))
WORK = Path(os.environ.get("MALLEABLE_BENCH_CACHE", "/work/bench-cache")) / "slim_vs_llmcompressor"


def ours(model_dir: Path, method: str, params: dict, out: Path, batch_size: int | None = None) -> dict:
    recipe = WORK / f"{out.name}.yaml"
    calibration = CALIBRATION | ({"batch_size": batch_size} if batch_size else {})
    recipe.write_text(json.dumps({"model": str(model_dir), "method": method, "parameters": params,
                                  "calibration": calibration, "evaluate": None, "seed": 0}))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    subprocess.run([sys.executable, "-m", "malleable", "slim", str(recipe), str(out), "--force", "-q"], env=env,
                   check=True, capture_output=True, text=True)
    report = json.loads((out / "report.json").read_text())
    return {"seconds": report["seconds"]["slim"], "peak_rss_mib": report["peak_rss_mb"]}


def theirs(model_dir: Path, method: str, structure: str, sparsity: float, samples: list, out: Path) -> dict:
    job = {"model": str(model_dir), "method": method, "sparsity": sparsity, "mask_structure": structure,
           "samples": samples, "out": str(out), "threads": torch.get_num_threads(),
           "parameters": {"ignore": ["lm_head"]}}
    done = subprocess.run([str(VENV / "bin" / "python"), str(Path(__file__).with_name("_llmcompressor_worker.py"))],
                          input=json.dumps(job), capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def compare(model_dir: Path, ours_dir: Path, theirs_file: Path, held_out: torch.Tensor) -> dict:
    from safetensors.torch import load_file

    from malleable.evaluate.perplexity import perplexity, window_nll
    from malleable.models.checkpoints import load_model

    mine = load_model(ours_dir, "causal_lm", None)
    if theirs_file.is_dir():  # another malleable run (the rounding floor)
        other = load_model(theirs_file, "causal_lm", None).state_dict()
        theirs_file = WORK / f"{theirs_file.name}.safetensors"
        save_file({n: w for n, w in other.items() if n.startswith("model.layers.") and w.dim() == 2},
                  str(theirs_file))
    pruned = load_file(theirs_file)
    agree = total = same_modules = 0
    state = mine.state_dict()
    for name, w in pruned.items():
        a, b = state[name] == 0, w == 0
        agree += int((a == b).sum())
        total += a.numel()
        same_modules += int(bool((a == b).all()))
    ppl_ours = perplexity(window_nll(mine, held_out), EVAL_SEQ)
    theirs_model = load_model(model_dir, "causal_lm", None)
    theirs_model.load_state_dict({**theirs_model.state_dict(), **pruned})
    ppl_theirs = perplexity(window_nll(theirs_model, held_out), EVAL_SEQ)
    zeros = sum(int((w == 0).sum()) for w in pruned.values()) / sum(w.numel() for w in pruned.values())
    return {"mask_agreement": agree / total, "modules": len(pruned), "modules_identical": same_modules,
            "sparsity_theirs": zeros, "ppl_ours": ppl_ours, "ppl_theirs": ppl_theirs,
            "ppl_ratio": ppl_ours / ppl_theirs}


def teacher_forced(model_dir: Path, name: str, samples: torch.Tensor) -> dict:
    """Per layer: malleable's method on the dense layer, calibrated on llm-compressor's pruned chain's inputs, against
    llm-compressor's mask of that layer (see the module docstring)."""
    from safetensors.torch import load_file

    from malleable.models.checkpoints import load_model
    from malleable.slim.engine import decoder_path, first_inputs, input_stats, run_layer, targets
    from malleable.slim.registry import get_method

    method_name, params, _ = CONFIGS[name]
    method = get_method(method_name, params)
    theirs = load_file(WORK / f"theirs-{name}.safetensors")
    model = load_model(model_dir, "causal_lm", None)
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict({**model.state_dict(), **theirs})
    layers, chosen = model.get_submodule(decoder_path(model)), targets(model, [])
    inputs = first_inputs(model, layers, samples, CALIBRATION["batch_size"])
    per_layer, identical = [], 0
    for i in range(len(layers)):
        modules = chosen[i]
        for n, lin in modules.items():  # layer i dense while it is calibrated, as in both tools' chains
            lin.weight.data.copy_(dense[n + ".weight"])
        stats = input_stats(layers[i], modules, method.stats, inputs, len(samples))
        differ = 0
        for n, lin in modules.items():
            mine = method.prune(lin.weight.detach().float(), stats[n], method.pattern) == 0
            d = int((mine != (theirs[n + ".weight"] == 0)).sum())
            differ, identical = differ + d, identical + (d == 0)
            lin.weight.data.copy_(theirs[n + ".weight"])
        per_layer.append(differ)
        inputs = run_layer(layers[i], inputs)
    entries = sum(theirs[n + ".weight"].numel() for mods in chosen.values() for n in mods)
    return {"entries_differing": sum(per_layer), "entries": entries, "modules_identical": identical,
            "modules": sum(len(m) for m in chosen.values()), "per_layer": per_layer}


def markdown(r: dict) -> str:
    lines = ["# slim against llm-compressor: Wanda and SparseGPT on SmolLM2-135M-Instruct", "",
             f"llm-compressor {r['llmcompressor']} (its own virtualenv, transformers {r['transformers_theirs']}); "
             f"calibration {r['calibration']['n_samples']} windows of {r['calibration']['seq_len']} tokens of "
             f"lee_background, the same ids for both; perplexity on {EVAL_WINDOWS} windows of {EVAL_SEQ} tokens of "
             "lee (held out). Repeats (interleaved, per tool) in the table; time = the pruning call, RSS = the "
             "process's peak; medians. Method: the docstring of bench/slim_vs_llmcompressor.py.", "",
             "| config | repeats | mask entries agreeing | modules identical | ppl malleable | ppl llm-compressor | ppl ratio | "
             "time malleable s | time llm-compressor s | time ratio (ours / theirs) | peak RSS malleable MiB | "
             "peak RSS llm-compressor MiB | RSS ratio |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, c in r["configs"].items():
        lines.append(f"| {name} | {len(c['runs']['ours'])} | {c['mask_agreement']:.6f} | {c['modules_identical']}/{c['modules']} | "
                     f"{c['ppl_ours']:.2f} | {c['ppl_theirs']:.2f} | {c['ppl_ratio']:.4f} | {c['seconds_ours']:.1f} | "
                     f"{c['seconds_theirs']:.1f} | {c['seconds_ours'] / c['seconds_theirs']:.2f} | "
                     f"{c['rss_ours']:.0f} | {c['rss_theirs']:.0f} | {c['rss_ours'] / c['rss_theirs']:.2f} |")
    forced = {name: c["teacher_forced"] for name, c in r["configs"].items() if "teacher_forced" in c}
    if forced:
        lines += ["", "Teacher-forced (each layer calibrated on llm-compressor's pruned chain, see the docstring):", "",
                  "| config | mask entries differing | of | modules identical | layers with a difference |",
                  "|---|---:|---:|---:|---|"]
        for name, t in forced.items():
            hit = [(i, d) for i, d in enumerate(t["per_layer"]) if d]
            where = (", ".join(f"{i} ({d})" for i, d in hit) or "none") if len(hit) <= 6 else (
                f"{len(hit)} of {len(t['per_layer'])} (most: {max(hit, key=lambda x: x[1])[1]} in layer "
                f"{max(hit, key=lambda x: x[1])[0]})")
            lines.append(f"| {name} | {t['entries_differing']} | {t['entries']} | "
                         f"{t['modules_identical']}/{t['modules']} | {where} |")
    floor = {name: c["rounding_floor"] for name, c in r["configs"].items() if "rounding_floor" in c}
    if floor:
        lines += ["", "Rounding floor (malleable against itself: calibration in batches of 8 vs 1, the same math with "
                  "other float rounding; compared as the two tools are):", "",
                  "| config | mask entries agreeing | modules identical | ppl batches of 8 | ppl batches of 1 | "
                  "ppl ratio |", "|---|---:|---:|---:|---:|---:|"]
        for name, f in floor.items():
            lines.append(f"| {name} | {f['mask_agreement']:.6f} | {f['modules_identical']}/{f['modules']} | "
                         f"{f['ppl_ours']:.2f} | {f['ppl_theirs']:.2f} | {f['ppl_ratio']:.4f} |")
    m = r["machine"]
    lines += ["", "Targets (issue 16): Wanda masks equal, SparseGPT perplexity within 1%, malleable's time and peak "
              "RSS <= 1.0x llm-compressor's.", "",
              f"Machine: {m['cpu']}, {m['cores']} cores, shared; load average {r['loadavg_start']} at the start, "
              f"{r['loadavg_end']} at the end; wall {r['wall_s']} s."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--only", default=None, help="comma-separated configuration names")
    ap.add_argument("--rounding-floor", action="store_true",
                    help="only malleable twice (calibration batches of 8 and of 1: the same math, other float "
                         "rounding), compared as the two tools are; added to the stored results")
    ap.add_argument("--teacher-forced", action="store_true",
                    help="only the per-layer check on llm-compressor's stored outputs, added to the stored results")
    args = ap.parse_args(argv)
    if not (VENV / "bin" / "python").is_file():
        sys.exit(f"no llm-compressor virtualenv at {VENV}: run bench/setup_llmcompressor.sh")
    from malleable.data.corpus import consecutive_windows, random_windows
    from malleable.models.checkpoints import load_tokenizer
    from malleable.models.smollm2 import smollm2_checkpoint

    start, load_start = time.perf_counter(), loadavg()
    WORK.mkdir(parents=True, exist_ok=True)
    model_dir = smollm2_checkpoint()
    tok = load_tokenizer(model_dir)
    samples = random_windows(tok, CALIBRATION["source"], CALIBRATION["n_samples"], CALIBRATION["seq_len"], 0)
    held_out = consecutive_windows(tok, "lee", EVAL_SEQ, EVAL_WINDOWS)
    names = args.only.split(",") if args.only else list(CONFIGS)
    if args.rounding_floor:
        stored = json.loads((RESULTS_DIR / "slim_vs_llmcompressor.json").read_text())
        for name in names:
            method, params, _ = CONFIGS[name]
            ours(model_dir, method, params, WORK / f"ours-{name}")
            ours(model_dir, method, params, WORK / f"ours-{name}-batch1", batch_size=1)
            floor = compare(model_dir, WORK / f"ours-{name}", WORK / f"ours-{name}-batch1", held_out)
            stored["configs"][name]["rounding_floor"] = {k: floor[k] for k in (
                "mask_agreement", "modules_identical", "modules", "ppl_ours", "ppl_theirs", "ppl_ratio")}
            print(name, stored["configs"][name]["rounding_floor"], flush=True)
        write_results("slim_vs_llmcompressor", stored, markdown(stored))
        return 0
    if args.teacher_forced:
        stored = json.loads((RESULTS_DIR / "slim_vs_llmcompressor.json").read_text())
        for name in names:
            stored["configs"][name]["teacher_forced"] = teacher_forced(model_dir, name, samples)
            print(name, {k: v for k, v in stored["configs"][name]["teacher_forced"].items() if k != "per_layer"},
                  flush=True)
        write_results("slim_vs_llmcompressor", stored, markdown(stored))
        return 0
    previous = RESULTS_DIR / "slim_vs_llmcompressor.json"  # configurations not run again are kept
    configs = json.loads(previous.read_text())["configs"] if args.only and previous.is_file() else {}
    info: dict = {}
    for name in names:
        method, params, structure = CONFIGS[name]
        runs = {"ours": [], "theirs": []}
        for rep in range(args.repeats):
            runs["ours"].append(ours(model_dir, method, params, WORK / f"ours-{name}"))
            info = theirs(model_dir, method, structure, params.get("sparsity", 0.5), samples.tolist(),
                          WORK / f"theirs-{name}.safetensors")
            runs["theirs"].append(info)
            print(f"{name} repeat {rep}: ours {runs['ours'][-1]}, theirs {info}", flush=True)
        configs[name] = {**compare(model_dir, WORK / f"ours-{name}", WORK / f"theirs-{name}.safetensors", held_out),
                         "seconds_ours": statistics.median(x["seconds"] for x in runs["ours"]),
                         "seconds_theirs": statistics.median(x["seconds"] for x in runs["theirs"]),
                         "rss_ours": statistics.median(x["peak_rss_mib"] for x in runs["ours"]),
                         "rss_theirs": statistics.median(x["peak_rss_mib"] for x in runs["theirs"]), "runs": runs}
    version = subprocess.run([str(VENV / "bin" / "python"), "-c",
                              "import importlib.metadata as m; print(m.version('llmcompressor'))"],
                             capture_output=True, text=True).stdout.strip()
    result = {"schema": "malleable.bench.slim_vs_llmcompressor/1", "calibration": CALIBRATION,
              "configs": configs, "llmcompressor": version,
              "transformers_theirs": info.get("transformers", "5.17.0"), "machine": machine(), "loadavg_start": load_start,
              "loadavg_end": loadavg(), "wall_s": round(time.perf_counter() - start, 1)}
    write_results("slim_vs_llmcompressor", result, markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
