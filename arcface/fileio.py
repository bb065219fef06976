"""Writing files so that a crash at any moment leaves either the old file or the complete new one.

A file is written under a unique hidden temporary name in its own directory, flushed to disk, given the mode a
plain `open()` would have given it (the umask's), renamed over the target, and the directory is flushed so the
rename itself survives a power cut. Temporaries left by a killed process are named `.<target>.<random>.tmp` and
`remove_stale_temporaries` clears them.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Iterator


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_dir(directory: str | Path) -> None:
    """Flush a directory's entries (renames, creations) to disk."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path: str | Path, before_replace=None) -> Iterator[BinaryIO]:
    """`with atomic_write(path) as f: f.write(...)`: `path` appears complete on success, untouched on failure.

    `before_replace()`, if given, runs once the new file is safely on disk, just before it takes `path`'s place
    (e.g. to keep the previous version under another name).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; other tools' files follow the umask
        if before_replace is not None:
            before_replace()
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def remove_stale_temporaries(path: str | Path) -> list[Path]:
    """Delete temporaries of `path` that a killed writer left behind; returns what was removed."""
    path = Path(path)
    stale = sorted(path.parent.glob(f".{path.name}.*.tmp"))
    for tmp in stale:
        tmp.unlink(missing_ok=True)
    return stale
