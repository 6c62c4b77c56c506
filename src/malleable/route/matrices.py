"""Quality and cost matrices in: what routers learn from and are scored on.

A matrices folder holds one of three layouts (arrays are read with ``np.load(allow_pickle=False)``; a pickle
file is never opened):

* malleable's own: ``Y.npy`` (queries x candidates quality; or ``Y.npz`` with key ``Y``), ``C.npy`` (cost, same
  shape; or ``C.npz`` with key ``C``), optional ``meta.csv`` / ``meta.parquet`` / ``meta.jsonl`` (one row per
  query: ``task``, ``split`` in train / validation / test, optional ``query``), optional ``embeddings.npy``
  (queries x dim), ``candidates.json`` (a list of names) and ``arrow.npy`` (queries x candidates Arrow scores,
  NaN for a candidate outside the adapter library; written by ``route build`` with ``arrow: true``).
* VL-RouterBench's: ``data/matrices/Y.npz`` (key ``Y``), ``data/matrices/C.npy`` (or ``C.npz``),
  ``data/registry/meta.parquet`` (``sample_id``, ``dataset`` = the task), optional ``SPLITS/{train,dev,test}.jsonl``
  (``sample_id`` per line) and ``EMBEDDINGS/text/<encoder>.parquet`` (``sample_id``, ``embedding``). Its
  ``model_index.pkl`` and ``sample_ids.pkl`` are pickles and are not read: candidate names come from
  ``data/registry/models.json`` when present (else model_0, model_1, ...), and C is taken in meta's row order.
* a long table ``scores.csv`` / ``scores.parquet`` with columns ``query, candidate, score, cost`` (optional
  ``task``, ``split``), one row per (query, candidate), read with pandas; ``embeddings.npy`` beside it has one row
  per query in order of first appearance.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from malleable.errors import InputError, reason

SPLITS = ("train", "validation", "test")
SPLIT_NAMES = {"train": "train", "validation": "validation", "val": "validation", "dev": "validation",
               "test": "test"}


@dataclass
class Matrices:
    Y: np.ndarray  # (queries, candidates) quality, float64
    C: np.ndarray  # (queries, candidates) cost, float64, >= 0
    candidates: list[str]
    task: np.ndarray  # (queries,) str
    split: np.ndarray | None = None  # (queries,) one of SPLITS, or None: the recipe's random split
    X: np.ndarray | None = None  # (queries, dim) float32 embeddings
    source: str = ""
    A: np.ndarray | None = None  # (queries, candidates) Arrow scores, NaN outside the adapter library

    def __len__(self) -> int:
        return self.Y.shape[0]

    def subset(self, rows: np.ndarray) -> Matrices:
        return replace(self, Y=self.Y[rows], C=self.C[rows], task=self.task[rows],
                       split=None if self.split is None else self.split[rows],
                       X=None if self.X is None else self.X[rows], A=None if self.A is None else self.A[rows])


def _array(path: Path, key: str | None = None) -> np.ndarray:
    try:
        data = np.load(path, allow_pickle=False)
        if isinstance(data, np.lib.npyio.NpzFile):
            with data:
                if key not in data.files:
                    raise InputError(f"{path}: has no array '{key}' (holds {', '.join(data.files) or 'nothing'})")
                return data[key]
        return data
    except InputError:
        raise
    except (ValueError, OSError, EOFError) as e:  # an object array (pickle) is a ValueError
        raise InputError(f"{path}: not a readable numpy array ({reason(e)})") from None


def _first(folder: Path, *names: str) -> Path | None:
    return next((folder / n for n in names if (folder / n).is_file()), None)


def _table(path: Path):
    import pandas as pd

    try:
        if path.suffix == ".parquet":
            return pd.read_parquet(path)
        if path.suffix == ".jsonl":
            return pd.read_json(path, lines=True)
        return pd.read_csv(path)
    except Exception as e:  # pandas and pyarrow raise many types for a damaged file
        raise InputError(f"{path}: cannot read the table ({reason(e)})") from None


def read_matrices(path: str | Path) -> Matrices:
    """The matrices in folder `path`, checked (see the module doc for the layouts)."""
    folder = Path(path)
    if not folder.is_dir():
        raise InputError(f"{folder}: not a folder of routing matrices")
    if (folder / "data" / "matrices" / "Y.npz").is_file():
        m = _vl_routerbench(folder)
    elif _first(folder, "scores.csv", "scores.parquet"):
        m = _long_table(_first(folder, "scores.csv", "scores.parquet"))
    elif _first(folder, "Y.npy", "Y.npz"):
        m = _own(folder)
    else:
        raise InputError(f"{folder}: no Y.npy / Y.npz, scores.csv / scores.parquet or data/matrices/Y.npz found")
    m.source = str(folder)
    check(m)
    return m


def _own(folder: Path) -> Matrices:
    yp, cp = _first(folder, "Y.npy", "Y.npz"), _first(folder, "C.npy", "C.npz")
    if cp is None:
        raise InputError(f"{folder}: has Y but no cost matrix C.npy / C.npz")
    Y, C = _array(yp, "Y"), _array(cp, "C")
    n = Y.shape[0] if Y.ndim == 2 else 0
    task, split = np.array(["all"] * n, dtype=object), None
    meta = _first(folder, "meta.csv", "meta.parquet", "meta.jsonl")
    if meta is not None:
        task, split = _meta(_table(meta), meta, n, "task")
    cand = folder / "candidates.json"
    names = _names(cand, Y) if cand.is_file() else [f"model_{i}" for i in range(Y.shape[-1] if Y.ndim else 0)]
    X = _array(folder / "embeddings.npy") if (folder / "embeddings.npy").is_file() else None
    A = _array(folder / "arrow.npy") if (folder / "arrow.npy").is_file() else None
    return Matrices(Y, C, names, task, split, X, A=A)


def _names(path: Path, Y: np.ndarray) -> list[str]:
    try:
        names = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: not a JSON list of candidate names ({reason(e)})") from None
    if not isinstance(names, list) or not all(isinstance(x, str) and x for x in names) or len(set(names)) < len(names):
        raise InputError(f"{path}: expected a list of distinct candidate names")
    return names


def _meta(df, path: Path, n: int, task_column: str) -> tuple[np.ndarray, np.ndarray | None]:
    if len(df) != n:
        raise InputError(f"{path}: {len(df)} rows, but the quality matrix has {n} queries")
    task = df[task_column].astype(str).to_numpy(dtype=object) if task_column in df else np.array(["all"] * n,
                                                                                                  dtype=object)
    split = None
    if "split" in df:
        split = _splits(df["split"].astype(str).tolist(), path)
    return task, split


def _splits(values: list[str], path: Path) -> np.ndarray:
    bad = sorted({v for v in values if v not in SPLIT_NAMES})
    if bad:
        raise InputError(f"{path}: split '{bad[0]}' is not one of train / validation (dev, val) / test")
    return np.array([SPLIT_NAMES[v] for v in values], dtype=object)


def _vl_routerbench(folder: Path) -> Matrices:
    mats, registry = folder / "data" / "matrices", folder / "data" / "registry"
    Y = _array(mats / "Y.npz", "Y")
    cp = _first(mats, "C.npy", "C.npz")
    if cp is None:
        raise InputError(f"{mats}: has Y.npz but no C.npy / C.npz")
    C = _array(cp, "C")
    meta_path = registry / "meta.parquet"
    if not meta_path.is_file():
        raise InputError(f"{meta_path}: missing (VL-RouterBench's per-query metadata)")
    meta = _table(meta_path)
    n = Y.shape[0] if Y.ndim == 2 else 0
    task, _ = _meta(meta, meta_path, n, "dataset")
    ids = meta["sample_id"].astype(str).tolist() if "sample_id" in meta else [str(i) for i in range(n)]
    split = None
    if (folder / "SPLITS").is_dir():
        where = {}
        for name in ("train", "dev", "test"):
            f = folder / "SPLITS" / f"{name}.jsonl"
            if f.is_file():
                for sid in _table(f).get("sample_id", []):
                    where[str(sid)] = SPLIT_NAMES[name]
        missing = [i for i in ids if i not in where]
        if missing:
            raise InputError(f"{folder / 'SPLITS'}: sample '{missing[0]}' is in no split")
        split = np.array([where[i] for i in ids], dtype=object)
    X = None
    texts = sorted((folder / "EMBEDDINGS" / "text").glob("*.parquet")) if (folder / "EMBEDDINGS").is_dir() else []
    if texts:
        emb = _table(texts[0])
        by_id = dict(zip(emb["sample_id"].astype(str), emb["embedding"]))
        missing = [i for i in ids if i not in by_id]
        if missing:
            raise InputError(f"{texts[0]}: no embedding for sample '{missing[0]}'")
        X = np.stack([np.asarray(by_id[i], dtype=np.float32) for i in ids])
    names_file = registry / "models.json"
    names = _names(names_file, Y) if names_file.is_file() else [f"model_{i}" for i in range(Y.shape[-1])]
    return Matrices(Y, C, names, task, split, X)


def _long_table(path: Path) -> Matrices:
    df = _table(path)
    need = [c for c in ("query", "candidate", "score", "cost") if c not in df]
    if need:
        raise InputError(f"{path}: no column '{need[0]}' (a long table has query, candidate, score, cost)")
    if df.duplicated(["query", "candidate"]).any():
        row = df[df.duplicated(["query", "candidate"])].iloc[0]
        raise InputError(f"{path}: query '{row['query']}' has two rows for candidate '{row['candidate']}'")
    queries = list(dict.fromkeys(df["query"].astype(str)))
    names = list(dict.fromkeys(df["candidate"].astype(str)))
    df = df.assign(query=df["query"].astype(str), candidate=df["candidate"].astype(str))
    try:
        Y = df.pivot(index="query", columns="candidate", values="score").reindex(index=queries, columns=names)
        C = df.pivot(index="query", columns="candidate", values="cost").reindex(index=queries, columns=names)
        Y, C = Y.to_numpy(dtype=np.float64), C.to_numpy(dtype=np.float64)
    except (ValueError, TypeError) as e:
        raise InputError(f"{path}: score and cost must be numbers ({reason(e)})") from None
    first = df.drop_duplicates("query").set_index("query").reindex(queries)
    task = first["task"].astype(str).to_numpy(dtype=object) if "task" in df else np.array(["all"] * len(queries),
                                                                                         dtype=object)
    split = _splits(first["split"].astype(str).tolist(), path) if "split" in df else None
    emb = path.parent / "embeddings.npy"
    X = _array(emb) if emb.is_file() else None
    return Matrices(Y, C, names, task, split, X)


def check(m: Matrices) -> None:
    """Shapes agree, every query has a finite quality for every candidate, costs are finite and >= 0."""
    src = m.source
    if m.Y.ndim != 2 or m.C.ndim != 2:
        raise InputError(f"{src}: Y and C must be 2-D (queries x candidates); got shapes {m.Y.shape} and {m.C.shape}")
    if m.Y.shape != m.C.shape:
        raise InputError(f"{src}: Y has shape {m.Y.shape} but C has shape {m.C.shape}; they must match")
    n, k = m.Y.shape
    if k == 0:
        raise InputError(f"{src}: the pool is empty (no candidates)")
    if n == 0:
        raise InputError(f"{src}: no queries")
    if len(m.candidates) != k:
        raise InputError(f"{src}: {len(m.candidates)} candidate names for {k} columns")
    for name, a in (("Y", m.Y), ("C", m.C)):
        if not (np.issubdtype(a.dtype, np.number) or a.dtype == bool):
            raise InputError(f"{src}: {name} holds {a.dtype}, not numbers")
    m.Y, m.C = m.Y.astype(np.float64), m.C.astype(np.float64)
    unlabelled = np.flatnonzero(~np.isfinite(m.Y).all(axis=1))
    if unlabelled.size:
        raise InputError(f"{src}: query {unlabelled[0]} has no quality label for some candidate "
                         f"({unlabelled.size} such queries); every candidate must be scored on every query")
    bad = ~np.isfinite(m.C)
    if bad.any():
        q, c = np.argwhere(bad)[0]
        raise InputError(f"{src}: cost of candidate '{m.candidates[c]}' on query {q} is not a finite number")
    if (m.C < 0).any():
        q, c = np.argwhere(m.C < 0)[0]
        raise InputError(f"{src}: cost of candidate '{m.candidates[c]}' on query {q} is negative ({m.C[q, c]})")
    if m.X is not None:
        if m.X.ndim != 2 or m.X.shape[0] != n:
            raise InputError(f"{src}: embeddings have shape {m.X.shape}; expected ({n}, dim)")
        if not np.issubdtype(m.X.dtype, np.number) or not np.isfinite(m.X).all():
            raise InputError(f"{src}: embeddings must be finite numbers")
        m.X = m.X.astype(np.float32)
    if m.A is not None:
        if m.A.shape != m.Y.shape or not np.issubdtype(m.A.dtype, np.floating):
            raise InputError(f"{src}: Arrow scores (arrow.npy) have shape {m.A.shape} and type {m.A.dtype}; "
                             f"expected floats of shape {m.Y.shape}")
        if np.isinf(m.A).any() or np.isnan(m.A).all(axis=1).any():
            raise InputError(f"{src}: Arrow scores (arrow.npy) must be finite, NaN only outside the adapter library")
        m.A = m.A.astype(np.float64)


def split_rows(m: Matrices, fractions: tuple[float, float, float], seed: int) -> dict[str, np.ndarray]:
    """Row indices of train / validation / test: the matrices' own split column, else a seeded random split
    stratified by task (every task in every split where it has enough queries)."""
    if m.split is not None:
        rows = {s: np.flatnonzero(m.split == s) for s in SPLITS}
    else:
        rng = np.random.default_rng(seed)
        parts: dict[str, list[int]] = {s: [] for s in SPLITS}
        for t in sorted(set(m.task)):
            idx = rng.permutation(np.flatnonzero(m.task == t))
            a = int(round(fractions[0] * len(idx)))
            b = a + int(round(fractions[1] * len(idx)))
            for s, chunk in zip(SPLITS, (idx[:a], idx[a:b], idx[b:])):
                parts[s].extend(chunk.tolist())
        rows = {s: np.array(sorted(v), dtype=np.int64) for s, v in parts.items()}
    empty = [s for s in SPLITS if rows[s].size == 0]
    if empty:
        raise InputError(f"{m.source}: the {empty[0]} split has no queries ({len(m)} queries in all)")
    return rows
