"""The router's worker registry: who serves, in which role, how loaded, how healthy.

Contract:
    * :meth:`WorkerPool.add` registers an already-running worker (ACTIVE, presumed healthy:
      the caller started it and waited for it). :meth:`WorkerPool.launch` has a
      :data:`Launcher` start one: it is STARTING (no requests) until :meth:`WorkerPool.started`
      makes it ACTIVE, or :meth:`WorkerPool.failed` records why it did not come up. Ids are
      ``w1``, ``w2``, ... per pool; a launched worker knows its id before it starts.
    * Every request a worker takes is bracketed by :meth:`WorkerPool.acquire` and
      :meth:`WorkerPool.release` (also on failure), so ``in_flight`` is exact.
    * :meth:`WorkerPool.drain` stops new requests to a worker at once; it becomes DRAINED
      when its last in-flight request is released (a STARTING one at once). A launched
      worker's process is stopped only after that (:meth:`WorkerPool.stopped`). A worker is
      removed only when DRAINED, STOPPED or FAILED.
    * :meth:`WorkerPool.candidates` lists the workers a new request may go to: ACTIVE,
      healthy, in the wanted roles. :meth:`WorkerPool.alternatives` lists those that could
      take a worker's hops instead of it (see :func:`interchangeable`). Listeners given to
      :meth:`WorkerPool.on_candidate` are called with a worker each time it becomes a
      candidate (added, started, or back in rotation), so waiting requests need not poll.
    * :meth:`WorkerPool.progressed` records that bytes of a request came from a worker
      (one timestamp per chunk or answer): evidence that a worker late to answer ``/health``
      is busy, not hung.

The pool is plain bookkeeping for one event loop (no locks, no awaiting); waiting for a
drain is the router's job (it polls :attr:`Worker.state`).
"""

from __future__ import annotations

import dataclasses
import enum
import logging
from collections.abc import Callable, Iterable
from typing import Protocol
from urllib.parse import urlsplit

logger = logging.getLogger(__name__)


class WorkerRole(enum.Enum):
    """What a worker is asked to do."""

    PREFILL = "prefill"  # first hop: computes the prompt's KV, returns kv_transfer_params
    DECODE = "decode"  # second hop (or the only hop when no prefill worker is up)
    AGGREGATED = "aggregated"  # serves whole requests; also usable as a decode worker


class WorkerState(enum.Enum):
    """Where a worker is in its life at the router."""

    STARTING = "starting"  # launched, not yet healthy: takes no requests
    ACTIVE = "active"
    DRAINING = "draining"  # no new requests; in-flight ones finish
    DRAINED = "drained"  # nothing in flight; may be removed
    STOPPED = "stopped"  # drained, and its launched process stopped
    FAILED = "failed"  # its launch did not come up, or its process ended (Worker.error)


GONE = frozenset({WorkerState.STOPPED, WorkerState.FAILED})
REMOVABLE = GONE | {WorkerState.DRAINED}
# The final hop of a request: a decode worker, or an aggregated one serving it whole.
DECODE_ROLES = frozenset({WorkerRole.DECODE, WorkerRole.AGGREGATED})


def interchangeable(role: WorkerRole) -> frozenset[WorkerRole]:
    """The roles whose workers can take the hops a ``role`` worker takes: only a prefill
    worker takes a prefill hop; any decode or aggregated worker takes a final hop."""
    return DECODE_ROLES if role in DECODE_ROLES else frozenset({role})


class WorkerProcess(Protocol):
    """A worker process launched for the router (the serve command's vLLM servers)."""

    @property
    def url(self) -> str: ...

    @property
    def stats_url(self) -> str | None: ...

    def poll_start(self) -> bool:
        """True once it serves, False while starting; raises RuntimeError (with the reason,
        after stopping it) when it cannot come up."""

    def stop(self) -> None:
        """Stops it and everything it started; idempotent, may block for seconds."""

    def exit_code(self) -> int | None:
        """Its exit status once its process has ended (and is reaped), else None."""


