"""The connector's hot path under concurrency: vLLM alone against vLLM + kvbm, interleaved.

    python -m bench.hot_path [--quick] [--models tiny,bench] [--streams 1,16,64]
        [--rounds N] [--setups vllm,kvbm-g2,...] [--loads cold,hit] [--out DIR]

Contract:
    * Every setup of a model is started at once and stays up (:class:`bench.stack.Stack`, one
      server each, both cores), and the loads interleave: for each stream count and workload,
      round after round, every setup runs the same load in turn (the order rotates each
      round), so the machine's noise falls on all of them alike. An idle server is not free:
      vLLM's worker spins on a core for a second after its last work (each load starts
      :data:`SETTLE_S` after the one before), and these VMs run a DAMON ``pageout`` scheme
      that drops file pages idle for a minute (a server's torch and vLLM code), so the first
      seconds of work after that stall re-reading them. Each measured load therefore follows
      a short untimed load on the same server (:data:`TOUCH_REQUESTS` cold requests).
    * Setups (:data:`SETUPS`): vLLM alone (no connector); vLLM + kvbm G2 (write-through, the
      default); G2+G3; G2 offloading on eviction only; and the G2 setup through kvbm's router
      (the same server, behind its router: one HTTP hop more). Every other row is measured
      directly at its server.
    * Workloads per stream count (``8 x streams`` requests, at least 16; streaming, 32 tokens
      out): ``cold``, every prompt a document of its own (nothing for kvbm to hit: its cost
      alone), and ``hit``, 24 documents of 512 tokens taken in turn under a G1 capped at
      :data:`G1_BLOCKS` blocks, so a document comes back after G1 has evicted it (vLLM alone
      recomputes it, kvbm loads it from G2). Each round uses documents of its own.
    * Reported per setup, stream count and workload: tok/s and ITL p50/p99 pooled over the
      rounds, each as a ratio to vLLM alone, with the median and spread (min-max) of the
      per-round tok/s ratios (each round's against vLLM alone's load in the same round).
    * Goals (issue #15), on the median per-round tok/s ratio and the pooled ITL p50 ratio:
      ``cold``: kvbm rows >= 0.97x vLLM's throughput and ITL p50 <= 1.05x;
      through the router >= 0.95x; ``hit``: kvbm rows ahead of vLLM alone (> 1x). A missed
      goal is reported, not an exit status; exit status 1 when a setup did not start.
    * Output: the table on stdout and ``hot_path.md``, ``hot_path.json`` in ``--out``
      (bench/results, or bench/results/quick with ``--quick``).

``--quick``: the tiny model, 16 streams, one round. ``--setups`` and ``--loads`` measure a
subset (vLLM alone is always in: the ratios are to it; ``router`` brings ``kvbm-g2`` up too).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from bench.disagg_load import pooled, replay, resolve_rounds, start_run
from bench.load import LoadResult
from bench.machine import cuda_devices, summary
from bench.measure import RESULTS, make_context
from bench.stack import Connector, Setup, Stack
from bench.timing import format_table
from bench.workloads import Workload, shared_documents
from kvbm.serving.vllm_settings import EngineSettings

SEED = 15
ANSWER_TOKENS = 32
COLD_DOC_TOKENS, QUESTION_TOKENS = 256, 16
HIT_DOCUMENTS, HIT_DOC_TOKENS = 24, 512
# 16,384 tokens: 16 streams' working set (16 x 18 blocks) leaves room for 14 of the hit
# workload's 24 documents (16 blocks each), so each is evicted before it comes back.
G1_BLOCKS = 512
MAX_MODEL_LEN = 1024
MIN_REQUESTS = 16
REQUESTS_PER_STREAM = 8
DEFAULT_ROUNDS = 3
WARMUP = 8
# vLLM's idle worker spins on its core for 1 s (shm_broadcast's busy loop) before it sleeps;
# on a fast machine a load lasts about as long, and the next setup's would run beside the spin.
SETTLE_S = 2.0
TOUCH_REQUESTS = 4  # the untimed load before each measured one (cold documents of their own)
TOUCH_NUMBERS = 1000  # its workload numbers start here, past any round's
G2 = {"g2_capacity_bytes": "512MiB"}

# Goals against vLLM alone.
COLD_MIN_TOK_S, COLD_MAX_ITL_P50, ROUTER_MIN_TOK_S, HIT_MIN_TOK_S = 0.97, 1.05, 0.95, 1.0


@dataclasses.dataclass(frozen=True)
class Row:
    """One measured setup: a :class:`Setup` (its own server) or another row's router."""

    key: str
    name: str
    setup: Setup | None = None
    router_of: str | None = None  # measured through this row's router instead of its server


