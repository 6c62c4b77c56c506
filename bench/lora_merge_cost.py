#!/usr/bin/env python
"""Benchmark 2: the cost of merging T LoRA adapters into one rank-r adapter.

T = 8 adapters of rank 16 (random seeded factors) on three layer sets:

  2048      one 2048 x 2048 layer
  4096      one 4096 x 4096 layer
  smollm2   SmolLM2-135M's q, k, v, o, gate, up, down shapes over its 30 layers (210 layers)
  7b_sub    a Llama-2-7B-shaped subset both tools run: layer 0's q_proj (4096 x 4096) and down_proj
            (4096 x 11008); PEFT's dense SVDs take ~25 s and ~130 s for these on this box (1 thread), so all
            224 modules (~4 h) are out of reach for it
  7b        Llama-2-7B's shapes, all 32 layers x q, k, v, o, gate, up, down (224 modules; hidden 4096,
            intermediate 11008, kv = hidden): malleable only (PEFT would need the 27 GB dense model too)

Tools (all output rank 16, task-arithmetic combination with the same weights):

  peft        PEFT's `add_weighted_adapter(..., combination_type="svd", svd_rank=16)` on a tiny nn.Module of
              nn.Linear layers wrapped with get_peft_model and 8 adapters whose lora_A / lora_B are the same
              factors (PEFT's dense path: forms sum_t w_t B_t A_t, then a full SVD per layer)
  ctm         malleable `ctm` rule (Compress-then-Merge), inner="task_arithmetic", rank=16, the authors' HOOI
              stop rule (up to 1000 sweeps, |change of rel. error| < 1e-6); all modules in one call of the
              rule's batch entry point, as the merge engine calls it
  ctm20       the same with iters=20 (at most 20 HOOI sweeps; NOT the authors' rule): isolates what the stop
              rule costs from what batching saves
  core_space  malleable `core_space` rule, inner="task_arithmetic", rank=16

Every measurement is a fresh subprocess (`--worker`) that builds the inputs, then times ONE merge call over the
whole layer set and records the peak resident memory of that call: the kernel's high-water mark (VmHWM) is
reset through /proc/self/clear_refs right before the call, and the reported peak is VmHWM after it minus the
RSS before it (a psutil sampling thread at 2 ms is a cross-check). Median of --repeats workers per (tool, set),
tool order rotating. Quality: relative Frobenius error of each merged adapter against the exact dense weighted
sum (PEFT's truncated SVD is the optimal rank-16 answer, Eckart-Young).

Usage:
  python bench/lora_merge_cost.py              # full, writes bench/results/lora_merge_cost.{json,md}
  python bench/lora_merge_cost.py --quick      # 1 repeat, 2048 set only, writes lora_merge_cost_quick.*
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import fmt, loadavg, machine, median, ratio, thread_env, write_results  # noqa: E402

T = 8
RANK = 16
SEED = 0
WEIGHTS = [0.5, 0.7, 0.9, 1.1, 1.3, 0.6, 0.8, 1.0]
TOOLS = ["peft", "ctm", "ctm20", "core_space"]
PEFT_SETS = ("2048", "4096", "smollm2", "7b_sub")  # sets small enough for PEFT's dense path
NOTES = [
    "Each worker process builds its inputs first; only the merge call is timed and memory-profiled. "
    "process_max_rss_mib in the JSON is the whole worker's peak (inputs, PEFT model, imports included).",
    "PEFT's time includes injecting the new adapter's modules, as `add_weighted_adapter` does; its SVD uses "
    "PEFT's defaults (full_matrices=True). malleable's rules receive the factors as LowRankDelta and never "
    "form B @ A.",
    "ctm fits shared rank-16 subspaces (HOOI) and merges the 16 x 16 coordinates, so its result is not the "
    "rank-16 truncation of the weighted sum: its rel. error is a different trade-off, not a bug. core_space "
    "with rank 16 truncates the exact merged core, which equals PEFT's answer up to round-off.",
    "The box is shared with other jobs; loadavg_1min is recorded per worker in the JSON.",
    "ctm follows the authors' HOOI stop rule (tensorly partial_tucker: up to 1000 sweeps, until the relative error "
    "changes by < 1e-6). Its time is that HOOI: every module's balanced core tensor is 128 x 128 x 8 whatever the "
    "layer's width, and each sweep needs the leading 16 eigenvectors of two 128 x 128 float64 Gram matrices "
    "(exact, from LAPACK's eigh, ~1 ms each on this CPU). On these random, unrelated adapters the 210 SmolLM2 "
    "modules take 15 to 125 sweeps (median 40; `ctm_sweeps`), i.e. ~85 eigendecompositions per "
    "module: ~0.17 s of CPU per module that batching the modules (one batched HOOI per 16 modules, their own "
    "stop each) cannot remove. Batching removes the per-module Python overhead, and the core space now comes from "
    "Cholesky factors of the stacks' Gram matrices (no QR of the tall stacks).",
    "ctm20 (at most 20 sweeps, not the authors' rule) shows what the stop rule costs: about half of ctm's time on "
    "SmolLM2. Real adapters may converge in fewer sweeps than these random ones (issue 14: on real SmolLM2 "
    "adapters only 5 of 120 modules needed more than 20 sweeps under the old criterion).",
    "The 2026-11-29 run's code changed once while it ran (commit 'tucker2: start Gram matrices slice by slice'): "
    "a memory-only change of ctm's HOOI start (same math), in effect from 7b_sub's third ctm repeat and the whole 7b "
    "set on. The box was shared with other helpers' jobs (load average 4 to 15 on 2 cores, see the JSON per worker); "
    "all tools ran interleaved under the same load.",
    "7b_sub is the subset both tools run (PEFT's dense SVD of one 4096 x 11008 delta alone takes ~130 s here, so "
    "the 224 modules would take ~4 h and a 27 GB dense model). On 7b (224 modules) malleable runs alone; its "
    "peak there includes the 160 MiB merged adapter it returns.",
    "Threads: pass --threads N (OMP/MKL threads per worker). `lora_merge_cost_2threads.*` is the same benchmark with "
    "2 threads and 3 repeats (PEFT's LAPACK SVD gains most from the second core).",
]
LLAMA7B_SHAPES = {  # Llama-2-7B: hidden 4096, kv heads = heads (k, v 4096), intermediate 11008
    "q_proj": (4096, 4096), "k_proj": (4096, 4096), "v_proj": (4096, 4096), "o_proj": (4096, 4096),
    "gate_proj": (11008, 4096), "up_proj": (11008, 4096), "down_proj": (4096, 11008),
}
SMOL_SHAPES = {  # name: (out_features, in_features), SmolLM2-135M (hidden 576, kv 3 x 64, intermediate 1536)
    "q_proj": (576, 576), "k_proj": (192, 576), "v_proj": (192, 576), "o_proj": (576, 576),
    "gate_proj": (1536, 576), "up_proj": (1536, 576), "down_proj": (576, 1536),
}


def layer_set(name: str) -> list[tuple[str, int, int]]:
    if name == "2048":
        return [("l0", 2048, 2048)]
    if name == "4096":
        return [("l0", 4096, 4096)]
    if name == "smollm2":
        return [(f"l{i}_{m}", o, n) for i in range(30) for m, (o, n) in SMOL_SHAPES.items()]
    if name == "7b":
        return [(f"l{i}_{m}", o, n) for i in range(32) for m, (o, n) in LLAMA7B_SHAPES.items()]
    if name == "7b_sub":
        return [(f"l0_{m}", *LLAMA7B_SHAPES[m]) for m in ("q_proj", "down_proj")]
    raise SystemExit(f"unknown layer set {name}")


# ---------------------------------------------------------------------------------------------------------------
# worker: one measurement in a fresh process
# ---------------------------------------------------------------------------------------------------------------
def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _hwm_bytes() -> int | None:
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class Sampler(threading.Thread):
    def __init__(self, interval: float = 0.002):
        super().__init__(daemon=True)
        self.interval, self.peak, self._halt = interval, _rss_bytes(), threading.Event()

    def run(self):
        while not self._halt.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(self.interval)

    def stop(self) -> int:
        self._halt.set()
        self.join()
        self.peak = max(self.peak, _rss_bytes())
        return self.peak


def make_factors(layers, seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    factors = {}
    for name, out_f, in_f in layers:
        fs = []
        for _ in range(T):
            A = torch.randn(RANK, in_f, generator=g) / in_f ** 0.5
            B = torch.randn(out_f, RANK, generator=g) * (0.1 / RANK ** 0.5)
            fs.append((B, A))
        factors[name] = fs
    return factors


def worker(tool: str, set_name: str, seed: int) -> dict:
    import torch

    layers = layer_set(set_name)
    factors = make_factors(layers, seed)
    merged: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    if tool == "peft":
        from peft import LoraConfig, get_peft_model
        from torch import nn

        class Holder(nn.Module):
            def __init__(self):
                super().__init__()
                for name, out_f, in_f in layers:
                    self.add_module(name, nn.Linear(in_f, out_f, bias=False))

        names = [n for n, _, _ in layers]
        cfg = LoraConfig(r=RANK, lora_alpha=RANK, target_modules=names, lora_dropout=0.0)
        model = get_peft_model(Holder(), cfg, adapter_name="a0")
        for t in range(1, T):
            model.add_adapter(f"a{t}", cfg)
        with torch.no_grad():
            for name in names:
                mod = getattr(model.base_model.model, name)
                for t, (B, A) in enumerate(factors[name]):
                    mod.lora_A[f"a{t}"].weight.copy_(A)
                    mod.lora_B[f"a{t}"].weight.copy_(B)

        def run():
            with torch.no_grad():
                model.add_weighted_adapter([f"a{t}" for t in range(T)], WEIGHTS, "merged",
                                           combination_type="svd", svd_rank=RANK)

        def collect():
            for name in names:
                mod = getattr(model.base_model.model, name)
                s = mod.scaling["merged"]
                merged[name] = (mod.lora_B["merged"].weight.detach() * s, mod.lora_A["merged"].weight.detach())
    else:
        from malleable.deltas import LowRankDelta
        from malleable.merge import get_rule
        from malleable.merge.registry import LoraJob

        rule = get_rule("ctm" if tool.startswith("ctm") else tool)
        params = {"inner": "task_arithmetic"} | ({"iters": 20} if tool == "ctm20" else {})
        deltas = {n: [LowRankDelta(B, A, 1.0) for B, A in fs] for n, fs in factors.items()}
        results = {}

        def run():
            gen = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                if rule.batch is not None:   # what the engine does: every module in one call
                    jobs = [LoraJob(ds, WEIGHTS, gen, RANK, params) for ds in deltas.values()]
                    results.update(zip(deltas, rule.batch(jobs)))
                    return
                for name, ds in deltas.items():
                    results[name] = rule.fn(ds, WEIGHTS, gen, rank=RANK, **params)

        def collect():
            for name, d in results.items():
                merged[name] = (d.B * d.scale, d.A)

    import gc

    gc.collect()
    rss0 = _rss_bytes()
    hwm_ok = _reset_hwm()
    sampler = Sampler()
    sampler.start()
    t0 = time.perf_counter()
    run()
    dt = time.perf_counter() - t0
    peak_sampled = sampler.stop()
    hwm = _hwm_bytes() if hwm_ok else None
    collect()

    # quality against the exact dense weighted sum (outside the timed region), from the factors:
    # ||L R||_F^2 = trace((L^T L)(R R^T)), so no [out, in] matrix is formed (the 7b set has 224 of them)
    def sq_norm(L, R):
        return float(((L.T @ L) * (R @ R.T)).sum())

    err2 = ref2 = 0.0
    out_rank = 0
    with torch.no_grad():
        for name, fs in factors.items():
            Bx = torch.cat([w * B.double() for w, (B, _) in zip(WEIGHTS, fs)], dim=1)
            Ax = torch.cat([A.double() for _, A in fs], dim=0)
            B, A = merged[name]
            out_rank = max(out_rank, A.shape[0])
            err2 += sq_norm(torch.cat([Bx, -B.double()], dim=1), torch.cat([Ax, A.double()], dim=0))
            ref2 += sq_norm(Bx, Ax)
    mib = 1024 ** 2
    return {
        "tool": tool, "set": set_name, "seconds": dt,
        "rss_before_mib": rss0 / mib,
        "peak_extra_mib_hwm": (hwm - rss0) / mib if hwm is not None else None,
        "peak_extra_mib_sampled": (peak_sampled - rss0) / mib,
        "hwm_reset": hwm_ok,
        "output_rank": out_rank,
        "rel_error_vs_exact_sum": (err2 / ref2) ** 0.5,
        "torch_threads": torch.get_num_threads(),
    }


def sweep_stats(set_name: str, seed: int) -> dict:
    """HOOI sweeps ctm's stop rule takes per module on a layer set (untimed; counted around linalg.tucker2)."""
    import torch

    from malleable.deltas import LowRankDelta
    from malleable.merge import ctm as ctm_module
    from malleable.merge.registry import LoraJob

    counts, fit = [], ctm_module.tucker2

    def counting(*args, **kwargs):
        P, Q, sweeps = fit(*args, **kwargs)
        counts.extend(sweeps.tolist())
        return P, Q, sweeps

    ctm_module.tucker2 = counting
    gen = torch.Generator().manual_seed(seed)
    jobs = [LoraJob([LowRankDelta(B, A, 1.0) for B, A in fs], WEIGHTS, gen, RANK, {"inner": "task_arithmetic"})
            for fs in make_factors(layer_set(set_name), seed).values()]
    ctm_module.ctm_batch(jobs)
    counts.sort()
    return {"modules": len(counts), "min": counts[0], "median": counts[len(counts) // 2], "max": counts[-1],
            "mean": sum(counts) / len(counts)}


# ---------------------------------------------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------------------------------------------
def run_worker(tool: str, set_name: str, timeout: float, threads: int | None = None) -> dict:
    cmd = [sys.executable, __file__, "--worker", tool, set_name]
    t0 = time.perf_counter()
    p = subprocess.run(["/usr/bin/time", "-f", "%M", *cmd], capture_output=True, text=True, timeout=timeout,
                       env=thread_env(threads))
    if p.returncode != 0:
        return {"tool": tool, "set": set_name, "error": p.stderr[-3000:], "rc": p.returncode}
    res = json.loads(p.stdout.strip().splitlines()[-1])
    res["process_max_rss_mib"] = int(p.stderr.strip().splitlines()[-1]) / 1024
    res["process_wall_s"] = time.perf_counter() - t0
    res["loadavg_1min"] = os.getloadavg()[0]
    return res


def summarize(runs: list[dict]) -> dict:
    ok = [r for r in runs if "error" not in r]
    s = {"ok_runs": len(ok), "failed_runs": len(runs) - len(ok)}
    if not ok:
        s["error"] = runs[0].get("error", "")[-2000:] if runs else "no runs"
        return s
    peak_key = "peak_extra_mib_hwm" if all(r["peak_extra_mib_hwm"] is not None for r in ok) else "peak_extra_mib_sampled"
    s.update({
        "median_seconds": median([r["seconds"] for r in ok]),
        "min_seconds": min(r["seconds"] for r in ok),
        "median_peak_extra_mib": median([r[peak_key] for r in ok]),
        "peak_measure": peak_key,
        "median_peak_extra_mib_sampled": median([r["peak_extra_mib_sampled"] for r in ok]),
        "median_process_max_rss_mib": median([r["process_max_rss_mib"] for r in ok]),
        "rel_error_vs_exact_sum": ok[0]["rel_error_vs_exact_sum"],
        "output_rank": ok[0]["output_rank"],
    })
    return s


def markdown(data: dict) -> str:
    m = data["machine"]
    lines = [
        "# LoRA merge cost: malleable (ctm, core_space) vs PEFT add_weighted_adapter(svd)",
        "",
        f"Date {m['date']}; {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM; torch {m['versions']['torch']}, "
        f"peft {m['versions']['peft']}, malleable {m['versions']['malleable']} (git {m.get('malleable_git')}).",
        f"T = {T} adapters of rank {RANK}, random factors (seed {SEED}), weights {WEIGHTS}, output rank {RANK}, "
        "task-arithmetic combination (PEFT: `combination_type=\"svd\", svd_rank=16`; malleable: "
        "`inner=\"task_arithmetic\", rank=16`).",
        f"Median of {data['repeats']} fresh worker processes per (tool, layer set). Time = one merge call over the "
        "whole layer set. Peak = the call's extra resident memory (kernel VmHWM reset before the call, minus the "
        "RSS before it). Ratios: PEFT / malleable (above 1: malleable is faster / smaller). rel. error = "
        "||merged - exact weighted sum||_F / ||exact||_F (PEFT's truncated SVD is the optimal rank-16 value).",
        f"Threads per worker: {data.get('threads', 'torch default')}. Load average (1/5/15 min) at start {data.get('loadavg_at_start')}, "
        f"at end {data.get('loadavg_at_end')}.",
        "",
        "| layer set | tool | median s | speed-up vs PEFT | peak extra MiB | PEFT peak / this | rel. error | out rank |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for set_name, per_tool in data["results"].items():
        peft = per_tool.get("peft", {})
        for tool in data["tools"]:
            s = per_tool.get(tool)
            if s is None:
                continue
            if not s.get("ok_runs"):
                lines.append(f"| {set_name} | {tool} | failed | | | | | |")
                continue
            sp = "1 (reference)" if tool == "peft" else fmt(ratio(peft.get("median_seconds"), s["median_seconds"]), 1)
            mem = "1 (reference)" if tool == "peft" else fmt(ratio(peft.get("median_peak_extra_mib"),
                                                                    s["median_peak_extra_mib"]), 1)
            lines.append(f"| {set_name} ({data['layer_counts'][set_name]} layers) | {tool} | {fmt(s['median_seconds'], 3)}"
                         f" | {sp} | {fmt(s['median_peak_extra_mib'], 1)} | {mem} | {fmt(s['rel_error_vs_exact_sum'], 4)}"
                         f" | {s['output_rank']} |")
    lines += ["", "Targets: >= 20x faster than PEFT's dense-SVD path at 4096 (foundation issue) and, for ctm, on "
              "SmolLM2's layers and the 7B-shaped set (issue 14), with peak memory well below PEFT's.", ""]
    t = data.get("target_check")
    if t:
        lines += ["| layer set / tool | speed-up vs PEFT | PEFT peak / this | >= 20x and smaller |", "|---|---|---|---|"]
        lines += [f"| {k} | {fmt(v['speedup'], 1)} | {fmt(v['mem_ratio'], 1)} | {v['met']} |" for k, v in t.items()]
        lines += [""]
    for set_name, per_tool in data["results"].items():
        for tool, s in per_tool.items():
            if s.get("error"):
                lines += [f"**{set_name} / {tool} failed:**", "", "```", s["error"].strip()[-1500:], "```", ""]
    if data.get("ctm_sweeps"):
        lines += ["ctm's HOOI sweeps per module (authors' stop rule): " + "; ".join(
            f"{s}: min {v['min']}, median {v['median']}, mean {fmt(v['mean'], 1)}, max {v['max']} over {v['modules']}"
            for s, v in data["ctm_sweeps"].items()) + ".", ""]
    if data.get("notes"):
        lines += ["## Notes", ""] + [f"- {n}" for n in data["notes"]]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", nargs=2, metavar=("TOOL", "SET"), help=argparse.SUPPRESS)
    ap.add_argument("--repeats", type=int, default=None, help="workers per (tool, set) (default 5; 1 with --quick)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 2048 set only, 1 repeat")
    ap.add_argument("--sets", default=None, help="comma list of 2048,4096,smollm2,7b_sub,7b")
    ap.add_argument("--tools", default=",".join(TOOLS))
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--name", default=None)
    ap.add_argument("--threads", type=int, default=None,
                    help="OMP/MKL threads per worker (default: torch's default, all cores)")
    ap.add_argument("--render", metavar="JSON", help="only rewrite the .md next to an existing results JSON")
    ap.add_argument("--add-sweeps", action="store_true",
                    help="with --render: also count ctm's HOOI sweeps per module on the JSON's sets (untimed)")
    args = ap.parse_args(argv)
    if args.render:
        data = json.loads(Path(args.render).read_text())
        if args.add_sweeps:
            data["ctm_sweeps"] = {s: sweep_stats(s, SEED) for s in data["results"] if s in ("smollm2", "7b")}
        data["notes"] = NOTES
        Path(args.render).write_text(json.dumps(data, indent=2) + "\n")
        Path(args.render).with_suffix(".md").write_text(markdown(data).rstrip() + "\n")
        return 0
    if args.worker:
        print(json.dumps(worker(args.worker[0], args.worker[1], SEED)))
        return 0
    repeats = args.repeats or (1 if args.quick else 5)
    sets = (args.sets or ("2048" if args.quick else "2048,4096,smollm2,7b_sub,7b")).split(",")
    tools = args.tools.split(",")
    name = args.name or ("lora_merge_cost_quick" if args.quick else "lora_merge_cost")
    t0 = time.time()
    data = {"benchmark": "lora_merge_cost", "quick": args.quick, "repeats": repeats, "T": T, "rank": RANK,
            "seed": SEED, "weights": WEIGHTS, "tools": tools, "machine": machine(),
            "layer_counts": {s: len(layer_set(s)) for s in sets}, "threads": args.threads or "torch default",
            "loadavg_at_start": loadavg(), "raw": {}, "results": {}}
    for s in sets:
        set_tools = [t for t in tools if t != "peft" or s in PEFT_SETS]
        runs: dict[str, list[dict]] = {t: [] for t in set_tools}
        for r in range(repeats):
            order = set_tools[r % len(set_tools):] + set_tools[:r % len(set_tools)]
            for tool in order:
                res = run_worker(tool, s, args.timeout, args.threads)
                res["repeat"] = r
                runs[tool].append(res)
                msg = (f"{res['seconds']:.3f}s peak+{res['peak_extra_mib_hwm'] or res['peak_extra_mib_sampled']:.0f}MiB "
                       f"err {res['rel_error_vs_exact_sum']:.3g}" if "error" not in res else
                       f"FAILED: {res['error'][-300:]}")
                print(f"[{s}] repeat {r} {tool}: {msg}", flush=True)
        data["raw"][s] = runs
        data["results"][s] = {t: summarize(rs) for t, rs in runs.items()}
    tc = {}
    for s in ("4096", "smollm2", "7b_sub"):
        res = data["results"].get(s, {})
        for tool in ("ctm", "ctm20", "core_space"):
            if tool in res and res[tool].get("ok_runs") and res.get("peft", {}).get("ok_runs"):
                sp = ratio(res["peft"]["median_seconds"], res[tool]["median_seconds"])
                mr = ratio(res["peft"]["median_peak_extra_mib"], res[tool]["median_peak_extra_mib"])
                tc[f"{s}/{tool}"] = {"speedup": sp, "mem_ratio": mr,
                                     "met": bool(sp is not None and sp >= 20 and mr is not None and mr > 1)}
    data["target_check"] = tc
    if "ctm" in tools:
        data["ctm_sweeps"] = {s: sweep_stats(s, SEED) for s in sets if s in ("smollm2", "7b")}
    data["total_bench_seconds"] = round(time.time() - t0, 1)
    data["loadavg_at_end"] = loadavg()
    data["notes"] = NOTES
    j, m = write_results(name, data, markdown(data))
    print(f"wrote {j} and {m} in {data['total_bench_seconds']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