# (role, worker id) -> a spawned process; must return without waiting for it to be healthy.
Launcher = Callable[[WorkerRole, str], WorkerProcess]


@dataclasses.dataclass
class Worker:
    """One worker's record; mutated only by its :class:`WorkerPool`."""

    id: str
    role: WorkerRole
    url: str
    stats_url: str | None = None
    state: WorkerState = WorkerState.ACTIVE
    healthy: bool = True
    in_flight: int = 0
    routed: int = 0
    failures: int = 0
    error: str | None = None
    # Monotonic time the router last relayed bytes of a request from it; None: never.
    last_progress: float | None = None
    process: WorkerProcess | None = dataclasses.field(default=None, repr=False, compare=False)

    def as_json(self) -> dict:
        return {
            "id": self.id,
            "role": self.role.value,
            "url": self.url,
            "stats_url": self.stats_url,
            "launched": self.process is not None,
            "state": self.state.value,
            "healthy": self.healthy,
            "in_flight": self.in_flight,
            "routed": self.routed,
            "failures": self.failures,
            "error": self.error,
        }


def normalize_url(url: str) -> str:
    """``http://host:port`` without a trailing slash.

    Raises:
        ValueError: not an http(s) URL with a host.
    """
    if not isinstance(url, str):
        raise ValueError(f"url must be a string, got {url!r}")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"url must be http(s)://host[:port], got {url!r}")
    return url.rstrip("/")


