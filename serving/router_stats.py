"""The router's counters and latency percentiles, and its workers' block-pool stats, as JSON
and Prometheus text.

Contract: the router calls the ``record_*``/``count_*`` methods from its event loop;
:meth:`RouterStats.as_json` and :meth:`RouterStats.prometheus` render a snapshot together
with the workers' records and what :func:`fetch_worker_stats` gathered from each worker's
stats endpoint. Latencies keep the most recent ``window`` samples. A worker whose stats
endpoint does not answer (in time) shows an error entry; it never fails the whole snapshot.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import enum
import json
import math
from collections.abc import Mapping, Sequence

import httpx

from kvbm.serving.workers import Worker, WorkerState

# Workers whose process should be up, so their stats endpoint is asked.
_STATS_STATES = frozenset({WorkerState.ACTIVE, WorkerState.DRAINING, WorkerState.DRAINED})


class ErrorKind(enum.Enum):
    """Why a request did not get a worker's answer (or got one it should not have)."""

    INVALID_REQUEST = "invalid_request"  # 4xx from validation
    UNAUTHORIZED = "unauthorized"  # admin route without the token
    NO_WORKER = "no_worker"  # 503: nobody to send it to (queue full or timed out)
    WORKER_FAILED = "worker_failed"  # connection refused / 5xx / timeout at a worker
    UPSTREAM_4XX = "upstream_4xx"  # the worker itself refused the request
    STREAM_BROKEN = "stream_broken"  # the worker failed after bytes reached the client
    PREFILL_FAILED = "prefill_failed"  # first hop failed; decode recomputed
    KV_PARAMS_MISSING = "kv_params_missing"  # prefill answered without kv_transfer_params


class Hop(enum.Enum):
    """Which leg of a request a routing decision was for."""

    AGGREGATED = "aggregated"
    PREFILL = "prefill"
    DECODE = "decode"


