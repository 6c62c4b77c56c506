"""Trainable Weight Averaging against soups and SWA on the Fashion-MNIST CNN (issue 19, TWA half, benchmark 2).

Per seed (every split, initialisation and data order follows it):
* Data: Fashion-MNIST's 60,000 training images shuffled; the first PRETRAIN_N pre-train one CNN
  (`models.vision.small_cnn`, width 16, no BatchNorm), the next FINETUNE_N are the fine-tuning set, the next
  VAL_N the held-out validation set (greedy soup's and TWA-v's data); the official 10,000 test images score.
* Ingredients: 8 fine-tunes of the pre-trained CNN through `forget.fit` (the protocols' training loop), SGD
  momentum 0.9, cosine, FINETUNE_STEPS steps of batch 64, hyperparameters `GRID` (lr x weight decay), each with
  its own data order.
* Methods: the best single fine-tune (by validation accuracy), uniform soup, greedy soup (validation, strict
  improvement), SWA through torch.optim.swa_utils over the 8 (without and with `update_bn`: this CNN has no
  BatchNorm, so both equal the uniform soup, checked and reported), and TWA-v with the authors' defaults
  (AdamW lr 1e-3, wd 0, batch 32, 5 epochs over the validation set, cosine with 20% warm-up, one block per
  tensor) with the projection in float32 and at 8 / 4 / 2 / 1 bits; TWA-v at lr 1e-2 (float32) as a
  sensitivity check of the authors' lr, which was set for 72 CLIP models.
* The projection's bytes, measured on the blocks TWA-v builds: one k-bit code per uint8 byte, as the authors'
  code holds them (`.to(torch.uint8)`: 1-8 bits all a quarter of float32), and bit-packed (`pack: true`,
  malleable's default since: bits / 8 of a byte per code; the results are bit for bit the same, tested).
  `--report` re-measures both on fresh checkpoints of the same shapes (the bytes depend only on the shapes and
  the bits), without re-training.
* Reported: test accuracy (mean over seeds and a t-based 95% CI), TWA-v minus greedy soup paired per seed,
  the projection's bytes (what the bits change; the process's peak RSS is one number for the whole run, as a
  ~0.4-3 MB projection is far below what RSS resolves next to torch itself), wall seconds, the machine and its
  load average before and after.

    python bench/merge_twa.py [--seeds 3]     # writes bench/results/merge_twa.{json,md}
    python bench/merge_twa.py --report        # rewrites the summary and the .md from the .json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spinning OpenMP threads crawl on a shared CPU
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import loadavg, machine, write_results  # noqa: E402

import torch  # noqa: E402

from malleable.data.vision import load_fashion_mnist  # noqa: E402
from malleable.forget import fit  # noqa: E402
from malleable.forget.data import collate_classification  # noqa: E402
from malleable.merge.soups import greedy_soup, swa  # noqa: E402
from malleable.merge.twa import journal_blocks, mean_state, param_blocks, twa  # noqa: E402
from malleable.models.vision import small_cnn  # noqa: E402
from malleable.report import peak_rss_mb  # noqa: E402

PRETRAIN_N, FINETUNE_N, VAL_N = 10_000, 10_000, 2_000
PRETRAIN_STEPS, FINETUNE_STEPS, BATCH = 300, 150, 64
GRID = [(lr, wd) for lr in (0.005, 0.02, 0.05, 0.1) for wd in (0.0, 5e-3)]
TWA_V = [("TWA-v fp32", {"bits": 32}), ("TWA-v 8-bit", {"bits": 8}), ("TWA-v 4-bit", {"bits": 4}),
         ("TWA-v 2-bit", {"bits": 2}), ("TWA-v 1-bit", {"bits": 1}), ("TWA-v fp32 lr 1e-2", {"bits": 32, "lr": 1e-2})]
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def make(batchnorm: bool = False) -> torch.nn.Module:
    return small_cnn(1, 10, 28, 16, batchnorm=batchnorm)


@torch.no_grad()
def accuracy(state: dict, examples: list, batch: int = 2000, batchnorm: bool = False) -> float:
    net = make(batchnorm)
    net.load_state_dict(state)
    net.eval()
    right = 0
    for i in range(0, len(examples), batch):
        b = collate_classification(examples[i:i + batch])
        right += int((net(b["x"]).argmax(1) == b["labels"]).sum())
    return 100.0 * right / len(examples)


def projection_bytes(sds: list[dict], bits: int) -> dict:
    """The bytes of TWA-v's projection of these checkpoints at `bits`: one code a byte (the authors) and
    bit-packed (malleable's default), measured on the blocks `twa` builds (one block per tensor)."""
    names = [n for n, _ in make().named_parameters()]
    rows = torch.stack([torch.cat([sd[n].float().reshape(-1) for n in names]) for sd in sds])
    spans, mean = param_blocks([sds[0][n].numel() for n in names], 0), rows.mean(0)
    return {key: sum(b.nbytes for b in journal_blocks(rows, mean, mean, spans, bits, pack))
            for key, pack in (("projection_bytes", False), ("packed_bytes", True))}


def one_seed(seed: int, train, test) -> dict:
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed)).tolist()
    pre = [train[i] for i in order[:PRETRAIN_N]]
    ft = [train[i] for i in order[PRETRAIN_N:PRETRAIN_N + FINETUNE_N]]
    val = [train[i] for i in order[PRETRAIN_N + FINETUNE_N:PRETRAIN_N + FINETUNE_N + VAL_N]]
    torch.manual_seed(seed)
    base = make()
    t0 = time.perf_counter()
    fit(base, pre, collate=collate_classification, steps=PRETRAIN_STEPS, batch_size=BATCH, lr=0.05, seed=seed)
    models = []
    for k, (lr, wd) in enumerate(GRID):
        m = make()
        m.load_state_dict(base.state_dict())
        fit(m, ft, collate=collate_classification, steps=FINETUNE_STEPS, batch_size=BATCH, lr=lr, weight_decay=wd,
            seed=seed * 100 + k)
        models.append(m.eval())
    train_s = time.perf_counter() - t0
    sds = [m.state_dict() for m in models]
    row: dict = {"seed": seed, "training_s": round(train_s, 1),
                 "pretrained_test": accuracy(base.state_dict(), test),
                 "individual_val": [accuracy(sd, val) for sd in sds],
                 "individual_test": [accuracy(sd, test) for sd in sds]}
    best = max(range(len(sds)), key=lambda i: row["individual_val"][i])
    methods: dict = {"best individual (val)": {"test": row["individual_test"][best]}}
    t = time.perf_counter()
    methods["uniform soup"] = {"test": accuracy(mean_state(sds), test), "seconds": time.perf_counter() - t}
    t = time.perf_counter()
    soup, chosen = greedy_soup(sds, lambda sd: accuracy(sd, val))
    methods["greedy soup"] = {"test": accuracy(soup, test), "seconds": time.perf_counter() - t,
                              "ingredients": chosen}
    for bn in (False, True):
        t = time.perf_counter()
        averaged = swa(models, [collate_classification(ft[i:i + 256])["x"] for i in range(0, len(ft), 256)]
                       if bn else None)
        methods[f"SWA{' + BN update' if bn else ''}"] = {"test": accuracy(averaged.state_dict(), test),
                                                          "seconds": time.perf_counter() - t}
    for label, params in TWA_V:
        t = time.perf_counter()
        result = twa(models, make(), val, collate=collate_classification, form="twa_v", parameters=params, seed=seed)
        bits = result.info["parameters"]["bits"]
        methods[label] = {"test": accuracy(result.state, test), "val": accuracy(result.state, val),
                          "seconds": time.perf_counter() - t, **projection_bytes(sds, bits),
                          "final_loss": result.history[-1]["loss"],
                          "coefficients": [[round(x, 4) for x in r] for r in result.coefficients[0].tolist()]}
    row["methods"] = methods
    return row


