"""Remote pull throughput and latency over NIXL (UCX) between two processes on one host.

    python -m bench.remote_pull [--shapes 256x64K 64x2M 4096x4K] [--repeat 7] [--device cpu|cuda]

A source process (spawned) serves N blocks of B bytes from its G2 host buffer; this process
pulls all of them into its own G1 (host memory, or VRAM with ``--device cuda``). Block ids
are either consecutive on both sides (NIXL merges the descriptors into one run) or a random
permutation on both sides (every block its own descriptor). Figures are GB/s of block bytes,
best of ``--repeat`` interleaved rounds, against floors measured in the same run and process:

- memcpy: one ``np.copyto`` of the same bytes, both buffers warm (the issue's baseline);
- scattered copy: ``kvbm.transfer.blockcopy.copy_rows`` with the same permutation (one numpy
  copy per block), for the scattered rows;
- h2d copy (``--device cuda``): one pinned-host to device ``copy_`` of the same bytes.

Candidates:

- nixl read: ``NixlTransport.post_read`` + polling + release (one NIXL request of N blocks);
- pull: ``PullEngine.submit`` + ``poll`` until the result, verification off;
- pull+verify: the same, with every block checked against the source's published checksum.

Goal: pull at least 75% of memcpy from 64 KiB blocks up. Then latency (median and p99 over
many rounds) of a one-block pull and of a notification round trip (send, the source echoes
from a polling loop, receive).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from bench.timing import best_of, print_table
from kvbm.ids import Tier
from kvbm.layout import EngineKV
from kvbm.remote import BlockGrant, PeerMetadata, RemoteConfig, RemoteWorker, engine_tier, host_tier
from kvbm.remote.agent import NixlTransport
from kvbm.remote.metadata import agent_name
from kvbm.remote.pull import PullEngine
from kvbm.tiers.host import HostBuffer
from kvbm.transfer.blockcopy import copy_rows

os.environ.setdefault("UCX_TCP_NODELAY", "y")
_UNITS = {"K": 1 << 10, "M": 1 << 20}


def parse_shape(text: str) -> tuple[int, int]:
    count, _, size = text.upper().partition("X")
    return int(count), int(size[:-1]) * _UNITS[size[-1]] if size[-1] in _UNITS else int(size)


# -- the source process --------------------------------------------------------------------


def source_main(conn) -> None:
    """Serve one shape at a time: ``("setup", n, b)`` → (metadata, grant); ``("echo", n)``
    echoes n notifications from a spinning loop; ``("exit",)``."""
    worker: RemoteWorker | None = None
    buf: HostBuffer | None = None  # registered with the worker: must outlive it
    while True:
        cmd = conn.recv()  # meanwhile the worker's progress thread polls UCX every 1 ms
        if cmd[0] == "setup":
            if worker is not None:
                worker.close()
            _, count, block_bytes = cmd
            buf = HostBuffer(count, block_bytes)
            buf.rows[:] = np.random.default_rng(count).integers(0, 256, buf.rows.shape, dtype=np.uint8)
            worker = RemoteWorker(RemoteConfig(worker="bench-src", side_channel_host=None))
            worker.register(host_tier(buf))
            grant = worker.grant(Tier.G2, np.arange(count), readers=1 << 40)
            conn.send((worker.metadata.to_dict(), grant.to_dict()))
        elif cmd[0] == "echo":
            assert worker is not None
            _, rounds, reader_md = cmd
            echo_notifications(worker, PeerMetadata.from_dict(reader_md), rounds, conn)
        else:
            if worker is not None:
                worker.close()
            conn.send("bye")
            return


def echo_notifications(worker: RemoteWorker, reader: PeerMetadata, rounds: int, conn) -> None:
    transport = NixlTransport(agent_name("bench-echo", os.urandom(4).hex()))
    transport.load_peer(reader)
    conn.send(PeerMetadata(transport.name, transport.metadata_bytes(), ()).to_dict())
    seen = 0
    limit = time.monotonic() + 60
    while seen < rounds and time.monotonic() < limit:
        for messages in transport.take_notifications().values():
            for message in messages:
                transport.notify(reader.agent, message)
                seen += 1
    transport.close()
    conn.send(seen)


# -- the reader (this process) ---------------------------------------------------------------


class Reader:
    """This process's side of one shape: a transport, G1, and two pull engines."""

    def __init__(self, count: int, block_bytes: int, device: str, metadata: PeerMetadata) -> None:
        if device == "cuda":
            import torch

            self.g1 = torch.zeros((count, block_bytes), dtype=torch.uint8, device="cuda")
        else:
            self.g1 = np.ones((count, block_bytes), dtype=np.uint8)  # pages faulted in
        self.transport = NixlTransport(agent_name("bench-reader", os.urandom(4).hex()))
        self.transport.register(engine_tier(EngineKV.from_tensors([self.g1])))
        self.transport.load_peer(metadata)
        clock = time.monotonic
        kw: dict[str, Any] = dict(
            clock=clock, deadline_s=30.0, heartbeat_s=5.0, side_channel_timeout_s=5.0, notice_interval_s=0.05
        )
        self.fast = PullEngine(self.transport, verify=False, **kw)
        self.verified = PullEngine(self.transport, verify=True, **kw)

    def read(self, grant: BlockGrant, src: np.ndarray, dst: np.ndarray) -> None:
        handle = self.transport.post_read(grant.source, grant.tier, src, Tier.G1, dst)
        while not self.transport.check(handle):
            pass
        self.transport.release(handle)

    def pull(self, engine: PullEngine, grant: BlockGrant, dst: np.ndarray) -> None:
        engine.submit(grant, Tier.G1, dst)
        while True:
            results = engine.poll()
            if results:
                assert results[0].ok, results[0].reason
                return

    def close(self) -> None:
        self.fast.close()
        self.verified.close()
        self.transport.close()


