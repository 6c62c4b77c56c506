"""Learning: adding a skill to a model (LoRA and friends)."""
