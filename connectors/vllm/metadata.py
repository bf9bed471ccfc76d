"""What the scheduler-side and worker-side connectors tell each other each step.

Scheduler -> worker (:class:`KvbmConnectorMetadata`, pickled by vLLM with the scheduler
output): the transfer jobs to run and which requests wait for their saves before vLLM may
free their blocks. Worker -> scheduler (:class:`KvbmWorkerMetadata`): the results of finished
jobs, which the scheduler's block manager commits or rolls back.
"""

from __future__ import annotations

import dataclasses

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorMetadata,
    KVConnectorWorkerMetadata,
)

from kvbm.jobs import JobResult, TransferJob


@dataclasses.dataclass
class RequestLoad:
    """Blocks to load into one request's engine blocks before it runs.

    Attributes:
        req_id: the request.
        jobs: copies into G1, one per source tier.
        missing_block_ids: engine blocks nothing will fill (reported as load errors).
        asynchronous: the request waits for the load (``get_finished`` reports it);
            otherwise the load finishes before this step's forward pass.
    """

    req_id: str
    jobs: list[TransferJob]
    missing_block_ids: list[int]
    asynchronous: bool


@dataclasses.dataclass
class KvbmConnectorMetadata(KVConnectorMetadata):
    """One step's instructions for the worker.

    Attributes:
        loads: loads to start this step.
        stores: ``(req_id, job)`` offloads to start after this step's forward pass;
            ``req_id`` is None for G2 -> G3 demotions, which no request waits for.
        await_saves: finished requests whose blocks vLLM keeps until the worker reports
            their stores done (``finished_sending``).
    """

    loads: list[RequestLoad] = dataclasses.field(default_factory=list)
    stores: list[tuple[str | None, TransferJob]] = dataclasses.field(default_factory=list)
    await_saves: set[str] = dataclasses.field(default_factory=set)


@dataclasses.dataclass
class KvbmWorkerMetadata(KVConnectorWorkerMetadata):
    """Results of the jobs that finished on a worker since its last report."""

    results: list[JobResult] = dataclasses.field(default_factory=list)

    def aggregate(self, other: KVConnectorWorkerMetadata) -> KVConnectorWorkerMetadata:
        assert isinstance(other, KvbmWorkerMetadata)
        return KvbmWorkerMetadata(self.results + other.results)
