"""The tier contract: what the manager needs from any storage level below the engine.

A tier has two halves that may live in different processes (vLLM's scheduler and worker):

- :class:`TierIndex` — the control plane. Which hash lives in which slot, the tokens and
  checksum recorded with it, LRU order, leases, eviction. Pure bookkeeping, no bytes.
- :class:`SlotStore` — the data plane. ``num_slots`` fixed-size slots of ``block_bytes``
  bytes, read and written in batches.

Call order on a TierIndex, and what is protected in between:

    prepare_store(hashes, tokens)  -> StoreReservation  # slots reserved; evicts LRU blocks
        ... bytes are copied into reservation.slots (a transfer job) ...
    complete_store(hashes, checksums) | abort_store(hashes)
        # commit: blocks become visible to match_prefix, most recent first
        # abort: slots go back to the free list, nothing was visible

    match_prefix(hashes, start) -> slots                # pure query
    prepare_load(hashes) -> slots                       # lease: never evicted until released
        ... bytes are copied out of the slots ...
    complete_load(hashes)                               # release one lease each

A block being stored or leased is never evicted; ``used_blocks`` never exceeds
``num_slots``; running out of room makes ``prepare_store`` reserve fewer blocks than asked
(a return value, not an error). Misuse (loading an absent block, committing an unreserved
one, releasing an unleased one) raises ``KeyError``/``ValueError`` and changes nothing.

Recency rule: within one call, earlier hashes rank as more recently used than later ones —
a prompt's first blocks are shared by the most requests, so they are evicted last.

Every implementation runs the contract suite in ``tests/core/test_tier_contract.py`` by
adding its factory there.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Sequence

import numpy as np

from kvbm.ids import BlockHash, Tier


@dataclasses.dataclass(frozen=True)
class StoreReservation:
    """Result of ``prepare_store``.

    Attributes:
        hashes: the hashes reserved, in request order (already-present and duplicate hashes
            are skipped; when room runs out, the tail of the request is left out).
        indices: position of each reserved hash in the request, to pair it with its source.
        slots: the slot reserved for each hash (int64).
        evicted: hashes evicted to make room, least recently used first.
    """

    hashes: tuple[BlockHash, ...]
    indices: np.ndarray
    slots: np.ndarray
    evicted: tuple[BlockHash, ...]

    def __len__(self) -> int:
        return len(self.hashes)


@dataclasses.dataclass(frozen=True)
class TierUsage:
    """Occupancy of one tier. ``used`` counts committed and in-flight stores."""

    capacity_blocks: int
    used_blocks: int
    pinned_blocks: int
    evictions: int


class TierIndex(abc.ABC):
    """Control plane of one tier (see the module docstring for the call order)."""

    @property
    @abc.abstractmethod
    def tier(self) -> Tier: ...

    @property
    @abc.abstractmethod
    def num_slots(self) -> int: ...

    @property
    @abc.abstractmethod
    def block_size(self) -> int:
        """Tokens per block, the width of the recorded token rows."""

    @abc.abstractmethod
    def __contains__(self, block_hash: object) -> bool:
        """Whether ``block_hash`` is committed (visible to lookups)."""

    @abc.abstractmethod
    def __len__(self) -> int:
        """Number of committed blocks."""

    @abc.abstractmethod
    def usage(self) -> TierUsage: ...

    @abc.abstractmethod
    def match_prefix(self, hashes: Sequence[BlockHash], start: int = 0) -> np.ndarray:
        """Slots of the longest run of committed hashes beginning at ``hashes[start]``."""

    @abc.abstractmethod
    def tokens(self, slots: np.ndarray) -> np.ndarray:
        """Token rows recorded with committed ``slots`` (a copy, ``[len, block_size]`` int32)."""

    @abc.abstractmethod
    def checksums(self, slots: np.ndarray) -> np.ndarray:
        """Checksums recorded with committed ``slots`` (a copy, uint64)."""

    @abc.abstractmethod
    def prepare_store(self, hashes: Sequence[BlockHash], tokens: np.ndarray) -> StoreReservation:
        """Reserve slots for the hashes not stored yet, evicting LRU unprotected blocks.

        Raises:
            ValueError: ``tokens`` is not ``[len(hashes), block_size]`` int32.
        """

    @abc.abstractmethod
    def complete_store(self, hashes: Sequence[BlockHash], checksums: np.ndarray) -> None:
        """Commit reserved hashes with their checksums; they become visible, most recent first.

        Raises:
            KeyError: a hash is not reserved (nothing is committed then).
        """

    @abc.abstractmethod
    def abort_store(self, hashes: Sequence[BlockHash]) -> None:
        """Roll back reserved hashes: their slots are freed, nothing was ever visible.

        Raises:
            KeyError: a hash is not reserved (nothing is rolled back then).
        """

    @abc.abstractmethod
    def prepare_load(self, hashes: Sequence[BlockHash]) -> np.ndarray:
        """Lease committed hashes (protect them from eviction) and return their slots.

        Raises:
            KeyError: a hash is not committed (no lease is taken then).
        """

    @abc.abstractmethod
    def complete_load(self, hashes: Sequence[BlockHash]) -> None:
        """Release one lease per hash.

        Raises:
            ValueError: a hash holds no lease (nothing is released then).
        """

    @abc.abstractmethod
    def touch(self, hashes: Sequence[BlockHash]) -> None:
        """Mark committed hashes most recently used (earlier ones more recent); others are ignored."""

    @abc.abstractmethod
    def discard(self, hashes: Sequence[BlockHash]) -> int:
        """Make committed hashes invisible now (e.g. corrupt bytes); a leased block's slot is
        freed when its last lease is released. Returns how many were discarded."""


class SlotStore(abc.ABC):
    """Data plane of one tier: ``num_slots`` slots of ``block_bytes`` bytes."""

    @property
    @abc.abstractmethod
    def num_slots(self) -> int: ...

    @property
    @abc.abstractmethod
    def block_bytes(self) -> int: ...

    @abc.abstractmethod
    def write(self, slots: np.ndarray, src: np.ndarray) -> None:
        """Copy row ``i`` of ``src`` (``[len(slots), block_bytes]`` uint8) into ``slots[i]``.

        Raises:
            ValueError: shapes or dtypes do not match, or a slot is out of range.
        """

    @abc.abstractmethod
    def read_into(self, slots: np.ndarray, out: np.ndarray) -> None:
        """Copy ``slots[i]`` into row ``i`` of ``out`` (``[len(slots), block_bytes]`` uint8).

        Raises:
            ValueError: shapes or dtypes do not match, or a slot is out of range.
        """

    @abc.abstractmethod
    def checksums(self, slots: np.ndarray) -> np.ndarray:
        """xxh3_64 of each slot's bytes (uint64)."""
