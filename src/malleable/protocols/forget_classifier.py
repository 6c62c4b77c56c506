"""The SalUn / SFR-on evaluation protocol for unlearning in image classifiers, as library code.

A run (Fan et al., "SalUn", ICLR 2024, Sec. 5; the same table layout as SFR-on):
1. split the training set into forget / retain: class-wise (one whole class) or random (a seeded share, 10%);
2. train the original on all of it with `fit`, and the gold standard from scratch on retain with the SAME recipe;
3. unlearn a copy of the original with one method;
4. score every model on UA = 100 - forget accuracy, RA = retain accuracy, TA = test accuracy, and
   MIA-efficacy (`evaluate.mia`), and each method by Avg. Gap = mean |metric - retrain's metric| over the
   four, its run time and its time relative to retraining;
5. optionally (`relearning=`), the relearning audit of every model (original, retrain, each unlearned one):
   `protocols.relearn.relearn` fine-tunes a copy on a seeded share of the forget set and measures the REST of
   it. "UA_held" is 100 - accuracy on those held-back rows before the attack, "UA_relearn" after it, and
   "relearn_drop" = UA_held - UA_relearn (how much forgetting the attack undid; retrain's is the reference).

Calibrated stopping (issue 13, `unlearn_and_score(stop_at="indistinguishable", calibration=...)`): the run stops
once `forget.stopping.StopRule` finds the loss attack's AUC of the forget rows against `calibration` rows (never
trained on, and not the rows any reported metric reads) within `tolerance` of 0.5; the method's `steps` stay the
most it may run. With `unseen=` rows (`unseen_rows`: never trained on, of the forgotten class for class-wise
forgetting) every run, fixed or calibrated, also gets the verdict `forget.stopping.side` of its final AUC of
forget vs unseen rows: under-unlearned, calibrated or over-unlearned.

Class-wise TA is measured on the test set WITHOUT the forgotten class (the retrained model can never get
those right, so including them only shifts every model by the same amount); the MIA's non-member shadow set
is that same test set. All results are plain dicts of floats, percentages on a 0..100 scale.

    split = make_split(train, test, "random", seed=0)
    original, seconds = train_model(make_model, split["train"], recipe, seed=0)
    retrain, retrain_s = train_model(make_model, split["retain"], recipe, seed=0)
    gold = score(retrain, split)
    row = unlearn_and_score(original, split, {"objective": "ga", "lr": 1e-3, "steps": 50}, gold, retrain_s)
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence

import torch

from malleable.errors import RecipeError
from malleable.evaluate.unlearning import CLASSIFIER_METRICS as METRICS  # noqa: F401  (the protocol's names)
from malleable.evaluate.unlearning import classifier_scores
from malleable.protocols.relearn import relearn
from malleable.forget import fit, unlearn
from malleable.forget.data import collate_classification
from malleable.forget.stopping import StopRule, side

SCENARIOS = ("class", "random")
RELEARN_METRICS = ("UA_held", "UA_relearn", "relearn_drop")
# The attack the classifier benchmark runs on every model: AdamW (relearn's optimiser), constant lr, clip 1.0, on
# 10% of the forget set. On Fashion-MNIST (seed 0, class-wise) the original keeps its held-out forget accuracy
# (84% -> 99.6%) and retrain regains about a quarter (0% -> 26%); 10 steps at 1e-3 gave it back 78%.
RELEARN = {"fraction": 0.1, "steps": 15, "lr": 5e-4, "batch_size": 32}


def make_split(train: Sequence, test: Sequence, scenario: str, seed: int = 0, forget_class: int = 0,
               forget_ratio: float = 0.1) -> dict[str, list]:
    """{"train", "forget", "retain", "test"} example lists for `scenario` ("class" or "random").

    Random: a seeded `forget_ratio` share of train. Class-wise: every train example of `forget_class`; its test
    examples are dropped from "test" (see the module docstring). Order within each set follows `train`.
    """
    if scenario not in SCENARIOS:
        raise RecipeError(f"scenario {scenario!r}: expected one of {', '.join(SCENARIOS)}")
    train, test = list(train), list(test)
    if scenario == "class":
        is_forget = [int(y) == forget_class for _, y in train]
        test = [ex for ex in test if int(ex[1]) != forget_class]
    else:
        if not 0 < forget_ratio < 1:
            raise RecipeError(f"forget_ratio {forget_ratio}: must be strictly between 0 and 1")
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
        chosen = order[:round(forget_ratio * len(train))]
        is_forget = [False] * len(train)
        for i in chosen.tolist():
            is_forget[i] = True
    forget = [ex for ex, f in zip(train, is_forget) if f]
    if not forget:
        raise RecipeError(f"scenario {scenario}: the forget set is empty (class {forget_class} not in the train set?)")
    return {"train": train, "forget": forget, "retain": [ex for ex, f in zip(train, is_forget) if not f],
            "test": test}


def train_model(make_model: Callable[[], torch.nn.Module], examples: Sequence, recipe: dict,
                seed: int = 0) -> tuple[torch.nn.Module, float]:
    """A fresh model (init from `seed`) trained on `examples` by `fit` with `recipe`; (model, wall seconds)."""
    torch.manual_seed(seed)
    model = make_model()
    start = time.perf_counter()
    fit(model, list(examples), collate=collate_classification, seed=seed, **recipe)
    return model.eval(), time.perf_counter() - start


def score(model: torch.nn.Module, split: dict, max_shadow: int | None = 5000, feature: str = "confidence") -> dict:
    """UA, RA, TA and MIA-efficacy (percent) of `model` on `split`: evaluate.unlearning.classifier_scores."""
    return classifier_scores(model, split, max_shadow, feature)


def relearn_score(model: torch.nn.Module, split: dict, relearning: dict, seed: int = 0) -> dict:
    """UA_held, UA_relearn and relearn_drop (points) of the relearning attack on `model` (keywords of
    `protocols.relearn.relearn`: fraction, steps, lr, batch_size); `model` itself is not changed."""
    r = relearn(model, split["forget"], collate_classification, seed=seed, **relearning)
    held, after = 100.0 * (1 - r["before"]["accuracy"]), 100.0 * (1 - r["after"]["accuracy"])
    return {"UA_held": held, "UA_relearn": after, "relearn_drop": held - after}


def avg_gap(metrics: dict, gold: dict) -> float:
    """Mean absolute difference to the retrained model over UA, RA, TA and MIA (points)."""
    return sum(abs(metrics[k] - gold[k]) for k in METRICS) / len(METRICS)


def unseen_rows(examples: Sequence, scenario: str, forget_class: int = 0) -> list:
    """The rows of `examples` (never trained on) that a model retrained without the forget set cannot tell from it.

    Random forgetting: all of them. Class-wise: only those of the forgotten class; against unseen rows of the
    other classes even the retrained model separates the forget rows perfectly (it cannot classify them at all),
    so "indistinguishable" would be a target nothing reaches.
    """
    if scenario not in SCENARIOS:
        raise RecipeError(f"scenario {scenario!r}: expected one of {', '.join(SCENARIOS)}")
    return [ex for ex in examples if scenario == "random" or int(ex[1]) == forget_class]


def membership(model: torch.nn.Module, forget: Sequence, unseen: Sequence, tolerance: float) -> dict:
    """The loss attack's AUC of `forget` (members) against `unseen` rows, and its side of 0.5 +- `tolerance`."""
    row = StopRule("indistinguishable", forget, collate_classification, tolerance=tolerance, check_every=1,
                   calibration=unseen, batch_size=512).measure(model)
    return {"membership_auc": row["membership_auc"], "side": side(row["membership_auc"], tolerance)}


