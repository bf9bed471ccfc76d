"""Whether a worker serves: one ``GET /health`` answer, and the probe's verdicts over time.

A worker that answers late is not a dead one: a vLLM API server relaying 64 streams on two
cores can take seconds to answer ``/health``. So a probe has three outcomes, and only a refused
or failed answer (the process is gone, or says it is unwell) takes a worker out at once; late
answers take it out only after several probes in a row. CI saw the only decode worker ejected
by one late probe, failing every request until the next one.
"""

from __future__ import annotations

import enum

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


class ProbeVerdicts:
    """Applies the background probe's answers to the pool (see the module docstring)."""

    def __init__(self, pool: WorkerPool, slow_to_eject: int = SLOW_PROBES_TO_EJECT) -> None:
        self._pool = pool
        self._slow_to_eject = slow_to_eject
        self._slow: dict[str, int] = {}  # worker id -> late answers in a row

    def process_ended(self, worker: Worker) -> bool:
        """Whether ``worker`` was launched and its process has ended: it is then FAILED with
        its exit status (and reaped, so no zombie waits for serve to exit)."""
        code = worker.process.exit_code() if worker.process is not None else None
        if code is None:
            return False
        self._pool.ended(worker, f"its process exited with status {code}")
        return True

    def apply(self, worker: Worker, health: Health) -> None:
        slow = self._slow.get(worker.id, 0) + 1 if health is Health.SLOW else 0
        self._slow[worker.id] = slow
        healthy = health is Health.UP or (health is Health.SLOW and slow < self._slow_to_eject
                                          and worker.healthy)
        if worker.healthy != healthy:
            why = {Health.UP: "answers /health", Health.DOWN: "/health refused or failed",
                   Health.SLOW: f"/health unanswered {slow} times in a row"}[health]
            self._pool.mark(worker, healthy, why)
