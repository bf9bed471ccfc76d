"""Scheduler side of the kvbm connector: lookups, load and offload planning, commits.

Lives in vLLM's engine-core process and imports no device code. It owns the
:class:`~kvbm.manager.block_manager.BlockManager` (which blocks G2/G3 hold) and hashes each
request's tokens with kvbm's chained hashing. Per step, vLLM calls:

    get_num_new_matched_tokens  -> tokens kvbm can load beyond vLLM's own prefix cache
    update_state_after_alloc    -> plan the load into the blocks vLLM allocated (leases them)
    build_connector_meta        -> this step's loads, plus offloads of blocks this step fills
    update_connector_output     -> commit or roll back finished jobs (worker results)
    request_finished            -> keep a request's blocks while its jobs still run

A request's engine blocks are never freed while one of its jobs runs: request_finished
returns True and the worker reports the request in ``finished_sending`` once its jobs end.

Disaggregated serving (``remote`` configured; see :mod:`.handoff`): a prefill request sent with
``do_remote_decode`` ends in the step that computes the rest of its prompt; that step's
metadata asks the worker to grant the prompt's blocks after the forward pass (a lease and
their checksums: the full blocks, then the tail block holding the prompt's last tokens), and
``request_finished`` returns a :class:`Handoff` as its ``kv_transfer_params``, which the grant
from the same step's worker output completes before vLLM sends it. A decode request carrying
one loads what G2/G3 hold, then pulls the rest of the handed-off prefix straight from the
prefill's engine blocks (always an asynchronous load), the tail included, so it computes only
the prompt's last token. A pull is tried once per request; what fails is recomputed.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
from typing import TYPE_CHECKING, Any

import numpy as np
from vllm.v1.request import RequestStatus

from kvbm.connectors.vllm.config import ConnectorConfig
from kvbm.connectors.vllm.engine_layout import block_bytes, check_supported, layout_fingerprint
from kvbm.connectors.vllm.handoff import KEY, NOTHING_HANDED_OFF, Handoff, attach_grant, wants_handoff
from kvbm.connectors.vllm.metadata import (
    HandoffGrant,
    HeldRequest,
    KvbmConnectorMetadata,
    KvbmWorkerMetadata,
    Release,
    RemotePull,
    RequestLoad,
)
from kvbm.connectors.vllm.request_extras import block_extras
from kvbm.connectors.vllm.suspect_blocks import SuspectBlocks
from kvbm.hashing import BlockHasher, HashedBlocks
from kvbm.ids import BlockHash, JobId, Tier
from kvbm.manager.block_manager import BlockManager
from kvbm.manager.policy import OffloadPolicy
from kvbm.manager.stats import KvbmStats
from kvbm.remote.metadata import BlockGrant
from kvbm.remote.publication import Publication

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

logger = logging.getLogger(__name__)

# A handed-off tail block pulled with nothing else to load must hold more than this share of
# a block (see SchedulerSide._handed_off_tail).
TAIL_ALONE_MIN_SHARE = 0.5
STATS_INTERVAL_S = 1.0  # vLLM's stats logger reports every 5 s; Prometheus scrapes every 10-60 s
# A prefill that ends like this has no answer to carry a handoff: holding its blocks would
# only keep them from vLLM until the lease ends.
_NO_HANDOFF = (RequestStatus.FINISHED_ABORTED, RequestStatus.FINISHED_ERROR)


@dataclasses.dataclass
class _RequestState:
    request: Request
    blocks: HashedBlocks
    block_ids: list[int] = dataclasses.field(default_factory=list)
    offered: int = 0  # leading blocks already handed to the offload policy
    load_start: int = 0  # first block of the planned load
    local_blocks: int = 0  # blocks of the planned load that G2/G3 hold
    handoff: Handoff | None = None  # a remote prefill's blocks to pull, until tried
    granting: int = 0  # prefill: leading blocks the worker was asked to grant for a decode
    granting_tail: int = 0  # prefill: prompt tokens in the tail block granted after them (0: none)
    remote_end: int = 0  # end (in blocks) of the handed-off prefix this step's match uses
    tail: int = 0  # decode: tokens of the handed-off tail block this step's match pulls (0: none)
    tail_matches: bool | None = None  # decode: the handoff's tail hash equals ours (None: not checked)
    matched: int = 0  # tokens the last match reported to vLLM
    load_async: bool = False  # the planned load runs asynchronously
    load_block_ids: tuple[int, ...] = ()  # engine blocks the last planned load fills
    load_failed: bool = False  # a load of this request failed: it computes the rest itself
    # An asynchronous load (or pull) is in flight and vLLM has not been told it ended: vLLM
    # itself keeps the blocks of such a request when it is aborted, until finished_recving.
    loading: bool = False
    jobs: set[JobId] = dataclasses.field(default_factory=set)  # unfinished loads and stores
    # A lookup was counted (hits, misses, frequency) since the request was last allocated:
    # vLLM asks again every step it waits, and one prompt is one sighting.
    lookup_counted: bool = False


class SchedulerSide:
    """The connector's scheduler half (see the module docstring)."""

    def __init__(self, config: ConnectorConfig, vllm_config: VllmConfig, kv_cache_config: KVCacheConfig) -> None:
        check_supported(vllm_config, kv_cache_config)
        self._config = config
        self._block_size = vllm_config.cache_config.block_size
        fingerprint = layout_fingerprint(vllm_config)
        self._hasher = BlockHasher(fingerprint)
        self._manager = BlockManager(
            config.kvbm,
            block_size=self._block_size,
            block_bytes=block_bytes(kv_cache_config),
            fingerprint=fingerprint,
            g1_on_host=vllm_config.device_config.device_type == "cpu",
        )
        self._requests: dict[str, _RequestState] = {}
        self._job_owner: dict[JobId, str] = {}
        self._suspect = SuspectBlocks()  # blocks that may derive from a failed load
        # Prefill requests that finished with a handoff whose grant is still to come in this
        # step's worker output: their kv_transfer_params, to complete in place.
        self._awaiting_grants: dict[str, _AwaitedGrant] = {}
        self._running: set[str] = set()  # requests the last step ran, less those finished since
        # Finished requests whose blocks vLLM frees once their copies end (holds for a decode
        # worker do not count: they wait on a remote reader, and preempting beats waiting).
        self._freeing: set[str] = set()
        self._step = KvbmConnectorMetadata()
        self._stats_sent: dict | None = None  # the last snapshot vLLM's stats hook returned
        self._stats_sent_at = -math.inf
        self._side_channel = _configured_side_channel(config)  # else learnt from the worker
        self._remote_stats: dict | None = None
        self._fingerprint = fingerprint
        # Grants are checksummed when the target model's forward ends; with speculative
        # decoding vLLM's model runner lets the drafter write its KV into the same blocks after
        # that, so a grant's checksums would never match: such prefills hand off by hash.
        self._grants_enabled = vllm_config.speculative_config is None
        # The hashes G2/G3 hold, for KV-aware routers (read from the stats server's threads).
        name = config.remote.worker if config.remote is not None else "local"
        self._publication = Publication(name, (Tier.G2, Tier.G3))
        self._publication_lock = threading.Lock()

    @property
    def stats(self) -> KvbmStats:
        """A snapshot taken now. Safe from another thread (the stats server's): it only reads
        ints, set sizes and a latency array under the GIL, never iterates a container the
        scheduler thread changes."""
        return self._manager.stats()

    def stats_for_vllm(self, now: float) -> dict | None:
        """A snapshot for vLLM's per-step stats hook, or None: one every
        :data:`STATS_INTERVAL_S` at most, plus the last one when the engine goes idle (no step
        follows to report it). vLLM calls the hook every step and ships the dict to its
        frontend; a snapshot (latency quantiles, every counter) each step cost a quarter of the
        scheduler's own time under load."""
        # Idle: nothing ran and nothing awaits its copies or a reader. (Steps that only wait
        # for held blocks stay rate-limited: a prefill steps every millisecond while it holds;
        # so does a parked streaming session, whose last second then reaches vLLM's logger
        # only with the next snapshot. The stats endpoint is always current.)
        idle = not self._running and not self._requests
        if now - self._stats_sent_at < STATS_INTERVAL_S and not idle:
            return None
        self._stats_sent_at = now  # also when unchanged: the next comparison waits its interval
        data = self._manager.stats().to_dict()
        if data == self._stats_sent:
            return None
        self._stats_sent = data
        return data

    @property
    def remote_stats(self) -> dict | None:
        """The worker's latest remote endpoint counters (None without ``remote``)."""
        return self._remote_stats

    # -- lookups and loads ---------------------------------------------------------------

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        state = self._state(request)
        if state.jobs:
            return None, False  # a preempted request's old jobs must end before new ones start
        bs = self._block_size
        # Full blocks leave at least one prompt token to compute: vLLM needs logits for the
        # next token. (A handed-off tail covers the prompt's end: vLLM then recomputes its
        # last token itself, as after any full hit.)
        limit = (request.num_tokens - 1) // bs
        start = num_computed_tokens // bs
        state.load_start, state.local_blocks, state.remote_end, state.tail, state.matched = start, 0, 0, 0, 0
        if state.load_failed:
            # A load is tried once per request, like a pull: after a failure vLLM may ask
            # again (it drops a request's blocks when nothing before the failed one loaded),
            # and a fault that persists would make it load and fail forever.
            return 0, False
        blocks = 0
        if limit > start:
            match = self._manager.lookup(self._blocks(state, limit)[:limit], start, count=not state.lookup_counted)
            state.lookup_counted = True
            state.local_blocks = match.num_blocks
            remote_end = self._handed_off_blocks(state, limit)
            state.remote_end = remote_end if remote_end > start + match.num_blocks else 0
            blocks = max(match.num_blocks, state.remote_end - start)
        state.tail = self._handed_off_tail(state, start, blocks)
        if not blocks and not state.tail:
            return 0, False
        # Decided once here: vLLM parks the request (WAITING_FOR_REMOTE_KVS) on this answer.
        # Pulls always run asynchronously (and a tail must: vLLM rewinds the prompt's last
        # token only when an asynchronous load ends).
        state.load_async = state.remote_end > 0 or state.tail > 0 or self._load_async(request.request_id, blocks)
        state.matched = blocks * bs + state.tail
        return state.matched, state.load_async

    def on_new_request(self, request: Request) -> None:
        """A decode request carrying a grant: keep its lease alive from now on, however long
        vLLM queues the request (an expired lease frees the prefill's blocks under the read)."""
        state = self._state(request)
        if state.handoff is not None and state.handoff.grant is not None:
            self._step.keeps.append(state.handoff.grant)

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        state = self._requests.get(request.request_id)
        if state is None:
            return
        state.lookup_counted = False  # a lookup after a preemption is a new sighting
        if num_external_tokens == 0:
            self._release_handoff(state)  # everything was here already
            return
        tail = state.tail if num_external_tokens == state.matched else 0
        start, count = state.load_start, (num_external_tokens - tail) // self._block_size
        block_ids = blocks.get_block_ids()[0][start : start + count + (1 if tail else 0)]
        self._suspect.loaded(block_ids)
        state.load_block_ids = tuple(block_ids)
        local = min(count, state.local_blocks)
        jobs: list = []
        missing: list[int] = []
        if local:
            plan = self._manager.onboard(state.blocks[start : start + local], block_ids[:local])
            self._own(request.request_id, state, plan.jobs)
            jobs, missing = plan.jobs, plan.missing_block_ids.tolist()
        remote = None
        if state.handoff is not None and (count > local or tail):
            # The rest of the load comes from the prefill worker, once: the full blocks after
            # the local ones, then the tail block (always granted: see _handed_off_tail).
            handoff = state.handoff
            positions = list(range(start + local, start + count)) + ([handoff.num_blocks] if tail else [])
            grant = handoff.grant.take(positions) if handoff.grant is not None else None
            tail_hash = handoff.tail_hash if tail else None
            hashes = state.blocks.hashes[start + local : start + count] + ((tail_hash,) if tail_hash else ())
            remote = RemotePull(handoff.source, hashes, list(block_ids[local:]), grant)
            state.handoff = None
        self._release_handoff(state)
        state.loading = state.load_async
        self._step.loads.append(
            RequestLoad(
                req_id=request.request_id,
                jobs=jobs,
                missing_block_ids=missing,
                asynchronous=state.load_async,
                remote=remote,
            )
        )

    def _load_async(self, req_id: str, blocks: int) -> bool:
        """Whether a local (G2/G3) load of ``blocks`` runs asynchronously.

        Every load, unless ``sync_loads`` is set: then a large load runs asynchronously so the
        requests already running are not stalled for it, and the others finish before the
        forward pass, which saves the request the steps an asynchronous one costs (vLLM
        schedules it only after a later step reports the load done).
        """
        if not self._config.sync_loads:
            return True  # fail closed: vLLM rewinds a failed asynchronous load before any compute
        return blocks >= self._config.async_load_min_blocks and bool(self._running - {req_id})

    # -- per-step metadata -----------------------------------------------------------------

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KvbmConnectorMetadata:
        scheduled = scheduler_output.num_scheduled_tokens
        self._running = set(scheduled)
        self._step.preempted = {r for r in scheduler_output.preempted_req_ids or () if r in self._requests}
        for new in scheduler_output.scheduled_new_reqs:
            state = self._requests.get(new.req_id)
            if state is not None:
                state.block_ids = list(new.block_ids[0])
                self._offload_computed(new.req_id, state, new.num_computed_tokens, scheduled[new.req_id])
                self._ask_grant(new.req_id, state, new.num_computed_tokens, scheduled[new.req_id])
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            state = self._requests.get(req_id)
            if state is None:
                continue
            new_ids = cached.new_block_ids[i]
            if req_id in cached.resumed_req_ids:
                state.block_ids = list(new_ids[0]) if new_ids else []
            elif new_ids:
                state.block_ids.extend(new_ids[0])
            self._offload_computed(req_id, state, cached.num_computed_tokens[i], scheduled[req_id])
            self._ask_grant(req_id, state, cached.num_computed_tokens[i], scheduled[req_id])
        # G2 -> G3 demotions belong to no request: nothing waits for them.
        self._step.stores.extend((None, job) for job in self._manager.take_jobs())
        if events := self._manager.take_events():
            with self._publication_lock:
                self._publication.apply(events)
        meta, self._step = self._step, KvbmConnectorMetadata()
        return meta

    def update_connector_output(self, output: KVConnectorOutput) -> None:
        if output.invalid_block_ids:
            invalid = output.invalid_block_ids
            self._suspect.loads_failed(invalid, (s.block_ids for s in self._requests.values()))
            for loading in self._requests.values():
                if loading.load_block_ids and not invalid.isdisjoint(loading.load_block_ids):
                    loading.load_failed = True
        for req_id in output.finished_recving or ():
            if (loaded := self._requests.get(req_id)) is not None:
                loaded.loading = False
        worker_meta = output.kv_connector_worker_meta
        if isinstance(worker_meta, KvbmWorkerMetadata):
            self._side_channel = worker_meta.side_channel or self._side_channel
            self._remote_stats = worker_meta.remote or self._remote_stats
            self._complete_handoffs(worker_meta.grants)
            for result in worker_meta.results:
                result, tainted = self._suspect.settle(result)
                self._manager.complete(result)
                if tainted is not None and (computing := self._requests.get(tainted.req_id)) is not None:
                    # Offer those blocks again once computed right (this reservation held them).
                    computing.offered = min(computing.offered, tainted.first)
                if result.reason:
                    logger.warning(
                        "kvbm job %d failed for %d blocks: %s", result.job_id, len(result.failed), result.reason
                    )
                owner = self._job_owner.pop(result.job_id, None)
                state = self._requests.get(owner) if owner is not None else None
                if state is not None:
                    state.jobs.discard(result.job_id)
                    if not state.jobs:
                        self._freeing.discard(owner)
        for req_id in output.finished_sending or ():
            self._requests.pop(req_id, None)
            self._freeing.discard(req_id)

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        self._running.discard(request.request_id)
        state = self._requests.get(request.request_id)
        if state is None:
            return False, None
        self._release_handoff(state)  # a decode request that ended before its pull
        if state.loading:
            # Aborted while its asynchronous load runs: vLLM keeps the blocks until the worker
            # reports the load ended (finished_recving). Asking vLLM to keep them too would
            # make the worker report the request twice; and its blocks hold no KV to offer.
            del self._requests[request.request_id]
            return False, None
        params = self._hold_for_decode(request, state, block_ids)
        if self._config.kvbm.offload_policy is OffloadPolicy.ON_EVICTION:
            self._offer_finished(request, state, block_ids)
        if state.jobs or (params is not None and params.get(KEY) is not None):
            self._step.await_saves.add(request.request_id)
            if state.jobs:
                self._freeing.add(request.request_id)
            return True, params
        del self._requests[request.request_id]
        return False, params

    def published(self, since: int | None) -> dict[str, Any]:
        """The hashes G2/G3 hold (a snapshot, or a delta since version ``since``)."""
        with self._publication_lock:
            return self._publication.export(since)

    def layout(self) -> dict[str, Any]:
        """How this worker hashes prompts (the layout fingerprint's fields)."""
        return dataclasses.asdict(self._fingerprint)

    def has_pending_block_frees(self) -> bool:
        """Whether finished requests' copies will free blocks soon (vLLM then waits for them
        instead of preempting a running request); copies of running requests free nothing."""
        return bool(self._freeing)

    def shutdown(self) -> None:
        """Flushes G3's index and releases its directory."""
        self._manager.close()

    # -- disaggregated serving -------------------------------------------------------------

    def _hold_for_decode(self, request: Request, state: _RequestState, block_ids: list[int]) -> dict[str, Any] | None:
        """Prefill side: hold the prompt's full blocks for a decode worker; the handoff params
        (a granted request's grant, tail block included, joins them in :meth:`_complete_handoffs`)."""
        if not wants_handoff(request.kv_transfer_params) or request.status in _NO_HANDOFF:
            return None
        if self._side_channel is None:
            logger.warning(
                "kvbm: request %s asks for a remote decode but this worker has no remote "
                "endpoint (set kv_connector_extra_config.remote); the decode recomputes",
                request.request_id,
            )
            return None
        # A decode computes at least one prompt token itself, as here (see get_num_new_matched_tokens).
        count = min(
            (request.num_prompt_tokens - 1) // self._block_size,
            len(block_ids),
            request.num_computed_tokens // self._block_size,
        )
        count = self._suspect.clean_prefix(block_ids, count)  # never hand off KV that may be wrong
        if state.granting:
            count = min(count, state.granting)
        if count < 1:
            return dict(NOTHING_HANDED_OFF)
        hashes = self._blocks(state, count).hashes[:count]
        params = Handoff(self._side_channel, count, hashes[-1]).to_params()
        held = HeldRequest(request.request_id, hashes, list(block_ids[:count]))
        if state.granting:
            tail = state.granting_tail if count == state.granting else 0
            self._awaiting_grants[request.request_id] = _AwaitedGrant(params, held, tail)
        else:
            self._step.holds.append(held)
        return params

    def _ask_grant(self, req_id: str, state: _RequestState, computed: int, scheduled: int) -> None:
        """Prefill side: when this step ends a request a router sent for a remote decode (it
        computes the rest of the prompt and the last token asked for), have the worker grant
        its prompt's full blocks and its tail block right after the forward pass."""
        request = state.request
        prompt = request.num_prompt_tokens
        if (
            state.granting
            or not self._grants_enabled
            or self._side_channel is None
            or not wants_handoff(request.kv_transfer_params)
            or not computed < prompt <= computed + scheduled
            or request.num_output_tokens + 1 < request.max_tokens
        ):
            return
        # The full blocks leave at least one prompt token out (see get_num_new_matched_tokens);
        # the tail block after them holds the rest of the prompt.
        full = (prompt - 1) // self._block_size
        count = self._suspect.clean_prefix(state.block_ids, min(full, len(state.block_ids)))
        if count < 1:
            return
        state.granting = count
        hashes = self._blocks(state, count).hashes[:count]
        block_ids = list(state.block_ids[:count])
        if (
            count == full
            and len(state.block_ids) > count
            and self._suspect.clean_prefix(state.block_ids, count + 1) > count
        ):
            state.granting_tail = prompt - count * self._block_size
            hashes += (self._tail_hash(state, count, prompt),)
            block_ids.append(state.block_ids[count])
        self._step.grants.append(HandoffGrant(req_id, hashes, block_ids))

    def _complete_handoffs(self, grants: dict[str, BlockGrant]) -> None:
        """Put this step's grants into the handoffs of the requests that finished in it; withdraw
        grants whose request did not finish with a handoff; hold by hash those finished whose
        grant did not come (the worker could not grant: the decode asks the side channel)."""
        for req_id, grant in grants.items():
            awaited = self._awaiting_grants.pop(req_id, None)
            if awaited is None:
                self._step.revokes.append(req_id)
                state = self._requests.get(req_id)
                if state is not None:  # still running: if it hands off later, it is held by hash
                    state.granting = state.granting_tail = 0
                continue
            held, tail = awaited.held, awaited.tail_tokens
            count = self._suspect.clean_prefix(held.block_ids, len(held.hashes))
            # The handoff carries the grant only as leased, to the last block: a side-channel
            # release names the lease by its last hash (see BlockSource.release_hashes).
            whole = (
                count == len(held.hashes)
                and len(grant) == count + (1 if tail else 0)
                and (not tail or self._suspect.clean_prefix(list(grant.block_ids), count + 1) > count)
            )
            if not whole:  # a load failure reported in this very output, or fewer blocks held than granted
                self._step.revokes.append(req_id)
                source = self._side_channel
                assert source is not None  # request_finished handed off only with a side channel
                # Only our own entry changes: another connector may share the params' top level.
                awaited.params[KEY] = (
                    None if count < 1 else Handoff(source, count, held.hashes[count - 1]).to_params()[KEY]
                )
                if count >= 1:
                    self._step.holds.append(HeldRequest(req_id, held.hashes[:count], held.block_ids[:count]))
                continue
            attach_grant(awaited.params, grant, tail)
        for req_id, awaited in self._awaiting_grants.items():
            logger.warning("kvbm: no grant came for request %s; its decode pulls it by hash", req_id)
            self._step.holds.append(awaited.held)
        self._awaiting_grants.clear()

    def _handoff_of(self, request: Request) -> Handoff | None:
        handoff = Handoff.from_params(request.kv_transfer_params)
        if handoff is not None and self._config.remote is None:
            logger.warning(
                "kvbm: request %s carries a prefill handoff but this worker has no remote "
                "endpoint (set kv_connector_extra_config.remote); computing it here",
                request.request_id,
            )
            return None
        return handoff

    def _handed_off_blocks(self, state: _RequestState, limit: int) -> int:
        """Decode side: how many leading blocks a remote prefill holds for this request (0: none)."""
        if state.handoff is None:
            return 0
        handoff = state.handoff
        count = handoff.num_blocks
        if count > limit or self._blocks(state, count).hashes[count - 1] != handoff.last_hash:
            logger.warning(
                "kvbm: request %s: the prefill's %d blocks do not match this worker's hashes "
                "of the prompt (another model, layout or prompt?); computing it here",
                state.request.request_id,
                count,
            )
            self._release_handoff(state)
            return 0
        return count

    def _handed_off_tail(self, state: _RequestState, start: int, blocks: int) -> int:
        """Decode side: the prompt tokens of the handoff's tail block this request can pull (0:
        none): when the full blocks before it are covered (vLLM's ``start`` cached ones, then
        ``blocks`` this load brings), the request is the prompt alone (not resumed with
        output), and the tail's hash is ours. Alone (``blocks`` 0) only a tail of more than
        :data:`TAIL_ALONE_MIN_SHARE` of a block: an asynchronous load costs the request a
        step, and computing a few tokens here is cheaper than that."""
        handoff, bs = state.handoff, self._block_size
        if (
            handoff is None
            or not 0 < handoff.tail_tokens <= bs
            or start + blocks != handoff.num_blocks
            or handoff.num_blocks * bs + handoff.tail_tokens != state.request.num_tokens
            or (not blocks and handoff.tail_tokens <= TAIL_ALONE_MIN_SHARE * bs)
        ):
            return 0
        if state.tail_matches is None:
            state.tail_matches = (
                self._tail_hash(state, handoff.num_blocks, state.request.num_tokens) == handoff.tail_hash
            )
            if not state.tail_matches:
                logger.warning(
                    "kvbm: request %s: the prefill's last %d prompt tokens do not match this "
                    "worker's; computing them here",
                    state.request.request_id,
                    handoff.tail_tokens,
                )
        return handoff.tail_tokens if state.tail_matches else 0

    def _release_handoff(self, state: _RequestState) -> None:
        """Free the prefill's hold now (not at its end) when this request will not pull it."""
        if state.handoff is not None:
            handoff = state.handoff
            self._step.releases.append(Release(handoff.source, handoff.last_hash, handoff.grant))
            state.handoff = None

    # -- helpers -----------------------------------------------------------------------------

    def _offload_computed(self, req_id: str, state: _RequestState, computed: int, scheduled: int) -> None:
        """Offer the blocks this step completes (``computed`` tokens done before it)."""
        bs = self._block_size
        # vLLM rewinds a request whose load failed (or that was preempted): blocks from there
        # on are computed again, and offered again once they are.
        state.offered = min(state.offered, computed // bs)
        self._suspect.written(state.block_ids, computed // bs, -(-(computed + scheduled) // bs))
        # Speculative (draft) tokens, and on GPU async scheduling's placeholder, count as
        # scheduled but are not the request's tokens yet: only blocks of real tokens are offered.
        full = min((computed + scheduled) // bs, state.request.num_tokens // bs, len(state.block_ids))
        if full <= state.offered:
            return
        first, state.offered = state.offered, full
        self._offer(req_id, state, state.block_ids, first, full, self._manager.blocks_computed)

    def _offer(self, req_id: str, state: _RequestState, table: list[int], first: int, full: int, offer) -> None:
        """Offer blocks ``first..full`` of a request (``table``: its engine blocks) through
        ``offer``, up to the first that may derive from a failed load."""
        end = self._suspect.clean_prefix(table, full)
        if end <= first:
            return
        jobs = offer(self._blocks(state, end)[first:end], table[first:end])
        self._own(req_id, state, jobs)
        for job in jobs:
            self._suspect.planned(job.job_id, req_id, table[:end], first, job.num_blocks)
        self._step.stores.extend((req_id, job) for job in jobs)

    def _offer_finished(self, request: Request, state: _RequestState, block_ids: list[int]) -> None:
        """ON_EVICTION: offer a finished request's computed full blocks while still intact.

        vLLM reports no G1 evictions; a finished request's blocks are the ones it may now
        evict. ``block_ids`` is vLLM's own list for the request's computed tokens (empty for a
        request preempted and not resumed), and only blocks whose every token was computed and
        written count: not a partly written last block of a request aborted mid-prefill.
        """
        written = request.num_computed_tokens - getattr(request, "num_in_flight_tokens", 0)
        full = min(max(written, 0) // self._block_size, request.num_tokens // self._block_size, len(block_ids))
        if full:
            self._offer(request.request_id, state, list(block_ids), 0, full, self._manager.blocks_evicting)

    def _own(self, req_id: str, state: _RequestState, jobs: list) -> None:
        for job in jobs:
            self._job_owner[job.job_id] = req_id
            state.jobs.add(job.job_id)

    def _state(self, request: Request) -> _RequestState:
        state = self._requests.get(request.request_id)
        if state is None:
            empty = HashedBlocks((), np.zeros((0, self._block_size), dtype=np.int32))
            state = _RequestState(request=request, blocks=empty, handoff=self._handoff_of(request))
            self._requests[request.request_id] = state
        return state

    def _tail_hash(self, state: _RequestState, full: int, end: int) -> BlockHash:
        """The tail hash of the request's tokens ``full * block_size .. end`` (after ``full`` >= 1
        full blocks)."""
        bs, request = self._block_size, state.request
        tokens = np.asarray(request.all_token_ids[full * bs : end], dtype=np.int32)
        return self._hasher.hash_tail(
            tokens, self._blocks(state, full).hashes[full - 1], block_extras(request, bs, full).get(0)
        )

    def _blocks(self, state: _RequestState, count: int) -> HashedBlocks:
        """The request's first ``count`` full blocks, hashed (extends the chain as tokens grow)."""
        have = len(state.blocks)
        if count <= have:
            return state.blocks
        bs, request = self._block_size, state.request
        tokens = np.asarray(request.all_token_ids[have * bs : count * bs], dtype=np.int32)
        parent = state.blocks.hashes[-1] if have else None
        new = self._hasher.hash_prompt(tokens, extras=block_extras(request, bs, have), parent=parent)
        if have:
            state.blocks = HashedBlocks(
                state.blocks.hashes + new.hashes, np.concatenate([state.blocks.tokens, new.tokens])
            )
        else:
            state.blocks = new
        return state.blocks


@dataclasses.dataclass
class _AwaitedGrant:
    params: dict[str, Any]  # the handoff request_finished returned: completed in place
    held: HeldRequest  # what to hold by hash instead, if the grant does not come
    tail_tokens: int = 0  # prompt tokens of the tail block granted after the full ones


def _configured_side_channel(config: ConnectorConfig) -> str | None:
    """Our worker's side channel when its port is configured. With port 0 the worker reports
    the port it got, but only after a step: vLLM hands a step's worker output to the
    connector after it has finished that step's requests, so a prefill finishing in its
    first step could not hand off yet."""
    remote = config.remote
    if remote is None or remote.side_channel_host is None or not remote.side_channel_port:
        return None
    return f"{remote.advertise_host or remote.side_channel_host}:{remote.side_channel_port}"
