"""Block manager: where each block lives, and the transfer jobs that move blocks between tiers.

Planning is pure bookkeeping; bytes move only when the caller submits the returned jobs to a
:class:`~kvbm.transfer.engine.TransferEngine` (possibly in another process) and hands each
:class:`~kvbm.transfer.jobs.JobResult` back to :meth:`BlockManager.complete`. Call order:

    lookup(blocks, start)            -> PrefixMatch   # longest prefix held below the engine
    onboard(blocks, g1_ids)          -> OnboardPlan   # leases the blocks; jobs copy them to G1
    blocks_computed(blocks, g1_ids)  -> [jobs]        # WRITE_THROUGH: offload now
    blocks_evicting(blocks, g1_ids)  -> [jobs]        # either policy: offload what is missing
    take_jobs()                      -> [jobs]        # G2 -> G3 demotions planned on its own
    complete(result)                                  # commit / roll back / release leases

Between planning and ``complete``: blocks being stored are reserved (never evicted, not yet
visible to lookup) and blocks being onboarded are leased (never evicted). The engine must keep
a store job's source blocks and an onboard job's destination blocks untouched until the job's
result arrives. A failed store is rolled back; a failed or corrupt onboard block is reported
in the result (the engine recomputes it) and a corrupt block is discarded from its tier. A
block that fails to read (I/O error, not corrupt) stays, unless it failed its previous read
too: then it is discarded (``dropped_after_read_errors``), else every lookup would offer it and
every onboard fail it again. Read failures are remembered per tier and block hash across jobs
(a good read forgets them; at most ``READ_FAILURE_MEMORY`` blocks per tier, oldest forgotten).
Submit every list of jobs in its order (the transfer engine runs jobs in submission order).

Integrity: a hash hit whose recorded tokens differ from the prompt's is a miss (counted as a
token mismatch). Loads from G2 carry the blocks' checksums when ``verify_g2_reads`` is set;
loads from G3 always do.

Tiers are consulted nearest first: G2, then G3 when ``g3_dir`` is set. G3
(``kvbm.tiers.disk.cascade``) is fed by demotion from G2 under the offload policy. Demotion
jobs belong to no request: the manager plans them itself (when a G1 -> G2 store commits, or
before G2 must evict) and hands them out only through ``take_jobs``, which the caller drains
every step; each holds a G2 lease until its result comes back, so it has no ordering constraint
against other jobs. Onboarding from G3 goes straight to G1 when G1 is host memory
(``g1_on_host``), else G3 -> G2 -> G1 as two jobs in one plan, to be submitted in order to one
engine. Not thread-safe: call from one thread. ``close`` flushes and releases G3's index.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable

import numpy as np

from kvbm.burst_log import BurstLog
from kvbm.config import KvbmConfig
from kvbm.hashing import HashedBlocks, LayoutFingerprint
from kvbm.ids import JobId, Tier
from kvbm.manager.events import EventLog, KvEvent
from kvbm.manager.plans import BlockIds, OnboardPlan, PrefixMatch, block_ids, rows_equal
from kvbm.manager.policy import FrequencyFilter, OffloadPolicy
from kvbm.manager.stats import KvbmStats, LatencyWindow, TierCounters, TierStats
from kvbm.tiers.base import TierIndex
from kvbm.tiers.disk.cascade import G3Cascade, Kind, Pending
from kvbm.tiers.disk.index import DiskIndex
from kvbm.tiers.disk.read_failures import READS_BEFORE_DROP, ReadFailures
from kvbm.tiers.slot_index import SlotIndex
from kvbm.transfer.jobs import JobResult, TransferJob

logger = logging.getLogger(__name__)

__all__ = ["BlockIds", "BlockManager", "OnboardPlan", "PrefixMatch"]


class BlockManager:
    """Tracks blocks below the engine and plans their transfers (see the module docstring)."""

    def __init__(
        self,
        config: KvbmConfig,
        *,
        block_size: int,
        block_bytes: int,
        job_ids: Callable[[], int] | None = None,
        fingerprint: LayoutFingerprint | None = None,
        g1_on_host: bool = True,
    ) -> None:
        """Build the tiers named by ``config`` for blocks of ``block_size`` tokens and
        ``block_bytes`` bytes. ``job_ids`` hands out job ids (default 1, 2, 3, ...).

        Args:
            fingerprint: the engine's layout; required when ``config.g3_dir`` is set (a G3
                directory written under another fingerprint is never served from).
            g1_on_host: G1 is host memory, so G3 blocks onboard straight into it; set False
                for a GPU engine (G3 -> G2 -> G1).

        Raises:
            ValueError: ``block_size`` or ``block_bytes`` is not positive; ``g3_dir`` without a
                ``fingerprint``, or one for another block size.
            ConfigError: G2's or G3's byte capacity cannot hold one block.
            G3LayoutError: the G3 directory is refused or owned by another process.
        """
        if block_size < 1:
            raise ValueError(f"block_size must be positive, got {block_size}")
        if config.g3_dir is not None:
            if fingerprint is None:
                raise ValueError(
                    "config.g3_dir is set: pass BlockManager(..., fingerprint=LayoutFingerprint(...)) "
                    "so the G3 directory can be checked against the engine's layout"
                )
            if fingerprint.block_size != block_size:
                raise ValueError(f"fingerprint.block_size {fingerprint.block_size} != block_size {block_size}")
        self._block_size = block_size
        self._block_bytes = block_bytes
        slots = config.g2_slots(block_bytes)
        self._events = EventLog(config.event_buffer)
        self._g2 = SlotIndex(Tier.G2, slots, block_size, self._events)
        self._g3: DiskIndex | None = None
        if config.g3_dir is not None:
            assert fingerprint is not None
            self._g3 = DiskIndex.open(config, fingerprint, block_bytes, self._events)
        self._tiers: tuple[TierIndex, ...] = (self._g2,) if self._g3 is None else (self._g2, self._g3)
        self._policy = config.offload_policy
        self._filter = FrequencyFilter(config.offload_min_hits, window=max(1024, 4 * slots))
        self._verify = {Tier.G2: config.verify_g2_reads}
        self._g1_on_host = g1_on_host
        self._counters = {t.tier: TierCounters() for t in self._tiers}
        self._read_failures = {t.tier: ReadFailures() for t in self._tiers}
        self._latency = {t.tier: LatencyWindow(config.latency_window) for t in self._tiers}
        self._pending: dict[JobId, Pending] = {}
        self._job_ids = job_ids or itertools.count(1).__next__
        self._failures = BurstLog(logger, "kvbm transfer failures")
        self._drops = BurstLog(logger, "kvbm blocks dropped as unreadable")  # a dying disk drops many
        self._cascade: G3Cascade | None = None
        if self._g3 is not None:
            self._counters[Tier.G3].dropped_on_open = self._g3.dropped_on_open
            self._cascade = G3Cascade(
                self._g2,
                self._g3,
                config,
                pending=self._pending,
                counters=self._counters,
                new_job_id=self._new_job_id,
                block_bytes=block_bytes,
                failures=self._failures,
            )

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

    def lookup(self, blocks: HashedBlocks, start: int = 0, count: bool = True) -> PrefixMatch:
        """Longest run of ``blocks[start:]`` held by some tier, and where each block lives.

        Counts one sighting of every block for the offload frequency filter, and hits and
        misses per tier for ``blocks[start:]``, unless ``count`` is False (the same prompt
        asked again: vLLM re-asks for a waiting request every step until it runs). Changes
        no recency and takes no lease.

        Raises:
            ValueError: wrong block size, or ``start`` outside ``[0, len(blocks)]``.
        """
        self._check_blocks(blocks)
        n = len(blocks)
        if not 0 <= start <= n:
            raise ValueError(f"start must be in [0, {n}], got {start}")
        if count:
            self._filter.note(blocks.hashes)
        pos, tiers, parts = start, [], []
        while pos < n:
            for depth, index in enumerate(self._tiers):  # noqa: B007 (read after the break)
                slots = index.match_prefix(blocks.hashes, pos)
                if len(slots):
                    break
            else:
                break
            if depth:  # end the run where a nearer tier takes over
                nearer = self._tiers[:depth]
                run = blocks.hashes[pos : pos + len(slots)]
                cut = next((i for i, h in enumerate(run) if any(h in t for t in nearer)), len(run))
                slots = slots[:cut]
            same = rows_equal(index.tokens(slots), blocks.tokens[pos : pos + len(slots)])
            agreed = len(slots) if same.all() else int(np.argmin(same))
            tiers += [index.tier] * agreed
            parts.append(slots[:agreed])
            pos += agreed
            if agreed < len(slots):
                if count:
                    self._counters[index.tier].token_mismatches += 1
                break
        if count:
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
        ids = block_ids(g1_block_ids, len(blocks))
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
            same = rows_equal(index.tokens(slots), blocks.tokens[pos])
            if not same.all():
                self._counters[index.tier].token_mismatches += int((~same).sum())
                pos = pos[same]
                if not len(pos):
                    continue
            hashes = tuple(blocks.hashes[i] for i in pos.tolist())
            if index.tier is Tier.G3 and not self._g1_on_host:
                assert self._cascade is not None
                hop_jobs, carried = self._cascade.onboard_via_g2(hashes, blocks.tokens[pos], ids[pos])
                left[pos[carried]] = False
                jobs += hop_jobs
                continue
            left[pos] = False
            slots = index.prepare_load(hashes)
            index.touch(hashes)
            expected = index.checksums(slots) if self._verify.get(index.tier, True) else None
            job = TransferJob(self._new_job_id(), index.tier, Tier.G1, slots, ids[pos], hashes, expected)
            self._pending[job.job_id] = Pending(Kind.ONBOARD, index.tier, hashes)
            jobs.append(job)
        return OnboardPlan(jobs, ids[left])

    def blocks_computed(self, blocks: HashedBlocks, g1_block_ids: BlockIds) -> list[TransferJob]:
        """The engine finished writing ``blocks`` into ``g1_block_ids``. Under WRITE_THROUGH
        returns the jobs offloading those that pass the filter and are not stored yet.

        Raises:
            ValueError: wrong block size, or ids that are not one non-negative int per block.
        """
        self._check_blocks(blocks)
        ids = block_ids(g1_block_ids, len(blocks))
        if self._policy is not OffloadPolicy.WRITE_THROUGH:
            return []
        return self._offload(blocks, ids)

    def blocks_evicting(self, blocks: HashedBlocks, g1_block_ids: BlockIds) -> list[TransferJob]:
        """The engine is about to drop ``blocks`` (still intact in ``g1_block_ids``). Returns
        the jobs offloading those that pass the filter and are not stored yet (any policy).
        With G3 under ON_EVICTION this may also queue demotions for ``take_jobs``.

        Raises:
            ValueError: wrong block size, or ids that are not one non-negative int per block.
        """
        self._check_blocks(blocks)
        return self._offload(blocks, block_ids(g1_block_ids, len(blocks)))

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
        counters = self._counters[pending.tier]
        ok = np.ones(n, dtype=bool)
        ok[failed] = False
        if pending.kind is Kind.OFFLOAD and (result.checksums is None or len(result.checksums) != n):
            ok[:] = False  # a store without its checksums cannot be verified later: fail closed
        counters.transfers += 1
        counters.transfer_failures += int(not ok.all())
        counters.io_errors += int((~ok).sum()) - len(corrupt)
        self._latency[pending.tier].add(result.duration_s)
        if not ok.all():
            self._failures.report(int((~ok).sum()), f"{pending.kind.value} via {pending.tier.name}: {result.reason}")
        if pending.kind is Kind.OFFLOAD:
            self._complete_offload(pending, result, ok)
        elif pending.kind is Kind.ONBOARD:
            self._complete_onboard(pending, ok, corrupt)
            self._note_reads(pending, ok, corrupt)
        elif pending.kind is Kind.DEMOTE:
            assert self._cascade is not None
            self._cascade.complete_demote(pending, result, ok, corrupt)
        else:
            assert self._cascade is not None
            moved = self._cascade.complete_promote(pending, result, ok, corrupt)
            counters.blocks_onboarded += moved
            counters.bytes_onboarded += moved * self._block_bytes
            self._note_reads(pending, ok, corrupt)  # the G3 -> G2 hop reads G3

    def take_jobs(self) -> list[TransferJob]:
        """Jobs the manager planned on its own since the last call: G2 -> G3 demotions, in
        planning order. Call every step and submit them; complete their results like any
        other. Each holds a G2 lease until its result comes back, so a caller that never
        drains them leaves G2 filling up with leased blocks. Empty without G3."""
        return self._cascade.take_jobs() if self._cascade is not None else []

    def close(self) -> None:
        """Flush G3's index (recency, evictions) and release its directory. Idempotent; the
        manager must not be used afterwards when it has a G3 tier."""
        if self._g3 is not None:
            self._g3.close()

    def __enter__(self) -> BlockManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def touch(self, blocks: HashedBlocks) -> None:
        """Mark ``blocks`` most recently used in every tier holding them (e.g. an engine hit)."""
        for index in self._tiers:
            index.touch(blocks.hashes)

    def stats(self) -> KvbmStats:
        """A snapshot of every tier."""
        tiers = [
            TierStats.snapshot(
                index.tier, index.usage(), self._counters[index.tier], self._latency[index.tier], self._block_bytes
            )
            for index in self._tiers
        ]
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
        limit = self._cascade.g2_evictions(hashes) if self._cascade is not None else None
        reservation = self._g2.prepare_store(hashes, tokens, max_evictions=limit)
        if not len(reservation):
            return []
        src_ids = ids[reservation.indices]
        job = TransferJob(self._new_job_id(), Tier.G1, Tier.G2, src_ids, reservation.slots, reservation.hashes)
        self._pending[job.job_id] = Pending(Kind.OFFLOAD, Tier.G2, reservation.hashes)
        return [job]

    def _complete_offload(self, pending: Pending, result: JobResult, ok: np.ndarray) -> None:
        good = tuple(h for h, keep in zip(pending.hashes, ok.tolist()) if keep)
        bad = tuple(h for h, keep in zip(pending.hashes, ok.tolist()) if not keep)
        if bad:
            self._g2.abort_store(bad)
        if good:
            assert result.checksums is not None
            self._g2.complete_store(good, np.asarray(result.checksums)[ok])
        counters = self._counters[Tier.G2]
        counters.blocks_offloaded += len(good)
        counters.bytes_offloaded += len(good) * self._block_bytes
        if self._cascade is not None:
            self._cascade.committed_to_g2(good)

    def _complete_onboard(self, pending: Pending, ok: np.ndarray, corrupt: np.ndarray) -> None:
        index = self._index(pending.tier)
        counters = self._counters[pending.tier]
        if pending.hop is None:
            index.complete_load(pending.hashes)
            bad = [pending.hashes[i] for i in corrupt.tolist()]
        else:  # the G2 -> G1 hop of a G3 onboarding
            assert self._cascade is not None
            bad = self._cascade.complete_second_hop(pending, corrupt)
        if bad:
            index.discard(bad)
            counters.checksum_mismatches += len(bad)
        good = int(ok.sum())
        counters.blocks_onboarded += good
        counters.bytes_onboarded += good * self._block_bytes

    def _note_reads(self, pending: Pending, ok: np.ndarray, corrupt: np.ndarray) -> None:
        """Count the read failures of a job reading ``pending.tier`` (its corrupt blocks are
        discarded already) and discard the blocks that failed their previous read too: a
        persistent I/O error would otherwise fail the same lookup again forever."""
        failed = ~ok
        failed[corrupt] = False
        if pending.hop is not None and pending.kind is Kind.ONBOARD and failed.any():
            assert self._cascade is not None
            failed &= self._cascade.promoted(pending)  # the others never reached G2
        unreadable = self._read_failures[pending.tier].record(pending.hashes, failed)
        if unreadable:
            dropped = self._index(pending.tier).discard(unreadable)
            self._counters[pending.tier].dropped_after_read_errors += dropped
            if dropped:
                self._drops.report(dropped, f"{pending.tier.name}: {READS_BEFORE_DROP} failed reads in a row")

    def _index(self, tier: Tier) -> TierIndex:
        return next(t for t in self._tiers if t.tier is tier)

    def _new_job_id(self) -> JobId:
        return JobId(self._job_ids())

    def _check_blocks(self, blocks: HashedBlocks) -> None:
        if not isinstance(blocks, HashedBlocks):
            raise TypeError(f"expected HashedBlocks, got {type(blocks).__name__}")
        if blocks.block_size != self._block_size:
            raise ValueError(f"blocks of {blocks.block_size} tokens; this manager uses {self._block_size}")
