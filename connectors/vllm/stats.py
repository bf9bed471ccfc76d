"""kvbm's block-pool stats inside vLLM: connector stats, Prometheus metrics, a JSON endpoint.

The scheduler-side connector snapshots :meth:`BlockManager.stats` for vLLM's stats logger at
most once a second (and when the engine goes idle) as :class:`KvbmConnectorStats` (vLLM logs
it and feeds :class:`KvbmPromMetrics`); :class:`StatsServer`, when ``stats_port`` is
configured, serves a snapshot taken at each request as JSON and Prometheus text, beside what
KV-aware routers read (the hashes the worker can serve, and how it hashes prompts).
"""

from __future__ import annotations

import dataclasses
import http.server
import json
import threading
import urllib.parse
from typing import Any, Protocol

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (
    KVConnectorPromMetrics,
    KVConnectorStats,
)

from kvbm.manager.stats import KvbmStats

# Counters and gauges exported per tier, from KvbmStats.to_dict()["tiers"][name].
_GAUGES = ("capacity_blocks", "used_blocks", "pinned_blocks")
_COUNTERS = (
    "hits",
    "misses",
    "evictions",
    "blocks_offloaded",
    "blocks_onboarded",
    "bytes_offloaded",
    "bytes_onboarded",
    "transfers",
    "transfer_failures",
    "token_mismatches",
    "checksum_mismatches",
    "io_errors",
    "dropped_on_open",
    "dropped_after_read_errors",
)


@dataclasses.dataclass
class KvbmConnectorStats(KVConnectorStats):
    """The latest block-pool snapshot (``data`` is ``KvbmStats.to_dict()``)."""

    def reset(self) -> None:
        self.data: dict[str, Any] = {}

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
            gauge = self._gauge_cls(
                name=f"vllm:kvbm_{field}",
                documentation=f"kvbm {field} per tier",
                labelnames=[*labelnames, "tier"],
                multiprocess_mode="mostrecent",
            )
            self._gauges[field] = gauge
        self._labels = per_engine_labelvalues

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        for name, tier in transfer_stats_data.get("tiers", {}).items():
            labels = [*self._labels[engine_idx], name]
            for field, gauge in self._gauges.items():
                gauge.labels(*labels).set(tier[field])


class StatsSource(Protocol):
    """What :class:`StatsServer` serves; every method is called from the server's threads."""

    @property
    def stats(self) -> KvbmStats:
        """An immutable block-pool snapshot, taken at the call."""

    @property
    def remote_stats(self) -> dict | None:
        """The remote endpoint's latest counters (JSON-safe), or None without one."""

    def published(self, since: int | None) -> dict[str, Any]:
        """The block hashes this worker can serve: a snapshot, or a delta since a version
        (:meth:`kvbm.remote.Publication.export`)."""

    def layout(self) -> dict[str, Any]:
        """The layout fingerprint's fields: what a router needs to hash prompts as we do."""


class StatsServer:
    """Serves a worker's block-pool state over HTTP for routers and operators.

    Routes: ``/stats`` (JSON; the remote endpoint's counters under ``"remote"``), ``/metrics``
    (Prometheus text), ``/published[?since=N]`` (servable hashes, for KV-aware routing) and
    ``/layout`` (how to hash prompts like this worker).

    Args:
        source: what to serve (the scheduler-side connector).
        host: address to bind (loopback by default: stats are not for the open network).
        port: TCP port; 0 picks a free one (see :attr:`port`).
    """

    def __init__(self, source: StatsSource, host: str = "127.0.0.1", port: int = 0) -> None:
        self._server = http.server.ThreadingHTTPServer((host, port), _handler_class(source))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="kvbm-stats", daemon=True)
        self._thread.start()

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _handler_class(source: StatsSource) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            url = urllib.parse.urlsplit(self.path)
            try:
                body, kind = self._route(url.path, urllib.parse.parse_qs(url.query))
            except LookupError as error:
                self._reply(404, json.dumps({"error": str(error)}).encode(), "application/json")
            except ValueError as error:
                self._reply(400, json.dumps({"error": str(error)}).encode(), "application/json")
            else:
                self._reply(200, body, kind)

        def _route(self, path: str, query: dict[str, list[str]]) -> tuple[bytes, str]:
            if path == "/stats":
                stats = source.stats.to_dict()
                if (counters := source.remote_stats) is not None:
                    stats["remote"] = counters
                return json.dumps(stats, sort_keys=True).encode(), "application/json"
            if path == "/metrics":
                text = source.stats.to_prometheus() + _remote_prometheus(source.remote_stats)
                return text.encode(), "text/plain; version=0.0.4"
            if path == "/published":
                since = query.get("since", [None])[0]
                if since is not None and not since.isdigit():
                    raise ValueError(f"since must be a version number, got {since!r}")
                return json.dumps(source.published(None if since is None else int(since))).encode(), "application/json"
            if path == "/layout":
                return json.dumps(source.layout()).encode(), "application/json"
            raise LookupError(f"unknown path {path}; try /stats, /metrics, /published, /layout")

        def _reply(self, status: int, body: bytes, kind: str) -> None:
            self.send_response(status)
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