SETUPS = (
    Row("vllm", "vLLM alone", Setup("vLLM alone", Connector.NONE)),
    Row("kvbm-g2", "vLLM + kvbm G2", Setup("vLLM + kvbm G2", Connector.KVBM, extra_config=G2)),
    Row(
        "kvbm-g2g3",
        "vLLM + kvbm G2+G3",
        Setup("vLLM + kvbm G2+G3", Connector.KVBM, extra_config=G2, g3_capacity="2GiB"),
    ),
    Row(
        "kvbm-evict",
        "vLLM + kvbm G2, on eviction",
        Setup("vLLM + kvbm G2 on eviction", Connector.KVBM, extra_config={**G2, "offload_policy": "on_eviction"}),
    ),
    Row("router", "kvbm G2 through the router", router_of="kvbm-g2"),
)
BASELINE = "vllm"


def workload(kind: str, vocab: int, requests: int, number: int) -> Workload:
    """Round ``number``'s ``cold`` or ``hit`` load (documents of its own each round)."""
    seed = SEED + 10 * number + (1 if kind == "hit" else 0)
    if kind == "cold":
        return shared_documents(seed, vocab, requests, COLD_DOC_TOKENS, QUESTION_TOKENS, requests, ANSWER_TOKENS)
    return shared_documents(seed, vocab, HIT_DOCUMENTS, HIT_DOC_TOKENS, QUESTION_TOKENS, requests, ANSWER_TOKENS)


def rotated(rows: Sequence[Row], number: int) -> list[Row]:
    """The setups in round ``number``'s order: each round starts one setup later."""
    shift = number % len(rows)
    return list(rows[shift:]) + list(rows[:shift])


def figures(results: dict[str, list[LoadResult]]) -> dict[str, dict]:
    """Pooled figures per setup, as ratios to :data:`BASELINE`, with per-round spreads."""
    base = results[BASELINE]
    base_summary = pooled(base).summary()
    out = {}
    for key, loads in results.items():
        summary = pooled(loads).summary()
        per_round = [
            load.summary()["output_tok_s"] / ref.summary()["output_tok_s"]
            for load, ref in zip(loads, base)
            if load.timings and ref.timings
        ]
        out[key] = {
            "tok_s": summary["output_tok_s"],
            "itl_p50_ms": summary["itl_p50_ms"],
            "itl_p99_ms": summary["itl_p99_ms"],
            "requests": summary["requests"],
            "tok_s_ratio": summary["output_tok_s"] / base_summary["output_tok_s"],
            "itl_p50_ratio": summary["itl_p50_ms"] / base_summary["itl_p50_ms"],
            "itl_p99_ratio": summary["itl_p99_ms"] / base_summary["itl_p99_ms"],
            "tok_s_ratio_spread": [min(per_round), max(per_round)] if per_round else None,
            "tok_s_ratio_median": float(np.median(per_round)) if per_round else None,
        }
    return out


