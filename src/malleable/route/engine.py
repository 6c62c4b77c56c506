"""The route engine, written once for every router: split the matrices, fit each router on train, choose its
trade-off on validation, score every router side by side on test, write the routers (safetensors + JSON) and
the report (json, md and the cost-quality plot).

Output folder of `fit`:
    routers/<name>.safetensors   what the router learned (arrays; a placeholder array when it learned none)
    routers/<name>.json          its name, parameters, knob, swept values, the value chosen on validation, info
    report.json, report.md, curves.png
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np

from malleable.errors import InputError, OutputError, RecipeError
from malleable.evaluate import routing
from malleable.io.atomic import atomic_dir, check_output
from malleable.recipes.route import RouteRecipe
from malleable.report import environment, peak_rss_mb, write_report
from malleable.route.matrices import SPLITS, Matrices, read_matrices, split_rows
from malleable.route.registry import Router, get_router

SCHEMA = "malleable.route/1"
EMPTY = "__empty__"  # safetensors needs one tensor; a router that learned no arrays stores this one


def check_recipe(recipe: RouteRecipe) -> list[Router]:
    """Every router of the recipe built with checked parameters (an unknown name or parameter is an error)."""
    return [get_router(s.name, s.parameters, key=f"routers[{i}]") for i, s in enumerate(recipe.routers)]


def _clean(x):
    """JSON-safe: NaN and infinities become None, numpy scalars plain numbers."""
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return float(x) if math.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    return x


def curve(r: Router, m: Matrices, bounds, beta: float) -> list[dict]:
    """Every swept value's operating point on `m`."""
    return [{"value": v, **routing.point_metrics(m.Y, m.C, r.choose(m, v), bounds, beta)} for v in r.knob_values()]


def _pair(train: Matrices) -> tuple[int, int]:
    """RouteLLM's strong / weak pair in a pool: the best mean training quality, the lowest mean training cost."""
    from malleable.route.strongest import best

    costs = train.C.mean(axis=0)
    return best(train.Y, costs), int(np.lexsort((-train.Y.mean(axis=0), costs))[0])


def side_by_side(routers: dict[str, Router], chosen: dict[str, object], test: Matrices, train_pair: tuple[int, int],
                 beta: float, validation: dict[str, list[dict]] | None = None) -> dict:
    """Every router's test curve and its test point at the value chosen on validation, with AIQ over shared
    cost bounds, APGR / CPT against the strong-weak pair, and the rank score."""
    bounds = routing.cost_bounds(test.C)
    curves = {n: curve(r, test, bounds, beta) for n, r in routers.items()}
    costs = [p["cost"] for c in curves.values() for p in c]
    lo, hi = min(costs), max(costs)
    strong, weak = train_pair
    rows = np.arange(len(test))
    s_acc, s_cost = float(test.Y[rows, strong].mean()), float(test.C[rows, strong].mean())
    w_acc, w_cost = float(test.Y[rows, weak].mean()), float(test.C[rows, weak].mean())
    out = {}
    for name, r in routers.items():
        c = curves[name]
        point = next(p for p in c if p["value"] == chosen[name])
        xs, ys = [p["cost"] for p in c], [p["accuracy"] for p in c]
        # the share of strong calls, generalised to a pool: cost normalised between the weak and strong models
        share = [(x - w_cost) / (s_cost - w_cost) for x in xs] if s_cost != w_cost else None
        row = {"router": name, "knob": r.knob, "chosen": chosen[name], "test": point,
               "aiq": routing.aiq(xs, ys, lo, hi), "curve": c}
        if share is not None and len(c) > 1 and s_acc != w_acc:
            row.update(apgr=routing.apgr(share, ys, w_acc, s_acc), cpt50=routing.cpt(share, ys, w_acc, s_acc, 0.5),
                       cpt80=routing.cpt(share, ys, w_acc, s_acc, 0.8))
        else:
            row.update(apgr=None, cpt50=None, cpt80=None)
        if validation is not None:
            row["validation"] = validation[name]
        out[name] = row
    pts = np.array([[p["cost"], p["accuracy"]] for c in curves.values() for p in c])
    return {"routers": out, "cost_bounds": list(bounds), "aiq_bounds": [lo, hi], "beta": beta,
            "pair": {"strong": strong, "weak": weak, "strong_accuracy": s_acc, "weak_accuracy": w_acc,
                     "strong_cost": s_cost, "weak_cost": w_cost},
            "hull": routing.hull(pts[:, 0], pts[:, 1]).tolist()}


