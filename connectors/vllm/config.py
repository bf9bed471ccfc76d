"""The connector's configuration, parsed once from vLLM's ``kv_connector_extra_config``.

The dict holds kvbm's own settings (:class:`kvbm.config.KvbmConfig`) plus a few that only
the vLLM integration has; both are validated here, in the scheduler and in every worker, so
a wrong field stops vLLM at start-up with a message naming it.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from typing import Any

from kvbm.config import KvbmConfig, checked_keys
from kvbm.errors import ConfigError
from kvbm.remote.config import RemoteConfig

# G2 size when the user names none: enough for ~128k tokens of a 100M-parameter model.
DEFAULT_G2_CAPACITY_BYTES = 2 << 30


class LoadFailurePolicy(enum.Enum):
    """What vLLM does with a request whose blocks kvbm failed to load."""

    RECOMPUTE = "recompute"  # compute the failed blocks again: a failed load is a cache miss
    FAIL = "fail"  # end the request with an error


@dataclasses.dataclass(frozen=True)
class ConnectorConfig:
    """Settings of :class:`~kvbm.connectors.vllm.connector.KVBMConnector`.

    Attributes:
        kvbm: the block manager's settings.
        sync_loads: let loads finish before the forward pass of the step that computes on
            them (saves a step or two of time to first token) when they are small or the engine
            is otherwise idle. Off by default: a block that fails such a load has already been
            computed on, and vLLM keeps what that step computed in its own prefix cache until
            the request writes it again (see the README's Integrity section). Asynchronous
            loads are rewound before anything computes on them.
        async_load_min_blocks: with ``sync_loads``, loads of at least this many blocks still
            run asynchronously while other requests run (the request waits while the others
            go on); smaller loads, and every load on an otherwise idle engine, are synchronous.
        load_failure: what vLLM does after a failed load; None: recompute, unless vLLM's
            ``kv_load_failure_policy`` says so already (see :func:`resolve_load_failure`).
        stats_port: port of the worker's JSON/Prometheus stats endpoint; None: no endpoint.
        stats_host: address the stats endpoint binds (loopback unless set).
        remote: the worker's NIXL endpoint, for disaggregated serving (``"remote"``: a dict
            of :class:`~kvbm.remote.RemoteConfig` fields, ``worker`` required); None: no
            NIXL. A prefill holds a handed-off request's blocks for ``remote.lease_s`` at most
            while no decode reads them. Give prefill workers a ``side_channel_port``: with
            port 0 the address is known only after the worker's first step.
    """

    kvbm: KvbmConfig
    sync_loads: bool = False
    async_load_min_blocks: int = 64
    load_failure: LoadFailurePolicy | None = None
    stats_port: int | None = None
    stats_host: str = "127.0.0.1"
    remote: RemoteConfig | None = None

    def __post_init__(self) -> None:
        _check_int("async_load_min_blocks", self.async_load_min_blocks, 1)
        if not isinstance(self.sync_loads, bool):
            raise ConfigError("sync_loads", f"expected a bool, got {self.sync_loads!r}")
        if self.stats_port is not None:
            _check_int("stats_port", self.stats_port, 0)
            if self.stats_port > 65535:
                raise ConfigError("stats_port", f"must be <= 65535, got {self.stats_port}")
        if not isinstance(self.stats_host, str) or not self.stats_host:
            raise ConfigError("stats_host", f"expected a host name or address, got {self.stats_host!r}")

    @classmethod
    def from_extra_config(cls, raw: Mapping[str, Any] | None) -> ConnectorConfig:
        """Parse vLLM's ``kv_connector_extra_config``.

        Raises:
            ConfigError: an unknown key or a wrong value, naming the field.
        """
        own = {f.name for f in dataclasses.fields(cls)} - {"kvbm"}
        kvbm_keys = {f.name for f in dataclasses.fields(KvbmConfig)}
        raw = checked_keys(raw or {}, own | kvbm_keys, "kv_connector_extra_config")
        kvbm_raw = {k: v for k, v in raw.items() if k in kvbm_keys}
        if kvbm_raw.get("g2_capacity_bytes") is None and kvbm_raw.get("g2_capacity_blocks") is None:
            kvbm_raw["g2_capacity_bytes"] = DEFAULT_G2_CAPACITY_BYTES
            kvbm_raw.pop("g2_capacity_blocks", None)
        values: dict[str, Any] = {k: v for k, v in raw.items() if k in own}
        if values.get("load_failure") is not None:
            try:
                values["load_failure"] = LoadFailurePolicy(values["load_failure"])
            except ValueError:
                choices = ", ".join(p.value for p in LoadFailurePolicy)
                raise ConfigError(
                    "load_failure", f"expected one of {choices}, got {values['load_failure']!r}"
                ) from None
        if values.get("remote") is not None:
            values["remote"] = _remote(values["remote"])
        return cls(kvbm=KvbmConfig.from_dict(kvbm_raw), **values)


def resolve_load_failure(configured: LoadFailurePolicy | None, vllm_policy: str) -> LoadFailurePolicy:
    """The policy vLLM is to apply to kvbm's failed loads.

    vLLM's ``kv_load_failure_policy`` defaults to "fail", and its config does not record whether
    a user set it: "recompute" there is always someone's choice and is kept, "fail" may be
    nobody's, so kvbm's ``load_failure`` decides then, and unset means "recompute" (a block
    kvbm failed to load is a cache miss, not a reason to end the request).

    Args:
        configured: kvbm's ``load_failure`` (None: unset).
        vllm_policy: vLLM's ``kv_transfer_config.kv_load_failure_policy``.

    Raises:
        ConfigError: ``load_failure`` is "fail" while vLLM's policy is "recompute", or vLLM's
            policy is neither.
    """
    try:
        vllm = LoadFailurePolicy(vllm_policy)
    except ValueError:
        raise ConfigError("kv_load_failure_policy", f"unknown vLLM policy {vllm_policy!r}") from None
    if vllm is LoadFailurePolicy.RECOMPUTE:
        if configured is LoadFailurePolicy.FAIL:
            raise ConfigError(
                "load_failure",
                "is 'fail' but vLLM's kv_transfer_config.kv_load_failure_policy is "
                "'recompute'; set one of the two, or both alike",
            )
        return vllm
    return configured or LoadFailurePolicy.RECOMPUTE


def _check_int(field: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(field, f"expected an int, got {value!r}")
    if value < minimum:
        raise ConfigError(field, f"must be >= {minimum}, got {value}")


def _remote(raw: Any) -> RemoteConfig:
    if not isinstance(raw, Mapping):
        raise ConfigError("remote", f"expected a mapping of remote settings, got {raw!r}")
    try:
        return RemoteConfig.from_dict(raw)
    except ConfigError as error:
        message = str(error).split(": ", 1)[1]
        raise ConfigError(f"remote.{error.field}", message) from None
