"""The one exception type for mistakes in the user's input (a path, a key, a label, a checkpoint).

Its message is a single sentence naming the file/key/option and the fix; `arcface-train` prints it on one line
and exits with status 2 instead of showing a traceback.
"""
from __future__ import annotations

import re
import sys
import zipfile
from pathlib import Path
from typing import NoReturn


class UserError(Exception):
    """Bad input that the user can fix; the message says how."""


def exit_with_error(message: UserError | str) -> NoReturn:
    """End the command as bad input ends it: one `error: ` line on stderr, exit status 2."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def first_line(error: BaseException, limit: int = 240) -> str:
    """What an exception says, cut to fit inside one of our sentences: its first line (or its type's name)."""
    text = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _gist(error: Exception) -> str:
    """The exception's type and one sentence of its message: torch's messages run to paragraphs of advice."""
    line = re.search(r"Unsupported[^\n]*", str(error)) or re.search(r"[^\n]+", str(error))
    return f"{type(error).__name__}: {line.group(0).split('. ')[0] if line else 'no details'}"


def unloadable(path: Path, error: Exception) -> str:
    """What is wrong with a file that torch.load refused, as the middle of a sentence that names it: torch's own
    words for a truncated or foreign file point at mmap or zip internals."""
    size = path.stat().st_size
    if size == 0:
        return "is empty (0 bytes)"
    if not zipfile.is_zipfile(path):  # what torch.save has written since torch 1.6
        return f"is not a complete torch.save archive ({size} bytes)"
    return f"cannot be loaded ({size} bytes; {_gist(error)})"
