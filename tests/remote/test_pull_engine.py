"""The pull job state machine over a fake transport: deadlines, handle release, orphaned
grants and close, with an injected clock (no NIXL, no processes)."""

from __future__ import annotations

import concurrent.futures
import dataclasses

import numpy as np
import pytest

from kvbm.ids import Tier
from kvbm.layout import BlockLayout
from kvbm.remote import BlockGrant, FailureKind, PeerMetadata, RemoteError, host_tier, kind_of, notices
from kvbm.remote.metadata import AgentName, LeaseId
from kvbm.remote.pull import PullEngine
from kvbm.tiers.host import HostBuffer

from .peerproc import until
from helpers import FakeClock


@dataclasses.dataclass(eq=False)
class FakeRead:
    block_ids: np.ndarray
    local_ids: np.ndarray
    done: bool = False


class FakeTransport:
    """Stands in for NixlTransport: a 'peer' host buffer in this process, reads that finish
    when the test says so, releases that can be refused."""

    def __init__(self) -> None:
        self.name = AgentName("reader/1")
        self.local_buffer = HostBuffer(8, 64)
        self.mine = host_tier(self.local_buffer, BlockLayout((64,)))
        self.peer_buffer = HostBuffer(8, 64)
        self.peer_buffer.rows[:] = np.arange(8 * 64, dtype=np.uint8).reshape(8, 64)
        self.peer = host_tier(self.peer_buffer, BlockLayout((64,)))
        self.loaded: set[str] = set()
        self.reads: list[FakeRead] = []
        self.released: list[FakeRead] = []
        self.refuse_release = 0
        self.finish_reads = True
        self.fail_reads: RemoteError | None = None
        self.sent: list[tuple[str, bytes]] = []

    def local_tier(self, tier):
        if tier is not Tier.G2:
            raise KeyError(tier)
        return self.mine

    def has_peer(self, agent):
        return agent in self.loaded

    def load_peer(self, metadata):
        self.loaded.add(metadata.agent)

    def post_read(self, peer, tier, block_ids, local_tier, local_ids, notice=b""):
        read = FakeRead(np.asarray(block_ids), np.asarray(local_ids))
        self.reads.append(read)
        self.check(read)
        return read

    def check(self, read):
        if self.fail_reads is not None:
            raise self.fail_reads
        if self.finish_reads and not read.done:
            rows = self.peer_buffer.rows[read.block_ids]
            self.local_buffer.rows[read.local_ids] = rows
            read.done = True
        return read.done

    def release(self, read):
        if self.refuse_release:
            self.refuse_release -= 1
            return False
        self.released.append(read)
        return True

    def notify(self, peer, message):
        self.sent.append((peer, message))
        return True


@pytest.fixture
def setup():
    clock = FakeClock()
    transport = FakeTransport()
    buf = transport.local_buffer
    engine = PullEngine(
        transport,  # type: ignore[arg-type]
        clock=clock,
        deadline_s=2.0,
        heartbeat_s=1.0,
        side_channel_timeout_s=1.0,
        notice_interval_s=0.1,
    )
    yield engine, transport, clock, buf
    engine.close()


LEASE = LeaseId(5)


def grant_of(transport: FakeTransport, ids, lease: LeaseId = LEASE) -> BlockGrant:
    ids = np.asarray(ids)
    return BlockGrant(AgentName("src/1"), lease, Tier.G2, ids, transport.peer.checksums(ids))


METADATA = PeerMetadata(AgentName("src/1"), b"", ())


def test_pull_completes_inside_submit_and_is_reported_by_poll(setup):
    engine, transport, _, buf = setup
    job = engine.submit(grant_of(transport, [3, 1]), Tier.G2, [0, 7], metadata=METADATA)
    [result] = engine.poll()
    assert result.job_id == job and result.ok and result.reason is None
    np.testing.assert_array_equal(buf.rows[[0, 7]], transport.peer_buffer.rows[[3, 1]])
    assert transport.released == transport.reads and engine.in_flight == 0
    assert engine.poll() == []


def test_deadline_fails_the_job_and_releases_the_read(setup):
    engine, transport, clock, _ = setup
    transport.finish_reads = False
    job = engine.submit(grant_of(transport, [2]), Tier.G2, [4], metadata=METADATA)
    assert engine.poll() == []
    clock.now += 2.5
    [result] = engine.poll()
    assert result.job_id == job and result.failed.tolist() == [0] and kind_of(result.reason) is FailureKind.DEADLINE
    assert transport.released == transport.reads
    assert transport.sent == []  # DONE notices are batched ...
    clock.now += 0.2
    engine.poll()
    assert transport.sent == [(AgentName("src/1"), notices.done([LeaseId(5)]))]  # ... then sent


def polls_until_released(engine: PullEngine, transport: FakeTransport, polls: int) -> None:
    """Poll ``polls`` times while the release is refused: no result, the job still in flight."""
    for _ in range(polls):
        assert engine.poll() == []
        assert engine.in_flight == 1 and engine.counters().handles_retained == 1
        assert transport.released == []


def test_a_failed_read_whose_release_is_refused_reports_only_once_released(setup):
    engine, transport, _, _ = setup
    transport.finish_reads = False
    job = engine.submit(grant_of(transport, [1, 2]), Tier.G2, [1, 2], metadata=METADATA)
    transport.fail_reads = RemoteError(FailureKind.NIXL_ERROR, "read broke")  # posted, then broke
    transport.refuse_release = 4  # at the failure, then the same poll's retry, then two polls
    polls_until_released(engine, transport, 3)
    [result] = engine.poll()
    assert result.job_id == job and result.failed.tolist() == [0, 1]
    assert kind_of(result.reason) is FailureKind.NIXL_ERROR
    assert transport.released == transport.reads and engine.in_flight == 0
    assert engine.poll() == [] and engine.close() == []
    counters = engine.counters()
    assert (counters.jobs_failed, counters.blocks_failed, counters.failures) == (1, 2, {"nixl_error": 1})
    assert counters.handles_retained == 0


