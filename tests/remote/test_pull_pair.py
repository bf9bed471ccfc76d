"""Two real worker processes on 127.0.0.1: pulls both ways, by id and by hash, and every way a
pull can fail without hanging."""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
from collections.abc import Iterator

import numpy as np
import pytest

from kvbm.remote import BlockGrant, FailureKind, PeerMetadata, kind_of
from kvbm.remote.regions import Segment

from .conftest import make_hashes
from .peerproc import Peer, PeerError, PeerSpec, close_peers, start_peers, until

LEASE_S = 30.0


@pytest.fixture(scope="module")
def pair() -> Iterator[tuple[Peer, Peer]]:
    """``a`` heartbeats every 50 ms; ``b``'s clock can be advanced (lease expiry)."""
    a, b = start_peers(
        PeerSpec("a", heartbeat_s=0.05, side_channel_timeout_s=3.0),
        PeerSpec("b", manual_clock=True, lease_s=LEASE_S),
    )
    yield a, b
    codes = close_peers(a, b)
    assert codes == [0, 0], f"workers exited with {codes}"


def pull(reader: Peer, grant: dict, tier: str, ids: list[int], **kwargs) -> dict:
    job = reader.call("pull", grant=grant, tier=tier, ids=ids, **kwargs)
    return reader.call("wait", job_ids=[job])[0]


def tampered(grant: dict, **changes) -> dict:
    return dataclasses.replace(BlockGrant.from_dict(grant), **changes).to_dict()


def leases(peer: Peer) -> dict:
    return peer.call("stats")["leases"]


def test_g2_to_g1_and_g1_to_g2_byte_exact(pair):
    a, b = pair
    b.call("fill", tier="g2", ids=[3, 4, 5, 9], seed=11)
    grant = b.call("grant", tier="g2", ids=[3, 4, 5, 9])
    result = pull(a, grant, "g1", [0, 7, 2, 15], metadata=b.metadata)
    assert result["ok"], result
    got, want = a.call("read", tier="g1", ids=[0, 7, 2, 15]), b.call("read", tier="g2", ids=[3, 4, 5, 9])
    np.testing.assert_array_equal(got, want)

    a.call("fill", tier="g1", ids=[1, 2], seed=12)
    grant = a.call("grant", tier="g1", ids=[1, 2])
    result = pull(b, grant, "g2", [30, 31], metadata=a.metadata)
    assert result["ok"], result
    np.testing.assert_array_equal(b.call("read", tier="g2", ids=[30, 31]), a.call("read", tier="g1", ids=[1, 2]))


def test_done_notice_releases_the_lease(pair):
    a, b = pair
    grant = b.call("grant", tier="g2", ids=[0, 1])
    assert pull(a, grant, "g2", [0, 1], metadata=b.metadata)["ok"]
    # By this lease's id: the release of an earlier test's lease may land meanwhile.
    released = [BlockGrant.from_dict(grant).lease_id, "released"]
    until(lambda: released in b.call("unpins"), what="b to release the lease")


def test_metadata_fetched_from_side_channel_when_not_carried(pair):
    a, b = pair
    b.call("fill", tier="g1", ids=[8], seed=13)
    grant = b.call("grant", tier="g1", ids=[8])
    assert pull(a, grant, "g1", [9])["ok"]  # a has b loaded by now, or fetches it
    np.testing.assert_array_equal(a.call("read", tier="g1", ids=[9]), b.call("read", tier="g1", ids=[8]))


def test_pull_by_hash_gets_the_prefix_the_peer_holds(pair):
    a, b = pair
    hashes = make_hashes(5, salt=1)
    b.call("fill", tier="g2", ids=[10, 11, 12], seed=14)
    b.call("index", tier="g2", ids=[10, 11, 12], hashes=hashes[:3])
    job = a.call("pull_hashes", address=b.address, hashes=hashes, tier="g1", ids=[4, 5, 6, 10, 11])
    result = a.call("wait", job_ids=[job])[0]
    assert result["failed"] == [3, 4]
    assert kind_of(result["reason"]) is FailureKind.NOT_HELD
    np.testing.assert_array_equal(a.call("read", tier="g1", ids=[4, 5, 6]), b.call("read", tier="g2", ids=[10, 11, 12]))
    until(lambda: b.call("pinned") == 0, what="b to unpin the blocks")


