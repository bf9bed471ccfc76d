"""Disaggregated serving under concurrent load, against the same hardware run aggregated.

    python -m bench.disagg_load [--quick] [--models tiny,bench] [--streams 16,64]
        [--setups vllm,kvbm-agg,kvbm-1p1d,nixl-1p1d] [--requests N] [--budget-s S] [--out DIR]

Contract:
    * For every model and every stream count, the setups run one at a time in the order
      given: each is started, warmed up (:data:`WARMUP` requests over documents of their own,
      not measured), loaded, and stopped with all its processes before the next one starts
      (the machine has few cores; two setups at once would measure each other). A setup that
      does not start, or whose counters cannot be read, becomes a row with its error and the
      others still run. Results are written after every setup, so a long run cut short keeps
      what it measured.
    * Setups, all behind kvbm's router (one extra HTTP hop for every row), prefix caching on:

      ==========  ==========================================================================
      vllm        vLLM alone: one server on all the cores, no connector
                  (:mod:`bench.disagg`'s aggregated setup, through :class:`bench.stack.Stack`)
      kvbm-agg    kvbm aggregated on equal hardware: ``kvbm serve --prefill 0 --decode 2``,
                  two workers with one core's share each
      kvbm-1p1d   kvbm disaggregated: ``kvbm serve --prefill 1 --decode 1``
      nixl-1p1d   vLLM's NixlConnector 1 prefill + 1 decode with the CPU settings of
                  :mod:`bench.disagg` (``kv_buffer_device: cpu``, one UCX worker, its own
                  side-channel port per server, NIXL's progress thread on: see bench/README.md)
      ==========  ==========================================================================

      Both kvbm rows run the serve command's own stack (:class:`kvbm.serving.serve.ServeStack`)
      in a process of its own, as ``kvbm serve`` runs, with the router settings of
      :mod:`bench.stack`, so they differ only in their roles.
    * Load (token ids, fixed seed, :func:`bench.workloads.shared_documents`): streaming
      completions over 8 shared documents of 256 tokens (about 200 words), each prompt one
      document plus a 16-token question of its own, 32 tokens out; ``streams`` requests in
      flight, 4 x ``streams`` requests by default (64 at 16 streams, 256 at 64), run ``--rounds``
      times (3 by default) on the same servers, each round over documents of its own; the
      figures pool the rounds' requests (one 64-request load lasts seconds, and on a shared
      machine one such load can move by half). No request starts after the setup's time
      budget (the row says how many were skipped).
    * Reported per row: output tokens/s, TTFT and inter-token latency p50/p99 (client side),
      each beside its ratio to kvbm aggregated (equal hardware) and to vLLM alone of the same
      model and stream count; failed pulls, recomputed blocks and errors (a request that
      failed or streamed a number of tokens other than asked for). Where a counter is missing
      the cell says "n/a" and :func:`counter_sources` says why.
    * Goals (:func:`judge`), for kvbm 1P+1D against kvbm aggregated: no failed pull, no
      request left un-handed-off and no error; throughput >= 0.8x; ITL p99 <= 1x; TTFT p99
      <= 1.2x; and ahead of NixlConnector 1P+1D on every figure. Every row must have no error.
    * Output: the table on stdout, and ``disagg_load.md``, ``disagg_load.json`` (figures,
      goals, raw counter differences per role, the machine) and ``disagg_load.png`` in
      ``--out`` (bench/results, or bench/results/quick with ``--quick``). Exit status 1 when a
      setup did not run; a missed goal is reported, not an exit status (this is a benchmark).

``--quick`` is a smoke run: the tiny model, 16 streams, 32 requests.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime
import json
import math
import multiprocessing
import os
import shlex
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import httpx

from bench import disagg, scrape
from bench.load import LoadError, LoadResult, RequestTiming
from bench.load import _one as stream_one  # one streamed request, timed and token-checked
from bench.machine import cuda_devices, describe, summary
from bench.measure import METRICS_SETTLE_S, RESULTS, Context, make_context
from bench.stack import HEALTH_INTERVAL_S, REQUEST_TIMEOUT_S, START_TIMEOUT_S, Setup, Stack, exit_on_sigterm
from bench.timing import format_table
from bench.workloads import Workload, shared_documents
from kvbm.serving.aiohttp_transport import AiohttpTransport
from kvbm.serving.vllm_settings import EngineSettings

SEED = 14
WARMUP = 8  # requests before each measured load: first steps, NIXL handshakes, peer metadata
DOCUMENTS, DOC_TOKENS, QUESTION_TOKENS, ANSWER_TOKENS = 8, 256, 16, 32
MAX_MODEL_LEN = 1024
REQUESTS_PER_STREAM = 4
FULL_ROUNDS = 3
FULL_BUDGET_S = 900.0  # per setup; bench.disagg's NixlConnector row once ran 25 minutes unbounded
QUICK_BUDGET_S = 240.0
QUICK_REQUESTS = 32
SERVE_START_S = START_TIMEOUT_S + 60.0  # the workers start at once, each within START_TIMEOUT_S
SERVE_STOP_S = 120.0

# Goal thresholds, kvbm 1P+1D against kvbm aggregated on the same cores.
MIN_THROUGHPUT_RATIO = 0.8
MAX_ITL_P99_RATIO = 1.0
MAX_TTFT_P99_RATIO = 1.2

# Figures of a row: (key, column, higher is better).
FIGURES = (
    ("output_tok_s", "tok/s", True),
    ("ttft_p50_ms", "TTFT p50 ms", False),
    ("ttft_p99_ms", "TTFT p99 ms", False),
    ("itl_p50_ms", "ITL p50 ms", False),
    ("itl_p99_ms", "ITL p99 ms", False),
)

# vLLM counters read beside bench.scrape's: NixlConnector's failures (decode side) and
# leases that expired unread (prefill side), and preemptions (a G1 too small for the load).
VLLM_EXTRA = (
    "vllm:nixl_num_failed_transfers_total",
    "vllm:nixl_num_kv_expired_reqs_total",
    "vllm:num_preemptions_total",
)

VLLM, KVBM_AGG, KVBM_1P1D, NIXL_1P1D = "vllm", "kvbm-agg", "kvbm-1p1d", "nixl-1p1d"


@dataclasses.dataclass(frozen=True)
class SetupSpec:
    """One row's setup: a :class:`bench.stack.Stack` setup, or ``kvbm serve`` workers."""

    key: str
    name: str
    stack: Setup | None = None
    serve: tuple[int, int] | None = None  # (prefill, decode) workers of kvbm serve

    @property
    def disaggregated(self) -> bool:
        return self.stack.disaggregated if self.stack is not None else bool(self.serve and self.serve[0])


