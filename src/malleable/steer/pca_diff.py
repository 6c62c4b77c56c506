"""repeng's `pca_diff` reading (vgel/repeng repeng/extract.py, read_representations)."""

from __future__ import annotations

import numpy as np

from malleable.errors import RecipeError
from malleable.steer.registry import SteeringMethod, pair_sign, steering_method


def first_component(x: np.ndarray) -> np.ndarray:
    """The first principal axis of the rows of `x` (unit norm): what sklearn's PCA(n_components=1) fits, which
    centres the rows first; here through numpy's SVD of the centred rows (the sign is set by the caller)."""
    if len(x) < 2:
        raise RecipeError("data.train: a PCA reading needs at least 2 pairs")
    centred = x - x.mean(axis=0)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    if s[0] == 0:
        raise RecipeError("data.train: the pairs' activations do not vary; PCA finds no direction")
    return vt[0]


@steering_method("pca_diff", unit_norm=True)
class PCADiff(SteeringMethod):
    """The first principal component of the pair differences (positive minus negative), read at the last token;
    sign set so that more pairs project the positive above the negative.

    As repeng's read_representations(method="pca_diff"): `PCA(n_components=1).fit(h[::2] - h[1::2])`, which
    centres the differences before the SVD, then repeng's sign vote over pairs. Ours computes the same axis with
    numpy's SVD instead of sklearn (the same decomposition), in float64 (repeng casts the component to float32).
    The direction has norm 1, so the artefact's default strength is measured (see steer/engine.py).
    """

    def direction(self, pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
        d = first_component(pos - neg)
        return d * pair_sign(d, pos, neg)
