"""Requests that no worker can take yet wait here, a bounded while, instead of failing at once.

Contract:
    * :meth:`AdmissionQueue.wait` returns at once while the pool has a candidate in the
      wanted roles. Otherwise (none healthy, all draining, the pool momentarily empty) the
      request waits until one becomes a candidate, then returns; waiters are woken in the
      order they came.
    * At most ``size`` requests wait. One more is refused at once, and a request that waited
      ``timeout_s`` gives up: both raise a 503 :class:`RequestError` in OpenAI's format that
      says why (``queue_full`` with the size; ``no_worker`` with the wait, the roles and what
      the workers in them are doing).
    * The pool tells the queue when a worker becomes a candidate (:meth:`WorkerPool.on_candidate`:
      added, started, back in rotation); waiters then check again. Nothing polls.
    * A waiting request whose client went away (its task is cancelled) leaves the queue.
    * Counts go to :class:`RouterStats`: ``queued`` (requests that had to wait),
      ``queue_rejections``, ``queue_timeouts`` and the ``queue_depth`` gauge.

Like the pool, the queue belongs to one event loop: call everything from it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection

from kvbm.serving.router_stats import ErrorKind, RouterStats
from kvbm.serving.router_validation import RequestError
from kvbm.serving.workers import Worker, WorkerPool, WorkerRole, WorkerState


class AdmissionQueue:
    """Bounded waiting room for requests that no worker can take yet.

    Args:
        pool: the worker registry (the queue subscribes to its candidates).
        stats: where the queue's counters go.
        size: most requests waiting at once; 0 refuses every request that would wait.
        timeout_s: longest a request waits.
    """

    def __init__(self, pool: WorkerPool, stats: RouterStats, size: int, timeout_s: float) -> None:
        self._pool = pool
        self._stats = stats
        self._size = size
        self._timeout_s = timeout_s
        self._waiting = 0
        self._wakeups: dict[asyncio.Future, None] = {}  # insertion order: who came first
        pool.on_candidate(self._worker_available)

    @property
    def depth(self) -> int:
        """Requests waiting now."""
        return self._waiting

    async def wait(self, roles: Collection[WorkerRole]) -> None:
        """Returns once a worker in ``roles`` can take a request (at once if one can).

        Raises:
            RequestError: 503, the queue is full or the wait timed out.
        """
        if self._pool.candidates(roles):
            return
        if self._waiting >= self._size:
            raise self._refused(roles)
        self._stats.queued += 1
        self._entered(+1)
        try:
            async with asyncio.timeout(self._timeout_s):
                while not self._pool.candidates(roles):
                    await self._next_candidate()
        except TimeoutError:
            self._stats.queue_timeouts += 1
            self._stats.count_error(ErrorKind.NO_WORKER)
            raise RequestError(
                503,
                f"waited {self._timeout_s:g} s for a healthy "
                f"{_role_names(roles)} worker; none came ({self._states(roles)})",
                "no_worker",
                type_="service_unavailable",
            ) from None
        finally:
            self._entered(-1)

    def _refused(self, roles: Collection[WorkerRole]) -> RequestError:
        self._stats.queue_rejections += 1
        self._stats.count_error(ErrorKind.NO_WORKER)
        nobody = f"no {_role_names(roles)} worker can take this request ({self._states(roles)})"
        if self._size == 0:
            return RequestError(
                503,
                f"{nobody}, and this router lets no request wait (queue_size 0)",
                "no_worker",
                type_="service_unavailable",
            )
        return RequestError(
            503,
            f"{nobody}, and the admission queue is full ({self._size} waiting); retry later",
            "queue_full",
            type_="service_unavailable",
        )

    def _entered(self, change: int) -> None:
        self._waiting += change
        self._stats.queue_depth = self._waiting

    async def _next_candidate(self) -> None:
        wakeup = asyncio.get_running_loop().create_future()
        self._wakeups[wakeup] = None
        try:
            await wakeup
        finally:  # timed out or cancelled: nobody needs to wake it any more
            self._wakeups.pop(wakeup, None)

    def _worker_available(self, worker: Worker) -> None:
        # Wake everyone: each waiter checks its own roles, in the order it came.
        wakeups, self._wakeups = self._wakeups, {}
        for wakeup in wakeups:
            if not wakeup.done():
                wakeup.set_result(None)

    def _states(self, roles: Collection[WorkerRole]) -> str:
        """Why no worker in ``roles`` can take a request, worker by worker."""
        workers = [w for w in self._pool.all() if w.role in roles]
        if not workers:
            return "none registered"
        return ", ".join(
            f"{w.id} {w.state.value}" if w.state is not WorkerState.ACTIVE else f"{w.id} out of rotation"
            for w in workers
        )


def _role_names(roles: Collection[WorkerRole]) -> str:
    return " or ".join(role.value for role in WorkerRole if role in roles)
