"""G3's directory: what is in it, who may use it, and what happens when it does not match.

One directory holds one disk tier, and kvbm touches only its own names in it (never a path
outside it, never following a symlink inside it):

    kvbm-g3.json        the format record, written last and atomically (tmp + fsync + rename)
    kvbm-g3.lock        flock held exclusively while a process opens (checks, formats, wipes)
    kvbm-g3.users       flock held shared by every process using the directory
    kvbm-g3.owner       flock held exclusively by the one process owning the index (scheduler)
    index/              the LMDB index (``kvbm.tiers.disk.index``)
    slots-NNNNN.bin     preallocated slot files, ``slots_per_file`` slots of ``slot_stride`` bytes

Contract of :func:`open_directory`, called by both halves of the tier (the scheduler's index
and the worker's slot files) with the same :class:`DiskLayout`:

- no format record: kvbm's names are removed, the slot files are created and preallocated, an
  empty ``index/`` is made, then the record is written (a crash before that point leaves an
  unformatted directory that the next open formats again);
- a record equal to ``layout``: the directory is used as is; slot files that are missing or
  shorter than they should be are recreated or extended and reported in ``G3Directory.damaged``
  (their blocks then fail verification, or the index drops them at load);
- a record that differs (fingerprint, block size or bytes, capacity, format version) or cannot
  be read: with ``G3OnMismatch.REFUSE`` raises :class:`G3LayoutError` naming what differs; with
  ``WIPE`` logs one warning line naming it, deletes kvbm's names and formats again. Wiping
  needs every other user gone (the shared ``users`` lock); otherwise it raises.

Slots are aligned for O_DIRECT: ``slot_stride`` is ``block_bytes`` rounded up to 4 KiB.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import json
import logging
import os
import re
import weakref
from typing import Any

import numpy as np

from kvbm.config import G3OnMismatch
from kvbm.errors import ConfigError, KvbmError
from kvbm.hashing import LayoutFingerprint

logger = logging.getLogger(__name__)

G3_FORMAT = "kvbm-g3"
G3_FORMAT_VERSION = 1
SLOT_ALIGN = 4096
FILE_BYTES = 1 << 30
"""Target size of one slot file; a file holds at least one slot."""

META_NAME = "kvbm-g3.json"
INDEX_DIR = "index"
_LOCK_NAMES = ("kvbm-g3.lock", "kvbm-g3.users", "kvbm-g3.owner")
_SLOT_FILE = re.compile(r"^slots-\d{5}\.bin$")
_INDEX_FILES = ("data.mdb", "lock.mdb")
_NOFOLLOW = os.O_NOFOLLOW | os.O_CLOEXEC


class G3LayoutError(KvbmError):
    """The G3 directory cannot be used: written under another layout (and not to be wiped),
    in use by another owner, or not a place kvbm may write."""


@dataclasses.dataclass(frozen=True)
class DiskLayout:
    """Everything two processes must agree on to share a G3 directory.

    Raises:
        ValueError: a field is not positive or the stride is not aligned.
    """

    fingerprint: str  # hex of LayoutFingerprint.digest()
    block_size: int
    block_bytes: int
    num_slots: int
    slot_stride: int
    slots_per_file: int
    format_version: int = G3_FORMAT_VERSION

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name != "fingerprint" and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"DiskLayout.{f.name} must be a positive int, got {value!r}")
        if self.slot_stride % SLOT_ALIGN or self.slot_stride < self.block_bytes:
            raise ValueError(f"slot_stride {self.slot_stride} must be a multiple of {SLOT_ALIGN} >= block_bytes")

    @classmethod
    def plan(
        cls, fingerprint: LayoutFingerprint, block_bytes: int, capacity_bytes: int, *, file_bytes: int = FILE_BYTES
    ) -> DiskLayout:
        """The layout of a tier of ``capacity_bytes`` for blocks of ``block_bytes``, in slot
        files of about ``file_bytes`` (at least one slot each).

        Raises:
            ConfigError: the capacity cannot hold one block.
            ValueError: ``block_bytes`` is not positive.
        """
        if block_bytes < 1:
            raise ValueError(f"block_bytes must be positive, got {block_bytes}")
        stride = -(-block_bytes // SLOT_ALIGN) * SLOT_ALIGN
        num_slots = capacity_bytes // stride
        if num_slots < 1:
            raise ConfigError("g3_capacity_bytes", f"{capacity_bytes} bytes cannot hold one {stride}-byte G3 slot")
        per_file = max(1, min(num_slots, file_bytes // stride))
        return cls(fingerprint.digest().hex(), fingerprint.block_size, block_bytes, num_slots, stride, per_file)

    @property
    def num_files(self) -> int:
        return -(-self.num_slots // self.slots_per_file)

    def file_name(self, index: int) -> str:
        return f"slots-{index:05d}.bin"

    def file_slots(self, index: int) -> int:
        """Slots held by file ``index`` (the last file may hold fewer)."""
        return min(self.slots_per_file, self.num_slots - index * self.slots_per_file)

    def locate(self, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(file index, byte offset in that file) of each slot."""
        files, within = np.divmod(slots, self.slots_per_file)
        return files, within * self.slot_stride

    def to_record(self, fingerprint: LayoutFingerprint | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {"format": G3_FORMAT, **dataclasses.asdict(self)}
        if fingerprint is not None:
            out["layout"] = dataclasses.asdict(fingerprint)
        return out

    @classmethod
    def from_record(cls, record: Any) -> DiskLayout:
        """Parse a format record.

        Raises:
            ValueError: not a kvbm G3 record, or a field is missing or wrong.
        """
        if not isinstance(record, dict) or record.get("format") != G3_FORMAT:
            raise ValueError("not a kvbm G3 format record")
        try:
            return cls(**{f.name: record[f.name] for f in dataclasses.fields(cls)})
        except (KeyError, TypeError) as exc:
            raise ValueError(f"malformed format record ({exc})") from None

    def differences(self, other: DiskLayout) -> list[str]:
        """``field: this -> other`` for each field that differs."""
        return [
            f"{f.name}: {getattr(self, f.name)!r} -> {getattr(other, f.name)!r}"
            for f in dataclasses.fields(self)
            if getattr(self, f.name) != getattr(other, f.name)
        ]


class G3Directory:
    """An open G3 directory (see :func:`open_directory`). Holds its locks until ``close``."""

    def __init__(self, path: str, dir_fd: int, layout: DiskLayout, locks: list[int], damaged: dict[int, int]) -> None:
        self._path = path
        self._dir_fd = dir_fd
        self._layout = layout
        self._locks = locks
        self._damaged = damaged
        # Released even when the owner forgets close(): flocks die with their fds.
        self._finalizer = weakref.finalize(self, _close_all, [*locks, dir_fd])

    @property
    def path(self) -> str:
        return self._path

    @property
    def layout(self) -> DiskLayout:
        return self._layout

    @property
    def index_path(self) -> str:
        return os.path.join(self._path, INDEX_DIR)

    @property
    def damaged(self) -> dict[int, int]:
        """Slot files found missing or short at open: file index -> slots still intact."""
        return dict(self._damaged)

    def open_slot_file(self, index: int, flags: int) -> int:
        """Open slot file ``index`` (never through a symlink); returns the fd.

        Raises:
            OSError: as ``os.open``.
        """
        return os.open(self._layout.file_name(index), flags | _NOFOLLOW, dir_fd=self._dir_fd)

    def close(self) -> None:
        """Release the locks. Idempotent."""
        self._finalizer()

    def __enter__(self) -> G3Directory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_directory(
    path: str,
    layout: DiskLayout,
    *,
    on_mismatch: G3OnMismatch,
    owner: bool,
    fingerprint: LayoutFingerprint | None = None,
) -> G3Directory:
    """Open (formatting, or wiping, as the module docstring says) the G3 directory ``path``.

    Args:
        owner: take the index owner lock (the scheduler's side); only one owner at a time.
        fingerprint: recorded in a new format record, for people reading it.

    Raises:
        G3LayoutError: a mismatch under REFUSE, a wipe while others use the directory, a second
            owner, or a kvbm name inside it that is not what kvbm made (e.g. a symlink).
        OSError: the directory cannot be created or opened.
    """
    os.makedirs(path, mode=0o700, exist_ok=True)
    path = os.path.realpath(path)
    dir_fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    locks: list[int] = []
    try:
        setup = _lock_file(dir_fd, _LOCK_NAMES[0])
        try:
            fcntl.flock(setup, fcntl.LOCK_EX)
            users = _lock_file(dir_fd, _LOCK_NAMES[1])
            locks.append(users)
            if owner:
                own = _lock_file(dir_fd, _LOCK_NAMES[2])
                locks.append(own)
                if not _try_lock(own, fcntl.LOCK_EX):
                    raise G3LayoutError(
                        f"G3 directory {path} is owned by another kvbm process (one index owner at a time)"
                    )
            found, problem = _read_record(dir_fd)
            if found is not None and found != layout:
                problem = "written under another layout: " + "; ".join(found.differences(layout))
            if problem is not None:
                _handle_mismatch(path, dir_fd, users, problem, on_mismatch)
                found = None
            if found is None:
                _format(dir_fd, layout, fingerprint)
                damaged: dict[int, int] = {}
            else:
                damaged = _repair_slot_files(path, dir_fd, layout)
            fcntl.flock(users, fcntl.LOCK_SH)
        finally:
            os.close(setup)
    except BaseException:
        for fd in locks:
            os.close(fd)
        os.close(dir_fd)
        raise
    return G3Directory(path, dir_fd, layout, locks, damaged)


def _handle_mismatch(path: str, dir_fd: int, users: int, problem: str, on_mismatch: G3OnMismatch) -> None:
    if on_mismatch is G3OnMismatch.REFUSE:
        logger.error(
            "G3 directory %s refused, never served from: %s (set g3_on_mismatch='wipe' to reuse it)", path, problem
        )
        raise G3LayoutError(f"G3 directory {path} refused: {problem}; set g3_on_mismatch='wipe' to reuse it")
    if not _try_lock(users, fcntl.LOCK_EX):
        raise G3LayoutError(f"G3 directory {path} must be wiped ({problem}) but another process is using it")
    logger.warning("G3 directory %s wiped, its blocks are dropped: %s", path, problem)
    _wipe(dir_fd)


def _read_record(dir_fd: int) -> tuple[DiskLayout | None, str | None]:
    try:
        fd = os.open(META_NAME, os.O_RDONLY | _NOFOLLOW, dir_fd=dir_fd)
    except FileNotFoundError:
        return None, None
    except OSError as exc:
        return None, f"format record unreadable ({exc.strerror})"
    try:
        with os.fdopen(fd, "rb") as f:
            return DiskLayout.from_record(json.loads(f.read(1 << 20))), None
    except (ValueError, UnicodeDecodeError) as exc:
        return None, f"format record unreadable ({exc})"


def _format(dir_fd: int, layout: DiskLayout, fingerprint: LayoutFingerprint | None) -> None:
    _wipe(dir_fd)
    short = None
    for i in range(layout.num_files):
        fd = os.open(layout.file_name(i), os.O_RDWR | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o600, dir_fd=dir_fd)
        try:
            size = layout.file_slots(i) * layout.slot_stride
            os.ftruncate(fd, size)
            if short is None:
                short = _preallocate(fd, size)
            os.fsync(fd)
        finally:
            os.close(fd)
    if short is not None:
        logger.warning("G3 slot files are sparse, not preallocated (%s): writes may fail when the disk fills", short)
    os.mkdir(INDEX_DIR, 0o700, dir_fd=dir_fd)
    data = json.dumps(layout.to_record(fingerprint), indent=1, sort_keys=True).encode()
    tmp = META_NAME + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | _NOFOLLOW, 0o600, dir_fd=dir_fd)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, META_NAME, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    os.fsync(dir_fd)


