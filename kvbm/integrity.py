"""Checksums of block bytes: xxh3_64 of each slot, computed and verified in batches.

xxh3_64 is the fastest checksum the card's dependencies offer (about the speed of a scattered
copy on our machines). The python-xxhash binding holds the GIL while hashing, so a 256 KiB block
holds it for tens of microseconds; the per-block loop here is the only Python work per block
on the data path, and ``bench/transfer.py`` reports its share.
"""

from __future__ import annotations

import numpy as np
from xxhash import xxh3_64_intdigest


def checksum_rows(rows: np.ndarray, index: np.ndarray) -> np.ndarray:
    """xxh3_64 of ``rows[i]`` for each ``i`` in ``index`` (rows: C-contiguous 2-D uint8)."""
    return np.fromiter((xxh3_64_intdigest(rows[i]) for i in index.tolist()), dtype=np.uint64, count=len(index))


def mismatched(rows: np.ndarray, index: np.ndarray, expected: np.ndarray) -> np.ndarray:
    """Positions ``j`` where ``checksum(rows[index[j]]) != expected[j]`` (int64)."""
    return np.flatnonzero(checksum_rows(rows, index) != expected).astype(np.int64)