def test_a_deadline_whose_release_is_refused_reports_only_once_released(setup):
    engine, transport, clock, _ = setup
    transport.finish_reads = False
    transport.refuse_release = 3
    job = engine.submit(grant_of(transport, [2]), Tier.G2, [4], metadata=METADATA)
    assert engine.poll() == []
    clock.now += 3
    polls_until_released(engine, transport, 2)  # refused at the deadline, on its retry, then once more
    [result] = engine.poll()
    assert result.job_id == job and result.failed.tolist() == [0]
    assert kind_of(result.reason) is FailureKind.DEADLINE
    assert transport.released == transport.reads and engine.in_flight == 0
    assert engine.counters().jobs_failed == 1 and engine.poll() == []


def test_a_complete_read_whose_release_is_refused_reports_ok_once_released(setup):
    engine, transport, _, buf = setup
    transport.refuse_release = 2  # inside submit, then the first poll's retry
    job = engine.submit(grant_of(transport, [3]), Tier.G2, [0], metadata=METADATA)
    polls_until_released(engine, transport, 1)
    [result] = engine.poll()
    assert result.job_id == job and result.ok
    np.testing.assert_array_equal(buf.rows[0], transport.peer_buffer.rows[3])
    assert engine.counters().jobs_ok == 1 and engine.in_flight == 0


def test_close_returns_a_result_whose_release_is_still_refused(setup):
    engine, transport, clock, _ = setup
    transport.finish_reads = False
    transport.refuse_release = 100
    waiting = engine.submit(grant_of(transport, [2]), Tier.G2, [4], metadata=METADATA)
    clock.now += 3
    assert engine.poll() == []
    running = engine.submit(grant_of(transport, [1], LeaseId(6)), Tier.G2, [1], metadata=METADATA)
    results = engine.close()
    assert {r.job_id: kind_of(r.reason) for r in results} == {
        waiting: FailureKind.DEADLINE,
        running: FailureKind.CLOSED,
    }
    counters = engine.counters()
    assert counters.in_flight == 0 and counters.handles_retained == 2 and counters.jobs_failed == 2


def test_heartbeats_cover_running_jobs_and_held_grants(setup):
    engine, transport, clock, _ = setup
    transport.finish_reads = False
    transport.loaded.add("src/1")
    engine.submit(grant_of(transport, [1], LeaseId(8)), Tier.G2, [1], deadline_s=10.0)
    engine.hold(grant_of(transport, [2], LeaseId(9)))
    clock.now += 1.0
    engine.poll()
    assert (AgentName("src/1"), notices.heartbeat([LeaseId(8), LeaseId(9)])) in transport.sent
    engine.drop(grant_of(transport, [2], LeaseId(9)))
    clock.now += 0.2
    engine.poll()
    assert transport.sent[-1] == (AgentName("src/1"), notices.done([LeaseId(9)]))


def test_failed_read_fails_the_whole_job_and_skips_done_to_a_lost_peer(setup):
    engine, transport, _, _ = setup
    transport.fail_reads = RemoteError(FailureKind.PEER_LOST, "gone")
    engine.submit(grant_of(transport, [1, 2]), Tier.G2, [1, 2], metadata=METADATA)
    [result] = engine.poll()
    assert result.failed.tolist() == [0, 1] and kind_of(result.reason) is FailureKind.PEER_LOST
    assert not any(m.startswith(b"kvbm1 done") for _, m in transport.sent)
    assert engine.counters().failures == {"peer_lost": 1}


def test_orphaned_grant_is_handed_back_when_it_arrives(setup, monkeypatch):
    engine, transport, clock, _ = setup
    gate = concurrent.futures.Future()
    from kvbm.remote import exchange

    monkeypatch.setattr(exchange, "request_grant", lambda *a, **k: gate.result(timeout=10))
    job = engine.submit_hashes("127.0.0.1:1", [b"h" * 16], Tier.G2, [0])
    clock.now += 3
    [result] = engine.poll()
    assert result.job_id == job and kind_of(result.reason) is FailureKind.DEADLINE
    gate.set_result((grant_of(transport, [0], LeaseId(11)), METADATA))

    def handed_back():
        clock.now += 0.2
        return engine.poll() == [] and transport.sent

    until(handed_back, what="the late grant to be handed back", interval_s=0.001)
    assert transport.sent == [(AgentName("src/1"), notices.done([LeaseId(11)]))]


def test_misuse_raises_at_submit(setup):
    engine, transport, _, _ = setup
    with pytest.raises(ValueError):
        engine.submit(grant_of(transport, [1, 2]), Tier.G2, [0], metadata=METADATA)
    with pytest.raises(ValueError):
        engine.submit(grant_of(transport, [1]), Tier.G2, [8], metadata=METADATA)
    with pytest.raises(ValueError):
        engine.submit(grant_of(transport, [1]), Tier.G1, [0], metadata=METADATA)


def test_close_fails_running_jobs(setup):
    engine, transport, _, _ = setup
    transport.finish_reads = False
    job = engine.submit(grant_of(transport, [1]), Tier.G2, [1], metadata=METADATA)
    [result] = engine.close()
    assert result.job_id == job and kind_of(result.reason) is FailureKind.CLOSED
