"""er_ace: experience replay with the asymmetric cross-entropy (Caccia et al., ICLR 2022, "New Insights on
Reducing Abrupt Representation Change in Online Continual Learning").

The incoming batch's cross-entropy is taken over the classes present in that batch only (the other logits are
left out of its softmax), so new classes do not push the old ones' logits down; the replayed batch's
cross-entropy is over every output. This follows Avalanche's `ACECriterion` (avalanche/training/regularization.py):
the two terms are averaged, ``(ce_replay + ce_incoming) / 2``, and without a replayed batch (an empty buffer) the
loss is the plain cross-entropy of the incoming batch. Replay starts as soon as the buffer holds anything (the
authors' task-free rule); Avalanche's ER_ACE fills a class-balanced buffer at the start of each experience and
replays from the second experience on.

Where the authors' code (pclucas14/AML, methods/er_ace.py) differs: it also keeps every class above the largest
one seen so far in the incoming softmax (masks only seen-but-absent classes, with -1e9), masks only from the
second task on, and sums the two terms instead of averaging them. We follow Avalanche's version because the
issue's benchmark compares with Avalanche on the same stream; the difference for seen classes is none, and the
factor 1/2 is a step-size scale.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from malleable.continual.registry import ContinualMethod, continual_method


@continual_method("er_ace")
class ERACE(ContinualMethod):
    """ER with the asymmetric cross-entropy: incoming CE over the classes in the incoming batch, replay CE over all."""

    replay = True

    def loss(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        stream, replay = batch["stream"], batch.get("replay")
        y = stream["labels"]
        present = torch.unique(y)
        logits = model(stream["x"])
        if replay is None:
            return F.cross_entropy(logits, y)
        # the target's position among the present classes (unique is sorted)
        incoming = F.cross_entropy(logits[:, present], torch.searchsorted(present, y))
        return (F.cross_entropy(model(replay["x"]), replay["labels"]) + incoming) / 2
