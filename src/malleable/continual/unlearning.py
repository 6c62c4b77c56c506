"""Forget steps of a stream: take the forgotten examples out, let the method unlearn them, score it against the
gold standard (a model retrained from scratch on what should be known at that moment).

The engine (continual/engine.py) calls `forget_step` for every `{forget: ...}` step and, with
`evaluate.retrain: every_step`, `score_step` after learn steps too. What happens at a forget step, in order:

1. the forgotten examples (continual/stream.py `resolve`: a class, an earlier learn step or a seeded sample) leave
   the replay buffer (`Reservoir.forget`), so they are never replayed; the stream never walks them again;
2. the method unlearns them (`ContinualMethod.forget`): by default the recipe's `forget` objective of `malleable
   forget` (npo, graddiff, rl + salun mask, sfr_on, ...) run by its engine with the forget set = the forgotten
   examples and the retain set = `method.retain(...)`: the buffer minus the forgotten examples for an online
   method (online continual learning keeps only its buffer), everything remaining for `joint`;
3. it is scored, before (`before`: the model as the learn steps left it) and after unlearning, with the
   classifier protocol's metrics (evaluate/unlearning.py `classifier_scores`, which protocols/forget_classifier.py
   reports too: the SalUn / SFR-on table): UA = 100 - accuracy on this step's forgotten training images,
   RA = accuracy on the learned and not forgotten training images, TA = test accuracy on the classes that should
   be known (learned, with a training image left), MIA = SalUn's MIA-efficacy on the forgotten images (shadow
   members: remaining training images; non-members: those test images; at most `evaluate.mia_max_shadow` each),
   and MIA_AUC = the membership AUC of the true label's probability, forgotten images against the test images of
   their classes (0.5: they look unseen; continuous where SalUn's SVC vote is 0 or 100 on an online learner);
4. the gold standard (`evaluate.retrain` forget_steps or every_step): a model from the stream's own initial
   weights (the same seed), trained offline on every learned and not forgotten example as `joint` trains (SGD
   at training.lr and training.batch_size, shuffled, `evaluate.retrain_epochs` passes, through forget's `fit`),
   scored on the same sets; the gap is |method - retrain| per metric and their mean (the protocol's Avg. Gap),
   and the step's time is compared with the retrain's.

The method's forget step and the retrain run under `torch.random.fork_rng`: the stream's own random state goes
on as if they had not run, so the same stream with `evaluate.retrain: off` trains the same weights.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from malleable.continual.stream import Resolved, Task
from malleable.errors import RecipeError
from malleable.evaluate.unlearning import CLASSIFIER_METRICS as METRICS
from malleable.evaluate.unlearning import classifier_scores

Example = tuple[torch.Tensor, int]


def known_test(tasks: list[Task], known: set[int]) -> list[Example]:
    """The test images of the classes in `known`, each class once (a class may come in several learn steps)."""
    out, done = [], set()
    for task in tasks:
        for c in task.classes:
            if c in known and c not in done:
                done.add(c)
                out += [ex for ex in task.test if ex[1] == c]
    return out


def split(now: Resolved, lookup: dict[int, Example], tasks: list[Task], forgotten_ids: list[int]) -> dict:
    """The protocol's sets at a step: forget (`forgotten_ids`), retain (learned, not forgotten), test (known),
    holdout (the test images of the forgotten images' classes: never trained on, the membership AUC's non-members)."""
    retain = [lookup[j] for j in sorted(now.learned)]
    forget = [lookup[j] for j in forgotten_ids]
    return {"forget": forget, "retain": retain, "test": known_test(tasks, {y for _, y in retain}),
            "holdout": known_test(tasks, {y for _, y in forget})}


def metrics(model: torch.nn.Module, sets: dict, max_shadow: int) -> dict:
    """UA, RA, TA, MIA (percent) of the protocol and MIA_AUC (0-1); UA and the MIAs are None when nothing is
    forgotten yet."""
    if sets["forget"]:
        return {k: round(v, 4) for k, v in classifier_scores(model, sets, max_shadow).items()}
    from malleable.evaluate.classification import accuracy

    return {"UA": None, "RA": round(accuracy(model, sets["retain"]), 4),
            "TA": round(accuracy(model, sets["test"]), 4), "MIA": None, "MIA_AUC": None}


def gaps(method: dict, gold: dict) -> dict:
    """|method - retrain| per metric both have, and the mean of the four percent metrics ("avg", the protocol's
    Avg. Gap; MIA_AUC's gap is reported beside it, on its 0-1 scale)."""
    out = {k: round(abs(method[k] - gold[k]), 4) for k in (*METRICS, "MIA_AUC")
           if method.get(k) is not None and gold.get(k) is not None}
    four = [out[k] for k in METRICS if k in out]
    out["avg"] = round(sum(four) / len(four), 4) if four else None
    return out


def retrain(make_model: Callable[[], torch.nn.Module], ids: list[int], lookup: dict[int, Example], recipe,
            ) -> tuple[torch.nn.Module, float]:
    """The gold standard on the images `ids` (learned, never forgotten): (model, seconds)."""
    from malleable.forget import fit
    from malleable.forget.data import collate_classification

    t = recipe.training
    start = time.perf_counter()
    with torch.random.fork_rng():
        torch.manual_seed(recipe.seed)
        model = make_model()
        fit(model, [lookup[j] for j in ids], collate=collate_classification, epochs=recipe.evaluate.retrain_epochs,
            batch_size=t.batch_size, lr=t.lr, optimizer="sgd", schedule="constant", weight_decay=0.0,
            momentum=t.momentum, max_grad_norm=None, seed=recipe.seed)
    return model.eval(), time.perf_counter() - start


def score_step(model: torch.nn.Module, now: Resolved, forgotten_ids: list[int], lookup: dict[int, Example],
               tasks: list[Task], recipe, make_model: Callable[[], torch.nn.Module], seconds: float | None,
               sets: dict | None = None) -> dict:
    """The method's metrics at a step, and (unless evaluate.retrain is off) the retrain's, the gap and the times.
    `sets`: the step's `split`, when the caller has it already."""
    sets = sets or split(now, lookup, tasks, forgotten_ids)
    row = {"method": {**metrics(model, sets, recipe.evaluate.mia_max_shadow), "seconds": seconds},
           "sizes": {k: len(v) for k, v in sets.items()}}
    if recipe.evaluate.retrain != "off":
        gold, gold_seconds = retrain(make_model, sorted(now.learned), lookup, recipe)
        gold_seconds = max(round(gold_seconds, 3), 0.001)
        row["retrain"] = {**metrics(gold, sets, recipe.evaluate.mia_max_shadow), "seconds": gold_seconds,
                          "examples": len(now.learned)}
        row["gap"] = gaps(row["method"], row["retrain"])
        row["time_ratio"] = None if seconds is None else round(seconds / gold_seconds, 4)
    return row


def forget_step(model: torch.nn.Module, method, buffer, now: Resolved, lookup: dict[int, Example],
                tasks: list[Task], recipe, make_model: Callable[[], torch.nn.Module], seed: int, index: int) -> dict:
    """Steps 1-4 of the module docstring for one forget step (stream[index]); returns its report entry."""
    forgotten = set(now.ids)
    dropped = buffer.forget(forgotten)
    retain = method.retain(buffer, [lookup[j] for j in sorted(now.learned)])
    model.eval()
    sets = split(now, lookup, tasks, now.ids)
    before = metrics(model, sets, recipe.evaluate.mia_max_shadow)
    start = time.perf_counter()
    with torch.random.fork_rng():
        try:
            info = method.forget(model, [lookup[j] for j in now.ids], retain, recipe.forget, seed)
        except RecipeError as e:  # the forget engine names its own keys: say which step and section they are
            raise RecipeError(f"stream[{index}]: " + str(e).replace("training.", "forget.", 1)) from None
    seconds = time.perf_counter() - start
    model.eval()
    row = score_step(model, now, now.ids, lookup, tasks, recipe, make_model, round(seconds, 3), sets)
    return {"request": now.step.request, "forgotten": len(now.ids), "buffer_dropped": dropped,
            "retain": None if retain is None else len(retain), "unlearn": info, "before": before, **row}