def unlearn_and_score(original: torch.nn.Module, split: dict, method: dict, gold: dict, retrain_seconds: float,
                      seed: int = 0, max_shadow: int | None = 5000, relearning: dict | None = None, *,
                      stop_at: str | None = None, calibration: Sequence = (), tolerance: float = 0.05,
                      check_every: int = 10, unseen: Sequence | None = None) -> dict:
    """Unlearn a copy of `original` with `method` (keyword arguments of `forget.unlearn`) and score it.

    Returns the four metrics, "gap" (Avg. Gap to `gold`), "seconds" (wall time of the unlearn call, setup
    and mask included), "time_ratio" (seconds / retrain_seconds), "steps_run" and, with `relearning`,
    `relearn_score`'s. `stop_at="indistinguishable"` stops once the loss attack's AUC of the forget rows against
    the `calibration` rows is within `tolerance` of 0.5, checked every `check_every` steps (`method["steps"]`
    stays the most it may run); the rule's report is under "stopping". `unseen` rows add "membership_auc" and
    "side" (`membership`, with the same tolerance) of the final model.
    """
    if stop_at not in (None, "indistinguishable"):
        raise RecipeError(f"stop_at {stop_at!r}: the classifier protocol knows 'indistinguishable' (or None)")
    rule = None if stop_at is None else StopRule(stop_at, split["forget"], collate_classification,
                                                 tolerance=tolerance, check_every=check_every,
                                                 calibration=list(calibration), batch_size=512)
    model = copy.deepcopy(original).train()
    start = time.perf_counter()
    result = unlearn(model, forget=split["forget"], retain=split["retain"], collate=collate_classification,
                     seed=seed, stop=rule, **method)
    seconds = time.perf_counter() - start
    metrics = score(result.model, split, max_shadow)
    attack = _attack(result.model, split, relearning, seed, metrics)
    extra = {"steps_run": result.steps}
    if rule is not None:
        extra["stopping"] = rule.report()
    if unseen is not None:
        extra |= membership(result.model, split["forget"], unseen, tolerance) if metrics["UA"] == metrics["UA"] else \
            {"membership_auc": float("nan"), "side": "diverged"}
    return {**metrics, "gap": avg_gap(metrics, gold), "seconds": seconds, "time_ratio": seconds / retrain_seconds,
            **attack, **extra}


