"""A kvbm worker in a child process, driven over a pipe by the tests and the benchmark.

The child owns a :class:`~kvbm.remote.RemoteWorker` with a G2 host buffer and G1 layer arrays
(host memory), fills blocks with seeded bytes, grants, pulls and reports. Between commands
it calls ``progress()`` every millisecond, as an engine loop would. Started with spawn (never
fork after a NIXL agent exists); every call from the parent has a timeout.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import subprocess
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from kvbm.ids import BlockHash, Tier


@dataclasses.dataclass(frozen=True)
class PeerSpec:
    """What the child builds. ``layer_bytes``: bytes per block of each G1 layer (a G2 slot
    holds all layers)."""

    worker: str
    num_g1: int = 16
    num_g2: int = 32
    layer_bytes: tuple[int, ...] = (4096, 4096)
    lease_s: float = 30.0
    heartbeat_s: float = 5.0
    pull_deadline_s: float = 10.0
    side_channel_timeout_s: float = 5.0
    notice_interval_s: float = 0.01
    progress_interval_s: float = 0.001
    manual_clock: bool = False
    poll_s: float = 0.001
    g1_device: str = "cpu"  # "cuda": G1 layer tensors in VRAM (torch)


class _Clock:
    """Real monotonic time plus an offset the test can advance (lease expiry without sleeping)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.monotonic() + self.offset


class _Pinner:
    """hash -> (tier, block id) directory; records every unpin."""

    def __init__(self) -> None:
        self.where: dict[BlockHash, tuple[Tier, int]] = {}
        self.pinned: dict[tuple[Tier, int], int] = {}
        self.unpins: list[tuple[int, str]] = []

    def release(self, hashes):
        return 0

    def wait_ready(self, hashes, timeout_s):
        return None

    def pin(self, hashes: Sequence[BlockHash]):
        from kvbm.remote import PinnedBlocks

        found = []
        for h in hashes:
            loc = self.where.get(h)
            if loc is None or (found and loc[0] is not found[0][0]):
                break
            found.append(loc)
        if not found:
            return None
        for loc in found:
            self.pinned[loc] = self.pinned.get(loc, 0) + 1
        return PinnedBlocks(found[0][0], np.array([b for _, b in found], dtype=np.int64))

    def unpin(self, lease, how) -> None:
        for b in lease.block_ids.tolist():
            key = (lease.tier, b)
            if key in self.pinned:
                self.pinned[key] -= 1
                if not self.pinned[key]:
                    del self.pinned[key]
        self.unpins.append((int(lease.lease_id), how.value))


def _result_dict(r) -> dict[str, Any]:
    return {
        "job_id": int(r.job_id),
        "ok": r.ok,
        "failed": r.failed.tolist(),
        "corrupt": r.corrupt.tolist(),
        "reason": r.reason,
        "duration_s": r.duration_s,
    }


