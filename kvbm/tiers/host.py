"""G2 data plane: one kvbm-owned host buffer of fixed-size slots.

Slot ``i`` is bytes ``[i * block_bytes, (i + 1) * block_bytes)`` of one contiguous, page-aligned
uint8 buffer, so the whole tier is a single memory region (``address``, ``nbytes``) that NIXL
can register once, and a peer can address slot ``i`` at ``address + slot_offset(i)``.

With CUDA engines the buffer is pinned (``torch.empty(..., pin_memory=True)``) so device copies
are asynchronous DMA; otherwise it is an anonymous mmap (page aligned, zero-filled lazily, huge
pages advised where the kernel allows).
"""

from __future__ import annotations

import mmap
from typing import Any

import numpy as np

from kvbm.integrity import checksum_rows
from kvbm.tiers.base import SlotStore
from kvbm.transfer.blockcopy import copy_rows


class HostBuffer(SlotStore):
    """``num_slots`` slots of ``block_bytes`` bytes in one buffer.

    Raises:
        ValueError: ``num_slots`` or ``block_bytes`` is not positive.
    """

    def __init__(self, num_slots: int, block_bytes: int, *, pinned: bool = False) -> None:
        if num_slots < 1:
            raise ValueError(f"num_slots must be positive, got {num_slots}")
        if block_bytes < 1:
            raise ValueError(f"block_bytes must be positive, got {block_bytes}")
        self._num_slots = num_slots
        self._block_bytes = block_bytes
        self._pinned = pinned
        nbytes = num_slots * block_bytes
        self._owner: Any
        if pinned:
            import torch  # only CUDA hosts pin memory

            self._owner = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
            flat = self._owner.numpy()
        else:
            self._owner = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            if hasattr(mmap, "MADV_HUGEPAGE"):
                self._owner.madvise(mmap.MADV_HUGEPAGE)
            flat = np.frombuffer(self._owner, dtype=np.uint8)
        self._flat = flat
        self._rows = flat.reshape(num_slots, block_bytes)

    @property
    def num_slots(self) -> int:
        return self._num_slots

    @property
    def block_bytes(self) -> int:
        return self._block_bytes

    @property
    def pinned(self) -> bool:
        return self._pinned

    @property
    def nbytes(self) -> int:
        return self._flat.nbytes

    @property
    def address(self) -> int:
        """Address of slot 0 (the region to register with NIXL is ``address, nbytes``)."""
        return int(self._flat.ctypes.data)

    @property
    def rows(self) -> np.ndarray:
        """The buffer as a ``[num_slots, block_bytes]`` uint8 view (row i = slot i)."""
        return self._rows

    def slot_offset(self, slot: int) -> int:
        """Byte offset of ``slot`` from ``address``.

        Raises:
            ValueError: ``slot`` is out of range.
        """
        if not 0 <= slot < self._num_slots:
            raise ValueError(f"slot {slot} out of range [0, {self._num_slots})")
        return slot * self._block_bytes

    def tensor(self) -> Any:
        """The buffer as a 1-D torch uint8 tensor sharing its memory (imports torch)."""
        if self._pinned:
            return self._owner
        import torch

        return torch.from_numpy(self._flat)

    def write(self, slots: np.ndarray, src: np.ndarray) -> None:
        self._check_rows(slots, src)
        copy_rows(src, np.arange(len(slots), dtype=np.int64), self._rows, slots)

    def read_into(self, slots: np.ndarray, out: np.ndarray) -> None:
        self._check_rows(slots, out)
        copy_rows(self._rows, slots, out, np.arange(len(slots), dtype=np.int64))

    def checksums(self, slots: np.ndarray) -> np.ndarray:
        if len(slots) and (int(slots.min()) < 0 or int(slots.max()) >= self._num_slots):
            raise ValueError(f"slot out of range [0, {self._num_slots})")
        return checksum_rows(self._rows, slots)

    def _check_rows(self, slots: np.ndarray, rows: np.ndarray) -> None:
        if rows.dtype != np.uint8 or rows.ndim != 2 or rows.shape != (len(slots), self._block_bytes):
            raise ValueError(f"expected uint8 [{len(slots)}, {self._block_bytes}], got {rows.dtype} {rows.shape}")
