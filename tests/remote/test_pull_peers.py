"""Three real worker processes: pulls among them, a source killed mid-transfer, a reader
killed mid-transfer, and a source that restarts with new metadata."""

from __future__ import annotations

import numpy as np
import pytest

from kvbm.remote import FailureKind, kind_of

from .peerproc import PeerSpec, close_peers, start_peers, until

BIG = (512 << 10, 512 << 10)  # 1 MiB blocks: a 64-block pull takes milliseconds to copy


def dones(source) -> int:
    """DONE notices the source has heard: each finished pull sends one."""
    return source.call("stats")["leases"]["done_notices"]


def pull_and_wait(reader, grant, tier, ids, metadata=None):
    job = reader.call("pull", grant=grant, tier=tier, ids=ids, metadata=metadata)
    return reader.call("wait", job_ids=[job])[0]


@pytest.fixture(scope="module")
def trio():
    peers = start_peers(PeerSpec("a"), PeerSpec("b"), PeerSpec("c", manual_clock=True))
    yield peers
    codes = close_peers(*peers)
    assert codes == [0, 0, 0], f"workers exited with {codes}"


def test_three_workers_pull_from_each_other(trio):
    a, b, c = trio
    a.call("fill", tier="g2", ids=[0, 1, 2], seed=1)
    b.call("fill", tier="g1", ids=[5, 6], seed=2)
    from_a = a.call("grant", tier="g2", ids=[0, 1, 2])
    from_b = b.call("grant", tier="g1", ids=[5, 6])
    # c pulls from a and b at once (two jobs in flight), then a pulls what c got from b.
    jobs = [
        c.call("pull", grant=from_a, tier="g1", ids=[0, 1, 2], metadata=a.metadata),
        c.call("pull", grant=from_b, tier="g2", ids=[10, 11], metadata=b.metadata),
    ]
    assert all(r["ok"] for r in c.call("wait", job_ids=jobs)), "c's pulls"
    from_c = c.call("grant", tier="g2", ids=[10, 11])
    assert pull_and_wait(a, from_c, "g1", [14, 15], metadata=c.metadata)["ok"]
    np.testing.assert_array_equal(c.call("read", tier="g1", ids=[0, 1, 2]), a.call("read", tier="g2", ids=[0, 1, 2]))
    np.testing.assert_array_equal(c.call("read", tier="g2", ids=[10, 11]), b.call("read", tier="g1", ids=[5, 6]))
    np.testing.assert_array_equal(a.call("read", tier="g1", ids=[14, 15]), b.call("read", tier="g1", ids=[5, 6]))


def test_grant_for_two_readers_is_released_after_both(trio):
    a, b, c = trio
    a.call("fill", tier="g2", ids=[7], seed=3)
    grant = a.call("grant", tier="g2", ids=[7], readers=2)
    before = a.call("stats")["leases"]["released"]
    assert pull_and_wait(b, grant, "g1", [0], metadata=a.metadata)["ok"]
    assert pull_and_wait(c, grant, "g1", [3], metadata=a.metadata)["ok"]
    until(lambda: a.call("stats")["leases"]["released"] == before + 1, what="the lease to end after two readers")
    np.testing.assert_array_equal(b.call("read", tier="g1", ids=[0]), c.call("read", tier="g1", ids=[3]))


