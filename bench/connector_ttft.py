"""TTFT of a long prompt whose prefix kvbm holds in G2, against recompute and a G1 hit.

    python -m bench.connector_ttft [--prompt-tokens 3500] [--repeats 5] [--model bench|tiny] [--sync-loads]

One process, in-process engines on the ``bench`` model (bf16, block 32; ``--model tiny`` for
a smoke run), used one after the other (vLLM's process-wide state allows one live engine):

- vLLM alone: a cold prefill (recompute, the upper bound) and vLLM's own G1 prefix-cache hit
  (the physical limit), and decode throughput of unique prompts;
- vLLM + kvbm with a G1 too small to keep the prompt: the prefix is pushed out of G1 by
  filler prompts, then served from G2; and the same unique-prompt throughput (nothing hits);
- vLLM + kvbm with G2 too small as well and a G3 directory: the prefix is served from disk
  (O_DIRECT reads, so not from the page cache).

TTFT is the wall time of ``generate(max_tokens=1)``. Medians over ``--repeats``. Before each
measured request the engine idles for ``--settle`` seconds (both engines), so the measurement
is the request's own path, not the earlier requests' offloads still copying in the background
on the same two cores; that background cost is what the no-hit throughput row measures.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import tempfile
import time

import numpy as np

from kvbm.process.cpu_features import request_amx_permission
from kvbm.serving.embedded_model import PRESETS, ensure_model
from kvbm.serving.vllm_settings import EngineSettings, vllm_env

os.environ.update(vllm_env(in_process=True))
request_amx_permission()


def prompts(rng: np.random.Generator, count: int, length: int, vocab: int) -> list[dict]:
    return [{"prompt_token_ids": rng.integers(3, vocab, length).tolist()} for _ in range(count)]


def timed(llm, batch, max_tokens=1) -> float:
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    start = time.perf_counter()
    llm.generate(batch, params, use_tqdm=False)
    return time.perf_counter() - start


def throughput(llm, batches, settle: float) -> list[float]:
    """Seconds per batch of unique prompts (nothing hits), the first (warm-up) batch left out."""
    times = []
    for batch in batches:
        time.sleep(settle)
        times.append(timed(llm, batch, max_tokens=64))
    return times[1:]


def shutdown(llm) -> None:
    llm.llm_engine.engine_core.shutdown()
    gc.collect()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt-tokens", type=int, default=3500)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--throughput-prompts", type=int, default=8)
    parser.add_argument("--settle", type=float, default=1.0, help="idle seconds before each measured request")
    parser.add_argument("--model", choices=sorted(PRESETS), default="bench", help="embedded model preset")
    parser.add_argument(
        "--async-load-min-blocks",
        type=int,
        default=None,
        help="the connector's threshold for asynchronous loads (default: its own)",
    )
    parser.add_argument(
        "--sync-loads",
        action="store_true",
        help="let loads finish before their step's forward pass (the connector's sync_loads)",
    )
    args = parser.parse_args()
    from vllm import LLM

    model = ensure_model(args.model)
    rng = np.random.default_rng(0)
    vocab = PRESETS[args.model].vocab_size
    n = args.prompt_tokens
    g1_blocks = 2 * 4096 // 32  # both engines: a G1 that two long prompts overflow
    base = EngineSettings(model=model, max_model_len=4096, num_gpu_blocks_override=g1_blocks)

    llm = LLM(**base.llm_kwargs())
    timed(llm, prompts(rng, 1, n, vocab))  # warm-up
    cold, g1_hit = [], []
    for _ in range(args.repeats):
        prompt = prompts(rng, 1, n, vocab)
        time.sleep(args.settle)
        cold.append(timed(llm, prompt))
        time.sleep(args.settle)
        g1_hit.append(timed(llm, prompt))
    # The same fresh sets for both engines; set 0 warms up each engine's batch shapes (oneDNN
    # caches are per process, so without it the first engine measured pays for them).
    batches = [
        prompts(np.random.default_rng(100 + i), args.throughput_prompts, 512, vocab) for i in range(args.repeats + 1)
    ]
    plain_tput = throughput(llm, batches, args.settle)
    shutdown(llm)

    def kvbm_engine(extra: dict):
        if args.async_load_min_blocks is not None:
            extra = {**extra, "async_load_min_blocks": args.async_load_min_blocks}
        if args.sync_loads:
            extra = {**extra, "sync_loads": True}
        settings = EngineSettings(
            model=model,
            max_model_len=4096,
            num_gpu_blocks_override=g1_blocks,
            kv_transfer_config={
                "kv_connector": "KVBMConnector",
                "kv_role": "kv_both",
                "kv_connector_extra_config": extra,
            },
        )
        return LLM(**settings.llm_kwargs())

    def evicted_hits(llm, filler_rounds: int = 1) -> list[float]:
        timed(llm, prompts(rng, 1, n, vocab))
        hits = []
        for _ in range(args.repeats):
            prompt = prompts(rng, 1, n, vocab)
            timed(llm, prompt)
            for _ in range(filler_rounds):  # evict the prompt's blocks from G1 (and G2)
                timed(llm, prompts(rng, 2, 4000, vocab))
            time.sleep(args.settle)
            hits.append(timed(llm, prompt))
        return hits

    llm = kvbm_engine({"g2_capacity_bytes": "2GiB"})
    g2_hit = evicted_hits(llm)
    kvbm_tput = throughput(llm, batches, args.settle)
    stats = llm.llm_engine.engine_core.engine_core.scheduler.connector.stats.to_dict()
    shutdown(llm)

    with tempfile.TemporaryDirectory(prefix="kvbm-g3-", dir=os.environ.get("KVBM_BENCH_DIR", "/var/tmp")) as g3:
        # G2 holds one step's offload burst (two 4,000-token fillers: 250 blocks; a smaller G2
        # refuses part of the burst, so blocks are dropped instead of reaching G3) but not the
        # three rounds of fillers that follow the prompt, so the prompt comes back from disk.
        llm = kvbm_engine({"g2_capacity_blocks": 400, "g3_dir": g3, "g3_capacity_bytes": "4GiB"})
        g3_hit = evicted_hits(llm, filler_rounds=3)
        g3_stats = llm.llm_engine.engine_core.engine_core.scheduler.connector.stats.to_dict()
        shutdown(llm)

    med = statistics.median
    print(f"{args.model} model, {n}-token prompt, medians of {args.repeats}")
    print("| path | TTFT ms | vs G1 hit | vs recompute |")
    print("|---|---:|---:|---:|")
    for name, values in (
        ("recompute (vLLM cold)", cold),
        ("vLLM G1 prefix hit", g1_hit),
        ("kvbm G2 hit", g2_hit),
        ("kvbm G3 hit", g3_hit),
    ):
        print(
            f"| {name} | {med(values) * 1000:.0f} | {med(values) / med(g1_hit):.2f}x | {med(values) / med(cold):.2f}x |"
        )
    paired = med([k / p for k, p in zip(kvbm_tput, plain_tput)])
    print(
        f"no-hit throughput: vLLM {med(plain_tput):.2f} s, vLLM+kvbm {med(kvbm_tput):.2f} s "
        f"(median of per-batch ratios {(paired - 1) * 100:+.1f}%) for {args.throughput_prompts} "
        f"unique 512-token prompts x 64 tokens, {args.repeats} batches; per batch vLLM "
        f"{', '.join(f'{t:.2f}' for t in plain_tput)} s, kvbm {', '.join(f'{t:.2f}' for t in kvbm_tput)} s"
    )
    g2 = stats["tiers"]["g2"]
    print(
        f"G2: {g2['blocks_onboarded']} blocks onboarded, {g2['blocks_offloaded']} offloaded, "
        f"hit rate {g2['hit_rate']:.2f}, p50 transfer {g2['latency_p50_s'] * 1000:.1f} ms"
    )
    g3s = g3_stats["tiers"]["g3"]
    print(f"G3 run, G2: {g3_stats['tiers']['g2']['blocks_onboarded']} blocks onboarded")
    print(
        f"G3: {g3s['blocks_onboarded']} blocks onboarded, {g3s['blocks_offloaded']} offloaded, "
        f"{g3s['checksum_mismatches']} checksum mismatches, {g3s['io_errors']} I/O errors"
    )


if __name__ == "__main__":
    main()
