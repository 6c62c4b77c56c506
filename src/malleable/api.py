"""The Python API: the same verbs and recipes as the CLI."""

from __future__ import annotations

from pathlib import Path

from malleable.io.atomic import check_not_input
from malleable.recipes.continual import ContinualRecipe, TaskStreamRecipe, parse_continual_recipe
from malleable.recipes.forget import ForgetRecipe, parse_forget_recipe
from malleable.recipes.learn import LearnRecipe, parse_learn_recipe
from malleable.recipes.merge import MergeRecipe, load_recipe, parse_recipe
from malleable.recipes.route import RouteRecipe, load_route_recipe, parse_route_recipe
from malleable.recipes.slim import SlimRecipe
from malleable.recipes.steer import SteerRecipe, load_steer_recipe, parse_steer_recipe


def _as_recipe(recipe, cls, parse, load):
    """A recipe object from an object, a dict or a YAML path."""
    if isinstance(recipe, cls):
        return recipe
    if isinstance(recipe, dict):
        return parse(recipe)
    return load(recipe)


def _not_over_recipe(out, recipe) -> None:
    """A recipe given as a file is an input too: the output must not replace or hold it."""
    if isinstance(recipe, (str, Path)):
        check_not_input(out, [recipe])


def _recipe(recipe: MergeRecipe | dict | str | Path) -> MergeRecipe:
    return _as_recipe(recipe, MergeRecipe, parse_recipe, load_recipe)


def merge(recipe: MergeRecipe | dict | str | Path, out: str | Path, force: bool = False,
          progress: bool = True) -> dict:
    """Merge models or LoRA adapters as the recipe says; writes `out/` with `report.json` and `report.md`.

    Returns the report (``report["output"]["path"]`` is the output directory).
    """
    from malleable.merge.engine import plan_merge, run_merge

    _not_over_recipe(out, recipe)
    if isinstance(recipe, (str, Path)):
        from malleable.recipes.mergekit import read_documents

        docs = read_documents(recipe)
        if docs is not None:  # mergekit-multi: the unnamed merge is the output
            from malleable.merge.multi import run_documents

            return run_documents(Path(recipe), docs, out, force=force, progress=progress)
    return run_merge(plan_merge(_recipe(recipe)), out, force=force, progress=progress)


def merge_plan(recipe: MergeRecipe | dict | str | Path) -> str:
    """What `merge` would do (the `--dry-run` text), after validating everything."""
    from malleable.merge.engine import describe, plan_merge

    return describe(plan_merge(_recipe(recipe)))


def _learn_recipe(recipe: LearnRecipe | dict | str | Path) -> LearnRecipe:
    from malleable.learn.engine import read_recipe

    return _as_recipe(recipe, LearnRecipe, parse_learn_recipe, read_recipe)


def learn(recipe: LearnRecipe | dict | str | Path, out: str | Path, force: bool = False, resume: bool = False,
          progress: bool = True) -> dict:
    """Train as the recipe says; writes `out/` (a PEFT adapter or a checkpoint) with its report and metrics.

    `resume=True` continues from the newest checkpoint in `OUT.run/` of an interrupted run.
    """
    from malleable.learn.engine import learn as run

    _not_over_recipe(out, recipe)
    return run(_learn_recipe(recipe), out, force=force, resume=resume, progress=progress)


def forget(recipe: ForgetRecipe | dict | str | Path, out: str | Path, force: bool = False,
           reference: str | Path | None = None, progress: bool = True) -> dict:
    """Unlearn the recipe's forget set; writes `out/` (a checkpoint or a PEFT adapter) with the evidence report.

    `reference` is a retrained model to compare with, or "retrain" to train one with the recipe's `retrain:`.
    For models already in memory (and classifiers that are not transformers models) use
    `malleable.forget.unlearn`.
    """
    from malleable.forget.run import forget as run
    from malleable.forget.run import read_recipe

    _not_over_recipe(out, recipe)
    return run(_as_recipe(recipe, ForgetRecipe, parse_forget_recipe, read_recipe), out, force=force,
               reference=reference, progress=progress)


def continual(recipe: ContinualRecipe | TaskStreamRecipe | dict | str | Path, out: str | Path, force: bool = False,
              resume: bool = False, progress: bool = True) -> dict:
    """Run the recipe's stream (online class-incremental learning, or a `tasks:` list: continual LoRA
    post-training of a language model); writes `out/` with the final model or adapter, one weights file or
    adapter per step, the accuracy matrix and its metrics (report.json, report.md, plots).
    `resume=True` continues from the newest step checkpoint in `OUT.run/` of an interrupted stream."""
    from malleable.continual.engine import continual as run
    from malleable.continual.engine import read_recipe

    _not_over_recipe(out, recipe)
    r = _as_recipe(recipe, (ContinualRecipe, TaskStreamRecipe), parse_continual_recipe, read_recipe)
    return run(r, out, force=force, resume=resume, progress=progress)


