"""kvbm's transport between worker processes: NIXL pulls of leased, checksummed blocks.

A reader pulls blocks from a source worker's G1 or G2 straight into its own registered blocks
with one NIXL read per job, verifies them against the checksums the source published, and
tells the source it is done; the source holds the blocks under a lease until then, or until
the reader goes quiet for ``lease_s``. Nothing waits without a deadline.

Flow (decode pulls from prefill)::

    prefill: grant = worker.grant(Tier.G1, block_ids, hashes)        # lease + checksums
             -> grant.to_dict() and worker.metadata.to_dict() travel in kv_transfer_params
    decode:  job = worker.pull(BlockGrant.from_dict(...), Tier.G1, my_block_ids,
                               metadata=PeerMetadata.from_dict(...))
             worker.progress() -> [JobResult(job, failed=[...], reason=...)]
    prefill: its progress thread hears DONE -> BlockPinner.unpin(lease, RELEASED)

Every worker polls UCX from a light progress thread (1 ms, sleeping in between; NIXL's own
progress thread stays off because it spins a core): a source must poll for reads from it to
complete (see :mod:`kvbm.remote.agent` for the measured reasons).

Peer fetch by hash asks the source's side channel instead: ``worker.pull_hashes(address,
hashes, tier, ids)``. Which hashes a worker serves is its scheduler side's to say (the block
manager lives there): routers read its stats endpoint's ``/published``, which folds the
manager's events with ``publication``.

Modules, one job each: ``config`` (settings), ``regions`` (addressable layout of a tier),
``local`` (our tiers: registration views and checksums), ``metadata`` (what peers exchange),
``agent`` (the only NIXL caller), ``notices`` (lease notifications), ``leases`` (source-side
lease table), ``source`` (grants), ``keepalive`` (reader heartbeats), ``pull`` (pull jobs),
``sidechannel`` / ``exchange`` (TCP requests), ``publication`` (servable hashes),
``failures`` (why things fail), ``worker`` (the facade).

Importing this package does not load NIXL; creating a :class:`RemoteWorker` does.
"""

from kvbm.remote.config import RemoteConfig
from kvbm.remote.failures import FailureKind, RemoteError, kind_of
from kvbm.remote.leases import Lease, LeaseEnd
from kvbm.remote.local import LocalTier, engine_tier, host_tier
from kvbm.remote.metadata import AgentName, BlockGrant, LeaseId, PeerMetadata
from kvbm.remote.publication import Publication, PublishedView
from kvbm.remote.regions import MemKind, Region, Segment, TierRegions
from kvbm.remote.source import BlockPinner, PinnedBlocks
from kvbm.remote.worker import RemoteStats, RemoteWorker

__all__ = [
    "AgentName",
    "BlockGrant",
    "BlockPinner",
    "FailureKind",
    "Lease",
    "LeaseEnd",
    "LeaseId",
    "LocalTier",
    "MemKind",
    "PeerMetadata",
    "PinnedBlocks",
    "Publication",
    "PublishedView",
    "Region",
    "RemoteConfig",
    "RemoteError",
    "RemoteStats",
    "RemoteWorker",
    "Segment",
    "TierRegions",
    "engine_tier",
    "host_tier",
    "kind_of",
]
