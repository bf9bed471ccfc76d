"""KVBMConnector: vLLM's KV connector interface, forwarded to kvbm's scheduler or worker side.

Enable it by name (the ``vllm.general_plugins`` entry point registers it)::

    --kv-transfer-config '{"kv_connector": "KVBMConnector", "kv_role": "kv_both",
                           "kv_connector_extra_config": {"g2_capacity_bytes": "4GiB"}}'

or by module path (``"kv_connector_module_path": "kvbm.connectors.vllm.connector"``).
vLLM builds one instance with the scheduler role in its engine core and one with the worker
role in each worker; each forwards to :class:`SchedulerSide` or :class:`WorkerSide`, and the
two talk only through connector metadata (see :mod:`.metadata`).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorRole,
)

from kvbm.connectors.vllm.config import ConnectorConfig, LoadFailurePolicy, resolve_load_failure
from kvbm.connectors.vllm.metadata import KvbmConnectorMetadata
from kvbm.connectors.vllm.stats import KvbmConnectorStats, KvbmPromMetrics, StatsServer

if TYPE_CHECKING:
    import torch

    from kvbm.connectors.vllm.scheduler import SchedulerSide
    from kvbm.connectors.vllm.worker import WorkerSide
    from kvbm.manager.stats import KvbmStats
    from vllm.config import VllmConfig
    from vllm.v1.kv_cache_interface import KVCacheConfig

logger = logging.getLogger(__name__)


class KVBMConnector(KVConnectorBase_V1):
    """kvbm's tiered prefix cache (G2 host memory, G3 disk) behind vLLM's connector API."""

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        transfer = vllm_config.kv_transfer_config
        self._config = ConnectorConfig.from_extra_config(transfer.kv_connector_extra_config)
        self._scheduler: SchedulerSide | None = None
        self._worker: WorkerSide | None = None
        self._stats_server: StatsServer | None = None
        if role == KVConnectorRole.SCHEDULER:
            from kvbm.connectors.vllm.scheduler import SchedulerSide

            _set_load_failure_policy(transfer, self._config)
            self._scheduler = SchedulerSide(self._config, vllm_config, kv_cache_config)
            if self._config.stats_port is not None:
                self._stats_server = StatsServer(self._scheduler, self._config.stats_host, self._config.stats_port)
                logger.info("kvbm stats on http://%s:%d/stats", self._config.stats_host, self._stats_server.port)
        else:
            from kvbm.connectors.vllm.worker import WorkerSide

            self._worker = WorkerSide(self._config, vllm_config, kv_cache_config)

    @property
    def stats_port(self) -> int | None:
        """Port of the stats endpoint (scheduler side, when configured)."""
        return self._stats_server.port if self._stats_server else None

    @property
    def host_buffer(self):
        """G2's bytes (worker side; None elsewhere): for inspection and fault-injection tests."""
        return self._worker.host_buffer if self._worker is not None else None

    # -- worker side -------------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self._worker_side.register_kv_caches(kv_caches)

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        self._worker_side.start_load_kv(self._meta())

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # whole-block loads finish in start_load_kv, before the forward pass

    def save_kv_layer(self, layer_name: str, kv_layer: Any, attn_metadata: Any, **kwargs: Any) -> None:
        return  # blocks are offloaded whole, after the forward pass, in wait_for_save

    def wait_for_save(self) -> None:
        self._worker_side.wait_for_save(self._meta())

    def handle_preemptions(self, kv_connector_metadata: Any) -> None:
        assert isinstance(kv_connector_metadata, KvbmConnectorMetadata)
        self._worker_side.handle_preemptions(kv_connector_metadata)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        # After this step's forward pass on every path (also when wait_for_save is deferred past
        # a draft model's forward), and while the step's metadata is still bound.
        if self.has_connector_metadata():
            self._worker_side.grant_handoffs(self._meta())
        return self._worker_side.get_finished(finished_req_ids)

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self._worker_side.take_load_errors()

    def build_connector_worker_meta(self):
        return self._worker_side.build_worker_meta()

    def shutdown(self) -> None:
        if self._worker is not None:
            self._worker.shutdown()
        if self._scheduler is not None:
            self._scheduler.shutdown()
        if self._stats_server is not None:
            self._stats_server.close()

    # -- scheduler side ------------------------------------------------------------------------

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int | None, bool]:
        return self._scheduler_side.get_num_new_matched_tokens(request, num_computed_tokens)

    def on_new_request(self, request: Any) -> None:
        self._scheduler_side.on_new_request(request)

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        self._scheduler_side.update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output: Any) -> KvbmConnectorMetadata:
        return self._scheduler_side.build_connector_meta(scheduler_output)

    def update_connector_output(self, connector_output: Any) -> None:
        self._scheduler_side.update_connector_output(connector_output)

    def request_finished(self, request: Any, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        return self._scheduler_side.request_finished(request, block_ids)

    def has_pending_block_frees(self) -> bool:
        return self._scheduler is not None and self._scheduler.has_pending_block_frees()

    def get_kv_connector_stats(self) -> KvbmConnectorStats | None:
        # vLLM's per-step hook: a snapshot at most once a second (see stats_for_vllm); read
        # ``stats`` for one taken now.
        if self._scheduler is None:
            return None
        data = self._scheduler.stats_for_vllm(time.monotonic())
        return KvbmConnectorStats(data=data) if data is not None else None

    @property
    def stats(self) -> KvbmStats | None:
        """The block pool's stats now (scheduler side; None elsewhere)."""
        return self._scheduler.stats if self._scheduler is not None else None

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> KvbmConnectorStats:
        return KvbmConnectorStats(data=dict(data or {}))

    @classmethod
    def build_prom_metrics(cls, vllm_config, metric_types, labelnames, per_engine_labelvalues) -> KvbmPromMetrics:
        return KvbmPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    @property
    def _worker_side(self) -> WorkerSide:
        if self._worker is None:
            raise RuntimeError("kvbm connector: vLLM called a worker-side method on the scheduler's connector")
        return self._worker

    @property
    def _scheduler_side(self) -> SchedulerSide:
        if self._scheduler is None:
            raise RuntimeError("kvbm connector: vLLM called a scheduler-side method on a worker's connector")
        return self._scheduler

    def _meta(self) -> KvbmConnectorMetadata:
        meta = self._get_connector_metadata()
        assert isinstance(meta, KvbmConnectorMetadata)
        return meta


def _set_load_failure_policy(transfer: Any, config: ConnectorConfig) -> None:
    """Writes :func:`resolve_load_failure`'s answer into vLLM's kv_load_failure_policy, which
    vLLM's scheduler reads right after building its connector.

    Raises:
        ConfigError: kvbm's load_failure and vLLM's kv_load_failure_policy conflict.
    """
    policy = resolve_load_failure(config.load_failure, transfer.kv_load_failure_policy)
    if config.load_failure is None and transfer.kv_load_failure_policy != policy.value:
        logger.info(
            "kvbm: a failed KV load is recomputed (vLLM's kv_load_failure_policy %r set to %r); "
            "to end such requests with an error instead, set kv_connector_extra_config.load_failure=%r",
            transfer.kv_load_failure_policy,
            policy.value,
            LoadFailurePolicy.FAIL.value,
        )
    transfer.kv_load_failure_policy = policy.value
