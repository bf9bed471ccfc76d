"""The router's counters and latency percentiles, as JSON and Prometheus text.

Contract: the router calls the ``record_*``/``count_*`` methods from its event loop;
:meth:`RouterStats.as_json` and :meth:`RouterStats.prometheus` render a snapshot together
with the workers' records. Latencies keep the most recent ``window`` samples.
"""

from __future__ import annotations

import collections
import enum
import math
from collections.abc import Sequence

from kvbm.serving.workers import Worker


class ErrorKind(enum.Enum):
    """Why a request did not get a worker's answer (or got one it should not have)."""

    INVALID_REQUEST = "invalid_request"    # 4xx from validation
    UNAUTHORIZED = "unauthorized"          # admin route without the token
    NO_WORKER = "no_worker"                # 503: nobody to send it to
    WORKER_FAILED = "worker_failed"        # connection refused / 5xx / timeout at a worker
    UPSTREAM_4XX = "upstream_4xx"          # the worker itself refused the request
    STREAM_BROKEN = "stream_broken"        # the worker failed after bytes reached the client
    PREFILL_FAILED = "prefill_failed"      # first hop failed; decode recomputed
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
        self.errors: collections.Counter[ErrorKind] = collections.Counter()
        self.routed: collections.Counter[tuple[str, Hop]] = collections.Counter()
        self._ttft: collections.deque[float] = collections.deque(maxlen=window)
        self._itl: collections.deque[float] = collections.deque(maxlen=window)

    def count_error(self, kind: ErrorKind) -> None:
        self.errors[kind] += 1

    def count_route(self, worker_id: str, hop: Hop) -> None:
        self.routed[(worker_id, hop)] += 1

    def record_ttft(self, seconds: float) -> None:
        self._ttft.append(seconds)

    def record_itl(self, seconds: float) -> None:
        self._itl.append(seconds)

    def _latency(self, samples: Sequence[float]) -> dict:
        return {"count": len(samples), "p50": percentile(samples, 50),
                "p99": percentile(samples, 99)}

    def as_json(self, workers: Sequence[Worker]) -> dict:
        routing: dict[str, dict[str, int]] = {}
        for (worker_id, hop), n in sorted(self.routed.items(), key=lambda kv: (kv[0][0], kv[0][1].value)):
            routing.setdefault(worker_id, {})[hop.value] = n
        return {
            "requests": self.requests,
            "succeeded": self.succeeded,
            "disaggregated": self.disaggregated,
            "retries": self.retries,
            "errors": {kind.value: self.errors[kind] for kind in ErrorKind},
            "prefill_failures": self.errors[ErrorKind.PREFILL_FAILED],
            "transfer_failures": self.errors[ErrorKind.KV_PARAMS_MISSING],
            "ttft_s": self._latency(self._ttft),
            "itl_s": self._latency(self._itl),
            "routing": routing,
            "workers": [w.as_json() for w in workers],
        }

    def prometheus(self, workers: Sequence[Worker]) -> str:
        lines = [
            "# TYPE kvbm_router_requests_total counter",
            f"kvbm_router_requests_total {self.requests}",
            "# TYPE kvbm_router_succeeded_total counter",
            f"kvbm_router_succeeded_total {self.succeeded}",
            "# TYPE kvbm_router_disaggregated_total counter",
            f"kvbm_router_disaggregated_total {self.disaggregated}",
            "# TYPE kvbm_router_retries_total counter",
            f"kvbm_router_retries_total {self.retries}",
            "# TYPE kvbm_router_errors_total counter",
        ]
        lines += [f'kvbm_router_errors_total{{kind="{k.value}"}} {self.errors[k]}' for k in ErrorKind]
        for name, samples in (("ttft", self._ttft), ("itl", self._itl)):
            lines.append(f"# TYPE kvbm_router_{name}_seconds summary")
            for q in (50, 99):
                value = percentile(samples, q)
                lines.append(f'kvbm_router_{name}_seconds{{quantile="{q / 100}"}} '
                             f'{"NaN" if value is None else f"{value:.6f}"}')
            lines.append(f"kvbm_router_{name}_seconds_count {len(samples)}")
        lines.append("# TYPE kvbm_router_routed_total counter")
        lines += [f'kvbm_router_routed_total{{worker="{w}",hop="{hop.value}"}} {n}'
                  for (w, hop), n in sorted(self.routed.items(), key=lambda kv: (kv[0][0], kv[0][1].value))]
        lines.append("# TYPE kvbm_router_worker_in_flight gauge")
        lines += [f'kvbm_router_worker_in_flight{{worker="{w.id}",role="{w.role.value}"}} {w.in_flight}'
                  for w in workers]
        lines.append("# TYPE kvbm_router_worker_healthy gauge")
        lines += [f'kvbm_router_worker_healthy{{worker="{w.id}",state="{w.state.value}"}} {int(w.healthy)}'
                  for w in workers]
        return "\n".join(lines) + "\n"
