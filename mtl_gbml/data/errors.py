"""Data errors that name the file and the fix (never a stack trace from deep inside TFDS)."""


class DataError(RuntimeError):
    """A dataset file is missing, corrupt or malformed. The message names the file and the fix."""
