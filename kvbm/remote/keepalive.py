"""Reader-side lease notices: heartbeats for leases still needed, batched DONE for the rest.

A reader holds a lease from the moment it accepts a grant until its pull finishes (or it
drops the grant). ``tick()`` sends one HEARTBEAT per source every ``heartbeat_s`` naming all
of that source's leases still held, which moves their expiry to ``now + lease_s`` on the
source. A reader that dies stops heartbeating, so its leases expire on the source: that is
how a source learns that a reader is gone.

Released leases are announced with DONE notices, batched per source for ``notice_interval_s``
(measured: a notification delays the next read from that source until the source polls, so
one message per batch costs one such delay instead of one per pull). ``flush()`` sends every
pending DONE now (shutdown).
"""

from __future__ import annotations

from collections.abc import Callable

from kvbm.remote import notices
from kvbm.remote.metadata import AgentName, LeaseId


class LeaseKeeper:
    """Leases held by this reader, by source; ``send(source, message) -> bool`` delivers."""

    def __init__(
        self,
        *,
        heartbeat_s: float,
        notice_interval_s: float,
        clock: Callable[[], float],
        send: Callable[[AgentName, bytes], bool],
    ) -> None:
        self._heartbeat_s = heartbeat_s
        self._notice_interval_s = notice_interval_s
        self._clock = clock
        self._send = send
        self._held: dict[AgentName, dict[LeaseId, int]] = {}  # lease -> holders (grant, job)
        self._done: dict[AgentName, tuple[float, list[LeaseId]]] = {}  # first queued at, leases
        self._next_beat = clock() + heartbeat_s
        self.heartbeats_sent = 0
        self.notices_failed = 0

    def __len__(self) -> int:
        return sum(len(v) for v in self._held.values())

    @property
    def pending_done(self) -> int:
        return sum(len(v[1]) for v in self._done.values())

    def hold(self, source: AgentName, lease_id: LeaseId) -> None:
        """Count one more holder of ``lease_id`` (a held grant or a running job)."""
        leases = self._held.setdefault(source, {})
        leases[lease_id] = leases.get(lease_id, 0) + 1

    def release(self, source: AgentName, lease_id: LeaseId, *, notify: bool = True) -> None:
        """Count one holder less; when none is left, queue a DONE (unless ``notify`` is False:
        the source is gone)."""
        leases = self._held.get(source)
        if leases is not None and lease_id in leases:
            leases[lease_id] -= 1
            if leases[lease_id] > 0:
                return
            del leases[lease_id]
            if not leases:
                del self._held[source]
        if notify:
            self.queue_done(source, lease_id)

    def queue_done(self, source: AgentName, lease_id: LeaseId) -> None:
        first, leases = self._done.get(source, (self._clock(), []))
        leases.append(lease_id)
        self._done[source] = (first, leases)

    def is_held(self, source: AgentName, lease_id: LeaseId) -> bool:
        return lease_id in self._held.get(source, {})

    def tick(self) -> None:
        """Send DONE batches that have waited ``notice_interval_s``, and heartbeats when
        ``heartbeat_s`` has passed since the last round."""
        now = self._clock()
        for source, (first, leases) in list(self._done.items()):
            if now - first >= self._notice_interval_s:
                del self._done[source]
                self._deliver(source, notices.done(leases))
        if now < self._next_beat:
            return
        self._next_beat = now + self._heartbeat_s
        for source, holders in self._held.items():
            if self._deliver(source, notices.heartbeat(sorted(holders))):
                self.heartbeats_sent += 1

    def flush(self) -> None:
        """Send every pending DONE now."""
        done, self._done = self._done, {}
        for source, (_, leases) in done.items():
            self._deliver(source, notices.done(leases))

    def _deliver(self, source: AgentName, message: bytes) -> bool:
        if self._send(source, message):
            return True
        self.notices_failed += 1  # the source is gone or unknown: its leases expire there
        return False