def _attack(model: torch.nn.Module, split: dict, relearning: dict | None, seed: int, metrics: dict) -> dict:
    """`relearn_score`, or nothing without `relearning`, or NaNs for a model that already scores NaN."""
    if relearning is None:
        return {}
    if metrics["UA"] != metrics["UA"]:
        return dict.fromkeys(RELEARN_METRICS, float("nan"))
    return relearn_score(model, split, relearning, seed)


def run_protocol(make_model: Callable[[], torch.nn.Module], train: Sequence, test: Sequence, scenario: str,
                 methods: dict[str, dict], recipe: dict, seed: int = 0, forget_class: int = 0,
                 forget_ratio: float = 0.1, max_shadow: int | None = 5000,
                 original: tuple[torch.nn.Module, float] | None = None, relearning: dict | None = None) -> dict:
    """The whole protocol for one scenario and seed: {"original", "retrain", "methods": {name: row}, sizes}.

    `original` = (model, seconds) reuses an already trained original (it does not depend on the scenario).
    Retrain's own row has gap 0 and time_ratio 1 by definition. `relearning` (e.g. `RELEARN`) adds the
    relearning audit to every row.
    """
    split = make_split(train, test, scenario, seed, forget_class, forget_ratio)
    if original is None:
        original = train_model(make_model, split["train"], recipe, seed)
    model, original_seconds = original
    retrain, retrain_seconds = train_model(make_model, split["retain"], recipe, seed)
    gold = score(retrain, split, max_shadow)
    base = score(model, split, max_shadow)
    return {
        "scenario": scenario, "seed": seed,
        "sizes": {k: len(v) for k, v in split.items()},
        "retrain": {**gold, "gap": avg_gap(gold, gold), "seconds": retrain_seconds, "time_ratio": 1.0,
                    **_attack(retrain, split, relearning, seed, gold)},
        "original": {**base, "gap": avg_gap(base, gold), "seconds": original_seconds,
                     "time_ratio": original_seconds / retrain_seconds, **_attack(model, split, relearning, seed, base)},
        "methods": {name: unlearn_and_score(model, split, method, gold, retrain_seconds, seed, max_shadow, relearning)
                    for name, method in methods.items()},
    }
