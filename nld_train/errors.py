"""Errors that mean "the input is wrong" (config, data files, checkpoints, tokenizer).

The CLI prints these as one line and exits with code 2; anything else is a bug and keeps its
traceback.
"""


class InputError(ValueError):
    pass


class ConfigError(InputError):
    """A configuration value is impossible; the message names the key."""


class DataError(InputError):
    """A data file, data path or tokenizer is missing, corrupt or inconsistent."""


class CheckpointError(InputError):
    """A checkpoint is missing, incomplete, corrupt or of another model shape."""
