"""Offload policy: when a block computed in the engine is copied down to the host tier.

Two engine events drive offloading (see :class:`kvbm.manager.block_manager.BlockManager`):

- ``blocks_computed``: the engine finished writing full blocks. ``WRITE_THROUGH`` offloads
  them now; ``ON_EVICTION`` does nothing yet.
- ``blocks_evicting``: the engine is about to drop blocks. Both policies offload the ones not
  stored yet, so ``ON_EVICTION`` copies each block once, as late as possible.

Either way a :class:`FrequencyFilter` can hold back blocks that appeared in fewer than
``min_hits`` looked-up prompts, so one-off suffixes do not push shared prefixes out of G2.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable

from kvbm.ids import BlockHash


class OffloadPolicy(enum.Enum):
    """When engine blocks are offloaded to G2."""

    WRITE_THROUGH = "write_through"
    ON_EVICTION = "on_eviction"


class FrequencyFilter:
    """Counts how many looked-up prompts contained each block hash, in a bounded table.

    The table keeps the ``window`` most recently first-seen hashes; older counts are dropped,
    so a block that stops recurring must earn its hits again. ``min_hits == 0`` disables
    counting entirely (every block passes, and ``note`` costs nothing).
    """

    def __init__(self, min_hits: int, window: int) -> None:
        if min_hits < 0:
            raise ValueError(f"min_hits must be >= 0, got {min_hits}")
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self._min_hits = min_hits
        self._window = window
        self._counts: dict[BlockHash, int] = {}

    @property
    def enabled(self) -> bool:
        return self._min_hits > 0

    def note(self, hashes: Iterable[BlockHash]) -> None:
        """Count one sighting of each hash (call once per looked-up prompt)."""
        if not self._min_hits:
            return
        counts = self._counts
        for h in hashes:
            counts[h] = counts.get(h, 0) + 1
        excess = len(counts) - self._window
        if excess > 0:
            # dicts keep insertion order: the first keys are the oldest first sightings.
            for h in list(_take(counts, excess)):
                del counts[h]

    def passes(self, block_hash: BlockHash) -> bool:
        """Whether the block has been seen often enough to be offloaded."""
        return not self._min_hits or self._counts.get(block_hash, 0) >= self._min_hits


def _take(counts: dict[BlockHash, int], n: int) -> Iterable[BlockHash]:
    it = iter(counts)
    for _ in range(n):
        yield next(it)
