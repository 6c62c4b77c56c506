"""Imports run one way (DESIGN.md): no module imports a layer above its own, lazily inside a function or not.

The layers, lowest first. `learn` is the shared training loop every verb builds on, so evaluate may read its
batch and logits helpers; evaluate never imports a verb; the protocols, which drive verbs, sit above them, and
the Python API above the protocols (its `audit` runs one).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "malleable"
LAYERS = [
    {"errors", "report", "params", "deltas", "io"},
    {"data", "models", "recipes"},
    {"learn"},
    {"evaluate"},
    {"merge", "forget", "continual", "route", "steer", "slim"},
    {"inspect", "protocols"},
    {"api"},
    {"cli", "__main__"},
]
RANK = {name: i for i, layer in enumerate(LAYERS) for name in layer}


def top(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "malleable" and len(parts) > 1 else None


def imported(path: Path) -> set[str]:
    """Every malleable sub-package or module `path` imports, at the top or inside a function."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] if node.module != "malleable" else [f"malleable.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        out |= {t for t in map(top, names) if t}
    return out


MODULES = sorted(p for p in SRC.rglob("*.py") if p.name != "__init__.py" or p.parent != SRC)


def own_layer(path: Path) -> str:
    rel = path.relative_to(SRC)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def test_every_module_has_a_layer():
    assert {own_layer(p) for p in MODULES} <= set(RANK), "a new package needs a place in LAYERS"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(SRC)))
def test_no_import_runs_up(path):
    mine = own_layer(path)
    up = {t for t in imported(path) if t != mine and RANK.get(t, -1) > RANK[mine]}
    assert not up, f"{path.relative_to(SRC)} (layer {mine}) imports from above: {sorted(up)}"


def test_the_check_sees_a_lazy_import(tmp_path):
    """The rule would catch what this issue removed: a metric importing the verb whose loop it runs."""
    f = tmp_path / "m.py"
    f.write_text("def relearn():\n    from malleable.forget.engine import fit\n")
    assert imported(f) == {"forget"} and RANK["forget"] > RANK["evaluate"]
