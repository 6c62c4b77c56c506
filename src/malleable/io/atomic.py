"""Atomic outputs: everything is written into a hidden temporary directory beside the target, then renamed.

Every output carries a small marker file, so `--force` can tell an earlier output of malleable (which it may
replace) from anything else (which it never deletes: a model folder, a data folder, a home directory).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from malleable.errors import OutputError

MARKER = ".malleable-output"


def check_not_input(path: str | Path, inputs: Iterable[str | Path], what: str = "output") -> None:
    """Refuse a `path` that is an input, holds one, or lies inside one, compared after `..` and symlinks:
    writing or replacing it would change the user's inputs."""
    real = Path(path).resolve()
    for p in inputs:
        rp = Path(p).resolve()
        if real == rp or rp in real.parents or real in rp.parents:
            relation = "it is" if real == rp else ("it lies inside" if rp in real.parents else "it holds")
            raise OutputError(f"{path}: the {what} would overwrite input {p} ({relation} that input after "
                              "links and '..'); choose another path")


def replaceable(path: Path) -> bool:
    """An earlier output of malleable (it carries the marker), or an empty directory."""
    if path.is_symlink() or not path.is_dir():
        return False
    return (path / MARKER).is_file() or not any(path.iterdir())


def check_output(out: str | Path, force: bool = False, inputs: Iterable[str | Path] = ()) -> Path:
    """Fail early (before any work) if `out` cannot be produced, or producing it would touch an input."""
    out = Path(out).absolute()
    check_not_input(out, inputs)
    if out.exists() or out.is_symlink():
        if not force:
            raise OutputError(f"{out}: output exists (pass --force to replace it)")
        if not replaceable(out):
            raise OutputError(f"{out}: exists and is not an earlier malleable output; --force replaces only "
                              "those (remove it yourself if you mean it)")
    parent = out.parent
    if not parent.exists():
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutputError(f"{parent}: cannot create output directory ({e.strerror})") from None
    if not os.access(parent, os.W_OK):
        raise OutputError(f"{parent}: output directory is not writable")
    return out


def check_output_file(out: str | Path, force: bool = False, inputs: Iterable[str | Path] = ()) -> Path:
    """`check_output` for a single file: refused when it would touch an input, exists without `force`, exists
    as anything but a plain file, or its folder does not exist."""
    out = Path(out).absolute()
    check_not_input(out, inputs)
    if out.exists() or out.is_symlink():
        if not force:
            raise OutputError(f"{out}: output exists (pass --force to replace it)")
        if not out.is_file() or out.is_symlink():
            raise OutputError(f"{out}: exists and is not a file; --force replaces only a file")
    if not out.parent.is_dir():
        raise OutputError(f"{out}: give a file path in an existing folder")
    return out


@contextlib.contextmanager
def atomic_dir(out: str | Path, force: bool = False, inputs: Iterable[str | Path] = ()) -> Iterator[Path]:
    """Yield a temporary directory; on success it replaces `out`, on any error it is removed."""
    out = check_output(out, force, inputs)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp makes it owner-only; the output gets normal permissions
    except OSError as e:
        raise OutputError(f"{out.parent}: cannot write ({e.strerror})") from None
    try:
        yield tmp
        (tmp / MARKER).write_text("written by malleable; `--force` may replace this folder\n")
        if out.exists():  # --force: move the old output aside, swap, then delete it
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / "x")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write one file through a temporary sibling and a rename: a run stopped mid-write leaves the old file
    whole (or none)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
