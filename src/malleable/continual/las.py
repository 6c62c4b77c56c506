"""las: experience replay with Logit Adjusted Softmax (Huang et al., TMLR 2024, "Online Continual Learning via
Logit Adjusted Softmax"), the authors' `er_las` (github.com/K1nght/online_CL_logit_adjusted_softmax, models/er_las.py).

Training logits are ``logits + tau * log(counts + 1e-50)``, where `counts` are the label counts of the last
`window` joined batches (incoming and replayed labels both: the batch-wise sliding-window prior, updated before
the step's forward pass), in float32 as the authors' code keeps them. In float32 1e-50 rounds to 0, so a class
absent from the window gets -inf: it leaves the softmax and its logit gets exactly zero gradient. Inference uses
the raw logits (the engine evaluates `model(x)`). The loss is the cross-entropy of the joined batch, as `er`.

Where ours differs: at ``tau = 0`` the adjustment is skipped (the authors' ``0 * log(0)`` is NaN for every absent
class, so their code cannot run at tau 0); the result is `er` bit for bit, which the tests check.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from malleable.continual.registry import ContinualMethod, continual_method, joined
from malleable.params import Param


@continual_method("las", params={
    "tau": Param(1.0, "strength of the adjustment (the authors' default 1.0; 0 gives er)", ge=0),
    "window": Param(1, "batches the label prior counts over, replayed labels included (the authors' l; default 1)",
                    ge=1)})
class LAS(ContinualMethod):
    """ER with Logit Adjusted Softmax: training logits + tau * log(label counts of the last `window` batches)."""

    replay = True

    def setup(self, num_classes: int) -> None:
        super().setup(num_classes)
        self.recent = torch.zeros(0, num_classes)  # one row of label counts per batch in the window, oldest first

    def prior(self, labels: torch.Tensor) -> torch.Tensor:
        """Push this batch's label counts into the window and return the window's counts (1, classes)."""
        counts = torch.bincount(labels.cpu(), minlength=self.num_classes).float().unsqueeze(0)
        self.recent = torch.cat([self.recent, counts])[-self.p["window"]:]
        return self.recent.sum(0, keepdim=True)

    def loss(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        x, y = joined(batch)
        counts = self.prior(y)
        logits = model(x)
        if self.p["tau"] != 0:
            logits = logits + self.p["tau"] * torch.log(counts.to(logits.device) + 1e-50)
        return F.cross_entropy(logits, y)

    def state(self) -> dict[str, torch.Tensor]:
        return {"las.recent": self.recent}

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        self.recent = tensors["las.recent"]
