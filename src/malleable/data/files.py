"""Local tables (JSONL / CSV / Parquet) read through `datasets`, with where each row came from."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from malleable.errors import InputError, reason
from malleable.io.paths import regular_file

BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}


def gensim_file(name: str) -> Path:
    """A file of gensim's test data (the offline text corpora), or an InputError saying what installs it."""
    try:
        from gensim.test.utils import datapath
    except ImportError:
        raise InputError(f"{name} comes with gensim's test data (pip install gensim)") from None
    path = Path(datapath(name))
    if not path.is_file():
        raise InputError(f"{path}: no such file (reinstall gensim: pip install --force-reinstall gensim)")
    return path


def load_table(path: str | Path) -> tuple[list[dict], list[str]]:
    """(rows, where): the file's rows as dicts and, per row, a place a user can find it ('line 12', 'row 3')."""
    path = Path(path)
    builder = BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise InputError(f"{path}: unsupported data file type '{path.suffix}' (use .jsonl, .json, .csv or .parquet)")
    if not path.exists():
        raise InputError(f"{path}: no such data file")
    regular_file(path)
    if builder == "json":
        _check_json_lines(path)
    import datasets

    datasets.disable_progress_bars()
    # datasets keeps an Arrow copy of every file it reads in its cache; a forget set must leave no copy
    # behind, so the copy goes to a temporary folder that is gone when the rows are in memory
    with tempfile.TemporaryDirectory(prefix="malleable-data-") as cache:
        try:
            table = datasets.load_dataset(builder, data_files=str(path), split="train", cache_dir=cache)
            rows = table.to_list()
        except Exception as e:  # datasets wraps parser errors in several types; the first line is the useful part
            raise InputError(f"{path}: cannot read as {builder} ({reason(e)})") from None
        del table
    if builder == "json":
        lines = [i for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if line.strip()]
        where = [f"line {n}" for n in lines] if len(lines) == len(rows) else [f"row {i + 1}" for i in range(len(rows))]
    elif builder == "csv":
        where = [f"line {i + 2}" for i in range(len(rows))]  # after the header; exact unless fields span lines
    else:
        where = [f"row {i + 1}" for i in range(len(rows))]
    return rows, where


def write_jsonl(path: str | Path, rows: list[dict]) -> Path:
    """Rows as one JSON object per line (the format `load_table` and `learn` read); parent folders are made."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _check_json_lines(path: Path) -> None:
    """Name the first line that is not a JSON object (datasets' own error does not say where)."""
    with open(path, encoding="utf-8", errors="strict") as f:
        try:
            first = f.read(1)
        except UnicodeDecodeError:
            raise InputError(f"{path}: not UTF-8 text") from None
        if first == "[":  # a JSON array: datasets reads it whole
            return
        f.seek(0)
        try:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise InputError(f"{path}: line {n}: not valid JSON ({e.msg})") from None
                if not isinstance(row, dict):
                    raise InputError(f"{path}: line {n}: expected a JSON object, got {type(row).__name__}")
        except UnicodeDecodeError:
            raise InputError(f"{path}: line {n + 1}: not UTF-8 text") from None
