"""Errors a user can act on.

Every error raised for bad input derives from `InputError`; the CLI prints its message as
one line and exits with status 2. Messages name the thing (file, key, value) and say what
was expected, so a user never has to read a traceback.
"""

from __future__ import annotations


class InputError(ValueError):
    """Bad input from the user: a file, a key, a value. CLI exit code 2."""


class ConfigError(InputError):
    """A configuration key that does not exist, or a value of the wrong type or range."""


class StoreError(InputError):
    """A path that is not a valid scan store, or a store whose content breaks the schema."""


class IngestError(InputError):
    """A source file that cannot be turned into a scan store."""


class ReconstructionFailed(RuntimeError):
    """A reconstruction that ran but could not produce a result (e.g. the loss became NaN)."""