def measure_shape(conn, count: int, block_bytes: int, device: str, repeat: int, rows: list) -> Reader:
    conn.send(("setup", count, block_bytes))
    md_raw, grant_raw = conn.recv()
    metadata, grant = PeerMetadata.from_dict(md_raw), BlockGrant.from_dict(grant_raw)
    reader = Reader(count, block_bytes, device, metadata)
    gb = count * block_bytes / 1e9
    rng = np.random.default_rng(1)
    src_host = np.random.default_rng(2).integers(0, 256, (count, block_bytes), dtype=np.uint8)
    dst_host = np.ones_like(src_host)
    for layout in ("consecutive", "scattered"):
        src_ids = np.arange(count) if layout == "consecutive" else rng.permutation(count)
        dst_ids = np.arange(count) if layout == "consecutive" else rng.permutation(count)
        sub = subset(grant, src_ids)
        fns: dict[str, Callable[[], object]] = {
            "memcpy": lambda: np.copyto(dst_host, src_host),
            "nixl read": lambda: reader.read(grant, src_ids, dst_ids),
            "pull": lambda: reader.pull(reader.fast, sub, dst_ids),
            "pull+verify": lambda: reader.pull(reader.verified, sub, dst_ids),
        }
        if layout == "scattered":
            fns["scattered copy"] = lambda: copy_rows(src_host, src_ids, dst_host, dst_ids)
        if device == "cuda":
            fns["h2d copy"] = h2d_copy(src_host, reader.g1)
        best = best_of(fns, repeat)
        floor = best["memcpy"]
        for name, seconds in best.items():
            rows.append([f"{count} x {fmt_bytes(block_bytes)}", layout, name, gb / seconds, floor / seconds])
    check_bytes(reader, grant)
    return reader


def subset(grant: BlockGrant, src_ids: np.ndarray) -> BlockGrant:
    """The grant restricted and reordered to ``src_ids`` (checksums follow their blocks)."""
    return BlockGrant(grant.source, grant.lease_id, grant.tier, grant.block_ids[src_ids], grant.checksums[src_ids])


