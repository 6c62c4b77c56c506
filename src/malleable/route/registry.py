"""The router registry: a router is a small class registered by name, with declared parameters.

    @router("knn", params={"k": Param(10, "neighbours", ge=1)})
    class KNN(QualityRouter):
        def fit(self, train, seed): ...          # store what it learned in self.arrays / self.info
        def quality(self, batch): ...            # (queries, candidates) predicted quality

A router sees only the training split in `fit` and, in `choose(batch, value)`, a batch's embeddings and task
names (the oracle alone reads the batch's true quality and cost: it is the bound, not a router). Every router
has one cost trade-off knob (`knob`: willingness to pay, lambda, or a probability) and the values it sweeps
(`knob_values()`); the engine picks the operating value on the validation split, never on test.

What a router learned lives in ``self.arrays`` (name -> numpy array, written as safetensors) and ``self.info``
(plain JSON); ``restore()`` rebuilds anything derived from them after loading. Nothing is pickled.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np

from malleable.params import Param, Registry

WTP = "willingness_to_pay"


class Router:
    """Base of every router."""

    name: ClassVar[str] = ""
    params: ClassVar[dict[str, Param]] = {}
    knob: ClassVar[str | None] = None
    needs_embeddings: ClassVar[bool] = False
    needs_arrow: ClassVar[bool] = False  # reads Arrow scores (batch.A): the build's, or computed by RoutedModel

    def __init__(self, **p: Any) -> None:
        self.p = p
        self.arrays: dict[str, np.ndarray] = {}
        self.info: dict[str, Any] = {}

    def fit(self, train, seed: int) -> None:
        """Learn from the training split (a `Matrices`)."""

    def restore(self) -> None:
        """Rebuild what is derived from `arrays` / `info` after loading."""

    def knob_values(self) -> list[float | None]:
        return [None]

    def choose(self, batch, value: float | None) -> np.ndarray:
        """One candidate index per query of `batch` at trade-off `value`."""
        raise NotImplementedError


def mean_costs(train) -> np.ndarray:
    """Each candidate's mean cost on the training split: what a router expects to pay before running it."""
    return train.C.mean(axis=0)


def wtp_grid(costs: np.ndarray, n: int = 15) -> list[float | None]:
    """Willingness-to-pay values from 'always the cheapest' to 'quality only' (None, an infinite willingness):
    the cost spread between candidates times 0.1 .. 1000, so the sweep spans the pool whatever unit the costs
    are in."""
    spread = float(costs.max() - costs.min()) or float(costs.max()) or 1.0
    return [float(v) for v in spread * np.geomspace(0.1, 1000.0, n)] + [None]


def pick(quality: np.ndarray, cost: np.ndarray, value: float | None) -> np.ndarray:
    """RouterBench's rule: argmax over candidates of quality * willingness_to_pay - cost; at None (infinite
    willingness) the best predicted quality, the cheaper candidate among equals. `cost` is per candidate or
    per (query, candidate)."""
    cost = np.broadcast_to(cost, quality.shape)
    if value is None:
        best = quality >= quality.max(axis=1, keepdims=True) - 1e-12
        return np.argmin(np.where(best, cost, np.inf), axis=1)
    return np.argmax(quality * value - cost, axis=1)


class QualityRouter(Router):
    """A router that predicts each candidate's quality on a query and trades it against the candidate's mean
    training cost with a willingness to pay (RouterBench's knn / mlp / svm routers)."""

    knob = WTP
    needs_embeddings = True

    def fit(self, train, seed: int) -> None:
        costs = mean_costs(train)
        self.arrays["mean_cost"] = costs
        self.info["knob_values"] = wtp_grid(costs)
        self.learn(train, seed)

    def learn(self, train, seed: int) -> None:
        raise NotImplementedError

    def quality(self, batch) -> np.ndarray:
        raise NotImplementedError

    def knob_values(self) -> list[float | None]:
        return list(self.info["knob_values"])

    def choose(self, batch, value):
        return pick(self.quality(batch), self.arrays["mean_cost"], value)


ROUTERS = Registry("router", "malleable.route", key="routers")


def router(name: str, *, params: dict[str, Param] | None = None) -> Callable[[type[Router]], type[Router]]:
    """Register a `Router` subclass as `name`; its docstring is the router's documentation."""
    return ROUTERS.register(name, params)


def router_class(name: str, key: str = "routers") -> type[Router]:
    return ROUTERS.lookup(name, key)


def get_router(name: str, given: dict[str, Any], key: str = "routers") -> Router:
    """The registered router `name` built with checked parameters (defaults filled in)."""
    return ROUTERS.build(name, given, key, prefix=f"{key}.{name}")
