"""A vLLM request's per-block hash inputs besides its tokens (:class:`~kvbm.hashing.BlockExtras`).

Every input must name the same thing in every process that may share the block (another
worker, a peer, this worker after a restart reading G3), so LoRA adapters are named by what
vLLM's own prefix cache uses, their name and path, and never by ``lora_int_id``: vLLM
assigns that per process, so two processes can give one id to different adapters.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from kvbm.hashing import BlockExtras

if TYPE_CHECKING:
    from vllm.lora.request import LoRARequest
    from vllm.v1.request import Request


def block_extras(request: Request, block_size: int, first_block: int) -> dict[int, BlockExtras]:
    """Per-block hash inputs besides tokens, keyed relative to ``first_block``.

    LoRA adapter and cache salt enter the first block: chaining carries them to every later
    block. A multimodal item enters the block holding its first placeholder token.

    Args:
        request: the vLLM request (``lora_request``, ``cache_salt``, ``mm_features`` are read).
        block_size: tokens per block.
        first_block: index of the first block to hash; blocks before it are left out.
    """
    mm: dict[int, list[str]] = {}
    for feature in getattr(request, "mm_features", None) or ():
        mm.setdefault(feature.mm_position.offset // block_size, []).append(feature.identifier)
    lora = lora_identity(request.lora_request)
    extras: dict[int, BlockExtras] = {}
    for block in sorted(set(mm) | ({0} if first_block == 0 else set())):
        if block < first_block:
            continue
        first = block == 0
        extra = BlockExtras(
            lora=lora if first else None,
            mm_hashes=tuple(mm.get(block, ())),
            cache_salt=request.cache_salt if first else None,
        )
        extras[block - first_block] = extra
    return extras


def lora_identity(lora_request: LoRARequest | None) -> str | None:
    """The adapter's name and path as one unambiguous string; None without an adapter."""
    if lora_request is None:
        return None
    # A JSON list, so no name or path can be read as another split of the two.
    return json.dumps([lora_request.lora_name, lora_request.lora_path])
