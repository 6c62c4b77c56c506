"""Arrow (Ostapenko et al. 2024, "Towards Modular LLMs by Building and Reusing a Library of LoRAs"; PEFT's
`peft/tuners/lora/arrow.py`): a zero-shot router over LoRA adapters on one base, from the adapters' weights
alone.

* Prototypes: per adapted module, each adapter's top right singular vector of its delta B @ A (a vector in the
  module's input space). PEFT approximates it with 15 power-iteration steps from a random start; we take it
  exactly from the SVD of the small r x in matrix R_B A (B = Q_B R_B), without forming B @ A. The two agree
  where PEFT's iteration has converged (a clear gap between the top two singular values; the test builds such
  adapters); with a small gap PEFT's vector is a mix of the top ones. A singular vector's sign is arbitrary:
  as in PEFT only |x . v| is used, so the sign never matters (ours is fixed, the largest entry positive).
* Per token, as PEFT: the logits |x . v_i| over the adapters of the module's input x (raw dot products with
  unit prototypes, not cosines, as PEFT's code), the top_k kept, a softmax with temperature over them (the
  rest weigh 0). PEFT's defaults: top_k 3, temperature 1 (top_k is capped at the number of adapters here;
  PEFT raises).
* Per query (ours): PEFT mixes the top-k adapters token by token inside every layer; the router framework
  picks ONE candidate per query, so `route build` averages the per-token weights over the prompt's tokens
  (chat-rendered, padding left out) and over every module the adapters share, giving a score per adapter,
  and the `arrow` router picks the adapter with the highest score. The module inputs come from one forward
  pass of the base model without adapters (forward hooks); in PEFT a later layer's input has already been
  changed by the adapters mixed into earlier layers, so only the first adapted layer sees the same input.
* Modules: those every adapter of the library adapts (PEFT requires identical target modules and ranks;
  we allow different ranks and use the shared modules).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from malleable.errors import InputError
from malleable.route.registry import Router, router


def top_right_singular_vector(B, A):
    """The unit top right singular vector of B @ A (B: out x r, A: r x in) in float64, largest entry positive."""
    import torch

    _, R = torch.linalg.qr(B.detach().double())
    _, _, Vh = torch.linalg.svd(R @ A.detach().double(), full_matrices=False)
    v = Vh[0]
    return v * torch.sign(v[v.abs().argmax()])


def prototypes(adapters: list[str | Path]) -> dict:
    """Module name -> (adapters, in_features) float64 prototypes, over the modules every adapter adapts."""
    import torch

    from malleable.io.adapter import read_adapter

    read = [read_adapter(a) for a in adapters]
    shared = sorted(set.intersection(*(set(r.deltas) for r in read)))
    if not shared:
        raise InputError(f"{adapters[0]}: the Arrow adapters adapt no module in common")
    return {m: torch.stack([top_right_singular_vector(r.deltas[m].B, r.deltas[m].A) for r in read])
            for m in shared}


def token_weights(x, protos, top_k: int, temperature: float):
    """PEFT's per-token routing: (tokens, in) inputs against (adapters, in) prototypes -> (tokens, adapters)
    weights, a softmax with `temperature` over the top_k of |x . v| and 0 elsewhere."""
    import torch

    sim = (x.to(protos.dtype) @ protos.T).abs()
    top, idx = torch.topk(sim, min(top_k, protos.shape[0]), dim=-1)
    logits = torch.full_like(sim, float("-inf")).scatter(-1, idx, top)
    return torch.softmax(logits / temperature, dim=-1)


def query_scores(model, tokenizer, prompts: list[str], protos: dict, *, top_k: int = 3,
                 temperature: float = 1.0, batch_size: int = 16, chat: bool = True) -> np.ndarray:
    """(queries, adapters): each query's per-token Arrow weights averaged over its prompt's tokens (chat-rendered,
    or with `chat=False` plain as `encode_pair` encodes it) and over the modules, the module inputs read with
    forward hooks on the base `model` (no adapters)."""
    import torch

    from malleable.learn.data import encode_prompts

    modules = dict(model.named_modules())
    missing = [m for m in protos if m not in modules]
    if missing:
        raise InputError(f"the Arrow adapters adapt module '{missing[0]}', which the base model does not have")
    total, mask = {}, None

    def hook(name):
        def record(_module, args):
            x = args[0]
            w = token_weights(x.reshape(-1, x.shape[-1]), protos[name].to(x.device), top_k, temperature)
            w = w.reshape(*x.shape[:-1], -1) * mask.unsqueeze(-1)
            total[name] = w.sum(dim=1) / mask.sum(dim=1, keepdim=True)
        return record

    handles = [modules[m].register_forward_pre_hook(hook(m)) for m in protos]
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    out = []
    try:
        model.eval()
        for i in range(0, len(prompts), batch_size):
            batch = encode_prompts(tokenizer, prompts[i:i + batch_size], chat, return_tensors="pt",
                                   padding=True).to(model.device)
            mask = batch["attention_mask"].double()
            total.clear()
            with torch.no_grad():
                model(**batch)
            out.append(torch.stack([total[m] for m in protos]).mean(dim=0).cpu().numpy())
    finally:
        tokenizer.padding_side = side
        for h in handles:
            h.remove()
    return np.concatenate(out)


@router("arrow")
class Arrow(Router):
    """Zero-shot: each query to the LoRA adapter with the highest Arrow score (the `A` matrix that `route build`
    writes as arrow.npy with `arrow: true`; NaN for candidates outside the adapter library). No trade-off knob
    and nothing learned; matrices without Arrow scores are refused. `RoutedModel` computes the scores of new
    queries itself (route/serve.py), with the build's top_k and temperature."""

    needs_arrow = True

    def fit(self, train, seed):
        scores = self._scores(train)
        self.info["adapters"] = np.flatnonzero(~np.isnan(scores).all(axis=0)).tolist()

    def _scores(self, batch) -> np.ndarray:
        if getattr(batch, "A", None) is None:
            raise InputError(f"{batch.source or 'matrices'}: router 'arrow' needs Arrow scores (arrow.npy, written "
                             "by `route build` with arrow: true), and there are none")
        return batch.A

    def choose(self, batch, value):
        A = self._scores(batch)
        return np.argmax(np.where(np.isnan(A), -np.inf, A), axis=1)
