"""The plans the block manager returns: what a lookup found and what an onboarding moves.

They live apart from :mod:`kvbm.manager.block_manager` only to keep that module small;
import them from either (``block_manager`` re-exports them).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from kvbm.ids import Tier
from kvbm.transfer.jobs import TransferJob


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


def rows_equal(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a == b).all(axis=1)


def block_ids(ids: BlockIds, n: int) -> np.ndarray:
    arr = np.asarray(ids)
    if arr.ndim != 1 or len(arr) != n or (arr.size and arr.dtype.kind not in "iu"):
        raise ValueError(f"expected {n} integer engine block ids, got {arr.dtype} {arr.shape}")
    arr = arr.astype(np.int64, copy=False)
    if arr.size and int(arr.min()) < 0:
        raise ValueError("engine block ids must be non-negative")
    return arr
