"""The whole benchmark suite in one command: tables, JSON and plots under bench/results/.

    python -m bench.suite [--quick] [--only micro ttft e2e disagg] [--out DIR] [--scratch-dir DIR]

Steps, in order, with a progress bar:

1. micro: hashing, G1 <-> G2, G2 <-> G3, remote pull, bookkeeping (:mod:`bench.micro`),
   each a ratio to a floor timed in the same run;
2. ttft: a long prompt's TTFT from kvbm's G2/G3 against recompute and a G1 hit
   (:mod:`bench.connector_ttft`);
3. e2e: vLLM alone, with ExampleConnector, with kvbm G2 and G2+G3, and LMCache where CUDA
   is present, on chat and RAG workloads (:mod:`bench.e2e`);
4. disagg: one aggregated server, kvbm 1P+1D and NixlConnector 1P+1D (:mod:`bench.disagg`).

Writes ``results.md``, ``results.json`` (with the machine's description) and ``micro.png``,
``e2e.png``, ``disagg.png``. ``--quick`` is a smoke run (tiny model, small sizes; about
10 minutes on 2 busy cores) and writes under ``results/quick/``, which git ignores.
A step that fails is recorded with its error and the suite goes on; the exit status is 1
if any failed. Needs matplotlib and tqdm (the ``bench`` extra).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import shlex
import sys
import tempfile
from collections.abc import Callable
from functools import partial
from pathlib import Path

from bench import disagg, e2e, micro, report
from bench.machine import cuda_devices, describe, summary
from bench.measure import RESULTS, make_context
from bench.stack import exit_on_sigterm

PARTS = ("micro", "ttft", "e2e", "disagg")


def check_requirements() -> None:
    missing = [m for m in ("matplotlib", "tqdm") if importlib.util.find_spec(m) is None]
    if missing:
        raise SystemExit(
            f"bench.suite needs {' and '.join(missing)}: install the bench extra "
            f"(pip install -e '.[bench]') or pip install {' '.join(missing)}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny model, small sizes")
    parser.add_argument("--only", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument(
        "--out", type=Path, help="results directory (default bench/results, or bench/results/quick with --quick)"
    )
    parser.add_argument(
        "--scratch-dir",
        type=Path,
        default=Path("/var/tmp"),
        help="parent of the G3 and shared-storage directories (on the disk to measure)",
    )
    args = parser.parse_args()
    check_requirements()
    exit_on_sigterm()
    out_dir = args.out or (RESULTS / "quick" if args.quick else RESULTS)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = run(args.quick, args.only, args.scratch_dir)
    write(results, out_dir)
    print(f"wrote {out_dir / 'results.md'}, results.json and plots")
    if failures(results):
        print("failed steps: " + ", ".join(failures(results)), file=sys.stderr)
        raise SystemExit(1)


Step = tuple[str, Callable[[], dict], Callable[[dict], None]]  # (name, run it, store its result)


def run(quick: bool, parts: list[str], scratch: Path) -> dict:
    from tqdm import tqdm  # imported here: check_requirements() explains its absence first

    results: dict = {
        "command": "python -m bench.suite " + shlex.join(sys.argv[1:]),
        "quick": quick,
        "started": _now(),
        "machine": describe(),
    }
    with tqdm(plan(quick, parts, scratch, results), unit="step", dynamic_ncols=True) as bar:
        for name, step, store in bar:
            bar.set_description(name)
            store(step())
    results["finished"] = _now()
    results["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    return results


def plan(quick: bool, parts: list[str], scratch: Path, results: dict) -> list[Step]:
    """The steps of ``parts``; each stores its result into ``results``."""
    steps: list[Step] = []
    if "micro" in parts:
        micro_results = results["micro"] = {}
        steps += [
            (m.name, partial(micro.run, m, quick, scratch), partial(micro_results.__setitem__, m.name))
            for m in micro.MICROS
        ]
    if "ttft" in parts:
        steps.append(
            (
                micro.CONNECTOR_TTFT.name,
                partial(micro.run, micro.CONNECTOR_TTFT, quick, scratch),
                partial(results.__setitem__, "connector_ttft"),
            )
        )
    if "e2e" not in parts and "disagg" not in parts:
        return steps
    results["logs"] = tempfile.mkdtemp(prefix="kvbm-bench-logs-")
    context = make_context("tiny" if quick else "bench", Path(results["logs"]), scratch, cuda_devices())
    if "e2e" in parts:
        scale = e2e.QUICK if quick else e2e.FULL
        rows: list[dict] = []
        results["e2e"] = {
            "model": context.preset,
            "g1_blocks": scale.g1_blocks,
            "concurrency": scale.concurrency,
            "workloads": {w.name: w.description for w in e2e.workloads(context, scale)},
            "rows": rows,
        }
        steps += [
            (f"e2e: {s.name}", partial(e2e.run_setup, s, context, scale), rows.append)
            for s in e2e.setups(scale, context.block_bytes(e2e.engine_settings(context, scale)))
        ]
    if "disagg" in parts:
        scale_d = disagg.QUICK if quick else disagg.FULL
        rows_d: list[dict] = []
        results["disagg"] = {
            "model": context.preset,
            "workload": disagg.workload(context, scale_d).description,
            "concurrency": scale_d.concurrency,
            "rows": rows_d,
        }
        steps += [
            (f"disagg: {s.name}", partial(disagg.run_setup, s, context, scale_d), rows_d.append)
            for s in disagg.SETUPS.values()
        ]
    return steps


def failures(results: dict) -> list[str]:
    failed = [name for name, r in results.get("micro", {}).items() if "error" in r]
    if "error" in results.get("connector_ttft", {}):
        failed.append("connector TTFT")
    for part in ("e2e", "disagg"):
        failed += [f"{part}: {r['setup']}" for r in results.get(part, {}).get("rows", []) if "error" in r]
    return failed


def write(results: dict, out_dir: Path) -> None:
    from bench import plots  # matplotlib: see run()

    (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    (out_dir / "results.md").write_text(report.render(results))
    subtitle = summary(results["machine"]) + (" - smoke run (--quick)" if results["quick"] else "")
    if "micro" in results:
        plots.micro(results["micro"], out_dir / "micro.png", subtitle)
    if "e2e" in results:
        plots.e2e(results["e2e"]["rows"], list(results["e2e"]["workloads"]), out_dir / "e2e.png", subtitle)
    if "disagg" in results:
        plots.disagg(results["disagg"]["rows"], out_dir / "disagg.png", subtitle)


def _now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


if __name__ == "__main__":
    main()
