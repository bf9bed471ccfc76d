"""What the scheduler-side and worker-side connectors tell each other each step.

Scheduler -> worker (:class:`KvbmConnectorMetadata`, pickled by vLLM with the scheduler
output): the transfer jobs to run, the blocks to pull from remote workers, the blocks to grant
or hold for remote readers, and which requests wait before vLLM may free their blocks. Worker ->
scheduler (:class:`KvbmWorkerMetadata`): the results of finished jobs, which the scheduler's
block manager commits or rolls back, the grants made this step (they go into the finished
prefill requests' ``kv_transfer_params``), and the worker's remote endpoint (address, counters).
"""

from __future__ import annotations

import dataclasses

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorMetadata,
    KVConnectorWorkerMetadata,
)

from kvbm.ids import BlockHash
from kvbm.remote.metadata import BlockGrant
from kvbm.transfer.jobs import JobResult, TransferJob


@dataclasses.dataclass
class RemotePull:
    """Blocks to pull from a prefill worker into our engine blocks: those of ``grant`` (the
    prefill's grant from the request, sliced to what we pull), or else by hash from the
    ``source`` side channel."""

    source: str
    hashes: tuple[BlockHash, ...]
    block_ids: list[int]
    grant: BlockGrant | None = None


@dataclasses.dataclass
class HandoffGrant:
    """A prefill request that ends this step: grant its prompt's blocks after the forward pass
    (see held_blocks.py)."""

    req_id: str
    hashes: tuple[BlockHash, ...]
    block_ids: list[int]


@dataclasses.dataclass
class Release:
    """Tell a prefill we will not read what it holds for us: the lease of ``grant``, or else
    the hold ending in ``last_hash`` on the ``source`` side channel."""

    source: str
    last_hash: BlockHash
    grant: BlockGrant | None = None


@dataclasses.dataclass
class HeldRequest:
    """A finished request's engine blocks to keep for remote readers (see held_blocks.py)."""

    req_id: str
    hashes: tuple[BlockHash, ...]
    block_ids: list[int]


@dataclasses.dataclass
class RequestLoad:
    """Blocks to load into one request's engine blocks before it runs.

    Attributes:
        req_id: the request.
        jobs: copies into G1, one per source tier.
        missing_block_ids: engine blocks nothing will fill (reported as load errors).
        asynchronous: the request waits for the load (``get_finished`` reports it);
            otherwise the load finishes before this step's forward pass.
        remote: blocks after the jobs' to pull from a remote worker (always asynchronous).
    """

    req_id: str
    jobs: list[TransferJob]
    missing_block_ids: list[int]
    asynchronous: bool
    remote: RemotePull | None = None


@dataclasses.dataclass
class KvbmConnectorMetadata(KVConnectorMetadata):
    """One step's instructions for the worker.

    Attributes:
        loads: loads to start this step.
        stores: ``(req_id, job)`` offloads to start after this step's forward pass;
            ``req_id`` is None for G2 -> G3 demotions, which no request waits for.
        await_saves: finished requests whose blocks vLLM keeps until the worker reports
            their stores done and their holds ended (``finished_sending``).
        keeps: grants handed to decode requests that just arrived: heartbeat their leases until
            they are pulled or released (a request may wait in vLLM's queue longer than a lease).
        grants: prefill requests ending this step whose blocks to grant after the forward pass.
        revokes: requests granted in an earlier step that did not end with a handoff (aborted):
            withdraw their grants.
        holds: finished requests' blocks to hold by hash for remote readers (ended in a later
            step than their prompt, or their grant failed).
        releases: prefills' holds we will not read (we had the blocks already, or they do not
            match).
        preempted: requests vLLM preempted this step: it freed their blocks, so their
            copies must end before this step's loads and forward pass reuse them.
    """

    loads: list[RequestLoad] = dataclasses.field(default_factory=list)
    stores: list[tuple[str | None, TransferJob]] = dataclasses.field(default_factory=list)
    await_saves: set[str] = dataclasses.field(default_factory=set)
    keeps: list[BlockGrant] = dataclasses.field(default_factory=list)
    grants: list[HandoffGrant] = dataclasses.field(default_factory=list)
    revokes: list[str] = dataclasses.field(default_factory=list)
    holds: list[HeldRequest] = dataclasses.field(default_factory=list)
    releases: list[Release] = dataclasses.field(default_factory=list)
    preempted: set[str] = dataclasses.field(default_factory=set)


@dataclasses.dataclass
class KvbmWorkerMetadata(KVConnectorWorkerMetadata):
    """What a worker reports since its last report.

    Attributes:
        results: finished transfer jobs (not remote pulls: the block manager never saw those).
        side_channel: the worker's remote endpoint address (with ``remote``: every step).
        remote: the remote endpoint's counters, when they changed.
        grants: this step's grants (:class:`HandoffGrant`), by request.
    """

    results: list[JobResult] = dataclasses.field(default_factory=list)
    side_channel: str | None = None
    remote: dict | None = None
    grants: dict[str, BlockGrant] = dataclasses.field(default_factory=dict)

    def aggregate(self, other: KVConnectorWorkerMetadata) -> KVConnectorWorkerMetadata:
        assert isinstance(other, KvbmWorkerMetadata)
        return KvbmWorkerMetadata(
            self.results + other.results,
            self.side_channel or other.side_channel,
            self.remote or other.remote,
            {**self.grants, **other.grants},
        )
