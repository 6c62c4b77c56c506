#!/usr/bin/env python
"""Benchmark: Protocol 2, TOFU-style unlearning of fictitious people from SmolLM2-135M-Instruct.

The target is fine-tuned on every fictitious person, the retain model (the gold standard) on everyone but the
forget split, both once and cached per split (`malleable.protocols.forget_llm`). Each unlearning objective then
starts from a fresh copy of the target, per seed, and is scored with TOFU's metrics against the retain model.
The seed changes the unlearning run (data order, RMU's direction), not the target or the data. Every model
(target, retain, each unlearned one) then faces the same relearning attack (`protocols.forget_llm.RELEARN`): a few
fine-tuning steps on a quarter of the forget split, re-measured on the rest; the second table per split shows
it, and how much of what unlearning removed came back (relative to the target).

Sizes come from a preset that single flags override: `cpu` (default; what produced results/forget_llm.*:
40 people x 5 QA, batch 8) or `tofu` (TOFU's 200 people x 20 QA, forget01/05/10 = 2/10/20 people, batch 32,
400 retain and all 116 world_facts questions, 32-token answers; for a GPU, writes results/forget_llm_tofu.*).
Models run on accelerate's device (the GPU when there is one), in float32.

  # CPU, the committed run (2 shared cores: about 30 min per fine-tune, 1-3 min per unlearning run, plus attacks)
  python bench/forget_llm.py --objectives ga,graddiff,npo,simnpo,rmu --forget forget10 --seeds 0,1,2
  # smallest smoke run (a throwaway cache and results folder; forget01 of 10 people = 1 person)
  MALLEABLE_CACHE=/tmp/fl python bench/forget_llm.py --people 10 --qa-per-person 2 --ft-epochs 1 --epochs 1 \
      --retain-eval 2 --world-eval 2 --objectives ga --forget forget01 --results /tmp/fl
  # the issue-13 objectives (default --objectives: all nine), answers generated up to each gold answer's length + 8
  python bench/forget_llm.py --objectives dpo,idkdpo,undial,wga --forget forget10 --seeds 0,1,2 \
      --max-new-tokens gold --name forget_llm_gold
  # calibrated runs that also search step sizes (x3, x10, x30 of each objective's lr; issue 13), beside the
  # fixed and plain calibrated runs already in the file
  python bench/forget_llm.py --objectives simnpo,rmu,wga,dpo,idkdpo --seeds 0,1,2 --calibrate 0.1 \
      --search-lr 3,10,30 --lr-rmu 1e-3 --name forget_llm_calibrated
  # the same searching arms with the stop rule's retain guard (retain loss at most 1.25x the target's)
  python bench/forget_llm.py --objectives simnpo,rmu,wga,dpo,idkdpo --seeds 0,1,2 --calibrate 0.1 \
      --search-lr 3,10,30 --retain-limit 1.25 --lr-rmu 1e-3 --name forget_llm_calibrated
  # one GPU, TOFU size, every split
  python bench/forget_llm.py --preset tofu --objectives ga,graddiff,npo,simnpo,rmu \
      --forget forget01,forget05,forget10 --seeds 0,1,2

Runs already in the JSON (same split, objective, seed, unlearning settings, with the same relearning attack,
under the current metric definitions) are kept and not rerun; any other is rerun and replaced.
`--render` rewrites the .md and .png from the JSON without running anything (PrivLeak recomputed from the
stored AUCs; runs under earlier metric definitions named in a note).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS_DIR, fmt, loadavg, machine, paired_t, write_results  # noqa: E402

NAME = "forget_llm"
# the default --objectives: the issue-4 five, then the issue-13 additions (DPO with each question's first perturbed
# answer preferred, IdkDPO with a seeded refusal preferred, UNDIAL, WGA), each at its own file's defaults
OBJECTIVES = ("ga", "graddiff", "npo", "simnpo", "rmu", "dpo", "idkdpo", "undial", "wga")
PRESETS = {
    "cpu": {"people": 40, "qa_per_person": 5, "ft_batch_size": 8, "batch_size": 8, "retain_eval": 20,
            "world_eval": 20, "max_new_tokens": 16, "eval_batch_size": 16, "name": NAME},
    "tofu": {"people": 200, "qa_per_person": 20, "ft_batch_size": 32, "batch_size": 32, "retain_eval": 400,
             "world_eval": 116, "max_new_tokens": 32, "eval_batch_size": 64, "name": f"{NAME}_tofu"},
}
COLUMNS = (("forget_quality", "forget quality ↑"), ("model_utility", "model utility ↑"),
           ("forget_probability", "forget prob"), ("forget_rouge_l", "forget ROUGE-L"),
           ("forget_truth_ratio", "forget TR"), ("forget_extraction_strength", "forget ES"),
           ("retain_rouge_l", "retain ROUGE-L"), ("world_facts_rouge_l", "world ROUGE-L"),
           ("mia_auc_min_k", "MIA AUC (min-k)"), ("privacy_leakage", "PrivLeak %"))
# (part of a relearn result, metric) pairs of the relearning table
RELEARN_COLUMNS = tuple((part, m) for m in ("probability", "rouge_l", "truth_ratio") for part in ("before", "after")
                        ) + (("recovered", "probability"), ("recovered", "rouge_l"), ("excess_gain", "probability"),
                             ("excess_gain", "rouge_l"))
RELEARN_LABELS = ("prob before", "prob after", "ROUGE-L before", "ROUGE-L after", "TR before", "TR after",
                  "prob recovered", "ROUGE-L recovered", "prob gain - retain's", "ROUGE-L gain - retain's")


def run_key(run: dict) -> str:
    return json.dumps([run["forget"], run["objective"], run["seed"], run["settings"], run.get("calibrate")],
                      sort_keys=True)


def label(run: dict) -> str:
    """The row a run is aggregated into: its objective and lr (the step sizes searched, when a list), and its
    stopping rule when calibrated (with its retain guard's factor, when guarded)."""
    cal, lr = run.get("calibrate"), run["settings"]["lr"]
    lrs = "/".join(f"{x:g}" for x in lr) + " searched" if isinstance(lr, list) else f"{lr:g}"
    guard = f", retain loss ≤ {cal['retain_limit']:g}x" if cal and cal.get("retain_limit") else ""
    return f"{run['objective']} (lr {lrs})" + (f", calibrated ±{cal['tolerance']:g}" if cal else "") + guard


def fixed_settings(run: dict) -> str:
    """The settings of the fixed-budget run a calibrated one is compared with: the same, at the objective's own lr
    where the calibrated run searched a list of step sizes around it."""
    return json.dumps({**run["settings"], "lr": run.get("base_lr", run["settings"]["lr"])}, sort_keys=True)


def _stats(vals: list) -> dict | None:
    """Mean, population std and count of the values that are not None (NaN propagates); None if none."""
    import numpy as np

    vals = [v for v in vals if v is not None]
    return {"mean": float(np.mean(vals)), "std": float(np.std(vals)), "n": len(vals)} if vals else None


def aggregate(runs: list[dict]) -> dict:
    """Per metric: mean and population std over the runs (seeds) of one objective; "relearn" the same per
    relearning column over the runs that have the attack (a share recovered may be None: nothing removed)."""
    out = {metric: _stats([r["summary"][metric] if metric != "seconds" else r["seconds"] for r in runs])
           for metric, _ in COLUMNS + (("seconds", ""),)}
    attacked = [r["relearn"] for r in runs if "relearn" in r]
    if attacked:
        out["relearn"] = {"n": len(attacked), **{f"{part}.{m}": _stats([a[part][m] for a in attacked])
                                                 for part, m in RELEARN_COLUMNS}}
    return out


def table(result: dict, forget: str) -> str:
    head = "| model | seeds | " + " | ".join(c for _, c in COLUMNS) + " | unlearn s |"
    lines = [head, "|---|---:|" + "---:|" * (len(COLUMNS) + 1)]
    refs = result["reference"][forget]
    for name in ("target", "retain"):
        s = refs[name]
        lines.append(f"| {name} (reference) | - | " + " | ".join(fmt(s[m], 3) for m, _ in COLUMNS) + " | - |")
    for objective, agg in result["aggregate"].get(forget, {}).items():
        n = agg["n"]
        cells = [fmt(agg[m]["mean"], 3) + (f" ± {fmt(agg[m]['std'], 3)}" if n > 1 else "") for m, _ in COLUMNS]
        lines.append(f"| {objective} | {n} | " + " | ".join(cells) + f" | {agg['seconds']['mean']:.0f} |")
    return "\n".join(lines)


def relearn_table(result: dict, forget: str) -> str:
    """Before/after the attack on the held-back forget rows and the share recovered; blanks for rows without
    the attack (runs from before it was part of the benchmark). Empty when no row has it."""
    refs, aggs = result["reference"][forget], result["aggregate"].get(forget, {})
    rows = [(f"{name} (reference)", "-", refs[name].get("relearn")) for name in ("target", "retain")]
    rows += [(objective, str(agg["relearn"]["n"]) if "relearn" in agg else "", agg.get("relearn"))
             for objective, agg in aggs.items()]
    if not any(r for _, _, r in rows):
        return ""
    lines = ["| model | seeds | " + " | ".join(RELEARN_LABELS) + " |", "|---|---:|" + "---:|" * len(RELEARN_LABELS)]
    for label, n, r in rows:
        if r is None:
            cells = [""] * len(RELEARN_COLUMNS)
        elif "trained_on" in r:  # a reference model's own attack
            cells = [fmt(r[part][m], 3) for part, m in RELEARN_COLUMNS]
        else:  # an objective's aggregate
            cells = [_cell(r[f"{part}.{m}"]) for part, m in RELEARN_COLUMNS]
        lines.append(f"| {label} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cell(stats: dict | None) -> str:
    if stats is None:
        return "n/a"
    return fmt(stats["mean"], 3) + (f" ± {fmt(stats['std'], 3)}" if stats["n"] > 1 else "")


def relearn_line(result: dict, forget: str) -> list[str]:
    """One line: the attack, what it did to the target and retain model, and the objectives' gains beyond the
    retain model's (knowledge revived)."""
    refs = result["reference"][forget]
    target, retain = refs["target"].get("relearn"), refs["retain"].get("relearn")
    if target is None:
        return []
    gains = {o: a["relearn"]["excess_gain.probability"] for o, a in result["aggregate"].get(forget, {}).items()
             if a.get("relearn")}
    line = (f"Relearning attack: {target['steps']} AdamW steps at lr {target['lr']:g} on {target['trained_on']} "
            f"forget questions, measured on the other {target['measured_on']}. Forget probability there: target "
            f"{target['before']['probability']:.3f} → {target['after']['probability']:.3f}, retain model "
            f"{retain['before']['probability']:.3f} → {retain['after']['probability']:.3f}.")
    if gains:
        ends = sorted({min(gains, key=lambda o: gains[o]["mean"]), max(gains, key=lambda o: gains[o]["mean"])},
                      key=lambda o: gains[o]["mean"])
        line += (" Probability gained beyond the retain model's gain: "
                 + " to ".join(f"{gains[o]['mean']:+.3f} ({o})" for o in ends)
                 + "; above 0 is knowledge the attack revives rather than teaches.")
    return [line, ""]


def plot(result: dict, path: Path) -> None:
    """Forget quality against model utility, one panel per forget split."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    splits = sorted(result["aggregate"])
    fig, axes = plt.subplots(1, len(splits), figsize=(6 * len(splits), 4.5), squeeze=False)
    for ax, forget in zip(axes[0], splits):
        for name, marker, colour in (("target", "s", "black"), ("retain", "*", "goldenrod")):
            s = result["reference"][forget][name]
            ax.scatter(s["model_utility"], max(s["forget_quality"], 1e-12), marker=marker, s=120, c=colour,
                       label=name)
        for i, (objective, agg) in enumerate(result["aggregate"][forget].items()):
            ax.errorbar(agg["model_utility"]["mean"], max(agg["forget_quality"]["mean"], 1e-12),
                        xerr=agg["model_utility"]["std"], fmt="o", capsize=3, color=f"C{i}", label=objective)
        ax.axhline(0.05, ls="--", c="grey", lw=0.8)
        ax.set_yscale("log")
        ax.set_xlabel("model utility")
        ax.set_ylabel("forget quality (KS p-value, log)")
        ax.set_title(f"SmolLM2-135M, fictitious people, {forget}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown(result: dict) -> str:
    from malleable.evaluate.llm_forget import MIN_REMOVED

    s, m = result["protocol"], result["machine"]
    where = f"{m['gpu']} + {m['cpu']}" if m.get("gpu") else f"{m['cpu']} ({m['cores']} cores, shared)"
    parts = [
        "# forget: language models (Protocol 2, TOFU-style fictitious people)",
        "",
        f"SmolLM2-135M-Instruct (Q4_1 GGUF de-quantised to fp32), on {where}, "
        f"{m['date']}. Data: {s['people']} fictitious people × {s['qa_per_person']} QA "
        f"({s['perturbed']} perturbed answers each), data seed {s['data_seed']}; holdout = as many never-trained "
        f"people as the forget split. Target and retain model: {s['learn_method']} "
        f"(r {s['rank']}, alpha {s['alpha']}, all linear layers) for {s['epochs']:g} epochs, batch {s['batch_size']}, "
        f"lr {s['lr']}, cosine, seed {s['seed']}, merged into the base before unlearning; every weight unlearns "
        f"(RMU: its three MLP down-projections). Evaluation: the whole forget split, {s['retain_eval']} retain "
        f"questions, {s['world_eval']} world_facts questions, greedy answers of at most {answer_words(s)} "
        f"tokens. Metric definitions: `src/malleable/evaluate/llm_forget.py`.",
        "",
    ]
    for forget in sorted(result["aggregate"]):
        ft = result.get("fine_tune", {}).get(forget, {})
        parts += [f"## {forget}", "", f"Unlearning settings: `{json.dumps(result['unlearn_settings'][forget])}`. "
                  + " ".join(f"{name.capitalize()} fine-tune: {f['steps']} steps, final train loss "
                             f"{f['train_loss']}, {f['seconds']:.0f} s." for name, f in ft.items()),
                  "", table(result, forget), ""]
        parts += verdict(result, forget)
        parts += calibration_section(result, forget)
        relearned = relearn_table(result, forget)
        if relearned:
            parts += ["Relearning attack on the held-back forget questions (recovered: share of the target's "
                      "lead over this model, before the attack, that the attack closed, blank below a lead of "
                      f"{MIN_REMOVED}; gain - retain's: what the attack added here beyond what it added to the "
                      "retain model, which never saw these people):", "", relearned, ""]
            parts += relearn_line(result, forget)
    legacy = legacy_note(result)
    parts += ["", "## Reductions and caveats", ""] + [f"- {n}" for n in ([legacy] if legacy else [])
                                                       + result["notes"]] + [""]
    return "\n".join(parts)


# the distance to the retain model (the gold standard) that calibration should shrink: the mean absolute
# difference over the forget-side metrics, the membership attack's AUC and model utility, x 100 (as the
# classifier protocol's Avg. Gap averages UA, RA, TA and MIA-efficacy)
GAP_METRICS = ("forget_probability", "forget_rouge_l", "forget_truth_ratio", "forget_extraction_strength",
               "mia_auc_min_k", "model_utility")


def gap_to_retain(summary: dict, retain: dict) -> float:
    return 100 * sum(abs(summary[m] - retain[m]) for m in GAP_METRICS) / len(GAP_METRICS)


def calibration_section(result: dict, forget: str) -> list[str]:
    """Each calibrated arm against the fixed-budget run of the same objective, lr and seed (issue 13): the gap
    to the retain model, paired over seeds, where the rule stopped, and which side of the retrain target the
    evaluation's membership attack puts each final model (`forget.stopping.side` of its min-k AUC against
    the holdout people, rows the rule never read)."""
    from malleable.forget.stopping import side

    runs = [r for r in result["runs"] if r["forget"] == forget]
    retain = result["reference"][forget]["retain"]
    fixed = {(r["objective"], r["seed"], fixed_settings(r)): r for r in runs if "calibrate" not in r}
    pairs: dict = {}
    for r in (r for r in runs if "calibrate" in r):
        f = fixed.get((r["objective"], r["seed"], fixed_settings(r)))
        if f is not None:
            pairs.setdefault(label(r), []).append((f, r))
    if not pairs:
        return []
    lines = ["Calibrated stopping against the fixed budget (issue 13): the same objective, lr, budget and seed, "
             "stopped by `StopRule(\"indistinguishable\")` on the forget rows against the `calibration` split's "
             "never-trained people (not the holdout the evaluation's attack reads). Gap to retain = mean |run - "
             f"retain model| over {', '.join(GAP_METRICS)}, x 100; difference = calibrated - fixed per seed, "
             "mean and 95% t interval (negative: closer to the retain model). Sides from the evaluation's min-k "
             "AUC at the arm's tolerance; the retain model's own AUC is "
             f"{fmt(retain['mia_auc_min_k'], 3)}. An arm that searched step sizes (`forget.stopping."
             "search_step_size`: each from the target, smallest first, the first whose rule reaches the target "
             "kept, else the closest) is compared with the fixed run at the objective's own lr, and its stop step "
             "names the lr kept. A guarded arm (no check kept whose retain loss passes a factor of the target's, "
             "on retain rows utility is not scored on) names the check where the kept run first passed it.", "",
             "| calibrated run | seeds | stop step (of budget) | gap fixed | gap calibrated | difference [95% CI] | "
             "AUC fixed | AUC calibrated | over / calibrated / under, fixed | over / calibrated / under, calibrated "
             "| utility fixed | utility calibrated |",
             "|---|---:|---|---:|---:|---|---:|---:|---|---|---:|---:|"]
    for name, ps in sorted(pairs.items()):
        tol = ps[0][1]["calibrate"]["tolerance"]
        gf = [gap_to_retain(f["summary"], retain) for f, _ in ps]
        gc = [gap_to_retain(c["summary"], retain) for _, c in ps]
        d = paired_t(gf, gc)

        def sides(rs):
            s = [side(r["summary"]["mia_auc_min_k"], tol) for r in rs]
            return " / ".join(str(s.count(k)) for k in ("over-unlearned", "calibrated", "under-unlearned"))

        stops = [str(c["stopping"]["restored_to"] or c["steps"])
                 + (f" at lr {c['lr_search']['lr']:g}" if "lr_search" in c else "")
                 + (f" (limit passed at {c['stopping']['broken_at']})" if c["stopping"].get("broken_at") else "")
                 for _, c in ps]

        def utility(rs):
            return fmt(sum(r["summary"]["model_utility"] for r in rs) / len(rs), 3)

        lines.append(f"| {name} | {len(ps)} | {', '.join(map(str, stops))} (of {ps[0][0]['steps']}) | "
                     f"{fmt(sum(gf) / len(gf))} | {fmt(sum(gc) / len(gc))} | {fmt(d['mean'])} [{fmt(d['lo'])}, "
                     f"{fmt(d['hi'])}] | {fmt(sum(f['summary']['mia_auc_min_k'] for f, _ in ps) / len(ps), 3)} | "
                     f"{fmt(sum(c['summary']['mia_auc_min_k'] for _, c in ps) / len(ps), 3)} | "
                     f"{sides([f for f, _ in ps])} | {sides([c for _, c in ps])} | {utility([f for f, _ in ps])} | "
                     f"{utility([c for _, c in ps])} |")
    return lines + [""]


def verdict(result: dict, forget: str) -> list[str]:
    """The issue's target: forget quality > 0.05 with model utility within 10% of the target's."""
    target = result["reference"][forget]["target"]["model_utility"]
    agg = result["aggregate"].get(forget, {})
    ok = {o: a for o, a in agg.items() if a["forget_quality"]["mean"] > 0.05
          and a["model_utility"]["mean"] >= 0.9 * target}
    best = max(agg, key=lambda o: (agg[o]["model_utility"]["mean"] >= 0.9 * target,
                                   agg[o]["forget_quality"]["mean"]), default=None)
    if not agg:
        return []
    line = (f"Target (issue 4): forget quality > 0.05 with model utility ≥ 90% of the target's "
            f"({0.9 * target:.3f}). ")
    line += (f"Met by: {', '.join(sorted(ok))}." if ok else
             f"Not met by any objective; closest: {best} (forget quality {agg[best]['forget_quality']['mean']:.3g}, "
             f"model utility {agg[best]['model_utility']['mean']:.3f}).")
    fq = result["reference"][forget]["target"]["forget_quality"]
    if fq > 0.05:
        line += (f" The untouched target already has forget quality {fq:.3g} > 0.05: at this forget-set size the "
                 f"KS test cannot reject the target either, so meeting the criterion shows little here.")
    return [line, ""]


def answer_length(text: str) -> int | str:
    """--max-new-tokens: a positive whole number or "gold"."""
    if text == "gold":
        return text
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a positive whole number nor 'gold'")
    return int(text)


def answer_words(protocol: dict) -> str:
    from malleable.evaluate.llm_forget import GOLD_MARGIN

    n = protocol["max_new_tokens"]
    return f"the gold answer's length + {GOLD_MARGIN}" if n == "gold" else str(n)


def parse_args(description: str = __doc__, extra=None) -> argparse.Namespace:
    """The flags, with the chosen preset's values as defaults (any flag given overrides its preset value);
    `extra(parser)` adds a calling script's own."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", choices=sorted(PRESETS), default="cpu",
                     help="sizes: cpu (40 people x 5 QA) or tofu (200 x 20, for a GPU); see the docstring")
    ap = argparse.ArgumentParser(parents=[pre], description=description.split("\n\n")[0])
    if extra is not None:
        extra(ap)
    ap.add_argument("--objectives", default=",".join(OBJECTIVES))
    ap.add_argument("--forget", default="forget10", help="comma-separated: forget01, forget05, forget10")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--people", type=int, help="fictitious people fine-tuned into the target")
    ap.add_argument("--qa-per-person", type=int, help="1..20")
    ap.add_argument("--ft-epochs", type=float, default=5.0, help="target and retain fine-tunes")
    ap.add_argument("--ft-batch-size", type=int, help="target and retain fine-tunes")
    ap.add_argument("--epochs", type=float, default=5.0, help="unlearning epochs over the forget split")
    ap.add_argument("--batch-size", type=int, help="unlearning batch (forget and retain examples each)")
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--lr-rmu", type=float, default=None, help="RMU's learning rate (default: --lr)")
    ap.add_argument("--retain-eval", type=int, help="retain questions evaluated")
    ap.add_argument("--world-eval", type=int, help="world_facts questions evaluated")
    ap.add_argument("--max-new-tokens", type=answer_length,
                    help="greedy answer length for ROUGE-L: a number, or gold (each gold answer's token length + "
                         "8; the presets keep 16 / 32 so stored results stay comparable)")
    ap.add_argument("--eval-batch-size", type=int)
    ap.add_argument("--calibrate", type=lambda v: [float(x) for x in v.split(",")], default=[],
                    help="comma-separated tolerances: beside each fixed-budget run, one stopped by "
                         "StopRule('indistinguishable') at each (the same lr, its budget the cap)")
    ap.add_argument("--check-every", type=int, default=2, help="steps between the stop rule's checks")
    ap.add_argument("--search-lr", type=lambda v: [float(x) for x in v.split(",")], default=[],
                    help="factors of each objective's lr, e.g. 3,10,30: each --calibrate arm also runs searching "
                         "those step sizes (forget.stopping.search_step_size)")
    ap.add_argument("--retain-limit", type=float,
                    help="a factor > 1: each --calibrate arm (the searching one, with --search-lr) also runs with the "
                         "stop rule's retain guard, the retain loss at most this factor of the target's")
    ap.add_argument("--note", action="append", default=[], help="a reduction or caveat for the markdown")
    ap.add_argument("--results", type=Path, default=RESULTS_DIR)
    ap.add_argument("--name", help="results file name (a pilot at other settings keeps its own)")
    ap.add_argument("--render", type=Path, metavar="JSON", help="only rewrite this results JSON's .md and .png")
    ap.set_defaults(**PRESETS[pre.parse_known_args()[0].preset])
    args = ap.parse_args()
    if args.retain_limit is not None and args.retain_limit <= 1:
        ap.error(f"--retain-limit: a factor of the target's retain loss, greater than 1; got {args.retain_limit:g}")
    return args