def goals(kind: str, key: str, row: dict) -> list[tuple[str, bool]]:
    """(label, met) for one setup's figures in one workload."""
    if key == BASELINE:
        return []
    # The median of the per-round ratios: one stall of the shared machine (seconds without a
    # token, seen for every setup, vLLM alone included) must not decide a goal.
    ratio = row.get("tok_s_ratio_median") or row["tok_s_ratio"]
    if kind == "hit":
        return [] if key == "router" else [(f"tok/s >{HIT_MIN_TOK_S:g}x", ratio > HIT_MIN_TOK_S)]
    if key == "router":
        return [(f"tok/s >={ROUTER_MIN_TOK_S:g}x", ratio >= ROUTER_MIN_TOK_S)]
    return [
        (f"tok/s >={COLD_MIN_TOK_S:g}x", ratio >= COLD_MIN_TOK_S),
        (f"ITL p50 <={COLD_MAX_ITL_P50:g}x", row["itl_p50_ratio"] <= COLD_MAX_ITL_P50),
    ]


def table(results: dict) -> str:
    rows = []
    for group in results["groups"]:
        for key, row in group["setups"].items():
            spread = row["tok_s_ratio_spread"]
            verdicts = " ".join(("✓ " if met else "✗ ") + label for label, met in goals(group["workload"], key, row))
            rows.append(
                (
                    group["model"],
                    group["streams"],
                    group["workload"],
                    NAMES[key],
                    f"{row['tok_s']:.0f} ({row['tok_s_ratio']:.3f}x"
                    + (
                        f"; rounds median {row['tok_s_ratio_median']:.2f}, {spread[0]:.2f}-{spread[1]:.2f}"
                        if spread and key != BASELINE
                        else ""
                    )
                    + ")",
                    f"{row['itl_p50_ms']:.1f} ({row['itl_p50_ratio']:.2f}x)",
                    f"{row['itl_p99_ms']:.0f} ({row['itl_p99_ratio']:.2f}x)",
                    verdicts or "-",
                )
            )
    return format_table(
        ("model", "streams", "load", "setup", "tok/s (x vLLM alone)", "ITL p50 ms", "ITL p99 ms", "goals"), rows
    )


NAMES = {row.key: row.name for row in SETUPS}


def run_model(model: str, args: argparse.Namespace, log_dir: Path, results: dict) -> None:
    context = make_context(model, log_dir, args.scratch_dir, cuda_devices())
    engine = EngineSettings(model=context.model, max_model_len=MAX_MODEL_LEN, num_gpu_blocks_override=G1_BLOCKS)
    rows = args.setups
    with contextlib.ExitStack() as stacks:
        urls: dict[str, str] = {}
        started: dict[str, Stack] = {}
        for row in rows:
            if row.setup is not None:
                stack = stacks.enter_context(
                    Stack(row.setup, engine, model, log_dir, args.scratch_dir, context.cuda_devices)
                )
                started[row.key] = stack
                urls[row.key] = stack.workers[0].server.url
        for row in rows:
            if row.router_of is not None:
                urls[row.key] = started[row.router_of].url
        measured = [row for row in rows if row.key in urls]
        for url in urls.values():
            replay(url, model, workload("cold", context.vocab, WARMUP, -1), WARMUP, None)
        touches = 0
        for streams in args.streams:
            requests = max(MIN_REQUESTS, REQUESTS_PER_STREAM * streams)
            for kind in args.loads:
                loads: dict[str, list[LoadResult]] = {row.key: [] for row in measured}
                errors: dict[str, list[str]] = {row.key: [] for row in measured}
                for number in range(args.rounds):
                    for row in rotated(measured, number):
                        time.sleep(SETTLE_S)
                        touches += 1
                        replay(
                            urls[row.key],
                            model,
                            workload("cold", context.vocab, TOUCH_REQUESTS, TOUCH_NUMBERS + touches),
                            TOUCH_REQUESTS,
                            None,
                        )
                        result, failed = replay(
                            urls[row.key], model, workload(kind, context.vocab, requests, number), streams, None
                        )
                        loads[row.key].append(result)
                        errors[row.key] += failed
                    tok_s = ", ".join(
                        f"{row.key} {loads[row.key][-1].summary()['output_tok_s']:.0f}" for row in measured
                    )
                    print(
                        f"  {model}, {streams} streams, {kind}: round {number + 1} of {args.rounds} done "
                        f"(tok/s: {tok_s})",
                        file=sys.stderr,
                        flush=True,
                    )
                group = {
                    "model": model,
                    "streams": streams,
                    "workload": kind,
                    "requests": requests,
                    "setups": figures(loads),
                    "errors": {k: v[:3] for k, v in errors.items() if v},
                }
                results["groups"].append(group)
                write(results, args.out)


