"""G1 (CUDA) ↔ G2 (pinned host) copies on a dedicated CUDA stream. Imports torch.

Each job runs in chunks through a fixed device staging buffer laid out like G2 slots
(``[rows, block_bytes]``), so no per-job or per-block device allocation is made:

- store: per layer, ``index_select`` the chunk's blocks into the staging columns of that
  layer (device-side gather), then one ``copy_(non_blocking=True)`` per run of consecutive
  slots into pinned G2;
- load: one pinned→device copy per run of consecutive slots into staging, then per layer
  ``index_copy_`` into the engine's blocks.

Ordering: ``on_submit`` records an event on the submitting thread's current stream and the
copy stream waits on it, so a store reads G1 only after the engine's kernels that wrote it.
Everything after that is ordered on the copy stream; the handler synchronises the stream
before returning, so a finished job's bytes are in place. Checksums are computed on the host
from G2 after the stream is synchronised (stores) or before any copy (loads).
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

from kvbm.ids import JobId
from kvbm.integrity import checksum_rows, mismatched
from kvbm.layout import EngineKV
from kvbm.tiers.host import HostBuffer
from kvbm.transfer.blockcopy import coalesce
from kvbm.transfer.engine import TransferHandler
from kvbm.transfer.jobs import HandlerOutcome, TransferJob


class CudaBlockCopier:
    """Shared state of the CUDA store and load handlers (one stream, one staging buffer)."""

    def __init__(self, g1: EngineKV, g2: HostBuffer, *, staging_bytes: int) -> None:
        import torch

        if not g1.is_cuda:
            raise ValueError("CudaBlockCopier needs G1 on a CUDA device")
        if not g2.pinned:
            raise ValueError("CudaBlockCopier needs a pinned G2 buffer")
        self._torch = torch
        self._device = torch.device(g1.device)
        self._stream = torch.cuda.Stream(device=self._device)
        self._layers = g1.layer_tensors()
        self._offsets = g1.layout.offsets
        self._g2 = g2
        block_bytes = g1.layout.block_bytes
        self._rows = max(1, staging_bytes // block_bytes)
        self._staging = torch.empty((self._rows, block_bytes), dtype=torch.uint8, device=self._device)
        self._host = g2.tensor().view(g2.num_slots, block_bytes)
        self._events: dict[JobId, Any] = {}
        self._lock = threading.Lock()

    def store_handler(self) -> TransferHandler:
        return _Handler(self, self.store)

    def load_handler(self) -> TransferHandler:
        return _Handler(self, self.load)

    def record(self, job: TransferJob) -> None:
        event = self._torch.cuda.Event()
        event.record(self._torch.cuda.current_stream(self._device))
        with self._lock:
            self._events[job.job_id] = event

    def store(self, job: TransferJob) -> HandlerOutcome:
        torch = self._torch
        self._check_ids(job.src_ids, job.dst_ids)
        with torch.cuda.stream(self._stream):
            self._wait_for_engine(job)
            for a in range(0, job.num_blocks, self._rows):
                blocks = job.src_ids[a : a + self._rows]
                stage = self._staging[: len(blocks)]
                index = torch.from_numpy(blocks).to(self._device)
                for layer, off in zip(self._layers, self._offsets):
                    stage[:, off : off + layer.shape[1]].copy_(layer.index_select(0, index))
                slots = job.dst_ids[a : a + self._rows]
                for s, r, k in _slot_runs(slots):
                    self._host[s : s + k].copy_(stage[r : r + k], non_blocking=True)
            self._stream.synchronize()
        return HandlerOutcome(checksums=checksum_rows(self._g2.rows, job.dst_ids))

    def load(self, job: TransferJob) -> HandlerOutcome:
        torch = self._torch
        src, dst = job.src_ids, job.dst_ids
        self._check_ids(dst, src)
        corrupt = np.zeros(0, dtype=np.int64)
        if job.expected_checksums is not None:
            corrupt = mismatched(self._g2.rows, src, job.expected_checksums)
            if len(corrupt):
                keep = np.ones(len(src), dtype=bool)
                keep[corrupt] = False
                src, dst = src[keep], dst[keep]
        with torch.cuda.stream(self._stream):
            self._wait_for_engine(job)
            for a in range(0, len(src), self._rows):
                slots = src[a : a + self._rows]
                stage = self._staging[: len(slots)]
                for s, r, k in _slot_runs(slots):
                    stage[r : r + k].copy_(self._host[s : s + k], non_blocking=True)
                index = torch.from_numpy(dst[a : a + self._rows]).to(self._device)
                for layer, off in zip(self._layers, self._offsets):
                    layer.index_copy_(0, index, stage[:, off : off + layer.shape[1]])
            self._stream.synchronize()
        return HandlerOutcome(corrupt=corrupt)

    def _check_ids(self, block_ids: np.ndarray, slots: np.ndarray) -> None:
        # An out-of-range index on the device is a device-side assert that poisons the CUDA
        # context, so ranges are checked on the host first.
        for what, ids, limit in (
            ("block id", block_ids, self._layers[0].shape[0]),
            ("slot", slots, self._g2.num_slots),
        ):
            if len(ids) and (int(ids.min()) < 0 or int(ids.max()) >= limit):
                raise ValueError(f"{what} out of range [0, {limit})")

    def _wait_for_engine(self, job: TransferJob) -> None:
        with self._lock:
            event = self._events.pop(job.job_id, None)
        if event is not None:
            self._stream.wait_event(event)


class _Handler(TransferHandler):
    def __init__(self, copier: CudaBlockCopier, run: Any) -> None:
        self._copier = copier
        self._run = run

    def on_submit(self, job: TransferJob) -> None:
        self._copier.record(job)

    def run(self, job: TransferJob) -> HandlerOutcome:
        return self._run(job)


def _slot_runs(slots: np.ndarray) -> list[tuple[int, int, int]]:
    """(first slot, first staging row, length) of each run of consecutive slots."""
    starts, rows, lengths = coalesce(slots, np.arange(len(slots), dtype=np.int64))
    return list(zip(starts.tolist(), rows.tolist(), lengths.tolist()))
