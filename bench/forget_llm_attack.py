#!/usr/bin/env python
"""Calibration of forget_llm's relearning attack: the same models under attacks of growing strength.

An attack is evidence only if it revives what unlearning hid without wrecking or teaching: under it the target
should keep its held-back forget answers, and the retain model, which never saw those people, should gain little.
This attacks the target, the retain model and one unlearned model per --objectives entry (seed 0, --lr, the
forget_llm preset's settings) with every --attacks setting (steps:lr; the fraction, batch and seed of
`protocols.forget_llm.RELEARN`), and tabulates the held-back forget probability before and after, and each unlearned
model's gain beyond the retain model's under the same attack. Writes results/forget_llm_attack.{json,md}.

  python bench/forget_llm_attack.py --forget forget10 --objectives npo --attacks 10:1e-5,10:3e-5,30:1e-5,10:1e-4
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import forget_llm  # noqa: E402 (the bench folder is not a package)
from _common import fmt, loadavg, machine, write_results  # noqa: E402

NAME = "forget_llm_attack"


def parse_attacks(text: str) -> list[dict]:
    from malleable.protocols.forget_llm import RELEARN

    out = []
    for item in text.split(","):
        steps, lr = item.split(":")
        out.append({**RELEARN, "steps": int(steps), "lr": float(lr)})
    return out


def markdown(result: dict) -> str:
    attacks, rows = result["attacks"], result["models"]
    label = [f"{a['steps']} steps at {a['lr']:g}" for a in attacks]
    m = result["machine"]
    lines = [f"# forget_llm: relearning attack calibration ({result['forget']})", "",
             f"SmolLM2-135M-Instruct, the forget_llm `{result['preset']}` preset, on {m['cpu']} ({m['cores']} cores, "
             f"shared), {m['date']}, git {m['malleable_git']}, wall {result['wall_s']:.0f} s, load average at start "
             f"{result['loadavg_start']}. Each attack trains a copy on {rows['target'][0]['trained_on']} forget "
             f"questions (AdamW, batch {attacks[0]['batch_size']}, seed {attacks[0]['seed']}) and measures the "
             f"other {rows['target'][0]['measured_on']}. Cell: forget probability before → after"
             " (for an unlearned model, its gain minus the retain model's gain: above 0 is revived).", "",
             "| model | " + " | ".join(label) + " |", "|---|" + "---:|" * len(attacks)]
    for name, per_attack in rows.items():
        cells = []
        for r in per_attack:
            cell = f"{fmt(r['before']['probability'], 3)} → {fmt(r['after']['probability'], 3)}"
            if name not in ("target", "retain"):
                cell += f" ({r['excess_gain']['probability']:+.3f})"
            cells.append(cell)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    args = forget_llm.parse_args(__doc__, lambda ap: ap.add_argument(
        "--attacks", default="10:1e-5,10:3e-5,30:1e-5,10:1e-4", help="comma-separated steps:lr"))
    from malleable.evaluate.llm_forget import came_back
    from malleable.protocols.forget_llm import Protocol
    from malleable.models.smollm2 import smollm2_checkpoint

    t0, load = time.perf_counter(), loadavg()
    attacks = parse_attacks(args.attacks)
    proto = Protocol(smollm2_checkpoint(), forget_llm.protocol_settings(args), args.forget,
                     eval_batch_size=args.eval_batch_size)
    refs = {name: [proto.reference_attack(name, a) for a in attacks] for name in ("target", "retain")}
    models = dict(refs)
    for objective in filter(None, args.objectives.split(",")):
        result, tokenizer, _, _ = proto.unlearned(objective, 0, epochs=args.epochs, batch_size=args.batch_size,
                                               lr=args.lr)
        models[f"{objective} (lr {args.lr:g})"] = [
            {**r, **came_back(t, s, r)} for t, s, r in zip(
                refs["target"], refs["retain"], (proto.attack(result.model, tokenizer, a) for a in attacks))]
    out = {"schema": "malleable.bench.forget_llm_attack/1", "forget": args.forget, "preset": args.preset,
           "protocol": asdict(proto.settings), "attacks": attacks, "models": models, "machine": machine(),
           "loadavg_start": load, "wall_s": round(time.perf_counter() - t0, 1)}
    write_results(NAME, out, markdown(out), args.results)
    print(markdown(out))


if __name__ == "__main__":
    main()
