"""Transfer engine: runs jobs with handlers keyed by (source tier, destination tier).

Contract:
    submit(job) -> job id          # returns at once; the job runs later on the transfer thread
    poll() -> [JobResult, ...]     # every finished job exactly once, in completion order
    wait(job_ids)                  # block until those jobs are finished (then poll them)
    close()                        # finish queued jobs, stop the thread

Jobs run one at a time in submission order, so a job that reuses a slot another job reads
from (eviction followed by a store) is safe when submitted after it. A handler that raises
fails its whole job with the exception as the reason; the engine keeps running. A handler that
loses only some blocks (a disk error) reports them in ``HandlerOutcome.failed``.

Why one background thread: numpy releases the GIL while copying, so copies overlap with the
engine's own work, and one thread keeps jobs ordered and leaves the other cores to the engine
(two copy threads measured slower on 2 cores). ``threaded=False`` runs each job inside
``submit`` (deterministic tests, single-core hosts).
"""

from __future__ import annotations

import abc
import queue
import threading
import time
from collections.abc import Callable, Iterable, Mapping

import numpy as np

from kvbm.ids import JobId, Tier
from kvbm.process.threads import start_thread
from kvbm.transfer.jobs import HandlerOutcome, JobResult, TransferJob, failed_result


class TransferHandler(abc.ABC):
    """Moves the bytes of jobs for one (src, dst) pair."""

    def on_submit(self, job: TransferJob) -> None:  # noqa: B027 - optional hook
        """Called in the submitting thread before ``run`` (e.g. to record a CUDA event)."""

    @abc.abstractmethod
    def run(self, job: TransferJob) -> HandlerOutcome:
        """Copy the job's blocks; raise to fail the whole job (the message becomes the reason)."""


class TransferEngine:
    """Executes transfer jobs on one background thread (or inline when ``threaded=False``)."""

    def __init__(
        self,
        handlers: Mapping[tuple[Tier, Tier], TransferHandler],
        *,
        threaded: bool = True,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self._handlers = dict(handlers)
        self._clock = clock
        self._cond = threading.Condition()
        self._done: list[JobResult] = []
        self._unfinished: set[JobId] = set()
        self._closed = False
        self._queue: queue.SimpleQueue[tuple[TransferJob, float] | None] | None = None
        self._thread: threading.Thread | None = None
        if threaded:
            self._queue = queue.SimpleQueue()
            self._thread = start_thread(self._worker, "kvbm-transfer")

    def __enter__(self) -> TransferEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def in_flight(self) -> int:
        """Jobs submitted and not finished yet."""
        with self._cond:
            return len(self._unfinished)

    def submit(self, job: TransferJob) -> JobId:
        """Queue ``job``; returns its id.

        Raises:
            ValueError: no handler for (job.src, job.dst), the job id is still in flight, or
                the engine is closed.
        """
        handler = self._handlers.get((job.src, job.dst))
        if handler is None:
            raise ValueError(f"no transfer handler for {job.src.name} -> {job.dst.name}")
        with self._cond:
            if self._closed:
                raise ValueError("transfer engine is closed")
            if job.job_id in self._unfinished:
                raise ValueError(f"job {job.job_id} is already in flight")
            self._unfinished.add(job.job_id)
        start = self._clock()
        try:
            handler.on_submit(job)
        except Exception as exc:  # same rule as run(): the job fails, the caller learns why
            self._finish(self._failure(job, start, exc))
            return job.job_id
        if self._queue is None:
            self._finish(self._execute(job, start))
        else:
            self._queue.put((job, start))
        return job.job_id

    def poll(self) -> list[JobResult]:
        """Results of jobs finished since the last call, in completion order."""
        with self._cond:
            done, self._done = self._done, []
        return done

    def wait(self, job_ids: Iterable[JobId] | None = None) -> None:
        """Block until ``job_ids`` (default: every job submitted so far) have finished."""
        with self._cond:
            targets = set(self._unfinished) if job_ids is None else set(job_ids)
            self._cond.wait_for(lambda: not (targets & self._unfinished))

    def close(self) -> None:
        """Run the jobs already queued, then stop the thread. Idempotent."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
        if self._queue is not None and self._thread is not None:
            self._queue.put(None)
            self._thread.join()

    def _worker(self) -> None:
        assert self._queue is not None
        while (item := self._queue.get()) is not None:
            self._finish(self._execute(*item))

    def _execute(self, job: TransferJob, start: float) -> JobResult:
        try:
            outcome = self._handlers[(job.src, job.dst)].run(job)
        except Exception as exc:  # a failed job says why; the thread must survive it
            return self._failure(job, start, exc)
        corrupt = np.asarray(outcome.corrupt, dtype=np.int64)
        other = np.asarray(outcome.failed, dtype=np.int64)
        reasons = []
        if len(corrupt):
            reasons.append(f"checksum mismatch in {len(corrupt)} of {job.num_blocks} blocks")
        if len(other):
            reasons.append(f"{len(other)} of {job.num_blocks} blocks failed: {outcome.reason or 'unknown error'}")
        return JobResult(
            job_id=job.job_id,
            failed=np.union1d(corrupt, other) if len(other) else corrupt,
            corrupt=corrupt,
            checksums=outcome.checksums,
            reason="; ".join(reasons) or None,
            duration_s=self._clock() - start,
        )

    def _failure(self, job: TransferJob, start: float, exc: Exception) -> JobResult:
        return failed_result(job, f"{type(exc).__name__}: {exc}", self._clock() - start)

    def _finish(self, result: JobResult) -> None:
        with self._cond:
            self._done.append(result)
            self._unfinished.discard(result.job_id)
            self._cond.notify_all()
