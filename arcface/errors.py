"""The one exception type for mistakes in the user's input (a path, a key, a label, a checkpoint).

Its message is a single sentence naming the file/key/option and the fix; `arcface-train` prints it on one line
and exits with status 2 instead of showing a traceback.
"""


class UserError(Exception):
    """Bad input that the user can fix; the message says how."""


def first_line(error: BaseException, limit: int = 240) -> str:
    """What an exception says, cut to fit inside one of our sentences: its first line (or its type's name)."""
    text = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return text if len(text) <= limit else text[:limit - 3] + "..."
