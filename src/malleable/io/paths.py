"""Where a file named from inside an input may live, and what counts as a readable input file.

A checkpoint's index, an adapter's config or a tokenizer's config names other files. A name written inside
a file the user gave us is not the user's choice: it must stay inside the folder the user named, or a
crafted index would make every verb read (and merge, train on, copy into its output) files from anywhere.
"""

from __future__ import annotations

import stat
from pathlib import Path, PurePosixPath

from malleable.errors import InputError


def _allowed_roots(root: Path) -> list[Path]:
    """The folder itself and, for a Hugging Face hub cache snapshot (`<repo>/snapshots/<rev>/`, whose files
    are symlinks into `<repo>/blobs/`), that repository's blob store: the layout `from_pretrained` leaves."""
    root = root.resolve()
    roots = [root]
    if root.parent.name == "snapshots" and (root.parent.parent / "blobs").is_dir():
        roots.append((root.parent.parent / "blobs").resolve())
    return roots


def contained(root: str | Path, name: str, where: str | Path) -> Path:
    """`root/name`, checked to stay inside `root` after `..` and symlinks, else an InputError naming `where`
    (the file that gave the name). `name` must be a plain relative path."""
    root = Path(root)
    if not isinstance(name, str) or not name or "\x00" in name:
        raise InputError(f"{where}: {name!r} is not a file name")
    pure = PurePosixPath(name.replace("\\", "/"))
    if pure.is_absolute() or ".." in pure.parts or (len(name) > 1 and name[1] == ":"):
        raise InputError(f"{where}: file name '{name}' points outside {root}; only files inside it are read")
    path = root / pure
    real = path.resolve()
    if not any(real == r or r in real.parents for r in _allowed_roots(root)):
        raise InputError(f"{where}: '{name}' is a link to {real}, outside {root}; only files inside it are read")
    return path


def regular_file(path: Path) -> Path:
    """`path`, if it is a regular file (or a link to one): a FIFO, a device or a socket would block or never
    end when read."""
    try:
        mode = Path(path).stat().st_mode
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror})") from None
    if not stat.S_ISREG(mode):
        raise InputError(f"{path}: not a regular file")
    return Path(path)


def check_folder(root: str | Path) -> Path:
    """`root`, after checking that no file directly in it is a link leading outside it: transformers and PEFT
    open the files of a model folder by their fixed names (config, tokenizer, weights) and follow links."""
    root = Path(root)
    try:
        links = [p.name for p in root.iterdir() if p.is_symlink()]
    except OSError as e:
        raise InputError(f"{root}: cannot read ({e.strerror})") from None
    for name in links:
        contained(root, name, root / name)
    return root
