"""The side-channel operations kvbm workers speak, client and server halves side by side.

=============  ========================================  ==========================================
op             request                                   reply
=============  ========================================  ==========================================
``metadata``   —                                         ``metadata``: PeerMetadata dict
``grant``      ``reader``, ``hashes`` (base64 of 16-byte  ``grant``: BlockGrant dict or null,
               hashes)                                   ``metadata``: PeerMetadata dict
``release``    ``hashes`` (as for ``grant``), ``lease``:  ``released``: how many holds ended
               a lease id or null, ``agent``: the
               lease's granting agent or null
=============  ========================================  ==========================================

``release`` tells a source that a reader will not read blocks it holds for it (the reader had
them already), so the source frees them now instead of at the end of its hold. With a ``lease``
(from a grant the reader was handed in a request) exactly that lease ends; without one, the
oldest hold ending in one of ``hashes``.

Client functions raise :class:`~kvbm.remote.failures.RemoteError` (UNREACHABLE) for anything
the peer did not answer properly, including a malformed reply.
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from kvbm.ids import BlockHash
from kvbm.remote.failures import FailureKind, RemoteError
from kvbm.remote.metadata import AgentName, BlockGrant, PeerMetadata, join_hashes, split_hashes
from kvbm.remote.sidechannel import Handler, request


def fetch_metadata(address: str, timeout_s: float) -> PeerMetadata:
    """The metadata of the worker serving ``address``.

    Raises:
        RemoteError: UNREACHABLE.
    """
    reply = request(address, {"op": "metadata"}, timeout_s)
    return _parse(address, lambda: PeerMetadata.from_dict(reply["metadata"]))


def request_grant(
    address: str, reader: AgentName, hashes: Sequence[BlockHash], timeout_s: float
) -> tuple[BlockGrant | None, PeerMetadata]:
    """Ask the worker at ``address`` to lease the longest prefix of ``hashes`` it holds.

    Returns the grant (``None`` when it holds none) and the worker's metadata.

    Raises:
        RemoteError: UNREACHABLE.
    """
    reply = request(address, {"op": "grant", "reader": reader, "hashes": join_hashes(list(hashes))}, timeout_s)

    def parse() -> tuple[BlockGrant | None, PeerMetadata]:
        raw = reply["grant"]
        grant = None if raw is None else BlockGrant.from_dict(raw)
        return grant, PeerMetadata.from_dict(reply["metadata"])

    return _parse(address, parse)


def request_release(
    address: str, hashes: Sequence[BlockHash], timeout_s: float, lease_id: int | None = None, agent: str | None = None
) -> int:
    """Tell the worker at ``address`` we will not read the blocks it holds ending in ``hashes``
    (with ``lease_id``: exactly the blocks of that lease, which must end in one of them, granted
    by ``agent``: a restarted source, whose lease ids start again, ignores it); returns how many
    holds it ended.

    Raises:
        RemoteError: UNREACHABLE.
    """
    reply = request(
        address, {"op": "release", "hashes": join_hashes(list(hashes)), "lease": lease_id, "agent": agent}, timeout_s
    )
    return _parse(address, lambda: int(reply["released"]))


def server_handlers(
    metadata: Callable[[], PeerMetadata],
    grant: Callable[[AgentName, tuple[BlockHash, ...]], BlockGrant | None],
    release: Callable[[tuple[BlockHash, ...], int | None, str | None], int] = lambda hashes, lease_id, agent: 0,
) -> dict[str, Handler]:
    """Handlers for :class:`~kvbm.remote.sidechannel.SideChannelServer` over these callables."""

    def on_metadata(req: Mapping[str, Any]) -> dict[str, Any]:
        return {"metadata": metadata().to_dict()}

    def on_grant(req: Mapping[str, Any]) -> dict[str, Any]:
        reader = req["reader"]
        if not isinstance(reader, str) or not reader:
            raise ValueError("grant needs a reader agent name")
        hashes = split_hashes(base64.b64decode(req["hashes"]))
        got = grant(AgentName(reader), hashes)
        return {"grant": None if got is None else got.to_dict(), "metadata": metadata().to_dict()}

    def on_release(req: Mapping[str, Any]) -> dict[str, Any]:
        lease_id = req.get("lease")
        if lease_id is not None and (isinstance(lease_id, bool) or not isinstance(lease_id, int)):
            raise ValueError(f"lease must be an int or null, got {lease_id!r}")
        agent = req.get("agent")
        if agent is not None and not isinstance(agent, str):
            raise ValueError(f"agent must be a string or null, got {agent!r}")
        return {"released": release(split_hashes(base64.b64decode(req["hashes"])), lease_id, agent)}

    return {"metadata": on_metadata, "grant": on_grant, "release": on_release}


def _parse(address: str, fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except (KeyError, TypeError, ValueError) as exc:
        raise RemoteError(FailureKind.UNREACHABLE, f"side channel {address}: malformed reply ({exc!r})") from None
