"""What workers tell each other: a worker's metadata, and a grant of leased blocks.

:class:`PeerMetadata` is what a reader needs to address a source: the source's NIXL agent
name and metadata snapshot (taken after every tier was registered), the layout of each tier
it serves, and where its side channel listens. :class:`BlockGrant` names blocks a source
has leased for readers: tier, block ids, hashes and the checksum of every block as the source
published it. Readers verify pulled bytes against ``BlockGrant.checksums``.

Both are plain data with a JSON-safe form (``to_dict``/``from_dict``; bytes and arrays as
base64), so they can travel inside a request (vLLM's ``kv_transfer_params``) or over the
side channel. Agent names are ``worker/incarnation``: a restarted worker has a new
incarnation, hence a new agent name, so a grant from before the restart can never be served
by the new process's memory.
"""

from __future__ import annotations

import base64
import dataclasses
import json
from collections.abc import Mapping
from typing import Any, NewType

import numpy as np

from kvbm.ids import BlockHash, Tier
from kvbm.remote.regions import TierRegions

FORMAT_VERSION = 1
HASH_BYTES = 16

AgentName = NewType("AgentName", str)
"""A NIXL agent name, ``worker/incarnation``."""

LeaseId = NewType("LeaseId", int)
"""A lease, unique within one source incarnation."""


def agent_name(worker: str, incarnation: str) -> AgentName:
    return AgentName(f"{worker}/{incarnation}")


def worker_of(agent: str) -> str:
    """The worker part of an agent name."""
    return agent.rsplit("/", 1)[0]


@dataclasses.dataclass(frozen=True, eq=False)
class PeerMetadata:
    """Everything a reader needs to pull from one worker incarnation."""

    agent: AgentName
    nixl: bytes
    tiers: tuple[TierRegions, ...]
    side_channel: str | None = None
    version: int = FORMAT_VERSION

    @property
    def worker(self) -> str:
        return worker_of(self.agent)

    def tier(self, tier: Tier) -> TierRegions | None:
        """The layout of ``tier`` on this worker, or ``None`` when it does not serve it."""
        for t in self.tiers:
            if t.tier is tier:
                return t
        return None

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "agent": self.agent,
            "nixl": _b64(self.nixl),
            "tiers": [t.to_dict() for t in self.tiers],
            "side_channel": self.side_channel,
        }

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> PeerMetadata:
        """Parse :meth:`to_dict`'s form.

        Raises:
            ValueError: malformed, or written by another format version.
        """
        try:
            if raw["version"] != FORMAT_VERSION:
                raise ValueError(f"peer metadata format {raw['version']}, expected {FORMAT_VERSION}")
            return cls(
                agent=AgentName(str(raw["agent"])),
                nixl=base64.b64decode(raw["nixl"]),
                tiers=tuple(TierRegions.from_dict(t) for t in raw["tiers"]),
                side_channel=raw.get("side_channel"),
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"malformed peer metadata: {exc!r}") from None

    def to_bytes(self) -> bytes:
        return json.dumps(self.to_dict(), separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> PeerMetadata:
        try:
            return cls.from_dict(json.loads(data))
        except json.JSONDecodeError as exc:
            raise ValueError(f"peer metadata is not JSON: {exc}") from None


@dataclasses.dataclass(frozen=True, eq=False)
class BlockGrant:
    """Blocks ``block_ids`` of ``tier`` on ``source``, held for readers under ``lease_id``.

    ``hashes`` is empty or names every block; ``checksums[i]`` is xxh3_64 of block i as the
    source published it. ``side_channel`` says where to fetch the source's metadata.

    Raises:
        ValueError: arrays of different lengths.
    """

    source: AgentName
    lease_id: LeaseId
    tier: Tier
    block_ids: np.ndarray
    checksums: np.ndarray
    hashes: tuple[BlockHash, ...] = ()
    lease_s: float = 0.0
    side_channel: str | None = None

    def __post_init__(self) -> None:
        ids = np.asarray(self.block_ids, dtype=np.int64).reshape(-1)
        sums = np.asarray(self.checksums, dtype=np.uint64).reshape(-1)
        object.__setattr__(self, "block_ids", ids)
        object.__setattr__(self, "checksums", sums)
        if len(sums) != len(ids) or (self.hashes and len(self.hashes) != len(ids)):
            raise ValueError(f"{len(ids)} block ids, {len(sums)} checksums, {len(self.hashes)} hashes")

    def __len__(self) -> int:
        return len(self.block_ids)

    def slice(self, first: int, end: int) -> BlockGrant:
        """Blocks ``first..end`` of this grant, under the same lease (ending it ends all)."""
        return dataclasses.replace(
            self,
            block_ids=self.block_ids[first:end],
            checksums=self.checksums[first:end],
            hashes=self.hashes[first:end],
        )

    def take(self, positions: list[int]) -> BlockGrant:
        """Blocks at ``positions`` of this grant, in that order, under the same lease."""
        index = np.asarray(positions, dtype=np.int64)
        hashes = tuple(self.hashes[i] for i in positions) if self.hashes else ()
        return dataclasses.replace(
            self, block_ids=self.block_ids[index], checksums=self.checksums[index], hashes=hashes
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "lease_id": int(self.lease_id),
            "tier": self.tier.value,
            "block_ids": _b64(self.block_ids.astype("<i8").tobytes()),
            "checksums": _b64(self.checksums.astype("<u8").tobytes()),
            "hashes": _b64(b"".join(self.hashes)),
            "lease_s": self.lease_s,
            "side_channel": self.side_channel,
        }

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> BlockGrant:
        """Parse :meth:`to_dict`'s form.

        Raises:
            ValueError: a missing or malformed field.
        """
        try:
            return cls(
                source=AgentName(str(raw["source"])),
                lease_id=LeaseId(int(raw["lease_id"])),
                tier=Tier(raw["tier"]),
                block_ids=np.frombuffer(base64.b64decode(raw["block_ids"]), dtype="<i8").astype(np.int64),
                checksums=np.frombuffer(base64.b64decode(raw["checksums"]), dtype="<u8").astype(np.uint64),
                hashes=split_hashes(base64.b64decode(raw["hashes"])),
                lease_s=float(raw.get("lease_s", 0.0)),
                side_channel=raw.get("side_channel"),
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"malformed block grant: {exc!r}") from None


def join_hashes(hashes: tuple[BlockHash, ...] | list[BlockHash]) -> str:
    """Hashes as one base64 string (16 bytes each)."""
    return _b64(b"".join(hashes))


def split_hashes(data: bytes) -> tuple[BlockHash, ...]:
    """Inverse of concatenating 16-byte hashes.

    Raises:
        ValueError: the length is not a multiple of 16.
    """
    if len(data) % HASH_BYTES:
        raise ValueError(f"{len(data)} bytes is not a whole number of {HASH_BYTES}-byte hashes")
    return tuple(BlockHash(data[i : i + HASH_BYTES]) for i in range(0, len(data), HASH_BYTES))


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
