"""Exceptions that carry a user-facing, one-line message (the CLIs print them without a traceback)."""

import functools
import sys


class BcsError(Exception):
    """Base class of all errors bcs_tf raises on bad input."""


class ConfigError(BcsError, ValueError):
    """A bad setting (flag, argument or configuration value)."""


class DataError(BcsError):
    """A dataset that cannot be found or read."""


class CheckpointError(BcsError):
    """A checkpoint or run directory that is missing, corrupt or does not match the model."""


class StorageError(BcsError):
    """A file could not be written (a full disk): nothing half-written is left in its place."""


class DivergenceError(BcsError):
    """Training produced NaN or Inf, or a network that breaks its connection budget (nothing is saved)."""


def one_line_errors(main):
    """Decorate a CLI ``main(argv)``: a :class:`BcsError` prints as one ``error: …`` line and returns exit code 2."""

    @functools.wraps(main)
    def wrapper(argv=None):
        try:
            return main(argv)
        except BcsError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2

    return wrapper


def check_fraction(value, name="connectivity"):
    """``value`` as a float when it is in (0, 1] (a connectivity, a fraction of the data), else ConfigError."""
    if not (isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 < float(value) <= 1.0):
        raise ConfigError(f"{name} must be in (0, 1]. Received: {name}={value!r}")
    return float(value)
