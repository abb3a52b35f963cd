"""Exceptions that carry a user-facing, one-line message (the CLIs print them without a traceback)."""


class BcsError(Exception):
    """Base class of all errors bcs_tf raises on bad input."""


class ConfigError(BcsError, ValueError):
    """A bad setting (flag, argument or configuration value)."""


class DataError(BcsError):
    """A dataset that cannot be found or read."""


class CheckpointError(BcsError):
    """A checkpoint or run directory that is missing, corrupt or does not match the model."""
