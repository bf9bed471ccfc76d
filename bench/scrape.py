"""Reads the counters a benchmark reports from the servers: vLLM's Prometheus ``/metrics``
and kvbm's JSON ``/stats``. Counters are cumulative, so a workload's figures are the
difference of two snapshots taken around it (:func:`delta`)."""

from __future__ import annotations

import httpx

# vLLM's counters as exposed (Prometheus adds _total to counters), in tokens: G1 prefix-cache
# lookups and hits, the connector's (tokens it was asked about beyond G1, and tokens it
# supplied); and the sum of NIXL's transferred-bytes histogram.
VLLM_COUNTERS = (
    "vllm:prefix_cache_queries_total",
    "vllm:prefix_cache_hits_total",
    "vllm:external_prefix_cache_queries_total",
    "vllm:external_prefix_cache_hits_total",
    "vllm:nixl_bytes_transferred_sum",
)


def vllm_counters(server_url: str) -> dict[str, float]:
    """Each of :data:`VLLM_COUNTERS`, summed over label sets (0 when absent)."""
    text = httpx.get(server_url + "/metrics", timeout=30).text
    totals = dict.fromkeys(VLLM_COUNTERS, 0.0)
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in totals:
            totals[name] += float(line.rsplit(" ", 1)[1])
    return totals


# kvbm's counters the benchmarks report (tier block lookups and moves, pulls from a prefill).
KVBM_COUNTERS = tuple(
    f"{tier}.{field}" for tier in ("g2", "g3") for field in ("hits", "misses", "blocks_onboarded", "blocks_offloaded")
) + (
    "remote.pulls.blocks_pulled",
    "remote.pulls.bytes_pulled",
    "remote.pulls.blocks_failed",
    "remote.pulls.jobs_failed",
    "remote.load_error_blocks",
)


def kvbm_stats(stats_url: str) -> dict[str, float]:
    """The :data:`KVBM_COUNTERS` kvbm's ``/stats`` has (a tier or endpoint it lacks: absent)."""
    flat = _flatten(httpx.get(stats_url + "/stats", timeout=30).json())
    return {k: flat[k] for k in KVBM_COUNTERS if k in flat}


def _flatten(tree: dict, prefix: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    for key, value in tree.items():
        if key == "tiers":
            out.update(_flatten(value, prefix))
        elif isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[prefix + key] = value
    return out


def delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: v - before.get(k, 0) for k, v in after.items()}