class WorkerPool:
    """Registry of workers keyed by id."""

    def __init__(self) -> None:
        self._workers: dict[str, Worker] = {}
        self._next_id = 1
        self._listeners: list[Callable[[Worker], None]] = []

    def on_candidate(self, listener: Callable[[Worker], None]) -> None:
        """Calls ``listener(worker)`` whenever a worker becomes a candidate."""
        self._listeners.append(listener)

    def _notify_if_candidate(self, worker: Worker) -> None:
        if worker.state is WorkerState.ACTIVE and worker.healthy:
            for listener in self._listeners:
                listener(worker)

    def add(self, role: WorkerRole, url: str, stats_url: str | None = None) -> Worker:
        """Registers a running worker; ``stats_url`` serves its block-pool ``/stats``.

        Raises:
            ValueError: bad URL, or a worker with this URL is already registered.
        """
        url, stats_url = self._check_urls(url, stats_url)
        worker = self._register(Worker(id=self._new_id(), role=role, url=url, stats_url=stats_url))
        self._notify_if_candidate(worker)
        return worker

    def launch(self, role: WorkerRole, launcher: Launcher) -> Worker:
        """Has ``launcher`` spawn a worker under a fresh id; registers it STARTING.

        Raises:
            whatever ``launcher`` raises (nothing is registered then); ValueError as in
            :meth:`add` (the process is stopped then).
        """
        worker_id = self._new_id()
        process = launcher(role, worker_id)
        try:
            url, stats_url = self._check_urls(process.url, process.stats_url)
        except ValueError:
            process.stop()
            raise
        return self._register(
            Worker(id=worker_id, role=role, url=url, stats_url=stats_url, state=WorkerState.STARTING, process=process)
        )

    def _new_id(self) -> str:
        self._next_id += 1
        return f"w{self._next_id - 1}"

    def _check_urls(self, url: str, stats_url: str | None) -> tuple[str, str | None]:
        url = normalize_url(url)
        # A stopped or failed worker's process is gone: its port may be reused.
        if any(w.url == url for w in self._workers.values() if w.state not in GONE):
            raise ValueError(f"a worker with url {url} is already registered")
        return url, None if stats_url is None else normalize_url(stats_url)

    def _register(self, worker: Worker) -> Worker:
        self._workers[worker.id] = worker
        return worker

    def get(self, worker_id: str) -> Worker:
        """Raises: KeyError: no such worker."""
        return self._workers[worker_id]

    def all(self) -> list[Worker]:
        return list(self._workers.values())

    def candidates(self, roles: Iterable[WorkerRole], exclude: Iterable[str] = ()) -> list[Worker]:
        """ACTIVE, healthy workers in ``roles``, minus the ids in ``exclude``."""
        roles, exclude = set(roles), set(exclude)
        return [
            w
            for w in self._workers.values()
            if w.role in roles and w.state is WorkerState.ACTIVE and w.healthy and w.id not in exclude
        ]

    def alternatives(self, worker: Worker) -> list[Worker]:
        """The candidates other than ``worker`` that can take the hops it takes."""
        return self.candidates(interchangeable(worker.role), exclude=[worker.id])

    def acquire(self, worker: Worker) -> None:
        worker.in_flight += 1
        worker.routed += 1

    def release(self, worker: Worker) -> None:
        assert worker.in_flight > 0, f"release without acquire on {worker.id}"
        worker.in_flight -= 1
        if worker.in_flight == 0 and worker.state is WorkerState.DRAINING:
            worker.state = WorkerState.DRAINED

    def progressed(self, worker: Worker, now: float) -> None:
        """Bytes of a request came from ``worker`` at monotonic time ``now``."""
        worker.last_progress = now

    def mark(self, worker: Worker, healthy: bool, reason: str = "") -> None:
        """Health verdict from a failed request or the background probe; a change of rotation
        is logged with ``reason``."""
        if not healthy:
            worker.failures += 1
        if healthy == worker.healthy:
            return
        logger.warning(
            "worker %s (%s) %s rotation%s",
            worker.id,
            worker.url,
            "back in" if healthy else "out of",
            f": {reason}" if reason else "",
        )
        worker.healthy = healthy
        self._notify_if_candidate(worker)

    def started(self, worker: Worker) -> bool:
        """A launched worker came up: ACTIVE and healthy, unless it was drained meanwhile."""
        if worker.state is not WorkerState.STARTING:
            return False
        worker.state, worker.healthy = WorkerState.ACTIVE, True
        self._notify_if_candidate(worker)
        return True

    def failed(self, worker: Worker, reason: str) -> None:
        """A launched worker did not come up (its launcher stopped it); no-op unless STARTING."""
        if worker.state is WorkerState.STARTING:
            worker.state, worker.healthy, worker.error = WorkerState.FAILED, False, reason

    def ended(self, worker: Worker, reason: str) -> None:
        """A running launched worker's process ended on its own: FAILED with ``reason``."""
        if worker.state in (WorkerState.ACTIVE, WorkerState.DRAINING):
            logger.warning("worker %s (%s) failed: %s", worker.id, worker.url, reason)
            worker.state, worker.healthy, worker.error = WorkerState.FAILED, False, reason
            worker.failures += 1

    def stopped(self, worker: Worker) -> None:
        """A drained worker's process was stopped."""
        assert worker.state is WorkerState.DRAINED, f"{worker.id} is {worker.state.value}"
        worker.state, worker.healthy = WorkerState.STOPPED, False

    def drain(self, worker_id: str) -> Worker:
        """Stops new requests to a worker; DRAINED at once if nothing is in flight (or it
        was still starting).

        Raises:
            KeyError: no such worker.
        """
        worker = self._workers[worker_id]
        if worker.state is WorkerState.STARTING:
            worker.state = WorkerState.DRAINED
        elif worker.state is WorkerState.ACTIVE:
            worker.state = WorkerState.DRAINED if worker.in_flight == 0 else WorkerState.DRAINING
        return worker

    def remove(self, worker_id: str) -> Worker:
        """Forgets a drained, stopped or failed worker.

        Raises:
            KeyError: no such worker.
            ValueError: the worker may still take or finish requests.
        """
        worker = self._workers[worker_id]
        if worker.state not in REMOVABLE:
            raise ValueError(f"worker {worker_id} is {worker.state.value}; drain it first")
        del self._workers[worker_id]
        return worker
