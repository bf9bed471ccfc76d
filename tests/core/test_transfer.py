"""Transfer engine: job ids, polling, failure reasons, ordering, shutdown."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from kvbm.ids import BlockHash, JobId, Tier
from kvbm.transfer.engine import TransferEngine, TransferHandler
from kvbm.transfer.jobs import HandlerOutcome, TransferJob


def make_job(job_id: int, n: int = 2, src: Tier = Tier.G1, dst: Tier = Tier.G2) -> TransferJob:
    return TransferJob(
        JobId(job_id), src, dst, np.arange(n), np.arange(n), tuple(BlockHash(bytes([i]) * 16) for i in range(n))
    )


class Recorder(TransferHandler):
    def __init__(self, gate: threading.Event | None = None, fail_on: int | None = None) -> None:
        self.ran: list[int] = []
        self.gate = gate
        self.fail_on = fail_on

    def run(self, job: TransferJob) -> HandlerOutcome:
        if self.gate is not None:
            self.gate.wait()
        if job.job_id == self.fail_on:
            raise OSError("disk on fire")
        self.ran.append(job.job_id)
        return HandlerOutcome(checksums=np.zeros(job.num_blocks, dtype=np.uint64))


class FailingSubmit(Recorder):
    def on_submit(self, job: TransferJob) -> None:
        raise RuntimeError("no stream")


@pytest.mark.parametrize("threaded", [False, True])
def test_jobs_run_in_order_and_poll_once(threaded: bool) -> None:
    handler = Recorder()
    with TransferEngine({(Tier.G1, Tier.G2): handler}, threaded=threaded) as engine:
        ids = [engine.submit(make_job(i)) for i in (5, 3, 9)]
        assert ids == [5, 3, 9]
        engine.wait()
        results = engine.poll()
        assert [r.job_id for r in results] == [5, 3, 9] and all(r.ok for r in results)
        assert engine.poll() == [] and engine.in_flight == 0
    assert handler.ran == [5, 3, 9]


@pytest.mark.parametrize("threaded", [False, True])
def test_a_failing_handler_fails_its_job_only(threaded: bool) -> None:
    with TransferEngine({(Tier.G1, Tier.G2): Recorder(fail_on=2)}, threaded=threaded) as engine:
        for i in (1, 2, 3):
            engine.submit(make_job(i, n=3))
        engine.wait()
        by_id = {r.job_id: r for r in engine.poll()}
    assert by_id[1].ok and by_id[3].ok
    assert by_id[2].failed.tolist() == [0, 1, 2] and by_id[2].checksums is None
    assert by_id[2].reason == "OSError: disk on fire"


def test_a_failing_submit_hook_fails_the_job() -> None:
    with TransferEngine({(Tier.G1, Tier.G2): FailingSubmit()}) as engine:
        engine.submit(make_job(1))
        engine.wait([JobId(1)])
        [result] = engine.poll()
    assert result.reason == "RuntimeError: no stream" and not result.ok


def test_misuse_is_rejected() -> None:
    gate = threading.Event()
    engine = TransferEngine({(Tier.G1, Tier.G2): Recorder(gate=gate)})
    engine.submit(make_job(1))
    with pytest.raises(ValueError, match="already in flight"):
        engine.submit(make_job(1))
    with pytest.raises(ValueError, match="no transfer handler for G2 -> G1"):
        engine.submit(make_job(2, src=Tier.G2, dst=Tier.G1))
    assert engine.in_flight == 1
    gate.set()
    engine.close()  # runs the queued job first
    assert [r.job_id for r in engine.poll()] == [1]
    engine.close()
    with pytest.raises(ValueError, match="closed"):
        engine.submit(make_job(3))


def test_durations_come_from_the_injected_clock() -> None:
    ticks = iter([10.0, 10.25])
    with TransferEngine({(Tier.G1, Tier.G2): Recorder()}, threaded=False, clock=lambda: next(ticks)) as engine:
        engine.submit(make_job(1))
        [result] = engine.poll()
    assert result.duration_s == 0.25


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"dst": Tier.G1}, "itself"),
        ({"src_ids": np.arange(3)}, "3 src ids"),
        ({"dst_ids": np.zeros(2, dtype=np.float64)}, "integer"),
        ({"src_ids": np.zeros((2, 1), dtype=np.int64)}, "1-D"),
        ({"expected_checksums": np.zeros(1, dtype=np.uint64)}, "checksums"),
    ],
)
def test_job_validation(kwargs, match) -> None:
    fields = dict(
        job_id=JobId(1),
        src=Tier.G1,
        dst=Tier.G2,
        src_ids=np.arange(2),
        dst_ids=np.arange(2),
        hashes=(BlockHash(b"a" * 16), BlockHash(b"b" * 16)),
    )
    fields.update(kwargs)
    with pytest.raises(ValueError, match=match):
        TransferJob(**fields)  # type: ignore[arg-type]


def test_job_ids_become_int64() -> None:
    hashes = (BlockHash(b"a" * 16), BlockHash(b"b" * 16))
    job = TransferJob(JobId(1), Tier.G1, Tier.G2, [3, 4], np.array([1, 2], dtype=np.int32), hashes)  # type: ignore[arg-type]
    assert job.src_ids.dtype == np.int64 and job.dst_ids.dtype == np.int64 and job.num_blocks == 2