def test_pull_by_hash_of_nothing_held_fails_not_held(pair):
    a, b = pair
    job = a.call("pull_hashes", address=b.address, hashes=make_hashes(2, salt=2), tier="g1", ids=[0, 1])
    result = a.call("wait", job_ids=[job])[0]
    assert result["failed"] == [0, 1] and kind_of(result["reason"]) is FailureKind.NOT_HELD


def test_checksum_mismatch_fails_exactly_that_block(pair):
    a, b = pair
    b.call("fill", tier="g2", ids=[20, 21, 22], seed=15)
    grant = BlockGrant.from_dict(b.call("grant", tier="g2", ids=[20, 21, 22]))
    wrong = grant.checksums.copy()
    wrong[1] ^= np.uint64(1)
    result = pull(a, tampered(grant.to_dict(), checksums=wrong), "g1", [0, 1, 2], metadata=b.metadata)
    assert result["failed"] == [1] and result["corrupt"] == [1]
    assert kind_of(result["reason"]) is FailureKind.CHECKSUM
    assert a.call("stats")["pulls"]["checksum_failures"] >= 1


def test_source_overwriting_a_leased_block_is_caught(pair):
    a, b = pair
    b.call("fill", tier="g2", ids=[23, 24], seed=16)
    grant = b.call("grant", tier="g2", ids=[23, 24])
    b.call("fill", tier="g2", ids=[24], seed=17)  # a bug on the source: bytes change under a lease
    result = pull(a, grant, "g1", [3, 4], metadata=b.metadata)
    assert result["failed"] == [1] and result["corrupt"] == [1]


def test_block_id_outside_the_peer_tier_is_a_bad_descriptor(pair):
    a, b = pair
    grant = tampered(b.call("grant", tier="g2", ids=[0]), block_ids=np.array([b.spec.num_g2 + 3]))
    result = pull(a, grant, "g1", [0], metadata=b.metadata)
    assert result["failed"] == [0] and kind_of(result["reason"]) is FailureKind.BAD_DESCRIPTORS


def test_local_ids_out_of_range_are_refused_at_submit(pair):
    a, b = pair
    grant = b.call("grant", tier="g2", ids=[0])
    with pytest.raises(PeerError, match="ValueError"):
        a.call("pull", grant=grant, tier="g1", ids=[a.spec.num_g1])
    with pytest.raises(PeerError, match="ValueError"):
        a.call("pull", grant=grant, tier="g1", ids=[0, 1])


def test_layouts_that_differ_are_refused(pair):
    a, b = pair
    md = PeerMetadata.from_bytes(PeerMetadata.from_dict(b.metadata).to_bytes())
    tiers = []
    for t in md.tiers:
        if t.tier.value == "g2":  # claim one 8 KiB segment per block instead of two 4 KiB layers
            t = dataclasses.replace(t, segments=(Segment(0, 0, sum(t.segment_lengths)),))
        tiers.append(t)
    forged = dataclasses.replace(md, tiers=tuple(tiers))
    grant = b.call("grant", tier="g2", ids=[0])
    result = pull(a, grant, "g1", [0], metadata=forged.to_dict())
    assert kind_of(result["reason"]) is FailureKind.BAD_DESCRIPTORS and "layouts differ" in result["reason"]


def test_read_past_the_registered_region_is_refused_by_nixl(pair):
    a, b = pair
    md = PeerMetadata.from_dict(b.metadata)
    tiers = []
    for t in md.tiers:
        if t.tier.value == "g2":  # claim twice the blocks b registered
            region = dataclasses.replace(t.regions[0], nbytes=2 * t.regions[0].nbytes)
            t = dataclasses.replace(t, num_blocks=2 * t.num_blocks, regions=(region,))
        tiers.append(t)
    forged = dataclasses.replace(md, tiers=tuple(tiers)).to_dict()
    grant = tampered(b.call("grant", tier="g2", ids=[0]), block_ids=np.array([b.spec.num_g2 + 1]))
    result = pull(a, grant, "g1", [0], metadata=forged)
    assert result["failed"] == [0] and kind_of(result["reason"]) is FailureKind.BAD_DESCRIPTORS
    assert "NotFound" in result["reason"]
    # The genuine metadata replaces the forged snapshot and pulls work again.
    b.call("fill", tier="g2", ids=[1], seed=18)
    assert pull(a, b.call("grant", tier="g2", ids=[1]), "g1", [0], metadata=b.metadata)["ok"]


