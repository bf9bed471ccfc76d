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
        rows = self.host_buffer.rows
        for load in self._get_connector_metadata().loads:
            for job in load.jobs:
                if job.src is Tier.G2:
                    rows[job.src_ids, 7] ^= 0xFF
        super().start_load_kv(forward_context, **kwargs)


class DroppingLoadsConnector(KVBMConnector):
    """Every load "fails": the engine blocks are zeroed and reported as load errors."""

    def register_kv_caches(self, kv_caches) -> None:
        self._kv_tensors = list(kv_caches.values())
        self._dropped: set[int] = set()
        super().register_kv_caches(kv_caches)

    def start_load_kv(self, forward_context, **kwargs) -> None:
        super().start_load_kv(forward_context, **kwargs)
        for load in self._get_connector_metadata().loads:
            for job in load.jobs:
                ids = [int(i) for i in np.asarray(job.dst_ids)]
                for tensor in self._kv_tensors:
                    tensor[ids] = 0
                self._dropped.update(ids)

    def get_block_ids_with_load_errors(self) -> set[int]:
        dropped, self._dropped = self._dropped, set()
        return super().get_block_ids_with_load_errors() | dropped


class SilentlyZeroingConnector(DroppingLoadsConnector):
    """Zeroes loaded blocks and reports nothing: proves the engine really reads loaded KV."""

    def get_block_ids_with_load_errors(self) -> set[int]:
        self._dropped.clear()
        return KVBMConnector.get_block_ids_with_load_errors(self)