def test_source_killed_mid_transfer():
    reader, source = start_peers(
        PeerSpec("reader", num_g1=64, num_g2=4, layer_bytes=BIG, pull_deadline_s=5.0),
        PeerSpec("source", num_g1=4, num_g2=64, layer_bytes=BIG),
    )
    try:
        ids = list(range(64))
        source.call("fill", tier="g2", ids=ids, seed=4)
        grant = source.call("grant", tier="g2", ids=ids, readers=1 << 30)
        # Three good pulls, then the source is SIGKILLed 5 ms into the fourth 64 MiB read.
        pid = source.call("pid")
        results = reader.call(
            "pull_loop",
            grant=grant,
            tier="g1",
            ids=ids,
            count=20,
            metadata=source.metadata,
            kill=(3, pid, 0.005),
            timeout_s=60,
        )
        # How many blocks of the failed read hold the source's bytes: strictly between 0 and 64
        # when the kill tore the read (measured: 13, 22, 27, 38 in four runs). Timing on a busy
        # host may move the kill outside the read, so the count is reported, not asserted; the
        # job is failed as a whole either way.
        torn = reader.call("read", tier="g1", ids=ids)
        expect = np.random.default_rng(4).integers(0, 256, torn.shape, dtype=np.uint8)
        arrived = int((torn == expect).all(axis=1).sum())
        ok = [r for r in results if r["ok"]]
        failed = [r for r in results if not r["ok"]]
        assert ok, "some pulls finished before the kill"
        assert len(failed) == 3, f"the loop stops after three failures ({arrived} blocks of the torn read arrived)"
        assert {kind_of(r["reason"]) for r in failed} <= {FailureKind.PEER_LOST, FailureKind.DEADLINE}
        assert all(r["failed"] == ids for r in failed)
        # Everything reported ok was verified against the source's checksums.
        assert reader.call("stats")["pulls"]["checksum_failures"] == 0
    finally:
        source.kill()
        code = reader.close()
    assert code == 0, "the reader shuts down cleanly after losing its peer"


def test_reader_killed_mid_transfer_lease_expires_and_source_serves_on(trio):
    a, b, c = trio  # c is the source here: its clock can be advanced
    ids = list(range(8))
    c.call("fill", tier="g1", ids=ids, seed=5)
    (reader,) = start_peers(PeerSpec("doomed", num_g1=16))
    grant = c.call("grant", tier="g1", ids=ids, readers=1 << 30)
    lease_id = grant["lease_id"]
    # The reader SIGKILLs itself 1 ms into its fourth pull.
    reader.send(
        "pull_loop",
        grant=grant,
        tier="g1",
        ids=ids,
        count=100,
        metadata=c.metadata,
        kill=(3, reader.process.pid, 0.001),
    )
    reader.process.join(30)
    assert reader.process.exitcode == -9
    reader.close()
    c.call("advance", seconds=c.spec.lease_s + 1)
    until(lambda: [lease_id, "expired"] in c.call("unpins"), what="the dead reader's lease to expire")
    # The source is unharmed: another reader pulls from it.
    grant = c.call("grant", tier="g1", ids=[0, 1])
    assert pull_and_wait(a, grant, "g2", [20, 21], metadata=c.metadata)["ok"]
    np.testing.assert_array_equal(a.call("read", tier="g2", ids=[20, 21]), c.call("read", tier="g1", ids=[0, 1]))


def test_source_restarts_with_new_metadata(trio):
    a, _, _ = trio
    (old,) = start_peers(PeerSpec("phoenix"))
    old.call("fill", tier="g2", ids=[0, 1], seed=6)
    old_grant = old.call("grant", tier="g2", ids=[0, 1])
    assert pull_and_wait(a, old_grant, "g1", [0, 1], metadata=old.metadata)["ok"]
    old.kill()
    (new,) = start_peers(PeerSpec("phoenix"))
    try:
        assert new.agent != old.agent and new.agent.startswith("phoenix/")
        # The old grant names a dead incarnation: the pull fails, it never reads the new process.
        result = pull_and_wait(a, old_grant, "g1", [0, 1])
        assert kind_of(result["reason"]) in {FailureKind.PEER_LOST, FailureKind.UNREACHABLE}
        # New metadata replaces the old incarnation; pulls work again with the new bytes.
        new.call("fill", tier="g2", ids=[0, 1], seed=7)
        grant = new.call("grant", tier="g2", ids=[0, 1])
        assert pull_and_wait(a, grant, "g1", [2, 3], metadata=new.metadata)["ok"]
        np.testing.assert_array_equal(a.call("read", tier="g1", ids=[2, 3]), new.call("read", tier="g2", ids=[0, 1]))
        # And a grant carrying only the side channel finds the new incarnation by itself.
        grant = new.call("grant", tier="g2", ids=[1])
        assert pull_and_wait(a, grant, "g1", [4])["ok"]
    finally:
        assert new.close() == 0
