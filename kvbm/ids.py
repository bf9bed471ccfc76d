"""Identifier types shared by every kvbm module.

Every key is an immutable value: a block is named by its chained hash, a job by an integer
handed out by whoever plans it, and a storage level by the :class:`Tier` enum.
Batched paths carry slot and block ids as ``np.ndarray`` of int64; the NewTypes below name
single values.
"""

from __future__ import annotations

import enum
from typing import NewType

BlockHash = NewType("BlockHash", bytes)
"""16-byte xxh3_128 digest naming one full block and, through chaining, its whole prefix."""

SlotId = NewType("SlotId", int)
"""Index of a fixed-size slot inside one tier's storage."""

JobId = NewType("JobId", int)
"""Identifier of one transfer job, unique within the manager that planned it."""


class Tier(enum.Enum):
    """Where a block's bytes live, nearest to the engine first."""

    G1 = "g1"  # engine memory: registered by kvbm, never owned
    G2 = "g2"  # kvbm's host buffer of fixed-size slots
    G3 = "g3"  # local disk slot files with an LMDB index (kvbm.tiers.disk_*)

    @property
    def depth(self) -> int:
        """Distance from the engine: G1 is 0. Orders tiers for stats attribution."""
        return _DEPTH[self]


_DEPTH = {Tier.G1: 0, Tier.G2: 1, Tier.G3: 2}
