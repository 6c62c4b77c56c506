"""Several merges in one file (mergekit-multi): named merges are written to a temporary folder beside the output
and used as models by the later ones; the unnamed one is the output. Every document is read and checked (schema,
names, order) before any merge runs; each merge is planned (its inputs' headers checked) when the merges it uses
exist. The temporary folder is removed at the end, whether the run succeeds or fails."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from malleable.errors import RecipeError
from malleable.io.atomic import check_output
from malleable.recipes.common import resolve_paths
from malleable.recipes.merge import MergeRecipe, parse_recipe
from malleable.recipes.mergekit import substitute


def _where(path: Path, name: str | None) -> str:
    """How errors name one merge of the file."""
    return f"{path} (merge '{name}')" if name else f"{path} (the output merge)"


def _recipes(path: Path, docs, folder: Path) -> list[tuple[str | None, MergeRecipe, set[str]]]:
    paths = {name: str(folder / name) for name, _, _ in docs if name is not None}
    out = []
    for name, doc, uses in docs:
        recipe = parse_recipe({k: v for k, v in substitute(doc, paths).items() if k != "name"}, _where(path, name))
        resolve_paths(recipe, path.parent)
        out.append((name, recipe, uses))
    return out


def _plan(recipe: MergeRecipe, where: str, allow_pickle: bool):
    from malleable.merge.engine import plan_merge

    if allow_pickle:
        recipe.allow_pickle = True
    try:
        return plan_merge(recipe)
    except RecipeError as e:
        raise RecipeError(f"{where}: {e}") from None


def describe_documents(path: Path, docs, allow_pickle: bool = False) -> str:
    """The --dry-run text: each merge in order; those that use earlier merges are planned when those exist."""
    from malleable.merge.engine import describe

    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, recipe, uses in _recipes(path, docs, Path(tmp)):
            lines.append(f"== merge '{name}' (temporary)" if name else "== the output merge")
            if uses:
                lines.append(f"uses the merges {', '.join(sorted(uses))}; planned once they exist")
                lines.append(f"method: {recipe.method}, {len(recipe.inputs)} input(s)")
            else:
                lines.append(describe(_plan(recipe, _where(path, name), allow_pickle)))
    return "\n".join(lines)


def run_documents(path: Path, docs, out: Path, force: bool = False, progress: bool = True,
                  allow_pickle: bool = False) -> dict:
    """Run the merges in order into `out` (the unnamed one); returns its report (report.json on disk), plus the
    named merges' methods, parameters and inputs under "intermediate_merges" (their folders are gone by then)."""
    from malleable.merge.engine import run_merge

    out = check_output(out, force, inputs=[path])
    folder = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.multi-"))
    try:
        recipes = _recipes(path, docs, folder)
        reports = {}
        for name, recipe, _ in recipes:
            plan = _plan(recipe, _where(path, name), allow_pickle)
            report = run_merge(plan, folder / name if name else out, force=force and not name, progress=progress)
            if name:
                reports[name] = {k: report[k] for k in ("method", "parameters", "inputs", "wall_time_s")}
        report["intermediate_merges"] = reports
        return report
    finally:
        shutil.rmtree(folder, ignore_errors=True)
