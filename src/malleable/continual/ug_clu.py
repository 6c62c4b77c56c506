"""ug_clu: learning-unlearning cycles with one gradient framework (Huang et al., "A Unified Gradient-based
Framework for Task-agnostic Continual Learning-Unlearning", arXiv 2505.15178, 2025). No public code exists; this
is built from the paper's description and from the same authors' SFR-on (forget/sfr_on.py, whose official code
we follow), whose pieces are imported here, not copied.

The paper writes one update for a stream of learn and unlearn requests as the sum of four parts: descent on the
new data, weighted ascent on the data to forget, descent on the remaining data, all modulated by a weight
saliency mask; the remaining data's geometry (a Hessian term from a remain-preserved manifold constraint) is
approximated by fast-slow weight updates; the ascent weighs each sample adaptively; the mask is "balanced".

What comes from the paper: the four parts and their signs; the remaining data being the replay buffer (task-
agnostic CLU keeps no other data); fast-slow updates for the remaining geometry; adaptive per-sample ascent
coefficients; a saliency mask on the unlearning direction; task-agnostic requests (a class across tasks, random
samples) besides whole tasks.

Our reading (say so when comparing with the paper's numbers):
* a stream step here is either learn or forget, so the new-data part acts in learn steps and the ascent in
  forget steps; the remaining-data descent acts in both. A learn step is ER's (new batch joined with a buffer
  batch, one SGD step): the paper's learning update with the remaining term;
* a forget step is SFR-on's schedule on (forget set, buffer): one masked, adaptively weighted, cosine-decayed
  ascent step (the fast update), then `forget_every` descent steps on the buffer (the slow updates, which pull
  the weights back along the remaining data's curvature); SFR-on's own `loss` runs it (forget_loss: weights
  loss_i^-lambda normalised to mean 1; the mask and the clip act on the ascent gradient only), with the
  recipe's forget.steps, forget.lr, forget.batch_size and SGD with forget.momentum;
* "balanced" saliency: SFR-on's Fisher-ratio mask (forget Fisher / remaining Fisher >= threshold), with the
  remaining Fisher taken CLASS-BALANCED: one mini-batch per class of the buffer (all its stored examples of that
  class), averaged over classes, so that classes the buffer holds few of (a class just partly forgotten, the
  oldest task) weigh as much as the rest in deciding which weights the ascent may move. SFR-on's
  `fisher_ratio_mask` computes it, fed class-pure batches;
* defaults are SFR-on's CIFAR-10 ones (alpha 25, lambda 0.5, threshold 1, 5 slow steps per fast one, clip 7).
The recipe's `forget.objective` is not used by ug_clu (its update is its own).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch

from malleable.continual.er import ER
from malleable.continual.registry import continual_method
from malleable.forget.data import collate_classification
from malleable.forget.registry import get_objective
from malleable.forget.sfr_on import SFROn, fisher_ratio_mask
from malleable.learn.engine import batch_indices, make_accelerator, optimizer_step


def class_balanced_batches(forget: Sequence, retain: Sequence, batch_size: int):
    """`batches(which)` for the Fisher estimates: the forget set in batches of `batch_size`, the retain set
    as one batch per class (so the retain Fisher is the mean over classes)."""

    def batches(which: str):
        if which == "forget":
            for i in range(0, len(forget), batch_size):
                yield collate_classification(list(forget[i:i + batch_size]))
        else:
            for c in sorted({y for _, y in retain}):
                yield collate_classification([ex for ex in retain if ex[1] == c])

    return batches


# SFR-on's declarations (defaults and bounds stay its own), described as ug_clu uses them
DOCS = {"alpha": "initial weight of the ascent (fast) steps, cosine-decayed to 0 (SFR-on's)",
        "forget_every": "slow descent steps on the buffer after each fast ascent step",
        "lam": "lambda: a forget sample weighs loss^-lambda (adaptive coefficients)",
        "threshold": "the ascent moves weights whose forget / balanced-remaining Fisher ratio >= this",
        "forget_max_norm": "gradient-norm clip of the ascent steps",
        "fisher_batch_size": "mini-batch size of the forget Fisher estimate"}


@continual_method("ug_clu", params={k: replace(SFROn.params[k], doc=doc) for k, doc in DOCS.items()})
class UGCLU(ER):
    """UG-CLU: ER learn steps; forget steps by masked adaptive ascent with fast-slow buffer descent."""

    def forget(self, model: torch.nn.Module, forget: Sequence, retain: Sequence | None, settings, seed: int) -> dict:
        sfr = get_objective("sfr_on", {k: self.p[k] for k in DOCS})
        retain = list(retain or [])
        model.eval()  # the mask reads the model as it is, as SFR-on's setup does
        masks = fisher_ratio_mask(model, class_balanced_batches(forget, retain, self.p["fisher_batch_size"]),
                                  self.p["threshold"], None) if retain else None
        sfr.saliency = {id(p): (torch.ones_like(p, dtype=torch.bool) if masks is None else masks[n])
                        for n, p in model.named_parameters() if p.requires_grad}
        sfr.steps = 0
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(params, lr=settings.lr, momentum=settings.momentum,
                                    weight_decay=settings.weight_decay)
        accelerator = make_accelerator()
        device = next(model.parameters()).device
        size_f, size_r = min(settings.batch_size, len(forget)), min(settings.batch_size, len(retain))
        model.train()
        fast = 0
        for step in range(settings.steps):
            sfr.progress = step / settings.steps
            if not retain and sfr.steps % (self.p["forget_every"] + 1):
                sfr.steps += 1  # nothing to descend on: the slow steps are skipped, the schedule goes on
                continue
            fast += sfr.steps % (self.p["forget_every"] + 1) == 0
            batch = {"forget": collate_classification([forget[i] for i in batch_indices(step, size_f, len(forget),
                                                                                         seed)]),
                     "retain": collate_classification([retain[i] for i in batch_indices(step, size_r, len(retain),
                                                                                        seed + 1)])
                     if retain else None}
            batch = {k: None if v is None else {n: t.to(device) for n, t in v.items()} for k, v in batch.items()}
            optimizer_step(sfr, model, optimizer, params, [batch], 1, accelerator, settings.max_grad_norm)
            optimizer.zero_grad(set_to_none=True)
        model.eval()
        fraction = None if masks is None else \
            sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())
        return {"objective": "ug_clu", "steps": settings.steps, "ascent_steps": fast, "mask_fraction": fraction}