# kvbm's tier settings as bench.disagg's kvbm row has them, for both kvbm rows.
KVBM_FIELDS = dict(disagg.SETUPS["kvbm"].extra_config)

SETUPS = {
    VLLM: SetupSpec(VLLM, "vLLM alone", stack=dataclasses.replace(disagg.SETUPS["aggregated"], name="vLLM alone")),
    KVBM_AGG: SetupSpec(KVBM_AGG, "kvbm aggregated x2", serve=(0, 2)),
    KVBM_1P1D: SetupSpec(KVBM_1P1D, "kvbm 1P+1D", serve=(1, 1)),
    NIXL_1P1D: SetupSpec(NIXL_1P1D, "NixlConnector 1P+1D", stack=disagg.SETUPS["nixl"]),
}


@dataclasses.dataclass(frozen=True)
class Running:
    """A started setup: the router's URL and its workers as (role, URL, kvbm stats URL)."""

    url: str
    workers: tuple[tuple[str, str, str | None], ...]


# -- running one setup ------------------------------------------------------------------


@contextlib.contextmanager
def launch(spec: SetupSpec, context: Context, engine: EngineSettings, log_dir: Path) -> Iterator[Running]:
    """Starts ``spec``; leaving the block stops every process of it (also on errors)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    if spec.stack is not None:
        with Stack(spec.stack, engine, context.preset, log_dir, context.scratch_dir, context.cuda_devices) as stack:
            yield Running(stack.url, tuple((w.role.value, w.server.url, w.stats_url) for w in stack.workers))
        return
    # Imported here: the serve stack pulls in the tokenizer stack, which the table code never needs.
    from kvbm.serving.router_config import RouterConfig
    from kvbm.serving.serve import ServeOptions

    assert spec.serve is not None  # a setup is a Stack or serve workers
    prefill, decode = spec.serve
    options = ServeOptions(
        engine=engine,
        log_dir=log_dir,
        prefill=prefill,
        decode=decode,
        start_timeout_s=START_TIMEOUT_S,
        kvbm=KVBM_FIELDS,
        router=RouterConfig(
            model_name=context.preset, request_timeout_s=REQUEST_TIMEOUT_S, health_interval_s=HEALTH_INTERVAL_S
        ),
    )
    spawn = multiprocessing.get_context("spawn")
    ours, theirs = spawn.Pipe()
    process = spawn.Process(target=serve_in_child, args=(options, theirs), name="kvbm-serve")
    process.start()
    theirs.close()  # the child's end: ours sees end-of-file if the child dies before a word
    try:
        started = time.monotonic()
        while not ours.poll(1.0):
            if not process.is_alive():
                raise RuntimeError(f"the serve stack's process died (exit status {process.exitcode})")
            if time.monotonic() - started > SERVE_START_S:
                raise RuntimeError(f"the serve stack did not start within {SERVE_START_S:.0f} s")
        try:
            message = ours.recv()
        except EOFError:
            raise RuntimeError(f"the serve stack's process died (exit status {process.exitcode})") from None
        if message[0] == "error":
            raise RuntimeError(f"serve: {message[1]}")
        _, url, workers = message
        yield Running(url, tuple(tuple(w) for w in workers))
    finally:
        with contextlib.suppress(OSError):
            ours.send("stop")
        process.join(SERVE_STOP_S)
        if process.is_alive():
            process.terminate()
            process.join(SERVE_STOP_S)
        if process.is_alive():
            process.kill()
            process.join()


def serve_in_child(options, connection) -> None:
    """Runs :class:`~kvbm.serving.serve.ServeStack` as ``kvbm serve`` does, in a process of
    its own: the router's event loop must not share a GIL with the load generator (at 64
    streams both are busy nearly all the time). Sends ``("ready", url, workers)`` or
    ``("error", message)``, then serves until told to stop or the parent goes away."""
    exit_on_sigterm()
    try:
        from kvbm.serving.serve import ServeStack

        stack = ServeStack(options).start()
    except BaseException as error:  # noqa: BLE001 - reported to the parent, which decides
        connection.send(("error", f"{type(error).__name__}: {error}"))
        return
    try:
        connection.send(("ready", stack.url, [(w.role.value, w.url, w.stats_url) for w in stack.router.pool.all()]))
        connection.recv()  # "stop"
    except EOFError:
        pass  # the benchmark went away
    finally:
        stack.stop()


def replay(
    url: str, model: str, workload: Workload, streams: int, budget_s: float | None
) -> tuple[LoadResult, list[str]]:
    """Every request of ``workload``, ``streams`` at a time, and the errors of those that
    failed (a failed request is counted and the load goes on: one error must not hide how
    the rest fared). No request starts after ``budget_s``."""
    return asyncio.run(_replay(url, model, workload, streams, budget_s))


async def _replay(
    url: str, model: str, workload: Workload, streams: int, budget_s: float | None
) -> tuple[LoadResult, list[str]]:
    slots = asyncio.Semaphore(streams)
    timings: list[RequestTiming] = []
    errors: list[str] = []
    skipped = 0
    # The router's transport: httpcore's own pool costs the load generator a core at 64 streams.
    transport = AiohttpTransport(keepalive_expiry=5.0)
    async with httpx.AsyncClient(timeout=httpx.Timeout(REQUEST_TIMEOUT_S), transport=transport) as client:

        async def one(request) -> None:
            nonlocal skipped
            async with slots:
                if budget_s is not None and time.perf_counter() - start > budget_s:
                    skipped += 1
                    return
                try:
                    timings.append(await stream_one(client, url, model, request))
                except (LoadError, httpx.HTTPError, ValueError) as error:  # ValueError: a garbled event
                    errors.append(f"{type(error).__name__}: {error}"[:300])

        start = time.perf_counter()
        await asyncio.gather(*(one(r) for r in workload.requests))
        wall = time.perf_counter() - start
    return LoadResult(workload.name, streams, wall, tuple(timings), skipped), errors


def snapshot(running: Running) -> dict[str, dict[str, float]]:
    """Cumulative counters per worker role (workers of one role summed) and the router's."""
    out: dict[str, dict[str, float]] = {}
    for role, url, stats_url in running.workers:
        values = vllm_metrics(url)
        if stats_url is not None:
            values.update(kvbm_counters(stats_url))
        merged = out.setdefault(role, {})
        for name, value in values.items():
            merged[name] = merged.get(name, 0) + value
    router = httpx.get(running.url + "/stats", timeout=30).json()
    out["router"] = {
        name: router.get(name, 0)
        for name in ("requests", "succeeded", "disaggregated", "prefill_failures", "transfer_failures", "retries")
    }
    out["router"].update({f"errors.{kind}": n for kind, n in router.get("errors", {}).items()})
    return out


