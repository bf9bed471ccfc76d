"""The prefill -> decode handoff without engines: params round trip, held blocks, stats fixes."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from helpers import FakeClock
from kvbm.config import KvbmConfig
from kvbm.connectors.vllm.config import ConnectorConfig
from kvbm.connectors.vllm.handoff import Handoff, wants_handoff
from kvbm.connectors.vllm.held_blocks import HeldBlocks
from kvbm.connectors.vllm.stats import KvbmConnectorStats, _remote_prometheus
from kvbm.errors import ConfigError
from kvbm.ids import BlockHash, Tier
from kvbm.manager.block_manager import BlockManager
from kvbm.remote import BlockGrant, Lease, LeaseEnd, LeaseId
from kvbm.remote.metadata import AgentName
from kvbm.remote.source import BlockSource


def h(i: int) -> BlockHash:
    return BlockHash(i.to_bytes(16, "little"))


def lease(ids, hashes, lease_id: int = 1) -> Lease:
    return Lease(LeaseId(lease_id), Tier.G1, np.asarray(ids, dtype=np.int64), tuple(hashes))


def grant(n: int, lease_id: int = 4) -> BlockGrant:
    return BlockGrant(
        AgentName("prefill-0/ab12"),
        LeaseId(lease_id),
        Tier.G1,
        np.arange(10, 10 + n),
        np.arange(100, 100 + n, dtype=np.uint64),
        tuple(h(i) for i in range(1, n + 1)),
        lease_s=30.0,
        side_channel="127.0.0.1:5555",
    )


# -- Handoff -------------------------------------------------------------------------------


def test_handoff_round_trip():
    handoff = Handoff("127.0.0.1:5555", 3, h(9))
    params = handoff.to_params()
    assert params["do_remote_prefill"] is True and params["do_remote_decode"] is False
    assert Handoff.from_params(params) == handoff


def test_handoff_carries_its_grant():
    from kvbm.connectors.vllm.handoff import attach_grant

    params = Handoff("127.0.0.1:5555", 3, h(3)).to_params()
    attach_grant(params, grant(3))
    got = Handoff.from_params(params)
    assert got.grant.lease_id == 4 and got.grant.block_ids.tolist() == [10, 11, 12]
    assert got.grant.checksums.tolist() == [100, 101, 102] and got.grant.hashes[-1] == h(3)
    piece = got.grant.slice(1, 3)  # what a decode with block 0 already pulls: same lease
    assert piece.lease_id == 4 and piece.block_ids.tolist() == [11, 12] and piece.hashes == (h(2), h(3))


@pytest.mark.parametrize(
    "bad",
    [
        lambda g: g.update(tier="g2"),
        lambda g: g.update(checksums="!"),
        lambda g: g.update(hashes=""),
        lambda g: g.pop("lease_id"),
        lambda g: 5,
    ],
)
def test_a_grant_that_does_not_name_the_handed_off_blocks_is_no_handoff(bad):
    params = Handoff("127.0.0.1:5555", 3, h(3)).to_params()
    entry = grant(3).to_dict()
    params["kvbm"]["grant"] = 5 if bad(entry) == 5 else entry
    assert Handoff.from_params(params) is None
    other = Handoff("127.0.0.1:5555", 2, h(2)).to_params()  # three blocks granted, two handed off
    other["kvbm"]["grant"] = grant(3).to_dict()
    assert Handoff.from_params(other) is None


@pytest.mark.parametrize(
    "entry",
    [
        5,
        {},
        {"source": "127.0.0.1:1", "num_blocks": 0, "last_hash": "00" * 16},
        {"source": "127.0.0.1:1", "num_blocks": True, "last_hash": "00" * 16},
        {"source": "no port", "num_blocks": 1, "last_hash": "00" * 16},
        {"source": "127.0.0.1:1", "num_blocks": 1, "last_hash": "zz"},
        {"source": "127.0.0.1:1", "num_blocks": 1, "last_hash": "00" * 8},
    ],
)
def test_malformed_handoff_is_none(entry):
    assert Handoff.from_params({"kvbm": entry}) is None


def test_nothing_handed_off_is_no_handoff():
    from kvbm.connectors.vllm.handoff import NOTHING_HANDED_OFF

    assert Handoff.from_params(NOTHING_HANDED_OFF) is None


def test_wants_handoff():
    assert wants_handoff({"do_remote_decode": True})
    assert not wants_handoff(None) and not wants_handoff({"do_remote_decode": "yes"})


def test_remote_config_errors_name_the_field():
    assert ConnectorConfig.from_extra_config({"remote": {"worker": "p0"}}).remote.worker == "p0"
    with pytest.raises(ConfigError, match="remote.lease_s"):
        ConnectorConfig.from_extra_config({"remote": {"worker": "p0", "lease_s": 0}})
    with pytest.raises(ConfigError, match="'remote.wrker'"):
        ConnectorConfig.from_extra_config({"remote": {"wrker": "p0"}})
    with pytest.raises(ConfigError, match="'remote'"):
        ConnectorConfig.from_extra_config({"remote": "p0"})


# -- HeldBlocks ----------------------------------------------------------------------------


def test_pin_longest_prefix_and_end_after_read():
    held = HeldBlocks(hold_s=30, clock=FakeClock(start=0.0))
    held.hold("r1", [h(1), h(2), h(3)], [10, 11, 12])
    pinned = held.pin([h(2), h(3), h(4)])
    assert pinned.tier is Tier.G1 and pinned.block_ids.tolist() == [11, 12]
    assert held.take_ended() == set()  # pinned and unread
    held.unpin(lease([11, 12], [h(2), h(3)]), LeaseEnd.RELEASED)
    assert held.take_ended() == {"r1"}
    assert held.pin([h(1)]) is None and held.counters().read == 1


def test_pinned_blocks_outlive_the_deadline():
    clock = FakeClock(start=0.0)
    held = HeldBlocks(hold_s=5, clock=clock)
    held.hold("r1", [h(1)], [10])
    held.pin([h(1)])
    clock.now = 100
    assert held.take_ended() == set()
    held.unpin(lease([10], []), LeaseEnd.EXPIRED)  # a reader without hashes marks nothing read
    assert held.take_ended() == {"r1"} and held.counters().unclaimed == 1


def test_unclaimed_hold_ends_at_deadline():
    clock = FakeClock(start=0.0)
    held = HeldBlocks(hold_s=5, clock=clock)
    held.hold("r1", [h(1)], [10])
    clock.now = 4.9
    assert held.take_ended() == set() and held.is_held("r1")
    clock.now = 5
    assert held.take_ended() == {"r1"} and not held.is_held("r1")


def test_shared_blocks_stay_while_another_hold_names_them():
    held = HeldBlocks(hold_s=30, clock=FakeClock(start=0.0))
    held.hold("a", [h(1), h(2)], [10, 11])
    held.hold("b", [h(1), h(2)], [10, 11])
    held.pin([h(1), h(2)])
    held.unpin(lease([10, 11], [h(1), h(2)]), LeaseEnd.RELEASED)
    assert held.take_ended() == {"a"}  # one read ends one hold, the oldest
    assert held.pin([h(1), h(2)]).block_ids.tolist() == [10, 11]


def test_release_ends_the_oldest_unread_hold():
    held = HeldBlocks(hold_s=30, clock=FakeClock(start=0.0))
    held.hold("a", [h(1), h(2)], [10, 11])
    held.hold("b", [h(1), h(2)], [10, 11])
    assert held.release([h(9)]) == 0
    assert held.release([h(2)]) == 1
    assert held.take_ended() == {"a"} and held.counters().read == 1


def test_duplicate_hold_and_length_mismatch_refused():
    held = HeldBlocks(hold_s=30)
    held.hold("a", [h(1)], [10])
    with pytest.raises(ValueError, match="already held"):
        held.hold("a", [h(1)], [10])
    with pytest.raises(ValueError, match="2 hashes for 1 blocks"):
        held.hold("b", [h(1), h(2)], [10])


@pytest.mark.parametrize(
    "how, counted", [(LeaseEnd.RELEASED, "read"), (LeaseEnd.EXPIRED, "unclaimed"), (LeaseEnd.REVOKED, "revoked")]
)
def test_a_granted_hold_ends_exactly_with_its_lease(how, counted):
    clock = FakeClock(start=0.0)
    held = HeldBlocks(hold_s=5, clock=clock)
    held.hold("r1", [h(1), h(2)], [10, 11], lease_id=7)
    clock.now = 100  # hold_s does not end it: its lease does
    assert held.take_ended() == set() and held.is_held("r1")
    # Never served by hash (its request may have been aborted and its blocks reused), and a
    # release by hash does not touch it (releases name its lease).
    assert held.pin([h(1), h(2)]) is None and held.release([h(2)]) == 0
    held.unpin(lease([10, 11], [h(1), h(2)], lease_id=7), how)
    assert held.take_ended() == {"r1"}
    counters = held.counters()
    assert getattr(counters, counted) == 1 and counters.granted == 1 and counters.holding == 0


def test_a_release_by_lease_ends_that_lease_only_when_it_names_its_last_hash():
    held = HeldBlocks(hold_s=30, clock=FakeClock(start=0.0))
    tiers = {Tier.G1: object()}  # a grant with its checksums given never reads the tier
    source = BlockSource(AgentName("p/1"), tiers, lease_s=30, clock=FakeClock(start=0.0), pinner=held)
    granted = source.grant(Tier.G1, [10, 11], [h(1), h(2)], checksums=np.zeros(2, dtype=np.uint64))
    held.hold("r1", [h(1), h(2)], [10, 11], lease_id=granted.lease_id)
    assert source.release_hashes([h(1)], granted.lease_id) == 0  # not its last hash
    assert source.release_hashes([h(2)], granted.lease_id + 1) == 0  # no such lease
    # The same lease id from the incarnation before a restart (ids start again at 1).
    assert source.release_hashes([h(2)], granted.lease_id, "p/0") == 0
    assert held.take_ended() == set()
    assert source.release_hashes([h(2)], granted.lease_id, "p/1") == 1
    assert held.take_ended() == {"r1"} and held.counters().read == 1
    assert source.counters().released == 1 and source.counters().active == 0


def test_wait_ready_wakes_on_hold():
    held = HeldBlocks(hold_s=30)
    threading.Timer(0.05, held.hold, args=("r", [h(7)], [3])).start()
    held.wait_ready([h(7)], timeout_s=30)
    assert held.pin([h(7)]).block_ids.tolist() == [3]


# -- stats ---------------------------------------------------------------------------------


def test_connector_stats_reduce_reads_tiers_by_name():
    manager = BlockManager(KvbmConfig.from_dict({"g2_capacity_blocks": 4}), block_size=16, block_bytes=1024)
    reduced = KvbmConnectorStats(data=manager.stats().to_dict()).reduce()
    assert reduced["g2 used blocks"] == 0 and "g2 hit rate" in reduced


def test_remote_prometheus_flattens_numbers():
    text = _remote_prometheus({"agent": "x", "pulls": {"blocks_pulled": 3, "failures": {"peer_lost": 1}}})
    assert text.splitlines() == ["kvbm_remote_pulls_blocks_pulled 3", "kvbm_remote_pulls_failures_peer_lost 1"]
    assert _remote_prometheus(None) == ""


def test_a_handoff_with_a_tail_carries_its_block_last_in_the_grant():
    from kvbm.connectors.vllm.handoff import attach_grant

    params = Handoff("127.0.0.1:5555", 3, h(3)).to_params()
    attach_grant(params, grant(4), tail_tokens=7)  # three full blocks, then the tail's
    got = Handoff.from_params(params)
    assert got.tail_tokens == 7 and got.tail_hash == h(4) and got.release_hash == h(4)
    piece = got.grant.take([2, 3])  # a decode holding blocks 0 and 1 pulls block 2 and the tail
    assert piece.lease_id == 4 and piece.block_ids.tolist() == [12, 13] and piece.hashes == (h(3), h(4))
    assert Handoff.from_params(Handoff("127.0.0.1:5555", 3, h(3)).to_params()).release_hash == h(3)


@pytest.mark.parametrize("tail, blocks", [(7, 3), (0, 4), (-1, 4), (True, 4), ("7", 4), (7, None)])
def test_a_tail_that_does_not_match_its_grant_is_no_handoff(tail, blocks):
    params = Handoff("127.0.0.1:5555", 3, h(3)).to_params()
    if blocks is not None:
        params["kvbm"]["grant"] = grant(blocks).to_dict()
    params["kvbm"]["tail_tokens"] = tail
    assert Handoff.from_params(params) is None
