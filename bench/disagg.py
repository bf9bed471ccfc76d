"""Disaggregated serving: kvbm 1 prefill + 1 decode against one aggregated vLLM server and
against vLLM's own NixlConnector 1 prefill + 1 decode, same run, same requests.

    python -m bench.disagg [--quick] [--model bench|tiny] [--only aggregated kvbm nixl] [--json PATH]

The load (fixed seed) alternates unique long prompts with short outputs and short prompts
with long outputs, from a few concurrent clients: in one aggregated server the long
prefills stall the running decodes (inter-token latency spikes); split, the prefill
worker computes them and the decode worker pulls their KV. Every setup is served
through kvbm's router (see :mod:`bench.stack`), with prefix caching on.

Reported per setup: TTFT and inter-token latency p50/p99 (client side, streaming),
throughput (output tokens/s over the whole load), and KV bytes moved per request:
for kvbm the decode worker's ``remote.pulls.bytes_pulled`` (its stats endpoint); for
NixlConnector the decode server's ``vllm:nixl_bytes_transferred`` histogram sum where
NIXL reports it, else an estimate (every prompt block x the block's bytes), as labelled.

``--quick`` is a smoke run: the tiny model and a handful of short requests.
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import httpx

from bench.machine import describe
from bench.measure import RESULTS, Context, add_arguments, context_from_args, measure
from bench.stack import Connector, Setup, exit_on_sigterm
from bench.timing import format_table
from bench.workloads import Workload, mixed
from kvbm.serving.vllm_settings import EngineSettings

SEED = 7


@dataclasses.dataclass(frozen=True)
class Scale:
    requests: int
    long_prompt: int
    short_gen: int
    short_prompt: int
    long_gen: int
    concurrency: int
    max_model_len: int
    budget_s: float  # per setup: no new request after this, so one stalled setup cannot hold up the suite


FULL = Scale(
    requests=24,
    long_prompt=3000,
    short_gen=32,
    short_prompt=256,
    long_gen=256,
    concurrency=4,
    max_model_len=4096,
    budget_s=900.0,
)
QUICK = Scale(
    requests=6,
    long_prompt=768,
    short_gen=8,
    short_prompt=64,
    long_gen=32,
    concurrency=2,
    max_model_len=2048,
    budget_s=300.0,
)

SETUPS = {
    "aggregated": Setup("vLLM aggregated", Connector.NONE),
    "kvbm": Setup("kvbm 1P+1D", Connector.KVBM, disaggregated=True, extra_config={"g2_capacity_bytes": "512MiB"}),
    "nixl": Setup("NixlConnector 1P+1D", Connector.NIXL, disaggregated=True),
}


def engine_settings(context: Context, scale: Scale) -> EngineSettings:
    return EngineSettings(model=context.model, max_model_len=scale.max_model_len)


def workload(context: Context, scale: Scale) -> Workload:
    return mixed(
        SEED, context.vocab, scale.requests, scale.long_prompt, scale.short_gen, scale.short_prompt, scale.long_gen
    )


def run_setup(setup: Setup, context: Context, scale: Scale) -> dict:
    """One row: the setup's figures, or its error (the other setups still run)."""
    engine = engine_settings(context, scale)
    load = workload(context, scale)
    try:
        measured = measure(setup, engine, context, [(load, scale.concurrency)], scale.budget_s)[load.name]
    except (RuntimeError, OSError, httpx.HTTPError) as error:
        return {"setup": setup.name, "error": f"{type(error).__name__}: {error}"}
    moved = kv_moved(
        setup, measured["counters"], load, measured["load"]["requests"], context.block_bytes(engine), engine.block_size
    )
    row = {"setup": setup.name, **measured["load"], **moved}
    row["notes"] = notes(setup, measured["counters"], measured["load"], scale.budget_s, context.cuda_devices)
    row["counters"] = measured["counters"]
    return row


