"""repeng's `pca_center` reading (vgel/repeng repeng/extract.py, read_representations)."""

from __future__ import annotations

import numpy as np

from malleable.steer.pca_diff import first_component
from malleable.steer.registry import SteeringMethod, pair_sign, steering_method


@steering_method("pca_center", unit_norm=True)
class PCACenter(SteeringMethod):
    """The first principal component of every activation after subtracting its pair's midpoint, read at the last
    token; sign set so that more pairs project the positive above the negative.

    As repeng's read_representations(method="pca_center"): `center = (h[::2] + h[1::2]) / 2`, both members of
    each pair shifted by it, `PCA(n_components=1)` on all of them, then repeng's sign vote. Ours: numpy's SVD
    instead of sklearn's PCA (the same axis), float64 throughout.
    """

    def direction(self, pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
        centre = (pos + neg) / 2
        d = first_component(np.concatenate([pos - centre, neg - centre]))
        return d * pair_sign(d, pos, neg)
