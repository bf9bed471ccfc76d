"""Transfer handlers between registered engine memory (G1) and the host tier buffer (G2).

``host_handlers`` picks the implementation from where G1 lives: numpy copies for host memory
(this module), CUDA stream copies for GPU memory (``kvbm.transfer.cuda_copy``, imported only
then). Either way a store returns the xxh3_64 checksum of every slot it wrote, and a load given
``expected_checksums`` verifies each source slot first and leaves corrupt blocks uncopied
(reported in ``HandlerOutcome.corrupt``).

Stores checksum each chunk right after copying it, while the slots are still in cache.
"""

from __future__ import annotations

import numpy as np

from kvbm.ids import Tier
from kvbm.integrity import checksum_rows, mismatched
from kvbm.layout import EngineKV
from kvbm.tiers.host import HostBuffer
from kvbm.transfer.blockcopy import gather_blocks, scatter_blocks
from kvbm.transfer.engine import TransferHandler
from kvbm.transfer.jobs import HandlerOutcome, TransferJob

_CHUNK_BYTES = 4 << 20  # a chunk of slots still in cache when its checksums are computed


def host_handlers(
    g1: EngineKV, g2: HostBuffer, *, cuda_staging_bytes: int = 64 << 20
) -> dict[tuple[Tier, Tier], TransferHandler]:
    """Handlers for (G1, G2) and (G2, G1) over ``g1`` and ``g2``.

    Raises:
        ValueError: G2's slot size differs from G1's block size, or G1 is on a GPU and G2
            is not pinned.
    """
    if g1.layout.block_bytes != g2.block_bytes:
        raise ValueError(f"G2 slots of {g2.block_bytes} bytes cannot hold G1 blocks of {g1.layout.block_bytes}")
    if g1.is_cuda:
        if not g2.pinned:
            raise ValueError("G1 is on a GPU: G2 must be pinned (HostBuffer(..., pinned=True))")
        from kvbm.transfer.cuda_copy import CudaBlockCopier

        copier = CudaBlockCopier(g1, g2, staging_bytes=cuda_staging_bytes)
        return {(Tier.G1, Tier.G2): copier.store_handler(), (Tier.G2, Tier.G1): copier.load_handler()}
    return {(Tier.G1, Tier.G2): HostStoreHandler(g1, g2), (Tier.G2, Tier.G1): HostLoadHandler(g1, g2)}


class HostStoreHandler(TransferHandler):
    """G1 (host memory) → G2: gather engine blocks into slots, then checksum the slots."""

    def __init__(self, g1: EngineKV, g2: HostBuffer) -> None:
        self._layers = g1.layer_arrays()
        self._offsets = g1.layout.offsets
        self._rows = g2.rows
        self._chunk = max(1, _CHUNK_BYTES // g2.block_bytes)

    def run(self, job: TransferJob) -> HandlerOutcome:
        sums = []
        for a in range(0, job.num_blocks, self._chunk):
            src, dst = job.src_ids[a : a + self._chunk], job.dst_ids[a : a + self._chunk]
            gather_blocks(self._layers, self._offsets, src, self._rows, dst)
            sums.append(checksum_rows(self._rows, dst))
        checksums = np.concatenate(sums) if sums else np.zeros(0, dtype=np.uint64)
        return HandlerOutcome(checksums=checksums)


class HostLoadHandler(TransferHandler):
    """G2 → G1 (host memory): verify slots when checksums are given, scatter the good ones."""

    def __init__(self, g1: EngineKV, g2: HostBuffer) -> None:
        self._layers = g1.layer_arrays()
        self._offsets = g1.layout.offsets
        self._rows = g2.rows
        self._chunk = max(1, _CHUNK_BYTES // g2.block_bytes)

    def run(self, job: TransferJob) -> HandlerOutcome:
        expected = job.expected_checksums
        if expected is None:
            scatter_blocks(self._rows, job.src_ids, self._layers, self._offsets, job.dst_ids)
            return HandlerOutcome()
        bad = []
        for a in range(0, job.num_blocks, self._chunk):
            src, dst = job.src_ids[a : a + self._chunk], job.dst_ids[a : a + self._chunk]
            wrong = mismatched(self._rows, src, expected[a : a + self._chunk])
            if len(wrong):
                keep = np.ones(len(src), dtype=bool)
                keep[wrong] = False
                src, dst = src[keep], dst[keep]
                bad.append(wrong + a)
            scatter_blocks(self._rows, src, self._layers, self._offsets, dst)
        corrupt = np.concatenate(bad) if bad else np.zeros(0, dtype=np.int64)
        return HandlerOutcome(corrupt=corrupt)
