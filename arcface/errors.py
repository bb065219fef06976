"""The one exception type for mistakes in the user's input (a path, a key, a label, a checkpoint).

Its message is a single sentence naming the file/key/option and the fix; `arcface-train` prints it on one line
and exits with status 2 instead of showing a traceback.
"""


class UserError(Exception):
    """Bad input that the user can fix; the message says how."""
