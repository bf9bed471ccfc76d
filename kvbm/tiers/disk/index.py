"""G3 control plane: the TierIndex of the disk tier, persisted in LMDB.

The in-memory :class:`~kvbm.tiers.slot_index.SlotIndex` stays the truth for lookups, LRU order,
leases and reservations (so G3 obeys the tier contract exactly as G2 does); LMDB keeps what must
survive a restart, one record per committed block:

    key    block hash (16 bytes)
    value  slot u64 | xxh3_64 checksum u64 | last use u64 | fingerprint digest 16B | tokens int32[block_size]

Writes, and what they cost:

- ``complete_store``: one LMDB transaction, committed without an fsync of its own
  (``sync=False``): the caller is vLLM's scheduler, and a step must not wait for the disk (an
  fsync there cost 0.4 ms idle and 7 ms under load, every step, on the 2-core CI machine). An
  :class:`IndexSyncer` thread flushes the commits of each :data:`INDEX_SYNC_S` interval with
  one ``env.sync`` and at close. A process crash loses nothing (the page cache has it); a
  system crash may lose the last interval's records (those blocks are simply gone from G3)
  or, since LMDB then no longer orders its page writes, leave an index LMDB cannot read: it
  is refused at open, or wiped with ``g3_on_mismatch='wipe'``. A record that does read is
  validated at open and its block verified against its checksum at every read, so neither
  can serve wrong KV. The caller commits only blocks whose bytes are already durable (the
  worker fdatasyncs before it reports success), so a record never names bytes that were not
  on disk first.
- Evictions and touches are not written on their own: they ride in the next transaction (an
  evicted block's record is deleted in the same transaction that commits its slot's next
  block). After a crash a stale record can at worst name a reused slot; its checksum then fails
  and the block is dropped and counted, never served.
- ``discard`` (corrupt bytes) writes at once.

"Last use" is a sequence number, not a wall clock: at startup records are adopted most recent
first, which rebuilds the LRU order. Records that cannot be valid (wrong size, another
fingerprint, a slot out of range or past the end of a truncated slot file, a slot claimed twice)
are deleted and counted in ``dropped_on_open``.

Only the owner process (vLLM's scheduler) opens the index; ``open_directory(owner=True)`` makes a
second owner fail. Not thread-safe, like SlotIndex.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import struct
import threading
from collections.abc import Sequence

import lmdb
import numpy as np

from kvbm.config import G3OnMismatch, KvbmConfig
from kvbm.errors import KvbmError
from kvbm.hashing import TOKEN_DTYPE, LayoutFingerprint
from kvbm.ids import BlockHash, Tier
from kvbm.manager.events import EventLog
from kvbm.tiers.base import StoreReservation, TierIndex, TierUsage
from kvbm.tiers.disk.layout import DiskLayout, G3Directory, G3LayoutError, open_directory
from kvbm.tiers.slot_index import SlotIndex

logger = logging.getLogger(__name__)

_RECORD = struct.Struct("<QQQ16s")
_LAYOUT_KEY = b"layout"
_TOUCH_FLUSH = 65536
"""Pending last-use updates that force a write of their own."""
INDEX_SYNC_S = 0.5
"""The longest an index commit stays in the page cache only (see the module docstring)."""


class DiskIndexError(KvbmError):
    """LMDB could not record a change; the change was rolled back (the message says why)."""


class DiskIndex(TierIndex):
    """TierIndex of G3 over an open directory (which it closes).

    Raises:
        G3LayoutError: a path of the index is a symlink.
        lmdb.Error: the index cannot be opened.
    """

    def __init__(self, directory: G3Directory, events: EventLog) -> None:
        layout = directory.layout
        self._dir = directory
        self._layout = layout
        self._digest = bytes.fromhex(layout.fingerprint)
        self._mem = SlotIndex(Tier.G3, layout.num_slots, layout.block_size, events)
        self._value_size = _RECORD.size + layout.block_size * TOKEN_DTYPE.itemsize
        for path in (directory.index_path, *(os.path.join(directory.index_path, n) for n in ("data.mdb", "lock.mdb"))):
            if os.path.islink(path):  # LMDB opens by path: never let it follow a link out
                raise G3LayoutError(f"G3 index path {path} is a symlink; kvbm does not follow links")
        map_size = max(256 << 20, layout.num_slots * (self._value_size + 64) * 4)
        self._env = lmdb.open(
            directory.index_path,
            map_size=-(-map_size // (1 << 20)) << 20,
            subdir=True,
            max_dbs=2,
            sync=False,
            metasync=False,
            readahead=False,
            meminit=False,
        )
        self._seq = 0
        self._touched: dict[BlockHash, int] = {}
        self._gone: set[BlockHash] = set()
        self._closed = False
        try:
            self._meta = self._env.open_db(b"meta")
            self._db = self._env.open_db(b"blocks")
            self._dropped = self._load()
        except BaseException:
            self._env.close()
            raise
        self._syncer = IndexSyncer(self._env, directory.index_path)
        self._syncer.committed()  # what the load wrote (layout record, dropped records)

    @classmethod
    def open(cls, config: KvbmConfig, fingerprint: LayoutFingerprint, block_bytes: int, events: EventLog) -> DiskIndex:
        """Open (or format) ``config.g3_dir`` as the index owner.

        Raises:
            G3LayoutError: the directory is refused, or owned by another process.
            ConfigError: the capacity cannot hold one block.
        """
        assert config.g3_dir is not None and config.g3_capacity_bytes is not None
        layout = DiskLayout.plan(fingerprint, block_bytes, config.g3_capacity_bytes)
        directory = open_directory(
            config.g3_dir, layout, on_mismatch=config.g3_on_mismatch, owner=True, fingerprint=fingerprint
        )
        try:
            try:
                return cls(directory, events)
            except lmdb.Error as exc:  # e.g. a system crash between two syncs (module docstring)
                _handle_unreadable_index(directory, config, exc)
                return cls(directory, events)
        except BaseException:
            directory.close()
            raise

    @property
    def tier(self) -> Tier:
        return Tier.G3

    @property
    def num_slots(self) -> int:
        return self._mem.num_slots

    @property
    def block_size(self) -> int:
        return self._mem.block_size

    @property
    def path(self) -> str:
        return self._dir.path

    @property
    def dropped_on_open(self) -> int:
        """Records deleted at open because they could not name intact bytes."""
        return self._dropped

    def __contains__(self, block_hash: object) -> bool:
        return block_hash in self._mem

    def __len__(self) -> int:
        return len(self._mem)

    def usage(self) -> TierUsage:
        return self._mem.usage()

    def match_prefix(self, hashes: Sequence[BlockHash], start: int = 0) -> np.ndarray:
        return self._mem.match_prefix(hashes, start)

    def tokens(self, slots: np.ndarray) -> np.ndarray:
        return self._mem.tokens(slots)

    def checksums(self, slots: np.ndarray) -> np.ndarray:
        return self._mem.checksums(slots)

    def eviction_candidates(self, count: int, exclude: Sequence[BlockHash] = ()) -> tuple[BlockHash, ...]:
        return self._mem.eviction_candidates(count, exclude)

    def prepare_store(
        self, hashes: Sequence[BlockHash], tokens: np.ndarray, *, max_evictions: int | None = None
    ) -> StoreReservation:
        res = self._mem.prepare_store(hashes, tokens, max_evictions=max_evictions)
        for h in res.evicted:
            self._gone.add(h)
            self._touched.pop(h, None)
        return res

    def complete_store(self, hashes: Sequence[BlockHash], checksums: np.ndarray) -> None:
        """TierIndex.complete_store, then one durable LMDB transaction for the batch.

        Raises:
            KeyError: a hash is not reserved (nothing changes).
            ValueError: as TierIndex.complete_store.
            DiskIndexError: LMDB failed; the blocks were rolled back (freed, never served).
        """
        self._mem.complete_store(hashes, checksums)
        if not hashes:
            return
        n = len(hashes)
        slots = self._mem.match_prefix(hashes)
        head = np.empty((n, 5), dtype=np.uint64)  # the records, built in bulk (see _RECORD)
        head[:, 0] = slots
        head[:, 1] = checksums
        head[:, 2] = np.arange(self._seq + n, self._seq, -1, dtype=np.uint64)  # earlier = more recent
        head[:, 3:5] = np.frombuffer(self._digest, dtype=np.uint64)
        self._seq += n
        blob = np.concatenate([head.view(np.uint8), self._mem.tokens(slots).view(np.uint8)], axis=1).tobytes()
        size = self._value_size
        puts = [(h, blob[i * size : (i + 1) * size]) for i, h in enumerate(hashes)]
        for h in hashes:
            self._touched.pop(h, None)
        try:
            self._write(puts)
        except lmdb.Error as exc:
            self._mem.discard(hashes)
            raise DiskIndexError(f"G3 index commit failed in {self._dir.path}: {exc}") from exc

    def abort_store(self, hashes: Sequence[BlockHash]) -> None:
        self._mem.abort_store(hashes)

    def prepare_load(self, hashes: Sequence[BlockHash]) -> np.ndarray:
        return self._mem.prepare_load(hashes)

    def complete_load(self, hashes: Sequence[BlockHash]) -> None:
        self._mem.complete_load(hashes)

    def touch(self, hashes: Sequence[BlockHash]) -> None:
        self._mem.touch(hashes)
        present = [h for h in hashes if h in self._mem]
        for h in reversed(present):
            self._seq += 1
            self._touched[h] = self._seq
        if len(self._touched) >= _TOUCH_FLUSH:
            self.flush()

    def discard(self, hashes: Sequence[BlockHash]) -> int:
        present = [h for h in hashes if h in self._mem]
        count = self._mem.discard(hashes)
        self._gone.update(present)
        for h in present:
            self._touched.pop(h, None)
        self.flush()
        return count

    def flush(self) -> bool:
        """Write pending evictions and last-use updates now; False (logged) when LMDB fails,
        in which case they stay pending."""
        if not self._gone and not self._touched:
            return True
        try:
            self._write([])
        except lmdb.Error as exc:
            logger.warning("G3 index %s: could not record evictions and recency (%s)", self._dir.path, exc)
            return False
        return True

    def close(self) -> None:
        """Flush, close LMDB and release the directory. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self.flush()
        finally:
            self._syncer.close()
            self._env.close()
            self._dir.close()

    # --- internals

    def _write(self, puts: list[tuple[BlockHash, bytes]]) -> None:
        """One transaction: delete evicted records, refresh last use, then put ``puts``."""
        with self._env.begin(write=True, db=self._db) as txn:
            for h in self._gone:
                txn.delete(h)
            for h, seq in self._touched.items():
                value = txn.get(h)
                if value is not None and len(value) == self._value_size:
                    txn.put(h, value[:16] + seq.to_bytes(8, "little") + value[24:])
            if puts:
                txn.cursor().putmulti(puts)
        self._syncer.committed()
        self._gone.clear()
        self._touched.clear()

    def _load(self) -> int:
        layout_record = json.dumps(self._layout.to_record(), sort_keys=True).encode()
        with self._env.begin(write=True) as txn:
            stored = txn.get(_LAYOUT_KEY, db=self._meta)
            stale = stored is not None and stored != layout_record
            if stale:
                logger.warning("G3 index %s was written for another layout: its records are dropped", self._dir.path)
            txn.put(_LAYOUT_KEY, layout_record, db=self._meta)
        with self._env.begin(db=self._db) as txn:
            items = list(txn.cursor().iternext(keys=True, values=True))
        keys = [k for k, _ in items]
        values = [v for _, v in items]
        del items
        # Validated in bulk: the per-record Python work is a few C-level passes (map, compress,
        # join), so opening a large tier costs seconds, not minutes (bench/disk.py measures it).
        n = len(keys)
        shaped = np.fromiter(map(len, keys), np.int64, n) == 16
        shaped &= np.fromiter(map(len, values), np.int64, n) == self._value_size
        if stale:
            shaped[:] = False
        at = np.flatnonzero(shaped)
        rows = np.frombuffer(b"".join(itertools.compress(values, shaped)), dtype=np.uint8)
        rows = rows.reshape(len(at), self._value_size)
        head = rows[:, : _RECORD.size].copy().view(np.uint64)  # slot, checksum, last use, digest (2 words)
        slot, last_use = head[:, 0], head[:, 2].astype(np.int64)
        valid = (head[:, 3:5] == np.frombuffer(self._digest, dtype=np.uint64)).all(axis=1)
        valid &= slot < self._layout.num_slots
        valid[valid] = self._intact_slots()[slot[valid].astype(np.int64)]
        cand = np.flatnonzero(valid)
        order = cand[np.lexsort((-last_use[cand], slot[cand]))]
        first = np.ones(len(order), dtype=bool)  # a slot claimed twice: only the newest can be right
        first[1:] = slot[order][1:] != slot[order][:-1]
        keep = order[first]
        keep = keep[np.argsort(-last_use[keep], kind="stable")]  # most recent first
        good = np.zeros(n, dtype=bool)
        good[at[keep]] = True
        bad = list(itertools.compress(keys, ~good))
        if bad:
            logger.warning(
                "G3 index %s: %d records dropped at open (they cannot name intact bytes)", self._dir.path, len(bad)
            )
            with self._env.begin(write=True, db=self._db) as txn:
                for key in bad:
                    txn.delete(key)
        if len(keep):
            hashes = [BlockHash(keys[i]) for i in at[keep].tolist()]
            tokens = rows[keep, _RECORD.size :].copy().view(TOKEN_DTYPE)
            self._mem.adopt(hashes, slot[keep].astype(np.int64), tokens, head[keep, 1].copy())
            self._seq = int(last_use[keep].max())
        return len(bad)

    def _intact_slots(self) -> np.ndarray:
        intact = np.ones(self._layout.num_slots, dtype=bool)
        per_file = self._layout.slots_per_file
        for file_index, valid in self._dir.damaged.items():
            start = file_index * per_file + valid
            intact[start : (file_index + 1) * per_file] = False
        return intact


