"""RouteLLM's matrix-factorisation router, on local query embeddings instead of a hosted embedding API."""

from __future__ import annotations

import numpy as np
import torch

from malleable.params import Param
from malleable.route.registry import QualityRouter, router


def battles(Y: np.ndarray) -> np.ndarray:
    """(query, winner, loser) for every query and pair of candidates whose qualities differ (ties are dropped,
    as RouteLLM drops tied battles)."""
    q, a, b = np.nonzero(Y[:, :, None] > Y[:, None, :])
    return np.stack([q, a, b], axis=1)


def scores(arrays: dict[str, torch.Tensor], X: torch.Tensor) -> torch.Tensor:
    """s(q, m) = w . (normalize(P_m) * (W x_q)): RouteLLM's MFModel score, for every query and candidate."""
    P = torch.nn.functional.normalize(arrays["P"], p=2, dim=1)  # (candidates, dim)
    proj = X @ arrays["text_proj"].T  # (queries, dim)
    return (proj[:, None, :] * P[None, :, :]) @ arrays["classifier"]  # (queries, candidates)


@router("mf", params={"dim": Param(128, "latent dimension (RouteLLM: 128)", ge=1),
                      "epochs": Param(100, "epochs over the battles (RouteLLM: 100)", ge=1),
                      "batch_size": Param(64, "battles per step (RouteLLM: 64)", ge=1),
                      "lr": Param(3e-4, "Adam learning rate (RouteLLM: 3e-4)", gt=0),
                      "weight_decay": Param(1e-5, "Adam weight decay (RouteLLM: 1e-5)", ge=0),
                      "alpha": Param(0.1, "Gaussian noise added to the embeddings in training (RouteLLM: 0.1)",
                                     ge=0)})
class MF(QualityRouter):
    """RouteLLM's MFModel: a candidate embedding P_m (L2-normalised), a projection W of the query embedding
    and a linear head w; candidate a beats b on query q with probability sigmoid(s(q, a) - s(q, b)), trained
    with binary cross-entropy on every pair whose qualities differ on a training query (RouteLLM trains on
    Chatbot Arena battles between two models; our battles come from the quality matrix). Predicted quality =
    the candidate's mean predicted win rate against the rest of the pool (RouteLLM compares one strong and
    one weak model; a pool needs one number per candidate), then willingness to pay."""

    def learn(self, train, seed):
        g = torch.Generator().manual_seed(seed)
        k, d, dim = train.Y.shape[1], train.X.shape[1], self.p["dim"]
        params = {"P": torch.randn(k, dim, generator=g),  # nn.Embedding's N(0, 1) init
                  "text_proj": (torch.rand(dim, d, generator=g) * 2 - 1) / d ** 0.5,  # nn.Linear's init
                  "classifier": (torch.rand(dim, generator=g) * 2 - 1) / dim ** 0.5}
        for t in params.values():
            t.requires_grad_(True)
        fights = torch.from_numpy(battles(train.Y))
        X = torch.from_numpy(train.X).float()
        opt = torch.optim.Adam(params.values(), lr=self.p["lr"], weight_decay=self.p["weight_decay"])
        bs = self.p["batch_size"]
        for _ in range(self.p["epochs"] if len(fights) else 0):
            for chunk in torch.randperm(len(fights), generator=g).split(bs):
                q, win, lose = fights[chunk].T
                x = X[q] + torch.randn(len(q), X.shape[1], generator=g) * self.p["alpha"]
                s = scores(params, x)
                rows = torch.arange(len(q))
                loss = torch.nn.functional.softplus(-(s[rows, win] - s[rows, lose])).mean()  # BCE, label 1
                opt.zero_grad()
                loss.backward()
                opt.step()
        self.arrays.update({k: v.detach().numpy().astype(np.float32) for k, v in params.items()})

    def quality(self, batch):
        with torch.no_grad():
            s = scores({k: torch.from_numpy(self.arrays[k]) for k in ("P", "text_proj", "classifier")},
                       torch.from_numpy(batch.X).float()).double()
        k = s.shape[1]
        win = torch.sigmoid(s[:, :, None] - s[:, None, :])  # (queries, a, b)
        return ((win.sum(dim=2) - 0.5) / max(k - 1, 1)).numpy()
