"""The manager with G3: demotion under each policy, leases, onboarding straight or through G2,
verification, eviction order, stats and events. Exact slots and orders throughout."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from kvbm.ids import Tier
from kvbm.manager.events import BlockRemoved, BlockStored

from .conftest import BLOCK_BYTES, STRIDE, g3_config, make_blocks, slot_file

G1, G2, G3 = Tier.G1, Tier.G2, Tier.G3


def test_write_through_demotes_under_a_lease_and_serves_from_g3(tmp_path: Path, make_disk_node) -> None:
    node = make_disk_node(g3_config(tmp_path / "g3", g3_blocks=16))
    mgr = node.manager
    blocks = make_blocks(8, seed=1)
    node.fill_g1(range(8), blocks.hashes)

    [offload] = mgr.blocks_computed(blocks[:4], [0, 1, 2, 3])
    assert mgr.take_jobs() == []  # nothing is in G2 yet
    node.run([offload])
    [demote] = mgr.take_jobs()
    assert (demote.src, demote.dst, demote.hashes) == (G2, G3, blocks.hashes[:4])
    assert demote.src_ids.tolist() == [0, 1, 2, 3] and demote.dst_ids.tolist() == [0, 1, 2, 3]
    assert demote.expected_checksums is not None  # G2 reads are verified by default
    # Until the demotion completes its G2 slots stay leased: a new store finds no room.
    assert mgr.stats().tier(G2).pinned_blocks == 4
    assert mgr.blocks_computed(blocks[4:6], [4, 5]) == []
    assert mgr.lookup(blocks).tiers == (G2,) * 4  # G3's copies are reserved, not visible yet
    node.run([demote])
    assert mgr.take_events() == [BlockStored(G2, blocks.hashes[:4]), BlockStored(G3, blocks.hashes[:4])]
    assert mgr.stats().tier(G2).pinned_blocks == 0

    [offload] = mgr.blocks_computed(blocks[4:], [4, 5, 6, 7])
    assert offload.dst_ids.tolist() == [0, 1, 2, 3]  # clean blocks are evicted freely
    node.run([offload])
    node.drain()
    match = mgr.lookup(blocks)
    assert match.tiers == (G3,) * 4 + (G2,) * 4 and match.slots.tolist() == [0, 1, 2, 3, 0, 1, 2, 3]

    plan = mgr.onboard(blocks, list(range(16, 24)))
    assert [(j.src, j.dst) for j in plan.jobs] == [(G2, G1), (G3, G1)]
    assert plan.jobs[1].expected_checksums is not None  # G3 reads are always verified
    assert all(r.ok for r in node.run(plan.jobs))
    assert all(node.holds(16 + i, h) for i, h in enumerate(blocks.hashes))
    g3 = mgr.stats().tier(G3)
    assert (g3.blocks_offloaded, g3.bytes_offloaded, g3.blocks_onboarded) == (8, 8 * BLOCK_BYTES, 4)
    assert (g3.used_blocks, g3.pinned_blocks, g3.transfers, g3.transfer_failures) == (8, 0, 3, 0)


def test_write_through_demotions_come_only_from_take_jobs_one_batch_at_a_time(tmp_path: Path, make_disk_node) -> None:
    node = make_disk_node(g3_config(tmp_path / "g3", g2_capacity_blocks=8))
    mgr = node.manager
    blocks = make_blocks(6, seed=2)
    node.fill_g1(range(6), blocks.hashes)
    node.run(mgr.blocks_computed(blocks[:2], [0, 1]))
    [offload] = mgr.blocks_computed(blocks[2:4], [2, 3])  # nothing but its own offload
    assert (offload.src, offload.dst, offload.hashes) == (G1, G2, blocks.hashes[2:4])
    node.run([offload])
    [first] = mgr.take_jobs()  # both commits in one job
    assert (first.src, first.dst, first.hashes) == (G2, G3, blocks.hashes[:4])
    node.run(mgr.blocks_computed(blocks[4:], [4, 5]))
    assert mgr.take_jobs() == []  # the next batch waits for the one in flight
    node.run([first])
    [second] = mgr.take_jobs()
    assert (second.src, second.dst, second.hashes) == (G2, G3, blocks.hashes[4:])
    node.run([second])
    assert mgr.take_jobs() == []
    assert mgr.stats().tier(G3).blocks_offloaded == 6


def test_on_eviction_demotes_ahead_and_never_evicts_an_undemoted_block(tmp_path: Path, make_disk_node) -> None:
    node = make_disk_node(g3_config(tmp_path / "g3", offload_policy="on_eviction"))
    mgr = node.manager
    a, b, c = make_blocks(4, seed=3), make_blocks(2, seed=4), make_blocks(2, seed=5)
    node.fill_g1(range(4), a.hashes)
    node.fill_g1([4, 5], b.hashes)

    [offload] = mgr.blocks_evicting(a[:2], [0, 1])
    node.run([offload])
    assert mgr.take_jobs() == []  # G2 has room for another store like this one
    jobs = mgr.blocks_evicting(a[2:], [2, 3])  # after it G2 is full: demote the next victims now
    demotions = mgr.take_jobs()
    assert [(j.src, j.dst, j.hashes) for j in demotions + jobs] == [
        (G2, G3, (a.hashes[1], a.hashes[0])),
        (G1, G2, a.hashes[2:]),
    ]
    node.run(demotions + jobs)
    [offload] = mgr.blocks_evicting(b, [4, 5])  # evicts the clean A0, A1; demotes A3, A2 ahead
    [demote] = mgr.take_jobs()
    assert (offload.hashes, demote.hashes) == (b.hashes, (a.hashes[3], a.hashes[2]))
    node.run([offload])  # the demotion is still running: A2 and A3 stay leased
    node.fill_g1([6, 7], c.hashes)
    assert mgr.blocks_evicting(c, [6, 7]) == []  # only B1, B0 are candidates, both dirty: no room yet
    later = mgr.take_jobs()
    assert [(j.src, j.dst, j.hashes) for j in later] == [(G2, G3, (b.hashes[1], b.hashes[0]))]
    node.run([demote] + later)
    node.drain()
    events = mgr.take_events()
    stored = {h for e in events if isinstance(e, BlockStored) and e.tier is G3 for h in e.hashes}
    removed = [h for e in events if isinstance(e, BlockRemoved) and e.tier is G2 for h in e.hashes]
    assert removed == [a.hashes[1], a.hashes[0]]
    assert stored == {*a.hashes, *b.hashes}
    assert node.manager.stats().tier(G3).blocks_offloaded == 6


def test_a_store_never_evicts_dirty_blocks_under_on_eviction(tmp_path: Path, make_disk_node) -> None:
    node = make_disk_node(g3_config(tmp_path / "g3", offload_policy="on_eviction"))
    mgr = node.manager
    a, b = make_blocks(4, seed=6), make_blocks(2, seed=7)
    node.fill_g1(range(4), a.hashes)
    node.fill_g1([4, 5], b.hashes)
    node.run(mgr.blocks_evicting(a[:2], [0, 1]))
    node.run(mgr.blocks_evicting(a[2:], [2, 3]))  # A2, A3 stored; A1, A0's demotion is not run
    assert [j.hashes for j in mgr.take_jobs()] == [(a.hashes[1], a.hashes[0])]
    assert mgr.blocks_evicting(b, [4, 5]) == []
    # A1, A0 are leased; A3, A2 are the only victims left and not in G3: demoted, not evicted.
    assert [(j.src, j.dst, j.hashes) for j in mgr.take_jobs()] == [(G2, G3, (a.hashes[3], a.hashes[2]))]
    assert mgr.lookup(a).num_blocks == 4
    events = mgr.take_events()
    assert not [e for e in events if isinstance(e, BlockRemoved)]


def test_corrupt_g3_bytes_are_a_counted_miss_and_never_reach_g1(tmp_path: Path, make_disk_node) -> None:
    directory = tmp_path / "g3"
    node = make_disk_node(g3_config(directory))
    a, b = make_blocks(4, seed=8), make_blocks(4, seed=9)
    node.write(a, [0, 1, 2, 3])
    node.write(b, [4, 5, 6, 7])  # pushes A out of G2: A lives in G3 only
    match = node.manager.lookup(a)
    assert match.tiers == (G3,) * 4
    with open(slot_file(directory), "r+b") as f:
        f.seek(int(match.slots[1]) * STRIDE + 1000)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0x40]))
    node.manager.take_events()
    plan = node.manager.onboard(a, [10, 11, 12, 13])
    [result] = node.run(plan.jobs)
    assert result.failed.tolist() == [1] and result.corrupt.tolist() == [1]
    assert "checksum mismatch in 1 of 4" in result.reason
    assert not node.layers[0][11].any() and not node.layers[1][11].any()  # bad bytes not passed on
    assert node.holds(10, a.hashes[0]) and node.holds(12, a.hashes[2]) and node.holds(13, a.hashes[3])
    assert node.manager.take_events() == [BlockRemoved(G3, (a.hashes[1],))]
    assert node.manager.lookup(a).num_blocks == 1
    g3 = node.manager.stats().tier(G3)
    assert (g3.checksum_mismatches, g3.transfer_failures, g3.blocks_onboarded, g3.io_errors) == (1, 1, 3, 0)


def test_a_truncated_slot_file_is_a_counted_miss(tmp_path: Path, make_disk_node) -> None:
    directory = tmp_path / "g3"
    node = make_disk_node(g3_config(directory))
    a, b = make_blocks(4, seed=10), make_blocks(4, seed=11)
    node.write(a, [0, 1, 2, 3])
    node.write(b, [4, 5, 6, 7])
    assert node.manager.lookup(a).slots.tolist() == [0, 1, 2, 3]
    with open(slot_file(directory), "r+b") as f:
        f.truncate(2 * STRIDE + 5)
    [result] = node.run(node.manager.onboard(a, [10, 11, 12, 13]).jobs)
    assert result.corrupt.tolist() == [2, 3]
    assert not node.layers[0][12].any() and node.holds(11, a.hashes[1])
    assert node.manager.stats().tier(G3).checksum_mismatches == 2


@pytest.mark.parametrize("flip", [False, True])
def test_onboarding_through_g2_when_g1_is_not_host_memory(tmp_path: Path, make_disk_node, flip: bool) -> None:
    directory = tmp_path / "g3"
    node = make_disk_node(g3_config(directory), g1_on_host=False)
    assert (G3, G1) not in node.disk
    a, b = make_blocks(4, seed=12), make_blocks(4, seed=13)
    node.write(a, [0, 1, 2, 3])
    node.write(b, [4, 5, 6, 7])
    if flip:
        with open(slot_file(directory), "r+b") as f:
            f.seek(2 * STRIDE)
            f.write(b"\xff\xfe")
    plan = node.manager.onboard(a, [10, 11, 12, 13])
    assert [(j.src, j.dst) for j in plan.jobs] == [(G3, G2), (G2, G1)]
    promote, load = plan.jobs
    assert promote.dst_ids.tolist() == load.src_ids.tolist()
    assert np.array_equal(promote.expected_checksums, load.expected_checksums)
    results = node.run(plan.jobs)
    bad = [2] if flip else []
    assert [r.corrupt.tolist() for r in results] == [bad, bad]
    assert [node.holds(10 + i, h) for i, h in enumerate(a.hashes)] == [i not in bad for i in range(4)]
    stats = node.manager.stats()
    assert (stats.tier(G3).checksum_mismatches, stats.tier(G2).checksum_mismatches) == (len(bad), 0)
    assert stats.tier(G2).pinned_blocks == 0 and stats.tier(G3).pinned_blocks == 0
    match = node.manager.lookup(a)
    assert match.tiers == ((G2, G2) if flip else (G2,) * 4)  # promoted blocks now live in G2


def test_g3_evicts_its_least_recent_unleased_blocks(tmp_path: Path, make_disk_node) -> None:
    node = make_disk_node(g3_config(tmp_path / "g3", g3_blocks=8))
    a, b, c = make_blocks(4, seed=14), make_blocks(4, seed=15), make_blocks(4, seed=16)
    node.write(a, [0, 1, 2, 3])
    node.write(b, [4, 5, 6, 7])
    plan = node.manager.onboard(a[2:], [20, 21])  # A2 and A3: G2 no longer has them; leased in G3
    assert [(j.src, j.dst) for j in plan.jobs] == [(G3, G1)]
    node.manager.take_events()
    node.write(c, [8, 9, 10, 11])
    removed = [e for e in node.manager.take_events() if isinstance(e, BlockRemoved) and e.tier is G3]
    # LRU: A's blocks are older than B's, later blocks of one commit older than earlier ones;
    # A2 and A3 were touched by the onboarding and are leased anyway.
    assert removed == [BlockRemoved(G3, (a.hashes[1], a.hashes[0], b.hashes[3], b.hashes[2]))]
    node.run(plan.jobs)
    assert node.holds(20, a.hashes[2]) and node.holds(21, a.hashes[3])
    assert node.manager.stats().tier(G3).evictions == 4


def test_g3_stats_json_and_prometheus(tmp_path: Path, make_disk_node) -> None:
    node = make_disk_node(g3_config(tmp_path / "g3", g3_blocks=16))
    a, b = make_blocks(4, seed=17), make_blocks(4, seed=18)
    node.write(a, [0, 1, 2, 3])
    node.write(b, [4, 5, 6, 7])
    node.manager.lookup(a)  # 4 G3 hits: G2 holds none of A
    stats = node.manager.stats()
    g3 = stats.tier(G3)
    assert (g3.capacity_blocks, g3.capacity_bytes, g3.used_blocks) == (16, 16 * BLOCK_BYTES, 8)
    assert (g3.hits, g3.misses, g3.hit_rate) == (4, 0, 1.0)
    assert stats.tier(G2).misses == 4
    assert json.loads(stats.to_json())["tiers"]["g3"]["blocks_offloaded"] == 8
    text = stats.to_prometheus()
    assert 'kvbm_hits_total{tier="g3"} 4\n' in text
    assert f'kvbm_capacity_bytes{{tier="g3"}} {16 * BLOCK_BYTES}\n' in text
    assert 'kvbm_io_errors_total{tier="g3"} 0\n' in text and 'kvbm_dropped_on_open_total{tier="g3"} 0\n' in text
    assert 'kvbm_transfer_latency_seconds_count{tier="g3"} 2\n' in text


def test_a_threaded_engine_round_trip(tmp_path: Path, make_disk_node) -> None:
    node = make_disk_node(g3_config(tmp_path / "g3", g3_blocks=64, g2_capacity_blocks=8), g1_blocks=64, threaded=True)
    blocks = make_blocks(40, seed=19)
    for a in range(0, 40, 8):
        node.write(blocks[a : a + 8], list(range(a, a + 8)))
    assert node.manager.lookup(blocks).tiers == (G3,) * 32 + (G2,) * 8
    node.run(node.manager.onboard(blocks, list(range(24, 64))).jobs)
    assert all(node.holds(24 + i, h) for i, h in enumerate(blocks.hashes))


def test_a_load_into_bad_engine_ids_fails_whole_and_leaves_the_tier_intact(tmp_path: Path, make_disk_node) -> None:
    node = make_disk_node(g3_config(tmp_path / "g3"), g1_blocks=16)
    a, b = make_blocks(4, seed=20), make_blocks(4, seed=21)
    node.write(a, [0, 1, 2, 3])
    node.write(b, [4, 5, 6, 7])
    [result] = node.run(node.manager.onboard(a, [8, 9, 10, 99]).jobs)
    assert result.failed.tolist() == [0, 1, 2, 3] and "out of range" in result.reason
    assert node.manager.stats().tier(G3).pinned_blocks == 0
    [result] = node.run(node.manager.onboard(a, [8, 9, 10, 11]).jobs)
    assert result.ok and all(node.holds(8 + i, h) for i, h in enumerate(a.hashes))
