"""End to end against kvbm's peers: one vLLM server alone and with each KV connector,
same run, same prompts, two fixed-seed workloads.

    python -m bench.e2e [--quick] [--model bench|tiny] [--json PATH]

Setups (one aggregated server each, G1 kept small with ``num_gpu_blocks_override`` so that
the workloads' KV does not fit in it):

- vLLM alone, its prefix cache on (what every connector must beat);
- vLLM + ExampleConnector: vLLM's reference shared-storage connector (one safetensors file
  per layer and prompt on disk; it only serves a prompt it has stored whole);
- vLLM + kvbm, G2 only; vLLM + kvbm, G2 + G3 (the same G2, a G3 directory on disk);
- vLLM + LMCache: only where CUDA is present (LMCache 0.5.6 has no CPU connector);
  elsewhere the row records why it did not run.

Workloads (see :mod:`bench.workloads`): multi-turn chat whose history grows every turn,
and RAG-like queries over a set of shared documents whose KV is larger than G1 (and than
G2: the G3 row shows what the disk tier adds). Both run on the same server, one after the
other. Reported per setup and workload: TTFT p50/p99, throughput (output tokens/s), the
share of prompt tokens served from G1 (vLLM's prefix cache) and from the connector (vLLM's
``prefix_cache_*`` and ``external_prefix_cache_*`` counters), and kvbm's own G2/G3 hit
rates (block lookups, from its stats endpoint).

``--quick`` is a smoke run: the tiny model and small workloads.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json

import httpx

from bench.machine import describe
from bench.measure import RESULTS, Context, add_arguments, context_from_args, measure
from bench.stack import Connector, Setup, exit_on_sigterm
from bench.timing import format_table
from bench.workloads import Workload, chat, rag
from kvbm.serving.vllm_settings import EngineSettings

SEED = 11
LMCACHE_CPU = "cannot run without an accelerator (No supported cpu connector found)"


@dataclasses.dataclass(frozen=True)
class Scale:
    """Sizes, in blocks of 32 tokens where named so. G1 < G2 < the RAG documents' KV: G2
    only helps with what G1 lost, and the G2+G3 row shows what the disk adds beyond G2."""

    max_model_len: int
    g1_blocks: int
    g2_blocks: int
    g3_capacity: str
    concurrency: int
    chat: dict
    rag: dict


FULL = Scale(
    max_model_len=4096,
    g1_blocks=192,
    g2_blocks=384,
    g3_capacity="2GiB",
    concurrency=4,
    chat=dict(conversations=8, turns=4, system=512, user=128, reply=64),
    rag=dict(documents=16, doc_tokens=1024, questions_per_doc=2, question_tokens=64, queries=48, answer=32),
)
QUICK = Scale(
    max_model_len=1024,
    g1_blocks=40,
    g2_blocks=64,
    g3_capacity="64MiB",
    concurrency=2,
    chat=dict(conversations=4, turns=4, system=128, user=96, reply=16),
    rag=dict(documents=10, doc_tokens=256, questions_per_doc=2, question_tokens=32, queries=12, answer=8),
)


def setups(scale: Scale, block_bytes: int) -> list[Setup]:
    g2 = {"g2_capacity_blocks": scale.g2_blocks}
    lmcache_env = {
        "LMCACHE_CHUNK_SIZE": "256",
        "LMCACHE_LOCAL_CPU": "True",
        "LMCACHE_MAX_LOCAL_CPU_SIZE": f"{scale.g2_blocks * block_bytes / 2**30:.3f}",
    }
    return [
        Setup("vLLM alone", Connector.NONE),
        Setup("vLLM + ExampleConnector", Connector.EXAMPLE),
        Setup("vLLM + kvbm G2", Connector.KVBM, extra_config=g2),
        Setup("vLLM + kvbm G2+G3", Connector.KVBM, extra_config=g2, g3_capacity=scale.g3_capacity),
        Setup("vLLM + LMCache", Connector.LMCACHE, env=lmcache_env),
    ]


def engine_settings(context: Context, scale: Scale) -> EngineSettings:
    return EngineSettings(
        model=context.model, max_model_len=scale.max_model_len, num_gpu_blocks_override=scale.g1_blocks
    )


def workloads(context: Context, scale: Scale) -> list[Workload]:
    return [chat(SEED, context.vocab, **scale.chat), rag(SEED + 1, context.vocab, **scale.rag)]


def skip_reason(setup: Setup, context: Context) -> str | None:
    """Why a setup cannot run here, or None."""
    if setup.connector is not Connector.LMCACHE:
        return None
    if not context.cuda_devices:
        return LMCACHE_CPU
    if importlib.util.find_spec("lmcache") is None:
        return "lmcache is not installed (pip install lmcache)"
    return None


def run_setup(setup: Setup, context: Context, scale: Scale) -> dict:
    """One setup's figures per workload, or why it did not run or failed."""
    reason = skip_reason(setup, context)
    if reason is not None:
        return {"setup": setup.name, "skipped": reason}
    engine = engine_settings(context, scale)
    try:
        measured = measure(setup, engine, context, [(w, scale.concurrency) for w in workloads(context, scale)])
    except (RuntimeError, OSError, httpx.HTTPError) as error:
        return {"setup": setup.name, "error": f"{type(error).__name__}: {error}"}
    return {
        "setup": setup.name,
        "workloads": {
            name: {**m["load"], **hit_rates(m["counters"]["aggregated"]), "counters": m["counters"]}
            for name, m in measured.items()
        },
    }


