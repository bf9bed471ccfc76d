"""G3 across restarts: a real process restart, recency, kill -9 in the middle of a burst of
writes, and a directory written under another fingerprint."""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from pathlib import Path

import pytest

from kvbm.ids import BlockHash, Tier
from kvbm.manager.events import BlockRemoved, BlockStored
from kvbm.tiers.disk.index import INDEX_SYNC_S, IndexSyncer
from kvbm.tiers.disk.layout import G3LayoutError

from .conftest import (
    build_node,
    g3_config,
    make_blocks,
    make_fingerprint,
    run_diskproc,
    start_diskproc,
    written_and_closed,
)

G2, G3 = Tier.G2, Tier.G3


def test_warm_restart_across_a_real_process_restart(tmp_path: Path, make_disk_node) -> None:
    directory = tmp_path / "g3"
    child = run_diskproc("write", str(directory), "--seed", "1", "--blocks", "16", "--batch", "4")
    assert child.returncode == 0, child.stderr
    assert json.loads(child.stdout)["tiers"]["g3"]["blocks_offloaded"] == 16

    node = make_disk_node(g3_config(directory, g3_blocks=16, g2_capacity_blocks=4), g1_blocks=32)
    blocks = make_blocks(16, seed=1)
    [restored] = node.manager.take_events()
    assert restored.tier is G3 and sorted(restored.hashes) == sorted(blocks.hashes)
    match = node.manager.lookup(blocks)
    assert match.tiers == (G3,) * 16
    plan = node.manager.onboard(blocks, list(range(16)))
    assert all(r.ok for r in node.run(plan.jobs))
    assert all(node.holds(i, h) for i, h in enumerate(blocks.hashes))
    # The LRU order came back too: the child's first batch is the oldest, its last block first.
    node.manager.touch(blocks[4:])  # the whole prompt was just used; A0..A3 stay oldest
    node.manager.take_events()
    node.write(make_blocks(4, seed=99), [16, 17, 18, 19])
    evicted = [e for e in node.manager.take_events() if isinstance(e, BlockRemoved) and e.tier is G3]
    assert evicted == [BlockRemoved(G3, tuple(reversed(blocks.hashes[:4])))]


def test_recency_survives_a_reopen(tmp_path: Path) -> None:
    config = g3_config(tmp_path / "g3", g3_blocks=8)
    a, b, c = make_blocks(4, seed=2), make_blocks(4, seed=3), make_blocks(4, seed=4)
    node = build_node(config)
    node.write(a, [0, 1, 2, 3])
    node.write(b, [4, 5, 6, 7])
    node.manager.touch(a)  # A becomes the most recent; persisted at close
    node.close()
    node = build_node(config)
    try:
        node.manager.take_events()
        node.write(c, [8, 9, 10, 11])
        evicted = [e for e in node.manager.take_events() if isinstance(e, BlockRemoved) and e.tier is G3]
        assert evicted == [BlockRemoved(G3, tuple(reversed(b.hashes)))]
        assert node.manager.lookup(a).tiers == (G3,) * 4
    finally:
        node.close()


def _read_hashes(path: Path) -> list[BlockHash]:
    if not path.exists():
        return []
    return [BlockHash(bytes.fromhex(line)) for line in path.read_text().split("\n") if len(line) == 32]


def test_kill_9_during_a_burst_of_writes(tmp_path: Path) -> None:
    directory = tmp_path / "g3"
    blocks_per_run, batch = 1200, 16
    config = g3_config(directory, g3_blocks=blocks_per_run, g2_capacity_blocks=batch)
    rng = random.Random(1234)
    killed = 0
    for run in range(3):
        progress = tmp_path / f"progress-{run}"
        child = start_diskproc(
            "write",
            str(directory),
            "--seed",
            str(10 + run),
            "--blocks",
            str(blocks_per_run),
            "--batch",
            str(batch),
            "--progress",
            str(progress),
        )
        while len(_read_hashes(progress)) < 2 * batch and child.poll() is None:
            time.sleep(0.005)
        time.sleep(rng.uniform(0, 0.08))
        child.kill()  # SIGKILL: no close, no flush, wherever it was
        _, stderr = child.communicate(timeout=60)
        killed += child.returncode == -9
        committed = _read_hashes(progress)
        assert committed, stderr

        node = build_node(config, g1_blocks=blocks_per_run)
        try:
            blocks = make_blocks(blocks_per_run, seed=10 + run)
            plan = node.manager.onboard(blocks, list(range(blocks_per_run)))
            results = node.run(plan.jobs)
            missing = set(plan.missing_block_ids.tolist())
            corrupt = {int(i) for r in results for i in r.corrupt}
            served = [i for i in range(blocks_per_run) if i not in missing]
            assert all(node.holds(i, blocks.hashes[i]) for i in served if i not in corrupt)
            assert not {i for i, h in enumerate(blocks.hashes) if h in set(committed)} & missing
            stats = node.manager.stats().tier(G3)
            assert stats.checksum_mismatches == len(corrupt)  # whatever failed was counted
            assert stats.io_errors == 0
        finally:
            node.close()
    assert killed >= 2  # the child was killed mid-burst (not finished) in most runs


