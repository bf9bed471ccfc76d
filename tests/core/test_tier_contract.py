"""The tier contract (kvbm/tiers/base.py), run against every tier factory in conftest.

Scenarios use named hashes ("A", "B", ...) and assert exact eviction order; slot numbers are
an implementation's choice, so this suite only requires them distinct and in range.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import xxhash

from kvbm.hashing import TOKEN_DTYPE
from kvbm.ids import BlockHash
from kvbm.manager.events import BlockRemoved, BlockStored, EventLog
from kvbm.tiers.base import SlotStore, TierIndex

from .conftest import SLOT_STORE_FACTORIES, TIER_INDEX_FACTORIES

BS = 4


def h(name: str) -> BlockHash:
    return BlockHash(name.encode().ljust(16, b"\0"))


def hs(names: str) -> list[BlockHash]:
    return [h(c) for c in names]


def toks(names: str) -> np.ndarray:
    return np.array([[ord(c)] * BS for c in names], dtype=TOKEN_DTYPE)


def sums(names: str) -> np.ndarray:
    return np.array([ord(c) * 1000 for c in names], dtype=np.uint64)


@pytest.fixture(params=sorted(TIER_INDEX_FACTORIES))
def make_index(request, tmp_path: Path) -> Callable[..., tuple[TierIndex, EventLog]]:
    factory = TIER_INDEX_FACTORIES[request.param]

    def make(num_slots: int = 4) -> tuple[TierIndex, EventLog]:
        events = EventLog(1000)
        return factory(num_slots, BS, events, tmp_path), events

    return make


def store(index: TierIndex, names: str) -> np.ndarray:
    """Reserve and commit ``names``; returns their slots."""
    res = index.prepare_store(hs(names), toks(names))
    index.complete_store(res.hashes, sums("".join(x.decode().rstrip("\0") for x in res.hashes)))
    return res.slots


def names_of(hashes) -> str:
    return "".join(x.decode().rstrip("\0") for x in hashes)


def test_empty_tier(make_index) -> None:
    index, _ = make_index()
    assert len(index) == 0 and h("A") not in index
    usage = index.usage()
    assert (usage.capacity_blocks, usage.used_blocks, usage.pinned_blocks, usage.evictions) == (4, 0, 0, 0)
    assert len(index.match_prefix(hs("AB"))) == 0


def test_reserved_blocks_are_invisible_until_committed(make_index) -> None:
    index, events = make_index()
    res = index.prepare_store(hs("ABC"), toks("ABC"))
    assert names_of(res.hashes) == "ABC" and list(res.indices) == [0, 1, 2] and res.evicted == ()
    assert len(set(res.slots.tolist())) == 3 and all(0 <= s < 4 for s in res.slots.tolist())
    assert h("A") not in index and len(index.match_prefix(hs("ABC"))) == 0
    assert index.usage().used_blocks == 3 and index.usage().pinned_blocks == 3
    assert events.take() == []
    index.complete_store(res.hashes, sums("ABC"))
    assert list(index.match_prefix(hs("ABC"))) == list(res.slots)
    assert np.array_equal(index.tokens(res.slots), toks("ABC"))
    assert np.array_equal(index.checksums(res.slots), sums("ABC"))
    assert index.usage().pinned_blocks == 0 and len(index) == 3
    assert events.take() == [BlockStored(index.tier, tuple(hs("ABC")))]


def test_abort_rolls_back(make_index) -> None:
    index, events = make_index()
    res = index.prepare_store(hs("AB"), toks("AB"))
    index.abort_store(res.hashes)
    assert index.usage().used_blocks == 0 and index.usage().pinned_blocks == 0
    assert h("A") not in index and events.take() == []
    assert len(index.prepare_store(hs("ABCD"), toks("ABCD"))) == 4


def test_present_and_duplicate_hashes_are_skipped(make_index) -> None:
    index, _ = make_index()
    store(index, "A")
    res = index.prepare_store(hs("ABB"), toks("ABB"))
    assert names_of(res.hashes) == "B" and list(res.indices) == [1]


def test_match_prefix_stops_at_the_first_gap(make_index) -> None:
    index, _ = make_index()
    slots = store(index, "ABD")
    assert list(index.match_prefix(hs("ABCD"))) == list(slots[:2])
    assert list(index.match_prefix(hs("ABCD"), start=3)) == [slots[2]]
    assert len(index.match_prefix(hs("ABCD"), start=2)) == 0


def test_lru_evicts_the_oldest_commit_first(make_index) -> None:
    index, events = make_index()
    for name in "ABCD":
        store(index, name)
    events.take()
    res = index.prepare_store(hs("EF"), toks("EF"))
    assert names_of(res.evicted) == "AB"
    assert events.take() == [BlockRemoved(index.tier, tuple(hs("AB")))]
    assert h("A") not in index and h("C") in index
    assert index.usage().evictions == 2


def test_earlier_blocks_of_one_call_are_more_recent(make_index) -> None:
    index, _ = make_index()
    store(index, "ABCD")
    assert names_of(index.prepare_store(hs("EFG"), toks("EFG")).evicted) == "DCB"


def test_touch_refreshes_recency_and_leases_do_not(make_index) -> None:
    index, _ = make_index()
    for name in "ABCD":
        store(index, name)
    index.touch(hs("BA"))  # order now C D A B: B is the most recent
    index.touch(hs("Z"))  # unknown hashes are ignored
    index.prepare_load(hs("C"))  # leasing is not a use: callers touch what they load
    index.complete_load(hs("C"))
    assert names_of(index.prepare_store(hs("EFG"), toks("EFG")).evicted) == "CDA"


def test_leased_blocks_are_never_evicted(make_index) -> None:
    index, _ = make_index()
    store(index, "ABCD")
    slots = index.prepare_load(hs("DB"))
    assert list(slots) == list(index.match_prefix(hs("DB")))
    assert index.usage().pinned_blocks == 2
    res = index.prepare_store(hs("EFG"), toks("EFG"))
    assert names_of(res.evicted) == "CA"
    assert names_of(res.hashes) == "EF"  # room ran out: G is left out
    assert h("B") in index and h("D") in index
    index.complete_load(hs("DB"))
    assert index.usage().pinned_blocks == 2  # E and F are still being stored


def test_blocks_being_stored_are_never_evicted(make_index) -> None:
    index, _ = make_index()
    index.prepare_store(hs("ABCD"), toks("ABCD"))
    res = index.prepare_store(hs("E"), toks("E"))
    assert len(res) == 0 and res.evicted == ()


def test_blocks_of_the_same_request_are_not_evicted_for_it(make_index) -> None:
    index, _ = make_index()
    store(index, "ABCD")
    res = index.prepare_store(hs("DE"), toks("DE"))  # D is the LRU block and part of the request
    assert names_of(res.evicted) == "C" and names_of(res.hashes) == "E"


def test_leases_count(make_index) -> None:
    index, _ = make_index()
    store(index, "AB")
    index.prepare_load(hs("A"))
    index.prepare_load(hs("AA"))
    index.complete_load(hs("AA"))
    assert index.usage().pinned_blocks == 1
    index.complete_load(hs("A"))
    assert index.usage().pinned_blocks == 0
    with pytest.raises(ValueError, match="no lease"):
        index.complete_load(hs("A"))


def test_misuse_raises_and_changes_nothing(make_index) -> None:
    index, _ = make_index()
    store(index, "AB")
    res = index.prepare_store(hs("C"), toks("C"))
    with pytest.raises(KeyError):
        index.prepare_load(hs("AZ"))
    assert index.usage().pinned_blocks == 1  # only C's reservation
    with pytest.raises(KeyError):
        index.complete_store(hs("CA"), sums("CA"))  # A is committed, not reserved
    assert h("C") not in index
    with pytest.raises(KeyError):
        index.abort_store(hs("Z"))
    with pytest.raises(ValueError, match="no lease"):
        index.complete_load(hs("AB"))
    with pytest.raises(ValueError, match="checksums"):
        index.complete_store(res.hashes, sums("CC"))
    with pytest.raises(ValueError, match="distinct"):
        index.complete_store(hs("CC"), sums("CC"))
    with pytest.raises(ValueError, match="tokens"):
        index.prepare_store(hs("DE"), toks("D"))
    index.complete_store(res.hashes, sums("C"))
    assert h("C") in index


def test_discard_hides_now_and_frees_at_the_last_release(make_index) -> None:
    index, events = make_index()
    store(index, "ABCD")
    events.take()
    index.prepare_load(hs("B"))
    assert index.discard(hs("BCZ")) == 2
    assert h("B") not in index and h("C") not in index
    assert events.take() == [BlockRemoved(index.tier, tuple(hs("BC")))]
    assert index.usage().used_blocks == 3  # B's slot is still leased
    assert len(index.prepare_store(hs("B"), toks("B"))) == 0  # not re-stored while leased
    index.complete_load(hs("B"))
    assert index.usage().used_blocks == 2 and index.usage().pinned_blocks == 0
    assert len(index.prepare_store(hs("BEF"), toks("BEF"))) == 3


def test_capacity_is_never_exceeded(make_index) -> None:
    index, _ = make_index(num_slots=3)
    for i in range(10):
        names = "".join(chr(ord("a") + (i * 2 + k) % 26) for k in range(2))
        store(index, names)
        assert index.usage().used_blocks <= 3
        assert len(index) <= 3


# --- data plane


@pytest.fixture(params=sorted(SLOT_STORE_FACTORIES))
def make_store(request, tmp_path: Path) -> Callable[[int, int], SlotStore]:
    factory = SLOT_STORE_FACTORIES[request.param]
    return lambda num_slots, block_bytes: factory(num_slots, block_bytes, tmp_path)


@pytest.mark.parametrize("slots", [[0, 1, 2, 3], [5, 2, 7, 0], [6, 7, 1, 2]])
def test_store_round_trip_and_checksums(make_store, slots) -> None:
    store_ = make_store(8, 4096)
    assert (store_.num_slots, store_.block_bytes) == (8, 4096)
    data = np.random.default_rng(1).integers(0, 256, (4, 4096), dtype=np.uint8)
    idx = np.array(slots, dtype=np.int64)
    store_.write(idx, data)
    out = np.zeros_like(data)
    store_.read_into(idx, out)
    assert np.array_equal(out, data)
    assert store_.checksums(idx).tolist() == [xxhash.xxh3_64_intdigest(row.tobytes()) for row in data]


def test_store_rejects_bad_shapes_and_slots(make_store) -> None:
    store_ = make_store(4, 64)
    with pytest.raises(ValueError):
        store_.write(np.array([0, 1]), np.zeros((2, 32), dtype=np.uint8))
    with pytest.raises(ValueError):
        store_.write(np.array([0]), np.zeros((1, 64), dtype=np.int8))
    with pytest.raises(ValueError):
        store_.write(np.array([4]), np.zeros((1, 64), dtype=np.uint8))
    with pytest.raises(ValueError):
        store_.read_into(np.array([-1]), np.zeros((1, 64), dtype=np.uint8))
    with pytest.raises(ValueError):
        store_.checksums(np.array([9]))