def mean_ci(xs: list[float]) -> tuple[float, float | None]:
    m = statistics.fmean(xs)
    if len(xs) < 2:
        return m, None
    return m, T975.get(len(xs) - 1, 1.96) * statistics.stdev(xs) / math.sqrt(len(xs))


def summarise(rows: list[dict]) -> dict:
    names = list(rows[0]["methods"])
    out = {}
    for n in names:
        m, ci = mean_ci([r["methods"][n]["test"] for r in rows])
        out[n] = {"test_mean": round(m, 3), "test_ci95": None if ci is None else round(ci, 3),
                  "seconds_median": round(statistics.median(r["methods"][n].get("seconds", 0) for r in rows), 2)}
        if "projection_bytes" in rows[0]["methods"][n]:
            out[n]["projection_bytes"] = rows[0]["methods"][n]["projection_bytes"]
            out[n]["packed_bytes"] = rows[0]["methods"][n]["packed_bytes"]
        for ref, key in (("greedy soup", "minus_greedy"), ("uniform soup", "minus_uniform")):
            if n != ref:
                d, dci = mean_ci([r["methods"][n]["test"] - r["methods"][ref]["test"] for r in rows])
                out[n][f"{key}_mean"] = round(d, 3)
                out[n][f"{key}_ci95"] = None if dci is None else round(dci, 3)
    return out


