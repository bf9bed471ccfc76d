"""Local tiers (registration geometry, checksums), the lease table, the block source and the
reader's heartbeats, with injected clocks (no NIXL)."""

from __future__ import annotations

import numpy as np
import pytest

from helpers import FakeClock
from kvbm.ids import BlockHash, Tier
from kvbm.integrity import checksum_rows
from kvbm.layout import BlockLayout, EngineKV
from kvbm.remote import LeaseEnd, PinnedBlocks, engine_tier, host_tier, notices
from kvbm.remote.keepalive import LeaseKeeper
from kvbm.remote.leases import LeaseTable
from kvbm.remote.metadata import AgentName, LeaseId
from kvbm.remote.source import BlockSource
from kvbm.tiers.host import HostBuffer

from .conftest import make_hashes


def make_g1_g2(num_blocks: int = 6, layers: tuple[int, ...] = (48, 16), seed: int = 0):
    rng = np.random.default_rng(seed)
    arrays = [rng.integers(0, 256, (num_blocks, n), dtype=np.uint8) for n in layers]
    g2 = HostBuffer(num_blocks, sum(layers))
    g2.rows[:] = np.concatenate(arrays, axis=1)
    return arrays, g2, BlockLayout(layers)


def test_g1_and_g2_checksums_agree_and_match_kvbm_integrity():
    arrays, g2, layout = make_g1_g2()
    g1 = engine_tier(EngineKV.from_tensors(arrays))
    g2t = host_tier(g2, layout)
    ids = np.array([5, 0, 3])
    assert g1.checksums(ids).tolist() == g2t.checksums(ids).tolist() == checksum_rows(g2.rows, ids).tolist()
    np.testing.assert_array_equal(g1.read(ids), g2.rows[ids])
    with pytest.raises(ValueError):
        g1.checksums(np.array([6]))


def test_engine_tier_registers_one_region_per_layer():
    arrays, _, _ = make_g1_g2(num_blocks=4, layers=(32, 8))
    regions = engine_tier(EngineKV.from_tensors(arrays)).regions
    assert regions.tier is Tier.G1 and regions.segment_lengths == (32, 8)
    assert [r.address for r in regions.regions] == [a.ctypes.data for a in arrays]
    assert [(r.nbytes, r.stride) for r in regions.regions] == [(128, 32), (32, 8)]


def test_engine_tier_of_a_strided_plane_keeps_its_block_stride():
    kv = np.zeros((2, 4, 16), dtype=np.uint8)  # [K/V, num_blocks, bytes]: register each plane
    regions = engine_tier(EngineKV.from_tensors([kv[0], kv[1]])).regions
    assert [(r.address, r.stride) for r in regions.regions] == [(kv.ctypes.data, 16), (kv.ctypes.data + 64, 16)]


def test_host_tier_segments_follow_the_layout():
    _, g2, layout = make_g1_g2(layers=(48, 16))
    regions = host_tier(g2, layout).regions
    assert [(s.offset, s.nbytes) for s in regions.segments] == [(0, 48), (48, 16)]
    assert host_tier(g2).regions.segment_lengths == (64,)
    with pytest.raises(ValueError):
        host_tier(g2, BlockLayout((10,)))


def make_table(clock: FakeClock, lease_s: float = 10.0):
    ended: list[tuple[int, LeaseEnd]] = []
    table = LeaseTable(lease_s=lease_s, clock=clock, on_end=lambda lease, how: ended.append((lease.lease_id, how)))
    return table, ended


def test_lease_released_by_done_and_expired_by_silence():
    clock = FakeClock()
    table, ended = make_table(clock)
    kept = table.add(Tier.G2, [1, 2])
    quiet = table.add(Tier.G2, [3])
    table.notice("reader/1", notices.Notice(notices.NoticeKind.DONE, (kept.lease_id,)))
    assert ended == [(kept.lease_id, LeaseEnd.RELEASED)]
    clock.now += 9.9
    assert table.expire() == []
    clock.now += 0.2
    assert [lease.lease_id for lease in table.expire()] == [quiet.lease_id]
    assert ended[-1] == (quiet.lease_id, LeaseEnd.EXPIRED)
    c = table.counters()
    assert (c.granted, c.released, c.expired, c.active, c.blocks_held) == (2, 1, 1, 0, 0)


def test_heartbeat_extends_and_late_notices_are_ignored():
    clock = FakeClock()
    table, ended = make_table(clock)
    lease = table.add(Tier.G1, [0])
    clock.now += 8
    table.notice("r/1", notices.Notice(notices.NoticeKind.HEARTBEAT, (lease.lease_id,)))
    assert table.expires_at(lease.lease_id) == clock.now + 10
    clock.now += 9
    assert table.expire() == []
    clock.now += 2
    assert len(table.expire()) == 1
    table.notice("r/1", notices.Notice(notices.NoticeKind.DONE, (lease.lease_id,)))  # after expiry
    assert table.counters().ignored_notices == 1 and len(ended) == 1


def test_named_reader_and_multiple_readers():
    clock = FakeClock()
    table, ended = make_table(clock)
    mine = table.add(Tier.G2, [4], reader=AgentName("d/1"))
    table.notice("intruder/1", notices.Notice(notices.NoticeKind.DONE, (mine.lease_id,)))
    assert ended == [] and table.counters().ignored_notices == 1
    shared = table.add(Tier.G2, [5], readers=2)
    for sender in ("d/1", "d/1", "d/2"):  # the same reader twice counts once
        table.notice(sender, notices.Notice(notices.NoticeKind.DONE, (shared.lease_id,)))
    assert ended == [(shared.lease_id, LeaseEnd.RELEASED)]
    assert [lease.lease_id for lease in table.revoke_all()] == [mine.lease_id]
    assert ended[-1] == (mine.lease_id, LeaseEnd.REVOKED)


