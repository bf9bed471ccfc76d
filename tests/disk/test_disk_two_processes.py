"""The deployment split: the scheduler's BlockManager owns the G3 index in this process while a
worker process moves the bytes through the same directory, as vLLM's two processes do. Jobs
and results cross the process boundary pickled, as the connector's metadata carries them."""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from kvbm.ids import Tier
from kvbm.manager.block_manager import BlockManager
from kvbm.tiers.disk.layout import G3LayoutError

from .conftest import BLOCK_BYTES, BLOCK_SIZE, REPO, g3_config, make_blocks, make_fingerprint

G1, G2, G3 = Tier.G1, Tier.G2, Tier.G3


class Worker:
    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc = proc

    def ask(self, *request: object) -> object:
        pickle.dump(request, self.proc.stdin)
        self.proc.stdin.flush()
        return pickle.load(self.proc.stdout)

    def run(self, manager: BlockManager, jobs: list) -> list:
        results = self.ask("run", jobs) if jobs else []
        for result in results:
            manager.complete(result)
        return results


@pytest.fixture
def worker_proc():
    procs: list[subprocess.Popen] = []

    def start(directory: Path) -> Worker:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.disk.diskproc", "worker", str(directory), "--g3-blocks", "16"],
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        procs.append(proc)
        return Worker(proc)

    yield start
    for proc in procs:
        if proc.poll() is None:
            pickle.dump(("exit",), proc.stdin)
            proc.stdin.flush()
        proc.wait(timeout=30)


def test_scheduler_and_worker_processes_share_one_directory(tmp_path: Path, worker_proc) -> None:
    directory = tmp_path / "g3"
    worker = worker_proc(directory)
    config = g3_config(directory, g3_blocks=16, g2_capacity_blocks=4)
    with BlockManager(config, block_size=BLOCK_SIZE, block_bytes=BLOCK_BYTES, fingerprint=make_fingerprint()) as mgr:
        with pytest.raises(G3LayoutError, match="owned by another"):  # one scheduler per directory
            BlockManager(config, block_size=BLOCK_SIZE, block_bytes=BLOCK_BYTES, fingerprint=make_fingerprint())
        a, b = make_blocks(4, seed=1), make_blocks(4, seed=2)
        for blocks, ids in ((a, [0, 1, 2, 3]), (b, [4, 5, 6, 7])):
            worker.ask("fill", ids, blocks.hashes)
            worker.run(mgr, mgr.blocks_computed(blocks, ids))
            demotions = mgr.take_jobs()
            assert [(j.src, j.dst) for j in demotions] == [(G2, G3)]
            assert all(r.ok for r in worker.run(mgr, demotions))  # durable before it reports
        assert mgr.lookup(a).tiers == (G3,) * 4
        plan = mgr.onboard(a, [20, 21, 22, 23])
        assert [(j.src, j.dst) for j in plan.jobs] == [(G3, G1)]
        assert all(r.ok for r in worker.run(mgr, plan.jobs))
        assert worker.ask("check", [20, 21, 22, 23], a.hashes) == [True] * 4
        assert mgr.stats().tier(G3).blocks_onboarded == 4