def gpu_name() -> str | None:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else None


def protocol_settings(args: argparse.Namespace):
    from malleable.protocols.forget_llm import ProtocolSettings

    return ProtocolSettings(people=args.people, qa_per_person=args.qa_per_person, epochs=args.ft_epochs,
                            batch_size=args.ft_batch_size, retain_eval=args.retain_eval, world_eval=args.world_eval,
                            max_new_tokens=args.max_new_tokens)


def main() -> None:
    args = parse_args()
    if args.render:
        result = json.loads(args.render.read_text())
        args.name, args.results = args.render.stem, args.render.parent
        save(result, args, result.get("wall_time_s", 0.0))
        return
    from malleable.evaluate.llm_forget import METRIC_DEFINITIONS
    from malleable.protocols.forget_llm import RELEARN, RETAIN_OF, Protocol
    from malleable.models.smollm2 import smollm2_checkpoint
    from malleable.forget.stopping import VERSION as STOP_RULE

    splits = args.forget.split(",")
    unknown = sorted(set(splits) - set(RETAIN_OF))
    if unknown:
        raise SystemExit(f"--forget: {', '.join(unknown)} is not one of {', '.join(sorted(RETAIN_OF))}")
    settings = protocol_settings(args)
    path = args.results / f"{args.name}.json"
    result = json.loads(path.read_text()) if path.is_file() else {}
    if result.get("protocol") not in (None, asdict(settings)):
        result = {}  # other data or fine-tuning settings: the old runs are not comparable
    t0 = time.perf_counter()
    result.update({"schema": "malleable.bench.forget_llm/2", "protocol": asdict(settings),
                   "machine": {**machine(), "gpu": gpu_name()}, "relearn_settings": RELEARN})
    runs = result.setdefault("runs", [])
    # calibrated runs of an earlier stopping rule are not comparable: dropped, and run again below
    runs[:] = [r for r in runs if "calibrate" not in r or r.get("stop_rule", 1) == STOP_RULE]
    for forget in splits:
        proto = Protocol(smollm2_checkpoint(), settings, forget, relearning=RELEARN,
                         eval_batch_size=args.eval_batch_size)
        result.setdefault("reference", {})[forget] = {**proto.reference_summaries(),
                                                      "metric_definitions": METRIC_DEFINITIONS}
        result.setdefault("fine_tune", {})[forget] = proto.fine_tune
        result.setdefault("unlearn_settings", {})[forget] = {"epochs": args.epochs, "batch_size": args.batch_size}
        done = {run_key(r) for r in runs if r.get("relearn", {}).get("settings") == RELEARN
                and r.get("metric_definitions") == METRIC_DEFINITIONS}
        for objective in args.objectives.split(","):
            lr = args.lr_rmu if objective == "rmu" and args.lr_rmu else args.lr
            kwargs = {"epochs": args.epochs, "batch_size": args.batch_size, "lr": lr}
            searched = {**kwargs, "lr": [lr * f for f in args.search_lr]}
            arms = [(kwargs, None)]
            for t in args.calibrate:
                rule = {"tolerance": t, "check_every": args.check_every}
                arms += [(k, rule) for k in ([kwargs, searched] if args.search_lr else [kwargs])]
                if args.retain_limit:
                    arms.append((searched if args.search_lr else kwargs, {**rule, "retain_limit": args.retain_limit}))
            for seed, (settings, calibrate) in ((int(s), a) for s in args.seeds.split(",") for a in arms):
                run = {"forget": forget, "objective": objective, "seed": seed, "settings": settings}
                if calibrate is not None:
                    run.update(calibrate=calibrate, stop_rule=STOP_RULE)
                if settings is searched:
                    run["base_lr"] = lr
                if run_key(run) in done:
                    continue
                out = proto.unlearn(objective, seed, calibrate, **settings)
                run.update(metric_definitions=METRIC_DEFINITIONS, seconds=out["seconds"], steps=out["steps"],
                           summary=out["summary"],
                           relearn=out["relearn"],
                           examples=out["evals"]["forget"]["examples"], loadavg=loadavg())
                run.update({k: out[k] for k in ("stopping", "lr_search") if k in out})
                runs[:] = [r for r in runs if run_key(r) != run_key(run)] + [run]
                print(forget, objective, seed, json.dumps(out["summary"]), json.dumps(out["relearn"]["recovered"]),
                      flush=True)
                save(result, args, time.perf_counter() - t0)
    save(result, args, time.perf_counter() - t0)  # the references, also when every run was already there