def test_unknown_peer_without_side_channel(pair):
    a, b = pair
    grant = tampered(b.call("grant", tier="g2", ids=[0]), source="ghost/0", side_channel=None)
    result = pull(a, grant, "g1", [0])
    assert kind_of(result["reason"]) is FailureKind.UNKNOWN_PEER


def test_refused_side_channel(pair):
    a, b = pair
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    grant = tampered(b.call("grant", tier="g2", ids=[0]), source="ghost/1", side_channel=f"127.0.0.1:{port}")
    result = pull(a, grant, "g1", [0])
    assert kind_of(result["reason"]) is FailureKind.UNREACHABLE
    job = a.call("pull_hashes", address=f"127.0.0.1:{port}", hashes=make_hashes(1), tier="g1", ids=[0])
    assert kind_of(a.call("wait", job_ids=[job])[0]["reason"]) is FailureKind.UNREACHABLE


def test_garbage_nixl_metadata_fails_the_job(pair):
    a, b = pair
    md = dataclasses.replace(PeerMetadata.from_dict(b.metadata), agent="ghost/2", nixl=b"not nixl metadata")
    grant = tampered(b.call("grant", tier="g2", ids=[0]), source="ghost/2")
    result = pull(a, grant, "g1", [0], metadata=md.to_dict())
    assert not result["ok"] and kind_of(result["reason"]) is FailureKind.BAD_DESCRIPTORS


def test_grant_from_another_incarnation_is_stale(pair):
    a, b = pair
    grant = tampered(b.call("grant", tier="g2", ids=[0]), source="b/00000000")
    result = pull(a, grant, "g1", [0])  # the side channel now serves another incarnation
    assert kind_of(result["reason"]) is FailureKind.STALE_PEER


def test_hung_source_hits_the_deadline_then_the_late_grant_is_returned(pair):
    a, b = pair
    hashes = make_hashes(2, salt=3)
    b.call("index", tier="g2", ids=[5, 6], hashes=hashes)
    released = leases(b)["released"]
    os.kill(b.process.pid, signal.SIGSTOP)
    try:
        job = a.call("pull_hashes", address=b.address, hashes=hashes, tier="g1", ids=[0, 1], deadline_s=0.3)
        result = a.call("wait", job_ids=[job])[0]
    finally:
        os.kill(b.process.pid, signal.SIGCONT)
    assert result["failed"] == [0, 1] and kind_of(result["reason"]) is FailureKind.DEADLINE
    # b answers once resumed; a hands the grant straight back, so b does not wait for expiry.
    until(lambda: leases(b)["released"] > released, what="the late grant to be released")
    until(lambda: b.call("pinned") == 0, what="b to unpin")


def test_lease_expires_when_the_reader_never_reads(pair):
    a, b = pair
    before = leases(b)
    lease_id = BlockGrant.from_dict(b.call("grant", tier="g2", ids=[7, 8])).lease_id
    b.call("advance", seconds=LEASE_S + 1)
    until(lambda: [lease_id, "expired"] in b.call("unpins"), what="the lease to expire")
    after = leases(b)
    assert after["expired"] > before["expired"] and after["active"] == 0 and after["blocks_held"] == 0


def test_heartbeats_keep_a_held_lease_alive(pair):
    a, b = pair
    grant = b.call("grant", tier="g2", ids=[9])
    a.call("hold", grant=grant, metadata=b.metadata)
    for _ in range(3):  # 3 * 0.7 * lease_s: expired three times over without heartbeats
        beats = leases(b)["heartbeats"]
        b.call("advance", seconds=0.7 * LEASE_S)
        until(lambda beats=beats: leases(b)["heartbeats"] > beats, what="a heartbeat after the clock moved")
    assert leases(b)["active"] >= 1
    lease_id = BlockGrant.from_dict(grant).lease_id
    assert [lease_id, "expired"] not in b.call("unpins")
    a.call("drop", grant=grant)
    until(lambda: [lease_id, "released"] in b.call("unpins"), what="the dropped grant to be released")
