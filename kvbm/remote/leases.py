"""Source-side leases: blocks held for remote readers until they are done or go quiet.

Call order:

    add(tier, block_ids, hashes, readers=1, reader=None) -> Lease   # blocks are pinned by the caller
    notice(sender, Notice)      # DONE from a reader: released after ``readers`` distinct agents
                                # HEARTBEAT: expiry moves to now + lease_s
    expire()                    # leases past their expiry end as EXPIRED (call it often)
    release(lease_id)           # its reader said out of band (side channel) it is done: RELEASED
    revoke(lease_id)            # the source withdraws one lease: it ends as REVOKED
    revoke_all()                # shutdown: every lease ends as REVOKED

Every lease ends exactly once, through ``on_end(lease, LeaseEnd)``: that is the hook where the
block manager unpins the blocks (``TierIndex.complete_load`` style) and, for G1, where the
connector reports the request's blocks as sent. The table does not know the manager.

A lease granted to a named ``reader`` only listens to that agent; an anonymous lease (the
source does not know yet who will read, as in a prefill's ``kv_transfer_params``) listens to
any agent. Notices for unknown leases are counted and ignored (a DONE after expiry is normal).
Not thread-safe; time comes from the injected ``clock``.
"""

from __future__ import annotations

import dataclasses
import enum
import itertools
import math
from collections.abc import Callable, Sequence

import numpy as np

from kvbm.ids import BlockHash, Tier
from kvbm.remote.metadata import AgentName, LeaseId
from kvbm.remote.notices import Notice, NoticeKind


class LeaseEnd(enum.Enum):
    RELEASED = "released"  # every expected reader sent DONE
    EXPIRED = "expired"  # no heartbeat or DONE within lease_s
    REVOKED = "revoked"  # the source shut down or withdrew the blocks


@dataclasses.dataclass(frozen=True, eq=False)
class Lease:
    """Blocks held for ``readers`` remote readers (``reader``: the only agent allowed)."""

    lease_id: LeaseId
    tier: Tier
    block_ids: np.ndarray
    hashes: tuple[BlockHash, ...]
    readers: int = 1
    reader: AgentName | None = None


@dataclasses.dataclass(frozen=True)
class LeaseCounters:
    granted: int = 0
    released: int = 0
    expired: int = 0
    revoked: int = 0
    heartbeats: int = 0
    done_notices: int = 0
    ignored_notices: int = 0
    active: int = 0
    blocks_held: int = 0


@dataclasses.dataclass
class _Entry:
    lease: Lease
    expires_at: float
    done_by: set[str]


class LeaseTable:
    """Leases of one source, with expiry from ``clock`` (see the module docstring)."""

    def __init__(
        self,
        *,
        lease_s: float,
        clock: Callable[[], float],
        on_end: Callable[[Lease, LeaseEnd], None],
        lease_ids: Callable[[], int] | None = None,
    ) -> None:
        if not lease_s > 0:
            raise ValueError(f"lease_s must be positive, got {lease_s}")
        self._lease_s = lease_s
        self._clock = clock
        self._on_end = on_end
        self._ids = lease_ids or itertools.count(1).__next__
        self._entries: dict[LeaseId, _Entry] = {}
        self._next_expiry = math.inf
        self._counts = dict.fromkeys(("granted", "released", "expired", "revoked", "heartbeats", "dones", "ignored"), 0)

    @property
    def lease_s(self) -> float:
        return self._lease_s

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, lease_id: object) -> bool:
        return lease_id in self._entries

    def expires_at(self, lease_id: LeaseId) -> float:
        """Clock time at which ``lease_id`` expires.

        Raises:
            KeyError: no such lease.
        """
        return self._entries[lease_id].expires_at

    def add(
        self,
        tier: Tier,
        block_ids: Sequence[int] | np.ndarray,
        hashes: Sequence[BlockHash] = (),
        *,
        readers: int = 1,
        reader: AgentName | None = None,
    ) -> Lease:
        """Hold blocks (already pinned by the caller) until released or expired.

        Raises:
            ValueError: ``readers`` is not positive, or hashes do not match the block ids.
        """
        ids = np.asarray(block_ids, dtype=np.int64).reshape(-1)
        if readers < 1:
            raise ValueError(f"readers must be positive, got {readers}")
        if hashes and len(hashes) != len(ids):
            raise ValueError(f"{len(hashes)} hashes for {len(ids)} blocks")
        lease = Lease(LeaseId(self._ids()), tier, ids, tuple(hashes), readers, reader)
        if lease.lease_id in self._entries:
            raise ValueError(f"lease id {lease.lease_id} is already in use")
        expires = self._clock() + self._lease_s
        self._entries[lease.lease_id] = _Entry(lease, expires, set())
        self._next_expiry = min(self._next_expiry, expires)
        self._counts["granted"] += 1
        return lease

    def notice(self, sender: str, notice: Notice) -> None:
        """Apply a reader's notice; leases it cannot speak for are ignored and counted."""
        now = self._clock()
        for lease_id in notice.leases:
            entry = self._entries.get(lease_id)
            if entry is None or (entry.lease.reader is not None and entry.lease.reader != sender):
                self._counts["ignored"] += 1
                continue
            if notice.kind is NoticeKind.HEARTBEAT:
                entry.expires_at = max(entry.expires_at, now + self._lease_s)
                self._counts["heartbeats"] += 1
                continue
            entry.done_by.add(sender)
            self._counts["dones"] += 1
            if len(entry.done_by) >= entry.lease.readers:
                self._end(lease_id, LeaseEnd.RELEASED)

    def expire(self) -> list[Lease]:
        """End every lease whose expiry has passed; returns them."""
        now = self._clock()
        if now < self._next_expiry:
            return []
        due = [i for i, e in self._entries.items() if e.expires_at <= now]
        ended = [self._end(i, LeaseEnd.EXPIRED) for i in due]
        self._next_expiry = min((e.expires_at for e in self._entries.values()), default=math.inf)
        return ended

    def get(self, lease_id: LeaseId) -> Lease | None:
        """The live lease ``lease_id``, or None."""
        entry = self._entries.get(lease_id)
        return None if entry is None else entry.lease

    def release(self, lease_id: LeaseId) -> Lease | None:
        """End one lease now as RELEASED (its reader said, out of band, it is done); returns
        it, or None for an unknown id."""
        if lease_id not in self._entries:
            return None
        return self._end(lease_id, LeaseEnd.RELEASED)

    def revoke(self, lease_id: LeaseId) -> Lease | None:
        """End one lease now as REVOKED; returns it, or None for an unknown id."""
        if lease_id not in self._entries:
            return None
        return self._end(lease_id, LeaseEnd.REVOKED)

    def revoke_all(self) -> list[Lease]:
        """End every lease as REVOKED (source shutdown)."""
        ended = [self._end(i, LeaseEnd.REVOKED) for i in list(self._entries)]
        self._next_expiry = math.inf
        return ended

    def counters(self) -> LeaseCounters:
        c = self._counts
        return LeaseCounters(
            granted=c["granted"],
            released=c["released"],
            expired=c["expired"],
            revoked=c["revoked"],
            heartbeats=c["heartbeats"],
            done_notices=c["dones"],
            ignored_notices=c["ignored"],
            active=len(self._entries),
            blocks_held=sum(len(e.lease.block_ids) for e in self._entries.values()),
        )

    def _end(self, lease_id: LeaseId, how: LeaseEnd) -> Lease:
        lease = self._entries.pop(lease_id).lease
        self._counts[how.value] += 1
        self._on_end(lease, how)
        return lease
