"""Small vision classifiers for the forget protocol: fast enough to train and retrain on 2 CPU cores."""

from __future__ import annotations

from torch import nn

from malleable.errors import RecipeError


def small_cnn(in_channels: int = 1, num_classes: int = 10, image_size: int = 28, width: int = 16,
              batchnorm: bool = False) -> nn.Sequential:
    """Two conv blocks (conv 3x3, ReLU, 2x2 max-pool) and a two-layer head; `model(x)` gives logits.

    Works for 28x28 (Fashion-MNIST) and 8x8 (digits): each pool halves the side, so the head sees
    (image_size // 4)^2 positions. No batch norm by default, so train / eval mode give the same function and the
    MIA features do not depend on batch statistics; `batchnorm` puts a BatchNorm2d after each convolution (for
    methods whose reference setting is a BatchNorm net: TWA and SWA's statistics update). Weights come from
    torch's global seed (set it first).
    """
    if image_size < 4:
        raise RecipeError(f"small_cnn: needs images of at least 4x4, got {image_size}")
    side = image_size // 4

    def conv(c_in: int, c_out: int) -> list[nn.Module]:
        return [nn.Conv2d(c_in, c_out, 3, padding=1), *([nn.BatchNorm2d(c_out)] if batchnorm else []), nn.ReLU(),
                nn.MaxPool2d(2)]

    return nn.Sequential(
        *conv(in_channels, width), *conv(width, 2 * width),
        nn.Flatten(),
        nn.Linear(2 * width * side * side, 4 * width), nn.ReLU(),
        nn.Linear(4 * width, num_classes),
    )