def serve(conn, spec: PeerSpec) -> None:
    os.environ.setdefault("UCX_TCP_NODELAY", "y")
    from kvbm.layout import BlockLayout, EngineKV
    from kvbm.remote import BlockGrant, PeerMetadata, RemoteConfig, RemoteWorker, engine_tier, host_tier
    from kvbm.tiers.host import HostBuffer

    clock = _Clock()
    pinner = _Pinner()
    config = RemoteConfig(
        worker=spec.worker,
        lease_s=spec.lease_s,
        heartbeat_s=spec.heartbeat_s,
        pull_deadline_s=spec.pull_deadline_s,
        side_channel_timeout_s=spec.side_channel_timeout_s,
        notice_interval_s=spec.notice_interval_s,
        progress_interval_s=spec.progress_interval_s,
    )
    layout = BlockLayout(spec.layer_bytes)
    g2 = HostBuffer(spec.num_g2, layout.block_bytes)
    if spec.g1_device == "cuda":  # before the NIXL agent: UCX looks for a CUDA context at start
        import torch

        g1_arrays = [torch.zeros((spec.num_g1, n), dtype=torch.uint8, device="cuda") for n in spec.layer_bytes]
    else:
        g1_arrays = [np.zeros((spec.num_g1, n), dtype=np.uint8) for n in spec.layer_bytes]
    worker = RemoteWorker(config, clock=clock if spec.manual_clock else time.monotonic, pinner=pinner)
    worker.register(engine_tier(EngineKV.from_tensors(g1_arrays)))
    worker.register(host_tier(g2, layout))
    results: dict[int, dict[str, Any]] = {}

    def fill(tier: str, ids: list[int], seed: int) -> None:
        rows = np.random.default_rng(seed).integers(0, 256, (len(ids), layout.block_bytes), dtype=np.uint8)
        if Tier(tier) is Tier.G2:
            g2.rows[ids] = rows
        else:
            for a, off, n in zip(g1_arrays, layout.offsets, layout.layer_bytes):
                part = np.ascontiguousarray(rows[:, off : off + n])
                if spec.g1_device == "cuda":
                    import torch

                    a[torch.as_tensor(ids, device="cuda")] = torch.from_numpy(part).cuda()
                    torch.cuda.synchronize()
                else:
                    a[ids] = part

    def fill_zero(tier: str, ids: list[int]) -> None:
        if Tier(tier) is Tier.G2:
            g2.rows[ids] = 0
        else:
            for a in g1_arrays:
                a[ids] = 0

    def wait(job_ids: list[int], timeout_s: float | None = None) -> list[dict[str, Any]]:
        for job_id, r in worker.wait([j for j in job_ids if j not in results], timeout_s).items():
            results[int(job_id)] = _result_dict(r)
        return [results.pop(j) for j in job_ids]

    def pull_loop(grant, tier, ids, count, metadata=None, deadline_s=None, max_failures=3, kill=None):
        """Pull the same grant again and again (until ``count`` or ``max_failures``), zeroing
        the destination first so a torn read leaves a visible mix of old and new bytes.

        ``kill=(i, pid, delay_s)``: just before pull ``i`` starts, a shell is launched that
        SIGKILLs ``pid`` after ``delay_s`` (outside this process, so it fires even while the
        read holds the GIL).
        """
        out = []
        g = BlockGrant.from_dict(grant)
        md = None if metadata is None else PeerMetadata.from_dict(metadata)
        killer = None
        for i in range(count):
            if not out or out[-1]["ok"]:
                fill_zero(tier, ids)
            if kill is not None and i == kill[0]:
                killer = subprocess.Popen(["sh", "-c", f"sleep {kill[2]}; kill -9 {kill[1]}"])
                time.sleep(0.002)  # the shell is running before the read starts
            job = worker.pull(g, Tier(tier), ids, metadata=md, deadline_s=deadline_s)
            out.append(_result_dict(worker.wait([job])[job]))
            if sum(not r["ok"] for r in out) >= max_failures:
                break
        if killer is not None:
            killer.wait(10)
        return out

    def index(tier: str, ids: list[int], hashes: list[bytes], stored: bool = True) -> None:
        """Where the pinner finds blocks by hash (as a worker's held blocks would say)."""
        t = Tier(tier)
        for h, b in zip(hashes, ids):
            if stored:
                pinner.where[BlockHash(h)] = (t, b)
            else:
                pinner.where.pop(BlockHash(h), None)

    ops = {
        "metadata": lambda: worker.metadata.to_dict(),
        "fill": fill,
        "read": lambda tier, ids: worker.tier(Tier(tier)).read(np.asarray(ids)),
        "checksums": lambda tier, ids: worker.tier(Tier(tier)).checksums(np.asarray(ids)).tolist(),
        "grant": lambda tier, ids, hashes=(), readers=1: worker.grant(
            Tier(tier), ids, [BlockHash(h) for h in hashes], readers=readers
        ).to_dict(),
        "pull": lambda grant, tier, ids, metadata=None, deadline_s=None: int(
            worker.pull(
                BlockGrant.from_dict(grant),
                Tier(tier),
                ids,
                metadata=None if metadata is None else PeerMetadata.from_dict(metadata),
                deadline_s=deadline_s,
            )
        ),
        "pull_hashes": lambda address, hashes, tier, ids, deadline_s=None: int(
            worker.pull_hashes(address, [BlockHash(h) for h in hashes], Tier(tier), ids, deadline_s=deadline_s)
        ),
        "hold": lambda grant, metadata=None: worker.pulls.hold(
            BlockGrant.from_dict(grant), None if metadata is None else PeerMetadata.from_dict(metadata)
        ),
        "drop": lambda grant: worker.pulls.drop(BlockGrant.from_dict(grant)),
        "wait": wait,
        "pull_loop": pull_loop,
        "index": index,
        "stats": lambda: worker.stats().to_dict(),
        "unpins": lambda: [list(u) for u in pinner.unpins],
        "pinned": lambda: len(pinner.pinned),
        "advance": lambda seconds: setattr(clock, "offset", clock.offset + seconds),
        "pid": os.getpid,
    }
    conn.send(("ready", worker.metadata.to_dict()))
    while True:
        if not conn.poll(spec.poll_s):
            for r in worker.progress():
                results[int(r.job_id)] = _result_dict(r)
            continue
        op, kwargs = conn.recv()
        if op == "exit":
            worker.close()
            conn.send(("ok", None))
            break
        try:
            conn.send(("ok", ops[op](**kwargs)))
        except Exception as exc:  # reported to the test, which decides
            conn.send(("error", f"{type(exc).__name__}: {exc}"))
    conn.close()