def markdown(result: dict) -> str:
    s, mach = result["summary"], result["machine"]
    lines = ["# merge_twa: Trainable Weight Averaging vs soups and SWA (Fashion-MNIST CNN)", "",
             f"{len(result['rows'])} seeds ({', '.join(str(r['seed']) for r in result['rows'])}); 8 fine-tunes of one "
             f"pre-trained CNN ({PRETRAIN_STEPS} steps on {PRETRAIN_N} images), each {FINETUNE_STEPS} SGD steps of "
             f"batch {BATCH} on {FINETUNE_N} other images, lr x wd = {GRID}; greedy soup and TWA-v use {VAL_N} "
             "held-out training images; test = the official 10,000. Mean test accuracy (%) with a t-based 95% CI "
             "over seeds; the difference to greedy soup is paired per seed.", "",
             "| method | test acc | 95% CI | minus greedy soup (95% CI) | minus uniform soup (95% CI) | projection: "
             "one code a byte (the authors) / bit-packed (the default) | seconds (median) |",
             "|---|---:|---:|---:|---:|---:|---:|"]

    def diff(v: dict, key: str) -> str:
        if f"{key}_mean" not in v:
            return "—"
        ci = v[f"{key}_ci95"]
        return f"{v[f'{key}_mean']:+.2f} (±{ci if ci is not None else 'n/a'})"

    for n, v in s.items():
        proj = f"{v['projection_bytes']:,} / {v['packed_bytes']:,} B" if "projection_bytes" in v else ""
        lines.append(f"| {n} | {v['test_mean']:.2f} | ±{v['test_ci95'] if v['test_ci95'] is not None else 'n/a'} | "
                     f"{diff(v, 'minus_greedy')} | {diff(v, 'minus_uniform')} | {proj} | {v['seconds_median']} |")
    lines += ["", "Individual fine-tunes' test accuracy per seed: " + "; ".join(
        f"seed {r['seed']}: {min(r['individual_test']):.1f}..{max(r['individual_test']):.1f} "
        f"(pre-trained {r['pretrained_test']:.1f})" for r in result["rows"]),
              "", "Projection bytes: measured on the blocks TWA-v builds (one block per tensor, 8 checkpoints); "
              "bit-packed, a k-bit code takes k / 8 of a byte (each block rounds up to a whole byte), with results "
              "bit for bit those of one code a byte (tests/test_merge_twa.py).",
              "", f"Machine: {mach['cpu']}, {mach['cores']} cores, {mach['ram_gib']} GiB; load average before "
              f"{result['loadavg_before']}, after {result['loadavg_after']} (shared with other jobs: the seconds are "
              f"indicative only). Peak RSS of the whole run {result['peak_rss_mb']} MB; wall {result['wall_s']} s.",
              "", "Verdict: " + result["verdict"], ""]
    return "\n".join(lines)


def verdict(s: dict) -> str:
    twa_v, greedy, uniform = s["TWA-v 4-bit"], s["greedy soup"], s["uniform soup"]
    ci = twa_v["minus_greedy_ci95"]
    if ci is None:
        return "one seed only: no interval."
    d = twa_v["minus_greedy_mean"]
    side = "above" if d - ci > 0 else "below" if d + ci < 0 else "not distinguishable from"
    du, uci = twa_v["minus_uniform_mean"], twa_v["minus_uniform_ci95"]
    side_u = "above" if du - uci > 0 else "below" if du + uci < 0 else "not distinguishable from"
    claim = ("holds here" if side == "above" and side_u == "above" else "is contradicted here" if side == "below"
             else "is not confirmed at this power (paired 95% CIs over the seeds)")
    return (f"TWA-v (authors' defaults, 4-bit) is {side} greedy soup ({d:+.2f} points, ±{ci}) and {side_u} uniform "
            f"soup ({du:+.2f}, ±{uci}); uniform soup {uniform['test_mean']:.2f}, greedy {greedy['test_mean']:.2f}, "
            f"TWA-v 4-bit {twa_v['test_mean']:.2f}. The paper's claim (TWA-v beats the soups) {claim}.")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--out", default="merge_twa")
    ap.add_argument("--report", action="store_true", help="rebuild the summary and the .md from the .json only")
    args = ap.parse_args()
    if args.report:
        from _common import RESULTS_DIR

        result = json.loads((RESULTS_DIR / f"{args.out}.json").read_text())
        fresh = []
        for i in range(len(GRID)):  # checkpoints of the run's shapes: the bytes depend on nothing else
            torch.manual_seed(i)
            fresh.append(make().state_dict())
        for row in result["rows"]:
            for label, params in TWA_V:
                row["methods"][label].update(projection_bytes(fresh, params["bits"]))
        result["summary"] = summarise(result["rows"])
        result["verdict"] = verdict(result["summary"])
        write_results(args.out, result, markdown(result))
        print(markdown(result))
        return
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    before, start = loadavg(), time.perf_counter()
    full_train, full_test = load_fashion_mnist("train"), load_fashion_mnist("test")
    train, test = full_train.examples(), full_test.examples()
    rows = []
    for seed in range(args.seeds):
        rows.append(one_seed(seed, train, test))
        print(f"seed {seed}: " + ", ".join(f"{k} {v['test']:.2f}" for k, v in rows[-1]["methods"].items()),
              flush=True)
    summary = summarise(rows)
    result = {"benchmark": "merge_twa", "machine": machine(), "loadavg_before": before, "loadavg_after": loadavg(),
              "wall_s": round(time.perf_counter() - start, 1), "peak_rss_mb": peak_rss_mb(),
              "settings": {"pretrain_n": PRETRAIN_N, "finetune_n": FINETUNE_N, "val_n": VAL_N,
                           "pretrain_steps": PRETRAIN_STEPS, "finetune_steps": FINETUNE_STEPS, "batch": BATCH,
                           "grid_lr_wd": GRID, "twa_v": TWA_V, "seeds": list(range(args.seeds))},
              "rows": rows, "summary": summary}
    result["verdict"] = verdict(summary)
    write_results(args.out, result, markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