def hit_rates(counters: dict[str, float]) -> dict[str, float | None]:
    """Shares of prompt tokens served from G1 and from the connector (they add up to the
    share not computed), and kvbm's G2/G3 block hit rates (None without kvbm)."""
    queried = counters["vllm:prefix_cache_queries_total"]
    out: dict[str, float | None] = {
        "g1_cached": counters["vllm:prefix_cache_hits_total"] / queried if queried else 0.0,
        "connector_cached": counters["vllm:external_prefix_cache_hits_total"] / queried if queried else 0.0,
    }
    for tier in ("g2", "g3"):
        hits, misses = counters.get(f"kvbm.{tier}.hits"), counters.get(f"kvbm.{tier}.misses")
        out[f"kvbm_{tier}_hit_rate"] = (
            hits / (hits + misses) if hits is not None and misses is not None and hits + misses else None
        )
    return out


def table(rows: list[dict], workload: str) -> str:
    headers = [
        "setup",
        "TTFT p50 ms",
        "TTFT p99 ms",
        "ITL p50 ms",
        "output tok/s",
        "from G1 %",
        "from connector %",
        "kvbm G2 hit %",
        "kvbm G3 hit %",
    ]
    body = []
    for row in rows:
        if "workloads" not in row:
            why = row.get("skipped") or row["error"].splitlines()[0]
            body.append([row["setup"], *["-"] * 7, why])
            continue
        w = row["workloads"][workload]
        body.append(
            [
                row["setup"],
                w["ttft_p50_ms"],
                w["ttft_p99_ms"],
                w["itl_p50_ms"],
                w["output_tok_s"],
                100 * w["g1_cached"],
                100 * w["connector_cached"],
                _percent(w["kvbm_g2_hit_rate"]),
                _percent(w["kvbm_g3_hit_rate"]),
            ]
        )
    return format_table(headers, body)


def _percent(rate: float | None) -> float | str:
    return "-" if rate is None else 100 * rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser, RESULTS / "e2e.json")
    args = parser.parse_args()
    exit_on_sigterm()
    scale = QUICK if args.quick else FULL
    context = context_from_args(args)
    engine = engine_settings(context, scale)
    rows = [run_setup(s, context, scale) for s in setups(scale, context.block_bytes(engine))]
    for load in workloads(context, scale):
        print(
            f"\n{load.name}, {context.preset} model, G1 {scale.g1_blocks} blocks: {load.description}, "
            f"{scale.concurrency} concurrent clients"
        )
        print(table(rows, load.name))
    print(f"(server logs in {context.log_dir})")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps(
            {
                "machine": describe(),
                "model": context.preset,
                "rows": rows,
                "workloads": {w.name: w.description for w in workloads(context, scale)},
            },
            indent=2,
        )
    )
    print(f"wrote {args.json}")
    if any("error" in row for row in rows):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