class IndexSyncer:
    """Flushes an LMDB environment opened with ``sync=False`` from a thread of its own: one
    ``env.sync`` for all the commits of an :data:`INDEX_SYNC_S` interval, none while nothing
    was committed. ``committed`` only sets a flag, so the committing thread never waits."""

    def __init__(self, env: lmdb.Environment, path: str) -> None:
        self._env = env
        self._path = path
        self._dirty = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kvbm-g3-index-sync", daemon=True)
        self._thread.start()

    def committed(self) -> None:
        self._dirty.set()

    def close(self, *, sync: bool = True) -> None:
        """Stops the thread, then flushes what is left (unless ``sync`` is false); call it
        before the environment closes. Idempotent."""
        self._stop.set()
        self._dirty.set()
        self._thread.join()
        if sync:
            self._sync()

    def _run(self) -> None:
        while True:
            self._dirty.wait()
            if self._stop.wait(INDEX_SYNC_S):  # gathers the interval's commits into one fsync
                return
            self._dirty.clear()  # before the sync: a commit from now on gets a sync of its own
            self._sync()

    def _sync(self) -> None:
        try:
            self._env.sync(True)
        except lmdb.Error as exc:  # the records stay in the page cache: lost only on a crash
            logger.warning("G3 index %s: could not flush to disk (%s)", self._path, exc)


def _handle_unreadable_index(directory: G3Directory, config: KvbmConfig, error: lmdb.Error) -> None:
    """An index LMDB cannot read: refused under ``REFUSE``; under ``WIPE`` its files are
    removed (every G3 block is dropped; the slots are reused) so that it opens empty."""
    problem = f"its index cannot be read ({type(error).__name__}: {error})"
    if config.g3_on_mismatch is not G3OnMismatch.WIPE:
        logger.error(
            "G3 directory %s refused, never served from: %s (set g3_on_mismatch='wipe' to reuse it)",
            directory.path,
            problem,
        )
        raise G3LayoutError(
            f"G3 directory {directory.path} refused: {problem}; set g3_on_mismatch='wipe' to reuse it"
        ) from error
    logger.warning("G3 directory %s: its index is wiped, its blocks are dropped: %s", directory.path, problem)
    for name in ("data.mdb", "lock.mdb"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(directory.index_path, name))
