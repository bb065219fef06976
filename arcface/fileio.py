"""Writing files so that a crash at any moment leaves either the old file or the complete new one.

A file is written under a unique hidden temporary name in its own directory (with the mode a plain `open()`
would have given it, the umask's), flushed to disk, renamed over the target, and the directory is flushed so the
rename itself survives a power cut. Temporaries left by a killed process are named `.<target>.<random>.tmp` and
`remove_stale_temporaries` clears them.
"""
from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path
from typing import BinaryIO, Iterator


def fsync_path(path: str | Path) -> None:
    """Flush a file's contents, or a directory's entries (renames, creations), to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def new_temporary(path: str | Path) -> Path:
    """Create an empty, uniquely named `.<name>.<random>.tmp` beside `path` and return it.

    Unique names let concurrent writers (ranks) share a target; the mode comes from the umask like a plain `open()`.
    """
    path = Path(path)
    temp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
    os.close(os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    return temp


@contextlib.contextmanager
def atomic_write(path: str | Path, before_replace=None) -> Iterator[BinaryIO]:
    """`with atomic_write(path) as f: f.write(...)`: `path` appears complete on success, untouched on failure.

    `before_replace()`, if given, runs once the new file is safely on disk, just before it takes `path`'s place
    (e.g. to keep the previous version under another name).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = new_temporary(path)
    try:
        with open(temp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        if before_replace is not None:
            before_replace()
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def write_text_atomically(path: str | Path, text: str) -> None:
    """Replace `path` with `text` (UTF-8) so that readers see the old or the new contents, never a mix."""
    with atomic_write(path) as f:
        f.write(text.encode())


def remove_stale_temporaries(path: str | Path) -> list[Path]:
    """Delete temporaries of `path` that a killed writer left behind; returns what was removed."""
    path = Path(path)
    stale = sorted(path.parent.glob(f".{path.name}.*.tmp"))
    for tmp in stale:
        tmp.unlink(missing_ok=True)
    return stale
