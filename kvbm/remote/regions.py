"""Where a tier's blocks live in registered memory, in a form a peer can address.

A tier is a set of registered memory regions (one per G1 layer tensor, or the single G2
buffer). Block ``b`` of region ``r`` starts at ``regions[r].address + b * regions[r].stride``.
A block's bytes are an ordered list of segments (one per layer): segment ``j`` is
``segments[j].nbytes`` bytes at ``segments[j].offset`` inside the block's row of region
``segments[j].region``. Two tiers can exchange blocks when their segment lengths agree
(:meth:`TierRegions.segment_lengths`): peer G2 → local G1 pairs layer ``j`` of the G2 slot
with layer tensor ``j``, one NIXL descriptor per (block, segment).

The descriptor list of a tier covers every block, block-major: descriptor ``b * S + j`` is
segment ``j`` of block ``b``. It is prepped once per tier (and once per peer tier), and a
transfer of N blocks picks its ``N * S`` descriptors by index: one NIXL call for N blocks.
NIXL merges descriptors that touch in memory, so runs of consecutive blocks coalesce.

Everything here is plain data with a JSON form (:meth:`TierRegions.to_dict`).
"""

from __future__ import annotations

import dataclasses
import enum
import functools
from collections.abc import Mapping
from typing import Any

import numpy as np

from kvbm.ids import Tier


class MemKind(enum.Enum):
    """NIXL memory type of a region."""

    DRAM = "DRAM"
    VRAM = "VRAM"


@dataclasses.dataclass(frozen=True)
class Region:
    """One registered memory region: ``nbytes`` bytes at ``address`` on ``device``."""

    address: int
    nbytes: int
    stride: int
    device: int = 0

    def __post_init__(self) -> None:
        for name in ("address", "nbytes", "stride", "device"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"Region.{name} must be a non-negative int, got {value!r}")
        if self.nbytes < 1 or self.stride < 1:
            raise ValueError(f"Region needs positive nbytes and stride, got {self.nbytes}, {self.stride}")


@dataclasses.dataclass(frozen=True)
class Segment:
    """``nbytes`` bytes at ``offset`` inside a block's row of region ``region``."""

    region: int
    offset: int
    nbytes: int


@dataclasses.dataclass(frozen=True)
class TierRegions:
    """The blocks of one tier: ``num_blocks`` blocks laid out over ``regions``.

    Raises:
        ValueError: no regions or segments, a segment outside its region's row, or regions
            too small for ``num_blocks`` blocks.
    """

    tier: Tier
    mem: MemKind
    num_blocks: int
    regions: tuple[Region, ...]
    segments: tuple[Segment, ...]

    def __post_init__(self) -> None:
        if self.num_blocks < 1 or not self.regions or not self.segments:
            raise ValueError("a tier needs at least one block, region and segment")
        for j, seg in enumerate(self.segments):
            if not 0 <= seg.region < len(self.regions):
                raise ValueError(f"segment {j} names region {seg.region} of {len(self.regions)}")
            region = self.regions[seg.region]
            if seg.offset < 0 or seg.nbytes < 1 or seg.offset + seg.nbytes > region.stride:
                raise ValueError(f"segment {j} ({seg.offset}+{seg.nbytes}) leaves its row of {region.stride} bytes")
            if (self.num_blocks - 1) * region.stride + seg.offset + seg.nbytes > region.nbytes:
                raise ValueError(f"region {seg.region} of {region.nbytes} bytes cannot hold {self.num_blocks} blocks")

    @functools.cached_property
    def segment_lengths(self) -> tuple[int, ...]:
        """Bytes of each segment of a block: two tiers are compatible when these are equal."""
        return tuple(s.nbytes for s in self.segments)

    @functools.cached_property
    def block_bytes(self) -> int:
        return sum(s.nbytes for s in self.segments)

    def descriptors(self) -> np.ndarray:
        """Every (block, segment) as an ``[num_blocks * S, 3]`` uint64 array of
        (address, length, device), block-major."""
        n, s = self.num_blocks, len(self.segments)
        out = np.empty((n, s, 3), dtype=np.uint64)
        blocks = np.arange(n, dtype=np.uint64)
        for j, seg in enumerate(self.segments):
            region = self.regions[seg.region]
            out[:, j, 0] = region.address + seg.offset + blocks * region.stride
            out[:, j, 1] = seg.nbytes
            out[:, j, 2] = region.device
        return out.reshape(n * s, 3)

    def registration(self) -> np.ndarray:
        """The regions as an ``[R, 3]`` uint64 array of (address, nbytes, device)."""
        return np.array([[r.address, r.nbytes, r.device] for r in self.regions], dtype=np.uint64)

    def descriptor_indices(self, block_ids: np.ndarray) -> np.ndarray:
        """Indices into :meth:`descriptors` of every segment of ``block_ids`` (int32).

        Raises:
            ValueError: a block id outside ``[0, num_blocks)``.
        """
        ids = np.asarray(block_ids, dtype=np.int64).reshape(-1)
        # One comparison finds both ends: negative ids wrap to huge unsigned values.
        if (ids.view(np.uint64) >= self.num_blocks).any():
            raise ValueError(f"block id out of range [0, {self.num_blocks}) for {self.tier.name}")
        s = len(self.segments)
        if s == 1:
            return ids.astype(np.int32)
        return (ids[:, None] * s + np.arange(s, dtype=np.int64)).reshape(-1).astype(np.int32)

    def to_dict(self) -> dict[str, Any]:
        return {
            "tier": self.tier.value,
            "mem": self.mem.value,
            "num_blocks": self.num_blocks,
            "regions": [[r.address, r.nbytes, r.stride, r.device] for r in self.regions],
            "segments": [[s.region, s.offset, s.nbytes] for s in self.segments],
        }

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> TierRegions:
        """Parse :meth:`to_dict`'s form.

        Raises:
            ValueError: a missing or malformed field.
        """
        try:
            return cls(
                tier=Tier(raw["tier"]),
                mem=MemKind(raw["mem"]),
                num_blocks=int(raw["num_blocks"]),
                regions=tuple(Region(*map(int, r)) for r in raw["regions"]),
                segments=tuple(Segment(*map(int, s)) for s in raw["segments"]),
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"malformed tier regions: {exc!r}") from None
