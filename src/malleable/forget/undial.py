"""UNDIAL: self-distillation with adjusted logits (Dong et al., "UNDIAL: Self-Distillation with Adjusted Logits for
Robust Unlearning in Large Language Models", NAACL 2025).

The frozen original is the teacher. At every scored position its logits are lowered by beta at the token the
data says comes next, and the model is trained with cross-entropy towards the softmax of these adjusted logits:
CE(softmax(teacher - beta * onehot(y)), model). The target keeps the teacher's whole distribution over the other
tokens, so the model learns to put less mass on the memorised token and no more than that: the loss has a floor
(the soft target) instead of GA's unbounded ascent, which is what the paper credits for its stability.

Transcribed from open-unlearning's `compute_undial_loss` (src/trainer/utils.py) and UNDIAL trainer
(src/trainer/unlearn/undial.py: gamma * forget + alpha * GradDiff's retain term), itself from the authors'
`DITrainer.compute_loss` (github.com/dong-river/LLM_unlearning, utils/ft_utils.py). Defaults are open-unlearning's
configs/trainer/UNDIAL.yaml: beta 10, gamma 1, alpha 0 (so no retain data is needed; lr 1e-4, 10 epochs there);
the authors' main.py defaults di_strength to 5 and their README runs 3.

Where ours differs: both references average the cross-entropy over EVERY position of the sequence. The authors
unlearn plain text (labels = input_ids), where that is every token, as here for `text` rows. On question/answer
rows open-unlearning's labels are -100 on the prompt and padding, and its scatter of -100 into the mask writes
to vocabulary entry V - 100 (negative indexing), so at those positions it distils towards the teacher with an
unrelated token lowered, and counts them in the mean. We score the answer tokens only, the ones the data asks
to forget; on a batch whose every position is an answer token the two are the same number (tested).

The paper evaluates language models only; the loss is per position over any logits, so on a classifier it is
the same formula on the class logits (the true class lowered by beta), which is our use.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from malleable.forget.graddiff import RETAIN_PARAMS, GradDiff, OptionalRetain
from malleable.forget.losses import logits_and_targets
from malleable.forget.registry import objective
from malleable.params import Param


def adjusted_distillation(logits: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor,
                          beta: float) -> torch.Tensor:
    """Mean over scored units of CE(softmax(teacher - beta * onehot(target)), model)."""
    mask = targets != -100
    onehot = F.one_hot(targets.clamp(min=0), logits.shape[-1]).to(teacher.dtype)
    soft = torch.softmax(teacher.float() - beta * onehot, -1)
    ce = -(soft * torch.log_softmax(logits.float(), -1)).sum(-1)
    return ce[mask].mean()


@objective("undial", needs_reference=True, needs_retain=False, params={
    "beta": Param(10.0, "how far the teacher's logit of the memorised token is lowered", ge=0),
    **RETAIN_PARAMS,
    "alpha": Param(0.0, "weight of the retain term (open-unlearning's UNDIAL default: none)", ge=0),
})
class UNDIAL(OptionalRetain, GradDiff):
    """UNDIAL: distil from the frozen original with the memorised token's logit lowered by beta (+ retain term)."""

    def forget_term(self, model: torch.nn.Module, part: dict) -> torch.Tensor:
        logits, targets = logits_and_targets(model, part)
        teacher, _ = self.reference(logits_and_targets, part)
        return adjusted_distillation(logits, teacher, targets, self.p["beta"])
