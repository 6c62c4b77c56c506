"""The Python API: the same verbs and recipes as the CLI."""

from __future__ import annotations

from pathlib import Path

from malleable.recipes.merge import MergeRecipe, load_recipe, parse_recipe


def _recipe(recipe: MergeRecipe | dict | str | Path) -> MergeRecipe:
    if isinstance(recipe, MergeRecipe):
        return recipe
    if isinstance(recipe, dict):
        return parse_recipe(recipe)
    return load_recipe(recipe)


def merge(recipe: MergeRecipe | dict | str | Path, out: str | Path, force: bool = False,
          progress: bool = True) -> dict:
    """Merge models or LoRA adapters as the recipe says; writes `out/` with `report.json` and `report.md`.

    Returns the report (``report["output"]["path"]`` is the output directory).
    """
    from malleable.merge.engine import plan_merge, run_merge

    return run_merge(plan_merge(_recipe(recipe)), out, force=force, progress=progress)


def merge_plan(recipe: MergeRecipe | dict | str | Path) -> str:
    """What `merge` would do (the `--dry-run` text), after validating everything."""
    from malleable.merge.engine import describe, plan_merge

    return describe(plan_merge(_recipe(recipe)))


def inspect(path: str | Path) -> dict:
    """What a checkpoint, adapter or GGUF file holds."""
    from malleable.inspect import inspect_path

    return inspect_path(Path(path))
