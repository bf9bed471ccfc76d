"""G3 data plane: slot files read and written in batches by a pool of preadv/pwritev threads.

Slot ``s`` lives in file ``s // slots_per_file`` at offset ``(s % slots_per_file) * slot_stride``
(``kvbm.tiers.disk.layout``). A batch is sorted by slot and cut into runs of consecutive slots
in one file, each run into tasks of at most ``chunk_bytes``; every task is one ``pwritev`` or
``preadv`` on the pool, so several requests are in flight at once (the disk's read floor needs
about four) and the GIL is released while the kernel copies.

O_DIRECT is used when ``direct_io`` is set and the filesystem accepts it (probed at open with an
aligned read); otherwise buffered I/O, with the reason logged once. With O_DIRECT, rows whose
address and size are 4 KiB multiples (G2's page-aligned buffer with 4 KiB-multiple blocks) go to
the kernel as they are, one iovec per row; other rows are bounced through a per-thread aligned
buffer. Buffered I/O takes any row.

Failures never raise out of a batch: :class:`IoOutcome` names the positions that failed (an
errno: disk full, EIO, a file size limit) and the positions read short (past the
end of a truncated file: their rows are zeroed and they count as integrity failures). A batch
of writes is durable when ``write_rows`` returns: each file it touched is fdatasync'ed once, and
a failed sync fails every position written to that file. A task whose one multi-block call
fails is retried block by block, so a bad sector costs its own block, not the whole run.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import mmap
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future

import numpy as np

from kvbm.burst_log import BurstLog
from kvbm.integrity import checksum_rows
from kvbm.process.threads import thread_pool
from kvbm.tiers.base import SlotStore
from kvbm.tiers.disk.layout import SLOT_ALIGN, G3Directory

logger = logging.getLogger(__name__)

CHUNK_BYTES = 4 << 20
"""Bytes per I/O task. A one-off comparison of 1, 4 and 8 MiB tasks on 4 threads found 4 MiB
best or within noise for 64 KiB and 2 MiB blocks."""

_IOV_MAX = min(os.sysconf("SC_IOV_MAX"), 1024) if hasattr(os, "sysconf") else 1024
_EMPTY = np.zeros(0, dtype=np.int64)


@dataclasses.dataclass(frozen=True)
class IoOutcome:
    """What a batch did. Positions index the batch's ``slots``.

    Attributes:
        failed: positions not written/read because of an I/O error.
        short: positions read short (the file ends before them); their rows are zeroed.
        error: the first error's text, ``None`` when nothing failed.
    """

    failed: np.ndarray
    short: np.ndarray
    error: str | None

    @property
    def ok(self) -> bool:
        return not len(self.failed) and not len(self.short)


TaskResult = tuple[int | np.ndarray, str | None]
"""(blocks done from the start of the task, or a mask of the blocks done when the task was
retried block by block; the first error or None)."""

SyncFiles = Callable[[list[int]], list[tuple[int, str | None]]]
"""fdatasync these files; returns (file index, error or None) for each."""


class IoBatch:
    """A batch submitted to the pool; ``wait`` returns its :class:`IoOutcome` once. A write
    batch (``sync`` given) syncs every file it wrote before ``wait`` returns."""

    def __init__(
        self,
        tasks: list[tuple[np.ndarray, Future[TaskResult]]],
        files: np.ndarray,
        sync: SyncFiles | None,
        errors: BurstLog,
    ) -> None:
        self._tasks = tasks
        self._files = files
        self._sync = sync
        self._errors = errors

    def wait(self) -> IoOutcome:
        failed, short, error = [], [], None
        written: dict[int, list[np.ndarray]] = {}
        for positions, future in self._tasks:
            done, err = future.result()
            if isinstance(done, np.ndarray):  # retried block by block: ``done`` is a mask
                failed.append(positions[~done])
                error = error or err
                ok = positions[done]
            elif done < len(positions):
                rest = positions[done:]
                if err is None and self._sync is None:
                    short.append(rest)
                else:
                    failed.append(rest)
                    error = error or err or "short write"
                ok = positions[:done]
            else:
                ok = positions
            if self._sync is not None and len(ok):
                written.setdefault(int(self._files[positions[0]]), []).append(ok)
        for file_index, err in self._sync(list(written)) if self._sync is not None and written else ():
            if err is not None:
                failed.extend(written[file_index])
                error = error or f"fdatasync: {err}"
        outcome = IoOutcome(_cat(failed), _cat(short), error)
        if len(outcome.failed):
            self._errors.report(len(outcome.failed), outcome.error or "I/O error")
        return outcome


class DiskSlotStore(SlotStore):
    """SlotStore over the slot files of an open :class:`G3Directory` (which it closes).
    Thread-safe: batches may be submitted and waited on from several threads at once.

    Raises:
        OSError: a slot file cannot be opened at all.
    """

    def __init__(
        self,
        directory: G3Directory,
        *,
        direct_io: bool = True,
        io_threads: int = 4,
        chunk_bytes: int = CHUNK_BYTES,
        errors: BurstLog | None = None,
    ) -> None:
        layout = directory.layout
        self._dir = directory
        self._layout = layout
        self._block_bytes = layout.block_bytes
        self._stride = layout.slot_stride
        self._errors = errors or BurstLog(logger, f"G3 I/O errors in {directory.path}")
        self._fds: list[int] = []
        self._direct = False
        self._fallback_reason: str | None = "disabled by g3_direct_io" if not direct_io else None
        try:
            if direct_io:
                self._direct, self._fallback_reason = self._open_direct()
            if not self._direct:
                self._close_fds()
                self._fds = [directory.open_slot_file(i, os.O_RDWR) for i in range(layout.num_files)]
                if direct_io:
                    logger.warning(
                        "G3 %s: O_DIRECT refused (%s); using buffered I/O", directory.path, self._fallback_reason
                    )
        except BaseException:
            self._close_fds()
            raise
        per_task = max(1, chunk_bytes // self._stride)
        self._per_task = min(per_task, _IOV_MAX // 2)
        self._pool = thread_pool(io_threads, "kvbm-g3-io")
        self._local = threading.local()
        self._closed = False

    @property
    def num_slots(self) -> int:
        return self._layout.num_slots

    @property
    def block_bytes(self) -> int:
        return self._block_bytes

    @property
    def direct(self) -> bool:
        """Whether O_DIRECT is in use."""
        return self._direct

    @property
    def fallback_reason(self) -> str | None:
        """Why buffered I/O is used, or ``None`` when O_DIRECT is."""
        return self._fallback_reason

    @property
    def path(self) -> str:
        return self._dir.path

    def submit_write(self, slots: np.ndarray, rows: np.ndarray, row_ids: np.ndarray) -> IoBatch:
        """Start writing ``rows[row_ids[i]]`` into ``slots[i]``; ``wait()`` also syncs the files.

        Raises:
            ValueError: a slot or row id out of range, or rows that are not uint8 block rows.
        """
        return self._submit(slots, rows, row_ids, write=True)

    def submit_read(self, slots: np.ndarray, rows: np.ndarray, row_ids: np.ndarray) -> IoBatch:
        """Start reading ``slots[i]`` into ``rows[row_ids[i]]``.

        Raises:
            ValueError: as ``submit_write``.
        """
        return self._submit(slots, rows, row_ids, write=False)

    def write_rows(self, slots: np.ndarray, rows: np.ndarray, row_ids: np.ndarray) -> IoOutcome:
        """Write and make durable (one fdatasync per file touched); see ``submit_write``."""
        return self.submit_write(slots, rows, row_ids).wait()

    def read_rows(self, slots: np.ndarray, rows: np.ndarray, row_ids: np.ndarray) -> IoOutcome:
        """Read; see ``submit_read``."""
        return self.submit_read(slots, rows, row_ids).wait()

    def write(self, slots: np.ndarray, src: np.ndarray) -> None:
        """SlotStore.write, durable on return.

        Raises:
            ValueError: shapes, dtypes or slots are wrong.
            OSError: a block could not be written (the others were).
        """
        self._check_block_rows(slots, src)
        _raise_if_failed(self.write_rows(slots, src, np.arange(len(slots), dtype=np.int64)))

    def read_into(self, slots: np.ndarray, out: np.ndarray) -> None:
        """SlotStore.read_into; rows of slots past a truncated file's end are zeroed.

        Raises:
            ValueError: shapes, dtypes or slots are wrong.
            OSError: a block could not be read.
        """
        self._check_block_rows(slots, out)
        outcome = self.read_rows(slots, out, np.arange(len(slots), dtype=np.int64))
        if len(outcome.failed):
            _raise_if_failed(outcome)

    def checksums(self, slots: np.ndarray) -> np.ndarray:
        slots = np.asarray(slots, dtype=np.int64)
        self._check_slots(slots)
        out = np.empty(len(slots), dtype=np.uint64)
        step = max(1, (16 << 20) // self._block_bytes)
        buf = np.empty((min(step, max(1, len(slots))), self._block_bytes), dtype=np.uint8)
        for a in range(0, len(slots), step):
            part = slots[a : a + step]
            rows = buf[: len(part)]
            self.read_into(part, rows)
            out[a : a + len(part)] = checksum_rows(rows, np.arange(len(part), dtype=np.int64))
        return out

    def close(self) -> None:
        """Stop the pool, close the files and release the directory. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._pool.shutdown(wait=True)
        self._close_fds()
        self._dir.close()

    def __enter__(self) -> DiskSlotStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- internals

    def _open_direct(self) -> tuple[bool, str | None]:
        flags = os.O_RDWR | getattr(os, "O_DIRECT", 0)
        if flags == os.O_RDWR:
            return False, "this platform has no O_DIRECT"
        try:
            self._fds = [self._dir.open_slot_file(i, flags) for i in range(self._layout.num_files)]
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            return False, f"open: {exc.strerror}"
        probe = mmap.mmap(-1, SLOT_ALIGN)
        try:
            os.preadv(self._fds[0], [probe], 0)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            return False, f"aligned read: {exc.strerror}"
        finally:
            probe.close()
        return True, None

    def _close_fds(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []

    def _submit(self, slots: np.ndarray, rows: np.ndarray, row_ids: np.ndarray, *, write: bool) -> IoBatch:
        if self._closed:
            raise ValueError("the G3 slot store is closed")
        slots = np.asarray(slots, dtype=np.int64)
        row_ids = np.asarray(row_ids, dtype=np.int64)
        self._check_slots(slots)
        if rows.dtype != np.uint8 or rows.ndim != 2 or rows.shape[1] != self._block_bytes:
            raise ValueError(f"rows must be uint8 [n, {self._block_bytes}], got {rows.dtype} {rows.shape}")
        if len(row_ids) != len(slots):
            raise ValueError(f"{len(row_ids)} row ids for {len(slots)} slots")
        if len(row_ids) and (int(row_ids.min()) < 0 or int(row_ids.max()) >= rows.shape[0]):
            raise ValueError(f"row id out of range [0, {rows.shape[0]})")
        files, offsets = self._layout.locate(slots)
        zero_copy = not self._direct or (
            self._block_bytes % SLOT_ALIGN == 0
            and rows.ctypes.data % SLOT_ALIGN == 0
            and rows.strides[0] % SLOT_ALIGN == 0
        )
        fn = self._write_task if write else self._read_task
        tasks = []
        for positions in self._runs(slots, files):
            first = int(positions[0])
            fd = self._fds[int(files[first])]
            future = self._pool.submit(fn, fd, int(offsets[first]), rows, row_ids[positions].tolist(), zero_copy)
            tasks.append((positions, future))
        return IoBatch(tasks, files, self._sync_files if write else None, self._errors)

    def _runs(self, slots: np.ndarray, files: np.ndarray) -> list[np.ndarray]:
        """Positions grouped into tasks of consecutive slots in one file, slot order."""
        n = len(slots)
        if not n:
            return []
        order = np.argsort(slots, kind="stable")
        s, f = slots[order], files[order]
        brk = np.ones(n, dtype=bool)
        brk[1:] = (np.diff(s) != 1) | (f[1:] != f[:-1])
        run_start = np.maximum.accumulate(np.where(brk, np.arange(n), 0))
        brk |= (np.arange(n) - run_start) % self._per_task == 0
        return np.split(order, np.flatnonzero(brk)[1:])

    def _write_task(self, fd: int, offset: int, rows: np.ndarray, ids: list[int], zero_copy: bool) -> TaskResult:
        blocks, err = self._write_run(fd, offset, rows, ids, zero_copy)
        if err is not None and len(ids) - blocks > 1:
            return self._one_by_one(self._write_run, fd, offset, rows, ids, blocks, zero_copy, err)
        return blocks, err

    def _read_task(self, fd: int, offset: int, rows: np.ndarray, ids: list[int], zero_copy: bool) -> TaskResult:
        blocks, err = self._read_run(fd, offset, rows, ids, zero_copy)
        if err is None:
            for r in ids[blocks:]:  # past the end of a truncated file
                rows[r] = 0
        elif len(ids) - blocks > 1:
            return self._one_by_one(self._read_run, fd, offset, rows, ids, blocks, zero_copy, err)
        return blocks, err

    def _write_run(
        self, fd: int, offset: int, rows: np.ndarray, ids: list[int], zero_copy: bool
    ) -> tuple[int, str | None]:
        """One pwritev of consecutive slots; returns (whole blocks written, error)."""
        if zero_copy:
            bufs = self._iovecs(rows, ids)
        else:
            bounce = self._bounce(len(ids))
            for j, r in enumerate(ids):
                bounce[j, : self._block_bytes] = rows[r]
            bufs = [bounce[: len(ids)].reshape(-1)]
        done, err = _transfer(os.pwritev, fd, bufs, offset)
        return done // self._stride, err

    def _read_run(
        self, fd: int, offset: int, rows: np.ndarray, ids: list[int], zero_copy: bool
    ) -> tuple[int, str | None]:
        """One preadv of consecutive slots; returns (whole blocks read, error or None at EOF)."""
        if zero_copy:
            done, err = _transfer(os.preadv, fd, self._iovecs(rows, ids), offset)
        else:
            bounce = self._bounce(len(ids))
            done, err = _transfer(os.preadv, fd, [bounce[: len(ids)].reshape(-1)], offset)
            for j, r in enumerate(ids[: done // self._stride]):
                rows[r] = bounce[j, : self._block_bytes]
        return done // self._stride, err

    def _one_by_one(
        self,
        run: Callable[..., tuple[int, str | None]],
        fd: int,
        offset: int,
        rows: np.ndarray,
        ids: list[int],
        start: int,
        zero_copy: bool,
        error: str,
    ) -> TaskResult:
        """After a multi-block call failed at block ``start``: each later block on its own, so
        only the blocks that really fail (a bad sector, the space left) are lost. A retried
        read that ends short fails too (a file truncated under an I/O error is not trusted)."""
        ok = np.zeros(len(ids), dtype=bool)
        ok[:start] = True
        for j in range(start, len(ids)):
            done, _ = run(fd, offset + j * self._stride, rows, ids[j : j + 1], zero_copy)
            ok[j] = done == 1
        return ok, None if ok.all() else error  # a transient error that the retries got past

    def _iovecs(self, rows: np.ndarray, ids: list[int]) -> list[np.ndarray]:
        if self._stride == self._block_bytes:
            return [rows[r] for r in ids]
        # Buffered I/O only (O_DIRECT zero-copy needs 4 KiB-multiple blocks): each slot's
        # padding goes to or comes from a per-thread scratch row.
        pad = getattr(self._local, "pad", None)
        if pad is None:
            pad = self._local.pad = np.zeros(self._stride - self._block_bytes, dtype=np.uint8)
        out: list[np.ndarray] = []
        for r in ids:
            out += (rows[r], pad)
        return out

    def _bounce(self, blocks: int) -> np.ndarray:
        buf = getattr(self._local, "bounce", None)
        if buf is None or buf.shape[0] < blocks:
            raw = mmap.mmap(-1, blocks * self._stride)  # page aligned, as O_DIRECT needs
            buf = self._local.bounce = np.frombuffer(raw, dtype=np.uint8).reshape(blocks, self._stride)
        return buf

    def _sync_files(self, file_indices: list[int]) -> list[tuple[int, str | None]]:
        def sync(i: int) -> tuple[int, str | None]:
            try:
                os.fdatasync(self._fds[i])
            except OSError as exc:
                return i, _describe(exc)
            return i, None

        if len(file_indices) == 1:
            return [sync(file_indices[0])]
        return list(self._pool.map(sync, file_indices))

    def _check_slots(self, slots: np.ndarray) -> None:
        if slots.ndim != 1:
            raise ValueError("slots must be a 1-D integer array")
        if len(slots) and (int(slots.min()) < 0 or int(slots.max()) >= self._layout.num_slots):
            raise ValueError(f"slot out of range [0, {self._layout.num_slots})")

    def _check_block_rows(self, slots: np.ndarray, rows: np.ndarray) -> None:
        if rows.dtype != np.uint8 or rows.ndim != 2 or rows.shape != (len(slots), self._block_bytes):
            raise ValueError(f"expected uint8 [{len(slots)}, {self._block_bytes}], got {rows.dtype} {rows.shape}")


def _transfer(
    op: Callable[[int, list[memoryview], int], int], fd: int, bufs: list[np.ndarray], offset: int
) -> tuple[int, str | None]:
    """Run preadv/pwritev until every buffer is done, EOF, or an error; returns (bytes, error)."""
    total = sum(b.nbytes for b in bufs)
    done = 0
    views = [b.data.cast("B") for b in bufs]
    while done < total:
        try:
            n = op(fd, views, offset + done)
        except OSError as exc:
            return done, _describe(exc)
        if n == 0:
            return done, None  # EOF
        done += n
        while views and n >= views[0].nbytes:
            n -= views[0].nbytes
            views.pop(0)
        if n:
            views[0] = views[0][n:]
    return done, None


def _describe(exc: OSError) -> str:
    name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
    return f"{name}: {exc.strerror}"


def _cat(parts: list[np.ndarray]) -> np.ndarray:
    return np.sort(np.concatenate(parts)).astype(np.int64) if parts else _EMPTY


def _raise_if_failed(outcome: IoOutcome) -> None:
    if len(outcome.failed):
        raise OSError(f"{len(outcome.failed)} G3 blocks failed: {outcome.error}")
