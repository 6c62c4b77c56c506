"""seq_lora: one LoRA adapter trained on, task after task (the lower bound of continual LoRA post-training:
nothing protects what earlier tasks taught it)."""

from __future__ import annotations

from malleable.continual.adapters import AdapterStrategy
from malleable.continual.registry import continual_method


@continual_method("seq_lora")
class SeqLoRA(AdapterStrategy):
    """Sequential LoRA: one adapter, trained on each task in turn (the lower bound)."""
