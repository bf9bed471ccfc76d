"""Transfer jobs: the messages between the planner (manager) and the mover (transfer engine).

A :class:`TransferJob` names blocks by position on both sides (engine block ids or tier slots)
and carries only numpy arrays, enums and bytes, so it pickles cheaply across vLLM's scheduler
and worker processes. A :class:`JobResult` comes back for every submitted job, success or not.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from kvbm.ids import BlockHash, JobId, Tier

_NO_INDICES = np.zeros(0, dtype=np.int64)
_NO_INDICES.flags.writeable = False


@dataclasses.dataclass(frozen=True)
class TransferJob:
    """Copy block ``src_ids[i]`` of tier ``src`` to ``dst_ids[i]`` of tier ``dst`` for every i.

    ``expected_checksums`` (uint64, one per block), when set, makes the handler verify the
    source bytes before copying them; blocks that fail are not copied and are reported in
    ``JobResult.corrupt``.

    Raises:
        ValueError: ``src == dst``, arrays of different lengths, or non-integer ids.
    """

    job_id: JobId
    src: Tier
    dst: Tier
    src_ids: np.ndarray
    dst_ids: np.ndarray
    hashes: tuple[BlockHash, ...]
    expected_checksums: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.src is self.dst:
            raise ValueError(f"a job must move between two tiers, got {self.src.name} to itself")
        for name in ("src_ids", "dst_ids"):
            ids = np.asarray(getattr(self, name))
            if ids.ndim != 1 or (ids.size and ids.dtype.kind not in "iu"):
                raise ValueError(f"TransferJob.{name} must be a 1-D integer array")
            object.__setattr__(self, name, ids.astype(np.int64, copy=False))
        n = len(self.hashes)
        if len(self.src_ids) != n or len(self.dst_ids) != n:
            raise ValueError(f"{n} hashes, {len(self.src_ids)} src ids, {len(self.dst_ids)} dst ids")
        if self.expected_checksums is not None and len(self.expected_checksums) != n:
            raise ValueError(f"{len(self.expected_checksums)} expected checksums for {n} blocks")

    @property
    def num_blocks(self) -> int:
        return len(self.hashes)


@dataclasses.dataclass(frozen=True)
class HandlerOutcome:
    """What a handler reports for a job it ran to the end.

    Attributes:
        checksums: xxh3_64 of each destination block, when the destination is a kvbm tier.
        corrupt: positions whose source bytes failed verification (not copied).
        failed: positions that did not arrive for another reason, e.g. an I/O error on a
            disk tier (disk full, EIO); with ``corrupt`` they make ``JobResult.failed``.
        reason: why ``failed`` positions failed.
    """

    checksums: np.ndarray | None = None
    corrupt: np.ndarray = dataclasses.field(default_factory=lambda: _NO_INDICES)
    failed: np.ndarray = dataclasses.field(default_factory=lambda: _NO_INDICES)
    reason: str | None = None


@dataclasses.dataclass(frozen=True)
class JobResult:
    """The end of one job.

    Attributes:
        job_id: the job.
        failed: positions (into the job's blocks) that did not arrive intact; every position
            when the handler failed as a whole.
        corrupt: the subset of ``failed`` whose source bytes failed checksum verification.
        checksums: per-block checksums of what was written (stores into a kvbm tier).
        reason: why blocks failed; ``None`` when none did.
        duration_s: submit to completion, by the transfer engine's clock.
    """

    job_id: JobId
    failed: np.ndarray
    corrupt: np.ndarray
    checksums: np.ndarray | None
    reason: str | None
    duration_s: float

    @property
    def ok(self) -> bool:
        return not len(self.failed)


def failed_result(job: TransferJob, reason: str, duration_s: float = 0.0) -> JobResult:
    """A result failing every block of ``job`` (a handler error, a lost worker, a timeout)."""
    return JobResult(
        job_id=job.job_id,
        failed=np.arange(job.num_blocks, dtype=np.int64),
        corrupt=_NO_INDICES,
        checksums=None,
        reason=reason,
        duration_s=duration_s,
    )
