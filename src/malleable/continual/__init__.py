"""The `continual` verb: a model learns over a stream of steps, online, with replay methods registered by name;
or a language model learns tasks one after another with a LoRA strategy (continual/task_stream.py)."""

from malleable.continual import (er, er_ace, ewc_lora, finetune, inc_lora, joint, joint_lora, l2_lora,  # noqa: F401
                                 las, merge_each, mir_las, o_lora, replay_lora, seq_lora, ug_clu)  # (registers them)
from malleable.continual.registry import METHODS, ContinualMethod, continual_method, get_method

__all__ = ["METHODS", "ContinualMethod", "continual_method", "get_method"]