def write(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "hot_path.json").write_text(json.dumps(results, indent=1, sort_keys=True))
    (out / "hot_path.md").write_text(
        f"# The connector's hot path\n\n`{results['command']}`, {results['started']}.\n\n"
        f"Machine: {summary(results['machine'])}\n\n{COLD_AND_HIT}\n\n{table(results)}\n"
    )


COLD_AND_HIT = (
    f"`cold`: every prompt a {COLD_DOC_TOKENS}-token document of its own plus a {QUESTION_TOKENS}-token "
    f"question (nothing to hit); `hit`: {HIT_DOCUMENTS} documents of {HIT_DOC_TOKENS} tokens in turn, "
    f"G1 capped at {G1_BLOCKS} blocks so each comes back after G1 evicted it. {ANSWER_TOKENS} tokens out; "
    f"setups interleaved round by round; ratios to vLLM alone, spread = per-round min-max."
)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny model, 16 streams, one round")
    parser.add_argument(
        "--models", type=lambda s: [m for m in s.split(",") if m], help="embedded presets (default tiny,bench)"
    )
    parser.add_argument(
        "--streams",
        type=lambda s: [int(x) for x in s.split(",") if x],
        help="requests in flight, comma-separated (default 1,16,64)",
    )
    parser.add_argument("--rounds", type=int, help=f"interleaved rounds (default {DEFAULT_ROUNDS}, 1 with --quick)")
    parser.add_argument(
        "--setups", type=lambda s: [k for k in s.split(",") if k], help=f"a subset of {','.join(NAMES)} (default all)"
    )
    parser.add_argument(
        "--loads",
        type=lambda s: [k for k in s.split(",") if k],
        default=["cold", "hit"],
        help="cold, hit or both (default cold,hit)",
    )
    parser.add_argument("--out", type=Path, help="results directory (default bench/results)")
    parser.add_argument("--scratch-dir", type=Path, default=Path("/var/tmp"))
    args = parser.parse_args(argv)
    args.models = args.models or (["tiny"] if args.quick else ["tiny", "bench"])
    args.streams = args.streams or ([16] if args.quick else [1, 16, 64])
    args.rounds = resolve_rounds(parser, args, DEFAULT_ROUNDS)
    args.out = args.out or (RESULTS / "quick" if args.quick else RESULTS)
    args.setups = chosen_setups(parser, args.setups)
    if unknown := set(args.loads) - {"cold", "hit"}:
        parser.error(f"unknown --loads {','.join(sorted(unknown))}: choose from cold,hit")
    return args


def chosen_setups(parser: argparse.ArgumentParser, keys: Sequence[str] | None) -> list[Row]:
    """The rows to bring up, in :data:`SETUPS` order: ``keys``, vLLM alone, and the server of
    a chosen router row."""
    if not keys:
        return list(SETUPS)
    if unknown := set(keys) - set(NAMES):
        parser.error(f"unknown --setups {','.join(sorted(unknown))}: choose from {','.join(NAMES)}")
    wanted = {BASELINE, *keys}
    wanted |= {row.router_of for row in SETUPS if row.key in wanted and row.router_of}
    return [row for row in SETUPS if row.key in wanted]


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    log_dir, results = start_run("bench.hot_path", argv)
    results["groups"] = []
    failed = False
    for model in args.models:
        try:
            run_model(model, args, log_dir, results)
        except (RuntimeError, OSError) as error:
            failed = True
            results.setdefault("errors", []).append(f"{model}: {type(error).__name__}: {error}")
            print(f"{model}: {type(error).__name__}: {error}", file=sys.stderr)
    write(results, args.out)
    print(table(results))
    print(f"wrote {args.out / 'hot_path.md'}, hot_path.json (server logs in {log_dir})")
    if failed:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