def kv_moved(setup: Setup, counters: dict, load: Workload, n: int, block_bytes: int, block_size: int) -> dict:
    """KV bytes moved from prefill to decode per request (``n`` requests ran), and where the
    figure comes from."""
    estimate = sum(-(-len(r.prompt) // block_size) for r in load.requests) * block_bytes / len(load.requests)
    if setup.connector is Connector.KVBM:
        return {
            "kv_bytes_per_request": counters["decode"].get("kvbm.remote.pulls.bytes_pulled", 0) / n,
            "kv_bytes_source": "measured (decode remote.pulls.bytes_pulled)",
        }
    if setup.connector is Connector.NIXL:
        measured = counters["decode"]["vllm:nixl_bytes_transferred_sum"]
        if measured > 0:
            return {
                "kv_bytes_per_request": measured / n,
                "kv_bytes_estimate": estimate,
                "kv_bytes_source": "measured (decode vllm:nixl_bytes_transferred)",
            }
        return {"kv_bytes_per_request": estimate, "kv_bytes_source": "estimate (prompt blocks x block bytes)"}
    return {"kv_bytes_per_request": 0.0, "kv_bytes_source": "none (one server)"}


def notes(setup: Setup, counters: dict, load: dict, budget_s: float, cuda_devices: int) -> str:
    """What would make a row mean something else than it says: requests that fell back to
    aggregated serving, failed pulls, a run cut short by its time budget, NixlConnector's
    settings on this machine."""
    requests = load["requests"]
    out = []
    if load["skipped"]:
        out.append(f"stopped at the {budget_s:.0f} s budget: {requests} of {requests + load['skipped']} requests ran")
    if setup.connector is Connector.NIXL:
        out.append(
            "NIXL progress thread on (vLLM's default)"
            if cuda_devices
            else "NIXL progress thread on (it hung the prefill when off), one UCX worker"
        )
    if setup.disaggregated:
        handed_off = counters["router"]["disaggregated"]
        if handed_off < requests:
            out.append(f"{requests - handed_off} of {requests} requests not handed off (ran aggregated)")
    failed = counters.get("decode", {}).get("kvbm.remote.pulls.blocks_failed", 0)
    if failed:
        out.append(f"{failed:.0f} pulled blocks failed (recomputed)")
    return "; ".join(out)


def table(rows: list[dict]) -> str:
    headers = [
        "setup",
        "TTFT p50 ms",
        "TTFT p99 ms",
        "ITL p50 ms",
        "ITL p99 ms",
        "output tok/s",
        "KV MB/request",
        "KV bytes from",
        "notes",
    ]
    body = []
    for row in rows:
        if "error" in row:
            body.append([row["setup"], *["-"] * 7, row["error"].splitlines()[0]])
            continue
        body.append(
            [
                row["setup"],
                row["ttft_p50_ms"],
                row["ttft_p99_ms"],
                row["itl_p50_ms"],
                row["itl_p99_ms"],
                row["output_tok_s"],
                row["kv_bytes_per_request"] / 1e6,
                row["kv_bytes_source"],
                row["notes"] or "-",
            ]
        )
    return format_table(headers, body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser, RESULTS / "disagg.json")
    parser.add_argument("--only", nargs="+", choices=sorted(SETUPS), default=list(SETUPS))
    args = parser.parse_args()
    exit_on_sigterm()
    scale = QUICK if args.quick else FULL
    context = context_from_args(args)
    rows = [run_setup(SETUPS[name], context, scale) for name in args.only]
    load = workload(context, scale)
    print(
        f"\nDisaggregated serving, {context.preset} model: {load.description}, "
        f"{scale.concurrency} concurrent clients (server logs in {context.log_dir})"
    )
    print(table(rows))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps(
            {
                "machine": describe(),
                "model": context.preset,
                "workload": load.description,
                "concurrency": scale.concurrency,
                "rows": rows,
            },
            indent=2,
        )
    )
    print(f"wrote {args.json}")
    if any("error" in row for row in rows):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
