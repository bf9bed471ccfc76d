"""Offload (G1 → G2) and onboard (G2 → G1) throughput against a numpy scattered-copy floor.

    python -m bench.transfer [--sizes-kib 64 256] [--counts 256 4096] [--layers 1 4]

For each block size and count, the engine's block ids are a random permutation (scattered)
and the G2 slots are consecutive, as a fresh tier hands them out. Figures are GB/s of block
bytes moved, best of several interleaved runs:

- floor: ``g2[i] = g1[j]`` (and back), one numpy copy per whole block, same ids, same bytes;
  measured on the one-layer arrays, so rows with more layers compare against the same floor.
- offload: ``HostStoreHandler.run`` = batched gather + xxh3_64 checksum of every slot.
- offload copy: the gather alone (``gather_blocks``), without checksums.
- onboard: ``HostLoadHandler.run`` without verification (``verify_g2_reads`` off; on by default).
- onboard+verify: with verification of every slot against its checksum.

Goal: offload and onboard at least 80% of the floor. The CPU path runs no torch op, so torch's
thread count does not apply; numpy copies are single-threaded.
"""

from __future__ import annotations

import argparse
import gc

import numpy as np

from bench.timing import best_of, print_table
from kvbm.ids import BlockHash, JobId, Tier
from kvbm.integrity import checksum_rows
from kvbm.layout import EngineKV
from kvbm.tiers.host import HostBuffer
from kvbm.transfer.blockcopy import gather_blocks
from kvbm.transfer.host_copy import HostLoadHandler, HostStoreHandler
from kvbm.transfer.jobs import TransferJob


def measure(block_bytes: int, count: int, layer_counts: list[int], rows: list[list[object]]) -> None:
    rng = np.random.default_rng(0)
    ids = rng.permutation(count).astype(np.int64)
    slots = np.arange(count, dtype=np.int64)
    g2 = HostBuffer(count, block_bytes)
    g2.rows[:] = 1  # fault the pages in before timing
    gb = count * block_bytes / 1e9
    repeat = 5 if count * block_bytes <= 64 << 20 else 3
    floor: dict[str, float] = {}
    for n_layers in layer_counts:
        times = measure_layers(g2, ids, slots, n_layers, repeat)
        if n_layers == 1:
            floor = {"offload": times["floor offload"], "onboard": times["floor onboard"]}
        rate = {k: gb / v for k, v in times.items()}
        rows.append(
            [
                block_bytes >> 10,
                count,
                n_layers,
                gb / floor["offload"],
                rate["offload"],
                rate["offload copy"],
                floor["offload"] / times["offload"],
                gb / floor["onboard"],
                rate["onboard"],
                rate["onboard+verify"],
                floor["onboard"] / times["onboard"],
            ]
        )
        gc.collect()


def measure_layers(g2: HostBuffer, ids: np.ndarray, slots: np.ndarray, n_layers: int, repeat: int) -> dict[str, float]:
    """Best times (s) of each variant with the block split over ``n_layers`` engine tensors."""
    count, block_bytes = g2.num_slots, g2.block_bytes
    hashes = tuple(BlockHash(i.to_bytes(16, "little")) for i in range(count))
    layers = [np.full((count, block_bytes // n_layers), k + 2, dtype=np.uint8) for k in range(n_layers)]
    g1 = EngineKV.from_tensors(layers)
    store, load = HostStoreHandler(g1, g2), HostLoadHandler(g1, g2)
    store_job = TransferJob(JobId(1), Tier.G1, Tier.G2, ids, slots, hashes)
    load_job = TransferJob(JobId(2), Tier.G2, Tier.G1, slots, ids, hashes)
    views, offsets = g1.layer_arrays(), g1.layout.offsets
    fns = {
        "offload": lambda: store.run(store_job),
        "offload copy": lambda: gather_blocks(views, offsets, ids, g2.rows, slots),
        "onboard": lambda: load.run(load_job),
    }
    if n_layers == 1:
        src, dst, pairs = layers[0], g2.rows, list(zip(slots.tolist(), ids.tolist()))

        def floor_offload() -> None:
            for i, j in pairs:
                dst[i] = src[j]

        def floor_onboard() -> None:
            for i, j in pairs:
                src[j] = dst[i]

        fns = {"floor offload": floor_offload, "floor onboard": floor_onboard, **fns}
    times = best_of(fns, repeat)
    store.run(store_job)
    verified = TransferJob(JobId(3), Tier.G2, Tier.G1, slots, ids, hashes, checksum_rows(g2.rows, slots))
    times["onboard+verify"] = best_of({"v": lambda: load.run(verified)}, repeat)["v"]
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes-kib", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--counts", type=int, nargs="+", default=[256, 4096])
    parser.add_argument("--layers", type=int, nargs="+", default=[1, 4])
    args = parser.parse_args()
    if args.layers[0] != 1:
        parser.error("--layers must start with 1 (the floor is measured there)")
    rows: list[list[object]] = []
    for kib in args.sizes_kib:
        for count in args.counts:
            measure(kib << 10, count, args.layers, rows)
            gc.collect()
    print_table(
        "G1 <-> G2 block moves, GB/s (scattered engine ids, consecutive slots)",
        [
            "KiB",
            "blocks",
            "layers",
            "floor off",
            "offload",
            "copy only",
            "offload/floor",
            "floor on",
            "onboard",
            "+verify",
            "onboard/floor",
        ],
        rows,
    )


if __name__ == "__main__":
    main()
