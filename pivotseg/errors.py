"""Errors meant for users: one line that names the file (or setting) and the fix."""


class PivotsegError(Exception):
    """A user-facing problem. The CLI prints ``str(err)`` on one line, without a traceback."""


class DataError(PivotsegError):
    """A dataset file or folder is missing, unreadable or inconsistent."""


class ConfigError(PivotsegError):
    """A configuration key or value is wrong."""


class CheckpointError(PivotsegError):
    """A checkpoint does not fit the model it is loaded into."""