class DictPinner:
    def __init__(self, where: dict[BlockHash, int]) -> None:
        self.where = where
        self.pins: dict[int, int] = {}
        self.unpinned: list[tuple[list[int], LeaseEnd]] = []

    def release(self, hashes):
        return 0

    def wait_ready(self, hashes, timeout_s):
        return None

    def pin(self, hashes):
        ids = []
        for h in hashes:
            if h not in self.where:
                break
            ids.append(self.where[h])
        for b in ids:
            self.pins[b] = self.pins.get(b, 0) + 1
        return PinnedBlocks(Tier.G2, np.array(ids, dtype=np.int64)) if ids else None

    def unpin(self, lease, how):
        for b in lease.block_ids.tolist():
            self.pins[b] = self.pins.get(b, 0) - 1
        self.unpinned.append((lease.block_ids.tolist(), how))


def make_source(clock: FakeClock, hashes, ids):
    _, g2, layout = make_g1_g2()
    pinner = DictPinner(dict(zip(hashes, ids)))
    tiers = {Tier.G2: host_tier(g2, layout)}
    return BlockSource(AgentName("src/1"), tiers, lease_s=5.0, clock=clock, pinner=pinner), pinner, g2


def test_source_grants_by_hash_with_published_checksums_and_unpins_once():
    clock = FakeClock()
    hashes = [BlockHash(h) for h in make_hashes(4)]
    source, pinner, g2 = make_source(clock, hashes[:2], [4, 1])
    grant = source.grant_hashes(AgentName("dec/1"), hashes)
    assert grant is not None and grant.block_ids.tolist() == [4, 1] and grant.hashes == tuple(hashes[:2])
    assert grant.checksums.tolist() == checksum_rows(g2.rows, np.array([4, 1])).tolist()
    assert pinner.pins == {4: 1, 1: 1}
    source.handle_notifications({"someone/9": [notices.done([grant.lease_id])], "dec/1": [b"not ours"]})
    assert pinner.unpinned == []  # the lease was granted to dec/1 only
    source.handle_notifications({"dec/1": [notices.done([grant.lease_id])]})
    assert pinner.unpinned == [([4, 1], LeaseEnd.RELEASED)] and pinner.pins == {4: 0, 1: 0}
    assert source.grant_hashes(AgentName("dec/1"), hashes[2:]) is None


def test_source_grant_by_ids_computes_checksums_and_expires():
    clock = FakeClock()
    source, pinner, g2 = make_source(clock, [], [])
    grant = source.grant(Tier.G2, [2, 3], readers=1)
    assert grant.checksums.tolist() == checksum_rows(g2.rows, np.array([2, 3])).tolist()
    assert grant.source == "src/1" and grant.lease_s == 5.0
    clock.now += 5.1
    assert len(source.expire()) == 1 and pinner.unpinned == [([2, 3], LeaseEnd.EXPIRED)]
    with pytest.raises(ValueError):
        source.grant(Tier.G2, [99])
    with pytest.raises(KeyError):
        source.grant(Tier.G1, [0])


def make_keeper(clock: FakeClock):
    sent: list[tuple[str, bytes]] = []
    keeper = LeaseKeeper(
        heartbeat_s=1.0, notice_interval_s=0.1, clock=clock, send=lambda s, m: sent.append((s, m)) or True
    )
    return keeper, sent


def test_keeper_heartbeats_each_source_once_per_interval():
    clock = FakeClock()
    keeper, sent = make_keeper(clock)
    keeper.hold(AgentName("p/1"), LeaseId(3))
    keeper.hold(AgentName("p/1"), LeaseId(1))
    keeper.hold(AgentName("p/2"), LeaseId(1))
    keeper.tick()
    assert sent == []
    clock.now += 1.0
    keeper.tick()
    keeper.tick()
    assert sorted(sent) == [
        ("p/1", notices.heartbeat([LeaseId(1), LeaseId(3)])),
        ("p/2", notices.heartbeat([LeaseId(1)])),
    ]
    assert keeper.heartbeats_sent == 2 and len(keeper) == 3


def test_keeper_batches_done_per_source_after_the_last_holder():
    clock = FakeClock()
    keeper, sent = make_keeper(clock)
    keeper.hold(AgentName("p/1"), LeaseId(1))
    keeper.hold(AgentName("p/1"), LeaseId(1))  # a held grant and its running job
    keeper.hold(AgentName("p/1"), LeaseId(2))
    keeper.release(AgentName("p/1"), LeaseId(1))
    assert keeper.pending_done == 0 and keeper.is_held(AgentName("p/1"), LeaseId(1))
    keeper.release(AgentName("p/1"), LeaseId(1))
    clock.now += 0.05
    keeper.release(AgentName("p/1"), LeaseId(2))
    keeper.release(AgentName("gone/1"), LeaseId(7), notify=False)
    keeper.tick()
    assert sent == [] and keeper.pending_done == 2
    clock.now += 0.06
    keeper.tick()
    assert sent == [("p/1", notices.done([LeaseId(1), LeaseId(2)]))] and keeper.pending_done == 0
    keeper.queue_done(AgentName("p/2"), LeaseId(9))
    keeper.flush()
    assert sent[-1] == ("p/2", notices.done([LeaseId(9)])) and len(keeper) == 0
