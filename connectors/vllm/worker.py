"""Worker side of the kvbm connector: registers G1, owns G2's bytes, runs transfer jobs.

Lives in each vLLM worker process. Per step, vLLM calls (with the scheduler's metadata bound):

    start_load_kv     -> hold finished prefills' blocks for decode workers; submit this step's
                         loads (synchronous ones finish before it returns)
    wait_for_save     -> submit this step's offloads; they run while the next step computes
    grant_handoffs    -> (after the forward pass) grant the blocks of prefills ending this step
    get_finished      -> requests whose async loads, or awaited jobs, have all ended
    get_block_ids_with_load_errors -> engine blocks that were not filled: vLLM recomputes them
    build_connector_worker_meta    -> results of finished jobs, for the scheduler to commit

Loads and offloads run on two transfer threads, so a load (which a request waits for) never
queues behind offloads (which nothing waits for). They never touch the same bytes: a slot
being stored is invisible to lookups until its store commits, a slot being loaded is leased
and cannot be evicted for a store, and vLLM allocates a load's engine blocks only when no
running request holds them. When vLLM preempts requests (it frees their
blocks at once), ``handle_preemptions`` waits for those requests' jobs before the step reuses
the blocks; the other jobs run on. On CUDA both kinds share one thread: they share a staging buffer.

With ``remote`` configured the worker also runs a NIXL endpoint over its engine blocks: it
grants its own finished prefill requests' blocks to decode workers and holds them
(:class:`HeldBlocks`) until the reader ends the lease or ``lease_s`` passes without a word from
it, and it pulls handed-off blocks from prefill workers: those of the grant the request carries,
or by hash (verified against the prefill's checksums either way; failed blocks become load
errors).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING, TypeVar

import numpy as np

from kvbm.connectors.vllm.config import ConnectorConfig
from kvbm.connectors.vllm.engine_layout import block_bytes, layout_fingerprint
from kvbm.connectors.vllm.held_blocks import HeldBlocks
from kvbm.connectors.vllm.metadata import KvbmConnectorMetadata, KvbmWorkerMetadata
from kvbm.ids import JobId, Tier
from kvbm.layout import EngineKV
from kvbm.tiers.disk.handlers import DiskHandlers, disk_handlers
from kvbm.tiers.host import HostBuffer
from kvbm.transfer.engine import TransferEngine
from kvbm.transfer.host_copy import host_handlers
from kvbm.transfer.jobs import JobResult, TransferJob

if TYPE_CHECKING:
    import torch
    from kvbm.remote import BlockGrant, RemoteWorker
    from vllm.config import VllmConfig
    from vllm.v1.kv_cache_interface import KVCacheConfig

logger = logging.getLogger(__name__)
_Part = TypeVar("_Part")  # a part register_kv_caches sets up (see WorkerSide._require)


class WorkerSide:
    """The connector's worker half (see the module docstring)."""

    def __init__(self, config: ConnectorConfig, vllm_config: VllmConfig, kv_cache_config: KVCacheConfig) -> None:
        self._config = config
        self._vllm_config = vllm_config
        self._num_blocks = kv_cache_config.num_blocks
        self._block_bytes = block_bytes(kv_cache_config)
        self._loads: TransferEngine | None = None
        self._stores: TransferEngine | None = None
        self._disk: DiskHandlers | None = None
        self._g2: HostBuffer | None = None
        self._jobs: dict[JobId, tuple[str | None, TransferJob]] = {}
        self._req_jobs: dict[str, set[JobId]] = {}
        self._async_loads: set[str] = set()
        self._awaiting: set[str] = set()
        self._results: list[JobResult] = []
        self._load_errors: set[int] = set()
        self._load_errors_reported = 0  # engine blocks vLLM was told to recompute
        self._remote: RemoteWorker | None = None
        self._held: HeldBlocks | None = None
        self._pulls: dict[JobId, tuple[str, np.ndarray]] = {}  # pull job -> (request, engine blocks)
        self._granted: dict[str, BlockGrant] = {}  # this step's grants, for the scheduler
        self._leases: dict[str, int] = {}  # granted request -> its lease, until the hold ends
        self._kept: set[tuple[str, int]] = set()  # (source, lease) of grants heartbeated since queued
        self._remote_reported: tuple | None = None  # (RemoteStats, HoldCounters, load error blocks)

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        """Registers vLLM's per-layer KV tensors as G1 and allocates G2 to match."""
        # vLLM may allocate more blocks than it uses (num_gpu_blocks_override caps the count,
        # not the tensor); ids past num_blocks never appear in a block table, so they are left out.
        n = self._num_blocks
        tensors: list[torch.Tensor] = []
        for name, tensor in kv_caches.items():
            if tensor.ndim > 2 and tensor.shape[0] == 2 and tensor.shape[1] >= n:
                tensors.extend((tensor[0, :n], tensor[1, :n]))  # [2, num_blocks, ...]: K and V planes
            elif tensor.shape[0] >= n:
                tensors.append(tensor[:n])
            else:
                raise ValueError(
                    f"KV cache of layer {name} has shape {tuple(tensor.shape)}; kvbm "
                    f"expects a block axis of at least {n} blocks first or second"
                )
        g1 = EngineKV.from_tensors(tensors)
        if g1.layout.block_bytes != self._block_bytes:
            raise ValueError(
                f"vLLM's KV tensors hold {g1.layout.block_bytes} bytes per block but its "
                f"cache config says {self._block_bytes}; kvbm cannot map blocks safely"
            )
        slots = self._config.kvbm.g2_slots(self._block_bytes)
        self._g2 = HostBuffer(slots, self._block_bytes, pinned=g1.is_cuda)
        handlers = dict(host_handlers(g1, self._g2, cuda_staging_bytes=self._config.kvbm.cuda_staging_bytes))
        if self._config.kvbm.g3_dir is not None:
            # The slot files; the scheduler holds G3's index over the same directory.
            self._disk = disk_handlers(
                self._config.kvbm,
                self._g2,
                None if g1.is_cuda else g1,
                fingerprint=layout_fingerprint(self._vllm_config),
            )
            handlers.update(self._disk)
        threaded = self._config.kvbm.transfer_thread
        self._loads = TransferEngine(handlers, threaded=threaded)
        self._stores = self._loads if g1.is_cuda else TransferEngine(handlers, threaded=threaded)
        if self._config.remote is not None:
            self._start_remote(g1)
        logger.info(
            "kvbm: G1 %d blocks of %d bytes on %s, G2 %d slots (%.1f MiB)",
            g1.num_blocks,
            self._block_bytes,
            g1.device,
            slots,
            self._g2.nbytes / 2**20,
        )

    @property
    def host_buffer(self) -> HostBuffer | None:
        """G2's bytes (None before ``register_kv_caches``)."""
        return self._g2

    def start_load_kv(self, meta: KvbmConnectorMetadata) -> None:
        # Holds first, before this step's forward pass: a decode worker may already be asking
        # for the blocks, and a long prefill chunk in this step would keep it waiting past its
        # grant's patience (the blocks were complete when the request finished last step).
        if meta.revokes:
            self._revoke(meta.revokes)
        for grant in meta.keeps:
            self._require(self._remote).pulls.hold(grant)
            self._kept.add((grant.source, grant.lease_id))
        for held in meta.holds:
            self._require(self._held).hold(held.req_id, held.hashes, held.block_ids)
        for release in meta.releases:
            if release.grant is not None:
                self._kept.discard((release.grant.source, release.grant.lease_id))
                self._require(self._remote).release_grant(release.grant)
            else:
                self._require(self._remote).release_hashes(release.source, (release.last_hash,))
        loads = self._require(self._loads)
        synchronous: list[JobId] = []
        for load in meta.loads:
            self._load_errors.update(load.missing_block_ids)
            for job in load.jobs:
                self._submit(loads, load.req_id, job)
                if not load.asynchronous:
                    synchronous.append(job.job_id)
            if load.remote is not None:
                self._pull(load.req_id, load.remote)
            if load.asynchronous:
                self._async_loads.add(load.req_id)
        if synchronous:
            loads.wait(synchronous)  # this step's forward pass reads these blocks
        self._collect()

    def wait_for_save(self, meta: KvbmConnectorMetadata) -> None:
        stores = self._require(self._stores)
        for req_id, job in meta.stores:
            self._submit(stores, req_id, job)
        self._awaiting |= meta.await_saves

    def handle_preemptions(self, meta: KvbmConnectorMetadata) -> None:
        """Wait for the copies of the requests vLLM preempted (it freed their blocks); the
        step's other jobs run on (their blocks stay allocated, or are kept for them)."""
        jobs = [job for req_id in meta.preempted for job in self._req_jobs.get(req_id, ())]
        if jobs:
            for engine in self._engines():
                engine.wait(jobs)

    def grant_handoffs(self, meta: KvbmConnectorMetadata) -> None:
        """Grant the prompt blocks of the prefill requests this step ends (after its forward
        pass: the checksums cover what it wrote). The grants go to the scheduler in this step's
        worker output, which it reads before vLLM sends the requests' outputs."""
        for asked in meta.grants:
            remote = self._require(self._remote)
            try:
                grant = remote.grant(Tier.G1, asked.block_ids, asked.hashes)
            except Exception:  # noqa: BLE001 - the decode then pulls by hash (see scheduler.py)
                logger.exception("kvbm: could not grant request %s's blocks", asked.req_id)
                continue
            # A lease cannot end before this line: expiry is lease_s away, no reader has the
            # grant yet, and only this thread revokes.
            try:
                self._require(self._held).hold(asked.req_id, asked.hashes, asked.block_ids, lease_id=grant.lease_id)
            except ValueError:
                remote.source.revoke(grant.lease_id)
                logger.exception("kvbm: could not hold request %s's granted blocks", asked.req_id)
                continue
            self._granted[asked.req_id] = grant
            self._leases[asked.req_id] = grant.lease_id

    def _revoke(self, req_ids: list[str]) -> None:
        """Withdraw grants whose request did not end with a handoff; their holds end now, before
        this step can hold the same request again by hash."""
        remote = self._require(self._remote)
        for req_id in req_ids:
            lease = self._leases.pop(req_id, None)
            if lease is not None:
                remote.source.revoke(lease)
        self._end_holds()

    def _end_holds(self) -> None:
        for req_id in self._require(self._held).take_ended():
            self._leases.pop(req_id, None)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        self._collect()
        if self._held is not None:
            self._end_holds()
        # A request is done only when nothing still writes its blocks: copies, holds, and
        # NIXL pulls (an aborted decode's pull may still be landing).
        pulling = {req_id for req_id, _ in self._pulls.values()}
        done_saving = {
            r for r in self._awaiting if not self._req_jobs.get(r) and not self._is_held(r) and r not in pulling
        }
        done_loading = {r for r in self._async_loads if not self._req_jobs.get(r) and r not in pulling}
        self._awaiting -= done_saving
        self._async_loads -= done_loading
        for req_id in done_saving | done_loading:
            self._req_jobs.pop(req_id, None)
        return done_saving or None, done_loading or None

    def take_load_errors(self) -> set[int]:
        errors, self._load_errors = self._load_errors, set()
        self._load_errors_reported += len(errors)
        return errors

    def build_worker_meta(self) -> KvbmWorkerMetadata | None:
        self._collect()
        side_channel, remote = self._remote_news()
        if not self._results and side_channel is None and remote is None and not self._granted:
            return None
        results, self._results = self._results, []
        granted, self._granted = self._granted, {}
        return KvbmWorkerMetadata(results, side_channel, remote, granted)

    def shutdown(self) -> None:
        if self._remote is not None:
            self._remote.close()  # revokes every lease: held blocks are unpinned
        for engine in self._engines():
            engine.close()
        if self._disk is not None:
            self._disk.close()

    def _engines(self) -> list[TransferEngine]:
        return [e for e in {id(e): e for e in (self._loads, self._stores) if e is not None}.values()]

    def _submit(self, engine: TransferEngine, req_id: str | None, job: TransferJob) -> None:
        self._jobs[job.job_id] = (req_id, job)
        if req_id is not None:
            self._req_jobs.setdefault(req_id, set()).add(job.job_id)
        engine.submit(job)

    def _collect(self) -> None:
        for result in [r for engine in self._engines() for r in engine.poll()]:
            req_id, job = self._jobs.pop(result.job_id)
            owned = self._req_jobs.get(req_id) if req_id is not None else None
            if req_id is not None and owned is not None:
                owned.discard(result.job_id)
                if not owned and req_id not in self._awaiting and req_id not in self._async_loads:
                    del self._req_jobs[req_id]
            if job.dst is Tier.G1 and len(result.failed):
                # Blocks that did not arrive intact: vLLM recomputes them.
                self._load_errors.update(job.dst_ids[np.asarray(result.failed)].tolist())
            self._results.append(result)
        if self._remote is not None:
            for result in self._remote.progress():
                self._pulled(result)

    # -- disaggregated serving -------------------------------------------------------------

    def _start_remote(self, g1: EngineKV) -> None:
        from kvbm.remote import RemoteWorker, engine_tier

        remote = self._require(self._config.remote)
        self._held = HeldBlocks(hold_s=remote.lease_s)
        self._remote = RemoteWorker(remote, pinner=self._held)
        self._remote.register(engine_tier(g1))
        logger.info("kvbm: NIXL agent %s, side channel %s", self._remote.name, self._remote.side_channel)

    def _pull(self, req_id: str, pull) -> None:
        remote = self._require(self._remote)
        if pull.grant is not None:
            job = remote.pull(pull.grant, Tier.G1, pull.block_ids)
            if (pull.grant.source, pull.grant.lease_id) in self._kept:
                # The keep-alive from on_new_request ends: the job holds the lease now. (vLLM
                # skips on_new_request for streaming-input sessions: nothing to end then.)
                self._kept.discard((pull.grant.source, pull.grant.lease_id))
                remote.pulls.drop(pull.grant)
        else:
            job = remote.pull_hashes(pull.source, pull.hashes, Tier.G1, pull.block_ids)
        self._pulls[job] = (req_id, np.asarray(pull.block_ids, dtype=np.int64))

    def _pulled(self, result: JobResult) -> None:
        req_id, block_ids = self._pulls.pop(result.job_id)
        if len(result.failed):
            # Not granted, not delivered or not verified: vLLM recomputes these blocks.
            self._load_errors.update(block_ids[np.asarray(result.failed)].tolist())
            logger.warning(
                "kvbm: pull for request %s: %d of %d blocks failed: %s",
                req_id,
                len(result.failed),
                len(block_ids),
                result.reason,
            )

    def _is_held(self, req_id: str) -> bool:
        return self._held is not None and self._held.is_held(req_id)

    def _remote_news(self) -> tuple[str | None, dict | None]:
        """Our side channel and the remote counters (when they changed), for the scheduler.

        The address goes every step: vLLM drops the outputs of its warm-up steps, so a
        report sent once could be lost before the scheduler ever sees it.
        """
        if self._remote is None:
            return None, None
        side_channel = self._remote.side_channel
        # Compared as dataclasses (cheap, every step); converted to a dict only on a change.
        current = (self._remote.stats(), self._require(self._held).counters(), self._load_errors_reported)
        if current == self._remote_reported:
            return side_channel, None
        self._remote_reported = current
        remote, holds, load_errors = current
        stats = remote.to_dict()
        stats["holds"] = dataclasses.asdict(holds)
        stats["load_error_blocks"] = load_errors
        return side_channel, stats

    @staticmethod
    def _require(part: _Part | None) -> _Part:
        if part is None:
            raise RuntimeError("kvbm connector: register_kv_caches was not called")
        return part
