"""The ``kv_transfer_params`` a prefill worker hands to a decode worker, and back.

A router sends the prompt to a prefill worker with ``{"do_remote_decode": true}``; the
prefill's reply carries :meth:`Handoff.to_params`, which the router passes unchanged in the
decode request. The decode worker reads it with :meth:`Handoff.from_params`.

The handoff names no engine block ids: the decode pulls by block hash from the prefill's side
channel, which pins whatever prefix the prefill still holds. ``last_hash`` lets the decode
check, before it allocates anything, that it hashes the prompt exactly as the prefill did
(same model, layout, salt and tokens): hashes are chained, so equal last hashes mean every
block matches. Anything malformed is no handoff at all: the decode computes the prompt itself.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Mapping
from typing import Any

from kvbm.ids import BlockHash

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
    """

    source: str
    num_blocks: int
    last_hash: BlockHash

    def to_params(self) -> dict[str, Any]:
        """The reply's ``kv_transfer_params`` (JSON-safe)."""
        entry = {"source": self.source, "num_blocks": self.num_blocks, "last_hash": self.last_hash.hex()}
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
        except (TypeError, KeyError, ValueError) as error:
            logger.warning("kvbm: ignoring malformed kv_transfer_params[%r] (%s); computing the prompt", KEY, error)
            return None
        return cls(source, count, BlockHash(last))


# A prefill's answer when it holds nothing for the decode (a prompt under two blocks): the
# decode computes the prompt, and the router still sees that the prefill answered properly.
NOTHING_HANDED_OFF: dict[str, Any] = {"do_remote_prefill": False, "do_remote_decode": False, KEY: None}


def wants_handoff(params: Mapping[str, Any] | None) -> bool:
    """True when the router asked this (prefill) request to leave its KV for a decode worker."""
    return bool(params) and params.get("do_remote_decode") is True
