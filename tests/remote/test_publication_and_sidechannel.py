"""Publication from stored/removed events, the router's view, and the TCP side channel."""

from __future__ import annotations

import socket
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvbm.ids import BlockHash, Tier
from kvbm.manager.events import BlockRemoved, BlockStored
from kvbm.remote import FailureKind, Publication, PublishedView, RemoteError
from kvbm.remote.sidechannel import SideChannelServer, request, split_address

from .conftest import make_hashes

H = [BlockHash(h) for h in make_hashes(8)]


def test_hash_stays_published_while_any_publishing_tier_holds_it():
    pub = Publication("w", (Tier.G1, Tier.G2))
    pub.apply([BlockStored(Tier.G1, (H[0], H[1])), BlockStored(Tier.G2, (H[0],)), BlockStored(Tier.G3, (H[2],))])
    assert H[0] in pub and H[1] in pub and H[2] not in pub and pub.version == 1
    pub.apply([BlockRemoved(Tier.G1, (H[0], H[1]))])
    assert H[0] in pub and H[1] not in pub and pub.version == 2
    assert pub.apply([BlockStored(Tier.G2, (H[0],))]) == 2  # no change, no new version


def test_view_follows_snapshots_and_deltas_and_refuses_gaps():
    pub = Publication("w", (Tier.G2,), history=2)
    view = PublishedView()
    assert not view.apply(pub.export(0) | {"kind": "delta", "since": 5})  # no base yet
    assert view.apply(pub.export(None)) and view.hashes == frozenset()
    pub.apply([BlockStored(Tier.G2, tuple(H[:3]))])
    pub.apply([BlockRemoved(Tier.G2, (H[1],))])
    delta = pub.export(view.version)
    assert delta["kind"] == "delta" and view.apply(delta)
    assert view.hashes == {H[0], H[2]} and view.version == pub.version
    stale = pub.export(0)
    for v in range(3):
        pub.apply([BlockStored(Tier.G2, (H[3 + v],))])
    assert pub.export(view.version)["kind"] == "snapshot"  # history of 2 no longer covers it
    assert not view.apply(stale | {"since": 99})
    assert view.apply(pub.export(view.version)) and view.hashes == {H[0], H[2], H[3], H[4], H[5]}


STEP = st.tuples(st.booleans(), st.sampled_from([Tier.G1, Tier.G2]), st.sets(st.integers(0, 7), max_size=4))


@settings(max_examples=60, deadline=None)
@given(st.lists(STEP, max_size=12))
def test_view_kept_by_deltas_equals_the_publication(steps):
    pub = Publication("w", (Tier.G1, Tier.G2), history=4)
    view = PublishedView()
    view.apply(pub.export(None))
    held: dict[BlockHash, set[Tier]] = {}
    for stored, tier, idx in steps:
        hashes = tuple(H[i] for i in sorted(idx))
        pub.apply([(BlockStored if stored else BlockRemoved)(tier, hashes)])
        for h in hashes:
            (held.setdefault(h, set()).add if stored else held.setdefault(h, set()).discard)(tier)
        msg = pub.export(view.version)
        assert view.apply(msg)
    assert view.hashes == {h for h, tiers in held.items() if tiers} == {h for h in H if h in pub}


@pytest.fixture
def server():
    calls = []

    def echo(req):
        calls.append(req)
        return {"echo": req["value"]}

    def boom(req):
        raise ValueError("bad request")

    srv = SideChannelServer("127.0.0.1", 0, {"echo": echo, "boom": boom}, timeout_s=2.0)
    yield srv, calls
    srv.close()


def test_side_channel_round_trip_and_error_replies(server):
    srv, calls = server
    assert request(srv.address, {"op": "echo", "value": [1, "x"]}, timeout_s=5.0)["echo"] == [1, "x"]
    with pytest.raises(RemoteError, match="bad request") as info:
        request(srv.address, {"op": "boom"}, timeout_s=5.0)
    assert info.value.kind is FailureKind.UNREACHABLE
    with pytest.raises(RemoteError, match="unknown op"):
        request(srv.address, {"op": "nope"}, timeout_s=5.0)


def test_side_channel_refused_and_silent_peers_fail_within_the_timeout():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        with pytest.raises(RemoteError) as info:
            request(f"127.0.0.1:{port}", {"op": "x"}, timeout_s=2.0)  # bound, not listening
        assert info.value.kind is FailureKind.UNREACHABLE
        s.listen(1)  # accepts the connection, never answers
        with pytest.raises(RemoteError, match="timed out"):
            request(f"127.0.0.1:{port}", {"op": "x"}, timeout_s=0.2)


def test_server_survives_garbage_and_half_sent_frames(server):
    srv, _ = server
    host, port = split_address(srv.address)
    with socket.create_connection((host, port), timeout=2) as s:
        s.sendall(b"\x00\x00\x00\x05{not}")  # malformed JSON
        assert s.recv(10) == b""  # the server closes without replying
    with socket.create_connection((host, port), timeout=2) as s:
        s.sendall(b"\x00\x00")  # half a header, then the client goes away
    results = []

    def ask():
        results.append(request(srv.address, {"op": "echo", "value": 1}, 5.0))

    threads = [threading.Thread(target=ask) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert [r["echo"] for r in results] == [1, 1, 1, 1]


def test_split_address_rejects_garbage():
    assert split_address("127.0.0.1:80") == ("127.0.0.1", 80)
    for bad in ("localhost", ":80", "h:x"):
        with pytest.raises(ValueError):
            split_address(bad)
