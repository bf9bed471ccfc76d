"""The G3 directory: formatting, refusing or wiping another layout, ownership, kvbm's names only."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest

from kvbm.config import G3OnMismatch
from kvbm.errors import ConfigError
from kvbm.tiers.disk.layout import DiskLayout, G3LayoutError, open_directory

from .conftest import BLOCK_BYTES, make_fingerprint

REFUSE, WIPE = G3OnMismatch.REFUSE, G3OnMismatch.WIPE


def layout(**fp: object) -> DiskLayout:
    return DiskLayout.plan(make_fingerprint(**fp), BLOCK_BYTES, 8 * BLOCK_BYTES)


def test_plan_aligns_slots_and_splits_files() -> None:
    lay = DiskLayout.plan(make_fingerprint(), 100, 10 * 4096 + 5)
    assert (lay.slot_stride, lay.num_slots, lay.num_files) == (4096, 10, 1)
    big = DiskLayout.plan(make_fingerprint(), 3 << 20, 1000 << 20)
    assert big.slot_stride == 3 << 20 and big.num_slots == 333 and big.slots_per_file == 333  # one file
    files, offsets = big.locate(np.array([0, 1, 332]))
    assert files.tolist() == [0, 0, 0] and offsets.tolist() == [0, 3 << 20, 332 * (3 << 20)]
    many = DiskLayout.plan(make_fingerprint(), 1 << 20, 2500 << 20)
    assert (many.slots_per_file, many.num_files, many.file_slots(2)) == (1024, 3, 452)
    with pytest.raises(ConfigError, match="cannot hold one") as info:
        DiskLayout.plan(make_fingerprint(), 4097, 8191)
    assert info.value.field == "g3_capacity_bytes"


def test_format_then_reopen(tmp_path: Path) -> None:
    with open_directory(str(tmp_path), layout(), on_mismatch=REFUSE, owner=True) as d:
        assert d.layout == layout() and d.damaged == {}
        names = sorted(os.listdir(tmp_path))
    assert names == ["index", "kvbm-g3.json", "kvbm-g3.lock", "kvbm-g3.owner", "kvbm-g3.users", "slots-00000.bin"]
    assert (tmp_path / "slots-00000.bin").stat().st_size == 8 * BLOCK_BYTES
    assert os.stat(tmp_path / "slots-00000.bin").st_blocks * 512 >= 8 * BLOCK_BYTES  # preallocated
    record = json.loads((tmp_path / "kvbm-g3.json").read_text())
    assert record["format"] == "kvbm-g3" and record["fingerprint"] == make_fingerprint().digest().hex()
    (tmp_path / "slots-00000.bin").write_bytes(b"x" * (8 * BLOCK_BYTES))  # marker: not reformatted
    with open_directory(str(tmp_path), layout(), on_mismatch=REFUSE, owner=False):
        pass
    assert (tmp_path / "slots-00000.bin").read_bytes()[:1] == b"x"


@pytest.mark.parametrize(
    "other, what",
    [
        (layout(model="another-model"), "fingerprint"),
        (DiskLayout.plan(make_fingerprint(), BLOCK_BYTES, 16 * BLOCK_BYTES), "num_slots"),
        (DiskLayout.plan(make_fingerprint(), 2 * BLOCK_BYTES, 16 * BLOCK_BYTES), "block_bytes"),
    ],
)
def test_another_layout_is_refused_and_left_alone(tmp_path: Path, other: DiskLayout, what: str, caplog) -> None:
    open_directory(str(tmp_path), layout(), on_mismatch=REFUSE, owner=True).close()
    before = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    with caplog.at_level(logging.ERROR), pytest.raises(G3LayoutError, match=f"refused.*{what}"):
        open_directory(str(tmp_path), other, on_mismatch=REFUSE, owner=True)
    assert any("refused, never served from" in r.message and what in r.message for r in caplog.records)
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir() if p.name in before} == before


def test_another_format_version_is_refused(tmp_path: Path) -> None:
    open_directory(str(tmp_path), layout(), on_mismatch=REFUSE, owner=True).close()
    record = json.loads((tmp_path / "kvbm-g3.json").read_text())
    record["format_version"] = 99
    (tmp_path / "kvbm-g3.json").write_text(json.dumps(record))
    with pytest.raises(G3LayoutError, match="format_version: 99 -> 1"):
        open_directory(str(tmp_path), layout(), on_mismatch=REFUSE, owner=True)
    (tmp_path / "kvbm-g3.json").write_text("{not json")
    with pytest.raises(G3LayoutError, match="unreadable"):
        open_directory(str(tmp_path), layout(), on_mismatch=REFUSE, owner=True)


def test_wipe_deletes_only_kvbm_names(tmp_path: Path, caplog) -> None:
    open_directory(str(tmp_path), layout(), on_mismatch=REFUSE, owner=True).close()
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "slots-1.bin").write_text("not a kvbm name")
    (tmp_path / "slots-00000.bin").write_bytes(b"y" * 10)
    with caplog.at_level(logging.WARNING):
        d = open_directory(str(tmp_path), layout(model="another-model"), on_mismatch=WIPE, owner=True)
    d.close()
    assert any("wiped, its blocks are dropped" in r.message and "fingerprint" in r.message for r in caplog.records)
    assert (tmp_path / "notes.txt").read_text() == "mine" and (tmp_path / "slots-1.bin").exists()
    assert (tmp_path / "slots-00000.bin").read_bytes()[:1] == b"\0"
    assert (
        json.loads((tmp_path / "kvbm-g3.json").read_text())["fingerprint"]
        == make_fingerprint(model="another-model").digest().hex()
    )


def test_no_wipe_while_another_process_uses_it(tmp_path: Path) -> None:
    with open_directory(str(tmp_path), layout(), on_mismatch=REFUSE, owner=False):
        with pytest.raises(G3LayoutError, match="another process is using it"):
            open_directory(str(tmp_path), layout(model="x"), on_mismatch=WIPE, owner=True)
        assert (tmp_path / "kvbm-g3.json").exists()


def test_one_owner_at_a_time(tmp_path: Path) -> None:
    first = open_directory(str(tmp_path), layout(), on_mismatch=REFUSE, owner=True)
    with pytest.raises(G3LayoutError, match="owned by another"):
        open_directory(str(tmp_path), layout(), on_mismatch=REFUSE, owner=True)
    open_directory(str(tmp_path), layout(), on_mismatch=REFUSE, owner=False).close()  # a worker may join
    first.close()
    open_directory(str(tmp_path), layout(), on_mismatch=REFUSE, owner=True).close()


def test_symlinks_inside_are_never_followed(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.write_bytes(b"precious")
    g3 = tmp_path / "g3"
    open_directory(str(g3), layout(), on_mismatch=REFUSE, owner=True).close()
    (g3 / "slots-00000.bin").unlink()
    (g3 / "slots-00000.bin").symlink_to(outside)
    with pytest.raises(OSError):
        open_directory(str(g3), layout(), on_mismatch=REFUSE, owner=False)
    open_directory(str(g3), layout(model="x"), on_mismatch=WIPE, owner=False).close()
    assert not (g3 / "slots-00000.bin").is_symlink()  # a wipe unlinks the link, never its target
    assert outside.read_bytes() == b"precious"


def test_short_and_missing_slot_files_are_repaired_and_reported(tmp_path: Path, caplog) -> None:
    lay = DiskLayout.plan(make_fingerprint(), 4096, 20 * 4096, file_bytes=8 * 4096)
    assert (lay.num_files, lay.file_slots(2)) == (3, 4)
    open_directory(str(tmp_path), lay, on_mismatch=REFUSE, owner=True).close()
    os.truncate(tmp_path / "slots-00001.bin", 5 * 4096 + 100)
    (tmp_path / "slots-00002.bin").unlink()
    with caplog.at_level(logging.WARNING), open_directory(str(tmp_path), lay, on_mismatch=REFUSE, owner=True) as d:
        assert d.damaged == {1: 5, 2: 0}
    assert (tmp_path / "slots-00001.bin").stat().st_size == 8 * 4096
    assert (tmp_path / "slots-00002.bin").stat().st_size == 4 * 4096
    assert sum("are lost" in r.message for r in caplog.records) == 2


def test_the_index_never_follows_a_symlink(tmp_path: Path) -> None:
    from kvbm.manager.events import EventLog
    from kvbm.tiers.disk.index import DiskIndex

    g3 = tmp_path / "g3"
    open_directory(str(g3), layout(), on_mismatch=REFUSE, owner=True).close()
    elsewhere = tmp_path / "elsewhere.mdb"
    (g3 / "index" / "data.mdb").symlink_to(elsewhere)
    with pytest.raises(G3LayoutError, match="symlink"):
        DiskIndex(open_directory(str(g3), layout(), on_mismatch=REFUSE, owner=True), EventLog(10))
    assert not elsewhere.exists()
