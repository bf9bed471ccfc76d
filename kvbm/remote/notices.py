"""Lease notices: the NIXL notifications a reader sends to a source.

Two kinds, both naming leases by id (the sender is the NIXL agent the notification came
from, so a notice cannot speak for another reader):

- ``DONE``: the reader has finished with these leases (read them, failed, or gave up); the
  source may free the blocks. A pull attaches its ``DONE`` to the NIXL read itself, so the
  source hears it exactly when the bytes have left.
- ``HEARTBEAT``: the reader still holds these leases; each extends them to ``now + lease_s``.

Wire form: ``b"kvbm1 done 7,8"`` / ``b"kvbm1 hb 7"``. Anything else is not a kvbm notice.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Iterable

from kvbm.remote.metadata import LeaseId

_PREFIX = b"kvbm1 "


class NoticeKind(enum.Enum):
    DONE = b"done"
    HEARTBEAT = b"hb"


@dataclasses.dataclass(frozen=True)
class Notice:
    kind: NoticeKind
    leases: tuple[LeaseId, ...]

    def encode(self) -> bytes:
        return _PREFIX + self.kind.value + b" " + b",".join(str(int(i)).encode() for i in self.leases)


def done(leases: Iterable[LeaseId]) -> bytes:
    return Notice(NoticeKind.DONE, tuple(leases)).encode()


def heartbeat(leases: Iterable[LeaseId]) -> bytes:
    return Notice(NoticeKind.HEARTBEAT, tuple(leases)).encode()


def parse(message: bytes) -> Notice | None:
    """The notice in ``message``, or ``None`` when it is not a well-formed kvbm notice."""
    if not message.startswith(_PREFIX):
        return None
    kind_raw, _, ids_raw = message[len(_PREFIX) :].partition(b" ")
    try:
        kind = NoticeKind(kind_raw)
        leases = tuple(LeaseId(int(x)) for x in ids_raw.split(b",")) if ids_raw else ()
    except ValueError:
        return None
    return Notice(kind, leases)
