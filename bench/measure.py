"""Runs workloads on one setup and collects what they measured, for the end-to-end benchmarks.

:func:`measure` starts the setup's :class:`~bench.stack.Stack`, warms it up, then for each
workload snapshots every server's counters, replays the workload, snapshots again, and
returns the load figures with the counter differences; the stack is stopped whatever happens.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

from bench.load import run_load
from bench.machine import cuda_devices
from bench.scrape import delta
from bench.stack import REQUEST_TIMEOUT_S, Setup, Stack
from bench.workloads import Workload
from kvbm.serving.embedded_model import PRESETS, ensure_model
from kvbm.serving.vllm_settings import EngineSettings

RESULTS = Path(__file__).resolve().parent / "results"
METRICS_SETTLE_S = 2.0  # vLLM publishes a step's counters with its outputs; let the last ones land
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


@dataclasses.dataclass(frozen=True)
class Context:
    """Where and on what the end-to-end benchmarks run.

    Attributes:
        preset: the embedded model preset (served under this name).
        model: its directory.
        log_dir: server logs.
        scratch_dir: parent of G3 and shared-storage directories; on the disk to measure.
        cuda_devices: visible CUDA devices (0: vLLM's CPU backend).
    """

    preset: str
    model: Path
    log_dir: Path
    scratch_dir: Path
    cuda_devices: int

    @property
    def vocab(self) -> int:
        return PRESETS[self.preset].vocab_size

    def block_bytes(self, engine: EngineSettings) -> int:
        """KV bytes of one block (K and V of every layer)."""
        p = PRESETS[self.preset]
        return 2 * p.num_layers * p.num_kv_heads * p.head_dim * DTYPE_BYTES[engine.dtype] * engine.block_size


def make_context(preset: str, log_dir: Path, scratch_dir: Path, cuda_devices: int) -> Context:
    """Builds (or finds) the embedded model.

    Raises:
        KeyError: an unknown preset.
    """
    return Context(preset, ensure_model(preset), Path(log_dir), Path(scratch_dir), cuda_devices)


def add_arguments(parser: argparse.ArgumentParser, json_default: Path) -> None:
    """The options every end-to-end benchmark takes."""
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny model, small workloads")
    parser.add_argument("--model", choices=sorted(PRESETS), help="embedded preset (default: bench; tiny with --quick)")
    parser.add_argument("--json", type=Path, default=json_default)
    parser.add_argument(
        "--scratch-dir",
        type=Path,
        default=Path("/var/tmp"),
        help="parent of the G3 and shared-storage directories (on the disk to measure)",
    )


def context_from_args(args: argparse.Namespace) -> Context:
    """The context :func:`add_arguments`' options name, logging to a new temporary directory."""
    log_dir = Path(tempfile.mkdtemp(prefix="kvbm-bench-logs-"))
    return make_context(args.model or ("tiny" if args.quick else "bench"), log_dir, args.scratch_dir, cuda_devices())


def measure(
    setup: Setup,
    engine: EngineSettings,
    context: Context,
    workloads: list[tuple[Workload, int]],
    budget_s: float | None = None,
) -> dict[str, dict]:
    """Each workload's load summary and counter differences (per server role and the router),
    keyed by workload name; the workloads run one after the other on the same servers, each
    for at most ``budget_s`` (see :func:`~bench.load.run_load`).

    Raises:
        ServerStartError, LoadError, httpx.HTTPError: the setup did not start or a request failed.
    """
    out: dict[str, dict] = {}
    with Stack(setup, engine, context.preset, context.log_dir, context.scratch_dir, context.cuda_devices) as stack:
        stack.warm_up(context.vocab, engine.block_size)
        for workload, concurrency in workloads:
            before = stack.counters()
            result = run_load(stack.url, context.preset, workload, concurrency, REQUEST_TIMEOUT_S, budget_s)
            time.sleep(METRICS_SETTLE_S)
            after = stack.counters()
            out[workload.name] = {
                "load": result.summary(),
                "counters": {role: delta(after[role], before[role]) for role in after},
            }
    return out
