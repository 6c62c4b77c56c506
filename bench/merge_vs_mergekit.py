#!/usr/bin/env python
"""Benchmark 1: full-model merge, malleable against mergekit 0.1.5, on the same mergekit YAML recipes.

Both tools run as subprocesses on the SAME recipe file:

    mergekit-yaml RECIPE OUT --no-copy-tokenizer --random-seed 0 --quiet      (from its own venv)
    malleable merge RECIPE OUT -q

under `/usr/bin/time -f "%e %M"` (wall seconds, max RSS of the largest process in the tree). Median over
`--repeats` runs, the two tools alternating which goes first. Then the two outputs are compared tensor by
tensor in float32.

Input sets (generated once into --cache, outside the repo):
  smollm2    the real SmolLM2-135M-Instruct (fp32, tied embeddings) + 3 seeded structured "fine-tunes"
  synthetic  a sharded synthetic Llama (bf16, ~1.2B params, ~2.4 GB per checkpoint, 500 MB shards) + 3 inputs

Usage:
  bench/setup_mergekit.sh                       # once: mergekit 0.1.5 in /work/mergekit-venv
  python bench/merge_vs_mergekit.py             # full run, writes bench/results/merge_vs_mergekit.{json,md}
  python bench/merge_vs_mergekit.py --quick     # smoke: small synthetic model, 1 repeat, results/..._quick.*
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _checkpoints import smollm2_base, smollm2_finetunes, synthetic_family  # noqa: E402
from _common import (_version, drop_into_page_cache, fmt, loadavg, machine, median, ratio,  # noqa: E402
                     thread_env, timed_run, write_results)

SEEDS = [1, 2, 3]
WEIGHTS = [0.5, 0.3, 0.2]
TIES_DENSITY = [0.5, 0.5, 0.7]
DARE_DENSITY = [0.5, 0.5, 0.5]
# every mergekit method malleable reads: (needs base_model, inputs used, per-model parameters (i -> dict), global
# parameters); the fine-tunes are the inputs, base_model as mergekit takes it
_WD = lambda d: lambda i: {"weight": WEIGHTS[i], "density": d[i]}  # noqa: E731
_W = lambda i: {"weight": WEIGHTS[i]}  # noqa: E731
_NONE = lambda i: {}  # noqa: E731
SPECS = {
    "linear": (False, 3, _W, {}),
    "task_arithmetic": (True, 3, _W, {}),
    "ties": (True, 3, _WD(TIES_DENSITY), {}),
    "dare_ties": (True, 3, _WD(DARE_DENSITY), {}),
    "dare_linear": (True, 3, _WD(DARE_DENSITY), {}),
    "breadcrumbs": (True, 3, _WD(TIES_DENSITY), {"gamma": 0.01}),
    "breadcrumbs_ties": (True, 3, _WD(TIES_DENSITY), {"gamma": 0.01}),
    "della": (True, 3, _WD(TIES_DENSITY), {"epsilon": 0.1}),
    "della_linear": (True, 3, _WD(TIES_DENSITY), {"epsilon": 0.1}),
    "sce": (True, 3, _NONE, {"select_topk": 0.5}),
    "model_stock": (True, 3, _NONE, {}),
    "ram": (True, 3, _NONE, {}),
    "ramplus_tl": (True, 3, _NONE, {}),
    "slerp": (True, 1, _NONE, {"t": 0.4}),
    "nearswap": (True, 1, _NONE, {"t": 0.001}),
    "arcee_fusion": (True, 1, _NONE, {}),
    "nuslerp": (True, 2, _W, {}),
    "multislerp": (True, 3, _W, {}),
    "karcher": (False, 3, _NONE, {}),
    "passthrough": (False, 1, _NONE, {}),
}
METHODS = ["linear", "ties", "dare_ties"]  # the default run; --methods all runs every entry of SPECS
RANDOM = {"dare_ties", "dare_linear", "della", "della_linear"}  # random masks in both tools: not comparable
NOTES = [
    "Machine load: the box is shared with other jobs (other engineers' test suites); `loadavg_1min_before` is "
    "recorded for every run in the JSON. Alternating the order and taking medians reduces, but does not remove, "
    "that noise.",
    "Both tools' times include interpreter start-up and imports (several seconds each on this machine); "
    "malleable's also include SHA-256 hashing of every input file for report.json.",
    "ties: mergekit keeps the top-k |delta| entries by `argsort`, malleable by a threshold (the k-th largest "
    "|delta|, by radix selection) keeping entries tied at it in flattened order; where several entries tie "
    "exactly at the k-th magnitude the two may keep different ones. `bench/ties_tiebreak_check.py` re-runs both "
    "rules in-process on every SmolLM2 tensor: every differing element sits exactly at the k-th magnitude of an "
    "input's task vector (no sign-election or normalisation differences). bf16 inputs make such ties common: "
    "torch's topk and argsort happen to break them almost alike (v1, topk: 1,438 differing elements of 1.14B), "
    "malleable's flattened order does not (v2: ~3.8% of the elements). Checked on one bf16 up_proj task vector "
    "(density 0.5): 687,596 of 16.8M kept/dropped decisions differ, every one at the k-th magnitude, both keep k.",
    "dare_ties: masks are random in both tools (different RNG streams), and mergekit rescales the kept entries to "
    "the input's L1 norm while malleable rescales by 1/density; the outputs are not comparable element-wise.",
    "Peak RSS counts resident file-backed pages of mmap'd inputs, for both tools alike.",
    "v3 (`merge_vs_mergekit_v3_smollm2`, every method both tools have, SmolLM2 only): the 2-core box ran other "
    "helpers' benchmarks and test suites throughout (load average 5-15, recorded per run), which slows both tools "
    "and makes single times noisy; the ratios come from interleaved runs. Methods the run did not reach before the "
    "session's deadline are listed under `not_run` in the JSON. ties and dare_ties are in v2.",
    "v3 differences: slerp differs in nearly every element by up to 2.8e-5: the angle between two nearly parallel "
    "tensors (fine-tunes 5% off the base) comes from a float32 dot product over up to 28M entries that the tools "
    "sum in different orders, and acos amplifies the difference (by about 1/sin(theta)); task_arithmetic, "
    "model_stock and multislerp differ by float32 rounding of sums (max 5e-7). ram, ramplus_tl, nearswap, nuslerp, "
    "linear and passthrough are bit-identical.",
    "v3 where malleable is not faster: multislerp (1.07x) and karcher (1.37x) loop over the inputs with "
    "full-size temporaries (a unit copy, a tangent term, per input, per iteration for karcher) where mergekit "
    "stacks the inputs and runs one vectorised kernel; nuslerp (0.90x) builds two normalised copies and the "
    "collinear fallback for every element. Not profiled in this session: these are read from the code; the "
    "memory ratio stays 0.35-0.40x. arcee_fusion (about 1.15x) sorts every entry of each tensor's importance "
    "scores to find its quartiles (28M entries for the embedding), where mergekit estimates them from 1M sampled "
    "entries; that is also why the two outputs differ on tensors of more than 1M entries.",
    "v3b (`merge_vs_mergekit_v3b_smollm2`, git 5af951d; adds to v3, does not replace it: karcher, arcee_fusion "
    "and multislerp re-timed after the fix below, and the five methods v3 did not reach). Profiled on one "
    "49152x576 float32 tensor, 1 thread: a fresh full-size tensor costs ~185 ms (page faults of new memory) "
    "against ~31 ms for the same op in place, and torch.sort of the 28M importance scores ~11 s. karcher "
    "(mergekit's code also loops over the inputs; the v3 note above was wrong there) and multislerp now run "
    "the same operations in the same order in place with one scratch buffer (1.6 -> 0.8 s and 4.9 -> 1.5 s on "
    "that tensor, bit-identical to the v3 code); arcee_fusion computes the same operations in place and finds "
    "its exact quartiles by radix selection (a 16-bit histogram of an order-preserving key, then kthvalue on "
    "one bucket) instead of a full sort (13.7 -> 2.0 s, bit-identical). The v3b box load (~4) was lower than "
    "v3's (5-15): both tools ran faster, so compare ratios, not seconds, across the two files.",
    "Where malleable's linear time goes (cProfile of one synthetic linear run, 1 thread, box load varying): before "
    "v2, 27 s inside the engine, of which 6.8 s bf16 -> fp32 conversion into fresh tensors and 6.5 s `readinto` "
    "into fresh buffers (mostly page faults of new allocations) and 5.7 s writing; with reused buffers 17 s, of "
    "which 7.6 s writing (this disk's write speed varies 0.3-1.2 GB/s), 2.6 s conversion, 2.0 s reading, 1.3 s "
    "finite checks. Then the write moved to a thread (overlapping the next tensor's merge) and bf16 tensors are "
    "converted straight from a read-only map of the file (bit-identical, ~3x faster than read + convert on one "
    "shard). SHA-256 of the inputs runs on another thread (hashlib.file_digest, ~930 MB/s here).",
]


# ---------------------------------------------------------------------------------------------------------------
# recipes
# ---------------------------------------------------------------------------------------------------------------
def recipe_yaml(method: str, base: Path, inputs: list[Path], dtype: str | None, out_dtype: str | None) -> str:
    with_base, n, per_model, params = SPECS[method]
    lines = [f"merge_method: {method}"]
    if with_base:
        lines.append(f"base_model: {base}")
    lines.append("models:")
    if method == "slerp":  # mergekit's slerp lists the base among the models
        lines.append(f"  - model: {base}")
    for i, p in enumerate(inputs[:n]):
        inner = ", ".join(f"{k}: {v}" for k, v in per_model(i).items())
        lines += [f"  - model: {p}"] + ([f"    parameters: {{{inner}}}"] if inner else [])
    if params:
        lines.append("parameters: {" + ", ".join(f"{k}: {v}" for k, v in params.items()) + "}")
    if dtype:
        lines.append(f"dtype: {dtype}")
    if out_dtype:
        lines.append(f"out_dtype: {out_dtype}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------------
# output comparison
# ---------------------------------------------------------------------------------------------------------------
def _tensor_files(d: Path) -> dict[str, Path]:
    index = d / "model.safetensors.index.json"
    if index.is_file():
        wm = json.loads(index.read_text())["weight_map"]
        return {n: d / f for n, f in wm.items()}
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(f, "pt") as h:
            out.update({n: f for n in h.keys()})
    return out


def compare_outputs(a: Path, b: Path) -> dict:
    """Per tensor, in float32: max |a - b|, how many elements differ, and the names/dtypes that do not match."""
    fa, fb = _tensor_files(a), _tensor_files(b)
    res = {"only_in_mergekit": sorted(set(fa) - set(fb)), "only_in_malleable": sorted(set(fb) - set(fa)),
           "dtype_mismatch": [], "shape_mismatch": []}
    max_abs, worst, n_diff, n_total, max_rel = 0.0, None, 0, 0, 0.0
    handles: dict[Path, object] = {}
    dt_a: set[str] = set()
    dt_b: set[str] = set()

    def get(f: Path, n: str) -> torch.Tensor:
        if f not in handles:
            handles[f] = safe_open(f, "pt")
        return handles[f].get_tensor(n)

    for n in sorted(set(fa) & set(fb)):
        x, y = get(fa[n], n), get(fb[n], n)
        dt_a.add(str(x.dtype))
        dt_b.add(str(y.dtype))
        if x.dtype != y.dtype:
            res["dtype_mismatch"].append(f"{n}: {x.dtype} vs {y.dtype}")
        if x.shape != y.shape:
            res["shape_mismatch"].append(n)
            continue
        xf, yf = x.float(), y.float()
        d = (xf - yf).abs()
        m = d.max().item() if d.numel() else 0.0
        n_diff += int((d > 0).sum())
        n_total += d.numel()
        scale = xf.abs().max().item()
        if scale > 0:
            max_rel = max(max_rel, m / scale)
        if m > max_abs or worst is None:
            max_abs, worst = max(m, max_abs), (n if m >= max_abs else worst)
    res.update({"max_abs_diff": max_abs, "worst_tensor": worst, "elements_differing": n_diff,
                "elements_total": n_total, "fraction_differing": (n_diff / n_total) if n_total else None,
                "max_diff_relative_to_tensor_absmax": max_rel, "dtypes_mergekit": sorted(dt_a),
                "dtypes_malleable": sorted(dt_b)})
    handles.clear()
    return res


def _dir_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.rglob("*.safetensors"))


# ---------------------------------------------------------------------------------------------------------------
# runner
# ---------------------------------------------------------------------------------------------------------------
def tool_cmd(tool: str, recipe: Path, out: Path, args) -> list[str]:
    if tool == "mergekit":
        return [str(Path(args.mergekit_venv) / "bin" / "mergekit-yaml"), str(recipe), str(out),
                "--no-copy-tokenizer", "--random-seed", "0", "--quiet"]
    return [args.malleable, "merge", str(recipe), str(out), "-q"]


def run_set(name: str, base: Path, inputs: list[Path], dtype: str | None, out_dtype: str | None, args,
            log: Path) -> dict:
    work = Path(args.cache) / "runs" / name
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    print(f"[{name}] warming the page cache with the inputs", flush=True)
    drop_into_page_cache([base, *inputs])
    results = {}
    for method in args.methods:
        recipe = work / f"{method}.yml"
        recipe.write_text(recipe_yaml(method, base, inputs, dtype, out_dtype))
        runs: dict[str, list[dict]] = {"mergekit": [], "malleable": []}
        outs = {t: work / f"out-{method}-{t}" for t in runs}
        for r in range(args.repeats):
            order = ["mergekit", "malleable"] if r % 2 == 0 else ["malleable", "mergekit"]
            for tool in order:
                shutil.rmtree(outs[tool], ignore_errors=True)
                load = os.getloadavg()[0]
                res = timed_run(tool_cmd(tool, recipe, outs[tool], args), log=log, cwd=work, env=thread_env(args.threads))
                res.update({"repeat": r, "position": order.index(tool), "loadavg_1min_before": round(load, 2)})
                runs[tool].append(res)
                status = (f"{res['wall_s']:.1f}s {res['max_rss_mib']:.0f}MiB" if res["rc"] == 0
                          else f"FAILED rc={res['rc']}: {res.get('stderr_tail', '')[-300:]}")
                print(f"[{name}/{method}] repeat {r} {tool}: {status}", flush=True)
        entry: dict = {"recipe": recipe.read_text(), "runs": runs}
        for tool, rs in runs.items():
            ok = [x for x in rs if x["rc"] == 0]
            entry[tool] = {"ok_runs": len(ok), "failed_runs": len(rs) - len(ok),
                           "median_wall_s": median([x["wall_s"] for x in ok]),
                           "median_max_rss_mib": median([x["max_rss_mib"] for x in ok]),
                           "min_wall_s": min((x["wall_s"] for x in ok), default=None),
                           "output_bytes": _dir_bytes(outs[tool]) if outs[tool].exists() else None,
                           "output_files": sorted(p.name for p in outs[tool].iterdir()) if outs[tool].exists()
                           else None}
            if len(ok) < len(rs):
                entry[tool]["error"] = next(x for x in rs if x["rc"] != 0).get("stderr_tail", "")[-2000:]
        entry["ratio_wall_malleable_over_mergekit"] = ratio(entry["malleable"]["median_wall_s"],
                                                            entry["mergekit"]["median_wall_s"])
        entry["ratio_rss_malleable_over_mergekit"] = ratio(entry["malleable"]["median_max_rss_mib"],
                                                           entry["mergekit"]["median_max_rss_mib"])
        if all((outs[t] / "config.json").exists() and entry[t]["ok_runs"] for t in outs):
            cmp = compare_outputs(outs["mergekit"], outs["malleable"])
            cmp["comparable"] = method not in RANDOM
            if method in RANDOM:
                cmp["note"] = "random, not comparable: drop masks are random in both tools (different RNGs)"
            entry["parity"] = cmp
            print(f"[{name}/{method}] max |mergekit - malleable| = {cmp['max_abs_diff']:.3g} "
                  f"({cmp['elements_differing']} of {cmp['elements_total']} elements differ)", flush=True)
        if not args.keep_outputs:
            for o in outs.values():
                shutil.rmtree(o, ignore_errors=True)
        results[method] = entry
        if getattr(args, "on_method", None):
            args.on_method(name, results)  # the results so far are written after each method
    return results


def markdown(data: dict) -> str:
    m = data["machine"]
    lines = [
        "# Full-model merge: malleable vs mergekit",
        "",
        f"Date {m['date']}; {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM; "
        f"torch {m['versions']['torch']}, mergekit {m['versions'].get('mergekit')}, "
        f"malleable {m['versions']['malleable']} (git {m.get('malleable_git')}).",
        f"Median of {data['repeats']} runs per tool, order alternating; each tool is a subprocess timed with "
        "`/usr/bin/time -f '%e %M'` (max RSS = peak resident set of the largest process in the tree, "
        "including resident mmap'd file pages). Ratios are malleable / mergekit (below 1: malleable is "
        "faster / smaller). Both tools read the same mergekit YAML file.",
        f"Threads per tool: {data.get('threads', 'torch default')}. Load average (1/5/15 min) at start {data.get('loadavg_at_start')}, "
        f"at end {data.get('loadavg_at_end')}.",
        f"Seeds: fine-tune perturbation seeds {data['seeds']}; mergekit `--random-seed 0`, malleable seed 0 "
        "(recipe default).",
        "",
    ]
    for set_name, s in data["sets"].items():
        desc = s["description"]
        cfgd = s.get("info", {}).get("config")
        if cfgd and str(cfgd) in desc:  # results written before the description was made readable
            desc = desc.replace(str(cfgd), f"hidden {cfgd['hidden_size']}, intermediate {cfgd['intermediate_size']}, "
                                f"{cfgd['num_hidden_layers']} layers, {cfgd['num_attention_heads']} heads / "
                                f"{cfgd['num_key_value_heads']} kv heads, vocab {cfgd['vocab_size']}, untied lm_head")
        lines += [f"## {set_name}: {desc}", ""]
        lines += ["| method | mergekit s | malleable s | time ratio | mergekit MiB | malleable MiB | RSS ratio "
                  "| max abs diff | elements differing |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for method, e in s["methods"].items():
            p = e.get("parity")
            if p is None:
                diff, frac = "n/a (a run failed)", ""
            else:
                diff = fmt(p["max_abs_diff"], 3) + ("" if p["comparable"] else " (random, not comparable)")
                frac = f"{p['elements_differing']} / {p['elements_total']}"
            lines.append(
                f"| {method} | {fmt(e['mergekit']['median_wall_s'], 1)} | {fmt(e['malleable']['median_wall_s'], 1)}"
                f" | {fmt(e['ratio_wall_malleable_over_mergekit'])} | {fmt(e['mergekit']['median_max_rss_mib'], 0)}"
                f" | {fmt(e['malleable']['median_max_rss_mib'], 0)} | {fmt(e['ratio_rss_malleable_over_mergekit'])}"
                f" | {diff} | {frac} |")
        lines.append("")
        for method, e in s["methods"].items():
            for tool in ("mergekit", "malleable"):
                if e[tool].get("error"):
                    lines += [f"**{method} / {tool} failed** ({e[tool]['failed_runs']} runs):", "", "```",
                              e[tool]["error"].strip()[-1500:], "```", ""]
            p = e.get("parity")
            if p and (p["only_in_mergekit"] or p["only_in_malleable"] or p["dtype_mismatch"]
                      or p["shape_mismatch"]):
                lines.append(f"- {method}: tensor-set mismatch: only in mergekit {p['only_in_mergekit'][:5]}, "
                             f"only in malleable {p['only_in_malleable'][:5]}, dtype {p['dtype_mismatch'][:3]}, "
                             f"shape {p['shape_mismatch'][:3]}")
        lines.append("")
    if data.get("notes"):
        lines += ["## Notes", ""] + [f"- {n}" for n in data["notes"]]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=None, help="runs per tool and recipe (default 5; 1 with --quick)")
    ap.add_argument("--quick", action="store_true", help="smoke run: small synthetic model (6M params), 1 repeat; "
                                                         "writes merge_vs_mergekit_quick.{json,md}")
    ap.add_argument("--sets", default="smollm2,synthetic")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated, or `all` (every method both "
                                                                  "tools have)")
    ap.add_argument("--cache", default=os.environ.get("BENCH_CACHE", "/work/bench-cache"))
    ap.add_argument("--mergekit-venv", default=os.environ.get("MERGEKIT_VENV", "/work/mergekit-venv"))
    ap.add_argument("--malleable", default=str(Path(sys.executable).with_name("malleable")))
    ap.add_argument("--keep-outputs", action="store_true")
    ap.add_argument("--threads", type=int, default=None,
                    help="OMP/MKL threads for both tools (default: torch's default, all cores)")
    ap.add_argument("--name", default=None, help="results file stem (default merge_vs_mergekit[_quick])")
    ap.add_argument("--render", metavar="JSON", help="only rewrite the .md next to an existing results JSON")
    args = ap.parse_args(argv)
    if args.render:
        data = json.loads(Path(args.render).read_text())
        data["notes"] = NOTES
        Path(args.render).write_text(json.dumps(data, indent=2) + "\n")
        Path(args.render).with_suffix(".md").write_text(markdown(data).rstrip() + "\n")
        return 0
    args.methods = list(SPECS) if args.methods == "all" else [m for m in args.methods.split(",") if m]
    unknown = sorted(set(args.methods) - set(SPECS))
    if unknown:
        raise SystemExit(f"unknown method {unknown[0]} (known: {', '.join(SPECS)})")
    sets = [s for s in args.sets.split(",") if s]
    if args.repeats is None:
        args.repeats = 1 if args.quick else 5
    name = args.name or ("merge_vs_mergekit_quick" if args.quick else "merge_vs_mergekit")
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    if not (Path(args.mergekit_venv) / "bin" / "mergekit-yaml").exists():
        raise SystemExit(f"no mergekit-yaml in {args.mergekit_venv}: run bench/setup_mergekit.sh first")
    log = cache / f"{name}.log"
    log.unlink(missing_ok=True)
    t0 = time.time()
    data = {"benchmark": "merge_vs_mergekit", "quick": args.quick, "repeats": args.repeats, "seeds": SEEDS,
            "weights": WEIGHTS, "ties_density": TIES_DENSITY, "dare_density": DARE_DENSITY,
            "machine": machine({"mergekit": _version("mergekit", str(Path(args.mergekit_venv) / "bin" / "python")),
                                "mergekit_torch": _version("torch", str(Path(args.mergekit_venv) / "bin" / "python"))}),
            "commands": {"mergekit": "mergekit-yaml RECIPE OUT --no-copy-tokenizer --random-seed 0 --quiet",
                         "malleable": "malleable merge RECIPE OUT -q"},
            "threads": args.threads or "torch default", "loadavg_at_start": loadavg(),
            "sets": {}, "notes": []}
    def partial(set_name: str, methods: dict) -> None:
        data["sets"].setdefault(set_name, {"description": "(running)", "methods": {}})["methods"] = methods
        data["loadavg_at_end"] = loadavg()
        write_results(name, data, markdown(data))

    args.on_method = partial
    for s in sets:
        if s == "smollm2":
            base, how = smollm2_base(cache)
            inputs = smollm2_finetunes(cache, base, SEEDS)
            desc = (f"SmolLM2-135M-Instruct (real, fp32, tied embeddings; {how}) + 3 seeded fine-tunes "
                    "(shared low-rank + own low-rank + 1% sparse spikes, 5% of each tensor's std); recipe dtype float32")
            res = run_set("smollm2", base, inputs, "float32", None, args, log)
            info = {"params": 134_515_008, "dtype": "float32"}
        elif s == "synthetic":
            size = "quick" if args.quick else "full"
            shard = 4 * 10 ** 6 if args.quick else 500 * 10 ** 6
            print(f"[synthetic] generating/reusing the {size} synthetic Llama family", flush=True)
            base, inputs, info = synthetic_family(cache, size, SEEDS, "bfloat16", shard_bytes=shard)
            gb = info["bytes_per_checkpoint"] / 1e9
            cfgd = info["config"]
            shape = (f"hidden {cfgd['hidden_size']}, intermediate {cfgd['intermediate_size']}, "
                     f"{cfgd['num_hidden_layers']} layers, {cfgd['num_attention_heads']} heads / "
                     f"{cfgd['num_key_value_heads']} kv heads, vocab {cfgd['vocab_size']}, untied lm_head")
            desc = (f"synthetic Llama ({shape}), bf16, {info['params'] / 1e9:.2f}B params, {gb:.2f} GB per "
                    f"checkpoint in {shard / 1e6:.0f} MB shards, base + 3 inputs; recipe dtype float32, out_dtype bfloat16")
            res = run_set("synthetic", base, inputs, "float32", "bfloat16", args, log)
        else:
            raise SystemExit(f"unknown set {s}")
        data["sets"][s] = {"description": desc, "base": str(base), "inputs": [str(p) for p in inputs],
                           "info": info, "methods": res}
    data["total_bench_seconds"] = round(time.time() - t0, 1)
    data["loadavg_at_end"] = loadavg()
    data["notes"] += NOTES
    j, m = write_results(name, data, markdown(data))
    print(f"wrote {j} and {m} in {data['total_bench_seconds']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
