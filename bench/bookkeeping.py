"""Bookkeeping cost per block: lookup, insert (plan + commit), evict, onboard planning.

    python -m bench.bookkeeping [--slots 65536] [--prompt-blocks 32] [--repeat 5]

Runs the real ``BlockManager`` with a G2 index of ``--slots`` slots and no data movement
(jobs are completed with synthetic results), over prompts of ``--prompt-blocks`` blocks. The
floor is the bare Python dict work the same step needs at minimum (a ``dict`` lookup per block
for lookup, a store per block for insert, an ``OrderedDict.popitem`` plus a store per block
for evict), measured in the same run.
"""

from __future__ import annotations

import argparse
import collections
import time

import numpy as np

from bench.timing import print_table
from kvbm.config import KvbmConfig
from kvbm.hashing import BlockHasher, HashedBlocks, LayoutFingerprint
from kvbm.manager.block_manager import BlockManager
from kvbm.transfer.jobs import JobResult, TransferJob

BLOCK_SIZE = 64
_NONE = np.zeros(0, dtype=np.int64)


def ok(job: TransferJob) -> JobResult:
    sums = np.zeros(job.num_blocks, dtype=np.uint64) if job.dst.value != "g1" else None
    return JobResult(job.job_id, _NONE, _NONE, sums, None, 0.0)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run_once(slots: int, prompt_blocks: int) -> dict[str, float]:
    hasher = BlockHasher(LayoutFingerprint("bench", "bfloat16", BLOCK_SIZE, 32, 8, 128, "bench"))
    n_prompts = slots // prompt_blocks
    rng = np.random.default_rng(0)
    make = lambda: [  # noqa: E731
        hasher.hash_prompt(rng.integers(0, 100_000, prompt_blocks * BLOCK_SIZE, dtype=np.int32))
        for _ in range(n_prompts)
    ]
    first, second = make(), make()
    g1_ids = np.arange(prompt_blocks)
    manager = BlockManager(KvbmConfig(g2_capacity_blocks=slots), block_size=BLOCK_SIZE, block_bytes=1)
    blocks = n_prompts * prompt_blocks

    def insert(prompts: list[HashedBlocks]) -> None:
        for p in prompts:
            for job in manager.blocks_computed(p, g1_ids):
                manager.complete(ok(job))

    def lookup() -> None:
        for p in first:
            manager.lookup(p)

    def onboard() -> None:
        for p in first:
            for job in manager.onboard(p, g1_ids).jobs:
                manager.complete(ok(job))

    out = {
        "insert": timed(lambda: insert(first)) / blocks,
        "lookup hit": timed(lookup) / blocks,
        "onboard plan+complete": timed(onboard) / blocks,
        "insert with eviction": timed(lambda: insert(second)) / blocks,
    }
    manager.take_events()
    assert manager.stats().tiers[0].evictions == blocks

    hashes = [h for p in first for h in p.hashes]
    fresh = [h for p in second for h in p.hashes]
    table: dict[bytes, int] = {}
    lru: collections.OrderedDict[bytes, None] = collections.OrderedDict()

    def floor_insert() -> None:
        for i, h in enumerate(hashes):
            table[h] = i
            lru[h] = None

    def floor_lookup() -> list[int]:
        return [table[h] for h in hashes]

    def floor_evict() -> None:
        for i, h in enumerate(fresh):
            lru.popitem(last=False)
            table[h] = i
            lru[h] = None

    out["floor insert"] = timed(floor_insert) / blocks
    out["floor lookup"] = timed(floor_lookup) / blocks
    out["floor evict"] = timed(floor_evict) / blocks
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slots", type=int, default=65536)
    parser.add_argument("--prompt-blocks", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    best: dict[str, float] = {}
    for _ in range(args.repeat):
        for k, v in run_once(args.slots, args.prompt_blocks).items():
            best[k] = min(best.get(k, v), v)
    us = {k: v * 1e6 for k, v in best.items()}
    rows = [
        [name, us[key], us[floor], us[key] / us[floor]]
        for name, key, floor in (
            ("lookup (all hits)", "lookup hit", "floor lookup"),
            ("insert (plan + commit)", "insert", "floor insert"),
            ("insert with eviction", "insert with eviction", "floor evict"),
            ("onboard (plan + complete)", "onboard plan+complete", "floor lookup"),
        )
    ]
    print_table(
        f"bookkeeping per block, µs ({args.slots} G2 slots, {args.prompt_blocks}-block prompts, best of {args.repeat})",
        ["operation", "kvbm µs/block", "dict floor µs/block", "ratio"],
        rows,
    )


if __name__ == "__main__":
    main()
