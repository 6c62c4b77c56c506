"""RouteLLM's own APGR / CPT code run on our curves, in its own virtualenv (bench/setup_routellm.sh; RouteLLM pins
numpy < 2). Shared by tests/test_route_metrics.py and bench/route_pool.py."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

ROUTELLM_VENV = Path(os.environ.get("ROUTELLM_VENV", "/work/routellm-venv"))

# RouteLLM's metric code (routellm/evals/evaluate.py, `generate_results`) run on our curves in its own venv:
# the function is taken out of the installed module with ast (the module's imports pull in its hosted routers)
# and its printed metrics table is captured through `print`.
ROUTELLM_SCRIPT = r"""
import ast, json, sys, tempfile
import importlib.util
import numpy as np, pandas as pd
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
src = open(importlib.util.find_spec("routellm").submodule_search_locations[0] + "/evals/evaluate.py").read()
fn = next(n for n in ast.parse(src).body if isinstance(n, ast.FunctionDef) and n.name == "generate_results")
seen = []
ns = {"np": np, "pd": pd, "plt": plt, "print": lambda *a, **k: seen.append(a)}
exec(compile(ast.Module(body=[fn], type_ignores=[]), "evaluate.py", "exec"), ns)
case = json.load(sys.stdin)
class Bench:
    def get_model_accuracy(self, name):
        return case[name]
class Pair:
    weak, strong = "weak", "strong"
rows = [{"method": m, "strong_percentage": 100 * s, "accuracy": a}
        for m, curve in case["curves"].items() for s, a in zip(curve["share"], curve["accuracy"])]
with tempfile.TemporaryDirectory() as out:
    ns["generate_results"](pd.DataFrame(rows), Bench(), "case", Pair(), out)
metrics = next(a[1] for a in seen if a and a[0] == "Metrics:\n")
res = {r["method"]: {"apgr": r["APGR"], "cpt50": float(r["50% qual"].rstrip("%")) / 100,
                     "cpt80": float(r["80% qual"].rstrip("%")) / 100} for _, r in metrics.iterrows()}
json.dump(res, sys.stdout)
"""


def routellm_metrics(case: dict, venv: Path = ROUTELLM_VENV) -> dict[str, dict[str, float]]:
    """{curve name: {apgr, cpt50, cpt80}} by RouteLLM's `generate_results` for `case` = {"weak": accuracy,
    "strong": accuracy, "curves": {name: {"share": [strong share in 0..1], "accuracy": [...]}}}."""
    run = subprocess.run([str(venv / "bin" / "python"), "-c", ROUTELLM_SCRIPT], input=json.dumps(case),
                         capture_output=True, text=True, timeout=300)
    if run.returncode != 0:
        raise RuntimeError(f"RouteLLM's generate_results failed: {run.stderr[-2000:]}")
    return json.loads(run.stdout)


def routellm_version(venv: Path = ROUTELLM_VENV) -> str | None:
    run = subprocess.run([str(venv / "bin" / "python"), "-c",
                          "import importlib.metadata as m; print(m.version('routellm'))"],
                         capture_output=True, text=True, timeout=60)
    return run.stdout.strip() or None
