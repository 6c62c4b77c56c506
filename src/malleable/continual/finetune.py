"""finetune: plain SGD on the incoming batches, no replay; the lower bound of the online benchmarks."""

from __future__ import annotations

from malleable.continual.registry import ContinualMethod, continual_method


@continual_method("finetune")
class Finetune(ContinualMethod):
    """Fine-tune on each incoming batch with cross-entropy, nothing replayed (the lower bound)."""
