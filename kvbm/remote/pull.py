"""Pull jobs: read leased blocks from a peer into this worker's blocks, verify, report.

Contract (owner thread only, like the core's :class:`~kvbm.transfer.engine.TransferEngine`):

    submit(grant, local_tier, local_ids, metadata=None) -> JobId     # blocks named by the source
    submit_hashes(address, hashes, local_tier, local_ids) -> JobId    # blocks named by hash
    poll() -> [JobResult, ...]      # every job ends exactly once: ok, or failed with a reason
                                    # (only once NIXL has released its read)
    hold(grant) / drop(grant)       # keep a grant's lease alive before pulling / give it up
    close() -> [JobResult, ...]     # fails what still runs; every result not yet returned

A job moves through RESOLVING (side-channel request on a helper thread: the source's
metadata, or a grant by hash), READY (peer loaded) and READING (one NIXL read for all its
blocks). Its deadline covers all three; past it the job fails (``deadline: ...``) and its
NIXL request is released. A job's result comes out only once its NIXL request is released:
when NIXL refuses (the read may still be writing the destination blocks), the job stays in
flight with its result held back, each ``poll`` retries the release, and the result (ok, or
failed with its original reason) comes out of the poll where the release succeeds. ``close``
still ends every job: a result whose request NIXL still refuses to release is returned
anyway, there being no later poll to wait for.

Block ``i`` of a job is ``local_ids[i]``; ``JobResult.failed`` lists positions that did not
arrive intact: all of them when the job failed as a whole, the tail a peer did not hold
(``not_held``), blocks whose bytes differ from the checksum the source published
(``checksum``; also in ``JobResult.corrupt``). Failed blocks hold undefined bytes: the caller
recomputes them.

Every job ends its lease with a DONE notice to the source, ok or failed (except when the
source is lost), batched per source by :class:`~kvbm.remote.keepalive.LeaseKeeper`, which
also heartbeats the leases of jobs still running and of held grants. Notices never ride on
the NIXL read: a read carrying one completes only when the source next polls.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import enum
import itertools
import threading
from collections.abc import Callable, Sequence

import numpy as np

from kvbm.ids import BlockHash, JobId, Tier
from kvbm.process.threads import thread_pool
from kvbm.remote import exchange
from kvbm.remote.agent import NixlTransport, ReadHandle
from kvbm.remote.failures import FailureKind, RemoteError
from kvbm.remote.keepalive import LeaseKeeper
from kvbm.remote.metadata import BlockGrant, PeerMetadata
from kvbm.transfer.jobs import JobResult

_NONE = np.zeros(0, dtype=np.int64)


class _Phase(enum.Enum):
    RESOLVING = "resolving"
    READY = "ready"
    READING = "reading"


@dataclasses.dataclass(eq=False)
class _Job:
    job_id: JobId
    local_tier: Tier
    local_ids: np.ndarray
    started: float
    deadline: float
    phase: _Phase
    grant: BlockGrant | None = None
    future: concurrent.futures.Future | None = None
    handle: ReadHandle | None = None


@dataclasses.dataclass(frozen=True)
class _Retained:
    """A job that ended while NIXL refused to release its read: ``result`` waits for it."""

    handle: ReadHandle
    result: JobResult


@dataclasses.dataclass(frozen=True)
class PullCounters:
    jobs_ok: int
    jobs_failed: int
    blocks_pulled: int
    bytes_pulled: int
    blocks_failed: int
    checksum_failures: int
    failures: dict[str, int]
    heartbeats_sent: int
    handles_retained: int  # NIXL requests that refused release (their jobs wait; after close: abandoned)
    in_flight: int  # jobs whose result is still to come, those waiting for a release included
    releases: int = 0  # holds given up without reading (the blocks were here already)
    releases_failed: int = 0


class PullEngine:
    """Runs pull jobs over one :class:`NixlTransport` (see the module docstring)."""

    def __init__(
        self,
        transport: NixlTransport,
        *,
        clock: Callable[[], float],
        deadline_s: float,
        heartbeat_s: float,
        side_channel_timeout_s: float,
        notice_interval_s: float = 0.05,
        verify: bool = True,
        job_ids: Callable[[], int] | None = None,
    ) -> None:
        self._transport = transport
        self._clock = clock
        self._deadline_s = deadline_s
        self._timeout_s = side_channel_timeout_s
        self._verify = verify
        self._job_ids = job_ids or itertools.count(1).__next__
        self._jobs: dict[JobId, _Job] = {}
        self._keeper = LeaseKeeper(
            heartbeat_s=heartbeat_s, notice_interval_s=notice_interval_s, clock=clock, send=transport.notify
        )
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._orphans: list[concurrent.futures.Future] = []  # grants resolved after their job died
        self._retained: list[_Retained] = []  # ended jobs whose NIXL request refused release
        # Requests still refused at close, kept referenced so no in-flight request is freed.
        self._abandoned: list[ReadHandle] = []
        self._counts = dict.fromkeys(
            ("ok", "failed", "blocks", "bytes", "blocks_failed", "corrupt", "releases", "releases_failed"), 0
        )
        self._release_lock = threading.Lock()
        self._failures: dict[str, int] = {}
        self._finished: list[JobResult] = []  # ended inside submit, returned by the next poll

    @property
    def in_flight(self) -> int:
        """Jobs whose result is still to come, those waiting for a release included."""
        return len(self._jobs) + len(self._retained)

    def submit(
        self,
        grant: BlockGrant,
        local_tier: Tier,
        local_ids: Sequence[int] | np.ndarray,
        *,
        metadata: PeerMetadata | None = None,
        deadline_s: float | None = None,
    ) -> JobId:
        """Pull ``grant``'s blocks into ``local_ids`` of ``local_tier``.

        ``metadata`` (the source's, e.g. carried in the request) spares a side-channel trip;
        without it the source's metadata is fetched from ``grant.side_channel`` unless loaded.

        Raises:
            ValueError: ``local_ids`` is not one id per granted block, or ``local_tier`` is not
                registered here.
        """
        job = self._new_job(local_tier, local_ids, len(grant), deadline_s)
        job.grant = grant
        self._keeper.hold(grant.source, grant.lease_id)
        if metadata is not None and metadata.agent != grant.source:
            return self._fail_now(
                job, RemoteError(FailureKind.STALE_PEER, f"grant from {grant.source}, metadata of {metadata.agent}")
            )
        if metadata is not None:  # a no-op when this snapshot is loaded already
            try:
                self._transport.load_peer(metadata)
            except RemoteError as exc:
                return self._fail_now(job, exc)
            job.phase = _Phase.READY
        elif self._transport.has_peer(grant.source):
            job.phase = _Phase.READY
        elif grant.side_channel:
            job.future = self._executor().submit(exchange.fetch_metadata, grant.side_channel, self._timeout_s)
        else:
            return self._fail_now(
                job, RemoteError(FailureKind.UNKNOWN_PEER, f"no metadata for {grant.source} and no side channel")
            )
        # On one host the read is a synchronous CMA copy: it often completes right here.
        result = self._advance(job)
        if result is not None:
            self._finished.append(result)
        return job.job_id

    def submit_hashes(
        self,
        address: str,
        hashes: Sequence[BlockHash],
        local_tier: Tier,
        local_ids: Sequence[int] | np.ndarray,
        *,
        deadline_s: float | None = None,
    ) -> JobId:
        """Ask the worker at ``address`` for ``hashes`` and pull what it grants into
        ``local_ids`` (block i of the hashes into ``local_ids[i]``).

        Raises:
            ValueError: one local id per hash is needed, or ``local_tier`` is not registered.
        """
        job = self._new_job(local_tier, local_ids, len(hashes), deadline_s)
        job.future = self._executor().submit(
            exchange.request_grant, address, self._transport.name, tuple(hashes), self._timeout_s
        )
        return job.job_id

    def hold(self, grant: BlockGrant, metadata: PeerMetadata | None = None) -> None:
        """Keep ``grant``'s lease alive (heartbeats) until it is pulled or dropped.

        Raises:
            RemoteError: ``metadata`` could not be loaded.
        """
        if metadata is not None:
            self._transport.load_peer(metadata)
        self._keeper.hold(grant.source, grant.lease_id)

    def drop(self, grant: BlockGrant) -> None:
        """Give up a held grant: the source is told (batched) it may free the blocks."""
        self._keeper.release(grant.source, grant.lease_id)

    def release(
        self, address: str, hashes: Sequence[BlockHash], lease_id: int | None = None, agent: str | None = None
    ) -> None:
        """Send a ``release`` to ``address`` from a background thread; a failure is counted
        (the source frees the blocks at the end of its hold anyway)."""
        future = self._executor().submit(
            exchange.request_release, address, tuple(hashes), self._timeout_s, lease_id, agent
        )
        future.add_done_callback(self._count_release)

    def release_grant(self, grant: BlockGrant) -> None:
        """Give up a grant handed over in a request without reading it: a DONE notice when the
        source's metadata is loaded (batched, no connection), else a ``release`` of its lease
        over the source's side channel. A :meth:`hold` of it ends here too."""
        self._keeper.release(grant.source, grant.lease_id, notify=False)
        if self._transport.has_peer(grant.source):
            self._keeper.queue_done(grant.source, grant.lease_id)
            with self._release_lock:
                self._counts["releases"] += 1
        elif grant.side_channel and grant.hashes:
            self.release(grant.side_channel, grant.hashes[-1:], grant.lease_id, grant.source)
        else:
            with self._release_lock:  # nowhere to say it: the lease expires on the source
                self._counts["releases_failed"] += 1

    def _count_release(self, future: concurrent.futures.Future) -> None:
        with self._release_lock:  # callbacks run on the pool's threads
            self._counts["releases_failed" if future.exception() is not None else "releases"] += 1

    def poll(self) -> list[JobResult]:
        """Advance every job; return those that finished, each exactly once."""
        finished, self._finished = self._finished, []
        for job in list(self._jobs.values()):
            result = self._advance(job)
            if result is not None:
                finished.append(result)
        self._keeper.tick()
        self._settle_orphans()
        return finished + self._retry_retained()

    def counters(self) -> PullCounters:
        c = self._counts
        return PullCounters(
            jobs_ok=c["ok"],
            jobs_failed=c["failed"],
            blocks_pulled=c["blocks"],
            bytes_pulled=c["bytes"],
            blocks_failed=c["blocks_failed"],
            checksum_failures=c["corrupt"],
            failures=dict(self._failures),
            heartbeats_sent=self._keeper.heartbeats_sent,
            handles_retained=len(self._retained) + len(self._abandoned),
            in_flight=self.in_flight,
            releases=c["releases"],
            releases_failed=c["releases_failed"],
        )

    def close(self) -> list[JobResult]:
        """Fail every running job (``closed``), release its NIXL request and return every
        result still to come, those of jobs waiting for a release included."""
        error = RemoteError(FailureKind.CLOSED, "pull engine closed")
        results, self._finished = self._finished, []
        for job in list(self._jobs.values()):
            result = self._retain(job, self._finish(job, error))
            if result is not None:
                results.append(result)
        results += self._retry_retained()
        # NIXL still refuses these: with no poll to come there is nothing left to wait for, so
        # their results go out now (the engine is shutting down) and the requests stay referenced.
        self._abandoned += [r.handle for r in self._retained]
        results += [r.result for r in self._retained]
        self._retained = []
        self._keeper.flush()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        return results

    # -- job state machine -------------------------------------------------------------

    def _new_job(
        self, local_tier: Tier, local_ids: Sequence[int] | np.ndarray, n: int, deadline_s: float | None
    ) -> _Job:
        ids = np.asarray(local_ids, dtype=np.int64).reshape(-1)
        if len(ids) != n:
            raise ValueError(f"{len(ids)} local ids for {n} blocks")
        try:
            local = self._transport.local_tier(local_tier)
        except KeyError:
            raise ValueError(f"{local_tier.name} is not registered with this worker's agent") from None
        if len(ids) and (int(ids.min()) < 0 or int(ids.max()) >= local.num_blocks):
            raise ValueError(f"local block id out of range [0, {local.num_blocks})")
        now = self._clock()
        limit = self._deadline_s if deadline_s is None else deadline_s
        job = _Job(JobId(self._job_ids()), local_tier, ids, now, now + limit, _Phase.RESOLVING)
        self._jobs[job.job_id] = job
        return job

    def _advance(self, job: _Job) -> JobResult | None:
        """Step ``job``; its result once it ended and its NIXL request is released."""
        result = self._step(job)
        return None if result is None else self._retain(job, result)

    def _retain(self, job: _Job, result: JobResult) -> JobResult | None:
        """Release the ended ``job``'s NIXL request and return ``result``; when NIXL refuses,
        hold ``result`` back until :meth:`_retry_retained` releases it (a late write could
        still land in the blocks the caller would hand back for reuse)."""
        handle, job.handle = job.handle, None
        if handle is None or self._transport.release(handle):
            return result
        self._retained.append(_Retained(handle, result))
        return None

    def _step(self, job: _Job) -> JobResult | None:
        try:
            if job.phase is _Phase.RESOLVING:
                self._resolve(job)
            if job.phase is _Phase.READY:
                self._post(job)
            if job.phase is _Phase.READING and (job.handle is None or self._transport.check(job.handle)):
                return self._complete(job)
        except RemoteError as exc:
            return self._finish(job, exc)
        if self._clock() > job.deadline:
            waited = self._clock() - job.started
            return self._finish(job, RemoteError(FailureKind.DEADLINE, f"still {job.phase.value} after {waited:.3f}s"))
        return None

    def _resolve(self, job: _Job) -> None:
        assert job.future is not None
        if not job.future.done():
            return
        reply = job.future.result()  # RemoteError propagates to _advance
        job.future = None
        if isinstance(reply, PeerMetadata):  # the grant came with the request
            assert job.grant is not None
            if reply.agent != job.grant.source:
                raise RemoteError(FailureKind.STALE_PEER, f"grant from {job.grant.source}, peer now runs {reply.agent}")
            self._transport.load_peer(reply)
        else:
            grant, metadata = reply
            if grant is None or not len(grant):
                n = len(job.local_ids)
                raise RemoteError(FailureKind.NOT_HELD, f"{metadata.agent} holds none of the {n} blocks")
            job.grant = grant
            self._keeper.hold(grant.source, grant.lease_id)
            self._transport.load_peer(metadata)
        job.phase = _Phase.READY

    def _post(self, job: _Job) -> None:
        grant = job.grant
        assert grant is not None
        if not len(grant):
            job.handle = None
            job.phase = _Phase.READING
            return
        job.handle = self._transport.post_read(
            grant.source, grant.tier, grant.block_ids, job.local_tier, job.local_ids[: len(grant)]
        )
        job.phase = _Phase.READING

    def _complete(self, job: _Job) -> JobResult:
        grant = job.grant
        assert grant is not None
        n, k = len(job.local_ids), len(grant)
        checksums = None
        corrupt = _NONE
        if self._verify and k:
            checksums = self._transport.local_tier(job.local_tier).checksums(job.local_ids[:k])
            corrupt = np.flatnonzero(checksums != grant.checksums).astype(np.int64)
        failed = np.concatenate([corrupt, np.arange(k, n, dtype=np.int64)])
        reasons = []
        if len(corrupt):
            reasons.append(
                f"{FailureKind.CHECKSUM.value}: {len(corrupt)} of {k} blocks differ from {grant.source}'s checksums"
            )
            self._count_failure(FailureKind.CHECKSUM)
        if k < n:
            reasons.append(f"{FailureKind.NOT_HELD.value}: {grant.source} granted {k} of {n} blocks")
            self._count_failure(FailureKind.NOT_HELD)
        self._end_lease(job, notify=True)
        del self._jobs[job.job_id]
        good = k - len(corrupt)
        self._counts["ok" if not len(failed) else "failed"] += 1
        self._counts["blocks"] += good
        self._counts["bytes"] += good * self._transport.local_tier(job.local_tier).regions.block_bytes
        self._counts["blocks_failed"] += len(failed)
        self._counts["corrupt"] += len(corrupt)
        reason = "; ".join(reasons) or None
        return JobResult(job.job_id, failed, corrupt, checksums, reason, self._clock() - job.started)

    def _finish(self, job: _Job, error: RemoteError) -> JobResult:
        """End ``job`` as failed as a whole (its NIXL request is left to :meth:`_retain`)."""
        if job.future is not None:
            self._orphans.append(job.future)
            job.future = None
        self._end_lease(job, notify=error.kind is not FailureKind.PEER_LOST)
        self._jobs.pop(job.job_id, None)
        self._count_failure(error.kind)
        self._counts["failed"] += 1
        self._counts["blocks_failed"] += len(job.local_ids)
        failed = np.arange(len(job.local_ids), dtype=np.int64)
        return JobResult(job.job_id, failed, _NONE, None, str(error), self._clock() - job.started)

    def _fail_now(self, job: _Job, error: RemoteError) -> JobId:
        assert job.handle is None  # no read was posted: nothing to release
        self._finished.append(self._finish(job, error))
        return job.job_id

    def _end_lease(self, job: _Job, *, notify: bool) -> None:
        grant = job.grant
        if grant is None:
            return
        self._keeper.release(grant.source, grant.lease_id, notify=notify)

    def _count_failure(self, kind: FailureKind) -> None:
        self._failures[kind.value] = self._failures.get(kind.value, 0) + 1

    def _settle_orphans(self) -> None:
        """A grant that arrived after its job failed is handed back at once."""
        still = []
        for future in self._orphans:
            if not future.done():
                still.append(future)
                continue
            try:
                reply = future.result()
            except RemoteError:
                continue
            if isinstance(reply, tuple) and reply[0] is not None:
                grant, metadata = reply
                try:
                    self._transport.load_peer(metadata)
                except RemoteError:
                    continue  # the lease will expire on the source
                self._keeper.queue_done(grant.source, grant.lease_id)
        self._orphans = still

    def _retry_retained(self) -> list[JobResult]:
        """Retry every refused release; return the results of the jobs now released."""
        released: list[_Retained] = []
        still: list[_Retained] = []
        for retained in self._retained:
            (released if self._transport.release(retained.handle) else still).append(retained)
        self._retained = still
        return [r.result for r in released]

    def _executor(self) -> concurrent.futures.ThreadPoolExecutor:
        if self._pool is None:
            self._pool = thread_pool(2, "kvbm-pull-resolve")
        return self._pool
