"""PNG plots of the suite's results (matplotlib, no display needed).

One figure per part: the micro benchmarks as ratios to their floors (one panel each, the
goal drawn as a line), the end-to-end comparison (TTFT and throughput per workload) and the
disaggregated rows (TTFT and inter-token latency), and disaggregated serving under load
(throughput, TTFT and ITL with the goals' thresholds). Rows that did not run are left out.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402 - after choosing the backend


def micro(results: dict[str, dict], path: Path, subtitle: str) -> None:
    """``results``: name -> {"ratios": [(row label, column, value)], "goal": float | None}."""
    panels = [(name, r) for name, r in results.items() if r.get("ratios")]
    if not panels:
        return
    fig, axes = plt.subplots(
        len(panels),
        1,
        figsize=(9, 2.2 + 0.28 * sum(len(r["ratios"]) for _, r in panels)),
        squeeze=False,
        gridspec_kw={"height_ratios": [max(2, len(r["ratios"])) for _, r in panels]},
    )
    for ax, (name, r) in zip(axes[:, 0], panels):
        labels = [f"{label} {column}" for label, column, _ in r["ratios"]]
        values = [value for _, _, value in r["ratios"]]
        ax.barh(range(len(values)), values, color="tab:blue")
        ax.set_yticks(range(len(values)), labels, fontsize=7)
        ax.invert_yaxis()
        if r.get("goal") is not None:
            ax.axvline(r["goal"], color="tab:red", linestyle="--", linewidth=1, label=f"goal {r['goal']}")
            ax.legend(fontsize=7, loc="best")
        ax.set_title(f"{name}: ratio to the floor measured in the same run", fontsize=9)
    fig.suptitle(subtitle, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def e2e(rows: list[dict], workloads: list[str], path: Path, subtitle: str) -> None:
    ran = [r for r in rows if "workloads" in r]
    if not ran:
        return
    fig, axes = plt.subplots(len(workloads), 2, figsize=(11, 3.2 * len(workloads)), squeeze=False)
    names = [r["setup"] for r in ran]
    for (ttft_ax, tput_ax), workload in zip(axes, workloads):
        figures = [r["workloads"][workload] for r in ran]
        _grouped(
            ttft_ax, names, {"p50": [f["ttft_p50_ms"] for f in figures], "p99": [f["ttft_p99_ms"] for f in figures]}
        )
        ttft_ax.set_ylabel("TTFT ms")
        ttft_ax.set_title(f"{workload}: time to first token", fontsize=9)
        tput_ax.bar(range(len(names)), [f["output_tok_s"] for f in figures], color="tab:green")
        tput_ax.set_xticks(range(len(names)), names, rotation=20, ha="right", fontsize=7)
        tput_ax.set_ylabel("output tokens/s")
        tput_ax.set_title(f"{workload}: throughput", fontsize=9)
    fig.suptitle(subtitle, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def disagg(rows: list[dict], path: Path, subtitle: str) -> None:
    ran = [r for r in rows if "error" not in r]
    if not ran:
        return
    names = [r["setup"] for r in ran]
    fig, (ttft_ax, itl_ax) = plt.subplots(1, 2, figsize=(11, 3.6))
    _grouped(ttft_ax, names, {"p50": [r["ttft_p50_ms"] for r in ran], "p99": [r["ttft_p99_ms"] for r in ran]})
    ttft_ax.set_ylabel("TTFT ms")
    ttft_ax.set_title("time to first token", fontsize=9)
    _grouped(itl_ax, names, {"p50": [r["itl_p50_ms"] for r in ran], "p99": [r["itl_p99_ms"] for r in ran]})
    itl_ax.set_ylabel("inter-token latency ms")
    itl_ax.set_title("inter-token latency", fontsize=9)
    fig.suptitle(subtitle, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def disagg_load(panels: list[dict], path: Path, subtitle: str) -> None:
    """``panels``: one per model and stream count, {"title", "rows", "lines"}: throughput,
    TTFT p50/p99 and ITL p50/p99 per setup that ran, and each goal's threshold ("lines":
    figure key -> value or None) drawn as a dashed line."""
    panels = [p for p in panels if any("error" not in r and "output_tok_s" in r for r in p["rows"])]
    if not panels:
        return
    fig, axes = plt.subplots(len(panels), 3, figsize=(14, 3.6 * len(panels)), squeeze=False)
    for (tput_ax, ttft_ax, itl_ax), panel in zip(axes, panels):
        ran = [r for r in panel["rows"] if "error" not in r and "output_tok_s" in r]
        names = [r["name"] for r in ran]
        tput_ax.bar(range(len(names)), [r["output_tok_s"] for r in ran], color="tab:green")
        tput_ax.set_xticks(range(len(names)), names, rotation=20, ha="right", fontsize=7)
        tput_ax.set_ylabel("output tokens/s")
        _grouped(ttft_ax, names, {"p50": [r["ttft_p50_ms"] for r in ran], "p99": [r["ttft_p99_ms"] for r in ran]})
        ttft_ax.set_ylabel("TTFT ms")
        _grouped(itl_ax, names, {"p50": [r["itl_p50_ms"] for r in ran], "p99": [r["itl_p99_ms"] for r in ran]})
        itl_ax.set_ylabel("inter-token latency ms")
        for ax, key, what, label in (
            (tput_ax, "output_tok_s", "throughput", "goal: 0.8x kvbm aggregated"),
            (ttft_ax, "ttft_p99_ms", "time to first token", "goal p99: 1.2x kvbm aggregated"),
            (itl_ax, "itl_p99_ms", "inter-token latency", "goal p99: kvbm aggregated"),
        ):
            ax.set_title(f"{panel['title']}: {what}", fontsize=9)
            if panel["lines"].get(key) is not None:
                ax.axhline(panel["lines"][key], color="tab:red", linestyle="--", linewidth=1, label=label)
                ax.legend(fontsize=7)
    fig.suptitle(subtitle, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _grouped(ax, names: list[str], series: dict[str, list[float]]) -> None:
    width = 0.8 / len(series)
    for i, (label, values) in enumerate(series.items()):
        ax.bar([x + i * width for x in range(len(names))], values, width, label=label)
    ax.set_xticks(
        [x + width * (len(series) - 1) / 2 for x in range(len(names))], names, rotation=20, ha="right", fontsize=7
    )
    ax.legend(fontsize=7)
