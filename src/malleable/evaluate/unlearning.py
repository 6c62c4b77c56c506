"""The evidence `forget` and `audit` report: what the model still knows of each set, what an attacker can tell,
and how much comes back after a few steps of relearning.

Per set: mean loss per unit, accuracy (a classifier's, or for a language model the share of answer tokens that
are the argmax), and exact recall (a language model reproduces the whole answer greedily, which is the case
exactly when every answer token is the argmax under teacher forcing). Membership: the ROC AUC of a loss
threshold attack telling forget rows from holdout rows (never trained on), and for language models also of
Min-K% Prob (k = 40% of each answer's tokens without its final EOS, as open-unlearning); 0.5 means it
cannot tell them apart, which is where a model retrained without the forget set sits.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from malleable.evaluate.classification import accuracy_from_probs, predict_proba
from malleable.evaluate.mia import efficacy_from_probs, membership_auc, mia_features, min_k_score
from malleable.learn.loss import class_logits, is_lm, lm_logits


@torch.no_grad()
def example_scores(model: torch.nn.Module, items: Sequence, collate: Callable,
                   batch_size: int = 16) -> dict[str, torch.Tensor]:
    """Per example: mean loss per unit, share of units predicted right, and whether all of them were."""
    model.eval()
    loss, acc, exact, min_k = [], [], [], []
    for i in range(0, len(items), batch_size):
        part = {k: v.to(next(model.parameters()).device) for k, v in collate(list(items[i:i + batch_size])).items()}
        if is_lm(part):
            logits, labels = lm_logits(model, part)
            mask = labels != -100
            nll = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), labels.clamp(min=0),
                                                    reduction="none")
            right = (logits.argmax(-1) == labels) & mask
            units = mask.sum(1).clamp(min=1)
            loss.append((nll * mask).sum(1) / units)
            # the last scored token is the EOS the encoders append; open-unlearning leaves it out of min-k
            min_k.append(torch.tensor([min_k_score(-row[m][:-1].double().cpu().numpy())
                                       for row, m in zip(nll, mask)]))
            acc.append(right.sum(1) / units)
            exact.append((right | ~mask).all(1).float())
        else:
            logits = class_logits(model, part)
            loss.append(torch.nn.functional.cross_entropy(logits, part["labels"], reduction="none"))
            acc.append((logits.argmax(-1) == part["labels"]).float())
            exact.append(acc[-1])
    out = {k: torch.cat(v).float().cpu() for k, v in (("loss", loss), ("accuracy", acc), ("exact", exact))}
    if min_k:
        out["min_k"] = torch.cat(min_k).float()
    return out


def evidence(model: torch.nn.Module, sets: dict[str, Sequence], collate: Callable, batch_size: int = 16) -> dict:
    """Loss, accuracy and exact recall on every non-empty set; membership AUC when there is a holdout."""
    scores = {name: example_scores(model, items, collate, batch_size) for name, items in sets.items() if items}
    out = {name: {k: round(float(v.mean()), 6) for k, v in s.items() if k != "min_k"}
           for name, s in scores.items()}
    if "forget" in scores and "holdout" in scores:
        # the loss-threshold attack: a lower loss is called 'member'
        auc = membership_auc(-scores["forget"]["loss"].numpy(), -scores["holdout"]["loss"].numpy())
        out["membership_auc"] = round(auc, 6)
        if "min_k" in scores["forget"]:  # Min-K% Prob (Shi et al., 2024), the usual attack on language models
            auc = membership_auc(scores["forget"]["min_k"].numpy(), scores["holdout"]["min_k"].numpy())
            out["membership_auc_min_k"] = round(auc, 6)
    return out


CLASSIFIER_METRICS = ("UA", "RA", "TA", "MIA")


def classifier_scores(model: torch.nn.Module, sets: dict, max_shadow: int | None = 5000,
                      feature: str = "confidence") -> dict:
    """The SalUn / SFR-on classifier table (percent) on {"forget", "retain", "test"} (image, label) lists:
    UA = 100 - forget accuracy, RA = retain accuracy, TA = test accuracy, MIA = SalUn's MIA-efficacy of the
    forget set; each set goes through the model once. protocols/forget_classifier.py and `malleable continual`'s
    forget steps report these.

    With a "holdout" set (never-trained images of the forget set's classes) also MIA_AUC: the membership AUC of
    the true label's probability, forget against holdout (0.5: the forgotten images look unseen). SalUn's MIA is
    a 0/1 vote per image of an SVC fit on one feature, which on a model with little train-test gap calls all of
    them members or none; the AUC stays continuous.

    A model whose outputs are not finite (a diverged ascent) scores NaN everywhere. The MIA's shadow members are
    the first min(len(test), max_shadow) retain examples and its non-members as many test examples (SalUn uses
    len(test); the cap bounds the SVC's quadratic fit)."""
    n = len(sets["test"]) if max_shadow is None else min(len(sets["test"]), max_shadow)
    forget = predict_proba(model, sets["forget"])
    retain = predict_proba(model, sets["retain"])
    test = predict_proba(model, sets["test"])
    if not all(torch.isfinite(p).all() for p, _ in (forget, retain, test)):
        # the method diverged: no metric means anything
        return dict.fromkeys(CLASSIFIER_METRICS + (("MIA_AUC",) if sets.get("holdout") else ()), float("nan"))
    out = {"UA": 100.0 - accuracy_from_probs(*forget), "RA": accuracy_from_probs(*retain),
           "TA": accuracy_from_probs(*test),
           "MIA": efficacy_from_probs((retain[0][:n], retain[1][:n]), (test[0][:n], test[1][:n]), forget, feature)}
    if sets.get("holdout"):
        holdout = predict_proba(model, sets["holdout"])
        out["MIA_AUC"] = membership_auc(*(mia_features(*x, "confidence")[:, 0] for x in (forget, holdout)))
    return out


def gaps(result: dict, reference: dict) -> dict:
    """|result - reference| for every number both have, in the same nesting."""
    out = {}
    for k, v in result.items():
        if isinstance(v, dict) and isinstance(reference.get(k), dict):
            out[k] = gaps(v, reference[k])
        elif isinstance(v, (int, float)) and isinstance(reference.get(k), (int, float)):
            out[k] = round(abs(v - reference[k]), 6)
    return out


def share_recovered(original: float, before: float, after: float, min_removed: float = 1e-9) -> float | None:
    """Of what unlearning removed from a metric (original - before), the share the attack brought back
    (after - before); None when less than `min_removed` was removed (a share of nothing is noise)."""
    removed = original - before
    return (after - before) / removed if removed >= min_removed else None
