"""`malleable route fit / eval` end to end on small synthetic matrices: every router, the layouts read, what
is written (safetensors + JSON, no pickle), and each bad input refused with one line, exit 2, nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from malleable.cli import app
from malleable.route import ROUTERS, read_matrices
from malleable.route.engine import load_routers

NAMES = ["small", "mid", "special", "big"]
FAST = {"mlp": {"max_iter": 60}, "mf": {"epochs": 2, "dim": 16}, "soft_label": {"epochs": 40}}


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def synthetic(n: int = 180, seed: int = 0):
    """Three tasks, four candidates with costs 1, 2, 5, 10: the cheap ones are each good at one task, the
    dearest at all; embeddings cluster by task."""
    rng = np.random.default_rng(seed)
    tasks = rng.integers(0, 3, n)
    X = (rng.normal(size=(3, 16)) * 3)[tasks] + rng.normal(size=(n, 16))
    p = np.array([[0.3, 0.2, 0.9], [0.9, 0.3, 0.3], [0.4, 0.9, 0.5], [0.95, 0.95, 0.95]])
    Y = (rng.random((n, 4)) < p[:, tasks].T).astype(np.float32)
    C = np.array([1.0, 2.0, 5.0, 10.0]) * rng.uniform(0.8, 1.2, (n, 1))
    return Y, C, X.astype(np.float32), np.array([f"t{t}" for t in tasks])


def write_own(folder: Path, Y, C, X, tasks, split=None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "Y.npy", Y)
    np.save(folder / "C.npy", C)
    np.save(folder / "embeddings.npy", X)
    meta = {"task": tasks} if split is None else {"task": tasks, "split": split}
    pd.DataFrame(meta).to_csv(folder / "meta.csv", index=False)
    (folder / "candidates.json").write_text(json.dumps(NAMES))
    return folder


@pytest.fixture(scope="module")
def matrices(tmp_path_factory) -> Path:
    """The synthetic matrices, with Arrow scores for the three cheap candidates (noisy task one-hots over the
    candidate good at the task; NaN for 'big', outside the adapter library) so the `arrow` router runs too."""
    Y, C, X, tasks = synthetic()
    folder = write_own(tmp_path_factory.mktemp("route") / "m", Y, C, X, tasks)
    best = np.array([1, 2, 0])[[int(t[1]) for t in tasks]]
    A = np.eye(3)[best] + np.random.default_rng(1).uniform(0, 0.8, (len(tasks), 3))
    np.save(folder / "arrow.npy", np.c_[A / A.sum(axis=1, keepdims=True), np.full(len(tasks), np.nan)])
    return folder


@pytest.fixture(scope="module")
def recipe(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("recipe") / "route.yaml"
    routers = [{"name": n, "parameters": FAST.get(n, {})} for n in sorted(ROUTERS)]
    path.write_text(yaml.safe_dump({"routers": routers, "seed": 0}))
    return path


@pytest.fixture(scope="module")
def fitted(matrices, recipe, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fit") / "routers"
    result = invoke("route", "fit", matrices, out, "--recipe", recipe, "-q")
    assert result.exit_code == 0, result.output
    return out


def test_fit_writes_every_router_and_the_side_by_side_report(fitted):
    report = json.loads((fitted / "report.json").read_text())
    assert set(report["routers"]) == set(ROUTERS)
    assert (fitted / "curves.png").stat().st_size > 10_000 and "| router |" in (fitted / "report.md").read_text()
    for name in ROUTERS:
        assert (fitted / "routers" / f"{name}.safetensors").is_file()
        assert json.loads((fitted / "routers" / f"{name}.json").read_text())["router"] == name
    assert not list(fitted.rglob("*.pkl")) and not list(fitted.rglob("*.pt"))
    rows = report["routers"]
    oracle = rows["oracle"]["test"]
    assert oracle["oracle_gap"] == 0 and oracle["accuracy"] == pytest.approx(max(r["test"]["accuracy"] for r in
                                                                               rows.values()))
    for r in rows.values():
        assert r["test"]["oracle_gap"] >= 0 and 0 <= r["aiq"] <= 1
        assert r["test"] in r["curve"]  # the test point is the curve's point at the value chosen on validation
        assert r["chosen"] == max(r["validation"], key=lambda p: (p["rank_score"], -p["cost"]))["value"]
    # on these matrices the embedding routers must beat the cheapest and sit below the oracle
    for name in ("knn", "linear"):
        assert rows["cheapest"]["test"]["accuracy"] < rows[name]["test"]["accuracy"] < oracle["accuracy"]
        assert rows[name]["aiq"] > rows["random"]["aiq"]
    assert rows["random"]["apgr"] == pytest.approx(0.5, abs=0.2)


def test_eval_reloads_the_routers_and_reproduces_fit(fitted, matrices, tmp_path):
    result = invoke("route", "eval", fitted, matrices, "--out", tmp_path / "ev")
    assert result.exit_code == 0, result.output
    fit_report = json.loads((fitted / "report.json").read_text())
    ev = json.loads((tmp_path / "ev" / "report.json").read_text())
    for name, row in fit_report["routers"].items():
        assert ev["routers"][name]["test"] == row["test"] and ev["routers"][name]["aiq"] == row["aiq"], name


def test_stored_sklearn_arrays_predict_as_sklearn(fitted, matrices):
    from sklearn.linear_model import Ridge
    from sklearn.neural_network import MLPRegressor

    routers, _, _ = load_routers(fitted)
    m = read_matrices(matrices)
    lin = routers["linear"]
    rebuilt = Ridge()
    rebuilt.coef_, rebuilt.intercept_ = lin.arrays["coef"], lin.arrays["intercept"]
    assert np.allclose(lin.quality(m), rebuilt.predict(m.X.astype(np.float64)))
    mlp = routers["mlp"]
    net = MLPRegressor(hidden_layer_sizes=(64,)).fit(m.X[:8], m.Y[:8])  # shapes only; weights replaced below
    net.coefs_ = [mlp.arrays["layer0.weight"], mlp.arrays["layer1.weight"]]
    net.intercepts_ = [mlp.arrays["layer0.bias"], mlp.arrays["layer1.bias"]]
    assert np.allclose(mlp.quality(m), net.predict(m.X.astype(np.float64)))


def test_the_same_seed_gives_the_same_routers(matrices, tmp_path):
    from malleable.api import route_fit

    recipe = {"routers": [{"name": "mf", "parameters": FAST["mf"]}, {"name": "soft_label",
                                                                       "parameters": FAST["soft_label"]}, "random"]}
    for out in ("a", "b"):
        route_fit(matrices, tmp_path / out, recipe, progress=False)
    for f in ("mf.safetensors", "soft_label.safetensors", "random.json"):
        assert (tmp_path / "a" / "routers" / f).read_bytes() == (tmp_path / "b" / "routers" / f).read_bytes()


def test_the_three_layouts_read_the_same_matrices(tmp_path):
    Y, C, X, tasks = synthetic(30)
    own = read_matrices(write_own(tmp_path / "own", Y, C, X, tasks, split=["train"] * 20 + ["dev"] * 5 +
                                  ["test"] * 5))
    vl = tmp_path / "vl"
    (vl / "data" / "matrices").mkdir(parents=True)
    (vl / "data" / "registry").mkdir(parents=True)
    (vl / "SPLITS").mkdir()
    (vl / "EMBEDDINGS" / "text").mkdir(parents=True)
    np.savez(vl / "data" / "matrices" / "Y.npz", Y=Y)
    np.save(vl / "data" / "matrices" / "C.npy", C)
    ids = [f"s{i}" for i in range(30)]
    pd.DataFrame({"sample_id": ids, "dataset": tasks}).to_parquet(vl / "data" / "registry" / "meta.parquet")
    (vl / "data" / "registry" / "models.json").write_text(json.dumps(NAMES))
    for name, part in (("train", ids[:20]), ("dev", ids[20:25]), ("test", ids[25:])):
        (vl / "SPLITS" / f"{name}.jsonl").write_text("".join(json.dumps({"sample_id": s}) + "\n" for s in part))
    order = np.random.default_rng(0).permutation(30)  # embeddings aligned by sample_id, not by row
    pd.DataFrame({"sample_id": [ids[i] for i in order], "embedding": [X[i].tolist() for i in order]}).to_parquet(
        vl / "EMBEDDINGS" / "text" / "bge-m3.parquet")
    long = tmp_path / "long"
    long.mkdir()
    pd.DataFrame([{"query": f"q{i}", "candidate": NAMES[j], "score": Y[i, j], "cost": C[i, j], "task": tasks[i],
                   "split": own.split[i]} for i in range(30) for j in range(4)]).to_csv(long / "scores.csv",
                                                                                    index=False)
    np.save(long / "embeddings.npy", X)
    for m in (read_matrices(vl), read_matrices(long)):
        assert m.candidates == NAMES and np.array_equal(m.Y, own.Y) and np.allclose(m.C, own.C)
        assert list(m.task) == list(own.task) and list(m.split) == list(own.split)
        assert np.allclose(m.X, own.X)


def corrupt(folder: Path, case: str) -> None:
    Y, C = np.load(folder / "Y.npy"), np.load(folder / "C.npy")
    if case == "shapes":
        np.save(folder / "C.npy", C[:, :3])
    elif case == "nan_cost":
        C[3, 1] = np.nan
        np.save(folder / "C.npy", C)
    elif case == "negative_cost":
        C[5, 2] = -1.0
        np.save(folder / "C.npy", C)
    elif case == "unlabelled":
        Y = Y.astype(np.float64)
        Y[7, 0] = np.nan
        np.save(folder / "Y.npy", Y)
    elif case == "empty_pool":
        np.save(folder / "Y.npy", Y[:, :0])
        np.save(folder / "C.npy", C[:, :0])
        (folder / "candidates.json").write_text("[]")
    elif case == "pickle":
        np.save(folder / "Y.npy", np.array([{"a": 1}] * len(Y), dtype=object), allow_pickle=True)
    elif case == "meta_rows":
        pd.DataFrame({"task": ["t0"] * 3}).to_csv(folder / "meta.csv", index=False)


@pytest.mark.parametrize("case,words", [("shapes", "shape"), ("nan_cost", "not a finite"),
                                        ("negative_cost", "negative"), ("unlabelled", "no quality label"),
                                        ("empty_pool", "pool is empty"), ("pickle", "not a readable numpy"),
                                        ("meta_rows", "rows")])
def test_bad_matrices_are_one_line_exit_2_nothing_written(tmp_path, case, words):
    folder = write_own(tmp_path / "m", *synthetic(40))
    corrupt(folder, case)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    result = invoke("route", "fit", folder, tmp_path / "out", "-q")
    assert result.exit_code == 2 and result.stderr.count("\n") == 1 and words in result.stderr, result.output
    assert not (tmp_path / "out").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


@pytest.mark.parametrize("recipe,words", [({"routers": ["knn", "nope"]}, "unknown router 'nope'"),
                                          ({"routers": [{"name": "knn", "parameters": {"kk": 3}}]},
                                           "unknown parameter"),
                                          ({"routers": [{"name": "knn", "parameters": {"k": 0}}]}, "below"),
                                          ({"routers": ["knn"], "splitt": {}}, "unknown key"),
                                          ({"routers": ["knn", "knn"]}, "twice"),
                                          ({"split": {"train": 0.5, "validation": 0.2, "test": 0.2}}, "must be 1")])
def test_bad_recipes_are_one_line_exit_2(tmp_path, matrices, recipe, words):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    result = invoke("route", "fit", matrices, tmp_path / "out", "--recipe", path, "-q")
    assert result.exit_code == 2 and result.stderr.count("\n") == 1 and words in result.stderr, result.output
    assert not (tmp_path / "out").exists()


def test_existing_output_needs_force(tmp_path, matrices):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = invoke("route", "fit", matrices, out, "-q")
    assert result.exit_code == 2 and "exists" in result.stderr and result.stderr.count("\n") == 1
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_learned_routers_need_embeddings(tmp_path):
    folder = write_own(tmp_path / "m", *synthetic(40))
    (folder / "embeddings.npy").unlink()
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"routers": ["oracle", "knn"]}))
    result = invoke("route", "fit", folder, tmp_path / "out", "--recipe", path, "-q")
    assert result.exit_code == 2 and "needs query embeddings" in result.stderr
    path.write_text(yaml.safe_dump({"routers": ["oracle", "strongest_per_task", "cheapest"]}))
    assert invoke("route", "fit", folder, tmp_path / "out", "--recipe", path, "-q").exit_code == 0


def test_dry_run_writes_nothing(tmp_path, matrices):
    result = invoke("route", "fit", matrices, tmp_path / "out", "--dry-run")
    assert result.exit_code == 0 and "knn" in result.stdout and not (tmp_path / "out").exists()


def test_prknn_and_kmeans_follow_vl_routerbench(tmp_path):
    """At 'quality only' they route as VL-RouterBench's prknn and kmeans routers (routers/{prknn,kmeans}/router.py,
    as carried by yutao1024/SCOPE-Router at 35c43e4005922a43c4e054a4a2ec56c1d5d1d9c4), written out here with
    scikit-learn's own StandardScaler and NearestNeighbors."""
    from sklearn.neighbors import NearestNeighbors
    from sklearn.preprocessing import StandardScaler

    from malleable.route import get_router

    m = read_matrices(write_own(tmp_path / "m", *synthetic(120)))
    train, test = m.subset(np.arange(80)), m.subset(np.arange(80, 120))
    keep = train.Y.sum(axis=1) > 0
    scaler = StandardScaler().fit(train.X[keep])
    Xs = scaler.transform(train.X[keep])
    dist, idx = NearestNeighbors(n_neighbors=7, metric="cosine").fit(Xs).kneighbors(scaler.transform(test.X))
    w = 1.0 / (1e-6 + dist)
    Yk, Ck = train.Y[keep][idx], train.C[keep][idx]
    wins = np.zeros((len(test), 4))
    for q in range(len(test)):
        for a in range(4):
            for b in range(4):
                if a != b:
                    better = (Yk[q, :, a] > Yk[q, :, b]) | ((Yk[q, :, a] == Yk[q, :, b]) & (Ck[q, :, a] < Ck[q, :, b]))
                    wins[q, a] += w[q, better].sum()
    r = get_router("prknn", {})
    r.fit(train, 0)
    assert np.allclose(r.quality(test) * w.sum(axis=1, keepdims=True) * 3, wins)
    assert np.array_equal(r.choose(test, None), wins.argmax(axis=1))

    Z = Xs / np.linalg.norm(Xs, axis=1, keepdims=True)
    P = np.stack([Z[train.Y[keep][:, k] > 0].mean(axis=0) for k in range(4)])
    P /= np.linalg.norm(P, axis=1, keepdims=True)
    Zt = scaler.transform(test.X)
    Zt /= np.linalg.norm(Zt, axis=1, keepdims=True)
    r = get_router("kmeans", {})
    r.fit(train, 0)
    assert np.array_equal(r.choose(test, None), (Zt @ P.T).argmax(axis=1))
