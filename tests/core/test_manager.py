"""Manager scenarios: exact slots, eviction order, offload/onboard bytes, integrity, policy, stats."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from kvbm.hashing import HashedBlocks
from kvbm.ids import Tier
from kvbm.manager.events import BlockRemoved, BlockStored
from kvbm.transfer.jobs import JobResult, TransferJob, failed_result

from .conftest import make_blocks, make_hasher


def test_offload_lookup_evict_onboard_with_exact_slots(make_node) -> None:
    node = make_node(g2_capacity_blocks=4)
    blocks = make_blocks(6, seed=1)
    node.fill_g1(range(16), seed=7)
    originals = {i: node.g1_bytes(i) for i in range(16)}
    mgr = node.manager

    assert mgr.lookup(blocks).num_blocks == 0
    [job] = mgr.blocks_computed(blocks[:3], [7, 3, 9])
    assert (job.src, job.dst) == (Tier.G1, Tier.G2)
    assert job.src_ids.tolist() == [7, 3, 9] and job.dst_ids.tolist() == [0, 1, 2]
    [result] = node.run([job])
    assert result.ok and result.reason is None
    assert [node.g2.rows[s].tobytes() for s in (0, 1, 2)] == [originals[i] for i in (7, 3, 9)]

    match = mgr.lookup(blocks)
    assert match.num_blocks == 3 and match.num_tokens == 12
    assert match.tiers == (Tier.G2,) * 3 and match.slots.tolist() == [0, 1, 2]
    assert mgr.take_events() == [BlockStored(Tier.G2, blocks.hashes[:3])]

    # One slot is free; the two least recent blocks go. Within one commit the later blocks
    # are less recent, so block 2 goes first, then block 1.
    [job] = mgr.blocks_computed(blocks[3:], [1, 2, 4])
    assert job.dst_ids.tolist() == [1, 2, 3]
    assert mgr.take_events() == [BlockRemoved(Tier.G2, (blocks.hashes[2], blocks.hashes[1]))]
    node.run([job])
    assert mgr.lookup(blocks).slots.tolist() == [0]
    assert mgr.lookup(blocks, start=3).slots.tolist() == [1, 2, 3]

    plan = mgr.onboard(blocks[:1], [15])
    assert plan.missing_block_ids.tolist() == []
    [job] = plan.jobs
    assert (job.src, job.dst, job.src_ids.tolist(), job.dst_ids.tolist()) == (Tier.G2, Tier.G1, [0], [15])
    node.run(plan.jobs)
    assert node.g1_bytes(15) == originals[7]


def test_onboard_scatters_every_block_back(make_node) -> None:
    node = make_node(g1_blocks=32, g2_capacity_blocks=16)
    blocks = make_blocks(12, seed=2)
    node.fill_g1(range(32), seed=3)
    sources = [5, 6, 7, 8, 20, 2, 31, 30, 11, 12, 13, 0]
    expected = [node.g1_bytes(i) for i in sources]
    node.run(node.manager.blocks_computed(blocks, sources))
    targets = [16, 17, 18, 19, 1, 3, 29, 24, 25, 26, 27, 4]
    plan = node.manager.onboard(blocks, targets)
    [result] = node.run(plan.jobs)
    assert result.ok
    assert [node.g1_bytes(i) for i in targets] == expected
    stats = node.manager.stats().tier(Tier.G2)
    assert (stats.blocks_onboarded, stats.bytes_onboarded) == (12, 12 * 96)
    assert (stats.blocks_offloaded, stats.bytes_offloaded) == (12, 12 * 96)
    assert stats.pinned_blocks == 0 and stats.transfers == 2


def test_leased_blocks_survive_offload_pressure(make_node) -> None:
    node = make_node(g2_capacity_blocks=4)
    old, new = make_blocks(4, seed=1), make_blocks(4, seed=2)
    node.run(node.manager.blocks_computed(old, [0, 1, 2, 3]))
    plan = node.manager.onboard(old[2:], [8, 9])  # leased until the job completes
    assert node.manager.stats().tier(Tier.G2).pinned_blocks == 2
    [job] = node.manager.blocks_computed(new, [4, 5, 6, 7])
    assert job.hashes == new.hashes[:2]  # only two unleased blocks could be evicted
    assert node.manager.take_events()[-1] == BlockRemoved(Tier.G2, (old.hashes[1], old.hashes[0]))
    node.run([job, *plan.jobs])
    assert node.manager.lookup(old, start=2).num_blocks == 2
    assert node.manager.stats().tier(Tier.G2).pinned_blocks == 0


def test_a_hit_with_different_tokens_is_a_counted_miss(make_node) -> None:
    node = make_node()
    blocks = make_blocks(3, seed=4)
    node.run(node.manager.blocks_computed(blocks, [0, 1, 2]))
    forged_tokens = blocks.tokens.copy()
    forged_tokens[1, 0] += 1
    forged = HashedBlocks(blocks.hashes, forged_tokens)
    match = node.manager.lookup(forged)
    assert match.num_blocks == 1
    stats = node.manager.stats().tier(Tier.G2)
    assert (stats.hits, stats.misses, stats.token_mismatches) == (1, 2, 1)
    plan = node.manager.onboard(forged, [5, 6, 7])
    assert plan.missing_block_ids.tolist() == [6]
    assert plan.jobs[0].dst_ids.tolist() == [5, 7]
    node.run(plan.jobs)
    all_forged = HashedBlocks(blocks.hashes, blocks.tokens + 1)
    plan = node.manager.onboard(all_forged, [5, 6, 7])
    assert plan.jobs == [] and plan.missing_block_ids.tolist() == [5, 6, 7]
    assert node.manager.stats().tier(Tier.G2).pinned_blocks == 0


def test_corrupt_bytes_fail_closed(make_node) -> None:
    node = make_node(verify_g2_reads=True)
    blocks = make_blocks(3, seed=5)
    node.fill_g1(range(16), seed=1)
    node.run(node.manager.blocks_computed(blocks, [0, 1, 2]))
    node.manager.take_events()
    node.g2.rows[1, 10] ^= 0xFF  # slot 1 holds block 1
    before = node.g1_bytes(9)
    plan = node.manager.onboard(blocks, [8, 9, 10])
    assert plan.jobs[0].expected_checksums is not None
    [result] = node.run(plan.jobs)
    assert not result.ok and result.failed.tolist() == [1] and result.corrupt.tolist() == [1]
    assert "checksum mismatch in 1 of 3" in result.reason
    assert node.g1_bytes(9) == before  # the corrupt block was not handed to the engine
    assert node.g1_bytes(8) == node.g1_bytes(0) and node.g1_bytes(10) == node.g1_bytes(2)
    assert node.manager.take_events() == [BlockRemoved(Tier.G2, (blocks.hashes[1],))]
    assert node.manager.lookup(blocks).num_blocks == 1
    stats = node.manager.stats().tier(Tier.G2)
    assert (stats.checksum_mismatches, stats.transfer_failures, stats.blocks_onboarded) == (1, 1, 2)


def test_without_verification_loads_carry_no_checksums(make_node) -> None:
    node = make_node(verify_g2_reads=False)
    blocks = make_blocks(2, seed=5)
    node.run(node.manager.blocks_computed(blocks, [0, 1]))
    assert node.manager.onboard(blocks, [2, 3]).jobs[0].expected_checksums is None


def test_a_failed_store_rolls_back(make_node) -> None:
    node = make_node()
    blocks = make_blocks(2, seed=6)
    [job] = node.manager.blocks_computed(blocks, [0, 1])
    node.manager.complete(failed_result(job, "worker lost"))
    stats = node.manager.stats().tier(Tier.G2)
    assert (stats.used_blocks, stats.transfer_failures, stats.blocks_offloaded) == (0, 1, 0)
    assert node.manager.lookup(blocks).num_blocks == 0
    assert node.manager.take_events() == []
    assert node.manager.blocks_computed(blocks, [0, 1])[0].dst_ids.tolist() == [1, 0]


def test_a_handler_error_fails_the_job_with_its_reason(make_node) -> None:
    node = make_node(g1_blocks=4)
    blocks = make_blocks(2, seed=6)
    [result] = node.run(node.manager.blocks_computed(blocks, [1, 99]))
    assert not result.ok and result.failed.tolist() == [0, 1]
    assert "ValueError" in result.reason and "out of range" in result.reason
    assert node.manager.stats().tier(Tier.G2).used_blocks == 0


def test_write_through_offloads_when_computed(make_node) -> None:
    node = make_node(offload_policy="write_through")
    blocks = make_blocks(2, seed=8)
    node.run(node.manager.blocks_computed(blocks, [0, 1]))
    assert node.manager.blocks_evicting(blocks, [0, 1]) == []  # already stored


def test_on_eviction_offloads_only_when_evicting(make_node) -> None:
    node = make_node(offload_policy="on_eviction")
    blocks = make_blocks(2, seed=8)
    assert node.manager.blocks_computed(blocks, [0, 1]) == []
    [job] = node.manager.blocks_evicting(blocks, [0, 1])
    assert job.src_ids.tolist() == [0, 1]


def test_min_hits_holds_back_blocks_seen_too_rarely(make_node) -> None:
    node = make_node(offload_min_hits=2)
    shared, other = make_blocks(3, seed=9), make_blocks(3, seed=10)
    node.manager.lookup(shared)
    node.manager.lookup(other)
    assert node.manager.blocks_computed(shared, [0, 1, 2]) == []
    node.manager.lookup(shared[:2])
    [job] = node.manager.blocks_computed(shared, [0, 1, 2])
    assert job.hashes == shared.hashes[:2] and job.src_ids.tolist() == [0, 1]


def test_a_lookup_asked_again_counts_no_sighting_hit_or_miss(make_node) -> None:
    node = make_node(offload_min_hits=2)
    blocks = make_blocks(3, seed=12)
    node.manager.lookup(blocks)
    node.manager.lookup(blocks, count=False)  # the same waiting prompt, asked again
    assert node.manager.blocks_computed(blocks, [0, 1, 2]) == []  # one sighting: below min_hits
    g2 = node.manager.stats().tier(Tier.G2)
    assert (g2.hits, g2.misses) == (0, 3)


def test_stats_snapshot_json_and_prometheus(make_node) -> None:
    ticks = itertools.count()
    node = make_node(clock=lambda: next(ticks) * 0.001, g2_capacity_blocks=4)
    blocks = make_blocks(6, seed=11)
    node.run(node.manager.blocks_computed(blocks[:4], [0, 1, 2, 3]))
    node.manager.lookup(blocks)  # 4 hits, 2 misses
    node.manager.lookup(blocks, start=5)  # 1 miss
    node.run(node.manager.onboard(blocks[:2], [8, 9]).jobs)
    node.run(node.manager.blocks_computed(blocks[4:], [4, 5]))  # evicts 2
    stats = node.manager.stats()
    g2 = stats.tier(Tier.G2)
    assert (g2.capacity_blocks, g2.capacity_bytes, g2.used_blocks, g2.pinned_blocks) == (4, 384, 4, 0)
    assert (g2.hits, g2.misses, g2.hit_rate) == (4, 3, 4 / 7)
    assert (g2.evictions, g2.transfers, g2.transfer_failures) == (2, 3, 0)
    assert (g2.blocks_offloaded, g2.blocks_onboarded, g2.bytes_onboarded) == (6, 2, 192)
    assert g2.latency_count == 3 and g2.latency_p50_s == pytest.approx(0.001)
    assert stats.pending_jobs == 0 and stats.events_dropped == 0

    as_json = json.loads(stats.to_json())
    assert as_json["tiers"]["g2"]["hits"] == 4 and as_json["tiers"]["g2"]["hit_rate"] == pytest.approx(4 / 7)
    assert as_json["tiers"]["g2"]["tier"] == "g2"

    text = stats.to_prometheus()
    assert 'kvbm_hits_total{tier="g2"} 4\n' in text
    assert 'kvbm_capacity_bytes{tier="g2"} 384\n' in text
    assert 'kvbm_transfer_latency_seconds{tier="g2",quantile="0.5"} 0.001' in text
    assert 'kvbm_transfer_latency_seconds_count{tier="g2"} 3\n' in text
    assert "# TYPE kvbm_evictions_total counter" in text
    for line in text.splitlines():
        assert line.startswith("#") or line.startswith("kvbm_")


def test_stats_before_any_traffic() -> None:
    from kvbm.config import KvbmConfig
    from kvbm.manager.block_manager import BlockManager

    stats = BlockManager(KvbmConfig(g2_capacity_bytes=1000), block_size=4, block_bytes=100).stats()
    g2 = stats.tier(Tier.G2)
    assert (g2.capacity_blocks, g2.hit_rate, g2.latency_p50_s) == (10, 0.0, None)
    assert 'kvbm_transfer_latency_seconds{tier="g2",quantile="0.99"} NaN' in stats.to_prometheus()
    assert json.loads(stats.to_json())["tiers"]["g2"]["latency_p99_s"] is None
    with pytest.raises(KeyError):
        stats.tier(Tier.G3)


def test_events_are_bounded(make_node) -> None:
    node = make_node(g2_capacity_blocks=2, event_buffer=2)
    for seed in range(3):
        node.run(node.manager.blocks_computed(make_blocks(2, seed=seed), [0, 1]))
    events = node.manager.take_events()
    assert len(events) == 2 and node.manager.stats().events_dropped == 3
    assert node.manager.take_events() == []


def test_threaded_engine_round_trip(make_node) -> None:
    node = make_node(g1_blocks=64, g2_capacity_blocks=64, transfer_thread=True)
    blocks = make_blocks(40, seed=12)
    node.fill_g1(range(64), seed=2)
    src = np.random.default_rng(0).permutation(64)[:40].tolist()
    expected = [node.g1_bytes(i) for i in src]
    node.run(node.manager.blocks_computed(blocks, src))
    node.run(node.manager.onboard(blocks, list(range(24, 64))).jobs)
    assert [node.g1_bytes(i) for i in range(24, 64)] == expected


def test_bad_inputs(make_node) -> None:
    node = make_node()
    mgr = node.manager
    blocks = make_blocks(2)
    with pytest.raises(ValueError, match="tokens"):
        mgr.lookup(make_hasher(block_size=8).hash_prompt(np.arange(16)))
    with pytest.raises(ValueError, match="start"):
        mgr.lookup(blocks, start=3)
    with pytest.raises(ValueError, match="2 integer engine block ids"):
        mgr.blocks_computed(blocks, [0])
    with pytest.raises(ValueError, match="non-negative"):
        mgr.onboard(blocks, [0, -1])
    with pytest.raises(ValueError, match="integer"):
        mgr.blocks_evicting(blocks, [0.0, 1.0])
    with pytest.raises(TypeError, match="HashedBlocks"):
        mgr.lookup(blocks.hashes)  # type: ignore[arg-type]
    [job] = mgr.blocks_computed(blocks, [0, 1])
    bogus = JobResult(job.job_id, np.array([2]), np.array([2]), None, "bad", 0.0)
    with pytest.raises(ValueError, match="out of range"):
        mgr.complete(bogus)
    with pytest.raises(ValueError, match="corrupt positions"):
        mgr.complete(JobResult(job.job_id, np.array([0]), np.array([1]), None, "bad", 0.0))
    assert mgr.pending_jobs == 1  # a rejected result changes nothing
    node.run([job])
    assert mgr.lookup(blocks).num_blocks == 2
    with pytest.raises(KeyError):
        mgr.complete(failed_result(job, "twice"))


def read_error(job: TransferJob, positions: list[int]) -> JobResult:
    """The result of an onboard job whose blocks at ``positions`` failed to read (I/O, not corrupt)."""
    return JobResult(job.job_id, np.asarray(positions, dtype=np.int64), np.zeros(0, dtype=np.int64), None, "EIO", 0.0)


def fail_to_onboard(node, blocks: HashedBlocks, positions: list[int]) -> None:
    [job] = node.manager.onboard(blocks, list(range(8, 8 + len(blocks)))).jobs
    node.manager.complete(read_error(job, positions))


def test_a_block_failing_two_reads_is_dropped_and_counted(make_node) -> None:
    node = make_node()
    blocks = make_blocks(3, seed=13)
    node.run(node.manager.blocks_computed(blocks, [0, 1, 2]))
    node.manager.take_events()
    fail_to_onboard(node, blocks, [1])
    assert node.manager.lookup(blocks).num_blocks == 3 and node.manager.take_events() == []  # once: kept
    fail_to_onboard(node, blocks, [1])
    assert node.manager.take_events() == [BlockRemoved(Tier.G2, (blocks.hashes[1],))]
    assert node.manager.lookup(blocks).num_blocks == 1  # block 1 is computed again
    assert node.manager.lookup(blocks, start=2).slots.tolist() == [2]
    plan = node.manager.onboard(blocks, [8, 9, 10])
    assert plan.missing_block_ids.tolist() == [9] and all(r.ok for r in node.run(plan.jobs))
    stats = node.manager.stats()
    g2 = stats.tier(Tier.G2)
    assert (g2.dropped_after_read_errors, g2.io_errors, g2.checksum_mismatches) == (1, 2, 0)
    assert (g2.used_blocks, g2.pinned_blocks) == (2, 0)
    assert stats.to_dict()["tiers"]["g2"]["dropped_after_read_errors"] == 1
    assert 'kvbm_dropped_after_read_errors_total{tier="g2"} 1\n' in stats.to_prometheus()


def test_a_good_read_between_two_failures_keeps_the_block(make_node) -> None:
    node = make_node()
    blocks = make_blocks(3, seed=14)
    node.run(node.manager.blocks_computed(blocks, [0, 1, 2]))
    fail_to_onboard(node, blocks, [0, 2])
    assert all(r.ok for r in node.run(node.manager.onboard(blocks[:1], [8]).jobs))  # block 0 reads fine
    fail_to_onboard(node, blocks, [0, 2])  # block 0: first failure again; block 2: second
    assert node.manager.lookup(blocks).num_blocks == 2
    assert node.manager.stats().tier(Tier.G2).dropped_after_read_errors == 1
    fail_to_onboard(node, blocks[:2], [0])
    assert node.manager.lookup(blocks).num_blocks == 0
    assert node.manager.stats().tier(Tier.G2).dropped_after_read_errors == 2
