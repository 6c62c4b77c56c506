"""The hostile-input harness: run one command on damaged input and check every promise malleable makes about it.

`refused(args, ...)` runs the CLI in-process and asserts, for one damaged input:
* exit code 2 and exactly one line on stderr, `error: ...`, naming what it was told to name; no traceback;
* no output and no temporary folder left beside where the output would have gone;
* every input byte-identical afterwards;
* no file under `outside` opened (Python's audit hook sees every `open`, ours and our libraries'), so a
  planted file beside the inputs never reaches the run.
"""

from __future__ import annotations

import contextlib
import hashlib
import sys
from collections.abc import Iterator
from pathlib import Path

from conftest import tree_digest
from typer.testing import CliRunner

from malleable.cli import app

SECRET = b"MALLEABLE-PLANTED-OUTSIDE"
_opened: list[str] | None = None


def _hook(event: str, args: tuple) -> None:
    if _opened is not None and event == "open" and isinstance(args[0], (str, bytes, Path)):
        _opened.append(str(args[0]))


sys.addaudithook(_hook)  # installed once per test process; records only inside `recording_opens`


@contextlib.contextmanager
def recording_opens() -> Iterator[list[str]]:
    """Every path opened (by `open`, `os.open`, `io.open`) while the block runs, resolved."""
    global _opened
    _opened = []
    seen = _opened
    try:
        yield seen
    finally:
        _opened = None
        seen[:] = [str(Path(p).resolve()) if p else p for p in seen]


def digest(path: Path) -> str | None:
    path = Path(path)
    if path.is_dir():
        return tree_digest(path)
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def plant(folder: Path) -> Path:
    """A folder outside every input, holding safetensors-, JSON- and text-named files with a marker inside."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("x.safetensors", "secret.json", "secret.txt", "pytorch_model.bin", "tokenizer.json"):
        (folder / name).write_bytes(SECRET)
    return folder


def refused(args: list, *, mentions: str | list[str], inputs: list[Path], out: Path | None = None,
            outside: Path | None = None) -> str:
    """Run `malleable *args`; assert the refusal promises above; return the error line."""
    args = [str(a) for a in args]
    before = {Path(p): digest(p) for p in inputs}
    existed = out.exists() if out is not None else None
    with recording_opens() as opened:
        result = CliRunner().invoke(app, args)
    detail = (result.exit_code, result.stdout[-2000:], result.stderr[-2000:], repr(result.exception))
    assert result.exit_code == 2, detail
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), detail
    assert "Traceback" not in result.output, detail
    for m in [mentions] if isinstance(mentions, str) else mentions:
        assert m in lines[0], (m, lines[0])
    if out is not None:
        assert out.exists() == existed, f"{out}: output appeared or vanished"
        if out.parent.is_dir():
            left = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
            assert not left, f"temporary left behind: {left}"
    after = {Path(p): digest(p) for p in inputs}
    assert after == before, f"an input changed: {[str(p) for p in before if before[p] != after[p]]}"
    if outside is not None:
        root = str(Path(outside).resolve())
        read = [p for p in opened if p and (p == root or p.startswith(root + "/"))]
        assert not read, f"read outside the given folders: {read}"
    return lines[0]
