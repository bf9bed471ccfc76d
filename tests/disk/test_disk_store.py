"""G3 slot files: batched O_DIRECT and buffered I/O, bounces, runs across files, short reads."""

from __future__ import annotations

import errno
import fcntl
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import xxhash

from kvbm.config import G3OnMismatch
from kvbm.tiers.disk.layout import DiskLayout, open_directory
from kvbm.tiers.disk.store import DiskSlotStore
from kvbm.tiers.host import HostBuffer

from .conftest import make_fingerprint


def open_store(
    path: Path, block_bytes: int, num_slots: int, *, file_slots: int | None = None, **kwargs
) -> DiskSlotStore:
    stride = -(-block_bytes // 4096) * 4096
    layout = DiskLayout.plan(
        make_fingerprint(), block_bytes, num_slots * stride, file_bytes=(file_slots or num_slots) * stride
    )
    return DiskSlotStore(open_directory(str(path), layout, on_mismatch=G3OnMismatch.REFUSE, owner=False), **kwargs)


def random_rows(n: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, width), dtype=np.uint8)


@pytest.mark.parametrize("direct", [True, False])
@pytest.mark.parametrize("block_bytes", [4096, 12288, 100, 5000])
def test_round_trip_in_any_slot_order_across_files(tmp_path: Path, direct: bool, block_bytes: int) -> None:
    with open_store(tmp_path, block_bytes, 40, file_slots=7, direct_io=direct, chunk_bytes=3 * 4096) as store:
        assert store.direct is direct and (store.fallback_reason is None) is direct
        rng = np.random.default_rng(block_bytes)
        slots = rng.permutation(40)[:30]
        src = HostBuffer(30, block_bytes)  # page aligned: the zero-copy path when block_bytes allows
        src.rows[:] = random_rows(30, block_bytes)
        outcome = store.write_rows(slots, src.rows, np.arange(30))
        assert outcome.ok and outcome.error is None
        out = HostBuffer(30, block_bytes)
        order = rng.permutation(30)
        outcome = store.read_rows(slots[order], out.rows, np.arange(30))
        assert outcome.ok
        assert np.array_equal(out.rows, src.rows[order])
        assert store.checksums(slots[:3]).tolist() == [xxhash.xxh3_64_intdigest(r.tobytes()) for r in src.rows[:3]]


def test_unaligned_rows_are_bounced_under_o_direct(tmp_path: Path) -> None:
    with open_store(tmp_path, 4096, 8, direct_io=True) as store:
        backing = np.zeros(8 * 4096 + 1, dtype=np.uint8)
        rows = backing[1:].reshape(8, 4096)  # not 4 KiB aligned: O_DIRECT would refuse it as is
        rows[:] = random_rows(8, 4096, seed=3)
        assert store.write_rows(np.arange(8), rows, np.arange(8)).ok
        out = np.zeros((8, 4096), dtype=np.uint8)
        store.read_into(np.arange(8), out)
        assert np.array_equal(out, rows)


def test_many_batches_in_flight(tmp_path: Path) -> None:
    with open_store(tmp_path, 4096, 64, chunk_bytes=4096, io_threads=4) as store:
        data = HostBuffer(64, 4096)
        data.rows[:] = random_rows(64, 4096, seed=5)
        assert store.write_rows(np.arange(64), data.rows, np.arange(64)).ok
        out = HostBuffer(64, 4096)
        batches = [store.submit_read(np.arange(a, a + 16), out.rows, np.arange(a, a + 16)) for a in range(0, 64, 16)]
        assert all(b.wait().ok for b in batches)
        assert np.array_equal(out.rows, data.rows)


def test_reads_past_a_truncated_file_are_short_and_zeroed(tmp_path: Path) -> None:
    with open_store(tmp_path, 4096, 8) as store:
        data = HostBuffer(8, 4096)
        data.rows[:] = random_rows(8, 4096, seed=6)
        store.write(np.arange(8), data.rows)
        os.truncate(tmp_path / "slots-00000.bin", 5 * 4096 + 10)
        out = HostBuffer(8, 4096)
        out.rows[:] = 7
        outcome = store.read_rows(np.array([6, 1, 5]), out.rows, np.array([0, 1, 2]))
        assert outcome.failed.tolist() == [] and outcome.short.tolist() == [0, 2] and outcome.error is None
        assert np.array_equal(out.rows[1], data.rows[1])
        assert not out.rows[0].any() and not out.rows[2].any()


def test_bad_arguments_raise_before_any_io(tmp_path: Path) -> None:
    with open_store(tmp_path, 4096, 4) as store:
        rows = np.zeros((2, 4096), dtype=np.uint8)
        with pytest.raises(ValueError, match="slot out of range"):
            store.write_rows(np.array([0, 4]), rows, np.array([0, 1]))
        with pytest.raises(ValueError, match="row id out of range"):
            store.read_rows(np.array([0, 1]), rows, np.array([0, 2]))
        with pytest.raises(ValueError, match="uint8"):
            store.read_rows(np.array([0]), np.zeros((1, 4096), dtype=np.int8), np.array([0]))
    with pytest.raises(ValueError, match="closed"):
        store.read_rows(np.array([0]), rows, np.array([0]))


def test_a_filesystem_refusing_o_direct_falls_back_to_buffered_io(tmp_path: Path, monkeypatch, caplog) -> None:
    real_preadv = os.preadv

    def preadv(fd, buffers, offset):  # what a filesystem without O_DIRECT support answers
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_preadv(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", preadv)
    with caplog.at_level(logging.WARNING), open_store(tmp_path, 4096, 4, direct_io=True) as store:
        assert not store.direct and store.fallback_reason == "aligned read: Invalid argument"
        data = random_rows(4, 4096, seed=7)
        store.write(np.arange(4), data)
        out = np.zeros_like(data)
        store.read_into(np.arange(4), out)
        assert np.array_equal(out, data)
    assert [r.message for r in caplog.records if "O_DIRECT" in r.message] == [
        f"G3 {tmp_path}: O_DIRECT refused (aligned read: Invalid argument); using buffered I/O"
    ]