def rescore_relearning(result: dict) -> None:
    """Recompute what came back in every attack from the stored before/after numbers (so a change of
    `llm_forget.MIN_REMOVED` reaches old runs) and drop the attack from runs made under other attack settings
    than their split's reference attack (they would be compared with another attack)."""
    from malleable.evaluate.llm_forget import came_back

    for forget, refs in result.get("reference", {}).items():
        target, retain = refs["target"].get("relearn"), refs["retain"].get("relearn")
        attacked = [refs["target"], refs["retain"]] if target else []
        for run in (r for r in result["runs"] if r["forget"] == forget and "relearn" in r):
            if target is None or run["relearn"]["settings"] != target.get("settings"):
                del run["relearn"]
            else:
                attacked.append(run)
        for model in attacked:
            model["relearn"].update(came_back(target, retain, model["relearn"]))


def rescore_privacy(result: dict) -> None:
    """Recompute every PrivLeak from the stored min-k AUCs (the unlearned model's and its split's retain
    model's), so a change of `llm_forget.privacy_leakage` reaches stored runs; the retain model's own is 0."""
    from malleable.evaluate.llm_forget import privacy_leakage

    for forget, refs in result.get("reference", {}).items():
        retain_auc = refs["retain"]["mia_auc_min_k"]
        refs["target"]["privacy_leakage"] = privacy_leakage(refs["target"]["mia_auc_min_k"], retain_auc)
        for run in (r for r in result.get("runs", []) if r["forget"] == forget):
            run["summary"]["privacy_leakage"] = privacy_leakage(run["summary"]["mia_auc_min_k"], retain_auc)