def h2d_copy(src_host: np.ndarray, g1) -> Callable[[], object]:
    import torch

    pinned = torch.from_numpy(src_host).pin_memory()

    def run() -> None:
        g1.copy_(pinned, non_blocking=True)
        torch.cuda.synchronize()

    return run


def check_bytes(reader: Reader, grant: BlockGrant) -> None:
    """A final read of every block must deliver the source's bytes (checked by checksum)."""
    ids = np.arange(len(grant))
    reader.read(grant, ids, ids)
    got = reader.transport.local_tier(Tier.G1).checksums(ids)
    assert np.array_equal(got, grant.checksums), "pulled bytes differ from the source's"


def latency(reader: Reader, grant: BlockGrant, rounds: int) -> dict[str, list[float]]:
    one = subset(grant, np.array([0]))
    dst = np.array([0])
    samples: dict[str, list[float]] = {"nixl read": [], "pull": [], "pull+verify": []}
    for _ in range(rounds):
        for name, fn in (
            ("nixl read", lambda: reader.read(grant, dst, dst)),
            ("pull", lambda: reader.pull(reader.fast, one, dst)),
            ("pull+verify", lambda: reader.pull(reader.verified, one, dst)),
        ):
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return samples


def notification_rtt(conn, reader: Reader, rounds: int) -> list[float]:
    md = PeerMetadata(reader.transport.name, reader.transport.metadata_bytes(), ())
    conn.send(("echo", rounds, md.to_dict()))
    echo = PeerMetadata.from_dict(conn.recv())
    reader.transport.load_peer(echo)
    out = []
    for i in range(rounds):
        message = f"ping {i}".encode()
        start = time.perf_counter()
        reader.transport.notify(echo.agent, message)
        got = False
        while not got:
            got = any(message in msgs for msgs in reader.transport.take_notifications().values())
        out.append(time.perf_counter() - start)
    assert conn.recv() == rounds
    return out


def fmt_bytes(n: int) -> str:
    return f"{n >> 20} MiB" if n >= 1 << 20 else f"{n >> 10} KiB"


def stats_row(name: str, samples: list[float]) -> list[object]:
    us = np.array(samples) * 1e6
    return [name, float(np.median(us)), float(np.percentile(us, 99)), len(us)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["256x64K", "64x2M", "4096x4K"])
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--rounds", type=int, default=300, help="latency samples")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    args = parser.parse_args()
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device here")
    ctx = multiprocessing.get_context("spawn")
    conn, child = ctx.Pipe()
    proc = ctx.Process(target=source_main, args=(child,), daemon=True)
    proc.start()
    rows: list[list[object]] = []
    try:
        for shape in args.shapes:
            count, block_bytes = parse_shape(shape)
            reader = measure_shape(conn, count, block_bytes, args.device, args.repeat, rows)
            reader.close()
        conn.send(("setup", 1, 64 << 10))
        md_raw, grant_raw = conn.recv()
        reader = Reader(1, 64 << 10, args.device, PeerMetadata.from_dict(md_raw))
        grant = BlockGrant.from_dict(grant_raw)
        lat = latency(reader, grant, args.rounds)
        rtt = notification_rtt(conn, reader, args.rounds)
        reader.close()
        conn.send(("exit",))
        conn.recv()
    finally:
        proc.join(30)
        if proc.is_alive():
            proc.kill()
    where = f"G1 in {'VRAM' if args.device == 'cuda' else 'host memory'}"
    print_table(
        f"Remote pull, peer G2 -> local G1 ({where}); GB/s best of {args.repeat}; ratio to memcpy",
        ["blocks", "ids", "path", "GB/s", "x memcpy"],
        rows,
    )
    print_table(
        f"Latency, one 64 KiB block and a notification round trip (us, {args.rounds} rounds)",
        ["what", "median", "p99", "n"],
        [stats_row(f"1-block {k}", v) for k, v in lat.items()] + [stats_row("notification round trip", rtt)],
    )
    print(f"\nUCX_TLS={os.environ.get('UCX_TLS', '(default)')} UCX_TCP_NODELAY={os.environ.get('UCX_TCP_NODELAY')}")


if __name__ == "__main__":
    main()
