"""The NIXL agent of one worker process: the only module that calls NIXL.

Contract (calls from the owner's thread, except ``poll`` and ``take_notifications`` which
any thread may call; the agent is created without NIXL's progress thread, which spins a core,
and with NIXL's STRICT thread sync, so a light poller thread may progress it):

    NixlTransport(name, backends)        # ~0.4 s for the first UCX agent of a process
    register(local_tier)                 # registers its regions, preps its descriptor list
    metadata_bytes()                     # NIXL snapshot: take it after the last register()
    load_peer(PeerMetadata)              # add_remote_agent + prep the peer's descriptor lists;
                                         # replaces an older incarnation of the same worker, or
                                         # an older snapshot of the same agent
    post_read(peer, tier, ids, local_tier, local_ids, notice) -> ReadHandle  # ONE NIXL call
    check(handle) -> bool                # True when done; raises RemoteError on failure
    release(handle) -> bool              # False: NIXL refused (still in flight), retry later
    notify(peer, message) -> bool        # best effort
    poll()                               # one UCX progress pass (buffers notifications)
    take_notifications()                 # {agent name (str): [bytes, ...]}
    close()

NIXL failures raise :class:`~kvbm.remote.failures.RemoteError` with a kind. After any failure
the transport runs one UCX progress pass (buffering the notifications it returns): measured
on UCX 1.5.1/CMA, destroying an agent whose endpoint failed without a progress pass in
between aborts the process (``ucs_arbiter_group_is_empty`` assertion); one pass prevents it.

Who must poll, measured on one host (UCX 1.5.1 in nixl 1.5.1, default transports: CMA for
reads, TCP loopback for notifications because peer error handling is on):

- ``post_read`` copies synchronously through CMA; the request is usually done on return.
- The first read from a new reader completes only after the *source* has polled once (UCX
  wireup): its bytes land, but the request stays pending until then.
- A read carrying a notification, or posted right after a notification to the same peer,
  completes only after the source polls again (about 1.1 ms with the source polling every
  1 ms, for a 64 KiB read that otherwise takes 10-15 us). So lease notices never ride on
  reads here, and readers batch them (:mod:`kvbm.remote.pull`).
- Across hosts reads go over TCP and advance only while both sides poll.

Hence every worker runs a light poller (``RemoteWorker``'s progress thread, 1 ms by default).
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Any

import numpy as np

from kvbm.ids import Tier
from kvbm.remote.failures import FailureKind, RemoteError, from_nixl
from kvbm.remote.local import LocalTier
from kvbm.remote.metadata import AgentName, PeerMetadata, worker_of
from kvbm.remote.regions import TierRegions


@dataclasses.dataclass
class _Peer:
    metadata: PeerMetadata
    dlists: dict[Tier, Any]  # prepped remote descriptor list per tier
    errors: dict[Tier, RemoteError]  # tiers whose descriptors NIXL refused


@dataclasses.dataclass(eq=False)
class ReadHandle:
    """An in-flight NIXL read (opaque to callers)."""

    peer: AgentName
    xfer: Any
    num_blocks: int
    done: bool = False
    released: bool = False
    error: RemoteError | None = None  # set when the peer was dropped under the read


class NixlTransport:
    """One NIXL agent with registered tiers and loaded peers (see the module docstring)."""

    def __init__(self, name: AgentName, backends: tuple[str, ...] = ("UCX",)) -> None:
        """Create the agent (imports nixl).

        Raises:
            RemoteError: NIXL could not create the agent or a backend.
        """
        from nixl._api import nixl_agent, nixl_agent_config, nixl_thread_sync_t

        conf = nixl_agent_config(
            enable_prog_thread=False,
            enable_listen_thread=False,
            backends=list(backends),
            sync_mode=nixl_thread_sync_t.NIXL_THREAD_SYNC_STRICT,
        )
        try:
            self._agent = nixl_agent(name, conf)
        except Exception as exc:
            raise from_nixl(exc, f"creating NIXL agent {name!r}") from exc
        missing = [b for b in backends if b not in self._agent.backends]
        if missing:
            raise RemoteError(FailureKind.NIXL_ERROR, f"NIXL backends not available: {missing}")
        self._name = name
        self._tiers: dict[Tier, tuple[LocalTier, Any, Any]] = {}  # tier -> (local, reg dlist, prepped)
        self._peers: dict[AgentName, _Peer] = {}
        self._reads: dict[AgentName, set[ReadHandle]] = {}  # unreleased reads per peer
        self._notifs: dict[str, list[bytes]] = {}
        self._notifs_lock = threading.Lock()
        self._closed = False

    @property
    def name(self) -> AgentName:
        return self._name

    @property
    def tiers(self) -> tuple[TierRegions, ...]:
        return tuple(t[0].regions for t in self._tiers.values())

    def local_tier(self, tier: Tier) -> LocalTier:
        """Raises KeyError: ``tier`` is not registered."""
        return self._tiers[tier][0]

    def register(self, local: LocalTier) -> None:
        """Register a tier's memory and prep its descriptor list.

        Raises:
            ValueError: the tier is already registered.
            RemoteError: NIXL refused the memory.
        """
        if local.tier in self._tiers:
            raise ValueError(f"{local.tier.name} is already registered")
        regions = local.regions
        mem = regions.mem.value
        try:
            reg = self._agent.register_memory(regions.registration(), mem)
            prepped = self._agent.prep_xfer_dlist("NIXL_INIT_AGENT", regions.descriptors(), mem)
        except Exception as exc:
            raise from_nixl(exc, f"registering {local.tier.name}") from exc
        self._tiers[local.tier] = (local, reg, prepped)

    def metadata_bytes(self) -> bytes:
        """NIXL's metadata snapshot of this agent (covers memory registered so far)."""
        return bytes(self._agent.get_agent_metadata())

    def has_peer(self, agent: str) -> bool:
        return agent in self._peers

    def peer_of_worker(self, worker: str) -> AgentName | None:
        """The loaded incarnation of ``worker``, if any."""
        for agent in self._peers:
            if worker_of(agent) == worker:
                return agent
        return None

    def load_peer(self, metadata: PeerMetadata) -> None:
        """Make ``metadata``'s agent readable. A loaded older incarnation of the same worker,
        or a different snapshot of the same agent (it registered more memory since), is
        dropped first; loading identical metadata again is a no-op.

        A tier whose descriptors NIXL refuses (for instance regions larger than what the peer
        registered) is remembered as failed: reads from it raise that error.

        Raises:
            RemoteError: NIXL rejected the metadata.
        """
        loaded_now = self._peers.get(metadata.agent)
        if loaded_now is not None:
            if loaded_now.metadata.to_dict() == metadata.to_dict():
                return
            self.forget_peer(metadata.agent)
        older = self.peer_of_worker(metadata.worker)
        if older is not None:
            self.forget_peer(older)
        try:
            loaded = self._agent.add_remote_agent(metadata.nixl)
        except Exception as exc:
            self._progress()
            raise from_nixl(exc, f"loading metadata of {metadata.agent!r}") from exc
        if isinstance(loaded, bytes):
            loaded = loaded.decode()
        if loaded != metadata.agent:
            self._agent.remove_remote_agent(loaded)
            raise RemoteError(
                FailureKind.BAD_DESCRIPTORS, f"metadata names agent {loaded!r}, expected {metadata.agent!r}"
            )
        peer = _Peer(metadata, {}, {})
        for regions in metadata.tiers:
            try:
                peer.dlists[regions.tier] = self._agent.prep_xfer_dlist(
                    metadata.agent, regions.descriptors(), regions.mem.value
                )
            except Exception as exc:
                peer.errors[regions.tier] = from_nixl(exc, f"{metadata.agent} {regions.tier.name} descriptors")
        self._peers[metadata.agent] = peer
        # Start UCX's wireup now rather than on the first read; it completes once the peer
        # polls (until then a first read's bytes can land while its request stays pending).
        _quietly(self._agent.make_connection, metadata.agent)

    def forget_peer(self, agent: AgentName) -> None:
        """Drop a peer's descriptor lists and NIXL connection; unknown agents are ignored.
        Reads still in flight from it are aborted and fail with STALE_PEER."""
        peer = self._peers.pop(agent, None)
        if peer is None:
            return
        for handle in self._reads.pop(agent, set()):
            handle.error = RemoteError(FailureKind.STALE_PEER, f"{agent} was dropped during the read")
            _quietly(handle.xfer.release)
            handle.released = True
        for dlist in peer.dlists.values():
            _quietly(dlist.release)
        _quietly(self._agent.remove_remote_agent, agent)
        self._progress()

    def post_read(
        self,
        peer: AgentName,
        tier: Tier,
        block_ids: np.ndarray,
        local_tier: Tier,
        local_ids: np.ndarray,
        notice: bytes = b"",
    ) -> ReadHandle:
        """Read blocks ``block_ids`` of the peer's ``tier`` into ``local_ids`` of our
        ``local_tier``, in one NIXL request. A ``notice`` reaches the peer when the read is
        done, but then the read completes only once the peer polls (see the module docstring).

        If NIXL refuses to release a failed request, it stays tracked and is released by
        ``forget_peer`` or ``close``.

        Raises:
            RemoteError: unknown peer (UNKNOWN_PEER); a tier the peer does not serve, layouts
                that differ or ids out of range (BAD_DESCRIPTORS); a NIXL failure.
        """
        entry = self._peers.get(peer)
        if entry is None:
            raise RemoteError(FailureKind.UNKNOWN_PEER, f"no metadata loaded for {peer!r}")
        if tier in entry.errors:
            raise entry.errors[tier]
        remote = entry.metadata.tier(tier)
        if remote is None or tier not in entry.dlists:
            raise RemoteError(FailureKind.BAD_DESCRIPTORS, f"{peer} does not serve {tier.name}")
        if local_tier not in self._tiers:
            raise RemoteError(FailureKind.BAD_DESCRIPTORS, f"{local_tier.name} is not registered here")
        local, _, local_dlist = self._tiers[local_tier]
        if remote.segment_lengths != local.regions.segment_lengths:
            raise RemoteError(
                FailureKind.BAD_DESCRIPTORS,
                f"layouts differ: {peer} {tier.name} segments {remote.segment_lengths}, "
                f"local {local_tier.name} {local.regions.segment_lengths}",
            )
        try:
            remote_idx = remote.descriptor_indices(block_ids)
            local_idx = local.regions.descriptor_indices(local_ids)
        except ValueError as exc:
            raise RemoteError(FailureKind.BAD_DESCRIPTORS, str(exc)) from None
        handle = None
        try:
            xfer = self._agent.make_prepped_xfer("READ", local_dlist, local_idx, entry.dlists[tier], remote_idx, notice)
            handle = ReadHandle(peer, xfer, len(block_ids))
            self._reads.setdefault(peer, set()).add(handle)
            state = self._agent.transfer(xfer)
        except Exception as exc:
            if handle is not None:
                self.release(handle)
            self._progress()
            raise from_nixl(exc, f"reading {len(block_ids)} blocks from {peer}") from exc
        if state == "ERR":
            self.release(handle)
            self._progress()
            raise RemoteError(FailureKind.NIXL_ERROR, f"posting a read from {peer} failed")
        handle.done = state == "DONE"
        return handle

    def check(self, handle: ReadHandle) -> bool:
        """Whether the read has finished.

        Raises:
            RemoteError: the read failed (the handle still needs ``release``).
        """
        if handle.error is not None:
            raise handle.error
        if handle.done:
            return True
        try:
            state = self._agent.check_xfer_state(handle.xfer)
        except Exception as exc:
            self._progress()
            raise from_nixl(exc, f"reading from {handle.peer}") from exc
        if state == "ERR":
            self._progress()
            raise RemoteError(FailureKind.NIXL_ERROR, f"read from {handle.peer} failed")
        handle.done = state == "DONE"
        return handle.done

    def release(self, handle: ReadHandle) -> bool:
        """Free the NIXL request (aborting it if in flight). False when NIXL refused: the
        destination blocks may still be written, keep them out of use and retry."""
        if handle.released:
            return True
        try:
            handle.xfer.release()
        except Exception:
            self._progress()
            return False
        handle.released = True
        reads = self._reads.get(handle.peer)
        if reads is not None:
            reads.discard(handle)
        return True

    def notify(self, peer: AgentName, message: bytes) -> bool:
        """Send a notification; False when it could not be sent (unknown or lost peer)."""
        if peer not in self._peers:
            return False
        try:
            self._agent.send_notif(peer, message)
        except Exception:
            self._progress()
            return False
        return True

    def poll(self) -> None:
        """One UCX progress pass; notifications it brings are kept for ``take_notifications``."""
        self._progress()

    def take_notifications(self) -> dict[str, list[bytes]]:
        """Notifications received since the last call, by sender agent name (after one UCX
        progress pass). Each notification is returned once, whichever thread takes it."""
        self._progress()
        with self._notifs_lock:
            out, self._notifs = self._notifs, {}
        return out

    def close(self) -> None:
        """Drop peers, release descriptor lists and deregister memory. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for agent in list(self._peers):
            self.forget_peer(agent)
        for _, reg, prepped in self._tiers.values():
            _quietly(prepped.release)
            _quietly(self._agent.deregister_memory, reg)
        self._tiers.clear()
        self._progress()

    def _progress(self) -> None:
        try:
            new = self._agent.get_new_notifs()
        except Exception:  # a progress pass must never turn into a second failure
            return
        if not new:
            return
        with self._notifs_lock:
            for sender, messages in new.items():
                key = sender.decode() if isinstance(sender, bytes) else sender
                self._notifs.setdefault(key, []).extend(messages)


def _quietly(fn: Any, *args: Any) -> None:
    try:
        fn(*args)
    except Exception:  # cleanup of a lost peer; the failure was already reported
        pass
