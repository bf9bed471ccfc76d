"""The G2 <-> G3 half of the block manager: demotion to disk and onboarding through G2.

:class:`~kvbm.manager.block_manager.BlockManager` owns one :class:`G3Cascade` when ``g3_dir``
is set and forwards to it; this module holds no state the manager does not hand it.

Demotion (G2 -> G3) follows the offload policy:

- ``WRITE_THROUGH``: every block committed into G2 from G1 is demoted after its commit, in
  batches: one write-through demotion job is in flight at a time, and the blocks committed
  meanwhile wait for the next (a job per engine step cost a disk flush and a wake-up of the
  I/O threads per step, on the cores the forward pass computes on). A block evicted from G2
  before its turn is not demoted.
- ``ON_EVICTION``: a block is demoted when it is about to be evicted from G2, never evicted
  undemoted. Before a store of ``w`` new blocks into G2 that needs ``d`` evictions, the next
  ``d + a`` eviction candidates are examined, where ``a`` is what a second store of ``w``
  blocks would still lack (demotion ahead, a writeback window: by the next store these
  demotions have usually completed, so it finds clean victims). Candidates not in G3 are
  demoted; the store may evict only the clean ones among them (it may then reserve fewer
  blocks: room ran out, as the tier contract allows).

A demoted block keeps a lease on its G2 slot until its G2 -> G3 job completes: it stays readable
in G2 and its slot cannot be reused first. Its G3 slot is reserved (invisible) until then; the
result commits it with the checksum G2 recorded, in one index transaction. Demotion jobs are
queued and handed out by ``take_jobs`` only; they have no ordering constraint against other
jobs (they may run on another transfer engine than the G1 <-> G2 jobs).

Onboarding from G3 to a G1 on a GPU goes through G2 in two jobs, submitted in this order:
G3 -> G2 (promote: G2 slots reserved, G3 leased, bytes verified into G2) and G2 -> G1 (its
``expected_checksums`` are G3's, so a block the first hop failed to deliver is caught again and
never reaches the engine). When the promotion completes, its good blocks are committed in G2
and leased for the second hop, which releases them. The manager counts a promotion's failed
blocks as failed reads of G3, and the second hop's as failed reads of G2 only for blocks the
promotion delivered.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable, Sequence

import numpy as np

from kvbm.burst_log import BurstLog
from kvbm.config import KvbmConfig
from kvbm.ids import BlockHash, JobId, Tier
from kvbm.manager.policy import OffloadPolicy
from kvbm.manager.stats import TierCounters
from kvbm.tiers.disk.index import DiskIndex, DiskIndexError
from kvbm.tiers.slot_index import SlotIndex
from kvbm.transfer.jobs import JobResult, TransferJob


class Kind(enum.Enum):
    """What a pending job does, hence how its result is applied."""

    OFFLOAD = "offload"  # G1 -> G2: commit with the checksums the handler computed
    ONBOARD = "onboard"  # tier -> G1: release leases, discard corrupt blocks
    DEMOTE = "demote"  # G2 -> G3: release G2 leases, commit in G3 with G2's checksums
    PROMOTE = "promote"  # G3 -> G2: release G3 leases, commit in G2 with G3's checksums


@dataclasses.dataclass
class Hop:
    """Links the two jobs of one G3 -> G2 -> G1 onboarding."""

    promoted: frozenset[BlockHash] | None = None  # set when the promotion completes
    leased: tuple[BlockHash, ...] = ()  # G2 leases held for the second hop
    onboarded: bool = False


@dataclasses.dataclass(frozen=True)
class Pending:
    """A planned job awaiting its result. ``tier`` is the tier its stats count for."""

    kind: Kind
    tier: Tier
    hashes: tuple[BlockHash, ...]
    checksums: np.ndarray | None = None  # known checksums to commit with (DEMOTE, PROMOTE)
    hop: Hop | None = None


class G3Cascade:
    """Plans G2 <-> G3 moves and applies their results (see the module docstring)."""

    def __init__(
        self,
        g2: SlotIndex,
        g3: DiskIndex,
        config: KvbmConfig,
        *,
        pending: dict[JobId, Pending],
        counters: dict[Tier, TierCounters],
        new_job_id: Callable[[], JobId],
        block_bytes: int,
        failures: BurstLog,
    ) -> None:
        self._g2 = g2
        self._g3 = g3
        self._policy = config.offload_policy
        self._verify_g2 = config.verify_g2_reads
        self._pending = pending
        self._counters = counters
        self._new_job_id = new_job_id
        self._block_bytes = block_bytes
        self._outbox: list[TransferJob] = []
        self._failures = failures
        self._backlog: dict[BlockHash, None] = {}  # committed under WRITE_THROUGH, to demote next
        self._demotes_in_flight = 0

    def take_jobs(self) -> list[TransferJob]:
        """Demotion jobs planned since the last call, in planning order; the write-through
        backlog becomes one job when no demotion is in flight."""
        if self._backlog and not self._demotes_in_flight:
            backlog, self._backlog = list(self._backlog), {}
            self.demote(backlog)
        jobs, self._outbox = self._outbox, []
        return jobs

    def committed_to_g2(self, hashes: Sequence[BlockHash]) -> None:
        """Blocks just committed into G2 from the engine: under WRITE_THROUGH they join the
        backlog that :meth:`take_jobs` demotes."""
        if self._policy is OffloadPolicy.WRITE_THROUGH:
            self._backlog.update(dict.fromkeys(hashes))

    def g2_evictions(self, hashes: Sequence[BlockHash]) -> int | None:
        """How many G2 blocks a store of ``hashes`` may evict (None: no limit), demoting the
        dirty eviction candidates first under ON_EVICTION (see the module docstring)."""
        if self._policy is not OffloadPolicy.ON_EVICTION:
            return None
        usage = self._g2.usage()
        wanted = len({h for h in hashes if h not in self._g2})  # counts in-flight ones too: safe
        free_after = usage.capacity_blocks - usage.used_blocks - wanted
        deficit = max(0, -free_after)
        ahead = wanted - min(max(free_after, 0), wanted)
        window = self._g2.eviction_candidates(deficit + ahead, exclude=hashes)
        demoted = self.demote([h for h in window if h not in self._g3])
        return len(window) - len(demoted)

    def demote(self, hashes: Sequence[BlockHash]) -> tuple[BlockHash, ...]:
        """Plan G2 -> G3 for the committed G2 blocks among ``hashes`` not in G3 yet, as far as
        G3 has room; returns the hashes planned (now leased in G2)."""
        g2, g3 = self._g2, self._g3
        todo = [h for h in dict.fromkeys(hashes) if h in g2 and h not in g3]
        if not todo:
            return ()
        slots = g2.match_prefix(todo)
        assert len(slots) == len(todo), "committed hashes must match"
        res = g3.prepare_store(todo, g2.tokens(slots))
        if not len(res):
            return ()
        g2_slots = g2.prepare_load(res.hashes)
        sums = g2.checksums(g2_slots)
        job = TransferJob(
            self._new_job_id(),
            Tier.G2,
            Tier.G3,
            g2_slots,
            res.slots,
            res.hashes,
            sums if self._verify_g2 else None,
        )
        self._pending[job.job_id] = Pending(Kind.DEMOTE, Tier.G3, res.hashes, sums)
        self._outbox.append(job)
        self._demotes_in_flight += 1
        return res.hashes

    def onboard_via_g2(
        self, hashes: tuple[BlockHash, ...], tokens: np.ndarray, g1_ids: np.ndarray
    ) -> tuple[list[TransferJob], np.ndarray]:
        """Plan G3 -> G2 -> G1 for committed G3 blocks; returns the two jobs and the positions
        (into ``hashes``) they carry. The others found no G2 slot and stay missing."""
        g2, g3 = self._g2, self._g3
        leased = g3.prepare_load(hashes)  # first: demotions planned below may evict from G3
        res = g2.prepare_store(hashes, tokens, max_evictions=self.g2_evictions(hashes))
        placed = set(res.indices.tolist())
        unplaced = [h for i, h in enumerate(hashes) if i not in placed]
        if unplaced:
            g3.complete_load(unplaced)
        if not len(res):
            return [], np.zeros(0, dtype=np.int64)
        chosen = res.hashes
        g3_slots = leased[res.indices]
        g3.touch(chosen)
        sums = g3.checksums(g3_slots)
        hop = Hop()
        promote = TransferJob(self._new_job_id(), Tier.G3, Tier.G2, g3_slots, res.slots, chosen, sums)
        load = TransferJob(self._new_job_id(), Tier.G2, Tier.G1, res.slots, g1_ids[res.indices], chosen, sums)
        self._pending[promote.job_id] = Pending(Kind.PROMOTE, Tier.G3, chosen, sums, hop)
        self._pending[load.job_id] = Pending(Kind.ONBOARD, Tier.G2, chosen, None, hop)
        return [promote, load], res.indices

    def complete_demote(self, pending: Pending, result: JobResult, ok: np.ndarray, corrupt: np.ndarray) -> None:
        """Apply a G2 -> G3 result (validated by the manager): ``ok`` per position."""
        self._demotes_in_flight -= 1
        g2, g3 = self._g2, self._g3
        hashes = pending.hashes
        g2.complete_load(hashes)
        if len(corrupt):
            g2.discard([hashes[i] for i in corrupt.tolist()])
            self._counters[Tier.G2].checksum_mismatches += len(corrupt)
        assert pending.checksums is not None
        if result.checksums is not None and len(result.checksums) == len(hashes):
            ok &= np.asarray(result.checksums, dtype=np.uint64) == pending.checksums
        good = [h for h, keep in zip(hashes, ok.tolist()) if keep]
        bad = [h for h, keep in zip(hashes, ok.tolist()) if not keep]
        if bad:
            g3.abort_store(bad)
        if good:
            try:
                g3.complete_store(good, pending.checksums[ok])
            except DiskIndexError as exc:  # rolled back: the blocks stay out of G3
                self._counters[Tier.G3].io_errors += len(good)
                self._failures.report(len(good), str(exc))
                return
        counters = self._counters[Tier.G3]
        counters.blocks_offloaded += len(good)
        counters.bytes_offloaded += len(good) * self._block_bytes

    def complete_promote(self, pending: Pending, result: JobResult, ok: np.ndarray, corrupt: np.ndarray) -> int:
        """Apply a G3 -> G2 result; returns how many blocks reached G2."""
        g2, g3 = self._g2, self._g3
        hashes = pending.hashes
        g3.complete_load(hashes)
        if len(corrupt):
            g3.discard([hashes[i] for i in corrupt.tolist()])
            self._counters[Tier.G3].checksum_mismatches += len(corrupt)
        good = tuple(h for h, keep in zip(hashes, ok.tolist()) if keep)
        bad = [h for h, keep in zip(hashes, ok.tolist()) if not keep]
        if bad:
            g2.abort_store(bad)
        if good:
            assert pending.checksums is not None
            g2.complete_store(good, pending.checksums[ok])
        hop = pending.hop
        assert hop is not None
        hop.promoted = frozenset(good)
        if good and not hop.onboarded:
            g2.prepare_load(good)
            hop.leased = good
        return len(good)

    def complete_second_hop(self, pending: Pending, corrupt: np.ndarray) -> list[BlockHash]:
        """Release the G2 leases of a G2 -> G1 hop; returns its corrupt blocks that were
        promoted intact (the others failed in the first hop and were counted there)."""
        hop = pending.hop
        assert hop is not None
        hop.onboarded = True
        if hop.leased:
            self._g2.complete_load(hop.leased)
            hop.leased = ()
        promoted = hop.promoted or frozenset()
        return [pending.hashes[i] for i in corrupt.tolist() if pending.hashes[i] in promoted]

    def promoted(self, pending: Pending) -> np.ndarray:
        """Per block of a G2 -> G1 hop, whether its promotion brought it into G2 (a failure of
        one that did not is the promotion's: G3's read, counted when it completed)."""
        hop = pending.hop
        assert hop is not None
        delivered = hop.promoted or frozenset()
        return np.fromiter((h in delivered for h in pending.hashes), dtype=bool, count=len(pending.hashes))