def _route_recipe(recipe: RouteRecipe | dict | str | Path | None) -> RouteRecipe:
    from malleable.route.engine import check_recipe

    if recipe is None:
        return RouteRecipe()
    return _as_recipe(recipe, RouteRecipe, parse_route_recipe, lambda p: load_route_recipe(p, check_recipe))


def route_fit(matrices: str | Path, out: str | Path, recipe: RouteRecipe | dict | str | Path | None = None,
              force: bool = False, progress: bool = True) -> dict:
    """Fit the recipe's routers (default: every baseline and learned router) on a matrices folder; writes
    `out/` with the routers (safetensors + JSON) and the side-by-side report on the test split."""
    from malleable.route.engine import fit_routers

    _not_over_recipe(out, recipe)
    return fit_routers(matrices, _route_recipe(recipe), out, force=force, progress=progress)


def route_eval(fitted: str | Path, matrices: str | Path, out: str | Path | None = None, force: bool = False) -> dict:
    """Score the routers that `route_fit` wrote in `fitted` side by side on the test split of `matrices`."""
    from malleable.route.engine import evaluate_routers

    return evaluate_routers(fitted, matrices, out, force=force)


def route_build(recipe: str | Path | dict, out: str | Path, force: bool = False, progress: bool = True) -> dict:
    """Run every candidate of the build recipe on every labelled query once; writes the matrices folder `out`."""
    from malleable.recipes.route import RouteBuildRecipe, load_route_build_recipe, parse_route_build_recipe
    from malleable.route.build import build

    _not_over_recipe(out, recipe)
    return build(_as_recipe(recipe, RouteBuildRecipe, parse_route_build_recipe, load_route_build_recipe), out,
                 force=force, progress=progress)


def route_run(fitted: str | Path, router: str, queries: str | Path, out: str | Path,
              pool: str | Path | None = None, force: bool = False) -> dict:
    """Answer every query of `queries` with router `router` of `fitted` over its pool; writes `out` (JSONL).
    For answers in memory use `malleable.route.RoutedModel.from_fitted(fitted, router).answer(prompts)`."""
    from malleable.route.serve import run

    return run(fitted, router, queries, out, pool=pool, force=force)


def steer(recipe: SteerRecipe | dict | str | Path, out: str | Path, force: bool = False,
          strengths: list[float] | None = None, progress: bool = True) -> dict:
    """Extract the recipe's steering vector from its contrast pairs (or train SPLIT's intervention on them through
    learn's engine); writes `out/` with the artefact
    (steering.safetensors + steering.json) and the report (probe accuracy per layer; samples at `strengths`).
    Apply it with `malleable.steer.applied(model, out, strength=m)`."""
    from malleable.steer.engine import check_recipe
    from malleable.steer.engine import steer as run

    _not_over_recipe(out, recipe)
    r = _as_recipe(recipe, SteerRecipe, parse_steer_recipe, lambda p: load_steer_recipe(p, check_recipe))
    return run(r, out, force=force, strengths=strengths, progress=progress)


def slim(recipe: SlimRecipe | dict | str | Path, out: str | Path, force: bool = False, progress: bool = True) -> dict:
    """Prune or shorten the recipe's model with its method; writes `out/` (a checkpoint that loads with
    `from_pretrained`) with the report (what was pruned or removed; perplexity, speed and size, dense and slim)."""
    from malleable.recipes.slim import load_slim_recipe, parse_slim_recipe
    from malleable.slim.engine import check_recipe
    from malleable.slim.engine import slim as run

    _not_over_recipe(out, recipe)
    return run(_as_recipe(recipe, SlimRecipe, parse_slim_recipe, lambda p: load_slim_recipe(p, check_recipe)), out,
               force=force, progress=progress)


def slim_plan(recipe: SlimRecipe | dict | str | Path) -> str:
    """What `slim` would do (the `--dry-run` text), after validating everything."""
    from malleable.recipes.slim import load_slim_recipe, parse_slim_recipe
    from malleable.slim.engine import check_recipe, describe, plan

    return describe(plan(_as_recipe(recipe, SlimRecipe, parse_slim_recipe,
                                    lambda p: load_slim_recipe(p, check_recipe))))


def audit(model: str | Path, *, forget: str | Path, retain: str | Path | None = None,
          holdout: str | Path | None = None, original: str | Path | None = None, **options) -> dict:
    """Membership-inference and relearning evidence for `model` on `forget` (see `malleable audit --help`)."""
    from malleable.protocols.audit import audit as run

    paths = [Path(p) if p is not None else None for p in (forget, retain, holdout, original)]
    return run(model, forget=paths[0], retain=paths[1], holdout=paths[2], original=paths[3], **options)


def inspect(path: str | Path) -> dict:
    """What a checkpoint, adapter or GGUF file holds."""
    from malleable.inspect import inspect_path

    return inspect_path(Path(path))
