"""Transfer handlers for the G3 disk tier: the worker's half of G3.

``disk_handlers`` opens ``config.g3_dir``'s slot files (as a user; the scheduler's
:class:`~kvbm.manager.block_manager.BlockManager` owns the index) and returns handlers for

- (G2, G3) demotion: G2 slots written straight from the host buffer, then one fdatasync per
  file touched; the job succeeds only for blocks whose bytes are durable, so the manager's
  index commit (on the successful result) never names bytes that are not on disk;
- (G3, G2) promotion: slots read straight into G2 rows, then each verified against
  ``job.expected_checksums``; a mismatch or a short read is reported corrupt, and the G2 slot
  (still only reserved) is never made visible;
- (G3, G1) onboarding, when G1 is host memory: slots read into a staging ring, verified, and
  only the good blocks scattered into the engine's blocks. Reading chunk k+1 overlaps with
  verifying and scattering chunk k.

I/O errors fail only the blocks they hit (``HandlerOutcome.failed`` with the errno); the
store logs them once per burst. Handlers run on a transfer engine's thread; the store's pool
does the I/O. The handlers may be shared by several engines (e.g. a load engine and a store
engine): the store takes batches from any thread, and the G3 -> G1 staging ring is locked.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Iterable, Iterator, Mapping

import numpy as np

from kvbm.config import KvbmConfig
from kvbm.hashing import LayoutFingerprint
from kvbm.ids import Tier
from kvbm.integrity import checksum_rows, mismatched
from kvbm.layout import EngineKV
from kvbm.tiers.disk.layout import DiskLayout, open_directory
from kvbm.tiers.disk.store import DiskSlotStore, IoBatch, IoOutcome
from kvbm.tiers.host import HostBuffer
from kvbm.transfer.blockcopy import scatter_blocks
from kvbm.transfer.engine import TransferHandler
from kvbm.transfer.jobs import HandlerOutcome, TransferJob

_READ_CHUNK_BYTES = 32 << 20  # one verified chunk: 8 pool tasks, so 4 reads stay in flight
_EMPTY = np.zeros(0, dtype=np.int64)


class DiskHandlers(Mapping[tuple[Tier, Tier], TransferHandler]):
    """The G3 handlers, keyed by (src, dst) like ``host_handlers``; ``close`` releases the files.

    Merge with the host handlers: ``TransferEngine({**host_handlers(g1, g2), **disk})`` (into
    each engine when loads and stores run on separate ones); close the engines first, then this.
    """

    def __init__(self, store: DiskSlotStore, handlers: dict[tuple[Tier, Tier], TransferHandler]) -> None:
        self._store = store
        self._handlers = handlers

    @property
    def store(self) -> DiskSlotStore:
        return self._store

    def __getitem__(self, key: tuple[Tier, Tier]) -> TransferHandler:
        return self._handlers[key]

    def __iter__(self) -> Iterator[tuple[Tier, Tier]]:
        return iter(self._handlers)

    def __len__(self) -> int:
        return len(self._handlers)

    def close(self) -> None:
        self._store.close()

    def __enter__(self) -> DiskHandlers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def disk_handlers(
    config: KvbmConfig,
    g2: HostBuffer,
    g1: EngineKV | None = None,
    *,
    fingerprint: LayoutFingerprint,
    staging_bytes: int = 2 * _READ_CHUNK_BYTES,
) -> DiskHandlers:
    """Open the G3 slot files named by ``config`` and build the G3 handlers.

    (G3, G1) is included when ``g1`` is given and lives in host memory; with G1 on a GPU the
    manager (``g1_on_host=False``) plans G3 -> G2 -> G1 instead.

    Raises:
        ValueError: ``config`` has no ``g3_dir``, or G1's block size differs from G2's.
        G3LayoutError: the directory is refused (another layout under REFUSE, or in use).
        ConfigError: the capacity cannot hold one block.
    """
    if config.g3_dir is None or config.g3_capacity_bytes is None:
        raise ValueError("config has no G3 tier (set g3_dir and g3_capacity_bytes)")
    if g1 is not None and g1.layout.block_bytes != g2.block_bytes:
        raise ValueError(f"G1 blocks of {g1.layout.block_bytes} bytes do not fit G2 slots of {g2.block_bytes}")
    layout = DiskLayout.plan(fingerprint, g2.block_bytes, config.g3_capacity_bytes)
    directory = open_directory(
        config.g3_dir, layout, on_mismatch=config.g3_on_mismatch, owner=False, fingerprint=fingerprint
    )
    try:
        store = DiskSlotStore(directory, direct_io=config.g3_direct_io, io_threads=config.g3_io_threads)
    except BaseException:
        directory.close()
        raise
    handlers: dict[tuple[Tier, Tier], TransferHandler] = {
        (Tier.G2, Tier.G3): DemoteHandler(store, g2),
        (Tier.G3, Tier.G2): PromoteHandler(store, g2),
    }
    if g1 is not None and not g1.is_cuda:
        handlers[(Tier.G3, Tier.G1)] = DiskLoadHandler(store, g1, staging_bytes=staging_bytes)
    return DiskHandlers(store, handlers)


class DemoteHandler(TransferHandler):
    """G2 → G3. With ``expected_checksums`` the G2 bytes are verified first (corrupt ones are
    not written) and the checksums are returned; without them none are computed (the manager
    already holds G2's)."""

    def __init__(self, store: DiskSlotStore, g2: HostBuffer) -> None:
        self._store = store
        self._rows = g2.rows

    def run(self, job: TransferJob) -> HandlerOutcome:
        src, dst, expected = job.src_ids, job.dst_ids, job.expected_checksums
        positions = np.arange(job.num_blocks, dtype=np.int64)
        corrupt = _EMPTY
        if expected is not None:
            corrupt = mismatched(self._rows, src, expected)
            if len(corrupt):
                positions = np.setdiff1d(positions, corrupt)
        io = self._store.write_rows(dst[positions], self._rows, src[positions])
        return HandlerOutcome(checksums=expected, corrupt=corrupt, failed=positions[io.failed], reason=io.error)


class PromoteHandler(TransferHandler):
    """G3 → G2: read into the reserved G2 slots, verify each against its recorded checksum."""

    def __init__(self, store: DiskSlotStore, g2: HostBuffer) -> None:
        self._store = store
        self._rows = g2.rows
        self._chunk = max(1, _READ_CHUNK_BYTES // g2.block_bytes)

    def run(self, job: TransferJob) -> HandlerOutcome:
        src, dst, expected = job.src_ids, job.dst_ids, job.expected_checksums
        batches: list[tuple[int, IoBatch]] = []
        try:
            for a in range(0, job.num_blocks, self._chunk):
                batches.append(
                    (a, self._store.submit_read(src[a : a + self._chunk], self._rows, dst[a : a + self._chunk]))
                )
        except BaseException:
            _settle(b for _, b in batches)  # no read may land after the job has failed
            raise
        failed, corrupt, reason = [], [], None
        for a, batch in batches:
            io = batch.wait()  # later chunks keep reading while this one is verified
            batch_slots = dst[a : a + self._chunk]
            ok = _readable(io, len(batch_slots))
            failed.append(io.failed + a)
            reason = reason or io.error
            bad = io.short
            if expected is not None:
                good = np.flatnonzero(ok)
                bad = np.union1d(bad, good[mismatched(self._rows, batch_slots[good], expected[a + good])])
            corrupt.append(bad + a)
        sums = expected if expected is not None else checksum_rows(self._rows, dst)
        return HandlerOutcome(checksums=sums, corrupt=_cat(corrupt), failed=_cat(failed), reason=reason)


class DiskLoadHandler(TransferHandler):
    """G3 → G1 (host memory): read chunks into a two-buffer staging ring, verify, scatter the
    good blocks into the engine's layers. Blocks that fail are never written to G1."""

    def __init__(self, store: DiskSlotStore, g1: EngineKV, *, staging_bytes: int) -> None:
        block_bytes = g1.layout.block_bytes
        self._store = store
        self._layers = g1.layer_arrays()
        self._offsets = g1.layout.offsets
        self._chunk = max(1, staging_bytes // 2 // block_bytes)
        # HostBuffer: page aligned, so O_DIRECT reads land in it without a bounce.
        self._ring = [HostBuffer(self._chunk, block_bytes).rows for _ in range(2)]
        self._lock = threading.Lock()  # one job at a time owns the ring

    def run(self, job: TransferJob) -> HandlerOutcome:
        with self._lock:
            return self._run(job)

    def _run(self, job: TransferJob) -> HandlerOutcome:
        in_flight: collections.deque[tuple[int, np.ndarray, IoBatch]] = collections.deque()
        failed: list[np.ndarray] = []
        corrupt: list[np.ndarray] = []
        reasons: list[str] = []
        try:
            for k, a in enumerate(range(0, job.num_blocks, self._chunk)):
                if len(in_flight) == len(self._ring):
                    self._finish(job, *in_flight.popleft(), failed, corrupt, reasons)
                part = job.src_ids[a : a + self._chunk]
                rows = self._ring[k % len(self._ring)]
                in_flight.append((a, rows, self._store.submit_read(part, rows, np.arange(len(part), dtype=np.int64))))
            while in_flight:
                self._finish(job, *in_flight.popleft(), failed, corrupt, reasons)
        except BaseException:
            _settle(b for _, _, b in in_flight)  # the ring is reused: no read may land later
            raise
        return HandlerOutcome(corrupt=_cat(corrupt), failed=_cat(failed), reason=next(iter(reasons), None))

    def _finish(
        self,
        job: TransferJob,
        a: int,
        rows: np.ndarray,
        batch: IoBatch,
        failed: list[np.ndarray],
        corrupt: list[np.ndarray],
        reasons: list[str],
    ) -> None:
        io = batch.wait()
        n = min(self._chunk, job.num_blocks - a)
        good = np.flatnonzero(_readable(io, n))
        bad = io.short
        if job.expected_checksums is not None and len(good):
            wrong = mismatched(rows, good, job.expected_checksums[a + good])
            bad = np.union1d(bad, good[wrong])
            good = np.delete(good, wrong)
        scatter_blocks(rows, good, self._layers, self._offsets, job.dst_ids[a + good])
        failed.append(io.failed + a)
        corrupt.append(bad + a)
        if io.error:
            reasons.append(io.error)


def _settle(batches: Iterable[IoBatch]) -> None:
    for batch in batches:
        batch.wait()


def _readable(io: IoOutcome, n: int) -> np.ndarray:
    ok = np.ones(n, dtype=bool)
    ok[io.failed] = False
    ok[io.short] = False
    return ok


def _cat(parts: list[np.ndarray]) -> np.ndarray:
    parts = [p for p in parts if len(p)]
    return np.sort(np.concatenate(parts)).astype(np.int64) if parts else _EMPTY
