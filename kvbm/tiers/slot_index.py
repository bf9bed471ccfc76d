"""In-memory TierIndex: hash → slot map, LRU order, leases, two-phase store.

G2 uses it as is; the disk tier (``kvbm.tiers.disk.index``) wraps it, mirrors commits and
removals into LMDB, and rebuilds it at startup with ``adopt``. Per-slot scalars live in Python lists (cheaper than numpy for one element at a
time); token rows and checksums live in numpy arrays indexed by slot, so batched reads of a
prefix are one fancy-index each.

Eviction walks the LRU order from the oldest committed block and skips leased ones; leased
blocks are normally recent, so the walk is short.
"""

from __future__ import annotations

import collections
import enum
from collections.abc import Sequence

import numpy as np

from kvbm.hashing import TOKEN_DTYPE
from kvbm.ids import BlockHash, Tier
from kvbm.manager.events import BlockRemoved, BlockStored, EventLog
from kvbm.tiers.base import StoreReservation, TierIndex, TierUsage


class _State(enum.Enum):
    FREE = 0
    STORING = 1  # reserved by prepare_store, invisible, never evicted
    READY = 2  # committed, visible, evictable when unleased
    DOOMED = 3  # discarded while leased; freed at the last release


class SlotIndex(TierIndex):
    """TierIndex over ``num_slots`` slots. Not thread-safe: one owner thread calls it."""

    def __init__(self, tier: Tier, num_slots: int, block_size: int, events: EventLog) -> None:
        if num_slots < 1:
            raise ValueError(f"num_slots must be positive, got {num_slots}")
        if block_size < 1:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self._tier = tier
        self._num_slots = num_slots
        self._block_size = block_size
        self._events = events
        self._slot_of: dict[BlockHash, int] = {}  # STORING and READY hashes
        self._ready: dict[BlockHash, int] = {}  # READY hashes only: the lookup fast path
        self._doomed: dict[BlockHash, int] = {}  # DOOMED hashes, until their last lease ends
        self._state: list[_State] = [_State.FREE] * num_slots
        self._leases: list[int] = [0] * num_slots
        self._lru: collections.OrderedDict[BlockHash, None] = collections.OrderedDict()
        # A stack popped from the end: fresh slots come out 0, 1, 2, ... so a batch stored into
        # an empty tier occupies one contiguous run (one slice copy per layer).
        self._free: list[int] = list(range(num_slots - 1, -1, -1))
        self._tokens = np.zeros((num_slots, block_size), dtype=TOKEN_DTYPE)
        self._checksums = np.zeros(num_slots, dtype=np.uint64)
        self._pinned = 0
        self._evictions = 0

    @property
    def tier(self) -> Tier:
        return self._tier

    @property
    def num_slots(self) -> int:
        return self._num_slots

    @property
    def block_size(self) -> int:
        return self._block_size

    def __contains__(self, block_hash: object) -> bool:
        return block_hash in self._ready

    def __len__(self) -> int:
        return len(self._lru)

    def usage(self) -> TierUsage:
        return TierUsage(
            capacity_blocks=self._num_slots,
            used_blocks=self._num_slots - len(self._free),
            pinned_blocks=self._pinned,
            evictions=self._evictions,
        )

    def match_prefix(self, hashes: Sequence[BlockHash], start: int = 0) -> np.ndarray:
        # map(dict.get) and list.index run in C: cheaper than a Python loop that stops at the
        # first miss, even though it also looks up the blocks after it.
        slots = list(map(self._ready.get, hashes[start:] if start else hashes))
        try:
            slots = slots[: slots.index(None)]
        except ValueError:
            pass
        return np.array(slots, dtype=np.int64)

    def tokens(self, slots: np.ndarray) -> np.ndarray:
        return self._tokens[slots]

    def checksums(self, slots: np.ndarray) -> np.ndarray:
        return self._checksums[slots]

    def prepare_store(
        self, hashes: Sequence[BlockHash], tokens: np.ndarray, *, max_evictions: int | None = None
    ) -> StoreReservation:
        """TierIndex.prepare_store; ``max_evictions`` caps the blocks evicted for this call
        (room running out then leaves the tail of the request out, as usual)."""
        if tokens.dtype != TOKEN_DTYPE or tokens.shape != (len(hashes), self._block_size):
            raise ValueError(
                f"tokens must be int32 [{len(hashes)}, {self._block_size}], got {tokens.dtype} {tokens.shape}"
            )
        slot_of, doomed = self._slot_of, self._doomed
        wanted = [i for i, h in enumerate(hashes) if h not in slot_of and h not in doomed]
        if len({hashes[i] for i in wanted}) != len(wanted):  # rare: a hash repeated in one call
            first: dict[BlockHash, int] = {}
            for i in wanted:
                first.setdefault(hashes[i], i)
            wanted = list(first.values())
        need = len(wanted) - len(self._free)
        if max_evictions is not None:
            need = min(need, max_evictions)
        evicted = self._evict(need, protected=set(hashes))
        free, state = self._free, self._state
        wanted = wanted[: len(free)]
        k = len(wanted)
        slots = free[: -k - 1 : -1] if k else []  # the last k free slots, popped in stack order
        del free[len(free) - k :]
        reserved = tuple(hashes[i] for i in wanted)
        slot_of.update(zip(reserved, slots))
        for slot in slots:
            state[slot] = _State.STORING
        self._pinned += k
        slot_arr = np.array(slots, dtype=np.int64)
        index_arr = np.array(wanted, dtype=np.int64)
        if k:
            self._tokens[slot_arr] = tokens[index_arr]
        return StoreReservation(reserved, index_arr, slot_arr, evicted)

    def complete_store(self, hashes: Sequence[BlockHash], checksums: np.ndarray) -> None:
        if len(checksums) != len(hashes):
            raise ValueError(f"{len(checksums)} checksums for {len(hashes)} hashes")
        slots = self._slots_in_state(hashes, _State.STORING, "reserved")
        state = self._state
        for slot in slots:
            state[slot] = _State.READY
        self._ready.update(zip(hashes, slots))
        self._checksums[slots] = checksums
        self._pinned -= len(slots)
        self._lru.update(dict.fromkeys(reversed(hashes)))
        self._events.emit(BlockStored(self._tier, tuple(hashes)))

    def abort_store(self, hashes: Sequence[BlockHash]) -> None:
        slots = self._slots_in_state(hashes, _State.STORING, "reserved")
        for h, slot in zip(hashes, slots):
            del self._slot_of[h]
            self._release_slot(slot)
        self._pinned -= len(slots)

    def prepare_load(self, hashes: Sequence[BlockHash]) -> np.ndarray:
        slots = self._slots_in_state(hashes, _State.READY, "committed")
        leases = self._leases
        for slot in slots:
            if not leases[slot]:
                self._pinned += 1
            leases[slot] += 1
        return np.array(slots, dtype=np.int64)

    def complete_load(self, hashes: Sequence[BlockHash]) -> None:
        leases = self._leases
        slots = []
        wanted: collections.Counter[int] = collections.Counter()
        for h in hashes:
            slot = self._slot_of.get(h, self._doomed.get(h))
            if slot is None or leases[slot] <= wanted[slot]:
                raise ValueError(f"block {h.hex()} holds no lease in {self._tier.name}")
            wanted[slot] += 1
            slots.append(slot)
        for h, slot in zip(hashes, slots):
            leases[slot] -= 1
            if leases[slot]:
                continue
            self._pinned -= 1
            if self._state[slot] is _State.DOOMED:
                del self._doomed[h]
                self._release_slot(slot)

    def touch(self, hashes: Sequence[BlockHash]) -> None:
        lru = self._lru
        for h in reversed(hashes):
            if h in lru:
                lru.move_to_end(h)

    def discard(self, hashes: Sequence[BlockHash]) -> int:
        removed = []
        for h in hashes:
            if h not in self._ready:
                continue
            slot = self._slot_of.pop(h)
            del self._ready[h]
            del self._lru[h]
            if self._leases[slot]:
                self._state[slot] = _State.DOOMED
                self._doomed[h] = slot
            else:
                self._release_slot(slot)
            removed.append(h)
        self._events.emit(BlockRemoved(self._tier, tuple(removed)))
        return len(removed)

    def eviction_candidates(self, count: int, exclude: Sequence[BlockHash] = ()) -> tuple[BlockHash, ...]:
        """The next ``count`` blocks ``prepare_store`` would evict (oldest first), skipping
        leased blocks and ``exclude`` (the hashes of the request to be stored). Pure query."""
        return tuple(self._victims(count, set(exclude)))

    def adopt(self, hashes: Sequence[BlockHash], slots: np.ndarray, tokens: np.ndarray, checksums: np.ndarray) -> None:
        """Commit blocks straight into the given free slots (a persistent tier reloading its
        index); earlier hashes rank as more recently used, as everywhere. Emits BlockStored.

        Raises:
            ValueError: lengths differ, a slot is out of range or not free, or a hash is
                already known or repeated (nothing is adopted then).
        """
        n = len(hashes)
        slot_list = np.asarray(slots, dtype=np.int64).tolist()
        if len(slot_list) != n or len(checksums) != n or tokens.shape != (n, self._block_size):
            raise ValueError(f"adopt needs {n} slots, checksums and token rows of {self._block_size}")
        if len(set(hashes)) != n or len(set(slot_list)) != n:
            raise ValueError("adopted hashes and slots must be distinct")
        state, free = self._state, _State.FREE
        taken = [s for s in slot_list if not 0 <= s < self._num_slots or state[s] is not free]
        if taken:
            raise ValueError(f"slot {taken[0]} is not a free slot of {self._tier.name}")
        if not self._slot_of.keys().isdisjoint(hashes) or not self._doomed.keys().isdisjoint(hashes):
            raise ValueError(f"a block to adopt is already in {self._tier.name}")
        chosen = set(slot_list)
        self._free = [s for s in self._free if s not in chosen]
        for slot in slot_list:
            state[slot] = _State.READY
        self._slot_of.update(zip(hashes, slot_list))
        self._ready.update(zip(hashes, slot_list))
        if n:
            self._tokens[slot_list] = tokens
            self._checksums[slot_list] = checksums
        self._lru.update(dict.fromkeys(reversed(hashes)))
        self._events.emit(BlockStored(self._tier, tuple(hashes)))

    def _victims(self, count: int, protected: set[BlockHash]) -> list[BlockHash]:
        if count <= 0:
            return []
        leases, slot_of = self._leases, self._slot_of
        victims = []
        for h in self._lru:
            if not leases[slot_of[h]] and h not in protected:
                victims.append(h)
                if len(victims) == count:
                    break
        return victims

    def _evict(self, count: int, protected: set[BlockHash]) -> tuple[BlockHash, ...]:
        victims = self._victims(count, protected)
        if not victims:
            return ()
        for h in victims:
            del self._lru[h]
            del self._ready[h]
            self._release_slot(self._slot_of.pop(h))
        self._evictions += len(victims)
        self._events.emit(BlockRemoved(self._tier, tuple(victims)))
        return tuple(victims)

    def _release_slot(self, slot: int) -> None:
        self._state[slot] = _State.FREE
        self._free.append(slot)

    def _slots_in_state(self, hashes: Sequence[BlockHash], expected: _State, word: str) -> list[int]:
        if expected is _State.STORING and len(set(hashes)) != len(hashes):
            raise ValueError("hashes to commit or abort must be distinct")
        slot_of, state = self._slot_of, self._state
        slots = []
        for h in hashes:
            slot = slot_of.get(h)
            if slot is None or state[slot] is not expected:
                raise KeyError(f"block {h.hex()} is not {word} in {self._tier.name}")
            slots.append(slot)
        return slots
