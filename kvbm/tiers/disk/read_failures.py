"""Read failures per block: which blocks of a tier keep failing to read.

A block whose bytes cannot be read (an I/O error, not a checksum mismatch: corrupt blocks are
discarded at once) may be a transient fault, so one failure keeps it. A block that fails
``READS_BEFORE_DROP`` reads in a row is unreadable: its tier drops it, or every lookup would
offer it and every onboard fail it again, forever.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence

import numpy as np

from kvbm.ids import BlockHash

READS_BEFORE_DROP = 2  # failed reads in a row that make a block unreadable
READ_FAILURE_MEMORY = 4096  # blocks per tier whose failed reads are remembered


class ReadFailures:
    """Failed reads in a row per block hash of one tier, for at most ``limit`` blocks (the
    oldest failure is forgotten first, so blocks that left the tier cannot pile up)."""

    def __init__(self, limit: int = READ_FAILURE_MEMORY) -> None:
        self._counts: collections.OrderedDict[BlockHash, int] = collections.OrderedDict()
        self._limit = limit

    def record(self, hashes: Sequence[BlockHash], failed: np.ndarray) -> list[BlockHash]:
        """Note one read of each of ``hashes`` (``failed[i]``: block ``i`` failed it); returns
        the blocks that have now failed ``READS_BEFORE_DROP`` in a row, forgotten here."""
        bad = [hashes[i] for i in np.flatnonzero(failed).tolist()]
        if self._counts:  # set operations: no Python loop over a job's good blocks
            for h in self._counts.keys() & set(hashes).difference(bad):
                del self._counts[h]
        unreadable = []
        for h in bad:
            count = self._counts.pop(h, 0) + 1
            if count >= READS_BEFORE_DROP:
                unreadable.append(h)
            else:
                self._counts[h] = count  # (re)inserted last: the most recent failure
        while len(self._counts) > self._limit:
            self._counts.popitem(last=False)
        return unreadable
