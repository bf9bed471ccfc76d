"""Whether a worker serves: one ``GET /health`` answer, and the probe's verdicts over time.

Late is not dead: a vLLM API server relaying 64 streams on two cores can take seconds to
answer ``/health``. So a probe has three outcomes, and the verdicts are:

    * UP (200) puts a worker in rotation.
    * DOWN (refused, reset, not 200) takes it out at once.
    * SLOW (no answer in time) takes it out only after ``slow_to_eject`` late answers in a
      row with no progress: a late answer is forgiven when the router relayed bytes of a
      request from the worker since its previous verdict (:meth:`WorkerPool.progressed`),
      and never takes out the last worker that can take its hops (the last prefill worker,
      or the last decode-or-aggregated one): with nobody to stand in, taking a busy worker
      out only fails requests it would have served. A worker that is out for lateness alone
      comes back on such a forgiven late answer (its peer drained, or its streams moved).

CI saw the only decode worker ejected by one late probe, failing every request until the
next one; later, a decode worker launched on a slow machine was ejected after three late
probes while its peer drained, and every request failed with 503.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable

import httpx

from kvbm.serving.workers import Worker, WorkerPool

SLOW_PROBES_TO_EJECT = 3  # with a 2 s interval and timeout: a hung worker leaves within ~12 s


class Health(enum.Enum):
    UP = "up"  # answered 200
    SLOW = "slow"  # no answer within the timeout: busy or hung, not known dead
    DOWN = "down"  # refused, reset or not 200: not serving


async def check_health(client: httpx.AsyncClient, worker: Worker, timeout: float) -> Health:
    """One ``GET /health`` of ``worker``, within ``timeout`` seconds."""
    try:
        reply = await client.get(worker.url + "/health", timeout=timeout)
    except httpx.TimeoutException:
        return Health.SLOW
    except Exception:  # noqa: BLE001 - any other failure means down; httpcore has raised
        return Health.DOWN  # AttributeError for a server dying during the connect
    return Health.UP if reply.status_code == 200 else Health.DOWN


def lateness_excuse(pool: WorkerPool, worker: Worker, progressed_since: float | None) -> str | None:
    """Why a late answer must not take ``worker`` out, or None when nothing excuses it.

    Args:
        progressed_since: monotonic time of the worker's previous verdict; bytes relayed from
            it since then are progress. None: no previous verdict, any progress counts.
    """
    last = worker.last_progress
    if last is not None and (progressed_since is None or last >= progressed_since):
        return "its requests are making progress"
    if not pool.alternatives(worker):
        return "no other worker can take its requests"
    return None


class ProbeVerdicts:
    """Applies the background probe's answers to the pool (see the module docstring).

    Args:
        pool: the worker registry.
        slow_to_eject: late answers in a row, without progress, that take a worker out.
        clock: monotonic seconds, the clock :meth:`WorkerPool.progressed` is given.
    """

    def __init__(
        self, pool: WorkerPool, slow_to_eject: int = SLOW_PROBES_TO_EJECT, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._pool = pool
        self._slow_to_eject = slow_to_eject
        self._clock = clock
        self._slow: dict[str, int] = {}  # worker id -> unforgiven late answers in a row
        self._judged_at: dict[str, float] = {}  # worker id -> time of its previous verdict
        self._out_for_lateness: set[str] = set()

    def process_ended(self, worker: Worker) -> bool:
        """Whether ``worker`` was launched and its process has ended: it is then FAILED with
        its exit status (and reaped, so no zombie waits for serve to exit)."""
        code = worker.process.exit_code() if worker.process is not None else None
        if code is None:
            return False
        self._pool.ended(worker, f"its process exited with status {code}")
        return True

    def apply(self, worker: Worker, health: Health) -> None:
        now = self._clock()
        previous, self._judged_at[worker.id] = self._judged_at.get(worker.id), now
        if health is Health.SLOW:
            self._late(worker, lateness_excuse(self._pool, worker, previous))
            return
        self._slow[worker.id] = 0
        self._out_for_lateness.discard(worker.id)
        if health is Health.UP:
            self._pool.mark(worker, True, "answers /health")
        else:
            self._pool.mark(worker, False, "/health refused or failed")

    def _late(self, worker: Worker, excuse: str | None) -> None:
        if excuse is not None:
            self._slow[worker.id] = 0
            if worker.id in self._out_for_lateness:
                self._out_for_lateness.discard(worker.id)
                self._pool.mark(worker, True, f"/health answers late, but {excuse}")
            return
        slow = self._slow[worker.id] = self._slow.get(worker.id, 0) + 1
        if slow >= self._slow_to_eject and worker.healthy:
            self._out_for_lateness.add(worker.id)
            self._pool.mark(
                worker, False, f"/health unanswered {slow} times in a row, with no progress on its requests"
            )
