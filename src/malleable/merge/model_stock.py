"""Model Stock (Jang et al., "Model Stock: All we need is just a few fine-tuned models", ECCV 2024,
arXiv:2403.19522), as mergekit 0.1.5 defines it (``merge_methods/model_stock.py: model_stock_merge_method``)."""

from __future__ import annotations

import torch

from malleable.merge.registry import Param, merge_rule


@merge_rule("model_stock", inputs=(2, None), params={
    "filter_wise": Param(False, "one interpolation ratio per row (per output filter) instead of one per tensor"),
})
def model_stock(tensors, weights, generator, filter_wise):
    """Model Stock: cos = the mean cosine between every pair of task vectors, t = n cos / (1 + (n - 1) cos),
    result = base + t * mean(task vectors), i.e. mergekit's t * average + (1 - t) * base. Needs a base and at
    least two inputs; input weights are ignored, as in mergekit. Where 1 + (n - 1) cos is within 1e-6 of 0 the
    base is kept (t = 0), as in mergekit. `filter_wise` takes the cosines along the last axis, one t per row
    (a 1-D tensor is one row)."""
    shape = tensors[0].shape
    if filter_wise:
        offsets = [t.unsqueeze(0) if t.dim() == 1 else t for t in tensors]
    else:
        offsets = [t.view(-1) for t in tensors]
    norms = [torch.linalg.vector_norm(o, dim=-1) for o in offsets]
    cosines = []
    for i, a in enumerate(offsets):
        for j in range(i + 1, len(offsets)):
            dot = torch.einsum("...k,...k->...", a, offsets[j])  # no full-size product temporary
            cosines.append((dot / (norms[i] * norms[j]).clamp(min=1e-6)).clamp(-1, 1))
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    n = len(offsets)
    denominator = 1 + (n - 1) * cos
    singular = denominator.abs() < 1e-6
    ratio = torch.where(singular, torch.zeros_like(cos),
                        (n * cos) / torch.where(singular, torch.ones_like(denominator), denominator))
    out = offsets[0]
    for o in offsets[1:]:
        out.add_(o)
    return out.div_(n).mul_(ratio).view(shape)