def vllm_metrics(server_url: str) -> dict[str, float]:
    """:data:`bench.scrape.VLLM_COUNTERS` and :data:`VLLM_EXTRA` from ``/metrics``, summed
    over label sets (0 when absent)."""
    text = httpx.get(server_url + "/metrics", timeout=30).text
    totals = dict.fromkeys(scrape.VLLM_COUNTERS + VLLM_EXTRA, 0.0)
    for line in text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if not line.startswith("#") and name in totals:
            totals[name] += float(line.rsplit(" ", 1)[1])
    return totals


def kvbm_counters(stats_url: str) -> dict[str, float]:
    """kvbm's counters (:func:`bench.scrape.kvbm_stats`) plus its failed pulls by kind."""
    values = {f"kvbm.{k}": v for k, v in scrape.kvbm_stats(stats_url).items()}
    remote = httpx.get(stats_url + "/stats", timeout=30).json().get("remote") or {}
    for kind, n in (remote.get("pulls", {}).get("failures") or {}).items():
        values[f"kvbm.remote.pulls.failures.{kind}"] = n
    return values


def run_setup(spec: SetupSpec, context: Context, streams: int, requests: int, budget_s: float, rounds: int = 1) -> dict:
    """One row: figures and counter differences, or the setup's error. The load runs
    ``rounds`` times on the same servers, each round over documents of its own (so each starts
    cold, as the first did); the figures pool every round's requests, and ``round_tok_s``
    gives each round's throughput (the spread a noisy machine leaves)."""
    row = {"model": context.preset, "streams": streams, "setup": spec.key, "name": spec.name}
    engine = EngineSettings(model=context.model, max_model_len=MAX_MODEL_LEN)
    load_start = os.getloadavg()[0]
    results: list[LoadResult] = []
    errors: list[str] = []
    try:
        with launch(spec, context, engine, context.log_dir / f"{context.preset}-{streams}-{spec.key}") as running:
            _, warm_errors = replay(running.url, context.preset, warmup(context.vocab), min(streams, WARMUP), None)
            if warm_errors:
                raise RuntimeError(f"warm-up: {len(warm_errors)} of {WARMUP} requests failed: {warm_errors[0]}")
            before = snapshot(running)
            started = time.perf_counter()
            for number in range(rounds):
                left_s = budget_s - (time.perf_counter() - started)
                result, round_errors = replay(
                    running.url, context.preset, workload(context.vocab, requests, number), streams, max(left_s, 0.0)
                )
                results.append(result)
                errors += round_errors
            time.sleep(METRICS_SETTLE_S)
            after = snapshot(running)
    except (RuntimeError, OSError, httpx.HTTPError) as error:
        return {**row, "error": f"{type(error).__name__}: {error}"}
    counters = {role: scrape.delta(after[role], before.get(role, {})) for role in after}
    result = pooled(results)
    sent = len(result.timings) + len(errors)
    row.update(result.summary() if result.timings else {"requests": 0, "skipped": result.skipped})
    row.update(
        {
            "workload": f"{workload(context.vocab, requests).description}, {streams} at a time, "
            f"{rounds} round{'s' if rounds > 1 else ''}",
            "rounds": rounds,
            "sent": sent,
            "round_tok_s": [round(r.summary()["output_tok_s"], 1) for r in results if r.timings],
            "request_errors": len(errors),
            "error_samples": errors[:3],
            "load_average": [round(load_start, 2), round(os.getloadavg()[0], 2)],
        }
    )
    row.update(handoff_figures(spec, counters, sent))
    row["notes"] = notes(spec, row, counters, budget_s, context.cuda_devices)
    row["counters"] = counters
    return row


