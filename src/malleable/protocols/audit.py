"""`malleable audit MODEL`: membership and relearning evidence for a model that claims to have forgotten a set.

It runs the relearning attack (which trains), so it lives above the `forget` verb, beside the protocols.
"""

from __future__ import annotations

import time
from pathlib import Path

from malleable.evaluate.unlearning import evidence, share_recovered
from malleable.forget.run import check_same_tokenizer, evidence_plot, load_sets, report_markdown
from malleable.io.atomic import atomic_dir, check_output
from malleable.io.hashing import sha256_file
from malleable.learn.data import collate
from malleable.models.checkpoints import Trust, load_model, load_tokenizer, model_labels
from malleable.protocols.relearn import relearn
from malleable.recipes.learn import DataFormat
from malleable.report import environment, write_report

SCHEMA = "malleable.audit/1"


def audit(model_path: str | Path, *, forget: Path, retain: Path | None = None, holdout: Path | None = None,
          original: Path | None = None, task: str = "causal_lm", relearn_steps: int = 10,
          relearn_fraction: float = 0.1, relearn_lr: float = 1e-4, batch_size: int = 8, seed: int = 0,
          out: Path | None = None, force: bool = False, allow_pickle: bool = False) -> dict:
    """Membership and relearning evidence for a model that claims to have forgotten `forget`."""
    start = time.perf_counter()
    inputs = [Path(model_path), forget] + [p for p in (retain, holdout, original) if p]
    out = check_output(out, force=force, inputs=inputs) if out is not None else None
    trust = Trust(pickle=allow_pickle)
    tokenizer = load_tokenizer(Path(model_path), trust)
    labels = model_labels(Path(model_path), task)
    sets = load_sets({"forget": forget, "retain": retain, "holdout": holdout}, DataFormat(), tokenizer, labels)
    items = {name: ex.items if ex else [] for name, ex in sets.items()}
    if original is not None:
        check_same_tokenizer(tokenizer, load_tokenizer(original, trust), original)
    model = load_model(Path(model_path), task, tokenizer.pad_token_id, trust=trust)

    def batch(b):
        return collate(b, tokenizer.pad_token_id)

    rows = {"audited": evidence(model, items, batch, batch_size)}
    attack = {"audited": relearn(model, items["forget"], batch, fraction=relearn_fraction, steps=relearn_steps,
                                 lr=relearn_lr, batch_size=batch_size, seed=seed)}
    if original is not None:
        orig = load_model(original, task, tokenizer.pad_token_id, trust=trust)
        rows["original"] = evidence(orig, items, batch, batch_size)
        attack["original"] = relearn(orig, items["forget"], batch, fraction=relearn_fraction, steps=relearn_steps,
                                     lr=relearn_lr, batch_size=batch_size, seed=seed)
    report = {"schema": SCHEMA, "model": str(model_path), "task": task,
              "trusted": {"trust_remote_code": False, "allow_pickle": allow_pickle},
              "data": {n: {"path": str(ex.path), "sha256": sha256_file(ex.path), "examples": len(ex)}
                       for n, ex in sets.items() if ex is not None},
              "evidence": rows, "relearning": attack, "recovered": recovered(rows, attack),
              "wall_time_s": round(time.perf_counter() - start, 1), "environment": environment()}
    if out is not None:
        with atomic_dir(out, force=force) as tmp:
            write_report(tmp, report, report_markdown(f"audit: {model_path}", report))
            evidence_plot(tmp / "evidence.png", rows)
    return report


def recovered(rows: dict, attack: dict) -> dict:
    """How much forget-set accuracy the relearning attack brought back, absolutely and as a share of what
    unlearning had removed (when the original model is known)."""
    a = attack["audited"]
    out = {"accuracy_gain": round(a["after"]["accuracy"] - a["before"]["accuracy"], 6)}
    if "original" in attack:
        share = share_recovered(attack["original"]["before"]["accuracy"], a["before"]["accuracy"],
                                a["after"]["accuracy"])
        out["share_of_removed_recovered"] = None if share is None else round(share, 4)
    return out
