"""Merge rules, one module per family, registered by name; importing this package registers them all."""

from malleable.merge import linear  # noqa: F401
from malleable.merge import core_space, ctm, knots, lora_concat  # noqa: F401
from malleable.merge import dare, isoc, magnitude, ties, tsv  # noqa: F401
from malleable.merge import breadcrumbs, della, model_stock, sce, slerp  # noqa: F401
from malleable.merge import arcee_fusion, karcher, nuslerp, passthrough, ram  # noqa: F401
from malleable.merge import rain, twa  # noqa: F401
from malleable.merge.registry import RULES, Param, get_rule, merge_rule

__all__ = ["RULES", "Param", "get_rule", "merge_rule"]