def pooled(results: Sequence[LoadResult]) -> LoadResult:
    """Every round's requests as one load: throughput over the rounds' summed wall time."""
    return LoadResult(
        results[0].workload,
        results[0].concurrency,
        sum(r.wall_s for r in results),
        tuple(t for r in results for t in r.timings),
        sum(r.skipped for r in results),
    )


def workload(vocab: int, requests: int, number: int = 0) -> Workload:
    """Round ``number``'s load: its own documents (seeds apart from the warm-up's)."""
    return shared_documents(SEED + 2 * number, vocab, DOCUMENTS, DOC_TOKENS, QUESTION_TOKENS, requests, ANSWER_TOKENS)


def warmup(vocab: int) -> Workload:
    """The measured load's shape over documents of its own (another seed), so the measured
    run starts with its documents in no cache."""
    return shared_documents(SEED + 1, vocab, WARMUP, DOC_TOKENS, QUESTION_TOKENS, WARMUP, ANSWER_TOKENS)


def handoff_figures(spec: SetupSpec, counters: dict, sent: int) -> dict:
    """Failed pulls, recomputed blocks and requests not handed off, from the counters each
    setup exposes. A figure that does not apply (no pulls in one server) is left out; one
    the setup does not count is None (see :func:`counter_sources`)."""
    decode = counters.get("decode", {})
    out: dict = {}
    if spec.disaggregated:
        out["not_handed_off"] = max(0, sent - int(counters["router"].get("disaggregated", 0)))
    if spec.key == KVBM_1P1D:
        out.update(
            {
                "failed_pulls": decode.get("kvbm.remote.pulls.jobs_failed", 0),
                "failed_pull_blocks": decode.get("kvbm.remote.pulls.blocks_failed", 0),
                "failure_kinds": {
                    k.rsplit(".", 1)[1]: v
                    for k, v in decode.items()
                    if k.startswith("kvbm.remote.pulls.failures.") and v
                },
            }
        )
    if spec.key in (KVBM_1P1D, KVBM_AGG):
        # Engine blocks vLLM was told to recompute: failed pulls and failed G2/G3 loads.
        role = "decode" if spec.disaggregated else "aggregated"
        out["recomputed_blocks"] = counters.get(role, {}).get("kvbm.remote.load_error_blocks")
    elif spec.key == NIXL_1P1D:
        out.update({"failed_pulls": decode.get("vllm:nixl_num_failed_transfers_total", 0), "recomputed_blocks": None})
    return out


