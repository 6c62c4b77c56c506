"""ShortGPT (Men et al., 2024, "ShortGPT: Layers in Large Language Models are More Redundant Than You Expect"):
remove the decoder layers that change their input least."""

from __future__ import annotations

import math

import torch

from malleable.errors import RecipeError
from malleable.params import Param
from malleable.slim.registry import LayerRemover, slim_method


@slim_method("shortgpt", params={
    "remove": Param(None, "how many decoder layers to remove (give this or ratio)", ge=1),
    "ratio": Param(None, "share of the decoder layers to remove, rounded to the nearest count (give this or "
                   "remove)", gt=0),
})
class ShortGPT(LayerRemover):
    """Block Influence of layer i: BI_i = 1 - mean over calibration tokens of cos(x_i, x_{i+1}), its input and
    output hidden states (the paper's eq. 2); the layers of lowest BI are removed, all at once (the paper's
    one-shot ranking). The states are caught at the layer's own input and output, so the last layer's output is
    read before the model's final norm (HF's `output_hidden_states` would give it after). Padding never enters:
    the calibration windows are full-length text.
    """

    def check(self) -> None:
        remove, ratio = self.p["remove"], self.p["ratio"]
        if (remove is None) == (ratio is None):
            raise RecipeError("parameters: give exactly one of remove (a count) and ratio (a share of the layers)")
        if ratio is not None and ratio >= 1:
            raise RecipeError(f"parameters.ratio: {ratio} would remove every layer; keep it below 1")

    def influence(self, h_in: torch.Tensor, h_out: torch.Tensor) -> torch.Tensor:
        return 1 - torch.nn.functional.cosine_similarity(h_in.double(), h_out.double(), dim=-1)

    def count(self, n_layers: int) -> int:
        if self.p["remove"] is not None:
            return self.p["remove"]
        return int(math.floor(self.p["ratio"] * n_layers + 0.5))
