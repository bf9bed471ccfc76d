"""Why a remote operation failed: one enum, one exception, one reason format.

A failed pull is a :class:`~kvbm.transfer.jobs.JobResult` whose ``reason`` starts with the kind
(``"peer_lost: ..."``), so a connector can both log it and count it by :class:`FailureKind`
(:func:`kind_of`). Every kind means the same thing to the caller: these blocks did not
arrive intact, recompute them.
"""

from __future__ import annotations

import enum

from kvbm.errors import TransferError


class FailureKind(enum.Enum):
    DEADLINE = "deadline"  # the job's deadline passed (hung or slow peer, slow side channel)
    PEER_LOST = "peer_lost"  # NIXL reported the peer disconnected (it died or restarted)
    UNREACHABLE = "unreachable"  # the side channel refused, timed out or answered garbage
    UNKNOWN_PEER = "unknown_peer"  # no metadata for the source and nowhere to fetch it
    STALE_PEER = "stale_peer"  # the grant names an incarnation the source no longer runs
    BAD_DESCRIPTORS = "bad_descriptors"  # ids out of range, layouts differ, memory not registered
    NOT_HELD = "not_held"  # the peer does not hold (all) the blocks asked for
    CHECKSUM = "checksum"  # bytes arrived but differ from the published checksum
    NIXL_ERROR = "nixl_error"  # any other NIXL error
    CLOSED = "closed"  # the transport was closed with the job in flight


class RemoteError(TransferError):
    """A remote operation failed; ``kind`` classifies it, the message says why."""

    def __init__(self, kind: FailureKind, message: str) -> None:
        super().__init__(f"{kind.value}: {message}")
        self.kind = kind


def kind_of(reason: str | None) -> FailureKind | None:
    """The kind a failure reason starts with, or ``None``."""
    if not reason:
        return None
    head = reason.split(":", 1)[0]
    try:
        return FailureKind(head)
    except ValueError:
        return None


def from_nixl(exc: Exception, doing: str) -> RemoteError:
    """Classify an exception raised by a NIXL call (its classes load with nixl, so by name)."""
    name = type(exc).__name__
    if name == "nixlRemoteDisconnectError":
        kind = FailureKind.PEER_LOST
    elif name in ("nixlNotFoundError", "nixlInvalidParamError", "nixlMismatchError"):
        kind = FailureKind.BAD_DESCRIPTORS
    else:
        kind = FailureKind.NIXL_ERROR
    return RemoteError(kind, f"{doing}: {name} {exc}")
