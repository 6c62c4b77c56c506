"""Atomic outputs: everything is written into a hidden temporary directory beside the target, then renamed."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from malleable.errors import OutputError


def check_output(out: str | Path, force: bool = False, inputs: list[Path] | None = None) -> Path:
    """Fail early (before any work) if `out` cannot be produced."""
    out = Path(out).absolute()
    if out.exists() and not force:
        raise OutputError(f"{out}: output exists (pass --force to replace it)")
    for p in inputs or []:
        p = Path(p).absolute()
        if out == p or out in p.parents:
            raise OutputError(f"{out}: output would overwrite input {p}")
    parent = out.parent
    if not parent.exists():
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutputError(f"{parent}: cannot create output directory ({e.strerror})") from None
    if not os.access(parent, os.W_OK):
        raise OutputError(f"{parent}: output directory is not writable")
    return out


@contextlib.contextmanager
def atomic_dir(out: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary directory; on success it replaces `out`, on any error it is removed."""
    out = check_output(out, force)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp makes it owner-only; the output gets normal permissions
    except OSError as e:
        raise OutputError(f"{out.parent}: cannot write ({e.strerror})") from None
    try:
        yield tmp
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