def start_peers(*specs: PeerSpec, timeout_s: float = 60.0) -> list[Peer]:
    """Start children in parallel and wait until every one is ready."""
    peers = [Peer(s) for s in specs]
    try:
        return [p.ready(timeout_s) for p in peers]
    except BaseException:
        for p in peers:
            p.kill()
        raise


def close_peers(*peers: Peer, timeout_s: float = 20.0) -> list[int | None]:
    """Ask every child to exit at once, then collect their exit codes (killing stragglers)."""
    for p in peers:
        if p.process.is_alive():
            try:
                p.send("exit")
            except OSError:
                pass
    return [p.close(timeout_s) for p in peers]


class PeerError(Exception):
    """The child raised while running a command."""


class Peer:
    """Parent-side handle of a child worker. Every call is bounded by ``timeout_s``."""

    def __init__(self, spec: PeerSpec) -> None:
        """Start the child; :meth:`ready` waits for it (start several, then wait for all)."""
        ctx = multiprocessing.get_context("spawn")
        self.spec = spec
        self._conn, child = ctx.Pipe()
        self.process = ctx.Process(target=serve, args=(child, spec), name=f"kvbm-peer-{spec.worker}", daemon=True)
        self.process.start()
        child.close()
        self.metadata: dict[str, Any] = {}
        self._exit_sent = False

    def ready(self, timeout_s: float = 60.0) -> Peer:
        status, metadata = self._recv(timeout_s)
        if status != "ready":
            raise PeerError(f"peer {self.spec.worker} failed to start: {metadata}")
        self.metadata = metadata
        return self

    @property
    def address(self) -> str:
        return self.metadata["side_channel"]

    @property
    def agent(self) -> str:
        return self.metadata["agent"]

    def call(self, op: str, timeout_s: float = 30.0, **kwargs: Any) -> Any:
        self.send(op, **kwargs)
        return self.reply(timeout_s)

    def send(self, op: str, **kwargs: Any) -> None:
        """Start a command without waiting; collect its answer with :meth:`reply`."""
        self._conn.send((op, kwargs))
        self._exit_sent = op == "exit"

    def reply(self, timeout_s: float = 30.0) -> Any:
        status, value = self._recv(timeout_s)
        if status != "ok":
            raise PeerError(value)
        return value

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(10)

    def close(self, timeout_s: float = 20.0) -> int | None:
        """Ask the child to exit; kill it if it does not. Returns its exit code."""
        if self.process.is_alive():
            try:
                if not self._exit_sent:
                    self.send("exit")
                self.reply(timeout_s)
            except (PeerError, TimeoutError, OSError, EOFError):
                pass
            self.process.join(timeout_s)
        if self.process.is_alive():
            self.kill()
        self._conn.close()
        return self.process.exitcode

    def _recv(self, timeout_s: float) -> tuple[str, Any]:
        if not self._conn.poll(timeout_s):
            raise TimeoutError(f"peer {self.spec.worker} did not answer within {timeout_s}s")
        return self._conn.recv()


def until(predicate, *, timeout_s: float = 20.0, what: str = "condition", interval_s: float = 0.01) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail the test after ``timeout_s``.

    The timeout only bounds a wait that should end much sooner; it is not a performance limit.
    """
    limit = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > limit:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(interval_s)
