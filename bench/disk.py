"""G3 disk tier: G2 -> G3 and G3 -> G2 GB/s against O_DIRECT floors, and index operations/s.

    python -m bench.disk [--dir /var/tmp/kvbm-bench-g3] [--sizes-kib 64 2048] [--mib 256] [--nixl]

``--dir`` must be on the disk to measure (not tmpfs); it is wiped and formatted. For each block
size, ``--mib`` of blocks move between a G2 buffer (scattered slots, as LRU hands them out) and
consecutive G3 slots (a fresh tier). Figures are GB/s of block bytes, best of several rounds,
each candidate timed alternately with its floor on the same file region:

- floor write: one thread, 16 MiB ``pwrite`` calls from one aligned buffer, then one fdatasync.
- floor read 1 / read 4: 16 MiB ``preadv`` calls in one thread / 4 MiB calls from 4 threads
  (4 requests in flight: the multi-request read floor).
- G2->G3: ``DemoteHandler.run`` (pwritev from G2 rows on the pool, fdatasync per batch).
- G3->G2: ``PromoteHandler.run`` (preadv into G2 rows, then xxh3 verification of every block).
- G3->G2 read: the same reads without verification (``DiskSlotStore.read_rows``).
- G3->G1: ``DiskLoadHandler.run`` into a 4-layer engine (staging ring, verify, scatter).

Goals: G2->G3 at least 80% of the write floor; G3->G2 at least 80% of the 4-in-flight read floor.
``--nixl`` adds the same moves through NIXL's POSIX backend (AIO, io_uring), no verification,
for the record: the tier uses the thread pool (the faster of the two here; see bench/README.md).

The index table: ``DiskIndex`` commits (prepare + complete_store, one LMDB transaction per
batch of 64 and of 4096 blocks; its fsync runs on the index's syncer thread), last-use flushes, in-memory lookups, and its open (load +
LRU rebuild), against raw LMDB puts of the same records in one transaction.
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import lmdb
import numpy as np

from bench.timing import best_of, print_table
from kvbm.config import G3OnMismatch
from kvbm.hashing import TOKEN_DTYPE, LayoutFingerprint
from kvbm.ids import BlockHash, JobId, Tier
from kvbm.integrity import checksum_rows
from kvbm.layout import EngineKV
from kvbm.manager.events import EventLog
from kvbm.tiers.disk.handlers import DemoteHandler, DiskLoadHandler, PromoteHandler
from kvbm.tiers.disk.index import DiskIndex
from kvbm.tiers.disk.layout import DiskLayout, open_directory
from kvbm.tiers.disk.store import DiskSlotStore
from kvbm.tiers.host import HostBuffer
from kvbm.transfer.jobs import TransferJob

FLOOR_CHUNK = 16 << 20


def fingerprint(block_size: int = 16) -> LayoutFingerprint:
    return LayoutFingerprint("bench", "bfloat16", block_size, 4, 8, 64, "bench")


def open_tier(path: str, block_bytes: int, count: int) -> DiskSlotStore:
    shutil.rmtree(path, ignore_errors=True)
    layout = DiskLayout.plan(fingerprint(), block_bytes, count * block_bytes)
    return DiskSlotStore(open_directory(path, layout, on_mismatch=G3OnMismatch.WIPE, owner=False))


def floors(path: str, nbytes: int) -> dict[str, Callable[[], object]]:
    """Raw O_DIRECT I/O on the first ``nbytes`` of the tier's first slot file."""
    fd = os.open(os.path.join(path, "slots-00000.bin"), os.O_RDWR | os.O_DIRECT)
    buf = HostBuffer(1, nbytes).rows[0]
    buf[:] = 3
    pool = ThreadPoolExecutor(4)

    def write() -> None:
        for off in range(0, nbytes, FLOOR_CHUNK):
            os.pwrite(fd, buf[off : off + FLOOR_CHUNK], off)
        os.fdatasync(fd)

    def read1() -> None:
        for off in range(0, nbytes, FLOOR_CHUNK):
            os.preadv(fd, [buf[off : off + FLOOR_CHUNK]], off)

    def read4() -> None:
        step = 4 << 20
        list(pool.map(lambda off: os.preadv(fd, [buf[off : off + step]], off), range(0, nbytes, step)))

    def close() -> None:
        pool.shutdown()
        os.close(fd)

    return {"write": write, "read 1": read1, "read 4": read4, "_close": close}


