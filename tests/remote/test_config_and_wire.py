"""Config validation and the JSON forms peers exchange (no NIXL)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest

from kvbm.errors import ConfigError
from kvbm.ids import BlockHash, Tier
from kvbm.remote import BlockGrant, PeerMetadata, RemoteConfig
from kvbm.remote import notices
from kvbm.remote.failures import FailureKind, RemoteError, from_nixl, kind_of
from kvbm.remote.metadata import AgentName, LeaseId, split_hashes
from kvbm.remote.regions import MemKind, Region, Segment, TierRegions

from .conftest import make_hashes


def make_regions(num_blocks: int = 4, layers: tuple[int, ...] = (64, 32), tier: Tier = Tier.G2) -> TierRegions:
    stride = sum(layers)
    offsets = np.cumsum([0, *layers[:-1]]).tolist()
    return TierRegions(
        tier,
        MemKind.DRAM,
        num_blocks,
        (Region(4096, num_blocks * stride, stride),),
        tuple(Segment(0, o, n) for o, n in zip(offsets, layers)),
    )


def test_import_kvbm_remote_does_not_load_nixl_torch_or_vllm():
    code = "import sys, kvbm, kvbm.remote; print(sorted(m for m in ('nixl', 'torch', 'vllm') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"


def test_config_defaults_and_round_trip():
    cfg = RemoteConfig(worker="prefill-0")
    assert cfg.lease_s == 30.0 and cfg.backends == ("UCX",) and cfg.verify
    assert RemoteConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ({"worker": "w", "lease_s": 0}, "lease_s"),
        ({"worker": "w", "lease_s": 10, "heartbeat_s": 6}, "heartbeat_s"),
        ({"worker": "w", "side_channel_port": 70000}, "side_channel_port"),
        ({"worker": "has space"}, "worker"),
        ({"worker": "a/b"}, "worker"),
        ({"worker": "w", "verify": "yes"}, "verify"),
        ({"worker": "w", "lease": 3}, "lease"),
        ({}, "worker"),
    ],
)
def test_config_errors_name_the_field(raw, field):
    with pytest.raises(ConfigError) as info:
        RemoteConfig.from_dict(raw)
    assert info.value.field == field


def test_descriptors_are_block_major_one_per_segment():
    regions = make_regions(num_blocks=3, layers=(64, 32))
    d = regions.descriptors()
    assert d.shape == (6, 3)
    assert d[:, 0].tolist() == [4096, 4160, 4192, 4256, 4288, 4352]
    assert d[:, 1].tolist() == [64, 32] * 3
    assert regions.descriptor_indices(np.array([2, 0])).tolist() == [4, 5, 0, 1]
    with pytest.raises(ValueError):
        regions.descriptor_indices(np.array([3]))


def test_regions_reject_segments_outside_their_row_and_short_regions():
    with pytest.raises(ValueError):
        TierRegions(Tier.G2, MemKind.DRAM, 2, (Region(0, 200, 100),), (Segment(0, 50, 60),))
    with pytest.raises(ValueError):
        TierRegions(Tier.G2, MemKind.DRAM, 3, (Region(0, 200, 100),), (Segment(0, 0, 100),))
    with pytest.raises(ValueError):
        TierRegions(Tier.G2, MemKind.DRAM, 2, (Region(0, 200, 100),), (Segment(1, 0, 10),))


def test_metadata_round_trips_through_json():
    md = PeerMetadata(AgentName("w/1"), b"\x00nixl\xff", (make_regions(), make_regions(tier=Tier.G1)), "127.0.0.1:5")
    back = PeerMetadata.from_bytes(md.to_bytes())
    assert back.to_dict() == md.to_dict() and back.worker == "w" and back.tier(Tier.G1) == make_regions(tier=Tier.G1)
    with pytest.raises(ValueError, match="format"):
        PeerMetadata.from_dict({**md.to_dict(), "version": 99})
    with pytest.raises(ValueError):
        PeerMetadata.from_bytes(b"{not json")


def test_grant_round_trips_and_checks_lengths():
    hashes = tuple(BlockHash(h) for h in make_hashes(3))
    sums = np.array([1, 2, 2**64 - 1], dtype=np.uint64)
    grant = BlockGrant(AgentName("w/1"), LeaseId(7), Tier.G1, np.array([5, 1, 9]), sums, hashes, 30.0, "h:1")
    back = BlockGrant.from_dict(json.loads(json.dumps(grant.to_dict())))
    assert back.block_ids.tolist() == [5, 1, 9] and back.checksums.tolist() == [1, 2, 2**64 - 1]
    assert back.hashes == hashes and back.lease_id == 7 and back.tier is Tier.G1 and back.side_channel == "h:1"
    with pytest.raises(ValueError):
        BlockGrant(AgentName("w/1"), LeaseId(1), Tier.G1, np.array([1, 2]), np.array([1], dtype=np.uint64))
    with pytest.raises(ValueError):
        BlockGrant.from_dict({"source": "w/1"})
    with pytest.raises(ValueError):
        split_hashes(b"x" * 17)


def test_notices_round_trip_and_reject_foreign_messages():
    assert notices.parse(notices.done([LeaseId(3), LeaseId(4)])) == notices.Notice(notices.NoticeKind.DONE, (3, 4))
    assert notices.parse(notices.heartbeat([LeaseId(9)])) == notices.Notice(notices.NoticeKind.HEARTBEAT, (9,))
    for foreign in (b"req-17", b"kvbm1 nope 3", b"kvbm1 done x", b""):
        assert notices.parse(foreign) is None


def test_failure_reasons_carry_their_kind():
    err = RemoteError(FailureKind.DEADLINE, "still reading")
    assert str(err) == "deadline: still reading" and kind_of(str(err)) is FailureKind.DEADLINE
    assert kind_of(None) is None and kind_of("whatever: x") is None

    class nixlRemoteDisconnectError(Exception):
        pass

    assert from_nixl(nixlRemoteDisconnectError("x"), "reading").kind is FailureKind.PEER_LOST
    assert from_nixl(ValueError("x"), "reading").kind is FailureKind.NIXL_ERROR


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        RemoteConfig(worker="w").lease_s = 1  # type: ignore[misc]
