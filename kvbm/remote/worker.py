"""One worker's remote endpoint: the facade a connector holds.

It wires the pieces of this package together and forwards to them:

- :class:`~kvbm.remote.agent.NixlTransport` — the NIXL agent (UCX, progress thread off);
- :class:`~kvbm.remote.source.BlockSource` — grants and leases for readers of our blocks;
- :class:`~kvbm.remote.pull.PullEngine` — our pulls from peers;
- :class:`~kvbm.remote.sidechannel.SideChannelServer` — metadata, grants by hash, releases.

(Which hashes a worker serves is published by its scheduler side, where the block manager
lives: :class:`~kvbm.remote.publication.Publication`, served at the stats endpoint's
``/published``.)

Call order:

    w = RemoteWorker(config)             # creates the NIXL agent and the side channel
    w.register(host_tier(g2, layout)); w.register(engine_tier(kv))
    w.metadata                           # snapshot for peers (also served on the side channel)
    w.grant(...) / w.pull(...) / w.pull_hashes(...)
    w.progress() -> [JobResult, ...]     # call often (every engine step): advances pull jobs,
                                         # sends heartbeats and DONE notices
    w.close()

Threads: pulls, grants by id and registration run on the owner's thread. A progress thread
(every ``progress_interval_s``, 1 ms by default, sleeping in between) polls UCX, applies
readers' notices and expires leases, so a source serves reads, hears DONE and frees expired
leases even while its owner is busy or idle (a read from this worker stalls until it polls:
see :mod:`kvbm.remote.agent`). The side channel's threads serve metadata, grants by hash and
releases. ``BlockPinner.pin``/``unpin`` may therefore run on any of these threads,
one at a time (the source's lock).

Dead peers: a reader learns of a dead source from NIXL (``peer_lost``: UCX peer error
handling is on, CMA reads fail at once), from a refused side channel (``unreachable``) or,
when the source hangs, from the job deadline; a source learns of a dead reader when its
heartbeats stop and the lease expires.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from kvbm.ids import BlockHash, JobId, Tier
from kvbm.process.threads import start_thread
from kvbm.remote import exchange
from kvbm.remote.agent import NixlTransport
from kvbm.remote.config import RemoteConfig
from kvbm.remote.leases import LeaseCounters
from kvbm.remote.local import LocalTier
from kvbm.remote.metadata import AgentName, BlockGrant, PeerMetadata, agent_name
from kvbm.remote.pull import PullCounters, PullEngine
from kvbm.remote.sidechannel import SideChannelServer
from kvbm.remote.source import BlockPinner, BlockSource
from kvbm.transfer.jobs import JobResult


@dataclasses.dataclass(frozen=True)
class RemoteStats:
    agent: str
    leases: LeaseCounters
    pulls: PullCounters
    background_errors: int

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class RemoteWorker:
    """The remote endpoint of one worker process (see the module docstring)."""

    def __init__(
        self,
        config: RemoteConfig,
        *,
        clock: Callable[[], float] = time.monotonic,
        incarnation: str | None = None,
        pinner: BlockPinner | None = None,
    ) -> None:
        """Create the NIXL agent ``worker/incarnation`` and start the side channel.

        Raises:
            RemoteError: NIXL could not create the agent.
            OSError: the side channel address cannot be bound.
        """
        self._config = config
        self._clock = clock
        name = agent_name(config.worker, incarnation or os.urandom(4).hex())
        self._transport = NixlTransport(name, config.backends)
        self._tiers: dict[Tier, LocalTier] = {}
        # A grant by hash may wait for its blocks (a prefill registers them at its next step,
        # which a long prefill chunk can delay by seconds), inside the reader's timeout.
        self._source = BlockSource(
            name,
            self._tiers,
            lease_s=config.lease_s,
            clock=clock,
            pinner=pinner,
            ready_timeout_s=config.side_channel_timeout_s * 0.8,
        )
        self._pulls = PullEngine(
            self._transport,
            clock=clock,
            deadline_s=config.pull_deadline_s,
            heartbeat_s=config.heartbeat_s,
            side_channel_timeout_s=config.side_channel_timeout_s,
            notice_interval_s=config.notice_interval_s,
            verify=config.verify,
        )
        self._server: SideChannelServer | None = None
        self._address: str | None = None
        self._results: list[JobResult] = []
        self._metadata = self._snapshot()
        if config.side_channel_host is not None:
            try:
                self._server = SideChannelServer(
                    config.side_channel_host,
                    config.side_channel_port,
                    exchange.server_handlers(
                        lambda: self._metadata, self._source.grant_hashes, self._source.release_hashes
                    ),
                    timeout_s=config.side_channel_timeout_s,
                )
            except OSError:
                self._transport.close()
                raise
            port = self._server.address.rpartition(":")[2]
            self._address = f"{config.advertise_host or config.side_channel_host}:{port}"
            self._source.side_channel = self._address
            self._metadata = self._snapshot()
        self._stop = threading.Event()
        self._background_errors = 0
        self._thread: threading.Thread | None = None
        if config.progress_interval_s > 0:
            self._thread = start_thread(self._background, "kvbm-nixl-progress")

    @property
    def name(self) -> AgentName:
        return self._transport.name

    @property
    def config(self) -> RemoteConfig:
        return self._config

    @property
    def metadata(self) -> PeerMetadata:
        """What peers need to read from us: current after the last ``register``."""
        return self._metadata

    @property
    def side_channel(self) -> str | None:
        """``host:port`` peers dial for our metadata, grants by hash and publication."""
        return self._address

    @property
    def source(self) -> BlockSource:
        return self._source

    @property
    def pulls(self) -> PullEngine:
        return self._pulls

    def tier(self, tier: Tier) -> LocalTier:
        """Raises KeyError: ``tier`` is not registered."""
        return self._tiers[tier]

    def register(self, local: LocalTier) -> None:
        """Register a tier with NIXL; peers can read it once they load the new metadata.

        Raises:
            ValueError: the tier is already registered.
            RemoteError: NIXL refused the memory.
        """
        self._transport.register(local)
        self._tiers[local.tier] = local
        self._metadata = self._snapshot()

    def grant(
        self,
        tier: Tier,
        block_ids: Sequence[int] | np.ndarray,
        hashes: Sequence[BlockHash] = (),
        *,
        checksums: np.ndarray | None = None,
        readers: int = 1,
    ) -> BlockGrant:
        """Lease blocks we hold for remote readers (see :meth:`BlockSource.grant`)."""
        return self._source.grant(tier, block_ids, hashes, checksums=checksums, readers=readers)

    def pull(
        self,
        grant: BlockGrant,
        local_tier: Tier,
        local_ids: Sequence[int] | np.ndarray,
        *,
        metadata: PeerMetadata | None = None,
        deadline_s: float | None = None,
    ) -> JobId:
        """Pull a grant's blocks (see :meth:`PullEngine.submit`)."""
        return self._pulls.submit(grant, local_tier, local_ids, metadata=metadata, deadline_s=deadline_s)

    def pull_hashes(
        self,
        address: str,
        hashes: Sequence[BlockHash],
        local_tier: Tier,
        local_ids: Sequence[int] | np.ndarray,
        *,
        deadline_s: float | None = None,
    ) -> JobId:
        """Pull blocks by hash from the worker at ``address`` (see :meth:`PullEngine.submit_hashes`)."""
        return self._pulls.submit_hashes(address, hashes, local_tier, local_ids, deadline_s=deadline_s)

    def release_hashes(self, address: str, hashes: Sequence[BlockHash]) -> None:
        """Tell the worker at ``address``, in the background, that we will not read the blocks
        it holds ending in ``hashes`` (see :func:`kvbm.remote.exchange.request_release`)."""
        self._pulls.release(address, hashes)

    def release_grant(self, grant: BlockGrant) -> None:
        """Give up a grant we were handed and will not read (see :meth:`PullEngine.release_grant`)."""
        self._pulls.release_grant(grant)

    def progress(self) -> list[JobResult]:
        """Apply readers' notices, expire leases, heartbeat, advance pulls; returns the pull
        jobs that finished."""
        self._serve_notices()
        results, self._results = self._results, []
        return results + self._pulls.poll()

    def wait(self, job_ids: Iterable[JobId], timeout_s: float | None = None) -> dict[JobId, JobResult]:
        """Call ``progress`` until the jobs finished; other jobs' results stay for ``progress``.

        Raises:
            TimeoutError: past ``timeout_s`` (default: the pull deadline plus the side-channel
                timeout plus 1 s; jobs end by their deadlines long before).
        """
        wanted = set(job_ids)
        if timeout_s is None:
            timeout_s = self._config.pull_deadline_s + self._config.side_channel_timeout_s + 1
        limit = self._clock() + timeout_s
        got: dict[JobId, JobResult] = {}
        while wanted - got.keys():
            for result in self.progress():
                if result.job_id in wanted:
                    got[result.job_id] = result
                else:
                    self._results.append(result)
            if not wanted - got.keys():
                break
            if self._clock() > limit:
                raise TimeoutError(f"jobs {sorted(wanted - got.keys())} unfinished after {timeout_s}s")
            time.sleep(0.0002)  # lets the side-channel threads run on small machines
        return got

    def stats(self) -> RemoteStats:
        return RemoteStats(self.name, self._source.counters(), self._pulls.counters(), self._background_errors)

    def close(self) -> None:
        """Stop serving, revoke leases, fail running pulls, release NIXL. Idempotent."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self._server is not None:
            self._server.close()
            self._server = None
        self._results += self._pulls.close()
        self._source.close()
        self._transport.close()

    def __enter__(self) -> RemoteWorker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _snapshot(self) -> PeerMetadata:
        return PeerMetadata(
            agent=self._transport.name,
            nixl=self._transport.metadata_bytes(),
            tiers=self._transport.tiers,
            side_channel=self.side_channel,
        )

    def _serve_notices(self) -> None:
        self._source.handle_notifications(self._transport.take_notifications())
        self._source.expire()

    def _background(self) -> None:
        interval = self._config.progress_interval_s
        while not self._stop.wait(interval):
            try:
                self._serve_notices()
            except Exception:  # a failing unpin hook must not stop UCX progress; counted
                self._background_errors += 1