def fit_routers(matrices: str | Path, recipe: RouteRecipe, out: str | Path, force: bool = False,
                progress: bool = True) -> dict:
    """Fit every router of the recipe on `matrices` and write them and the side-by-side report to `out`."""
    routers = check_recipe(recipe)
    check_output(out, force, inputs=[matrices])
    start = time.perf_counter()
    m = read_matrices(matrices)
    rows = split_rows(m, (recipe.split.train, recipe.split.validation, recipe.split.test), recipe.seed)
    parts = {s: m.subset(rows[s]) for s in SPLITS}
    for r in routers:
        if r.needs_embeddings and m.X is None:
            raise InputError(f"{matrices}: router '{r.name}' needs query embeddings (embeddings.npy), and there "
                             "are none")
    val_bounds = routing.cost_bounds(parts["validation"].C)
    fitted, chosen, validation, seconds = {}, {}, {}, {}
    bar = _bar(len(routers), progress)
    for r in routers:
        t = time.perf_counter()
        r.fit(parts["train"], recipe.seed)
        seconds[r.name] = round(time.perf_counter() - t, 3)
        val = curve(r, parts["validation"], val_bounds, recipe.beta)
        best = max(range(len(val)), key=lambda i: (val[i]["rank_score"], -val[i]["cost"]))
        fitted[r.name], chosen[r.name], validation[r.name] = r, val[best]["value"], val
        bar.update(1)
    bar.close()
    result = side_by_side(fitted, chosen, parts["test"], _pair(parts["train"]), recipe.beta, validation)
    report = {"schema": SCHEMA, "matrices": str(matrices), "candidates": m.candidates,
              "queries": {s: int(len(rows[s])) for s in SPLITS},
              "split_from": "matrices" if m.split is not None else "recipe", "recipe": recipe.model_dump(),
              "fit_seconds": seconds, **result, "wall_time_s": round(time.perf_counter() - start, 3),
              "peak_rss_mb": peak_rss_mb(), "environment": environment()}
    report = _clean(report)
    with atomic_dir(out, force, inputs=[matrices]) as tmp:
        (tmp / "routers").mkdir()
        for name, r in fitted.items():
            save_router(tmp / "routers", r, chosen[name], m.candidates, recipe.seed)
        plot(report, tmp / "curves.png")
        write_report(tmp, report, markdown(report, "fit"))
    report["output"] = {"path": str(Path(out).absolute())}
    return report


def save_router(folder: Path, r: Router, chosen, candidates: list[str], seed: int) -> None:
    from safetensors.numpy import save_file

    arrays = {k: np.ascontiguousarray(v) for k, v in r.arrays.items()} or {EMPTY: np.zeros(1, dtype=np.float32)}
    save_file(arrays, str(folder / f"{r.name}.safetensors"))
    meta = {"schema": SCHEMA, "router": r.name, "parameters": r.p, "knob": r.knob, "chosen": chosen,
            "candidates": candidates, "seed": seed, "info": r.info}
    (folder / f"{r.name}.json").write_text(json.dumps(_clean(meta), indent=2) + "\n")


