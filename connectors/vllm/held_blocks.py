"""Prefill side of a handoff: finished requests' engine blocks, held for decode workers.

A prefill request sent with ``do_remote_decode`` ends in the step that computes the rest of
its prompt (the router asks for one token). In that step, after the forward pass, the worker
*grants* the prompt's blocks (:meth:`hold` with the grant's ``lease_id``): one lease, checksums
of the blocks as written, and the grant travels to the decode inside the request's
``kv_transfer_params``, so the decode reads at once with nothing to ask for. vLLM keeps the
blocks (``request_finished`` answered True) until the worker reports the request in
``finished_sending``, which it does once the hold ended: when the lease ends (the decode's DONE
notice, or a release of the lease, or no heartbeat for ``lease_s``, or a revoke when the
request did not finish with a handoff). A leased hold is never served by hash: its blocks may
belong to a request that was aborted, and vLLM may have reused them already.

A request that ends in a later step than its prompt (a client asking for more tokens, or a
grant that failed) is held *by hash* instead, from the next step: a decode then asks the side
channel for the blocks by hash; the remote endpoint pins them here (:meth:`pin`, a
:class:`~kvbm.remote.BlockPinner`) and leases them until the reader is done. Such a hold ends
once it was read (its lease ended, or the reader said it had the blocks already:
:meth:`release`) or ``hold_s`` passed without a reader, and no lease still pins its blocks.

Threads: ``pin``/``unpin``/``wait_ready`` run on the remote endpoint's threads (side channel,
progress), ``hold``/``take_ended`` on the worker's; one condition guards everything.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Sequence

import numpy as np

from kvbm.ids import BlockHash, Tier
from kvbm.remote import Lease, LeaseEnd, PinnedBlocks


_ENDED_AS: dict[LeaseEnd | None, str] = {
    LeaseEnd.RELEASED: "read",
    LeaseEnd.EXPIRED: "unclaimed",
    LeaseEnd.REVOKED: "revoked",
}


@dataclasses.dataclass
class _Hold:
    hashes: tuple[BlockHash, ...]
    block_ids: tuple[int, ...]
    deadline: float
    read: bool = False
    lease_id: int | None = None  # a granted hold: it ends exactly when this lease ends
    lease_end: LeaseEnd | None = None  # how that lease ended


@dataclasses.dataclass(frozen=True)
class HoldCounters:
    held: int = 0  # requests whose blocks were held
    granted: int = 0  # of those, held under a grant that travelled in the request
    read: int = 0  # holds that ended after a decode read them (or said it had them)
    unclaimed: int = 0  # holds that ended at hold_s, or at their lease's expiry, with no reader
    revoked: int = 0  # granted holds withdrawn: their request did not end with a handoff
    holding: int = 0  # holds not ended yet


class HeldBlocks:
    """Engine blocks held for remote readers (see the module docstring)."""

    def __init__(self, hold_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._hold_s = hold_s
        self._clock = clock
        self._cond = threading.Condition()
        self._holds: dict[str, _Hold] = {}
        self._where: dict[BlockHash, dict[int, int]] = {}  # hash -> {block id: holds naming it}
        self._pins: dict[int, int] = {}  # block id -> leases pinning it
        self._by_lease: dict[int, str] = {}  # a granted hold's lease -> its request
        self._counts = {"held": 0, "granted": 0, "read": 0, "unclaimed": 0, "revoked": 0}

    def hold(
        self, req_id: str, hashes: Sequence[BlockHash], block_ids: Sequence[int], lease_id: int | None = None
    ) -> None:
        """Keep ``block_ids`` (holding ``hashes``, in order) for readers of request ``req_id``:
        for the reader of lease ``lease_id`` (a grant), or else for readers asking by hash."""
        if len(hashes) != len(block_ids):
            raise ValueError(f"{len(hashes)} hashes for {len(block_ids)} blocks")
        with self._cond:
            if req_id in self._holds:
                raise ValueError(f"request {req_id} is already held")
            self._holds[req_id] = _Hold(
                tuple(hashes), tuple(block_ids), self._clock() + self._hold_s, lease_id=lease_id
            )
            self._counts["held"] += 1
            if lease_id is not None:
                self._by_lease[lease_id] = req_id
                self._counts["granted"] += 1
                return
            for h, b in zip(hashes, block_ids):
                ids = self._where.setdefault(h, {})
                ids[b] = ids.get(b, 0) + 1
            self._cond.notify_all()

    def is_held(self, req_id: str) -> bool:
        with self._cond:
            return req_id in self._holds

    def take_ended(self) -> set[str]:
        """Requests whose holds ended since the last call: vLLM may free their blocks now."""
        now = self._clock()
        ended: set[str] = set()
        with self._cond:
            for req_id, hold in list(self._holds.items()):
                if hold.lease_id is not None:
                    if not hold.read:
                        continue  # its lease has not ended: a reader may be reading
                elif not (hold.read or now >= hold.deadline) or any(self._pins.get(b) for b in hold.block_ids):
                    continue
                self._counts[_ENDED_AS.get(hold.lease_end, "read") if hold.read else "unclaimed"] += 1
                del self._holds[req_id]
                if hold.lease_id is None:
                    self._unindex(hold)
                ended.add(req_id)
        return ended

    def _unindex(self, hold: _Hold) -> None:
        for h, b in zip(hold.hashes, hold.block_ids):
            ids = self._where[h]
            ids[b] -= 1
            if not ids[b]:
                del ids[b]
            if not ids:
                del self._where[h]

    def counters(self) -> HoldCounters:
        with self._cond:
            return HoldCounters(holding=len(self._holds), **self._counts)

    # -- BlockPinner -------------------------------------------------------------------------

    def wait_ready(self, hashes: Sequence[BlockHash], timeout_s: float) -> None:
        with self._cond:
            self._cond.wait_for(lambda: hashes[0] in self._where, timeout_s)

    def pin(self, hashes: Sequence[BlockHash]) -> PinnedBlocks | None:
        with self._cond:
            found: list[int] = []
            for h in hashes:
                ids = self._where.get(h)
                if not ids:
                    break
                found.append(next(iter(ids)))
            if not found:
                return None
            for b in found:
                self._pins[b] = self._pins.get(b, 0) + 1
            return PinnedBlocks(Tier.G1, np.asarray(found, dtype=np.int64))

    def unpin(self, lease: Lease, how: LeaseEnd) -> None:
        with self._cond:
            req_id = self._by_lease.pop(lease.lease_id, None)
            if req_id is not None:
                # A granted hold's lease ended (read, released, expired or revoked). Its
                # reader counts as done however it ended: a reader that went quiet, or a
                # hold revoked for want of a handoff, reads nothing more.
                hold = self._holds[req_id]
                hold.read, hold.lease_end = True, how
                return
            for b in lease.block_ids.tolist():
                left = self._pins.get(b, 0) - 1
                if left > 0:
                    self._pins[b] = left
                else:  # a background thread must not die on a lease it never pinned
                    self._pins.pop(b, None)
            # The reader is finished with this request (done, dead or cut off): its hold
            # need not wait for hold_s.
            self._mark_read(lease.hashes)

    def release(self, hashes: Sequence[BlockHash]) -> int:
        with self._cond:
            return self._mark_read(hashes)

    def _mark_read(self, hashes: Sequence[BlockHash]) -> int:
        """Mark the oldest unread hold ending in one of ``hashes`` as read; returns 1 or 0."""
        if hashes:
            for hold in self._holds.values():
                # A granted hold is released through its lease (BlockSource.release_hashes).
                if not hold.read and hold.lease_id is None and hold.hashes[-1] in hashes:
                    hold.read = True
                    return 1
        return 0
