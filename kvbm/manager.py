"""Block manager: where each block lives, and the transfer jobs that move blocks between tiers.

Planning is pure bookkeeping; bytes move only when the caller submits the returned jobs to a
:class:`~kvbm.transfer.TransferEngine` (possibly in another process) and hands each
:class:`~kvbm.jobs.JobResult` back to :meth:`BlockManager.complete`. Call order:

    lookup(blocks, start)            -> PrefixMatch   # longest prefix held below the engine
    onboard(blocks, g1_ids)          -> OnboardPlan   # leases the blocks; jobs copy them to G1
    blocks_computed(blocks, g1_ids)  -> [jobs]        # WRITE_THROUGH: offload now
    blocks_evicting(blocks, g1_ids)  -> [jobs]        # either policy: offload what is missing
    complete(result)                                  # commit / roll back / release leases

Between planning and ``complete``: blocks being stored are reserved (never evicted, not yet
visible to lookup) and blocks being onboarded are leased (never evicted). The engine must keep
a store job's source blocks and an onboard job's destination blocks untouched until the job's
result arrives. A failed store is rolled back; a failed or corrupt onboard block is reported
in the result (the engine recomputes it) and a corrupt block is discarded from its tier.

Integrity: a hash hit whose recorded tokens differ from the prompt's is a miss (counted as a
token mismatch). Loads from G2 carry the blocks' checksums when ``verify_g2_reads`` is set.

Tiers are consulted nearest first; today that is G2. A lower tier (G3, peers) plugs in as one
more :class:`~kvbm.tiers.base.TierIndex` in the lookup order and one more handler pair in the
transfer engine; this contract does not change. Not thread-safe: call from one thread.
"""

from __future__ import annotations

import dataclasses
import enum
import itertools
from collections.abc import Callable, Sequence

import numpy as np

from kvbm.config import KvbmConfig
from kvbm.events import EventLog, KvEvent
from kvbm.hashing import HashedBlocks
from kvbm.ids import BlockHash, JobId, Tier
from kvbm.jobs import JobResult, TransferJob
from kvbm.policy import FrequencyFilter, OffloadPolicy
from kvbm.stats import KvbmStats, LatencyWindow, TierCounters, TierStats
from kvbm.tiers.base import TierIndex
from kvbm.tiers.slot_index import SlotIndex


@dataclasses.dataclass(frozen=True)
class PrefixMatch:
    """Result of ``lookup``: the matched blocks ``[start, start + num_blocks)``.

    Attributes:
        start: index of the first block looked up (blocks before it are in the engine).
        tiers: the tier holding each matched block.
        slots: the slot of each matched block in its tier (int64).
        block_size: tokens per block.
    """

    start: int
    tiers: tuple[Tier, ...]
    slots: np.ndarray
    block_size: int

    @property
    def num_blocks(self) -> int:
        return len(self.tiers)

    @property
    def num_tokens(self) -> int:
        return len(self.tiers) * self.block_size


@dataclasses.dataclass(frozen=True)
class OnboardPlan:
    """Result of ``onboard``.

    Attributes:
        jobs: transfer jobs into G1, one per source tier.
        missing_block_ids: engine block ids that nothing will fill (the block left every
            tier since the lookup, or its tokens no longer match); the engine recomputes them.
    """

    jobs: list[TransferJob]
    missing_block_ids: np.ndarray


BlockIds = Sequence[int] | np.ndarray
"""Engine (G1) block ids, one per block, as a list or a 1-D integer array."""


class _Direction(enum.Enum):
    STORE = "store"
    LOAD = "load"


@dataclasses.dataclass(frozen=True)
class _Pending:
    direction: _Direction
    tier: Tier
    hashes: tuple[BlockHash, ...]