def counter_sources() -> dict[str, str]:
    """Where each setup's failed pulls and recomputed blocks come from (the table's footnote)."""
    return {
        "kvbm 1P+1D": "failed pulls: the decode worker's remote.pulls.jobs_failed (blocks: blocks_failed, "
        "kinds: remote.pulls.failures); recomputed blocks: its remote.load_error_blocks "
        "(engine blocks vLLM was told to recompute: failed pulls and failed G2/G3 loads)",
        "kvbm aggregated x2": "no pulls; recomputed blocks: the workers' remote.load_error_blocks (failed G2/G3 loads)",
        "NixlConnector 1P+1D": "failed pulls: the decode server's vllm:nixl_num_failed_transfers (requests, "
        "handshake and notification failures included); recomputed blocks: n/a "
        "(vLLM counts no blocks recomputed after a failed load)",
        "vLLM alone": "one server: no pulls, nothing recomputed after a handoff",
        "all disaggregated rows": "requests the router did not hand off (ran on the decode worker whole) are "
        "in the notes and fail the clean-run goal",
    }


def notes(spec: SetupSpec, row: dict, counters: dict, budget_s: float, cuda: int) -> str:
    """What would make the row mean something else than it says."""
    out = []
    start_load, cores = row.get("load_average", [0])[0], len(os.sched_getaffinity(0))
    if start_load > cores:  # other jobs on the machine: the row's figures are theirs too
        out.append(f"busy machine: load average {start_load:.1f} at start")
    if len(row.get("round_tok_s", ())) > 1:
        out.append("tok/s per round " + " / ".join(f"{v:.0f}" for v in row["round_tok_s"]))
    if row.get("skipped"):
        out.append(f"stopped at the {budget_s:.0f} s budget: {row['skipped']} requests not sent")
    if row.get("not_handed_off"):
        out.append(f"{row['not_handed_off']} requests not handed off")
    if row.get("failure_kinds"):
        out.append("failed pulls: " + ", ".join(f"{k} {v:.0f}" for k, v in sorted(row["failure_kinds"].items())))
    if row.get("failed_pull_blocks"):
        out.append(f"{row['failed_pull_blocks']:.0f} pulled blocks failed")
    expired = counters.get("prefill", {}).get("vllm:nixl_num_kv_expired_reqs_total", 0)
    if expired:
        out.append(f"{expired:.0f} prefill leases expired unread")
    preempted = sum(c.get("vllm:num_preemptions_total", 0) for role, c in counters.items() if role != "router")
    if preempted:
        out.append(f"{preempted:.0f} preemptions")
    if spec.key == NIXL_1P1D and not cuda:
        out.append("NIXL progress thread on, one UCX worker")
    if row.get("error_samples"):
        out.append("first error: " + row["error_samples"][0].splitlines()[0][:160])
    return "; ".join(out)


