"""The serving side of a worker: grants leased blocks to readers and hears their notices.

Two ways to grant:

- ``grant(tier, block_ids, ...)`` — the owner already holds the blocks (a prefill keeps a
  finished request's blocks) and hands the :class:`~kvbm.remote.metadata.BlockGrant` to the
  reader inside its own request (``kv_transfer_params``). Called on the owner thread.
- ``grant_hashes(reader, hashes)`` — a reader asks over the side channel for blocks by hash
  (peer fetch); the :class:`BlockPinner` pins the longest prefix it holds. Called on the side
  channel's thread.

Either way the grant carries the checksum of every block (given by the caller, or computed
from the registered memory), and the lease ends exactly once through ``BlockPinner.unpin``:
released by the readers' DONE notices, expired (no heartbeat within ``lease_s``), or revoked
(``revoke``, ``close``). Every method takes one lock, so ``pin`` and ``unpin`` never run
concurrently; they run on whichever thread called in: the side channel's (``pin``), the
worker's progress thread or owner thread (``unpin`` from ``handle_notifications``/``expire``).
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

import numpy as np

from kvbm.ids import BlockHash, Tier
from kvbm.remote import notices
from kvbm.remote.leases import Lease, LeaseCounters, LeaseEnd, LeaseTable
from kvbm.remote.local import LocalTier
from kvbm.remote.metadata import AgentName, BlockGrant, LeaseId


@dataclasses.dataclass(frozen=True, eq=False)
class PinnedBlocks:
    """Blocks a pinner found and pinned: the first ``len(block_ids)`` of the hashes asked for.

    ``checksums`` is ``None`` when the source should compute them from its memory.
    """

    tier: Tier
    block_ids: np.ndarray
    checksums: np.ndarray | None = None


class BlockPinner(Protocol):
    """The block manager's side of leases (the connector implements it over the manager)."""

    def pin(self, hashes: Sequence[BlockHash]) -> PinnedBlocks | None:
        """Pin the longest prefix of ``hashes`` held in one servable tier; None if none."""

    def unpin(self, lease: Lease, how: LeaseEnd) -> None:
        """The lease ended: its blocks may be evicted or reused again."""

    def release(self, hashes: Sequence[BlockHash]) -> int:
        """A reader will not read the held blocks ending in one of ``hashes``: free them
        without waiting for their hold to run out. Returns how many holds ended."""

    def wait_ready(self, hashes: Sequence[BlockHash], timeout_s: float) -> None:
        """Wait (at most ``timeout_s``, outside the source's lock) until ``hashes[0]`` may be
        pinned. A reader can ask before the owner has handed the blocks over (a prefill's
        reply reaches the decode before its worker hears the hold): waiting here turns that
        race into a short delay instead of a miss."""


class NoPinner:
    """For a source whose blocks are pinned by its owner: serves no hashes, unpins nothing."""

    def pin(self, hashes: Sequence[BlockHash]) -> PinnedBlocks | None:
        return None

    def release(self, hashes: Sequence[BlockHash]) -> int:
        return 0

    def wait_ready(self, hashes: Sequence[BlockHash], timeout_s: float) -> None:
        return None

    def unpin(self, lease: Lease, how: LeaseEnd) -> None:
        return None


