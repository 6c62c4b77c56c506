"""Calibrated unlearning: stop at the retrained model's level of forgetting, not past it.

Unlearning objectives push the forget set's loss up without a floor: run long enough, the forgotten rows end
up *worse* than rows the model never saw, and that is itself a membership signal (over-unlearning; the
quickstart's NPO ends at a membership AUC of 0.00). A model retrained without the forget set treats those rows
like unseen ones, so the target is a membership attack that cannot tell them apart.

`StopRule` is checked every `check_every` steps on data the objective never trains on:

* ``indistinguishable``: the loss attack's AUC of the forget rows against a calibration part of the holdout
  (never trained on, never in the final evidence) comes to 0.5;
* ``reference``: the forget rows' mean loss comes to the reference (retrained) model's.

The rule aims at the target itself, not at the edge of the tolerance band: short of the target it keeps going
while the checks close in on it (outside the band it keeps going regardless), and it stops at the first check
that reaches or passes the target, or that no longer comes closer once inside the band. It then goes back to
the closest check so far if that one was as close or closer (a copy of its trainable weights is kept; on a
tie the earlier check wins, having moved the weights less). The first
version stopped at the first check inside the band; since unlearning closes in from one side, that landed on
the band's near edge (the LLM protocol's calibrated runs ended at AUC ~0.6 with a tolerance of 0.1, judged
under-unlearned). The tolerance now only says when a run counts as calibrated (`side`), and how near the
target the rule starts stopping at a check that does not improve.

The membership attack cannot see what unlearning costs elsewhere: on the LLM protocol SimNPO needs a step size
whose run reaches AUC 0.5 with the model's utility at 0.0-0.4 (retain model 0.46). With a retain guard
(`retain` rows and a `retain_limit` on their mean loss, from `retain_bound`) every check also measures the
retain loss, and a check past the limit is never kept: short of the target the run goes on (a retain term can
pull the loss back within it), and where it reaches or passes the target the rule stops and goes back to the
closest check within the limit. `search_step_size` ranks a run that ends on a check past the limit (none
within it to go back to) below every run that does not.

Where the issue asked for a held-out part of the *forget* set, this rule measures the rows being unlearned
against held-out *unseen* rows instead: the rows that were not trained on cannot show over-unlearning, which
is exactly what the rule has to catch, and the holdout part it looks at is kept out of the final evidence.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from malleable.errors import InputError
from malleable.evaluate.mia import membership_auc
from malleable.evaluate.unlearning import example_scores

MIN_ROWS = 2  # fewer forget or calibration rows leave the attack's AUC without any resolution
VERSION = 3  # of the stopping decision (1: first check inside the band; 2: closest check, ties to the later one);
# reports and benchmark caches carry it (the retain guard, off unless asked for, leaves runs without it as they were)


def side(auc: float, tolerance: float) -> str:
    """Which side of the retrain target a membership AUC is on (MUSE's PrivLeak convention in words)."""
    if auc > 0.5 + tolerance:
        return "under-unlearned"
    if auc < 0.5 - tolerance:
        return "over-unlearned"
    return "calibrated"


def loss_side(loss: float, reference: float, tolerance: float) -> str:
    """The same verdict from the forget loss against the retrained model's (relative tolerance)."""
    if loss < reference * (1 - tolerance):
        return "under-unlearned"
    if loss > reference * (1 + tolerance):
        return "over-unlearned"
    return "calibrated"


class StopRule:
    """Called with the model after a step; returns True to stop. Keeps the curve of every check."""

    def __init__(self, mode: str, forget: Sequence, collate: Callable, *, tolerance: float, check_every: int,
                 calibration: Sequence = (), reference_loss: float | None = None, batch_size: int = 16,
                 retain: Sequence = (), retain_limit: float | None = None):
        if len(forget) < MIN_ROWS or (mode == "indistinguishable" and len(calibration) < MIN_ROWS):
            raise InputError(f"training.stop_at: {mode} needs at least {MIN_ROWS} forget rows and {MIN_ROWS} "
                             f"calibration (holdout) rows; got {len(forget)} and {len(calibration)}")
        self.mode, self.forget, self.calibration, self.collate = mode, forget, calibration, collate
        self.tolerance, self.check_every, self.reference_loss = tolerance, check_every, reference_loss
        if retain_limit is not None and not retain:
            raise InputError("training.retain_limit: the retain guard needs retain rows; none were given")
        self.batch_size, self.retain, self.retain_limit = batch_size, retain, retain_limit
        self.curve: list[dict] = []
        self.stopped_at: int | None = None
        self.broken_at: int | None = None  # the first check whose retain loss passed the limit
        self.restored_to: int | None = None
        self._best: tuple[float, int, dict[str, torch.Tensor]] | None = None  # |gap|, step, weights

    def measure(self, model) -> dict:
        forget = example_scores(model, self.forget, self.collate, self.batch_size)["loss"]
        row = {"forget_loss": round(float(forget.mean()), 6)}
        if self.mode == "indistinguishable":
            held = example_scores(model, self.calibration, self.collate, self.batch_size)["loss"]
            row["membership_auc"] = round(membership_auc(-forget.numpy(), -held.numpy()), 6)
            row["holdout_loss"] = round(float(held.mean()), 6)
        if self.retain_limit is not None:
            row["retain_loss"] = round(float(example_scores(model, self.retain, self.collate,
                                                            self.batch_size)["loss"].mean()), 6)
        return row

    def broken(self, row: dict) -> bool:
        return self.retain_limit is not None and row["retain_loss"] > self.retain_limit

    def distance(self, row: dict) -> float:
        """How far a check is from the target, signed: > 0 short of it, < 0 past it."""
        if self.mode == "indistinguishable":
            return row["membership_auc"] - 0.5
        return (self.reference_loss - row["forget_loss"]) / max(abs(self.reference_loss), 1e-12)

    def __call__(self, model, step: int, last: bool) -> bool:
        if step % self.check_every and not last:
            return False
        row = {"step": step, **self.measure(model)}
        self.curve.append(row)
        gap, broken = self.distance(row), self.broken(row)
        if broken and self.broken_at is None:
            self.broken_at = step
        best = self._best[0] if self._best is not None else float("inf")
        closing = gap > 0 and (gap > self.tolerance or gap < best)  # short of the target and still closing in
        if closing and gap < best and not broken:
            self._best = (gap, step, {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
        if closing and not last:
            return False
        # an earlier check was as close or closer, or this one is past the retain limit: go back to the closest
        # (on a tie, it moved the weights less; AUCs on a few rows take few distinct values, so ties are common)
        if self._best is not None and self._best[1] != step and (broken or self._best[0] <= abs(gap)):
            with torch.no_grad():
                for n, p in model.named_parameters():
                    if n in self._best[2]:
                        p.copy_(self._best[2][n])
            self.restored_to = self._best[1]
        if not closing:
            self.stopped_at = step
        return True

    def kept(self) -> dict:
        """The check whose weights the model ends with: the one gone back to, else the last."""
        return next(r for r in reversed(self.curve) if self.restored_to in (None, r["step"]))

    @property
    def kept_broken(self) -> bool:
        """The model ends on a check past the retain limit (there was none within it to go back to)."""
        return bool(self.curve) and self.broken(self.kept())

    @property
    def reached(self) -> bool:
        """Stopped at the target, or ended (budget spent) on a check within the tolerance of it; never when the
        model ends on a check past the retain limit."""
        if self.kept_broken:
            return False
        return self.stopped_at is not None or (bool(self.curve) and abs(self.distance(self.kept())) <= self.tolerance)

    def report(self) -> dict:
        final = self.kept()
        verdict = (side(final["membership_auc"], self.tolerance) if self.mode == "indistinguishable" else
                   loss_side(final["forget_loss"], self.reference_loss, self.tolerance))
        return {"rule": self.mode, "version": VERSION, "tolerance": self.tolerance, "check_every": self.check_every,
                "stopped_at": self.stopped_at, "restored_to": self.restored_to, "reference_loss": self.reference_loss,
                "retain_limit": self.retain_limit, "broken_at": self.broken_at, "kept_broken": self.kept_broken,
                "calibration_rows": len(self.calibration), "verdict": verdict, "curve": self.curve}


def search_step_size(lrs: Sequence[float], run: Callable, make_stop: Callable[[], StopRule]):
    """Try each step size in order, every one from the original model, under a fresh stop rule:
    `run(lr, stop)` unlearns and returns `forget.unlearn`'s result. Keeps the first step size whose rule reaches
    the target, else the one that ended closest to it (a run ending past the rule's retain limit only when every
    run does). Returns (lr, result, stop rule, what each step size did).

    Why a list: a step size too small for the budget ends under-unlearned however the rule stops (the LLM
    protocol's RMU, DPO, SimNPO and WGA at their default lr), one too large overshoots between two checks; trying
    the smallest first and going up keeps the weights moved as little as the target allows."""
    chosen, tried = None, []  # chosen: (lr, result, stop rule, (ends broken, distance))
    for lr in lrs:
        stop = make_stop()
        result = run(lr, stop)
        rank = (stop.kept_broken, abs(stop.distance(stop.kept())))
        tried.append({"lr": lr, "steps": result.steps, "seconds": round(result.seconds, 1),
                      "stopped_at": stop.stopped_at, "restored_to": stop.restored_to, "distance": round(rank[1], 6)}
                     | ({"broken_at": stop.broken_at} if stop.retain_limit is not None else {}))
        if stop.reached or chosen is None or rank < chosen[3]:  # none reached yet: keep the closest only
            chosen = (lr, result, stop, rank)
        del result
        if stop.reached:
            break
    return (*chosen[:3], tried)


def retain_bound(model, rows: Sequence, collate: Callable, factor: float, batch_size: int = 16) -> float:
    """The retain guard's limit: `factor` times the model's mean loss on the guard's rows, measured before
    unlearning (a factor, not a fixed loss, so one setting reads the same on models that fit their data to
    different losses)."""
    return factor * float(example_scores(model, rows, collate, batch_size)["loss"].mean())