def legacy_note(result: dict) -> str | None:
    """A note naming the runs and reference rows measured under earlier metric definitions, if any."""
    from malleable.evaluate.llm_forget import METRIC_DEFINITIONS

    runs = [r for r in result.get("runs", []) if r.get("metric_definitions") != METRIC_DEFINITIONS]
    refs = sorted(f for f, r in result.get("reference", {}).items() if r.get("metric_definitions")
                  != METRIC_DEFINITIONS)
    if not runs and not refs:
        return None
    return (f"{len(runs)} of {len(result.get('runs', []))} runs and the target/retain rows of "
            f"{', '.join(refs) or 'no split'} were measured before 2026-11-29, under earlier definitions: their "
            "MIA AUC (min-k) scores k = 20% of the answer tokens counting the appended EOS (now 40% without it, as "
            "open-unlearning), their forget ES counts the EOS prediction (now left out; a row whose only miss is "
            "the EOS scored 0), and neither can be recomputed from the stored numbers. Their PrivLeak % is "
            "recomputed from those stored AUCs with MUSE's and open-unlearning's definition, (AUC_retain - AUC) "
            "/ (1 - AUC_retain) x 100 on this AUC (1 = the forget set looks trained on): below 0 = the forget set "
            "still stands out (under-unlearned), above 0 = over-unlearned; the earlier (AUC - AUC_retain) / "
            "AUC_retain had the opposite sign and another denominator.")


def save(result: dict, args: argparse.Namespace, seconds: float) -> None:
    """Re-aggregate every run and write the JSON, the markdown and the plot."""
    rescore_relearning(result)
    rescore_privacy(result)
    groups: dict = {}
    for r in result["runs"]:
        groups.setdefault(r["forget"], {}).setdefault(label(r), []).append(r)
    result["aggregate"] = {f: {o: {**aggregate(rs), "n": len(rs)} for o, rs in objs.items()}
                           for f, objs in groups.items()}
    result["notes"] = sorted(set(result.get("notes", []) + args.note))
    result["wall_time_s"] = round(seconds, 1)
    write_results(args.name, result, markdown(result), args.results)
    if result["aggregate"]:
        plot(result, args.results / f"{args.name}.png")


if __name__ == "__main__":
    main()
