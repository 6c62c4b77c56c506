"""The oracle: the bound every router is measured against, not a router (it reads the true quality)."""

from __future__ import annotations

from malleable.route.registry import WTP, Router, mean_costs, pick, router, wtp_grid


@router("oracle")
class Oracle(Router):
    """Per query, the candidate with the best true quality, the cheapest among equals (VL-RouterBench's
    oracle: the cheapest correct candidate, else the cheapest); swept with a willingness to pay over the true
    per-query quality and cost, which traces the best cost-quality curve any router could reach."""

    knob = WTP

    def fit(self, train, seed):
        self.info["knob_values"] = wtp_grid(mean_costs(train))

    def knob_values(self):
        return list(self.info["knob_values"])

    def choose(self, batch, value):
        return pick(batch.Y, batch.C, value)