# -- goals and the table ----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Goal:
    """One goal of one row: met, missed, or None when it cannot be judged (a row missing)."""

    label: str
    met: bool | None
    detail: str

    @property
    def mark(self) -> str:
        return {True: "✓", False: "✗", None: "?"}[self.met]


def groups(rows: Sequence[dict]) -> dict[tuple[str, int], dict[str, dict]]:
    """Rows by (model, streams), then by setup key, in the order they ran."""
    out: dict[tuple[str, int], dict[str, dict]] = {}
    for row in rows:
        out.setdefault((row["model"], row["streams"]), {})[row["setup"]] = row
    return out


def figure(row: dict | None, key: str) -> float | None:
    """A row's figure, None when the row did not run or has none (NaN included)."""
    if row is None or "error" in row:
        return None
    value = row.get(key)
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def ratio(row: dict | None, base: dict | None, key: str) -> float | None:
    value, reference = figure(row, key), figure(base, key)
    return None if value is None or not reference else value / reference


def judge(group: dict[str, dict]) -> dict[str, list[Goal]]:
    """Each row's goals within one (model, streams) group (see the module contract)."""
    out = {key: [clean(row)] for key, row in group.items()}
    if KVBM_1P1D in group:
        out[KVBM_1P1D] += relative_goals(group[KVBM_1P1D], group.get(KVBM_AGG), group.get(NIXL_1P1D))
    return out


def clean(row: dict) -> Goal:
    """No error; for a disaggregated row also no failed pull and every request handed off."""
    if "error" in row:
        return Goal("clean", False, "did not run: " + row["error"].splitlines()[0])
    problems = [f"{row['request_errors']} errors"] if row.get("request_errors") else []
    if row.get("failed_pulls"):
        problems.append(f"{row['failed_pulls']:.0f} failed pulls")
    if row.get("not_handed_off"):
        problems.append(f"{row['not_handed_off']} not handed off")
    return Goal("clean", not problems, ", ".join(problems) or "no errors, no failed pulls")


def relative_goals(row: dict, aggregated: dict | None, nixl: dict | None) -> list[Goal]:
    """kvbm 1P+1D against kvbm aggregated on the same cores, and against NixlConnector."""
    goals = [
        _bound(f"tok/s ≥{MIN_THROUGHPUT_RATIO}x", ratio(row, aggregated, "output_tok_s"), MIN_THROUGHPUT_RATIO, True),
        _bound(f"ITL p99 ≤{MAX_ITL_P99_RATIO:g}x", ratio(row, aggregated, "itl_p99_ms"), MAX_ITL_P99_RATIO, False),
        _bound(f"TTFT p99 ≤{MAX_TTFT_P99_RATIO}x", ratio(row, aggregated, "ttft_p99_ms"), MAX_TTFT_P99_RATIO, False),
    ]
    behind, unknown = [], []
    for key, column, higher in FIGURES:
        ours, theirs = figure(row, key), figure(nixl, key)
        if ours is None or theirs is None:
            unknown.append(column)
        elif (ours <= theirs) if higher else (ours >= theirs):
            behind.append(f"{column} {ours:.3g} vs {theirs:.3g}")
    if behind:
        goals.append(Goal("beats NIXL", False, "behind NixlConnector on " + ", ".join(behind)))
    elif unknown:
        goals.append(Goal("beats NIXL", None, "no NixlConnector figure to compare: " + ", ".join(unknown)))
    else:
        goals.append(Goal("beats NIXL", True, "ahead of NixlConnector on every figure"))
    return goals


def _bound(label: str, value: float | None, limit: float, at_least: bool) -> Goal:
    if value is None:
        return Goal(label, None, "no kvbm aggregated figure to compare")
    met = value >= limit if at_least else value <= limit
    return Goal(label, met, f"{value:.2f}x of kvbm aggregated")


