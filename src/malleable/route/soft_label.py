"""VL-RouterBench's cost-aware soft-label training: a classifier over candidates whose targets spread over the
correct candidates with weights exp(-lambda * cost)."""

from __future__ import annotations

import numpy as np
import torch

from malleable.params import Param
from malleable.route.prknn import standardise
from malleable.route.registry import Router, router

LAMBDAS = (0.0, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)


def soft_targets(Y: np.ndarray, C: np.ndarray, lam: float) -> np.ndarray:
    """VL-RouterBench's `build_soft_targets` (scheme exp, fallback cheapest): over the correct candidates
    (quality > 0), t(m) proportional to exp(-lam * C[q, m]); uniform at lam = 0, the cheapest correct one as
    lam grows; a query no candidate gets right is a one-hot on its cheapest candidate."""
    correct = Y > 0
    logw = np.where(correct, -lam * C, -np.inf)
    top = logw.max(axis=1, keepdims=True)
    has = np.isfinite(top[:, 0])
    w = np.zeros_like(C, dtype=np.float64)
    w[has] = np.exp(logw[has] - top[has])
    w[has] /= w[has].sum(axis=1, keepdims=True)
    w[~has, :] = 0.0
    w[np.flatnonzero(~has), np.argmin(C[~has], axis=1)] = 1.0
    return w


def forward(arrays: dict, key: str, X: torch.Tensor) -> torch.Tensor:
    h = X
    n = sum(1 for k in arrays if k.startswith(f"{key}.w"))
    for i in range(n):
        h = h @ arrays[f"{key}.w{i}"] + arrays[f"{key}.b{i}"]
        if i < n - 1:
            h = torch.relu(h)
    return h


@router("soft_label", params={
    "hidden": Param(0, "hidden units of the classifier (0: linear, VL-RouterBench's linear router)", ge=0),
    "epochs": Param(200, "full-batch Adam steps (theirs: max_iter 200)", ge=1),
    "lr": Param(0.01, "Adam learning rate (theirs: 0.01)", gt=0),
    "C": Param(1.0, "inverse L2 strength: loss + sum(p^2) / (2 C) (theirs: 1.0)", gt=0)})
class SoftLabel(Router):
    """One classifier per lambda in 0, 0.1, ..., 100, trained as VL-RouterBench's linear router with soft labels
    (routers/linear/router.py and utils/soft_targets.py, read in yutao1024/SCOPE-Router at 35c43e4): training
    queries no candidate gets right dropped, embeddings standardised (StandardScaler), full-batch Adam on the
    cross-entropy against soft targets over the correct candidates (quality > 0) weighted by exp(-lambda *
    cost), plus their L2 term sum(p^2) / (2 C); routes to the argmax. Costs enter divided by the training mean
    cost (theirs multiply by a fixed `cost_scale`, default 1; ours makes one lambda grid serve any cost unit);
    their dev-set early stopping is not done (the lambda is chosen on validation instead). `hidden` > 0 puts
    one ReLU layer in between (their mlp router's shape)."""

    knob = "lambda"
    needs_embeddings = True

    def fit(self, train, seed):
        keep = (train.Y > 0).any(axis=1)
        Y, C = (train.Y, train.C) if not keep.any() else (train.Y[keep], train.C[keep])
        self.arrays.update(standardise(train.X[keep] if keep.any() else train.X))
        scale = float(C.mean()) or 1.0
        X = torch.from_numpy(self._features(train.X[keep] if keep.any() else train.X)).float()
        self.info.update(cost_scale=scale, lambdas=list(LAMBDAS))
        for j, lam in enumerate(LAMBDAS):
            T = torch.from_numpy(soft_targets(Y, C / scale, lam)).float()
            g = torch.Generator().manual_seed(seed)
            sizes = [X.shape[1]] + ([self.p["hidden"]] if self.p["hidden"] else []) + [Y.shape[1]]
            params = {}
            for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):  # nn.Linear's initialisation
                params[f"l{j}.w{i}"] = ((torch.rand(a, b, generator=g) * 2 - 1) / a ** 0.5).requires_grad_(True)
                params[f"l{j}.b{i}"] = ((torch.rand(b, generator=g) * 2 - 1) / a ** 0.5).requires_grad_(True)
            opt = torch.optim.Adam(params.values(), lr=self.p["lr"])
            for _ in range(self.p["epochs"]):
                loss = -(T * torch.log_softmax(forward(params, f"l{j}", X), dim=1)).sum(dim=1).mean()
                loss = loss + sum(p.pow(2).sum() for p in params.values()) / (2 * self.p["C"])
                opt.zero_grad()
                loss.backward()
                opt.step()
            self.arrays.update({k: v.detach().numpy() for k, v in params.items()})

    def _features(self, X: np.ndarray) -> np.ndarray:
        return ((X - self.arrays["mean"]) / self.arrays["scale"]).astype(np.float32)

    def knob_values(self):
        return list(self.info["lambdas"])

    def choose(self, batch, value):
        j = self.info["lambdas"].index(value)
        arrays = {k: torch.from_numpy(v) for k, v in self.arrays.items() if k.startswith(f"l{j}.")}
        with torch.no_grad():
            return forward(arrays, f"l{j}", torch.from_numpy(self._features(batch.X))).argmax(dim=1).numpy()
