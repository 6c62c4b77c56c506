"""How a merge parameter may be given, in both recipe dialects: a value, a gradient over layers, or values per
tensor-name filter (mergekit's forms). Its own module so the native and the mergekit reader share it without
importing each other.
"""

from __future__ import annotations

from typing import Annotated, Union

from pydantic import Field

from malleable.recipes.common import Strict

Scalar = Union[bool, int, float, str]
Gradient = Annotated[list[float], Field(min_length=1)]


class Filtered(Strict):
    filter: str | None = None
    value: Union[Scalar, Gradient]


ParamSpec = Union[Scalar, Gradient, Annotated[list[Filtered], Field(min_length=1)]]
