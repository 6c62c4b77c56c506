"""er: experience replay with a reservoir buffer (Chaudhry et al., 2019, "On Tiny Episodic Memories").

As mammoth's `er` (the LAS authors' code base): the incoming batch and a batch drawn from the buffer are joined
into one batch and trained on with one cross-entropy (the mean over both); replay starts as soon as the buffer
holds anything. The engine updates the buffer after the optimiser step with the incoming, non-augmented batch.
"""

from __future__ import annotations

from malleable.continual.registry import ContinualMethod, continual_method


@continual_method("er")
class ER(ContinualMethod):
    """Experience replay: cross-entropy over the incoming batch joined with a batch from a reservoir buffer."""

    replay = True
