"""What every verb's recipe shares: reading the YAML file, the strict base of every recipe section, and turning
pydantic's first error into one line."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Callable

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from malleable.errors import RecipeError
from malleable.io.paths import regular_file
from malleable.params import INT_MAX

MAX_BYTES = 1_000_000  # a recipe is a few hundred bytes; a bigger file is a mistake or an attack
MAX_VALUES = 100_000  # values the loaded YAML may expand to, every alias followed

Seed = Annotated[int, Field(ge=0)]  # numpy's seeding refuses negative seeds (and Strict bounds them above)


class Strict(BaseModel):
    """Every recipe section: an unknown key is an error, and so is an infinite or NaN number (NaN passes every
    range check, since any comparison with it is false) or one beyond INT_MAX (steps: 1e400 overflows range())."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    @field_validator("*")
    @classmethod
    def _not_huge(cls, value: Any) -> Any:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value) > INT_MAX:
            raise ValueError(f"{value} is beyond the largest value allowed ({INT_MAX})")
        return value


def read_yaml(path: str | Path, documents: bool = False) -> Any:
    """The recipe's YAML, read from a regular file of at most MAX_BYTES of UTF-8 that expands to at most
    MAX_VALUES values: a FIFO would block, and a few lines of nested aliases can expand to billions. With
    `documents`, the list of its `---`-separated documents (one or more)."""
    path = Path(path)
    try:
        with regular_file(path).open("rb") as f:
            raw = f.read(MAX_BYTES + 1)
    except OSError as e:
        raise RecipeError(f"{path}: cannot read ({e.strerror})") from None
    if len(raw) > MAX_BYTES:
        raise RecipeError(f"{path}: larger than {MAX_BYTES // 1_000_000} MB; a recipe is a small YAML file")
    try:
        data = list(yaml.safe_load_all(raw.decode("utf-8"))) if documents else yaml.safe_load(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise RecipeError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except yaml.composer.ComposerError as e:
        if "single document" in str(e):
            raise RecipeError(f"{path}: holds several YAML documents (`---`); only a merge recipe may (mergekit-"
                              "multi: several mergekit merges)") from None
        where = getattr(e, "problem_mark", None)
        raise RecipeError(f"{path}: not valid YAML{f' at line {where.line + 1}' if where else ''}") from None
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        line = f" at line {where.line + 1}" if where else ""
        raise RecipeError(f"{path}: not valid YAML{line}") from None
    except RecursionError:
        raise RecipeError(f"{path}: nested too deeply to be a recipe") from None
    _bounded(data, path)
    return data


def _bounded(data: Any, path: Path) -> None:
    """Count the values of the loaded YAML as validation would walk them, aliases followed (PyYAML shares an
    aliased object, so loading was cheap; walking it is not), and stop past MAX_VALUES."""
    stack, count = [data], 0
    while stack:
        node = stack.pop()
        count += 1
        if count > MAX_VALUES:
            raise RecipeError(f"{path}: expands to more than {MAX_VALUES} values (through YAML aliases); "
                              f"not a recipe")
        if isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)


def validate(schema: type[BaseModel], data: Any, source: str):
    """`data` checked against a recipe schema; the first problem becomes one line naming the key."""
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a recipe is a YAML mapping, got {type(data).__name__}")
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        raise recipe_error(e, source) from None


def _key(loc: tuple) -> str:
    """A pydantic error location as the recipe's key path, without the names of union members ('int',
    'list[float]', ...) pydantic puts in it."""
    tags = ("bool", "int", "float", "str")
    return ".".join(str(p) for p in loc if not (p in tags or str(p).startswith(("list[", "union[", "dict[",
                                                                               "function-"))))


def recipe_error(e: ValidationError, source: str) -> RecipeError:
    """`source: key.path: message (and N more)` for the most telling error: an unknown key first (a misspelt key
    also makes the intended one missing); then, as a value that may take several forms (a number, a gradient,
    a filter list) gives one error per form, the first that is not merely 'wrong type' (it is about the form
    that fitted: a NaN in a gradient)."""
    errors = sorted(e.errors(), key=lambda x: (x["type"] != "extra_forbidden", x["type"].endswith("_type")))
    err = errors[0]
    key = _key(err["loc"]) or "recipe"
    if err["type"] == "extra_forbidden":
        msg = "unknown key"
    elif key != ".".join(map(str, err["loc"])) and err["type"].endswith("_type"):  # no form fitted
        msg = f"{err['input']!r:.60} is not a valid value here"
    else:
        msg = err["msg"].removeprefix("Value error, ")
    others = {_key(x["loc"]) for x in errors} - {_key(err["loc"])}
    more = f" (and {len(others)} more)" if others else ""
    return RecipeError(f"{source}: {key}: {msg}{more}")


def relative_to_recipe(root: Path, p: Path) -> Path:
    """Relative paths in a recipe file are taken relative to the file's folder when they exist there."""
    return root / p if not p.is_absolute() and (root / p).exists() else p


def resolve_paths(node: Any, root: Path) -> None:
    """Every Path field of a parsed recipe, nested sections, lists and dicts included, through `relative_to_recipe`:
    a new path field needs no line of its own in any verb's loader."""
    if isinstance(node, list):
        for item in node:
            resolve_paths(item, root)
    elif isinstance(node, dict):
        for item in node.values():
            resolve_paths(item, root)
    elif isinstance(node, BaseModel):
        for name in type(node).model_fields:
            value = getattr(node, name)
            if isinstance(value, Path):
                setattr(node, name, relative_to_recipe(root, value))
            else:
                resolve_paths(value, root)


def load_recipe_file(path: str | Path, parse: Callable[[Any, str], BaseModel],
                     check: Callable[[Any], Any] | None = None):
    """Read a YAML recipe with `parse` (a verb's `parse_*_recipe`) and `check` (what the schema cannot see: the
    method's declared parameters), so that every problem names the file; relative paths are taken relative to
    the recipe's folder."""
    path = Path(path)
    recipe = parse(read_yaml(path), str(path))
    resolve_paths(recipe, path.parent)
    if check is not None:
        try:
            check(recipe)
        except RecipeError as e:
            raise RecipeError(f"{path}: {e}") from None
    return recipe