def measure(path: str, block_bytes: int, total: int, repeat: int, nixl: bool, rows: list[list[object]]) -> None:
    count = total // block_bytes
    nbytes = count * block_bytes
    store = open_tier(path, block_bytes, count)
    g2 = HostBuffer(count, block_bytes)
    g2.rows[:] = np.random.default_rng(0).integers(0, 256, (count, block_bytes), dtype=np.uint8)
    src = np.random.default_rng(1).permutation(count).astype(np.int64)
    slots = np.arange(count, dtype=np.int64)
    hashes = tuple(BlockHash(i.to_bytes(16, "little")) for i in range(count))
    sums = checksum_rows(g2.rows, src)
    demote = DemoteHandler(store, g2)
    promote = PromoteHandler(store, g2)
    g1 = EngineKV.from_tensors([np.zeros((count, block_bytes // 4), dtype=np.uint8) for _ in range(4)])
    load = DiskLoadHandler(store, g1, staging_bytes=64 << 20)
    store_job = TransferJob(JobId(1), Tier.G2, Tier.G3, src, slots, hashes)
    promote_job = TransferJob(JobId(2), Tier.G3, Tier.G2, slots, src, hashes, sums)
    load_job = TransferJob(JobId(3), Tier.G3, Tier.G1, slots, src, hashes, sums)
    demote.run(store_job)  # initialise the extents once, so every round overwrites
    floor = floors(path, nbytes)
    fns = {
        "floor write": floor["write"],
        "G2->G3": lambda: demote.run(store_job),
        "floor read 1": floor["read 1"],
        "floor read 4": floor["read 4"],
        "G3->G2": lambda: promote.run(promote_job),
        "G3->G2 read": lambda: store.read_rows(slots, g2.rows, src),
        "G3->G1": lambda: load.run(load_job),
    }
    demote.run(store_job)  # the floors overwrote the region: put the blocks back
    times = best_of(fns, repeat)
    demote.run(store_job)
    assert not len(promote.run(promote_job).corrupt) and not len(load.run(load_job).corrupt)
    floor["_close"]()
    gb = nbytes / 1e9
    rate = {k: gb / v for k, v in times.items()}
    rows.append(
        [
            block_bytes >> 10,
            count,
            rate["floor write"],
            rate["G2->G3"],
            rate["G2->G3"] / rate["floor write"],
            rate["floor read 1"],
            rate["floor read 4"],
            rate["G3->G2"],
            rate["G3->G2 read"],
            rate["G3->G1"],
            rate["G3->G2"] / rate["floor read 4"],
        ]
    )
    if nixl:
        for name, params in (("nixl posix aio", {"use_aio": "true"}), ("nixl posix io_uring", {"use_uring": "true"})):
            w, r = nixl_rates(path, g2, src, block_bytes, params, repeat)
            rows.append(
                [
                    block_bytes >> 10,
                    count,
                    name,
                    w,
                    w / rate["floor write"],
                    "",
                    "",
                    "",
                    r,
                    "",
                    r / rate["floor read 4"],
                ]
            )
    store.close()


def nixl_rates(
    path: str, g2: HostBuffer, src: np.ndarray, block_bytes: int, params: dict[str, str], repeat: int
) -> tuple[float, float]:
    """G2 <-> slot file through NIXL's POSIX backend: (write GB/s incl. fdatasync, read GB/s)."""
    from nixl._api import nixl_agent, nixl_agent_config

    count = len(src)
    fd = os.open(os.path.join(path, "slots-00000.bin"), os.O_RDWR | os.O_DIRECT)
    agent = nixl_agent(f"bench-{os.getpid()}", nixl_agent_config(enable_prog_thread=False, backends=[]))
    agent.create_backend("POSIX", params)
    agent.register_memory([(g2.address, g2.nbytes, 0, "")], "DRAM", backends=["POSIX"])
    agent.register_memory([(0, count * block_bytes, fd, "")], "FILE", backends=["POSIX"])
    local = np.stack([g2.address + src * block_bytes, np.full(count, block_bytes), np.zeros(count)], axis=1)
    remote = np.stack([np.arange(count) * block_bytes, np.full(count, block_bytes), np.full(count, fd)], axis=1)
    ld = agent.get_xfer_descs(local.astype(np.uint64), "DRAM")
    rd = agent.get_xfer_descs(remote.astype(np.uint64), "FILE")

    def run(op: str) -> None:
        handle = agent.initialize_xfer(op, ld, rd, agent.name, backends=["POSIX"])
        state = agent.transfer(handle)
        while state not in ("DONE", "ERR"):
            state = agent.check_xfer_state(handle)
        assert state == "DONE", state
        agent.release_xfer_handle(handle)
        if op == "WRITE":
            os.fdatasync(fd)

    times = best_of({"w": lambda: run("WRITE"), "r": lambda: run("READ")}, repeat)
    os.close(fd)
    gb = count * block_bytes / 1e9
    return gb / times["w"], gb / times["r"]


def index_rates(path: str, entries: int, rows: list[list[object]]) -> None:
    fp = fingerprint()
    layout = DiskLayout.plan(fp, 4096, entries * 4096)
    rng = np.random.default_rng(2)
    hashes = [BlockHash(rng.bytes(16)) for _ in range(entries)]
    tokens = rng.integers(0, 32000, (entries, fp.block_size), dtype=np.int64).astype(TOKEN_DTYPE)
    sums = rng.integers(0, 1 << 62, entries, dtype=np.uint64)
    timed: list[tuple[str, float]] = []
    for batch in (64, 4096):
        shutil.rmtree(path, ignore_errors=True)
        index = DiskIndex(open_directory(path, layout, on_mismatch=G3OnMismatch.WIPE, owner=True), EventLog(0))
        start = time.perf_counter()
        for a in range(0, entries, batch):
            res = index.prepare_store(hashes[a : a + batch], tokens[a : a + batch])
            index.complete_store(res.hashes, sums[a : a + batch])
        timed.append((f"commit, {batch} per txn (fsync off the thread)", time.perf_counter() - start))
    start = time.perf_counter()
    index.touch(hashes)
    index.flush()
    timed.append(("touch + flush (one txn)", time.perf_counter() - start))
    start = time.perf_counter()
    hits = sum(len(index.match_prefix(hashes[a : a + 64])) for a in range(0, entries, 64))
    timed.append(("lookup (in memory, 64-block prompts)", time.perf_counter() - start))
    assert hits == entries
    index.close()
    start = time.perf_counter()
    index = DiskIndex(open_directory(path, layout, on_mismatch=G3OnMismatch.WIPE, owner=True), EventLog(0))
    timed.append(("open: load + LRU rebuild", time.perf_counter() - start))
    assert len(index) == entries
    index.close()
    floor_env = lmdb.open(os.path.join(path, "floor"), map_size=1 << 30, sync=True, metasync=False)
    values = [bytes(40) + tokens[i].tobytes() for i in range(entries)]
    start = time.perf_counter()
    with floor_env.begin(write=True) as txn:
        for h, v in zip(hashes, values):
            txn.put(h, v)
    timed.append(("floor: raw LMDB puts, one txn", time.perf_counter() - start))
    floor_env.close()
    rows += [[name, entries, entries / seconds / 1e6] for name, seconds in timed]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default="/var/tmp/kvbm-bench-g3")
    parser.add_argument("--sizes-kib", type=int, nargs="+", default=[64, 2048])
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--index-entries", type=int, default=65536)
    parser.add_argument("--nixl", action="store_true")
    args = parser.parse_args()
    rows: list[list[object]] = []
    for kib in args.sizes_kib:
        measure(os.path.join(args.dir, "tier"), kib << 10, args.mib << 20, args.repeat, args.nixl, rows)
        gc.collect()
    print_table(
        "G2 <-> G3 block moves, GB/s (scattered G2 slots, consecutive G3 slots, O_DIRECT)",
        [
            "KiB",
            "blocks",
            "floor write",
            "G2->G3",
            "write/floor",
            "floor read 1",
            "floor read 4",
            "G3->G2",
            "read only",
            "G3->G1",
            "G3->G2/floor 4",
        ],
        rows,
    )
    index_rows: list[list[object]] = []
    index_rates(os.path.join(args.dir, "index"), args.index_entries, index_rows)
    print_table("G3 index (LMDB), M entries/s", ["operation", "entries", "M/s"], index_rows)
    shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
