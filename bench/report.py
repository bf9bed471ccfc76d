"""Renders the suite's results (the dict written to results.json) as results.md."""

from __future__ import annotations

from bench import disagg, e2e
from bench.machine import summary


def render(results: dict) -> str:
    machine = results["machine"]
    mode = (
        "**smoke run** (`--quick`: tiny model, small workloads; not for comparison)" if results["quick"] else "full run"
    )
    parts = [
        "# kvbm benchmark results",
        "",
        f"`{results['command']}`, {mode}, {results['started']} - {results['finished']}.",
        "",
        f"Machine: {summary(machine)}. Load average at start {machine['load_average']}, "
        f"at end {results['load_average_end']}. Details in results.json.",
        "",
    ]
    if "micro" in results:
        parts += _micro(results["micro"])
    if "connector_ttft" in results:
        parts += ["## Connector TTFT", "", *_output(results["connector_ttft"]), ""]
    if "e2e" in results:
        parts += _e2e(results["e2e"])
    if "disagg" in results:
        parts += _disagg(results["disagg"])
    if results.get("logs"):
        parts += [f"Server logs: `{results['logs']}`.", ""]
    return "\n".join(parts)


def _micro(micro: dict) -> list[str]:
    out = [
        "## Micro benchmarks",
        "",
        "Each ratio is against a floor timed in the same run, interleaved with the candidate.",
        "",
    ]
    for name, result in micro.items():
        out += [f"### {name}", "", *_output(result), ""]
    return out + ["![micro benchmarks: ratios to their floors](micro.png)", ""]


def _output(result: dict) -> list[str]:
    lines = [f"`{result['command']}` ({result['seconds']:.0f} s)", ""]
    if "error" in result:
        return lines + ["Failed:", "", "```", result["error"], "```"]
    return lines + [result["output"]]


def _e2e(part: dict) -> list[str]:
    out = [
        "## End to end against peers",
        "",
        f"`{part['model']}` model, one server per setup, G1 {part['g1_blocks']} blocks, "
        f'{part["concurrency"]} concurrent clients. "from G1 %" and "from connector %" are '
        "shares of prompt tokens (vLLM's prefix-cache counters); kvbm's hit rates count block "
        "lookups in its tier.",
        "",
    ]
    for name, description in part["workloads"].items():
        out += [f"### {name}: {description}", "", e2e.table(part["rows"], name), ""]
    return out + ["![end to end](e2e.png)", ""]


def _disagg(part: dict) -> list[str]:
    return [
        "## Disaggregated serving",
        "",
        f"`{part['model']}` model: {part['workload']}, {part['concurrency']} concurrent clients.",
        "",
        disagg.table(part["rows"]),
        "",
        "![disaggregated serving](disagg.png)",
        "",
    ]
