"""KVBMConnector variants that inject faults, loaded by tests via kv_connector_module_path.

They change nothing in kvbm: they damage bytes or drop loads the way a failing disk, a bad
peer or a lost transfer would, using only the connector's public surface and vLLM's metadata.
"""

from __future__ import annotations

import numpy as np

from kvbm.connectors.vllm.connector import KVBMConnector
from kvbm.ids import Tier


class CorruptingG2Connector(KVBMConnector):
    """Flips a byte in every G2 slot just before it is loaded into the engine."""

    def start_load_kv(self, forward_context, **kwargs) -> None:
        # Once per slot: requests sharing a prefix may load the same slots in one step.
        slots = {
            int(i)
            for load in self._get_connector_metadata().loads
            for job in load.jobs
            if job.src is Tier.G2
            for i in job.src_ids
        }
        self.host_buffer.rows[sorted(slots), 7] ^= 0xFF
        super().start_load_kv(forward_context, **kwargs)


class _DroppingConnector(KVBMConnector):
    """Base of the connectors that lose loaded blocks: zeroed, then reported as load errors."""

    def register_kv_caches(self, kv_caches) -> None:
        self._kv_tensors = list(kv_caches.values())
        self._dropped: set[int] = set()
        super().register_kv_caches(kv_caches)

    def _drop(self, block_ids: list[int]) -> None:
        for tensor in self._kv_tensors:
            tensor[block_ids] = 0
        self._dropped.update(block_ids)

    def get_block_ids_with_load_errors(self) -> set[int]:
        dropped, self._dropped = self._dropped, set()
        return super().get_block_ids_with_load_errors() | dropped


class DroppingLoadsConnector(_DroppingConnector):
    """Every load "fails": the engine blocks are zeroed and reported as load errors."""

    def start_load_kv(self, forward_context, **kwargs) -> None:
        super().start_load_kv(forward_context, **kwargs)
        for load in self._get_connector_metadata().loads:
            for job in load.jobs:
                self._drop([int(i) for i in np.asarray(job.dst_ids)])


class SilentlyZeroingConnector(DroppingLoadsConnector):
    """Zeroes loaded blocks and reports nothing: proves the engine really reads loaded KV."""

    def get_block_ids_with_load_errors(self) -> set[int]:
        self._dropped.clear()
        return KVBMConnector.get_block_ids_with_load_errors(self)


class Faults:
    """What :class:`TransientFaultConnector` breaks while ``on`` (tests flip it between steps).

    Engines in the tests run in the test process, so the test and the connector share this
    module's :data:`FAULTS`. Each load into the engine fails one of its blocks (zeroed and
    reported, as a disk or peer fault would) with probability ``load_rate``; each block
    written to G2 is corrupted after its store with probability ``store_rate`` (needs
    ``transfer_thread: false`` so the store has finished when ``wait_for_save`` returns).
    """

    def __init__(self) -> None:
        self.on = False
        self.load_rate = 1.0
        self.store_rate = 0.0
        self.rng = np.random.default_rng(0)
        self.failed_loads = 0
        self.corrupted_stores = 0

    def reset(self, seed: int = 0, *, load_rate: float = 1.0, store_rate: float = 0.0) -> None:
        self.__init__()
        self.rng = np.random.default_rng(seed)
        self.load_rate, self.store_rate = load_rate, store_rate


FAULTS = Faults()


class TransientFaultConnector(_DroppingConnector):
    """Transient faults switched by :data:`FAULTS`: partial load failures, corrupt stores."""

    def start_load_kv(self, forward_context, **kwargs) -> None:
        super().start_load_kv(forward_context, **kwargs)
        if not FAULTS.on:
            return
        for load in self._get_connector_metadata().loads:
            for job in load.jobs:
                if job.dst is not Tier.G1 or not job.num_blocks or FAULTS.rng.random() >= FAULTS.load_rate:
                    continue
                self._drop([int(job.dst_ids[FAULTS.rng.integers(job.num_blocks)])])
                FAULTS.failed_loads += 1

    def wait_for_save(self) -> None:
        super().wait_for_save()
        if not FAULTS.on or not FAULTS.store_rate:
            return
        rows = self.host_buffer.rows
        for _, job in self._get_connector_metadata().stores:
            if job.dst is not Tier.G2:
                continue
            for slot in job.dst_ids.tolist():
                if FAULTS.rng.random() < FAULTS.store_rate:
                    rows[slot, 11] ^= 0x5A
                    FAULTS.corrupted_stores += 1
