"""The base of every error entroflow raises for bad input (config, data, models, checkpoints, files).

Rule scripts report these as one line naming the key, file or name (no traceback, see
`entroflow.logs.setup_logging`); anything else is a bug and keeps its traceback.
"""


class EntroflowError(ValueError):
    pass


def first_line(err: BaseException, limit: int = 300) -> str:
    """An exception's message cut to its first line (a library's multi-line report stays out of
    the one line a user sees), or its type's name when it has no message."""
    text = str(err).strip()
    return text.splitlines()[0][:limit] if text else type(err).__name__