class BlockManager:
    """Tracks blocks below the engine and plans their transfers (see the module docstring)."""

    def __init__(
        self,
        config: KvbmConfig,
        *,
        block_size: int,
        block_bytes: int,
        job_ids: Callable[[], int] | None = None,
    ) -> None:
        """Build the tiers named by ``config`` for blocks of ``block_size`` tokens and
        ``block_bytes`` bytes. ``job_ids`` hands out job ids (default 1, 2, 3, ...).

        Raises:
            ValueError: ``block_size`` or ``block_bytes`` is not positive.
            ConfigError: G2's byte capacity cannot hold one block.
            NotImplementedError: ``config`` asks for the G3 disk tier.
        """
        if block_size < 1:
            raise ValueError(f"block_size must be positive, got {block_size}")
        if config.g3_dir is not None:
            raise NotImplementedError("the G3 disk tier (g3_dir) is not implemented yet")
        self._block_size = block_size
        self._block_bytes = block_bytes
        slots = config.g2_slots(block_bytes)
        self._events = EventLog(config.event_buffer)
        self._g2 = SlotIndex(Tier.G2, slots, block_size, self._events)
        self._tiers: tuple[TierIndex, ...] = (self._g2,)
        self._policy = config.offload_policy
        self._filter = FrequencyFilter(config.offload_min_hits, window=max(1024, 4 * slots))
        self._verify = {Tier.G2: config.verify_g2_reads}
        self._counters = {t.tier: TierCounters() for t in self._tiers}
        self._latency = {t.tier: LatencyWindow(config.latency_window) for t in self._tiers}
        self._pending: dict[JobId, _Pending] = {}
        self._job_ids = job_ids or itertools.count(1).__next__

    @property
    def block_size(self) -> int:
        return self._block_size

    @property
    def block_bytes(self) -> int:
        return self._block_bytes

    @property
    def tiers(self) -> tuple[Tier, ...]:
        """The managed tiers in lookup order."""
        return tuple(t.tier for t in self._tiers)

    @property
    def pending_jobs(self) -> int:
        return len(self._pending)

    def lookup(self, blocks: HashedBlocks, start: int = 0) -> PrefixMatch:
        """Longest run of ``blocks[start:]`` held by some tier, and where each block lives.

        Counts one sighting of every block for the offload frequency filter, and hits and
        misses per tier for ``blocks[start:]``. Changes no recency and takes no lease.

        Raises:
            ValueError: wrong block size, or ``start`` outside ``[0, len(blocks)]``.
        """
        self._check_blocks(blocks)
        n = len(blocks)
        if not 0 <= start <= n:
            raise ValueError(f"start must be in [0, {n}], got {start}")
        self._filter.note(blocks.hashes)
        pos, tiers, parts = start, [], []
        while pos < n:
            for index in self._tiers:
                slots = index.match_prefix(blocks.hashes, pos)
                if len(slots):
                    break
            else:
                break
            same = _rows_equal(index.tokens(slots), blocks.tokens[pos : pos + len(slots)])
            agreed = len(slots) if same.all() else int(np.argmin(same))
            tiers += [index.tier] * agreed
            parts.append(slots[:agreed])
            pos += agreed
            if agreed < len(slots):
                self._counters[index.tier].token_mismatches += 1
                break
        asked = n - start
        for index in self._tiers:
            hits = tiers.count(index.tier)
            counters = self._counters[index.tier]
            counters.hits += hits
            counters.misses += asked - hits
            asked -= hits
        slots = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
        return PrefixMatch(start, tuple(tiers), slots, self._block_size)

    def onboard(self, blocks: HashedBlocks, g1_block_ids: BlockIds) -> OnboardPlan:
        """Plan copying ``blocks`` into engine blocks ``g1_block_ids`` (paired by position).

        Leases every block still held whose recorded tokens still match (released by
        ``complete``) and marks it most recently used; the others are returned in
        ``missing_block_ids`` for the engine to recompute.

        Raises:
            ValueError: wrong block size, or ids that are not one non-negative int per block.
        """
        self._check_blocks(blocks)
        ids = _block_ids(g1_block_ids, len(blocks))
        left = np.ones(len(blocks), dtype=bool)
        jobs = []
        for index in self._tiers:
            positions = [i for i in np.flatnonzero(left).tolist() if blocks.hashes[i] in index]
            if not positions:
                continue
            pos = np.array(positions, dtype=np.int64)
            # Every hash here is committed, so the "prefix" is all of them: their slots.
            slots = index.match_prefix([blocks.hashes[i] for i in positions])
            assert len(slots) == len(pos), "committed hashes must match"
            same = _rows_equal(index.tokens(slots), blocks.tokens[pos])
            if not same.all():
                self._counters[index.tier].token_mismatches += int((~same).sum())
                pos = pos[same]
                if not len(pos):
                    continue
            left[pos] = False
            hashes = tuple(blocks.hashes[i] for i in pos.tolist())
            slots = index.prepare_load(hashes)
            index.touch(hashes)
            expected = index.checksums(slots) if self._verify.get(index.tier, True) else None
            job = TransferJob(JobId(self._job_ids()), index.tier, Tier.G1, slots, ids[pos], hashes, expected)
            self._pending[job.job_id] = _Pending(_Direction.LOAD, index.tier, hashes)
            jobs.append(job)
        return OnboardPlan(jobs, ids[left])

    def blocks_computed(self, blocks: HashedBlocks, g1_block_ids: BlockIds) -> list[TransferJob]:
        """The engine finished writing ``blocks`` into ``g1_block_ids``. Under WRITE_THROUGH
        returns the jobs offloading those that pass the filter and are not stored yet.

        Raises:
            ValueError: wrong block size, or ids that are not one non-negative int per block.
        """
        self._check_blocks(blocks)
        ids = _block_ids(g1_block_ids, len(blocks))
        if self._policy is not OffloadPolicy.WRITE_THROUGH:
            return []
        return self._offload(blocks, ids)

    def blocks_evicting(self, blocks: HashedBlocks, g1_block_ids: BlockIds) -> list[TransferJob]:
        """The engine is about to drop ``blocks`` (still intact in ``g1_block_ids``). Returns
        the jobs offloading those that pass the filter and are not stored yet (any policy).

        Raises:
            ValueError: wrong block size, or ids that are not one non-negative int per block.
        """
        self._check_blocks(blocks)
        return self._offload(blocks, _block_ids(g1_block_ids, len(blocks)))

    def complete(self, result: JobResult) -> None:
        """Apply a finished job: commit or roll back stores, release leases, discard corrupt
        blocks, and count it.

        Raises:
            KeyError: ``result`` names no pending job.
            ValueError: ``result`` names positions outside the job, or corrupt positions that
                are not failed ones (nothing changes).
        """
        pending = self._pending[result.job_id]
        n = len(pending.hashes)
        failed = np.asarray(result.failed, dtype=np.int64)
        corrupt = np.asarray(result.corrupt, dtype=np.int64)
        if len(failed) and (int(failed.min()) < 0 or int(failed.max()) >= n):
            raise ValueError(f"job {result.job_id} has {n} blocks; failed positions {failed.tolist()} out of range")
        if not np.isin(corrupt, failed).all():
            raise ValueError(f"job {result.job_id}: corrupt positions must also be failed positions")
        del self._pending[result.job_id]
        index = next(t for t in self._tiers if t.tier is pending.tier)
        counters = self._counters[pending.tier]
        ok = np.ones(n, dtype=bool)
        ok[failed] = False
        storing = pending.direction is _Direction.STORE
        if storing and (result.checksums is None or len(result.checksums) != n):
            ok[:] = False  # a store without its checksums cannot be verified later: fail closed
        good = tuple(h for h, keep in zip(pending.hashes, ok.tolist()) if keep)
        counters.transfers += 1
        counters.transfer_failures += int(not ok.all())
        self._latency[pending.tier].add(result.duration_s)
        if storing:
            bad = tuple(h for h, keep in zip(pending.hashes, ok.tolist()) if not keep)
            if bad:
                index.abort_store(bad)
            if good:
                assert result.checksums is not None
                index.complete_store(good, np.asarray(result.checksums)[ok])
            counters.blocks_offloaded += len(good)
            counters.bytes_offloaded += len(good) * self._block_bytes
            return
        index.complete_load(pending.hashes)
        if len(corrupt):
            index.discard([pending.hashes[i] for i in corrupt.tolist()])
            counters.checksum_mismatches += len(corrupt)
        counters.blocks_onboarded += len(good)
        counters.bytes_onboarded += len(good) * self._block_bytes

    def touch(self, blocks: HashedBlocks) -> None:
        """Mark ``blocks`` most recently used in every tier holding them (e.g. an engine hit)."""
        for index in self._tiers:
            index.touch(blocks.hashes)

    def stats(self) -> KvbmStats:
        """A snapshot of every tier."""
        tiers = []
        for index in self._tiers:
            usage, c, lat = index.usage(), self._counters[index.tier], self._latency[index.tier]
            tiers.append(
                TierStats(
                    tier=index.tier,
                    capacity_blocks=usage.capacity_blocks,
                    capacity_bytes=usage.capacity_blocks * self._block_bytes,
                    used_blocks=usage.used_blocks,
                    pinned_blocks=usage.pinned_blocks,
                    evictions=usage.evictions,
                    latency_count=lat.count,
                    latency_sum_s=lat.total_s,
                    latency_p50_s=lat.quantile(0.5),
                    latency_p99_s=lat.quantile(0.99),
                    **dataclasses.asdict(c),
                )
            )
        return KvbmStats(tuple(tiers), pending_jobs=len(self._pending), events_dropped=self._events.dropped)

    def take_events(self) -> list[KvEvent]:
        """Stored/removed events since the last call, oldest first."""
        return self._events.take()

    def _offload(self, blocks: HashedBlocks, ids: np.ndarray) -> list[TransferJob]:
        hashes, tokens = blocks.hashes, blocks.tokens
        if self._filter.enabled:
            keep = np.array([self._filter.passes(h) for h in hashes], dtype=bool)
            hashes = tuple(h for h, k in zip(hashes, keep.tolist()) if k)
            tokens, ids = tokens[keep], ids[keep]
        reservation = self._g2.prepare_store(hashes, tokens)
        if not len(reservation):
            return []
        src_ids = ids[reservation.indices]
        job = TransferJob(JobId(self._job_ids()), Tier.G1, Tier.G2, src_ids, reservation.slots, reservation.hashes)
        self._pending[job.job_id] = _Pending(_Direction.STORE, Tier.G2, reservation.hashes)
        return [job]

    def _check_blocks(self, blocks: HashedBlocks) -> None:
        if not isinstance(blocks, HashedBlocks):
            raise TypeError(f"expected HashedBlocks, got {type(blocks).__name__}")
        if blocks.block_size != self._block_size:
            raise ValueError(f"blocks of {blocks.block_size} tokens; this manager uses {self._block_size}")


def _rows_equal(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a == b).all(axis=1)


def _block_ids(ids: BlockIds, n: int) -> np.ndarray:
    arr = np.asarray(ids)
    if arr.ndim != 1 or len(arr) != n or (arr.size and arr.dtype.kind not in "iu"):
        raise ValueError(f"expected {n} integer engine block ids, got {arr.dtype} {arr.shape}")
    arr = arr.astype(np.int64, copy=False)
    if arr.size and int(arr.min()) < 0:
        raise ValueError("engine block ids must be non-negative")
    return arr
