"""The base of every error entroflow raises for bad input (config, data, models, checkpoints, files).

Rule scripts report these as one line naming the key, file or name (no traceback, see
`entroflow.logs.setup_logging`); anything else is a bug and keeps its traceback.
"""


class EntroflowError(ValueError):
    pass