def _num(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"


def _count(row: dict, key: str) -> str:
    """A counter's cell: "-" where it does not apply, "n/a" where the setup does not count it."""
    if key not in row:
        return "-"
    return "n/a" if row[key] is None else f"{row[key]:.0f}"


def table(rows: Sequence[dict]) -> str:
    """The Markdown table: one row per setup, model and stream count; every figure as
    ``absolute (x kvbm aggregated / x vLLM alone)``."""
    headers = [
        "model",
        "streams",
        "setup",
        *(column for _, column, _ in FIGURES),
        "failed pulls",
        "recomputed blocks",
        "errors",
        "goals",
        "notes",
    ]
    body = []
    for group in groups(rows).values():
        verdicts = judge(group)
        for key, row in group.items():
            goals = " ".join(f"{g.mark} {g.label}" for g in verdicts[key])
            if "error" in row:
                body.append(
                    [
                        row["model"],
                        row["streams"],
                        row["name"],
                        *["-"] * (len(FIGURES) + 3),
                        goals,
                        row["error"].splitlines()[0][:200],
                    ]
                )
                continue
            cells = [
                f"{_num(figure(row, k))} ({_num(ratio(row, group.get(KVBM_AGG), k))} / "
                f"{_num(ratio(row, group.get(VLLM), k))})"
                for k, _, _ in FIGURES
            ]
            body.append(
                [
                    row["model"],
                    row["streams"],
                    row["name"],
                    *cells,
                    _count(row, "failed_pulls"),
                    _count(row, "recomputed_blocks"),
                    row.get("request_errors", 0),
                    goals,
                    row.get("notes") or "-",
                ]
            )
    return format_table(headers, body)


def missed(rows: Sequence[dict]) -> list[str]:
    """One line per goal missed or not judged, with its figures."""
    out = []
    for (model, streams), group in groups(rows).items():
        for key, goals in judge(group).items():
            out += [
                f"{group[key]['name']}, {model}, {streams} streams: {g.mark} {g.label}: {g.detail}"
                for g in goals
                if not g.met
            ]
    return out


# -- output -----------------------------------------------------------------------------


def markdown(results: dict) -> str:
    rows = results["rows"]
    lines = [
        "# Disaggregated serving under load",
        "",
        f"`{results['command']}`{' (smoke run: not for comparison)' if results['quick'] else ''}, "
        f"{results['started']} - {results.get('finished', 'running')}.",
        "",
        f"Machine: {summary(results['machine'])}; load average at start {results['machine']['load_average']}.",
        "",
        f"Load per model and stream count, after {WARMUP} warm-up requests:",
        "",
        *[f"- {name}: {description}" for name, description in results["workloads"].items()],
        "",
        "Each figure: absolute (x kvbm aggregated on the same cores / x vLLM alone, same model and streams).",
        "",
        table(rows),
        "",
    ]
    if misses := missed(rows):
        lines += ["Goals missed or not judged:", "", *[f"- {m}" for m in misses], ""]
    lines += [
        "Counters:",
        "",
        *[f"- {who}: {what}" for who, what in counter_sources().items()],
        "",
        "![disaggregated serving under load](disagg_load.png)",
        "",
    ]
    return "\n".join(lines)


def plot(rows: Sequence[dict], path: Path, subtitle: str) -> bool:
    """The PNG (bench/plots.py); False when matplotlib (the bench extra) is missing."""
    try:
        from bench import plots
    except ImportError:
        return False
    panels = []
    for (model, streams), group in groups(rows).items():
        aggregated = group.get(KVBM_AGG)
        lines = {
            "output_tok_s": _scaled(figure(aggregated, "output_tok_s"), MIN_THROUGHPUT_RATIO),
            "ttft_p99_ms": _scaled(figure(aggregated, "ttft_p99_ms"), MAX_TTFT_P99_RATIO),
            "itl_p99_ms": _scaled(figure(aggregated, "itl_p99_ms"), MAX_ITL_P99_RATIO),
        }
        panels.append({"title": f"{model} model, {streams} streams", "rows": list(group.values()), "lines": lines})
    plots.disagg_load(panels, path, subtitle)
    return True


def _scaled(value: float | None, factor: float) -> float | None:
    return None if value is None else value * factor


def write(results: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "disagg_load.json").write_text(json.dumps(results, indent=2))
    (out_dir / "disagg_load.md").write_text(markdown(results))


def _now() -> str:
    return datetime.datetime.now().strftime("%Y-%m-%d %H:%M")


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def resolve_rounds(parser: argparse.ArgumentParser, args: argparse.Namespace, full: int) -> int:
    """``--rounds`` as given, else 1 with ``--quick`` and ``full`` without; at least 1."""
    rounds = args.rounds if args.rounds is not None else (1 if args.quick else full)
    if rounds < 1:
        parser.error(f"--rounds must be at least 1, got {rounds}")
    return rounds


def start_run(module: str, argv: Sequence[str] | None) -> tuple[Path, dict]:
    """A benchmark run's server log directory and the header of its results (command, start
    time, machine); a SIGTERM from now on stops the run as Ctrl-C does."""
    exit_on_sigterm()
    log_dir = Path(tempfile.mkdtemp(prefix="kvbm-bench-logs-"))
    command = f"python -m {module} " + shlex.join(sys.argv[1:] if argv is None else argv)
    return log_dir, {"command": command, "started": _now(), "machine": describe(), "logs": str(log_dir)}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke run: tiny model, 16 streams, {QUICK_REQUESTS} requests (flags given still win)",
    )
    parser.add_argument("--models", type=_csv, help="embedded presets, comma-separated (default tiny,bench)")
    parser.add_argument(
        "--streams",
        type=lambda s: [int(x) for x in _csv(s)],
        help="requests in flight, comma-separated (default 16,64)",
    )
    parser.add_argument(
        "--setups",
        type=_csv,
        default=list(SETUPS),
        help=f"comma-separated, run in this order (default {','.join(SETUPS)})",
    )
    parser.add_argument(
        "--requests", type=int, help=f"measured requests per setup (default {REQUESTS_PER_STREAM} x streams)"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        help=f"loads per setup, each over new documents, pooled "
        f"(default {FULL_ROUNDS}, 1 with --quick): a noisy machine moves one short load a lot",
    )
    parser.add_argument(
        "--budget-s",
        type=float,
        help=f"per setup: no request starts after it (default {FULL_BUDGET_S:.0f}, {QUICK_BUDGET_S:.0f} with --quick)",
    )
    parser.add_argument(
        "--out", type=Path, help="results directory (default bench/results, bench/results/quick with --quick)"
    )
    parser.add_argument("--scratch-dir", type=Path, default=Path("/var/tmp"), help="parent of scratch directories")
    args = parser.parse_args(argv)
    if unknown := [s for s in args.setups if s not in SETUPS]:
        parser.error(f"unknown setups {unknown}; choose from {','.join(SETUPS)}")
    args.models = args.models or (["tiny"] if args.quick else ["tiny", "bench"])
    args.streams = args.streams or ([16] if args.quick else [16, 64])
    args.rounds = resolve_rounds(parser, args, FULL_ROUNDS)
    args.budget_s = args.budget_s or (QUICK_BUDGET_S if args.quick else FULL_BUDGET_S)
    args.out = args.out or (RESULTS / "quick" if args.quick else RESULTS)
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    log_dir, results = start_run("bench.disagg_load", argv)
    results.update(quick=args.quick, workloads={}, rows=[])
    for model in args.models:
        context = make_context(model, log_dir, args.scratch_dir, cuda_devices())
        for streams in args.streams:
            requests = args.requests or (QUICK_REQUESTS if args.quick else REQUESTS_PER_STREAM * streams)
            results["workloads"][f"{model}, {streams} streams"] = (
                f"{workload(context.vocab, requests).description}, {streams} at a time, "
                f"{args.rounds} round{'s' if args.rounds > 1 else ''} (new documents each), pooled"
            )
            for key in args.setups:
                print(
                    f"[{_now()}] {model} model, {streams} streams: {SETUPS[key].name} ...", file=sys.stderr, flush=True
                )
                results["rows"].append(run_setup(SETUPS[key], context, streams, requests, args.budget_s, args.rounds))
                write(results, args.out)  # after every setup: a run cut short keeps its rows
    results["finished"] = _now()
    results["goals"] = {
        f"{m}/{s}/{k}": [dataclasses.asdict(g) for g in goals]
        for (m, s), group in groups(results["rows"]).items()
        for k, goals in judge(group).items()
    }
    write(results, args.out)
    drawn = plot(
        results["rows"],
        args.out / "disagg_load.png",
        summary(results["machine"])
        + f"; {DOCUMENTS} documents of {DOC_TOKENS} tokens + {QUESTION_TOKENS}-token questions, "
        f"{ANSWER_TOKENS} tokens out",
    )
    print(f"\nDisaggregated serving under load (server logs in {log_dir})")
    print(table(results["rows"]))
    for line in missed(results["rows"]):
        print("  " + line)
    print(
        f"wrote {args.out / 'disagg_load.md'}, disagg_load.json"
        + (", disagg_load.png" if drawn else " (no plot: matplotlib missing; pip install -e '.[bench]')")
    )
    if any("error" in row for row in results["rows"]):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
