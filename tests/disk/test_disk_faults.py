"""G3 under faults: a file size limit, a full filesystem, damaged slot files and foreign index
records. Blocks that cannot be stored are counted and logged once per burst; serving goes on."""

from __future__ import annotations

import errno
import json
import logging
import os
import subprocess
import uuid
from pathlib import Path

import lmdb
import pytest

from kvbm.ids import Tier
from kvbm.tiers.disk import store as disk_store

from .conftest import (
    STRIDE,
    build_node,
    g3_config,
    make_blocks,
    make_fingerprint,
    run_diskproc,
    slot_file,
    written_and_closed,
)

G2, G3 = Tier.G2, Tier.G3


def test_writes_past_a_file_size_limit_fail_are_counted_and_logged_once(tmp_path: Path) -> None:
    child = run_diskproc("fsize", str(tmp_path / "g3"), "--limit-slots", "6", "--blocks", "16")
    assert child.returncode == 0, child.stderr
    out = json.loads(child.stdout)
    g3 = out["written"]["tiers"]["g3"]
    # Slots 0-5 fit under the limit. The first batch of 8 loses slots 6 and 7; the second batch
    # gets 6, 7 (freed again) and 8-13, all past the limit.
    assert (g3["blocks_offloaded"], g3["io_errors"], g3["transfers"], g3["transfer_failures"]) == (6, 10, 2, 2)
    assert g3["used_blocks"] == 6 and g3["pinned_blocks"] == 0
    assert (out["matched"], out["tiers"], out["served"], out["intact"], out["read_ok"]) == (6, ["g3"], 6, 6, True)
    store_lines = [line for line in child.stderr.splitlines() if line.startswith("WARNING kvbm.tiers.disk.store")]
    assert len(store_lines) == 1 and "EFBIG" in store_lines[0]  # two failing batches, one line
    manager_lines = [
        line for line in child.stderr.splitlines() if line.startswith("WARNING kvbm.manager.block_manager")
    ]
    assert len(manager_lines) == 1


@pytest.fixture
def small_filesystem(tmp_path: Path):
    """A 384 KiB tmpfs (needs root to mount; skipped otherwise)."""
    mount_point = tmp_path / f"small-{uuid.uuid4().hex[:8]}"
    mount_point.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=384k,mode=0700", "tmpfs", str(mount_point)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_a_full_filesystem_fails_only_the_blocks_that_do_not_fit(small_filesystem: Path, caplog) -> None:
    config = g3_config(small_filesystem / "g3", g3_blocks=64, g2_capacity_blocks=8)
    with caplog.at_level(logging.WARNING):
        node = build_node(config, g1_blocks=64)
    try:
        assert any("sparse, not preallocated" in r.message for r in caplog.records)
        blocks = make_blocks(64, seed=1)
        for a in range(0, 64, 8):
            node.write(blocks[a : a + 8], list(range(a, a + 8)))
        g3 = node.manager.stats().tier(G3)
        assert g3.blocks_offloaded + g3.io_errors == 64
        assert 0 < g3.blocks_offloaded < 64 and g3.used_blocks == g3.blocks_offloaded
        enospc = [r for r in caplog.records if "ENOSPC" in r.message and r.name == "kvbm.tiers.disk.store"]
        assert len(enospc) == 1  # one burst, one line
        # Serving goes on: whatever G3 stored is served intact, the rest is a miss.
        plan = node.manager.onboard(blocks, list(range(64)))
        results = node.run(plan.jobs)
        assert all(r.ok for r in results)
        served = set(range(64)) - set(plan.missing_block_ids.tolist())
        assert len(served) == g3.blocks_offloaded + 8  # the last batch is still in G2 as well
        assert all(node.holds(i, blocks.hashes[i]) for i in served)
    finally:
        node.close()


