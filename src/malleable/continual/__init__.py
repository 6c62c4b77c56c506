"""The `continual` verb: a model learns over a stream of steps, online, with replay methods registered by name."""

from malleable.continual import er, er_ace, finetune, joint, las, mir_las, ug_clu  # noqa: F401  (registers the methods)
from malleable.continual.registry import METHODS, ContinualMethod, continual_method, get_method

__all__ = ["METHODS", "ContinualMethod", "continual_method", "get_method"]
