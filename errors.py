"""Errors that end a run with one clear line instead of a traceback.

`train.py` catches these, prints `error: <message>` and exits with `exit_code`.
Raise them where bad input is first noticed, with a message that names the config key,
file, shape or step at fault.
"""


class MnemaxError(Exception):
    """Base class: a problem the user can fix, reported as one line."""

    exit_code = 2


class ConfigError(MnemaxError):
    """A config key is unknown, mistyped or impossible (message names the key)."""


class DataError(MnemaxError):
    """A data path is missing or empty, or its contents are invalid (message names the file)."""


class CheckpointError(MnemaxError):
    """A checkpoint directory cannot be read or belongs to a different run."""


class NonFiniteError(MnemaxError):
    """The loss or gradients became NaN/Inf (message names the step)."""

    exit_code = 1