def test_records_past_a_truncated_file_are_dropped_at_open(tmp_path: Path) -> None:
    directory = tmp_path / "g3"
    config = g3_config(directory, g3_blocks=8)
    a, b = make_blocks(4, seed=2), make_blocks(4, seed=3)
    node = build_node(config)
    node.write(a, [0, 1, 2, 3])
    node.write(b, [4, 5, 6, 7])
    node.close()
    os.truncate(slot_file(directory), 5 * STRIDE + 17)
    node = build_node(config)
    try:
        g3 = node.manager.stats().tier(G3)
        assert (g3.dropped_on_open, g3.used_blocks) == (3, 5)
        assert node.manager.lookup(b).tiers == (G3,)  # B1..B3 lived in slots 5..7
        assert 'kvbm_dropped_on_open_total{tier="g3"} 3\n' in node.manager.stats().to_prometheus()
        plan = node.manager.onboard(a, [10, 11, 12, 13])
        assert all(r.ok for r in node.run(plan.jobs))
        assert all(node.holds(10 + i, h) for i, h in enumerate(a.hashes))
    finally:
        node.close()


def test_index_records_kvbm_did_not_write_are_dropped(tmp_path: Path) -> None:
    directory = tmp_path / "g3"
    config, a = written_and_closed(directory, seed=4)
    env = lmdb.open(str(directory / "index"), max_dbs=2)
    db = env.open_db(b"blocks")
    with env.begin(write=True, db=db) as txn:
        good = txn.get(a.hashes[0])
        other_fp = make_fingerprint(model="x").digest()
        txn.put(b"short-key", good)
        txn.put(b"s" * 16, good[:-1])  # wrong length
        txn.put(b"f" * 16, good[:24] + other_fp + good[40:])  # another fingerprint
        txn.put(b"r" * 16, (99).to_bytes(8, "little") + good[8:])  # slot out of range
        txn.put(b"d" * 16, good[:16] + (0).to_bytes(8, "little") + good[24:])  # slot 0 again, older
    env.close()
    node = build_node(config)
    try:
        g3 = node.manager.stats().tier(G3)
        assert g3.dropped_on_open == 5 and g3.used_blocks == 4  # A0..A3 kept; every other dropped
        plan = node.manager.onboard(a, [10, 11, 12, 13])
        assert all(r.ok for r in node.run(plan.jobs))
        assert all(node.holds(10 + i, h) for i, h in enumerate(a.hashes))
    finally:
        node.close()


class FailingOs:
    """``os`` for the disk store, except that I/O touching chosen slots fails with EIO, as a
    bad sector or a dying disk does (no device-mapper "error" target in a container)."""

    def __init__(self) -> None:
        self.bad_slots: set[int] = set()
        self.sync_fails = False

    def __getattr__(self, name: str):
        return getattr(os, name)

    def _check(self, bufs, offset: int) -> None:
        end = offset + sum(memoryview(b).nbytes for b in bufs)
        if any(offset < (s + 1) * STRIDE and s * STRIDE < end for s in self.bad_slots):
            raise OSError(errno.EIO, os.strerror(errno.EIO))

    def preadv(self, fd: int, bufs, offset: int) -> int:
        self._check(bufs, offset)
        return os.preadv(fd, bufs, offset)

    def pwritev(self, fd: int, bufs, offset: int) -> int:
        self._check(bufs, offset)
        return os.pwritev(fd, bufs, offset)

    def fdatasync(self, fd: int) -> None:
        if self.sync_fails:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        os.fdatasync(fd)


