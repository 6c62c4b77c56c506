"""TWA in the head and the tail stage of training, on the Fashion-MNIST CNN (issue 19, TWA half, benchmark 1).

The ICLR form `twa` (merge/twa.py: an orthonormal basis of the checkpoints, SGD in their span), as the authors
run it (github nblt/TWA, branch main: run.sh, train_sgd_cifar.py, train_twa.py, swa/run_twa.sh), scaled down.

Per seed (the training subset, the initialisation and the data order follow it):
* Regular training: `models.vision.small_cnn` (width 16, no BatchNorm) from scratch on TRAIN_N Fashion-MNIST
  training images, the authors' CIFAR recipe: SGD lr 0.1, momentum 0.9, weight decay 1e-4, batch 128, the lr x0.1
  at 50% and 75% of the EPOCHS (their MultiStepLR [100, 150] of 200), no augmentation (theirs: flip and crop on
  CIFAR, which has no counterpart here). A checkpoint before the first step (their 0.pt) and after every epoch;
  test accuracy (the official 10,000 images) after every epoch: "final" is the last epoch, "best" the highest
  over the epochs (their best_prec1, chosen on the test set, so optimistic).
* (a) Head stage: `twa` on the checkpoints 0..round(f * EPOCHS) (f = 0.5: the authors' CIFAR run, 0..100 of 200;
  f = 0.6: the issue's "~60%"), from their mean (train_start -1), SGD, momentum 0.9, wd 1e-5, step
  schedule, batch 128, TWA_EPOCHS epochs over the same training images (their 10 of 200, scaled to EPOCHS).
  Its cost is round(f * EPOCHS) + TWA_EPOCHS epochs (the same batch and data, so the gradient steps' share is
  the epochs' share; the seconds are measured too). "Epochs to match": the first epoch at which regular
  training's test accuracy reaches TWA's; saved = 1 - cost / that epoch ("never": regular training does not
  reach it in EPOCHS, and 1 - cost / EPOCHS is a lower bound).
* (b) Tail stage: the checkpoints of the last TAIL_EPOCHS epochs: `twa` from the last one (train_start: their
  swa/run_twa.sh), wd 5e-5, step schedule, TWA_EPOCHS epochs; SWA over the same checkpoints through
  torch.optim.swa_utils (`merge.soups.swa`); the final checkpoint. The authors' tail stage follows SWA's own
  schedule (a constant swa_lr tail); here the tail is the step schedule's last quarter (lr 1e-3), as the issue
  asks for one regular run, so the tail checkpoints lie close together.
* BatchNorm: this CNN has none, so the BN recomputation the authors run after TWA, and SWA's update_bn, change
  nothing there. `--batchnorm` runs the same benchmark on small_cnn with a BatchNorm2d after each convolution
  (the authors' nets have BatchNorm), every TWA and SWA both without and with the statistics recomputed on the
  training images afterwards (`bn_update`, `update_bn`).
* `--swa-schedule` adds the authors' tail-stage setting (their swa/ folder): a second run per seed under SWA's
  own schedule (Izmailov et al.'s train.py as their swa/run.sh calls it: 1.5 budgets, swa_start at 56%, swa_lr
  0.05), TWA from the last of its checkpoints after swa_start, and SWA over the same.
* TWA's lr: the authors' 2 (set for BatchNorm nets, whose weights are scale-invariant) and 0.1 (regular
  training's peak lr): on this CNN without BatchNorm lr 2 diverged in the tail stage of a first 40-epoch run
  (learn's non-finite check); a diverged run is recorded as such, with no accuracy.
* Scale: EPOCHS = 20 on TRAIN_N = 20,480 images (160 steps an epoch, ~9 s on an idle-ish 2-core box, ~20 s at
  load 9 under nice) keeps one seed near 8-10 minutes with the evaluations and the six TWA runs; 20 makes the
  authors' fractions whole epochs (lr drops at 10 and 15, head 10 / 12 epochs, TWA 1 epoch, tail 5
  checkpoints). A first run at 40 epochs took ~19 minutes a seed at load 9, too long for the shared box.
* Reported: mean test accuracy over seeds with a t-based 95% CI, paired differences per seed, the epochs /
  steps / seconds saved, wall seconds, the machine and its load average.

    nice -n 10 python bench/twa_stages.py [--seeds 3]   # writes bench/results/twa_stages.{json,md}
    python bench/twa_stages.py --batchnorm --swa-schedule --out twa_stages_bn
    python bench/twa_stages.py --report                 # rewrites the summary and the .md from the .json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spinning OpenMP threads crawl on a shared CPU
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS_DIR, loadavg, machine, write_results  # noqa: E402
import merge_twa  # noqa: E402
from merge_twa import mean_ci  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from malleable.data.vision import load_fashion_mnist  # noqa: E402
from malleable.errors import RecipeError  # noqa: E402
from malleable.forget.data import collate_classification  # noqa: E402
from malleable.learn.engine import batch_indices  # noqa: E402
from malleable.merge.soups import swa  # noqa: E402
from malleable.merge.twa import twa  # noqa: E402
from malleable.report import peak_rss_mb  # noqa: E402

EPOCHS, TRAIN_N, BATCH = 20, 20_480, 128  # 160 steps an epoch
SWA_SCHEDULE = False  # --swa-schedule: also the tail stage under SWA's own schedule (a second training run)
LR, MOMENTUM, WD, MILESTONES = 0.1, 0.9, 1e-4, (0.5, 0.75)
TWA_EPOCHS = 1  # the authors' 10 TWA epochs of a 200-epoch run, scaled to EPOCHS (5%)
HEADS = (0.5, 0.6)
TAIL_EPOCHS = 5  # the last 25%
TWA_LRS = (2.0, 0.1)  # the authors' (BatchNorm nets), and regular training's peak lr
HEAD_TWA = {"lr": 2.0, "wd": 1e-5, "batch_size": BATCH, "schedule": "step", "train_start": -1}
TAIL_TWA = {"lr": 2.0, "wd": 5e-5, "batch_size": BATCH, "schedule": "step"}


BN = False  # --batchnorm: the CNN with a BatchNorm2d after each convolution (the authors' nets have BatchNorm)
SWA_BUDGET, SWA_START, SWA_LR = 1.5, 0.56, 0.05  # the authors' swa/run.sh: 225 epochs, swa_start 126, swa_lr 0.05


def make() -> torch.nn.Module:
    return merge_twa.make(BN)


def accuracy(state: dict, examples: list) -> float:
    return merge_twa.accuracy(state, examples, batchnorm=BN)


def swa_factor(epoch: int, swa_start: int) -> float:
    """SWA's learning-rate schedule (Izmailov et al.'s train.py, which the authors' swa/ folder runs): the
    initial lr for the first half of swa_start, a linear decay to swa_lr by 90% of it, then swa_lr."""
    t, ratio = epoch / swa_start, SWA_LR / LR
    return 1.0 if t <= 0.5 else 1.0 - (1.0 - ratio) * (t - 0.5) / 0.4 if t <= 0.9 else ratio


def clone(state: dict) -> dict:
    return {k: v.detach().clone() for k, v in state.items()}


def regular(seed: int, x: torch.Tensor, y: torch.Tensor, test: list, epochs: int, swa_start: int | None = None
            ) -> dict:
    """The authors' train_sgd_cifar loop: checkpoints (before training and after each epoch), test accuracy and
    training seconds (without the evaluation) per epoch. With `swa_start`: SWA's schedule (`swa_factor`) instead
    of the step schedule, as the authors' swa/train.py."""
    torch.manual_seed(seed)
    net = make()
    opt = torch.optim.SGD(net.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WD)
    sched = (torch.optim.lr_scheduler.MultiStepLR(opt, [int(epochs * m) for m in MILESTONES], 0.1)
             if swa_start is None else torch.optim.lr_scheduler.LambdaLR(opt, lambda e: swa_factor(e, swa_start)))
    per_epoch = len(x) // BATCH
    checkpoints, test_acc, seconds = [clone(net.state_dict())], [], []
    for epoch in range(epochs):
        t = time.perf_counter()
        net.train()
        for s in range(per_epoch):
            idx = torch.tensor(batch_indices(epoch * per_epoch + s, BATCH, len(x), seed))
            loss = F.cross_entropy(net(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
        seconds.append(time.perf_counter() - t)
        checkpoints.append(clone(net.state_dict()))
        test_acc.append(accuracy(checkpoints[-1], test))
    return {"checkpoints": checkpoints, "test": test_acc, "epoch_seconds": seconds}


def run_twa(checkpoints: list, train: list, params: dict, seed: int, test: list) -> dict:
    """One `twa` run; a diverged one (learn's non-finite check) is recorded as such, with no accuracy."""
    t = time.perf_counter()
    try:
        result = twa(checkpoints, make(), train, collate=collate_classification, form="twa", parameters=params,
                     seed=seed)
    except RecipeError as e:
        return {"test": None, "diverged": str(e), "seconds": round(time.perf_counter() - t, 2), "lr": params["lr"]}
    seconds = time.perf_counter() - t
    return {"test": accuracy(result.state, test), "seconds": round(seconds, 2), "lr": params["lr"],
            "basis_rank": result.info["basis_rank"],
            "final_loss": result.history[-1]["loss"] if result.history else None}


def one_seed(seed: int, images: torch.Tensor, labels: torch.Tensor, test: list, epochs: int, train_n: int) -> dict:
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:train_n]
    x, y = images[order], labels[order]
    train = list(zip(x, y.tolist()))
    load = loadavg()
    reg = regular(seed, x, y, test, epochs)
    per_epoch = len(x) // BATCH
    epoch_s = statistics.median(reg["epoch_seconds"])
    best = max(range(epochs), key=lambda e: reg["test"][e])
    row: dict = {"seed": seed, "loadavg_start": load,
                 "regular": {"test_per_epoch": reg["test"], "final": reg["test"][-1], "best": reg["test"][best],
                             "best_epoch": best + 1, "epoch_seconds_median": round(epoch_s, 2),
                             "seconds": round(sum(reg["epoch_seconds"]), 1), "steps": epochs * per_epoch},
                 "runs": {}}
    twa_epochs = max(1, round(TWA_EPOCHS * epochs / EPOCHS))
    bns = (False, True) if BN else (False,)  # TWA without and with BatchNorm statistics recomputed afterwards
    for lr, f, bn in [(lr, f, bn) for lr in TWA_LRS for f in HEADS for bn in bns]:
        head = round(f * epochs)
        r = run_twa(reg["checkpoints"][:head + 1], train,
                    {**HEAD_TWA, "lr": lr, "epochs": twa_epochs, "bn_update": bn}, seed, test)
        cost = head + twa_epochs
        r.update({"stage": "head", "checkpoints": head + 1, "epochs_used": cost, "steps_used": cost * per_epoch,
                  "seconds_used": round(head * epoch_s + r["seconds"], 1)})
        if r["test"] is not None:
            match = next((e + 1 for e in range(epochs) if reg["test"][e] >= r["test"]), None)
            r.update({"regular_epochs_to_match": match, "saved_is_lower_bound": match is None,
                      "epochs_saved_share": round(1 - cost / (match or epochs), 4),
                      "seconds_saved_share": round(1 - r["seconds_used"] / ((match or epochs) * epoch_s), 4)})
        row["runs"][f"head {round(f * 100)}% lr {lr:g}" + (" + BN update" if bn else "")] = r
    tail_n = max(1, round(TAIL_EPOCHS * epochs / EPOCHS))
    row["tail"] = tail_stage("tail", reg["checkpoints"][-tail_n:], reg["test"][-1], row["runs"], train, x, seed,
                             test, twa_epochs, bns)
    if SWA_SCHEDULE:  # the authors' tail stage: SWA's own schedule, 1.5 budgets, checkpoints after swa_start
        total = round(SWA_BUDGET * epochs)
        start = round(SWA_START * total)
        swa_run = regular(seed, x, y, test, total, swa_start=start)
        row["swa_schedule"] = {"epochs": total, "swa_start": start, "test_per_epoch": swa_run["test"],
                               "seconds": round(sum(swa_run["epoch_seconds"]), 1)}
        row["swa_tail"] = tail_stage("swa tail", swa_run["checkpoints"][start + 1:], swa_run["test"][-1],
                                     row["runs"], train, x, seed, test, twa_epochs, bns)
    return row


def tail_stage(stage: str, checkpoints: list, final: float, runs: dict, train: list, x: torch.Tensor, seed: int,
               test: list, twa_epochs: int, bns: tuple) -> dict:
    """TWA from the last of `checkpoints` (each lr, without and with the BN update) into `runs`, and SWA over them
    (without and with update_bn); returns the references: the final checkpoint's and SWA's accuracy."""
    n = len(checkpoints)
    for lr, bn in [(lr, bn) for lr in TWA_LRS for bn in bns]:
        r = run_twa(checkpoints, train, {**TAIL_TWA, "lr": lr, "epochs": twa_epochs, "train_start": n - 1,
                                         "bn_update": bn}, seed, test)
        runs[f"{stage} lr {lr:g}" + (" + BN update" if bn else "")] = {**r, "stage": stage, "checkpoints": n}
    modules = []
    for sd in checkpoints:
        m = make()
        m.load_state_dict(sd)
        modules.append(m)
    out = {"checkpoints": n, "final": final}
    for bn in bns:
        t = time.perf_counter()
        averaged = swa(modules, bn_data=[x[i:i + BATCH] for i in range(0, len(x), BATCH)] if bn else None)
        out["swa + update_bn" if bn else "swa"] = {"test": accuracy(averaged.state_dict(), test),
                                                   "seconds": round(time.perf_counter() - t, 2)}
    for r in runs.values():
        if r.get("stage") == stage:
            r["ref_final"], r["ref_swa"] = final, out["swa"]["test"]
    return out


def _ci(xs: list[float]) -> dict:
    if not xs:
        return {"mean": None, "ci95": None, "per_seed": []}
    m, ci = mean_ci(xs)
    return {"mean": round(m, 3), "ci95": None if ci is None else round(ci, 3), "per_seed": [round(v, 3) for v in xs]}


def summarise(rows: list[dict]) -> dict:
    out: dict = {"regular final": _ci([r["regular"]["final"] for r in rows]),
                 "regular best": _ci([r["regular"]["best"] for r in rows]),
                 "tail final": _ci([r["tail"]["final"] for r in rows])}
    for key, name in (("tail", "tail"), ("swa_tail", "swa tail")):
        if key not in rows[0]:
            continue
        out[f"{name} final"] = _ci([r[key]["final"] for r in rows])
        for swa_key in ("swa", "swa + update_bn"):
            if swa_key in rows[0][key]:
                label = f"{name} SWA" + (" + update_bn" if swa_key != "swa" else "")
                out[label] = {**_ci([r[key][swa_key]["test"] for r in rows]),
                              "minus_final": _ci([r[key][swa_key]["test"] - r[key]["final"] for r in rows])}
    for label, first in rows[0]["runs"].items():
        runs = [(row, row["runs"][label]) for row in rows]
        ok = [(row, r) for row, r in runs if r["test"] is not None]
        v = {**_ci([r["test"] for _, r in ok]), "stage": first["stage"], "lr": first["lr"],
             "diverged_seeds": [row["seed"] for row, r in runs if r["test"] is None],
             "seconds_median": round(statistics.median(r["seconds"] for _, r in runs), 2)}
        if first["stage"] == "head":
            v.update({"minus_final": _ci([r["test"] - row["regular"]["final"] for row, r in ok]),
                      "minus_best": _ci([r["test"] - row["regular"]["best"] for row, r in ok]),
                      "epochs_used": first["epochs_used"], "regular_epochs": len(rows[0]["regular"]["test_per_epoch"]),
                      "epochs_to_match": [r.get("regular_epochs_to_match", "diverged") for _, r in runs],
                      "epochs_saved_share": _ci([r["epochs_saved_share"] for _, r in ok]),
                      "seconds_saved_share": _ci([r["seconds_saved_share"] for _, r in ok])})
        else:
            v.update({"minus_final": _ci([r["test"] - r.get("ref_final", row["tail"]["final"]) for row, r in ok]),
                      "minus_swa": _ci([r["test"] - r.get("ref_swa", row["tail"]["swa"]["test"]) for row, r in ok])})
        out[f"TWA {label}"] = v
    return out


def _side(d: dict) -> str:
    if d["ci95"] is None:
        return "without an interval (fewer than 2 seeds)"
    return ("above" if d["mean"] - d["ci95"] > 0 else "below" if d["mean"] + d["ci95"] < 0
            else "not distinguishable from")


def _pm(d: dict, pct: bool = False) -> str:
    if d["mean"] is None:
        return "n/a"
    return f"{d['mean']:.1%} ±{d['ci95']}" if pct else f"{d['mean']:+.2f} ±{d['ci95']}"


def verdict(s: dict) -> str:
    parts = []
    for h, v in s.items():
        if v.get("stage") != "head":
            continue
        if v["mean"] is None:
            parts.append(f"{h} diverged in every seed.")
            continue
        sv = v["epochs_saved_share"]
        claim = "holds" if sv["mean"] > 0.4 else "is not met"
        parts.append(f"{h} ({v['epochs_used']} of {v['regular_epochs']} epochs) is {_side(v['minus_final'])} "
                     f"regular training's final accuracy ({_pm(v['minus_final'])}) and {_side(v['minus_best'])} "
                     f"its best ({_pm(v['minus_best'])}); regular training reaches its accuracy at epochs "
                     f"{v['epochs_to_match']} (None: never); epochs saved at equal accuracy {_pm(sv, True)}: the "
                     f"paper's '> 40% of epochs saved at equal accuracy' {claim} here"
                     + (f" (diverged in seeds {v['diverged_seeds']})" if v["diverged_seeds"] else "") + ".")
    for h, v in s.items():
        if v.get("stage") in ("tail", "swa tail"):
            parts.append(f"{h}: minus SWA {_pm(v['minus_swa'])} ({_side(v['minus_swa'])} SWA), minus the final "
                         f"checkpoint {_pm(v['minus_final'])}"
                         + (f", diverged in seeds {v['diverged_seeds']}" if v["diverged_seeds"] else "") + ".")
    parts += [f"{k} minus the final checkpoint {_pm(v['minus_final'])}." for k, v in s.items()
              if " SWA" in k and "minus_final" in v]
    return " ".join(parts)


def markdown(result: dict) -> str:
    s, mach, st = result["summary"], result["machine"], result["settings"]

    def acc(v: dict) -> str:
        return "diverged" if v["mean"] is None else f"{v['mean']:.2f} ±{v['ci95']}"

    def div(v: dict) -> str:
        return f" (diverged: seeds {v['diverged_seeds']})" if v["diverged_seeds"] else ""

    lines = ["# twa_stages: TWA in the head and the tail stage of training (Fashion-MNIST CNN)", "",
             f"{len(result['rows'])} seeds ({', '.join(str(r['seed']) for r in result['rows'])}). small_cnn (width "
             + ("16, a BatchNorm2d after each convolution; TWA and SWA each without and with the BatchNorm "
                "statistics recomputed on the training images afterwards" if st.get("batchnorm") else
                "16, no BatchNorm: BN recomputation is moot")
             + f") trained from scratch on {st['train_n']} Fashion-MNIST "
             f"images for {st['epochs']} epochs of {st['train_n'] // st['batch']} steps (batch {st['batch']}), the "
             f"authors' CIFAR recipe scaled down: SGD lr {st['lr']}, momentum {st['momentum']}, wd {st['wd']}, lr "
             f"x0.1 at epochs {[int(st['epochs'] * m) for m in st['milestones']]}. TWA (the ICLR form, `twa`): SGD, "
             f"step schedule, {st['twa_epochs']} epoch(s) (the authors' 10 of 200), lr 2 (the authors', set for "
             "BatchNorm nets) and lr 0.1 (regular training's peak lr); head from the mean of checkpoints 0..k "
             "(wd 1e-5), tail from the last checkpoint (wd 5e-5). Test = the official 10,000; mean (%) ± t-based "
             "95% CI over seeds; differences paired per seed; a diverged run (non-finite loss) has no accuracy "
             "and is left out of the means.", "",
             "## (a) Head stage: TWA on the first epochs' checkpoints against regular training", "",
             "| | test acc | minus regular final | minus regular best | epochs used | regular epochs to reach it "
             "(per seed) | epochs saved at equal acc | seconds saved | TWA seconds (median) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
             f"| regular final (epoch {st['epochs']}) | {acc(s['regular final'])} | | | {st['epochs']} | | | | |",
             f"| regular best (over epochs, on test) | {acc(s['regular best'])} | | | | | | | |"]
    for h, v in s.items():
        if v.get("stage") == "head":
            lines.append(f"| {h} ({v['epochs_used'] - st['twa_epochs']} + {st['twa_epochs']}){div(v)} | {acc(v)} | "
                         f"{_pm(v['minus_final'])} | {_pm(v['minus_best'])} | {v['epochs_used']} | "
                         f"{v['epochs_to_match']} | {_pm(v['epochs_saved_share'], True)} | "
                         f"{_pm(v['seconds_saved_share'], True)} | {v['seconds_median']} |")
    lines += ["", "Epochs saved = 1 - epochs used / the first epoch at which regular training's test accuracy "
              "reaches TWA's (None: it never does within the run; then the share is taken against the whole run "
              "and is a lower bound; negative: TWA costs more epochs than regular training needs for its accuracy). "
              "Gradient steps: TWA uses the same batch and data, so their share equals the epochs'. Seconds saved "
              "uses the median seconds of a regular epoch and TWA's measured seconds.", "",
              "## (b) Tail stage: the last epochs' checkpoints", ""]

    def tail_table(name: str) -> list[str]:
        out = ["| | test acc | minus final | minus SWA | seconds (median) |", "|---|---:|---:|---:|---:|",
               f"| final checkpoint | {acc(s[f'{name} final'])} | | | |"]
        out += [f"| {k.removeprefix(name + ' ')} (swa_utils) | {acc(v)} | {_pm(v['minus_final'])} | | |"
                for k, v in s.items() if k.startswith(f"{name} SWA")]
        out += [f"| {h} (from the last){div(v)} | {acc(v)} | {_pm(v['minus_final'])} | {_pm(v['minus_swa'])} | "
                f"{v['seconds_median']} |" for h, v in s.items() if v.get("stage") == name]
        return out

    lines += tail_table("tail")
    lines += ["", f"Tail checkpoints: epochs {st['epochs'] - st['tail_epochs'] + 1}..{st['epochs']}, all after the "
              "last lr drop (lr 1e-3), so they lie close together; the authors' tail stage uses SWA's schedule "
              "(a constant, larger swa_lr), where they report the larger gains" + (" (c, below)." if "swa tail final"
                                                                                   in s else "."), ""]
    if "swa tail final" in s:
        sw = result["rows"][0]["swa_schedule"]
        lines += ["## (c) Tail stage under SWA's own schedule (the authors' swa/ setting)", "",
                  f"A second run per seed: {sw['epochs']} epochs (SWA's 1.5 budgets), lr {st['lr']} for the first "
                  f"half of swa_start = {sw['swa_start']}, a linear decay to swa_lr {SWA_LR} by 90% of it, then "
                  f"swa_lr (Izmailov et al.'s train.py, run by the authors' swa/run.sh); the tail is the checkpoints "
                  f"after epochs {sw['swa_start'] + 1}..{sw['epochs']}; TWA from the last one as their "
                  "swa/run_twa.sh (wd 5e-5, step schedule).", ""]
        lines += tail_table("swa tail") + [""]
    lines += [
              "Regular training's test accuracy per epoch: " + "; ".join(
                  f"seed {r['seed']}: " + " ".join(f"{a:.1f}" for a in r["regular"]["test_per_epoch"])
                  for r in result["rows"]), "",
              f"Machine: {mach['cpu']}, {mach['cores']} cores, {mach['ram_gib']} GiB, shared with other jobs; load "
              f"average before {result['loadavg_before']}, after {result['loadavg_after']}, at each seed's start "
              f"{[r['loadavg_start'] for r in result['rows']]} (the seconds are indicative only). Median regular "
              f"epoch {statistics.median(r['regular']['epoch_seconds_median'] for r in result['rows'])} s. Peak "
              f"RSS {result['peak_rss_mb']} MB; wall {result['wall_s']} s (summed over the invocations that ran the "
              "seeds).", "", "Verdict: " + result["verdict"], ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=EPOCHS, help="regular training's epochs (a smoke test: fewer)")
    ap.add_argument("--train-n", type=int, default=TRAIN_N, help="training images (a smoke test: fewer)")
    ap.add_argument("--out", default="twa_stages")
    ap.add_argument("--report", action="store_true", help="rebuild the summary and the .md from the .json only")
    ap.add_argument("--batchnorm", action="store_true", help="the CNN with BatchNorm (TWA and SWA with and "
                    "without the BatchNorm statistics recomputed)")
    ap.add_argument("--swa-schedule", action="store_true", help="also the tail stage under SWA's own schedule")
    ap.add_argument("--add-seeds", action="store_true", help="keep the seeds already in the .json and run only "
                    "the missing ones (same settings), e.g. a third seed after two")
    args = ap.parse_args()
    global BN, SWA_SCHEDULE
    BN, SWA_SCHEDULE = args.batchnorm, args.swa_schedule
    if args.report:
        result = json.loads((RESULTS_DIR / f"{args.out}.json").read_text())
    else:
        torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
        before, start = loadavg(), time.perf_counter()
        full = load_fashion_mnist("train")
        test = load_fashion_mnist("test").examples()
        rows, earlier = [], None
        if args.add_seeds:
            earlier = json.loads((RESULTS_DIR / f"{args.out}.json").read_text())
            rows = earlier["rows"]
            if (earlier["settings"]["epochs"], earlier["settings"]["train_n"], earlier["settings"]["batchnorm"],
                    earlier["settings"]["swa_schedule"]) != (args.epochs, args.train_n, BN, SWA_SCHEDULE):
                raise SystemExit(f"{args.out}.json was run with other settings; rerun it whole")
        for seed in range(args.seeds):
            if any(r["seed"] == seed for r in rows):
                continue
            rows.append(one_seed(seed, full.images, full.labels, test, args.epochs, args.train_n))
            r = rows[-1]
            print(f"seed {seed}: regular final {r['regular']['final']:.2f} best {r['regular']['best']:.2f}, "
                  + ", ".join(f"TWA {h} {v['test']}" for h, v in r["runs"].items())
                  + f", tail SWA {r['tail']['swa']['test']:.2f}"
                  + (f", swa-schedule tail SWA {r['swa_tail']['swa']['test']:.2f}" if "swa_tail" in r else ""),
                  flush=True)
        wall = round(time.perf_counter() - start, 1)
        result = {"benchmark": "twa_stages", "machine": machine(),
                  "loadavg_before": earlier["loadavg_before"] if earlier else before,
                  "loadavg_after": loadavg(), "wall_s": wall + (earlier["wall_s"] if earlier else 0),
                  "peak_rss_mb": max(peak_rss_mb(), earlier["peak_rss_mb"] if earlier else 0),
                  "settings": {"epochs": args.epochs, "train_n": args.train_n, "batch": BATCH, "lr": LR, "momentum": MOMENTUM,
                               "wd": WD, "milestones": MILESTONES, "heads": HEADS,
                               "twa_epochs": max(1, round(TWA_EPOCHS * args.epochs / EPOCHS)),
                               "tail_epochs": max(1, round(TAIL_EPOCHS * args.epochs / EPOCHS)),
                               "head_twa": HEAD_TWA, "tail_twa": TAIL_TWA, "twa_lrs": TWA_LRS,
                               "seeds": sorted(r["seed"] for r in rows), "batchnorm": BN, "swa_schedule": SWA_SCHEDULE},
                  "rows": rows}
    result["summary"] = summarise(result["rows"])
    result["verdict"] = verdict(result["summary"])
    write_results(args.out, result, markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
