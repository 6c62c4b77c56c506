"""mir_las and mir: maximally interfered retrieval (Aljundi et al., NeurIPS 2019, "Online Continual Learning with
Maximally Interfered Retrieval"), with LAS's logit adjustment (`mir_las`, the LAS authors' models/mir_las.py in
github.com/K1nght/online_CL_logit_adjusted_softmax) or without it (`mir`).

Retrieval, before each optimiser step: draw `subsample` stored examples uniformly from the buffer; take a virtual
SGD step on the incoming batch alone (plain cross-entropy, step size the training lr: theta' = theta - lr * g);
score every drawn example by how much its plain cross-entropy rises, loss(theta') - loss(theta); replay the
`replay_batch_size` with the largest rise (ties in draw order). The incoming and retrieved examples are then
trained on as one joined batch: with LAS's adjusted softmax (`mir_las`, window and tau as `las`) or plain
cross-entropy (`mir`, which is `mir_las` at tau 0 bit for bit). The virtual step is evaluated with
torch.func.functional_call on theta - lr * g, not on a deep copy of the model; the numbers are the same.

Definitions, read in both references: the virtual gradient is the incoming batch's unadjusted cross-entropy, the
scores are per-example unadjusted cross-entropies, the step size is the optimiser's lr (LAS authors and
Avalanche's MIRPlugin alike). Where ours differs, and why:
* the buffer is the engine's reservoir, updated after every optimiser step with the incoming batch, as for `er`
  and `las`, so `mir_las` differs from `las` only in which examples it replays. The LAS authors' mir_las adds a
  task's data to the reservoir at the end of the task (no replay during the first task); Avalanche's MIRPlugin
  keeps a class-balanced buffer and leaves out the classes of the latest batch;
* subsample 160 is the LAS authors' default (Avalanche's 200); it is capped at the buffer's fill;
* the replayed examples join the incoming batch in one cross-entropy (the LAS authors' concatenation, needed for
  one adjusted softmax over both); Avalanche adds the replay's mean loss to the incoming one instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.func import functional_call

from malleable.continual.er import ER
from malleable.continual.las import LAS
from malleable.continual.registry import continual_method
from malleable.params import Param

SUBSAMPLE = {"subsample": Param(160, "buffer examples scored per step, the replay batch picked among them (the LAS "
                                     "authors' default 160; Avalanche's 200)", ge=1)}


def interference(model: torch.nn.Module, incoming: dict[str, torch.Tensor], candidates: dict[str, torch.Tensor],
                 lr: float) -> torch.Tensor:
    """Per candidate, its cross-entropy after a virtual SGD step on `incoming` minus before it."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    grads = torch.autograd.grad(F.cross_entropy(model(incoming["x"]), incoming["labels"]), list(params.values()))
    with torch.no_grad():
        stepped = {n: p - lr * g for (n, p), g in zip(params.items(), grads)}
        before = F.cross_entropy(model(candidates["x"]), candidates["labels"], reduction="none")
        after = F.cross_entropy(functional_call(model, stepped, (candidates["x"],)), candidates["labels"],
                                reduction="none")
    return after - before


def most_interfered(method, model: torch.nn.Module, incoming: dict, buffer, size: int, lr: float) -> dict | None:
    """`size` of `subsample` uniform draws from the buffer, those whose loss the virtual step raises most."""
    candidates = buffer.sample(method.p["subsample"])
    if candidates is None:
        return None
    device = next(model.parameters()).device
    on = {k: v.to(device) for k, v in candidates.items()}
    scores = interference(model, {k: v.to(device) for k, v in incoming.items()}, on, lr)
    pick = torch.argsort(scores, descending=True, stable=True)[:size].cpu()
    return {k: v[pick] for k, v in candidates.items()}


@continual_method("mir_las", params=SUBSAMPLE)
class MIRLAS(LAS):
    """MIR retrieval (largest loss rise under a virtual step) with LAS's adjusted softmax on the joined batch."""

    retrieve = most_interfered


@continual_method("mir", params=SUBSAMPLE)
class MIR(ER):
    """MIR retrieval (largest loss rise under a virtual step) with plain cross-entropy on the joined batch."""

    retrieve = most_interfered
