"""Factories for the G3 tests: a node (manager + transfer engine + G1 arrays + G2 buffer + G3
handlers over one directory), block bytes derived from each block's hash (so any process can
check what it reads), and the G3 paths and offsets a test needs to damage files.

Directories live under pytest's ``tmp_path`` (ext4 here, so O_DIRECT is used); tests that need
the buffered path ask for it, or use a tmpfs.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest

from kvbm.config import KvbmConfig
from kvbm.hashing import BlockHasher, HashedBlocks, LayoutFingerprint
from kvbm.ids import BlockHash
from kvbm.layout import EngineKV
from kvbm.manager.block_manager import BlockManager
from kvbm.tiers.disk.handlers import DiskHandlers, disk_handlers
from kvbm.tiers.host import HostBuffer
from kvbm.transfer.engine import TransferEngine
from kvbm.transfer.host_copy import host_handlers
from kvbm.transfer.jobs import JobResult, TransferJob

BLOCK_SIZE = 4
LAYERS = (4096, 8192)  # 12 KiB blocks: 4 KiB multiples, so O_DIRECT moves them without a bounce
BLOCK_BYTES = sum(LAYERS)
STRIDE = BLOCK_BYTES  # already 4 KiB aligned
REPO = Path(__file__).resolve().parents[2]


def make_fingerprint(**overrides: object) -> LayoutFingerprint:
    fields: dict[str, object] = dict(
        model="tiny-llama",
        dtype="bfloat16",
        block_size=BLOCK_SIZE,
        num_layers=2,
        num_kv_heads=2,
        head_dim=32,
        layout_tag="test-nhd",
    )
    fields.update(overrides)
    return LayoutFingerprint(**fields)  # type: ignore[arg-type]


def make_blocks(n_blocks: int, seed: int = 0, fingerprint: LayoutFingerprint | None = None) -> HashedBlocks:
    hasher = BlockHasher(fingerprint or make_fingerprint())
    tokens = np.random.default_rng(seed).integers(0, 32000, n_blocks * BLOCK_SIZE, dtype=np.int64)
    return hasher.hash_prompt(tokens)


def content(block_hash: BlockHash, layers: Sequence[int] = LAYERS) -> list[np.ndarray]:
    """The bytes every test stores for ``block_hash``: one array per layer."""
    rng = np.random.default_rng(int.from_bytes(block_hash[:8], "little"))
    return [rng.integers(0, 256, width, dtype=np.uint8) for width in layers]


def g3_config(directory: Path, g3_blocks: int = 16, **fields: object) -> KvbmConfig:
    raw: dict[str, object] = {
        "g2_capacity_blocks": 4,
        "transfer_thread": False,
        "g3_dir": str(directory),
        "g3_capacity_bytes": g3_blocks * STRIDE,
    }
    raw.update(fields)
    return KvbmConfig.from_dict(raw)


def slot_file(directory: Path) -> Path:
    """The first (in these tests, the only) slot file of a G3 directory."""
    return directory / "slots-00000.bin"


@dataclasses.dataclass
class DiskNode:
    """One process's worth of kvbm with G3: planner, mover, engine memory, host buffer, disk."""

    manager: BlockManager
    engine: TransferEngine
    layers: tuple[np.ndarray, ...]
    g2: HostBuffer
    disk: DiskHandlers
    config: KvbmConfig

    def run(self, jobs: Sequence[TransferJob]) -> list[JobResult]:
        """Submit ``jobs`` in order, wait, complete them in the manager; returns the results."""
        for job in jobs:
            self.engine.submit(job)
        self.engine.wait([j.job_id for j in jobs])
        results = self.engine.poll()
        for result in results:
            self.manager.complete(result)
        return results

    def drain(self) -> list[JobResult]:
        """Run the manager's own jobs (demotions) until none is left."""
        results = []
        while jobs := self.manager.take_jobs():
            results += self.run(jobs)
        return results

    def fill_g1(self, block_ids: Sequence[int], hashes: Sequence[BlockHash]) -> None:
        for block_id, h in zip(block_ids, hashes):
            for layer, data in zip(self.layers, content(h)):
                layer[block_id] = data

    def write(self, blocks: HashedBlocks, block_ids: Sequence[int]) -> list[JobResult]:
        """The engine computed ``blocks`` into ``block_ids``: offload them, then demote."""
        self.fill_g1(block_ids, blocks.hashes)
        return self.run(self.manager.blocks_computed(blocks, block_ids)) + self.drain()

    def holds(self, block_id: int, block_hash: BlockHash) -> bool:
        return all(np.array_equal(layer[block_id], data) for layer, data in zip(self.layers, content(block_hash)))

    def close(self) -> None:
        self.engine.close()
        self.disk.close()
        self.manager.close()


def build_node(
    config: KvbmConfig,
    *,
    fingerprint: LayoutFingerprint | None = None,
    g1_blocks: int = 32,
    g1_on_host: bool = True,
    threaded: bool = False,
) -> DiskNode:
    fingerprint = fingerprint or make_fingerprint()
    layers = tuple(np.zeros((g1_blocks, w), dtype=np.uint8) for w in LAYERS)
    g1 = EngineKV.from_tensors(list(layers))
    manager = BlockManager(
        config, block_size=BLOCK_SIZE, block_bytes=BLOCK_BYTES, fingerprint=fingerprint, g1_on_host=g1_on_host
    )
    g2 = HostBuffer(config.g2_slots(BLOCK_BYTES), BLOCK_BYTES)
    disk = disk_handlers(config, g2, g1 if g1_on_host else None, fingerprint=fingerprint)
    engine = TransferEngine({**host_handlers(g1, g2), **disk}, threaded=threaded)
    return DiskNode(manager, engine, layers, g2, disk, config)


def written_and_closed(directory: Path, seed: int, g3_blocks: int = 8) -> tuple[KvbmConfig, HashedBlocks]:
    """A G3 directory holding 4 blocks (G1 ids 0-3) of ``make_blocks(4, seed)``, closed."""
    config = g3_config(directory, g3_blocks=g3_blocks)
    blocks = make_blocks(4, seed=seed)
    node = build_node(config)
    node.write(blocks, [0, 1, 2, 3])
    node.close()
    return config, blocks


@pytest.fixture
def make_disk_node() -> Iterator[Callable[..., DiskNode]]:
    nodes: list[DiskNode] = []

    def make(config: KvbmConfig, **kwargs: object) -> DiskNode:
        node = build_node(config, **kwargs)  # type: ignore[arg-type]
        nodes.append(node)
        return node

    yield make
    for node in nodes:
        node.close()


def run_diskproc(*args: str, timeout: float = 120, **popen: object) -> subprocess.CompletedProcess[str]:
    """Run ``tests/disk/diskproc.py`` in a fresh interpreter and wait for it."""
    return subprocess.run(
        [sys.executable, "-m", "tests.disk.diskproc", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        **popen,  # type: ignore[arg-type]
    )


def start_diskproc(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.disk.diskproc", *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