def load_routers(folder: str | Path) -> tuple[dict[str, Router], dict[str, object], list[str]]:
    """Every router written by `fit` in `folder` (its routers/ sub-folder), with the chosen values."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    root = Path(folder) / "routers"
    files = sorted(root.glob("*.json")) if root.is_dir() else []
    if not files:
        raise InputError(f"{folder}: no routers/<name>.json here; give a folder written by `malleable route fit`")
    routers, chosen, candidates = {}, {}, None
    for f in files:
        try:
            meta = json.loads(f.read_text())
            name, params = meta["router"], meta["parameters"]
            arrays = load_file(str(f.with_suffix(".safetensors")))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, SafetensorError) as e:
            raise InputError(f"{f}: not a router written by `malleable route fit` ({e.__class__.__name__})") from None
        try:
            r = get_router(name, params, key=str(f))
        except RecipeError as e:
            raise InputError(str(e)) from None
        arrays.pop(EMPTY, None)
        r.arrays, r.info = arrays, meta.get("info", {})
        r.restore()
        routers[name], chosen[name] = r, meta.get("chosen")
        if candidates is not None and meta.get("candidates") != candidates:
            raise InputError(f"{f}: routes over other candidates than the other routers in {root}")
        candidates = meta.get("candidates")
    return routers, chosen, candidates


def _fit_settings(fitted: Path) -> RouteRecipe:
    """The split, seed and beta `fit` used (from its report.json)."""
    try:
        return RouteRecipe.model_validate(json.loads((fitted / "report.json").read_text())["recipe"])
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise InputError(f"{fitted / 'report.json'}: not the report of `malleable route fit` "
                         f"({e.__class__.__name__})") from None


def evaluate_routers(fitted: str | Path, matrices: str | Path, out: str | Path | None = None,
                     force: bool = False) -> dict:
    """Score the routers written by `fit` side by side on the test split of `matrices` (its own split column, or
    the seeded random split `fit` used, with fit's seed); with `out`, write report.json / report.md /
    curves.png there."""
    if out is not None:
        check_output(out, force, inputs=[matrices, fitted])
    routers, chosen, candidates = load_routers(fitted)
    settings = _fit_settings(Path(fitted))
    split = (settings.split.train, settings.split.validation, settings.split.test)
    seed, beta = settings.seed, settings.beta
    m = read_matrices(matrices)
    if candidates != m.candidates:
        raise InputError(f"{matrices}: candidates {m.candidates} are not the ones the routers were fitted on "
                         f"({candidates})")
    for name, r in routers.items():
        if r.needs_embeddings and m.X is None:
            raise InputError(f"{matrices}: router '{name}' needs query embeddings (embeddings.npy), and there are none")
    rows = split_rows(m, split, seed)
    pair = _pair(m.subset(rows["train"]))
    report = _clean({"schema": SCHEMA, "routers_from": str(fitted), "matrices": str(matrices),
                     "candidates": m.candidates, "queries": {s: int(len(rows[s])) for s in SPLITS},
                     **side_by_side(routers, chosen, m.subset(rows["test"]), pair, beta)})
    if out is not None:
        with atomic_dir(out, force, inputs=[matrices, fitted]) as tmp:
            plot(report, tmp / "curves.png")
            write_report(tmp, report, markdown(report, "eval"))
        report["output"] = {"path": str(Path(out).absolute())}
    return report


def _bar(total: int, progress: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc="routers", disable=not progress, leave=False)


def _num(x, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def table(report: dict) -> list[str]:
    """The side-by-side markdown table, best rank score first."""
    lines = ["| router | knob = chosen on validation | test accuracy | test cost | rank score | AIQ | APGR | "
             "CPT(50%) | CPT(80%) | gap to oracle |", "|---|---|---|---|---|---|---|---|---|---|"]
    rows = sorted(report["routers"].values(), key=lambda r: -(r["test"]["rank_score"] or 0))
    for r in rows:
        t = r["test"]
        value = _num(r["chosen"], 4) if r["chosen"] is not None else "quality only"
        knob = f"{r['knob']} = {value}" if r["knob"] else "-"
        lines.append(f"| {r['router']} | {knob} | {_num(t['accuracy'])} | {t['cost']:.4g} | {_num(t['rank_score'])} | "
                     f"{_num(r['aiq'])} | {_num(r['apgr'])} | {_num(r['cpt50'])} | {_num(r['cpt80'])} | "
                     f"{_num(t['oracle_gap'])} |")
    return lines


def markdown(report: dict, verb: str) -> str:
    p = report["pair"]
    q = report["queries"]
    lines = [f"# route {verb}", "",
             f"Matrices: `{report['matrices']}`; {len(report['candidates'])} candidates; queries train {q['train']}, "
             f"validation {q['validation']}, test {q['test']}.", "",
             "Every number is on the test split; each router's trade-off value was chosen on validation (best rank "
             f"score, beta = {report['beta']}). AIQ is over the test costs [{report['aiq_bounds'][0]:.4g}, "
             f"{report['aiq_bounds'][1]:.4g}] shared by all routers (RouterBench's definition: no area before a "
             "router's cheapest point, so a single dear point scores near 0); APGR and CPT treat "
             f"'{report['candidates'][p['strong']]}' as strong and '{report['candidates'][p['weak']]}' as weak "
             "(the share of strong calls is the cost normalised between the two).", ""]
    lines += table(report)
    lines += ["", "![cost-quality curves](curves.png)", ""]
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    """Every router's test curve (its chosen point ringed) and the non-decreasing convex hull of all of them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    for name, r in sorted(report["routers"].items()):
        pts = sorted((p["cost"], p["accuracy"]) for p in r["curve"])
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        line, = ax.plot(xs, ys, marker=".", linewidth=1, label=name)
        ax.scatter([r["test"]["cost"]], [r["test"]["accuracy"]], s=80, facecolors="none", edgecolors=line.get_color())
    h = np.array(report["hull"])
    hi = report["aiq_bounds"][1]
    ax.plot(np.r_[h[:, 0], hi], np.r_[h[:, 1], h[-1, 1]], "k--", linewidth=1, label="hull (all routers)")
    ax.set_xlabel("mean cost per query (test)")
    ax.set_ylabel("mean quality (test)")
    ax.set_title("routers: cost against quality")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=110)
    except OSError as e:
        raise OutputError(f"{path}: cannot write the plot ({e.strerror})") from None
    finally:
        plt.close(fig)
