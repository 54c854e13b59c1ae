"""Errors a user can act on.

Every error raised for bad input is a `UserError`: the CLI prints its message alone (no traceback) and exits
with status 2. The message names the model, file or tensor at fault and says what to do. Anything else that
escapes is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad input or environment: a config key, a checkpoint, an output directory."""

    exit_code = 2


class ConfigError(UserError):
    """A config key has a value that is not allowed."""


class CheckpointError(UserError):
    """A checkpoint is missing, malformed, unsafe or incompatible with the others."""


class StorageError(UserError):
    """Reading or writing a file failed (truncated shard, full disk, permissions)."""


class OutputError(UserError):
    """The output directory cannot be used as asked (exists, belongs to another run)."""