def test_eio_on_reads_writes_and_syncs_fails_only_those_blocks_and_serving_goes_on(
    tmp_path: Path, monkeypatch, caplog
) -> None:
    failing = FailingOs()
    monkeypatch.setattr(disk_store, "os", failing)
    node = build_node(g3_config(tmp_path / "g3", g3_blocks=64, g2_capacity_blocks=8), g1_blocks=32)
    try:
        a = make_blocks(8, seed=5)
        node.write(a, list(range(8)))
        assert node.manager.stats().tier(G3).blocks_offloaded == 8

        # A read that hits a bad sector: that block is a load failure (recomputed), never passed
        # on as bytes; the rest of its run, read again block by block, is served intact.
        node.drain()
        for i in range(8, 20):  # push A out of G2, so it can only come from G3
            node.write(make_blocks(1, seed=100 + i), [i])
        failing.bad_slots = {2}
        assert node.manager.lookup(a).tiers == (G3,) * 8
        for layer in node.layers:
            layer[:8] = 0
        plan = node.manager.onboard(a, list(range(8)))
        results = node.run(plan.jobs)
        failed = {int(plan.jobs[0].dst_ids[p]) for r in results for p in r.failed}
        assert failed == {2} and all("EIO" in r.reason for r in results if len(r.failed))
        assert all(not node.holds(i, a.hashes[i]) and not node.layers[0][i].any() for i in failed)
        assert all(node.holds(i, a.hashes[i]) for i in set(range(8)) - failed)
        assert node.manager.stats().tier(G3).io_errors == len(failed)

        # Writes into bad sectors, then a sync that fails: nothing of either batch is committed,
        # so nothing unverified is ever indexed; both bursts are counted.
        with caplog.at_level(logging.WARNING):
            before = node.manager.stats().tier(G3)
            failing.bad_slots = set(range(64))
            b = make_blocks(4, seed=6)
            node.write(b, [24, 25, 26, 27])
            failing.bad_slots, failing.sync_fails = set(), True
            c = make_blocks(4, seed=7)
            node.write(c, [28, 29, 30, 31])
            after = node.manager.stats().tier(G3)
        assert after.blocks_offloaded == before.blocks_offloaded
        assert after.io_errors - before.io_errors >= 8
        assert any("EIO" in r.message for r in caplog.records if r.name == "kvbm.tiers.disk.store")

        # The disk recovers: serving (and storing) goes on.
        failing.sync_fails = False
        d = make_blocks(4, seed=8)
        node.write(d, [0, 1, 2, 3])
        assert node.manager.stats().tier(G3).blocks_offloaded == after.blocks_offloaded + 4
    finally:
        node.close()


@pytest.mark.parametrize("g1_on_host", [True, False], ids=["g3-to-g1", "g3-via-g2"])
def test_a_block_whose_reads_keep_failing_is_dropped_and_computed_again(
    tmp_path: Path, monkeypatch, g1_on_host: bool
) -> None:
    failing = FailingOs()
    monkeypatch.setattr(disk_store, "os", failing)
    config = g3_config(tmp_path / "g3", g3_blocks=64, g2_capacity_blocks=8)
    node = build_node(config, g1_blocks=32, g1_on_host=g1_on_host)
    try:
        a = make_blocks(8, seed=9)
        node.write(a, list(range(8)))
        for i in range(8, 20):  # push A out of G2, so it can only come from G3
            node.write(make_blocks(1, seed=200 + i), [i])
        assert node.manager.lookup(a).tiers == (G3,) * 8
        failing.bad_slots = {2}  # A2's slot: a bad sector

        def onboard_a() -> tuple[list[int], set[int]]:
            """Onboard A into G1 blocks 0-7; returns the blocks not planned (the engine
            computes them) and those left without A's bytes (load errors or not planned)."""
            for layer in node.layers:
                layer[:8] = 0
            plan = node.manager.onboard(a, list(range(8)))
            node.run(plan.jobs)
            return plan.missing_block_ids.tolist(), {i for i in range(8) if not node.holds(i, a.hashes[i])}

        assert onboard_a() == ([], {2})  # a load error: recomputed, but A2 stays indexed
        assert node.manager.lookup(a).num_blocks == 8
        assert onboard_a() == ([], {2})  # failed again: dropped from G3
        assert node.manager.lookup(a).num_blocks == 2 and node.manager.lookup(a, start=2).num_blocks == 0
        assert node.manager.lookup(a, start=3).num_blocks == 5
        g3 = node.manager.stats().tier(G3)
        assert (g3.dropped_after_read_errors, g3.io_errors, g3.checksum_mismatches) == (1, 2, 0)
        assert onboard_a() == ([2], {2})  # the engine computes A2; every other block is intact
        assert node.manager.stats().tier(G3).dropped_after_read_errors == 1
    finally:
        node.close()
