"""RouteLLM's random router: a share p of the queries, drawn at random, to the strongest, the rest to the
cheapest."""

from __future__ import annotations

import numpy as np

from malleable.route.registry import Router, mean_costs, router
from malleable.route.strongest import best


@router("random")
class Random(Router):
    """Each query to the strongest training candidate with probability p, else to the cheapest (RouteLLM's
    random router between a strong and a weak model); p is swept over 0, 0.1, ..., 1. Its APGR is 0.5 in
    expectation: the baseline a learned router must beat."""

    knob = "p_strong"

    def fit(self, train, seed):
        costs = mean_costs(train)
        self.info.update(strong=best(train.Y, costs), weak=int(np.lexsort((-train.Y.mean(axis=0), costs))[0]),
                         seed=int(seed))

    def knob_values(self):
        return [round(float(p), 2) for p in np.linspace(0, 1, 11)]

    def choose(self, batch, value):
        draw = np.random.default_rng([self.info["seed"], len(batch)]).random(len(batch))
        return np.where(draw < value, self.info["strong"], self.info["weak"]).astype(np.int64)
