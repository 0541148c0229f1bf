"""Errors that end a run with one clear line instead of a traceback.

`train.py` catches these, prints `error: <message>` and exits with `exit_code`; the other
command lines do the same through `run_cli` and `ArgumentParser`. Raise them where bad
input is first noticed, with a message that names the config key, file, shape or step at
fault.
"""

import argparse
import sys


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


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line `error: ...` and exit code 2."""

    def error(self, message):
        print(f"error: {message}", file=sys.stderr, flush=True)
        sys.exit(2)


def run_cli(main, argv=None) -> int:
    """Run `main(argv)`; a MnemaxError becomes one line `error: ...` and its exit code."""
    try:
        main(argv)
    except MnemaxError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return error.exit_code
    return 0
