"""The router's worker registry: who serves, in which role, how loaded, how healthy.

Contract:
    * :meth:`WorkerPool.add` registers an already-running worker (ACTIVE, presumed healthy:
      the caller started it and waited for it). Ids are ``w1``, ``w2``, ... per pool.
    * Every request a worker takes is bracketed by :meth:`WorkerPool.acquire` and
      :meth:`WorkerPool.release` (also on failure), so ``in_flight`` is exact.
    * :meth:`WorkerPool.drain` stops new requests to a worker at once; it becomes DRAINED
      when its last in-flight request is released, and only then may it be removed.
    * :meth:`WorkerPool.candidates` lists the workers a new request may go to: ACTIVE,
      healthy, in the wanted roles.

The pool is plain bookkeeping for one event loop (no locks, no awaiting); waiting for a
drain is the router's job (it polls :attr:`Worker.state`).
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Iterable
from urllib.parse import urlsplit


class WorkerRole(enum.Enum):
    """What a worker is asked to do."""

    PREFILL = "prefill"        # first hop: computes the prompt's KV, returns kv_transfer_params
    DECODE = "decode"          # second hop (or the only hop when no prefill worker is up)
    AGGREGATED = "aggregated"  # serves whole requests; also usable as a decode worker


class WorkerState(enum.Enum):
    """Where a worker is in its life at the router."""

    ACTIVE = "active"
    DRAINING = "draining"  # no new requests; in-flight ones finish
    DRAINED = "drained"    # nothing in flight; may be removed


@dataclasses.dataclass
class Worker:
    """One worker's record; mutated only by its :class:`WorkerPool`."""

    id: str
    role: WorkerRole
    url: str
    state: WorkerState = WorkerState.ACTIVE
    healthy: bool = True
    in_flight: int = 0
    routed: int = 0
    failures: int = 0

    def as_json(self) -> dict:
        return {"id": self.id, "role": self.role.value, "url": self.url,
                "state": self.state.value, "healthy": self.healthy,
                "in_flight": self.in_flight, "routed": self.routed, "failures": self.failures}


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

    def add(self, role: WorkerRole, url: str) -> Worker:
        """Registers a running worker.

        Raises:
            ValueError: bad URL, or a worker with this URL is already registered.
        """
        url = normalize_url(url)
        if any(w.url == url for w in self._workers.values()):
            raise ValueError(f"a worker with url {url} is already registered")
        worker = Worker(id=f"w{self._next_id}", role=role, url=url)
        self._next_id += 1
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
        return [w for w in self._workers.values()
                if w.role in roles and w.state is WorkerState.ACTIVE and w.healthy
                and w.id not in exclude]

    def acquire(self, worker: Worker) -> None:
        worker.in_flight += 1
        worker.routed += 1

    def release(self, worker: Worker) -> None:
        assert worker.in_flight > 0, f"release without acquire on {worker.id}"
        worker.in_flight -= 1
        if worker.in_flight == 0 and worker.state is WorkerState.DRAINING:
            worker.state = WorkerState.DRAINED

    def mark(self, worker: Worker, healthy: bool) -> None:
        """Health verdict from a failed request or the background probe."""
        if not healthy:
            worker.failures += 1
        worker.healthy = healthy

    def drain(self, worker_id: str) -> Worker:
        """Stops new requests to a worker; DRAINED at once if nothing is in flight.

        Raises:
            KeyError: no such worker.
        """
        worker = self._workers[worker_id]
        if worker.state is WorkerState.ACTIVE:
            worker.state = WorkerState.DRAINED if worker.in_flight == 0 else WorkerState.DRAINING
        return worker

    def remove(self, worker_id: str) -> Worker:
        """Forgets a drained worker.

        Raises:
            KeyError: no such worker.
            ValueError: the worker is not DRAINED.
        """
        worker = self._workers[worker_id]
        if worker.state is not WorkerState.DRAINED:
            raise ValueError(f"worker {worker_id} is {worker.state.value}; drain it first")
        del self._workers[worker_id]
        return worker
