"""Membership inference for unlearning: SalUn's MIA-efficacy and a generic membership AUC.

MIA-efficacy follows SalUn (Fan et al., ICLR 2024; github.com/OPTML-Group/Unlearn-Saliency,
`Classification/evaluation/SVC_MIA.py` and `main_forget.py`, which follow Song & Mittal 2021):
an RBF SVC (C=3, gamma="auto") is fit on one per-example feature of the model's softmax output, with
members = the first len(test) retain examples (label 1) and non-members = the test set (label 0); the
MIA-efficacy is the fraction of forget examples the SVC calls NON-members. SalUn's tables report the
"confidence" feature (probability of the true label), the default here. Higher is better forgetting;
a retrained model's forget set scores like unseen data.

One deliberate difference: SalUn's `m_entropy` indexes `p[:, labels]` (whole columns for every label in the
batch); here it is Song & Mittal's modified entropy per example, -(1-p_y)log p_y - sum_{i!=y} p_i log(1-p_i).
It only matters for feature="m_entropy", not for the reported "confidence".
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from scipy.special import entr
from sklearn.metrics import roc_auc_score
from sklearn.svm import SVC

from malleable.errors import RecipeError
from malleable.evaluate.classification import predict_proba

FEATURES = ("correctness", "confidence", "entropy", "m_entropy", "prob")
_TINY = 1e-30


def mia_features(probs: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray, feature: str) -> np.ndarray:
    """One SalUn attack feature per example, shape (N, k): k = classes for "prob", else 1."""
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    if feature not in FEATURES:
        raise RecipeError(f"MIA feature {feature!r}: expected one of {', '.join(FEATURES)}")
    if feature == "prob":
        return p
    p_y = p[np.arange(len(y)), y]
    if feature == "correctness":
        out = (p.argmax(axis=1) == y).astype(np.float64)
    elif feature == "confidence":
        out = p_y
    elif feature == "entropy":
        out = entr(p).sum(axis=1)
    else:
        log_1m = np.log(np.clip(1.0 - p, _TINY, None))
        others = -(p * log_1m).sum(axis=1) + p_y * log_1m[np.arange(len(y)), y]
        out = -(1.0 - p_y) * np.log(np.clip(p_y, _TINY, None)) + others
    return out[:, None]


def svc_membership(members: tuple, nonmembers: tuple, targets: tuple, feature: str = "confidence") -> np.ndarray:
    """Fit SalUn's SVC on (probs, labels) of known members / non-members; predicted membership (0/1) of targets."""
    x_in, x_out = mia_features(*members, feature), mia_features(*nonmembers, feature)
    clf = SVC(C=3, gamma="auto", kernel="rbf")
    clf.fit(np.concatenate([x_in, x_out]), np.concatenate([np.ones(len(x_in)), np.zeros(len(x_out))]))
    return clf.predict(mia_features(*targets, feature))


def mia_efficacy(model: torch.nn.Module, forget: Sequence, retain: Sequence, test: Sequence,
                 feature: str = "confidence", max_shadow: int | None = None) -> float:
    """SalUn's MIA-efficacy in percent: share of `forget` the SVC attack predicts as non-members.

    Shadow members are the first len(test) retain examples, as in SalUn; `max_shadow` caps both shadow sets
    (first examples of each) because an RBF SVC's fit grows quadratically with their size.
    """
    n = len(test) if max_shadow is None else min(len(test), max_shadow)
    return efficacy_from_probs(predict_proba(model, retain[:n]), predict_proba(model, test[:n]),
                               predict_proba(model, forget), feature)


def efficacy_from_probs(members: tuple, nonmembers: tuple, forget: tuple, feature: str = "confidence") -> float:
    """`mia_efficacy` on precomputed (probs, labels) pairs, so a protocol scores each set only once."""
    return 100.0 * float(1.0 - svc_membership(members, nonmembers, forget, feature).mean())


def membership_auc(member_scores: Sequence[float] | np.ndarray,
                   nonmember_scores: Sequence[float] | np.ndarray) -> float:
    """ROC AUC of a score that should be higher for members: 0.5 = no membership signal, 1 = perfect."""
    m, n = np.asarray(member_scores, dtype=np.float64), np.asarray(nonmember_scores, dtype=np.float64)
    if len(m) == 0 or len(n) == 0:
        raise RecipeError("membership_auc: needs at least one member and one non-member score")
    return float(roc_auc_score(np.concatenate([np.ones(len(m)), np.zeros(len(n))]), np.concatenate([m, n])))


MIN_K = 0.4  # open-unlearning's k in every mia_min_k config (TOFU and MUSE)


def min_k_score(logprobs: np.ndarray, k: float = MIN_K) -> float:
    """Mean of the k-fraction lowest token log-probabilities (at least one token): higher = more member-like.
    Open-unlearning's `MinKProbAttack.compute_score` negated (it scores lower = member); 0 with no token, as
    there. Pass the answer's tokens without its EOS to match it (`evaluate_set` does)."""
    if len(logprobs) == 0:
        return 0.0
    n = max(1, int(len(logprobs) * k))
    return float(np.sort(logprobs)[:n].mean())