def test_another_fingerprint_is_refused_or_wiped_across_processes(tmp_path: Path, caplog) -> None:
    directory = tmp_path / "g3"
    child = run_diskproc("write", str(directory), "--seed", "5", "--blocks", "8", "--batch", "4")
    assert child.returncode == 0, child.stderr
    other = make_fingerprint(model="another-model")
    config = g3_config(directory, g3_blocks=8, g2_capacity_blocks=4)
    before = (directory / "kvbm-g3.json").read_text()
    with caplog.at_level(logging.ERROR), pytest.raises(G3LayoutError, match="fingerprint"):
        build_node(config, fingerprint=other)
    assert (directory / "kvbm-g3.json").read_text() == before
    assert any("never served from" in r.message for r in caplog.records)

    caplog.clear()
    wipe = g3_config(directory, g3_blocks=8, g2_capacity_blocks=4, g3_on_mismatch="wipe")
    with caplog.at_level(logging.WARNING):
        node = build_node(wipe, fingerprint=other)
    try:
        assert any("wiped" in r.message and "fingerprint" in r.message for r in caplog.records)
        assert [e for e in node.manager.take_events() if isinstance(e, BlockStored)] == []
        assert node.manager.stats().tier(G3).used_blocks == 0
    finally:
        node.close()
    with pytest.raises(G3LayoutError):  # now the directory is the other layout's
        build_node(config)
    node = build_node(wipe)  # back under the original fingerprint: none of the child's blocks remain
    try:
        assert node.manager.lookup(make_blocks(8, seed=5)).num_blocks == 0
    finally:
        node.close()


def test_an_index_lmdb_cannot_read_is_refused_or_wiped(tmp_path: Path, caplog) -> None:
    """What a system crash between two index syncs can leave (see kvbm.tiers.disk.index)."""
    directory = tmp_path / "g3"
    config, a = written_and_closed(directory, seed=6)
    (directory / "index" / "data.mdb").write_bytes(b"\xa5" * 8192)  # torn pages, meta included
    with caplog.at_level(logging.ERROR), pytest.raises(G3LayoutError, match="index cannot be read"):
        build_node(config)
    assert any("never served from" in r.message for r in caplog.records)
    wipe = g3_config(directory, g3_blocks=8, g3_on_mismatch="wipe")
    node = build_node(wipe)
    try:
        assert node.manager.stats().tier(G3).used_blocks == 0
        assert node.manager.lookup(a).num_blocks == 0
        b = make_blocks(4, seed=7)
        node.write(b, [4, 5, 6, 7])  # the tier works again, in the slots A had
    finally:
        node.close()
    node = build_node(config)
    try:
        assert node.manager.lookup(b).tiers == (G3,) * 4
    finally:
        node.close()


def test_index_commits_are_flushed_by_the_syncer_thread_not_the_caller() -> None:
    class Env:
        def __init__(self) -> None:
            self.threads: list[str] = []
            self.synced = threading.Event()

        def sync(self, force: bool) -> None:
            assert force
            self.threads.append(threading.current_thread().name)
            self.synced.set()

    env = Env()
    syncer = IndexSyncer(env, "test-index")  # type: ignore[arg-type]
    try:
        assert not env.synced.wait(2 * INDEX_SYNC_S)  # nothing committed: no sync
        syncer.committed()
        syncer.committed()
        assert env.synced.wait(60)
        assert env.threads == ["kvbm-g3-index-sync"]  # one sync for both commits
    finally:
        syncer.close()
    assert env.threads[-1] == threading.current_thread().name  # close flushes what is left