class BlockSource:
    """Leases and grants of one worker incarnation (see the module docstring)."""

    def __init__(
        self,
        agent: AgentName,
        tiers: Mapping[Tier, LocalTier],
        *,
        lease_s: float,
        clock: Callable[[], float],
        pinner: BlockPinner | None = None,
        lease_ids: Callable[[], int] | None = None,
        ready_timeout_s: float = 1.0,
    ) -> None:
        self._agent = agent
        self._ready_timeout_s = ready_timeout_s
        self._tiers = tiers
        self._pinner = pinner or NoPinner()
        self._lock = threading.Lock()
        self._leases = LeaseTable(lease_s=lease_s, clock=clock, on_end=self._pinner.unpin, lease_ids=lease_ids)
        self.side_channel: str | None = None

    def grant(
        self,
        tier: Tier,
        block_ids: Sequence[int] | np.ndarray,
        hashes: Sequence[BlockHash] = (),
        *,
        checksums: np.ndarray | None = None,
        readers: int = 1,
        reader: AgentName | None = None,
    ) -> BlockGrant:
        """Lease blocks the caller holds, for ``readers`` readers (``reader``: only that agent).

        Raises:
            KeyError: ``tier`` is not registered.
            ValueError: ids out of range, or hashes/checksums of the wrong length.
        """
        local = self._tiers[tier]
        ids = np.asarray(block_ids, dtype=np.int64).reshape(-1)
        sums = local.checksums(ids) if checksums is None else np.asarray(checksums, dtype=np.uint64)
        if len(sums) != len(ids):
            raise ValueError(f"{len(sums)} checksums for {len(ids)} blocks")
        with self._lock:
            lease = self._leases.add(tier, ids, tuple(hashes), readers=readers, reader=reader)
        return self._grant_of(lease, sums)

    def grant_hashes(self, reader: AgentName, hashes: Sequence[BlockHash]) -> BlockGrant | None:
        """Pin and lease the longest prefix of ``hashes`` this worker holds, for ``reader``.

        Returns ``None`` when it holds none of them.
        """
        if hashes:
            self._pinner.wait_ready(hashes, self._ready_timeout_s)
        with self._lock:
            pinned = self._pinner.pin(hashes)
            if pinned is None or not len(pinned.block_ids):
                return None
            n = len(pinned.block_ids)
            lease = self._leases.add(pinned.tier, pinned.block_ids, tuple(hashes[:n]), reader=reader)
        try:
            sums = pinned.checksums
            if sums is None:
                sums = self._tiers[pinned.tier].checksums(lease.block_ids)
        except Exception:
            # A pinner answering with a tier we cannot read must not leak its pins.
            self.revoke(lease.lease_id)
            raise
        return self._grant_of(lease, sums)

    def release_hashes(self, hashes: Sequence[BlockHash], lease_id: int | None = None, agent: str | None = None) -> int:
        """A reader gives up blocks held for it by their owner: the lease ``lease_id`` when
        given (it must end in one of ``hashes`` and, with ``agent``, be this incarnation's: a
        stray id or one from before a restart frees nothing), else by hash (see
        ``BlockPinner.release``). Returns how many holds ended."""
        with self._lock:
            if lease_id is None:
                return self._pinner.release(hashes)
            if agent is not None and agent != self._agent:
                return 0
            lease = self._leases.get(LeaseId(lease_id))
            if lease is None or not lease.hashes or lease.hashes[-1] not in hashes:
                return 0
            self._leases.release(lease.lease_id)
            return 1

    def revoke(self, lease_id: int) -> None:
        """End a lease now as REVOKED (the owner withdraws it); unknown ids are ignored."""
        with self._lock:
            self._leases.revoke(LeaseId(lease_id))

    def handle_notifications(self, notifs: Mapping[str, list[bytes]]) -> int:
        """Apply readers' DONE/HEARTBEAT notices; returns how many kvbm notices were seen."""
        seen = 0
        with self._lock:
            for sender, messages in notifs.items():
                for message in messages:
                    notice = notices.parse(message)
                    if notice is not None:
                        self._leases.notice(sender, notice)
                        seen += 1
        return seen

    def expire(self) -> list[Lease]:
        """End leases whose readers went quiet."""
        with self._lock:
            return self._leases.expire()

    def counters(self) -> LeaseCounters:
        with self._lock:
            return self._leases.counters()

    def expires_at(self, lease_id: int) -> float:
        """Raises KeyError: no such lease."""
        with self._lock:
            return self._leases.expires_at(LeaseId(lease_id))

    def close(self) -> None:
        """Revoke every lease."""
        with self._lock:
            self._leases.revoke_all()

    def _grant_of(self, lease: Lease, checksums: np.ndarray) -> BlockGrant:
        return BlockGrant(
            source=self._agent,
            lease_id=lease.lease_id,
            tier=lease.tier,
            block_ids=lease.block_ids,
            checksums=checksums,
            hashes=lease.hashes,
            lease_s=self._leases.lease_s,
            side_channel=self.side_channel,
        )
