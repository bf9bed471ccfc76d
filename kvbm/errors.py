"""Project exceptions.

kvbm keeps three kinds of failure apart: running out of room is a return value,
misuse raises (``ValueError``/``KeyError``/``TypeError`` or the classes below), a broken
invariant is an ``assert``. The classes here exist where a caller needs to tell kvbm's
errors from others.
"""

from __future__ import annotations


class KvbmError(Exception):
    """Base class of kvbm's own errors."""


class ConfigError(KvbmError, ValueError):
    """A configuration value is wrong; ``field`` names the offending key."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"kvbm config field {field!r}: {message}")
        self.field = field


class TransferError(KvbmError):
    """A transfer handler could not move a job's bytes; the message says why."""