def _preallocate(fd: int, size: int) -> str | None:
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        return f"{errno.errorcode.get(exc.errno or 0, exc.errno)}: {exc.strerror}"
    return None


def _repair_slot_files(path: str, dir_fd: int, layout: DiskLayout) -> dict[int, int]:
    damaged = {}
    for i in range(layout.num_files):
        want = layout.file_slots(i) * layout.slot_stride
        fd = os.open(layout.file_name(i), os.O_RDWR | os.O_CREAT | _NOFOLLOW, 0o600, dir_fd=dir_fd)
        try:
            st = os.fstat(fd)
            if st.st_size >= want:
                continue
            damaged[i] = st.st_size // layout.slot_stride
            logger.warning(
                "G3 slot file %s/%s is %d bytes, expected %d: its blocks past slot %d are lost",
                path,
                layout.file_name(i),
                st.st_size,
                want,
                damaged[i],
            )
            os.ftruncate(fd, want)
        finally:
            os.close(fd)
    return damaged


def _wipe(dir_fd: int) -> None:
    """Delete kvbm's names (and only those) from the directory; the record goes first."""
    for name in (META_NAME, META_NAME + ".tmp"):
        _unlink(name, dir_fd)
    try:
        index_fd = os.open(INDEX_DIR, os.O_RDONLY | os.O_DIRECTORY | _NOFOLLOW, dir_fd=dir_fd)
    except FileNotFoundError:
        index_fd = None
    except OSError as exc:
        raise G3LayoutError(f"G3 index path is not a directory kvbm made ({exc.strerror})") from None
    if index_fd is not None:
        try:
            for name in _INDEX_FILES:
                _unlink(name, index_fd)
        finally:
            os.close(index_fd)
        try:
            os.rmdir(INDEX_DIR, dir_fd=dir_fd)
        except OSError as exc:
            raise G3LayoutError(f"G3 index directory holds files kvbm did not write ({exc.strerror})") from None
    for name in os.listdir(dir_fd):
        if _SLOT_FILE.match(name):
            _unlink(name, dir_fd)
    os.fsync(dir_fd)


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


def _unlink(name: str, dir_fd: int) -> None:
    try:
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass


def _lock_file(dir_fd: int, name: str) -> int:
    try:
        return os.open(name, os.O_RDWR | os.O_CREAT | _NOFOLLOW, 0o600, dir_fd=dir_fd)
    except OSError as exc:
        raise G3LayoutError(f"cannot open G3 lock file {name} ({exc.strerror})") from None


def _try_lock(fd: int, mode: int) -> bool:
    try:
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True
