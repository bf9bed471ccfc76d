"""The prefill -> decode handoff without engines: params round trip, held blocks, stats fixes."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from kvbm.connectors.vllm.config import ConnectorConfig
from kvbm.connectors.vllm.handoff import Handoff, wants_handoff
from kvbm.connectors.vllm.held_blocks import HeldBlocks
from kvbm.connectors.vllm.stats import KvbmConnectorStats, _remote_prometheus
from kvbm.config import KvbmConfig
from kvbm.errors import ConfigError
from kvbm.ids import BlockHash, Tier
from kvbm.manager import BlockManager
from kvbm.remote import Lease, LeaseEnd, LeaseId


def h(i: int) -> BlockHash:
    return BlockHash(i.to_bytes(16, "little"))


def lease(ids, hashes) -> Lease:
    return Lease(LeaseId(1), Tier.G1, np.asarray(ids, dtype=np.int64), tuple(hashes))


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


# -- Handoff -------------------------------------------------------------------------------


def test_handoff_round_trip():
    handoff = Handoff("127.0.0.1:5555", 3, h(9))
    params = handoff.to_params()
    assert params["do_remote_prefill"] is True and params["do_remote_decode"] is False
    assert Handoff.from_params(params) == handoff


@pytest.mark.parametrize("entry", [
    5, {}, {"source": "127.0.0.1:1", "num_blocks": 0, "last_hash": "00" * 16},
    {"source": "127.0.0.1:1", "num_blocks": True, "last_hash": "00" * 16},
    {"source": "no port", "num_blocks": 1, "last_hash": "00" * 16},
    {"source": "127.0.0.1:1", "num_blocks": 1, "last_hash": "zz"},
    {"source": "127.0.0.1:1", "num_blocks": 1, "last_hash": "00" * 8},
])
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
    held = HeldBlocks(hold_s=30, clock=Clock())
    held.hold("r1", [h(1), h(2), h(3)], [10, 11, 12])
    pinned = held.pin([h(2), h(3), h(4)])
    assert pinned.tier is Tier.G1 and pinned.block_ids.tolist() == [11, 12]
    assert held.take_ended() == set()  # pinned and unread
    held.unpin(lease([11, 12], [h(2), h(3)]), LeaseEnd.RELEASED)
    assert held.take_ended() == {"r1"}
    assert held.pin([h(1)]) is None and held.counters().read == 1


def test_pinned_blocks_outlive_the_deadline():
    clock = Clock()
    held = HeldBlocks(hold_s=5, clock=clock)
    held.hold("r1", [h(1)], [10])
    held.pin([h(1)])
    clock.now = 100
    assert held.take_ended() == set()
    held.unpin(lease([10], []), LeaseEnd.EXPIRED)  # a reader without hashes marks nothing read
    assert held.take_ended() == {"r1"} and held.counters().unclaimed == 1


def test_unclaimed_hold_ends_at_deadline():
    clock = Clock()
    held = HeldBlocks(hold_s=5, clock=clock)
    held.hold("r1", [h(1)], [10])
    clock.now = 4.9
    assert held.take_ended() == set() and held.is_held("r1")
    clock.now = 5
    assert held.take_ended() == {"r1"} and not held.is_held("r1")


def test_shared_blocks_stay_while_another_hold_names_them():
    held = HeldBlocks(hold_s=30, clock=Clock())
    held.hold("a", [h(1), h(2)], [10, 11])
    held.hold("b", [h(1), h(2)], [10, 11])
    held.pin([h(1), h(2)])
    held.unpin(lease([10, 11], [h(1), h(2)]), LeaseEnd.RELEASED)
    assert held.take_ended() == {"a"}  # one read ends one hold, the oldest
    assert held.pin([h(1), h(2)]).block_ids.tolist() == [10, 11]


def test_release_ends_the_oldest_unread_hold():
    held = HeldBlocks(hold_s=30, clock=Clock())
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
