"""Stats API: typed per-tier snapshots, their JSON form and Prometheus text exposition.

The manager owns one :class:`TierCounters` per tier and builds an immutable
:class:`KvbmStats` on each ``stats()`` call. Latency percentiles come from a bounded ring
buffer of the most recent job durations (:class:`LatencyWindow`), so a snapshot costs
O(window) whatever the uptime.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import numpy as np

from kvbm.ids import Tier
from kvbm.tiers.base import TierUsage


class LatencyWindow:
    """The last ``size`` latency samples (seconds), plus an all-time count and sum."""

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        self._samples = np.zeros(size, dtype=np.float64)
        self._next = 0
        self.count = 0
        self.total_s = 0.0

    def add(self, seconds: float) -> None:
        self._samples[self._next] = seconds
        self._next = (self._next + 1) % self._samples.size
        self.count += 1
        self.total_s += seconds

    def quantile(self, q: float) -> float | None:
        """The q-quantile (0..1) of the window, or None before the first sample."""
        filled = min(self.count, self._samples.size)
        if not filled:
            return None
        return float(np.quantile(self._samples[:filled], q))


@dataclasses.dataclass(slots=True)
class TierCounters:
    """Mutable running counters of one tier; snapshot them with :meth:`KvbmStats`."""

    hits: int = 0
    misses: int = 0
    blocks_offloaded: int = 0
    bytes_offloaded: int = 0
    blocks_onboarded: int = 0
    bytes_onboarded: int = 0
    transfers: int = 0
    transfer_failures: int = 0
    token_mismatches: int = 0
    checksum_mismatches: int = 0
    io_errors: int = 0
    dropped_on_open: int = 0
    dropped_after_read_errors: int = 0


@dataclasses.dataclass(frozen=True)
class TierStats:
    """One tier at one instant. Counters are totals since the manager started.

    ``blocks_offloaded`` counts blocks committed into this tier; ``blocks_onboarded`` counts
    blocks read out of it towards the engine. A transfer job counts for the tier further from
    the engine (G1→G2 and G2→G1 both count for G2; G2→G3 and G3→G2/G1 count for G3).

    ``io_errors`` counts blocks that failed to move to or from the tier for another reason than
    a checksum mismatch (disk full, EIO, a failed job, an index write). ``dropped_on_open``
    counts index records a persistent tier dropped at startup because they could not name
    intact bytes. ``dropped_after_read_errors`` counts blocks dropped from the tier because
    they failed to read twice with no good read between (a corrupt block is dropped at once
    and counted in ``checksum_mismatches`` instead).
    """

    tier: Tier
    capacity_blocks: int
    capacity_bytes: int
    used_blocks: int
    pinned_blocks: int
    hits: int
    misses: int
    evictions: int
    blocks_offloaded: int
    bytes_offloaded: int
    blocks_onboarded: int
    bytes_onboarded: int
    transfers: int
    transfer_failures: int
    token_mismatches: int
    checksum_mismatches: int
    latency_count: int
    latency_sum_s: float
    latency_p50_s: float | None
    latency_p99_s: float | None
    io_errors: int = 0
    dropped_on_open: int = 0
    dropped_after_read_errors: int = 0

    @classmethod
    def snapshot(
        cls, tier: Tier, usage: TierUsage, counters: TierCounters, latency: LatencyWindow, block_bytes: int
    ) -> TierStats:
        """The stats of ``tier`` now, from its occupancy, counters and latency window."""
        return cls(
            tier=tier,
            capacity_blocks=usage.capacity_blocks,
            capacity_bytes=usage.capacity_blocks * block_bytes,
            used_blocks=usage.used_blocks,
            pinned_blocks=usage.pinned_blocks,
            evictions=usage.evictions,
            latency_count=latency.count,
            latency_sum_s=latency.total_s,
            latency_p50_s=latency.quantile(0.5),
            latency_p99_s=latency.quantile(0.99),
            **dataclasses.asdict(counters),
        )

    @property
    def hit_rate(self) -> float:
        """hits / (hits + misses); 0.0 before any lookup."""
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["tier"] = self.tier.value
        out["hit_rate"] = self.hit_rate
        return out


@dataclasses.dataclass(frozen=True)
class KvbmStats:
    """A snapshot of every tier, plus manager-wide figures."""

    tiers: tuple[TierStats, ...]
    pending_jobs: int
    events_dropped: int

    def tier(self, tier: Tier) -> TierStats:
        """The snapshot of ``tier``. Raises KeyError when the manager has no such tier."""
        for t in self.tiers:
            if t.tier is tier:
                return t
        raise KeyError(tier)

    def to_dict(self) -> dict[str, Any]:
        return {
            "tiers": {t.tier.value: t.to_dict() for t in self.tiers},
            "pending_jobs": self.pending_jobs,
            "events_dropped": self.events_dropped,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def to_prometheus(self) -> str:
        """Prometheus text exposition (format 0.0.4); every metric is labelled by tier."""
        lines: list[str] = []
        for name, kind, help_text, field in _METRICS:
            lines.append(f"# HELP kvbm_{name} {help_text}")
            lines.append(f"# TYPE kvbm_{name} {kind}")
            for t in self.tiers:
                value = t.hit_rate if field == "hit_rate" else getattr(t, field)
                lines.append(f'kvbm_{name}{{tier="{t.tier.value}"}} {_fmt(value)}')
        lines.append("# HELP kvbm_transfer_latency_seconds Transfer job latency, submit to completion.")
        lines.append("# TYPE kvbm_transfer_latency_seconds summary")
        for t in self.tiers:
            label = f'tier="{t.tier.value}"'
            for q, value in (("0.5", t.latency_p50_s), ("0.99", t.latency_p99_s)):
                lines.append(f'kvbm_transfer_latency_seconds{{{label},quantile="{q}"}} {_fmt(value)}')
            lines.append(f"kvbm_transfer_latency_seconds_sum{{{label}}} {_fmt(t.latency_sum_s)}")
            lines.append(f"kvbm_transfer_latency_seconds_count{{{label}}} {t.latency_count}")
        for name, help_text, value in (
            ("pending_jobs", "Transfer jobs planned and not yet completed.", self.pending_jobs),
            ("events_dropped_total", "Events discarded because nobody drained them.", self.events_dropped),
        ):
            kind = "counter" if name.endswith("_total") else "gauge"
            lines += [f"# HELP kvbm_{name} {help_text}", f"# TYPE kvbm_{name} {kind}", f"kvbm_{name} {value}"]
        return "\n".join(lines) + "\n"


_METRICS = (  # (name, type, help, TierStats field)
    ("capacity_blocks", "gauge", "Blocks the tier can hold.", "capacity_blocks"),
    ("capacity_bytes", "gauge", "Bytes the tier can hold.", "capacity_bytes"),
    ("used_blocks", "gauge", "Blocks stored or being stored.", "used_blocks"),
    ("pinned_blocks", "gauge", "Blocks protected from eviction (leased or being stored).", "pinned_blocks"),
    ("hit_rate", "gauge", "hits / (hits + misses).", "hit_rate"),
    ("hits_total", "counter", "Looked-up blocks served by the tier.", "hits"),
    ("misses_total", "counter", "Looked-up blocks the tier did not serve.", "misses"),
    ("evictions_total", "counter", "Blocks evicted to make room.", "evictions"),
    ("offloaded_blocks_total", "counter", "Blocks committed into the tier.", "blocks_offloaded"),
    ("offloaded_bytes_total", "counter", "Bytes committed into the tier.", "bytes_offloaded"),
    ("onboarded_blocks_total", "counter", "Blocks read from the tier towards the engine.", "blocks_onboarded"),
    ("onboarded_bytes_total", "counter", "Bytes read from the tier towards the engine.", "bytes_onboarded"),
    ("transfers_total", "counter", "Transfer jobs completed.", "transfers"),
    ("transfer_failures_total", "counter", "Transfer jobs with at least one failed block.", "transfer_failures"),
    ("token_mismatches_total", "counter", "Hash hits with other tokens (served as misses).", "token_mismatches"),
    ("checksum_mismatches_total", "counter", "Blocks that failed checksum verification.", "checksum_mismatches"),
    (
        "io_errors_total",
        "counter",
        "Blocks that failed to move for another reason (disk full, EIO, lost job).",
        "io_errors",
    ),
    ("dropped_on_open_total", "counter", "Index records dropped at startup (damaged or foreign).", "dropped_on_open"),
    (
        "dropped_after_read_errors_total",
        "counter",
        "Blocks dropped after failing to read twice in a row.",
        "dropped_after_read_errors",
    ),
)


def _fmt(value: float | int | None) -> str:
    if value is None:
        return "NaN"
    return repr(float(value)) if isinstance(value, float) else str(value)
