"""Settings of kvbm's remote transport: one frozen dataclass, validated at construction.

``RemoteConfig.from_dict`` reads the plain-dict form (for example a ``"remote"`` section of
vLLM's ``kv_connector_extra_config``); every key must be a field below. Below this module no
code reads raw dicts or environment variables.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

from kvbm.config import checked_keys
from kvbm.errors import ConfigError

_WORKER_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")


@dataclasses.dataclass(frozen=True)
class RemoteConfig:
    """Validated settings of one worker's NIXL endpoint.

    Attributes:
        worker: logical name of this worker (stable across restarts); the NIXL agent is named
            ``worker/incarnation`` so a restarted worker is a different agent.
        backends: NIXL backends to create (UCX moves memory between processes and hosts).
        lease_s: how long a source keeps granted blocks without news from the reader.
        heartbeat_s: how often a reader re-announces the leases it still holds; a heartbeat
            extends a lease to ``now + lease_s``. Must be under half of ``lease_s`` so one
            lost heartbeat does not expire a lease.
        pull_deadline_s: default deadline of a pull job, from submit to verified bytes.
        side_channel_timeout_s: connect + reply limit of one side-channel request.
        side_channel_host: address the side channel listens on (``None``: no listener; peers
            then need this worker's metadata carried in their requests).
        side_channel_port: its port; 0 picks a free one (published in the metadata).
        advertise_host: the host peers should dial, published in the metadata (default: the
            listening host; set it when listening on ``0.0.0.0`` for peers on other hosts).
        verify: check pulled bytes against the checksums the source published.
        progress_interval_s: period of the worker's poller thread (UCX progress, notices,
            lease expiry); 0 turns it off and leaves all of it to ``progress()`` calls. Reads
            from this worker stall until it polls (see :mod:`kvbm.remote.agent`).
        notice_interval_s: how long a reader batches DONE notices per source before sending
            them (a notification delays the next read from that source until it polls).
    """

    worker: str
    backends: tuple[str, ...] = ("UCX",)
    lease_s: float = 30.0
    heartbeat_s: float = 5.0
    pull_deadline_s: float = 10.0
    side_channel_timeout_s: float = 5.0
    side_channel_host: str | None = "127.0.0.1"
    side_channel_port: int = 0
    advertise_host: str | None = None
    verify: bool = True
    progress_interval_s: float = 0.001
    notice_interval_s: float = 0.05

    def __post_init__(self) -> None:
        if not isinstance(self.worker, str) or not _WORKER_RE.match(self.worker):
            raise ConfigError("worker", f"expected 1-64 characters of [A-Za-z0-9_.:-], got {self.worker!r}")
        if (
            not isinstance(self.backends, tuple)
            or not self.backends
            or not all(isinstance(b, str) and b for b in self.backends)
        ):
            raise ConfigError("backends", f"expected a non-empty tuple of backend names, got {self.backends!r}")
        for name in ("lease_s", "heartbeat_s", "pull_deadline_s", "side_channel_timeout_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ConfigError(name, f"expected a positive number of seconds, got {value!r}")
        for name in ("progress_interval_s", "notice_interval_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ConfigError(name, f"expected seconds >= 0, got {value!r}")
        if not self.notice_interval_s < self.heartbeat_s:
            raise ConfigError(
                "notice_interval_s", f"must be under heartbeat_s ({self.heartbeat_s}), got {self.notice_interval_s}"
            )
        if not self.heartbeat_s * 2 <= self.lease_s:
            raise ConfigError(
                "heartbeat_s", f"must be at most half of lease_s ({self.lease_s}), got {self.heartbeat_s}"
            )
        host = self.side_channel_host
        if host is not None and (not isinstance(host, str) or not host):
            raise ConfigError("side_channel_host", f"expected a host name or None, got {self.side_channel_host!r}")
        if self.advertise_host is not None and (not isinstance(self.advertise_host, str) or not self.advertise_host):
            raise ConfigError("advertise_host", f"expected a host name or None, got {self.advertise_host!r}")
        port = self.side_channel_port
        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
            raise ConfigError("side_channel_port", f"expected an int in [0, 65535], got {port!r}")
        if not isinstance(self.verify, bool):
            raise ConfigError("verify", f"expected a bool, got {self.verify!r}")

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> RemoteConfig:
        """Build from JSON types: lists for tuples, tier names as ``"g1"``/``"g2"``.

        Raises:
            ConfigError: an unknown key, or a wrong or missing value.
        """
        values = checked_keys(raw, {f.name for f in dataclasses.fields(cls)}, "remote config")
        if isinstance(values.get("backends"), list):
            values["backends"] = tuple(values["backends"])
        if "worker" not in values:
            raise ConfigError("worker", "required")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form: ``from_dict(cfg.to_dict()) == cfg``."""
        out = dataclasses.asdict(self)
        out["backends"] = list(self.backends)
        return out
