"""The ``kv_transfer_params`` a prefill worker hands to a decode worker, and back.

A router sends the prompt to a prefill worker with ``{"do_remote_decode": true}``; the
prefill's reply carries :meth:`Handoff.to_params`, which the router passes unchanged in the
decode request. The decode worker reads it with :meth:`Handoff.from_params`.

The handoff carries a :class:`~kvbm.remote.BlockGrant` (:func:`attach_grant`): the prefill's
engine block ids, their hashes and checksums, under a lease its worker took in the step that
computed them. The decode pulls those blocks at once over NIXL (the prefill's metadata is
fetched once per prefill incarnation and cached), verifies the checksums and ends the lease;
nothing is asked of the prefill per request. A handoff without a grant (the request ended in
a later step than its prompt, or the grant failed) is pulled by hash from the prefill's side
channel, which pins whatever prefix it still holds. ``last_hash`` lets the decode check,
before it allocates anything, that it hashes the prompt exactly as the prefill did (same
model, layout, salt and tokens): hashes are chained, so equal last hashes mean every block
matches. Anything malformed is no handoff at all: the decode computes the prompt itself.

A granted handoff also carries the prompt's last block (``tail_tokens`` > 0): the 1 to
``block_size`` prompt tokens after the full blocks, the grant's last entry, named by its tail
hash (:meth:`~kvbm.hashing.BlockHasher.hash_tail`). With it the decode computes only the
prompt's last token, as vLLM does after any full hit, instead of up to a block of tokens the
prefill already computed.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Mapping
from typing import Any

from kvbm.ids import BlockHash, Tier
from kvbm.remote.metadata import BlockGrant

logger = logging.getLogger(__name__)

KEY = "kvbm"  # our entry inside kv_transfer_params; vLLM's own keys sit beside it
_ADDRESS_RE = re.compile(r"^[A-Za-z0-9_.\-\[\]:]{1,255}:\d{1,5}$")


@dataclasses.dataclass(frozen=True)
class Handoff:
    """Blocks a prefill worker holds for one decode request.

    Attributes:
        source: the prefill worker's side channel, ``host:port``.
        num_blocks: how many leading full blocks of the prompt it holds.
        last_hash: the chained hash of the last of them.
        grant: the prefill's grant of those blocks (None: pull them by hash); with a tail,
            its last entry is the tail's block.
        tail_tokens: how many prompt tokens follow the full blocks in the granted tail block
            (0: no tail; always 0 without a grant).
    """

    source: str
    num_blocks: int
    last_hash: BlockHash
    grant: BlockGrant | None = None
    tail_tokens: int = 0

    @property
    def tail_hash(self) -> BlockHash | None:
        """The granted tail block's hash (None without a tail)."""
        return self.grant.hashes[self.num_blocks] if self.tail_tokens and self.grant is not None else None

    @property
    def release_hash(self) -> BlockHash:
        """The hash a side-channel release of this handoff names: the last block of its grant
        (the tail, when it has one), else the last full block."""
        return self.grant.hashes[-1] if self.grant is not None else self.last_hash

    def to_params(self) -> dict[str, Any]:
        """The reply's ``kv_transfer_params`` (JSON-safe)."""
        entry: dict[str, Any] = {
            "source": self.source,
            "num_blocks": self.num_blocks,
            "last_hash": self.last_hash.hex(),
        }
        if self.grant is not None:
            entry["grant"] = self.grant.to_dict()
            if self.tail_tokens:
                entry["tail_tokens"] = self.tail_tokens
        # do_remote_prefill tells vLLM on the decode side that this request's KV comes from
        # a remote prefill (it reports the fetch in its request stats).
        return {"do_remote_prefill": True, "do_remote_decode": False, KEY: entry}

    @classmethod
    def from_params(cls, params: Mapping[str, Any] | None) -> Handoff | None:
        """The handoff in a request's ``kv_transfer_params``; None when absent, empty
        (:data:`NOTHING_HANDED_OFF`) or malformed."""
        if not params or params.get(KEY) is None:
            return None
        entry = params[KEY]
        try:
            source, count, last = entry["source"], entry["num_blocks"], bytes.fromhex(entry["last_hash"])
            if not isinstance(source, str) or not _ADDRESS_RE.match(source):
                raise ValueError(f"bad source {source!r}")
            if isinstance(count, bool) or not isinstance(count, int) or count < 1:
                raise ValueError(f"bad num_blocks {count!r}")
            if len(last) != 16:
                raise ValueError("last_hash is not 16 bytes")
            tail = entry.get("tail_tokens", 0)
            if isinstance(tail, bool) or not isinstance(tail, int) or tail < 0:
                raise ValueError(f"bad tail_tokens {tail!r}")
            grant = _grant_of(entry.get("grant"), count, last, tail)
        except (TypeError, KeyError, ValueError) as error:
            logger.warning("kvbm: ignoring malformed kv_transfer_params[%r] (%s); computing the prompt", KEY, error)
            return None
        return cls(source, count, BlockHash(last), grant, tail)


def attach_grant(params: dict[str, Any], grant: BlockGrant, tail_tokens: int = 0) -> None:
    """Put ``grant`` (with a tail block last when ``tail_tokens``) into handoff ``params``
    (from :meth:`Handoff.to_params`) in place.

    The scheduler answers ``request_finished`` before it hears the step's worker output, which
    holds the grant; vLLM sends the request's output, this dict in it, only after both.
    """
    params[KEY]["grant"] = grant.to_dict()
    if tail_tokens:
        params[KEY]["tail_tokens"] = tail_tokens


def _grant_of(raw: Any, count: int, last: bytes, tail_tokens: int) -> BlockGrant | None:
    """The grant in a handoff entry (None when absent); ValueError when it does not name
    exactly the handed-off G1 blocks (and the tail block, with ``tail_tokens``)."""
    if raw is None:
        if tail_tokens:
            raise ValueError("tail_tokens without a grant")
        return None
    if not isinstance(raw, Mapping):
        raise ValueError("grant is not an object")
    grant = BlockGrant.from_dict(raw)
    blocks = count + (1 if tail_tokens else 0)
    if (
        grant.tier is not Tier.G1
        or len(grant) != blocks
        or len(grant.hashes) != blocks
        or grant.hashes[count - 1] != last
    ):
        raise ValueError(
            f"grant of {len(grant)} {grant.tier.name} blocks does not match the {count} handed off"
            + (" and their tail" if tail_tokens else "")
        )
    return grant


# A prefill's answer when it holds nothing for the decode (a prompt under two blocks): the
# decode computes the prompt, and the router still sees that the prefill answered properly.
NOTHING_HANDED_OFF: dict[str, Any] = {"do_remote_prefill": False, "do_remote_decode": False, KEY: None}


def wants_handoff(params: Mapping[str, Any] | None) -> bool:
    """True when the router asked this (prefill) request to leave its KV for a decode worker."""
    return params is not None and params.get("do_remote_decode") is True