def percentile(samples: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile, ``q`` in [0, 100]; None without samples."""
    if not samples:
        return None
    ordered = sorted(samples)
    rank = max(0, min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1))
    return ordered[rank]


class RouterStats:
    """Counters since the router started."""

    def __init__(self, window: int) -> None:
        self.requests = 0
        self.succeeded = 0
        self.retries = 0
        self.disaggregated = 0
        # Prefill holds the router ended because no decode worker accepted the request.
        self.handoffs_released = 0
        self.handoff_release_failures = 0  # the prefill's side channel did not answer the release
        # The admission queue (admission.py): requests that waited for a worker, those
        # refused because it was full, those that gave up waiting, and how many wait now.
        self.queued = 0
        self.queue_rejections = 0
        self.queue_timeouts = 0
        self.queue_depth = 0
        self.errors: collections.Counter[ErrorKind] = collections.Counter()
        self.routed: collections.Counter[tuple[str, Hop]] = collections.Counter()
        self._ttft: collections.deque[float] = collections.deque(maxlen=window)
        self._prefill: collections.deque[float] = collections.deque(maxlen=window)  # the prefill hop
        self._itl: collections.deque[float] = collections.deque(maxlen=window)

    def count_error(self, kind: ErrorKind) -> None:
        self.errors[kind] += 1

    def count_route(self, worker_id: str, hop: Hop) -> None:
        self.routed[(worker_id, hop)] += 1

    def record_ttft(self, seconds: float) -> None:
        self._ttft.append(seconds)

    def record_prefill(self, seconds: float) -> None:
        self._prefill.append(seconds)

    def record_itl(self, seconds: float) -> None:
        self._itl.append(seconds)

    def _latency(self, samples: Sequence[float]) -> dict:
        return {"count": len(samples), "p50": percentile(samples, 50), "p99": percentile(samples, 99)}

    def as_json(self, workers: Sequence[Worker], block_stats: Mapping[str, WorkerReply] | None = None) -> dict:
        """The snapshot; each worker's record gains ``block_stats``: its stats endpoint's JSON,
        ``{"error": ...}`` when that failed, or None when it was not asked."""
        block_stats = block_stats or {}
        routing: dict[str, dict[str, int]] = {}
        for (worker_id, hop), n in sorted(self.routed.items(), key=lambda kv: (kv[0][0], kv[0][1].value)):
            routing.setdefault(worker_id, {})[hop.value] = n
        return {
            "requests": self.requests,
            "succeeded": self.succeeded,
            "disaggregated": self.disaggregated,
            "retries": self.retries,
            "handoffs_released": self.handoffs_released,
            "handoff_release_failures": self.handoff_release_failures,
            "queued": self.queued,
            "queue_rejections": self.queue_rejections,
            "queue_timeouts": self.queue_timeouts,
            "queue_depth": self.queue_depth,
            "errors": {kind.value: self.errors[kind] for kind in ErrorKind},
            "prefill_failures": self.errors[ErrorKind.PREFILL_FAILED],
            "transfer_failures": self.errors[ErrorKind.KV_PARAMS_MISSING],
            "ttft_s": self._latency(self._ttft),
            "prefill_s": self._latency(self._prefill),
            "itl_s": self._latency(self._itl),
            "routing": routing,
            "workers": [w.as_json() | {"block_stats": _stats_json(block_stats.get(w.id))} for w in workers],
        }

    def prometheus(self, workers: Sequence[Worker], worker_metrics: Mapping[str, WorkerReply] | None = None) -> str:
        """The router's metrics, then every asked worker's own, labelled ``worker``."""
        worker_metrics = worker_metrics or {}
        lines = [
            "# TYPE kvbm_router_requests_total counter",
            f"kvbm_router_requests_total {self.requests}",
            "# TYPE kvbm_router_succeeded_total counter",
            f"kvbm_router_succeeded_total {self.succeeded}",
            "# TYPE kvbm_router_disaggregated_total counter",
            f"kvbm_router_disaggregated_total {self.disaggregated}",
            "# TYPE kvbm_router_retries_total counter",
            f"kvbm_router_retries_total {self.retries}",
            "# TYPE kvbm_router_handoffs_released_total counter",
            f"kvbm_router_handoffs_released_total {self.handoffs_released}",
            "# TYPE kvbm_router_handoff_release_failures_total counter",
            f"kvbm_router_handoff_release_failures_total {self.handoff_release_failures}",
            "# TYPE kvbm_router_queued_total counter",
            f"kvbm_router_queued_total {self.queued}",
            "# TYPE kvbm_router_queue_rejections_total counter",
            f"kvbm_router_queue_rejections_total {self.queue_rejections}",
            "# TYPE kvbm_router_queue_timeouts_total counter",
            f"kvbm_router_queue_timeouts_total {self.queue_timeouts}",
            "# TYPE kvbm_router_queue_depth gauge",
            f"kvbm_router_queue_depth {self.queue_depth}",
            "# TYPE kvbm_router_errors_total counter",
        ]
        lines += [f'kvbm_router_errors_total{{kind="{k.value}"}} {self.errors[k]}' for k in ErrorKind]
        for name, samples in (("ttft", self._ttft), ("prefill", self._prefill), ("itl", self._itl)):
            lines.append(f"# TYPE kvbm_router_{name}_seconds summary")
            for q in (50, 99):
                value = percentile(samples, q)
                lines.append(
                    f'kvbm_router_{name}_seconds{{quantile="{q / 100}"}} {"NaN" if value is None else f"{value:.6f}"}'
                )
            lines.append(f"kvbm_router_{name}_seconds_count {len(samples)}")
        lines.append("# TYPE kvbm_router_routed_total counter")
        lines += [
            f'kvbm_router_routed_total{{worker="{w}",hop="{hop.value}"}} {n}'
            for (w, hop), n in sorted(self.routed.items(), key=lambda kv: (kv[0][0], kv[0][1].value))
        ]
        lines.append("# TYPE kvbm_router_worker_in_flight gauge")
        lines += [
            f'kvbm_router_worker_in_flight{{worker="{w.id}",role="{w.role.value}"}} {w.in_flight}' for w in workers
        ]
        lines.append("# TYPE kvbm_router_worker_healthy gauge")
        lines += [
            f'kvbm_router_worker_healthy{{worker="{w.id}",state="{w.state.value}"}} {int(w.healthy)}' for w in workers
        ]
        lines.append("# TYPE kvbm_router_worker_stats_up gauge")
        lines += [f'kvbm_router_worker_stats_up{{worker="{w}"}} {int(reply.ok)}' for w, reply in worker_metrics.items()]
        lines += merge_worker_metrics({w: reply.body for w, reply in worker_metrics.items() if reply.ok})
        return "\n".join(lines) + "\n"


@dataclasses.dataclass(frozen=True)
class WorkerReply:
    """What one worker's stats endpoint answered: its body, or why there is none."""

    ok: bool
    body: str


async def fetch_worker_stats(
    client: httpx.AsyncClient, workers: Sequence[Worker], path: str, timeout_s: float
) -> dict[str, WorkerReply]:
    """GETs ``stats_url + path`` of every worker that has a stats endpoint and should be up,
    all at once, each within ``timeout_s``; keyed by worker id."""
    asked = [(w, w.stats_url) for w in workers if w.stats_url and w.state in _STATS_STATES]
    replies = await asyncio.gather(*(_fetch(client, url + path, timeout_s) for _, url in asked))
    return {w.id: reply for (w, _), reply in zip(asked, replies)}


async def _fetch(client: httpx.AsyncClient, url: str, timeout_s: float) -> WorkerReply:
    try:
        reply = await client.get(url, timeout=timeout_s)
    except httpx.HTTPError as error:
        # Timeouts often carry no message: the exception's name is the reason then.
        return WorkerReply(False, f"{url}: {type(error).__name__} {error}".rstrip())
    if reply.status_code != 200:
        return WorkerReply(False, f"{url}: HTTP {reply.status_code}")
    return WorkerReply(True, reply.text)


def _stats_json(reply: WorkerReply | None) -> dict | None:
    if reply is None:
        return None
    if not reply.ok:
        return {"error": reply.body}
    try:
        return json.loads(reply.body)
    except ValueError as error:
        return {"error": f"not JSON: {error}"}


def merge_worker_metrics(texts: Mapping[str, str]) -> list[str]:
    """Several workers' Prometheus expositions as one: each sample gains ``worker="<id>"``,
    and each metric family keeps one HELP and one TYPE line with all workers' samples under
    it (the text format allows a family only once)."""
    headers: dict[str, dict[str, str]] = {}
    samples: dict[str, list[str]] = {}
    for worker_id, text in texts.items():
        family = None
        for line in text.splitlines():
            if line.startswith(("# HELP ", "# TYPE ")):
                _, kind, family = line.split(" ", 3)[:3]
                headers.setdefault(family, {}).setdefault(kind, line)
                samples.setdefault(family, [])
            elif line and not line.startswith("#"):
                name = line.split("{", 1)[0].split(" ", 1)[0]
                samples.setdefault(family or name, []).append(_labelled(line, worker_id))
    lines: list[str] = []
    for family, family_samples in samples.items():
        lines += headers.get(family, {}).values()
        lines += family_samples
    return lines


def _labelled(sample: str, worker_id: str) -> str:
    label = f'worker="{worker_id}"'
    name, brace, rest = sample.partition("{")
    if brace and " " not in name:
        return f"{name}{{{label},{rest}"
    name, _, value = sample.partition(" ")
    return f"{name}{{{label}}} {value}"
