"""kvbm's block-pool stats inside vLLM: connector stats, Prometheus metrics, a JSON endpoint.

The scheduler-side connector snapshots :meth:`BlockManager.stats` every step. The snapshot
travels to vLLM's stats logger as :class:`KvbmConnectorStats` (vLLM logs it and feeds
:class:`KvbmPromMetrics`), and is served as JSON and Prometheus text by
:class:`StatsServer` when ``stats_port`` is configured.
"""

from __future__ import annotations

import dataclasses
import http.server
import json
import threading
from collections.abc import Callable
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (
    KVConnectorPromMetrics,
    KVConnectorStats,
)

from kvbm.stats import KvbmStats

# Counters and gauges exported per tier, from KvbmStats.to_dict()["tiers"][name].
_GAUGES = ("capacity_blocks", "used_blocks", "pinned_blocks")
_COUNTERS = ("hits", "misses", "evictions", "blocks_offloaded", "blocks_onboarded",
             "bytes_offloaded", "bytes_onboarded", "transfers", "transfer_failures",
             "token_mismatches", "checksum_mismatches")


@dataclasses.dataclass
class KvbmConnectorStats(KVConnectorStats):
    """The latest block-pool snapshot (``data`` is ``KvbmStats.to_dict()``)."""

    def reset(self) -> None:
        self.data = {}

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        # Snapshots are cumulative: the newer one (other) supersedes.
        if other.data:
            self.data = other.data
        return self

    def reduce(self) -> dict[str, int | float]:
        out: dict[str, int | float] = {}
        for name, tier in self.data.get("tiers", {}).items():
            out[f"{name} used blocks"] = tier["used_blocks"]
            out[f"{name} hit rate"] = round(tier["hit_rate"], 3)
            out[f"{name} blocks onboarded"] = tier["blocks_onboarded"]
            out[f"{name} blocks offloaded"] = tier["blocks_offloaded"]
        return out

    def is_empty(self) -> bool:
        return not self.data


class KvbmPromMetrics(KVConnectorPromMetrics):
    """Per-tier gauges in vLLM's own /metrics, named ``kvbm_<field>``."""

    def __init__(self, vllm_config, metric_types, labelnames, per_engine_labelvalues) -> None:
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        self._gauges = {}
        for field in _GAUGES + _COUNTERS:
            gauge = self._gauge_cls(name=f"vllm:kvbm_{field}", documentation=f"kvbm {field} per tier",
                                    labelnames=[*labelnames, "tier"], multiprocess_mode="mostrecent")
            self._gauges[field] = gauge
        self._labels = per_engine_labelvalues

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        for name, tier in transfer_stats_data.get("tiers", {}).items():
            labels = [*self._labels[engine_idx], name]
            for field, gauge in self._gauges.items():
                gauge.labels(*labels).set(tier[field])


class StatsServer:
    """Serves ``/stats`` (JSON) and ``/metrics`` (Prometheus text) from a snapshot source.

    Args:
        snapshot: returns the latest stats; called from the server thread, so it must only
            read an immutable snapshot.
        remote: returns the remote endpoint's latest counters (a JSON-safe dict, or None),
            served under ``"remote"`` and as ``kvbm_remote_*`` metrics.
        host: address to bind (loopback by default: stats are not for the open network).
        port: TCP port; 0 picks a free one (see :attr:`port`).
    """

    def __init__(self, snapshot: Callable[[], KvbmStats], host: str = "127.0.0.1", port: int = 0,
                 remote: Callable[[], dict | None] = lambda: None) -> None:
        handler = _handler_class(snapshot, remote)
        self._server = http.server.ThreadingHTTPServer((host, port), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="kvbm-stats", daemon=True)
        self._thread.start()

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _handler_class(snapshot: Callable[[], KvbmStats],
                   remote: Callable[[], dict | None]) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            if self.path == "/stats":
                stats = snapshot().to_dict()
                if (counters := remote()) is not None:
                    stats["remote"] = counters
                body, kind = json.dumps(stats, sort_keys=True).encode(), "application/json"
            elif self.path == "/metrics":
                text = snapshot().to_prometheus() + _remote_prometheus(remote())
                body, kind = text.encode(), "text/plain; version=0.0.4"
            else:
                body, kind = json.dumps({"error": f"unknown path {self.path}"}).encode(), "application/json"
                self.send_response(404)
                self._reply(body, kind)
                return
            self.send_response(200)
            self._reply(body, kind)

        def _reply(self, body: bytes, kind: str) -> None:
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    return Handler


def _remote_prometheus(counters: dict | None) -> str:
    """The remote endpoint's numeric counters as untyped samples ``kvbm_remote_<path>``."""
    if not counters:
        return ""
    lines: list[str] = []

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, inner in sorted(value.items()):
                walk(f"{prefix}_{key}", inner)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            lines.append(f"{prefix} {value}")

    walk("kvbm_remote", counters)
    return "\n".join(lines) + "\n" if lines else ""
