"""Factories for the core tests: fingerprints, hashed prompts, configs, and a small in-process
node (manager + transfer engine + G1 arrays + G2 buffer) that runs jobs to completion."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest

from kvbm.config import G3OnMismatch, KvbmConfig
from kvbm.hashing import BlockHasher, HashedBlocks, LayoutFingerprint
from kvbm.ids import Tier
from kvbm.layout import EngineKV
from kvbm.manager.block_manager import BlockManager
from kvbm.manager.events import EventLog
from kvbm.tiers.base import SlotStore, TierIndex
from kvbm.tiers.disk.index import DiskIndex
from kvbm.tiers.disk.layout import DiskLayout, open_directory
from kvbm.tiers.disk.store import DiskSlotStore
from kvbm.tiers.host import HostBuffer
from kvbm.tiers.slot_index import SlotIndex
from kvbm.transfer.engine import TransferEngine
from kvbm.transfer.host_copy import host_handlers
from kvbm.transfer.jobs import JobResult, TransferJob

BLOCK_SIZE = 4


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "cuda: needs a CUDA device (skipped without one)")


def cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


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


def make_hasher(**overrides: object) -> BlockHasher:
    return BlockHasher(make_fingerprint(**overrides))


def make_tokens(n_tokens: int, seed: int = 0, vocab: int = 32000) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, n_tokens, dtype=np.int64)


def make_blocks(n_blocks: int, seed: int = 0, hasher: BlockHasher | None = None) -> HashedBlocks:
    hasher = hasher or make_hasher()
    return hasher.hash_prompt(make_tokens(n_blocks * hasher.block_size, seed))


def make_config(**fields: object) -> KvbmConfig:
    raw: dict[str, object] = {"g2_capacity_blocks": 4, "transfer_thread": False}
    raw.update(fields)
    return KvbmConfig.from_dict(raw)


@dataclasses.dataclass
class Node:
    """One process's worth of kvbm: planner, mover, engine memory and host buffer."""

    manager: BlockManager
    engine: TransferEngine
    layers: tuple[np.ndarray, ...]  # G1 per-layer uint8 views, [num_blocks, layer_bytes]
    g2: HostBuffer

    def run(self, jobs: Sequence[TransferJob]) -> list[JobResult]:
        """Submit ``jobs``, wait for them, and complete them in the manager."""
        for job in jobs:
            self.engine.submit(job)
        self.engine.wait([j.job_id for j in jobs])
        results = self.engine.poll()
        for result in results:
            self.manager.complete(result)
        return results

    def fill_g1(self, block_ids: Sequence[int], seed: int) -> None:
        """Write distinct recognisable bytes into engine blocks."""
        rng = np.random.default_rng(seed)
        for layer in self.layers:
            layer[list(block_ids)] = rng.integers(0, 256, (len(block_ids), layer.shape[1]), dtype=np.uint8)

    def g1_bytes(self, block_id: int) -> bytes:
        return b"".join(layer[block_id].tobytes() for layer in self.layers)


@pytest.fixture
def make_node() -> Iterator:
    engines: list[TransferEngine] = []

    def make(
        g1_blocks: int = 16,
        layer_bytes: Sequence[int] = (64, 32),
        clock: Callable[[], float] = time.perf_counter,
        **config_fields: object,
    ) -> Node:
        config = make_config(**config_fields)
        tensors = [np.zeros((g1_blocks, b), dtype=np.uint8) for b in layer_bytes]
        g1 = EngineKV.from_tensors(tensors)
        manager = BlockManager(config, block_size=BLOCK_SIZE, block_bytes=g1.layout.block_bytes)
        g2 = HostBuffer(config.g2_slots(g1.layout.block_bytes), g1.layout.block_bytes)
        engine = TransferEngine(host_handlers(g1, g2), threaded=config.transfer_thread, clock=clock)
        engines.append(engine)
        return Node(manager, engine, g1.layer_arrays(), g2)

    yield make
    for engine in engines:
        engine.close()


# --- tier factories: the contract suite (test_tier_contract.py, test_tier_state.py) runs
# against every entry. A new tier adds its factories here. ``workdir`` is an empty directory
# the tier may use (G3 keeps its files there); G2 ignores it.


def make_slot_index(num_slots: int, block_size: int, events: EventLog, workdir: Path) -> TierIndex:
    return SlotIndex(Tier.G2, num_slots, block_size, events)


def make_host_buffer(num_slots: int, block_bytes: int, workdir: Path) -> SlotStore:
    return HostBuffer(num_slots, block_bytes)


def _g3_layout(num_slots: int, block_size: int, block_bytes: int) -> DiskLayout:
    stride = -(-block_bytes // 4096) * 4096
    return DiskLayout.plan(make_fingerprint(block_size=block_size), block_bytes, num_slots * stride)


def make_disk_index(num_slots: int, block_size: int, events: EventLog, workdir: Path) -> TierIndex:
    layout = _g3_layout(num_slots, block_size, 4096)
    return DiskIndex(open_directory(str(workdir / "g3"), layout, on_mismatch=G3OnMismatch.REFUSE, owner=True), events)


def make_disk_store(num_slots: int, block_bytes: int, workdir: Path) -> SlotStore:
    layout = _g3_layout(num_slots, BLOCK_SIZE, block_bytes)
    return DiskSlotStore(open_directory(str(workdir / "g3"), layout, on_mismatch=G3OnMismatch.REFUSE, owner=False))


TIER_INDEX_FACTORIES = {"g2": make_slot_index, "g3": make_disk_index}
SLOT_STORE_FACTORIES = {"g2": make_host_buffer, "g3": make_disk_store}
