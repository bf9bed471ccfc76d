"""Prefill side of a handoff: finished requests' engine blocks, held for decode workers.

When a prefill request finishes with ``do_remote_decode``, vLLM keeps its blocks (the
connector answered ``request_finished`` with True) and the scheduler tells the worker to hold
them. A decode worker then asks the side channel for the blocks by hash; the remote endpoint
pins them here (:meth:`pin`, a :class:`~kvbm.remote.BlockPinner`) and leases them until the
reader is done. A hold ends, and vLLM may free the blocks, once it was read (its lease
ended, or the reader said it had the blocks already: :meth:`release`) or ``hold_s`` passed
without a reader, and no lease still pins any of its blocks.

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


@dataclasses.dataclass
class _Hold:
    hashes: tuple[BlockHash, ...]
    block_ids: tuple[int, ...]
    deadline: float
    read: bool = False


@dataclasses.dataclass(frozen=True)
class HoldCounters:
    held: int = 0  # requests whose blocks were held
    read: int = 0  # holds that ended after a decode read them
    unclaimed: int = 0  # holds that ended at hold_s with no reader
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
        self._counts = {"held": 0, "read": 0, "unclaimed": 0}

    def hold(self, req_id: str, hashes: Sequence[BlockHash], block_ids: Sequence[int]) -> None:
        """Keep ``block_ids`` (holding ``hashes``, in order) for readers of request ``req_id``."""
        if len(hashes) != len(block_ids):
            raise ValueError(f"{len(hashes)} hashes for {len(block_ids)} blocks")
        with self._cond:
            if req_id in self._holds:
                raise ValueError(f"request {req_id} is already held")
            self._holds[req_id] = _Hold(tuple(hashes), tuple(block_ids), self._clock() + self._hold_s)
            for h, b in zip(hashes, block_ids):
                ids = self._where.setdefault(h, {})
                ids[b] = ids.get(b, 0) + 1
            self._counts["held"] += 1
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
                if not (hold.read or now >= hold.deadline) or any(self._pins.get(b) for b in hold.block_ids):
                    continue
                self._counts["read" if hold.read else "unclaimed"] += 1
                del self._holds[req_id]
                for h, b in zip(hold.hashes, hold.block_ids):
                    ids = self._where[h]
                    ids[b] -= 1
                    if not ids[b]:
                        del ids[b]
                    if not ids:
                        del self._where[h]
                ended.add(req_id)
        return ended

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
            for b in lease.block_ids.tolist():
                left = self._pins[b] - 1
                if left:
                    self._pins[b] = left
                else:
                    del self._pins[b]
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
                if not hold.read and hold.hashes[-1] in hashes:
                    hold.read = True
                    return 1
        return 0
