"""This worker's own tiers as NIXL sees them: regions to register, and block checksums.

A :class:`LocalTier` pairs a :class:`~kvbm.remote.regions.TierRegions` description with views
of the same memory, so the worker can checksum blocks it grants (source side) and blocks it
pulled (reader side). The checksum of a block is ``xxh3_64`` of its segments back to back,
which is exactly :func:`kvbm.integrity.checksum_rows` of the block's G2 slot: a G1 block and
its G2 copy have the same checksum, and a peer's published checksums match ours.

Builders: :func:`host_tier` for a :class:`~kvbm.tiers.host.HostBuffer` (G2, one region) and
:func:`engine_tier` for :class:`~kvbm.layout.EngineKV` (G1, one region per layer tensor, in
host memory or VRAM).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from xxhash import xxh3_64

from kvbm.ids import Tier
from kvbm.integrity import checksum_rows
from kvbm.layout import BlockLayout, EngineKV
from kvbm.remote.regions import MemKind, Region, Segment, TierRegions
from kvbm.tiers.host import HostBuffer


class LocalTier:
    """A registered tier of this worker: its description plus views of its memory.

    ``views[r]`` is region ``r`` as a 2-D uint8 array (numpy, or torch on a GPU) whose row
    ``b`` starts at block ``b``. Use :func:`host_tier` or :func:`engine_tier`.
    """

    def __init__(self, regions: TierRegions, views: Sequence[Any]) -> None:
        if len(views) != len(regions.regions):
            raise ValueError(f"{len(views)} views for {len(regions.regions)} regions")
        self._regions = regions
        self._views = tuple(views)
        segs = regions.segments
        # One region whose segments tile each row in order: a block is one row (G2's case).
        self._whole_rows = (
            len(regions.regions) == 1
            and [s.offset for s in segs] == np.cumsum([0, *regions.segment_lengths[:-1]]).tolist()
            and regions.block_bytes == int(self._views[0].shape[1])
        )

    @property
    def regions(self) -> TierRegions:
        return self._regions

    @property
    def tier(self) -> Tier:
        return self._regions.tier

    @property
    def num_blocks(self) -> int:
        return self._regions.num_blocks

    def checksums(self, block_ids: np.ndarray) -> np.ndarray:
        """xxh3_64 of each block's bytes (its segments back to back), uint64.

        Raises:
            ValueError: a block id out of range.
        """
        ids = np.asarray(block_ids, dtype=np.int64)
        if len(ids) and (int(ids.min()) < 0 or int(ids.max()) >= self.num_blocks):
            raise ValueError(f"block id out of range [0, {self.num_blocks})")
        views = self._host_rows(ids)
        if self._whole_rows:
            return checksum_rows(views[0], np.arange(len(ids)) if self._on_gpu else ids)
        rows = np.arange(len(ids)) if self._on_gpu else ids
        out = np.empty(len(ids), dtype=np.uint64)
        segs = self._regions.segments
        for k, b in enumerate(rows.tolist()):
            h = xxh3_64()
            for seg in segs:
                h.update(views[seg.region][b, seg.offset : seg.offset + seg.nbytes].data)
            out[k] = h.intdigest()
        return out

    def read(self, block_ids: np.ndarray) -> np.ndarray:
        """Copies of the blocks' bytes, ``[len, block_bytes]`` uint8 (tests and tools)."""
        ids = np.asarray(block_ids, dtype=np.int64)
        views = self._host_rows(ids)
        rows = np.arange(len(ids)) if self._on_gpu else ids
        parts = [views[s.region][rows, s.offset : s.offset + s.nbytes] for s in self._regions.segments]
        return np.concatenate(parts, axis=1) if parts else np.zeros((len(ids), 0), np.uint8)

    @property
    def _on_gpu(self) -> bool:
        return self._regions.mem is MemKind.VRAM

    def _host_rows(self, ids: np.ndarray) -> tuple[np.ndarray, ...]:
        if not self._on_gpu:
            return self._views
        import torch  # only VRAM tiers get here

        index = torch.as_tensor(ids, device=self._views[0].device)
        return tuple(v.index_select(0, index).cpu().numpy() for v in self._views)


def host_tier(buffer: HostBuffer, layout: BlockLayout | None = None, *, tier: Tier = Tier.G2) -> LocalTier:
    """The G2 host buffer as one region; with ``layout``, one segment per layer so peers can
    pull its slots straight into their G1 layer tensors.

    Raises:
        ValueError: ``layout.block_bytes`` differs from the buffer's slot size.
    """
    lengths = layout.layer_bytes if layout is not None else (buffer.block_bytes,)
    if sum(lengths) != buffer.block_bytes:
        raise ValueError(f"layout of {sum(lengths)} bytes per block for slots of {buffer.block_bytes}")
    offsets = np.cumsum([0, *lengths[:-1]]).tolist()
    regions = TierRegions(
        tier=tier,
        mem=MemKind.DRAM,
        num_blocks=buffer.num_slots,
        regions=(Region(buffer.address, buffer.nbytes, buffer.block_bytes),),
        segments=tuple(Segment(0, int(o), int(n)) for o, n in zip(offsets, lengths)),
    )
    return LocalTier(regions, (buffer.rows,))


def engine_tier(kv: EngineKV, *, tier: Tier = Tier.G1) -> LocalTier:
    """The engine's KV tensors: one region (and one segment) per layer tensor.

    Raises:
        ValueError: a tensor's bytes inside one block are not contiguous.
    """
    if kv.is_cuda:
        views = kv.layer_tensors()
        device = int(views[0].device.index or 0)
        geometry = [(int(v.data_ptr()), int(v.stride(0)), int(v.stride(1)), int(v.shape[1])) for v in views]
        mem = MemKind.VRAM
    else:
        views = kv.layer_arrays()
        device = 0
        geometry = [(int(v.ctypes.data), int(v.strides[0]), int(v.strides[1]), int(v.shape[1])) for v in views]
        mem = MemKind.DRAM
    regions, segments = [], []
    for r, (address, stride, inner, width) in enumerate(geometry):
        if inner != 1 or stride < width:
            raise ValueError(f"KV tensor {r}: a block's bytes must be contiguous (strides {stride}, {inner})")
        regions.append(Region(address, (kv.num_blocks - 1) * stride + width, stride, device))
        segments.append(Segment(r, 0, width))
    return LocalTier(TierRegions(tier, mem, kv.num_blocks, tuple(regions), tuple(segments)), views)
