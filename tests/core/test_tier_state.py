"""Hypothesis state machine over the tier contract, against every tier factory in conftest.

The model keeps the exact LRU order, so every eviction is checked for which blocks it chose,
not only for how many. Invariants: a leased or reserved block is never evicted; capacity is
never exceeded; a committed block is found (with its tokens and checksum) until it is evicted
or discarded; usage and events add up to the model.
"""

from __future__ import annotations

import collections
import shutil
import tempfile
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from kvbm.hashing import TOKEN_DTYPE
from kvbm.ids import BlockHash
from kvbm.manager.events import BlockRemoved, BlockStored, EventLog

from .conftest import TIER_INDEX_FACTORIES

NAMES = [BlockHash(bytes([i]) * 16) for i in range(12)]
BS = 2
CAPACITY = 5


def tokens_for(hashes: list[BlockHash]) -> np.ndarray:
    return np.array([[h[0], h[0] + 1] for h in hashes], dtype=TOKEN_DTYPE)


def machine_for(factory):
    class TierMachine(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.workdir = Path(tempfile.mkdtemp(prefix="kvbm-tier-"))
            self.events = EventLog(100_000)
            self.index = factory(CAPACITY, BS, self.events, self.workdir)
            self.lru: collections.OrderedDict[BlockHash, None] = collections.OrderedDict()  # oldest first
            self.reserved: set[BlockHash] = set()
            self.leases: collections.Counter[BlockHash] = collections.Counter()
            self.doomed: collections.Counter[BlockHash] = collections.Counter()  # discarded, leases left
            self.evictions = 0
            self.visible_by_events: set[BlockHash] = set()

        def teardown(self) -> None:
            shutil.rmtree(self.workdir, ignore_errors=True)

        def used(self) -> int:
            return len(self.lru) + len(self.reserved) + len(self.doomed)

        @rule(data=st.data())
        def store(self, data) -> None:
            request = data.draw(st.lists(st.sampled_from(NAMES), min_size=1, max_size=4))
            res = self.index.prepare_store(request, tokens_for(request))
            wanted = []
            for name in request:
                known = name in self.lru or name in self.reserved or name in self.doomed
                if not known and name not in wanted:
                    wanted.append(name)
            need = len(wanted) - (CAPACITY - self.used())
            victims = [h for h in self.lru if not self.leases[h] and h not in request][: max(need, 0)]
            assert list(res.evicted) == victims, "evicted the wrong blocks"
            for h in victims:
                del self.lru[h]
            self.evictions += len(victims)
            fits = CAPACITY - self.used()
            assert list(res.hashes) == wanted[:fits]
            assert [request[i] for i in res.indices.tolist()] == list(res.hashes)
            self.reserved.update(res.hashes)

        @precondition(lambda self: self.reserved)
        @rule(data=st.data(), commit=st.booleans())
        def finish_store(self, data, commit: bool) -> None:
            chosen = data.draw(st.lists(st.sampled_from(sorted(self.reserved)), min_size=1, unique=True))
            if commit:
                self.index.complete_store(chosen, np.array([h[0] * 7 for h in chosen], dtype=np.uint64))
                for h in reversed(chosen):
                    self.lru[h] = None
            else:
                self.index.abort_store(chosen)
            self.reserved.difference_update(chosen)

        @precondition(lambda self: self.lru)
        @rule(data=st.data())
        def lease(self, data) -> None:
            chosen = data.draw(st.lists(st.sampled_from(list(self.lru)), min_size=1, max_size=3))
            slots = self.index.prepare_load(chosen)
            assert len(slots) == len(chosen)
            self.leases.update(chosen)

        @precondition(lambda self: +self.leases)
        @rule(data=st.data())
        def release(self, data) -> None:
            name = data.draw(st.sampled_from(sorted(+self.leases)))
            self.index.complete_load([name])
            self.leases[name] -= 1
            if name in self.doomed and not self.leases[name]:
                del self.doomed[name]

        @rule(data=st.data())
        def touch(self, data) -> None:
            chosen = data.draw(st.lists(st.sampled_from(NAMES), max_size=4))
            self.index.touch(chosen)
            for h in reversed(chosen):
                if h in self.lru:
                    self.lru.move_to_end(h)

        @precondition(lambda self: self.lru)
        @rule(data=st.data())
        def discard(self, data) -> None:
            chosen = data.draw(st.lists(st.sampled_from(list(self.lru)), min_size=1, max_size=2, unique=True))
            assert self.index.discard(chosen) == len(chosen)
            for h in chosen:
                del self.lru[h]
                if self.leases[h]:
                    self.doomed[h] = 1

        @invariant()
        def usage_adds_up(self) -> None:
            usage = self.index.usage()
            assert usage.used_blocks == self.used() <= CAPACITY
            leased_slots = {h for h in +self.leases}
            assert usage.pinned_blocks == len(self.reserved) + len(leased_slots)
            assert usage.evictions == self.evictions
            assert len(self.index) == len(self.lru)

        @invariant()
        def committed_blocks_are_found(self) -> None:
            for h in NAMES:
                assert (h in self.index) == (h in self.lru)
            for h in self.lru:
                slots = self.index.match_prefix([h])
                assert len(slots) == 1
                assert np.array_equal(self.index.tokens(slots), tokens_for([h]))
                assert self.index.checksums(slots).tolist() == [h[0] * 7]

        @invariant()
        def leased_blocks_stay(self) -> None:
            for h in +self.leases:
                assert h in self.lru or h in self.doomed

        @invariant()
        def events_match_visibility(self) -> None:
            for event in self.events.take():
                if isinstance(event, BlockStored):
                    self.visible_by_events.update(event.hashes)
                else:
                    assert isinstance(event, BlockRemoved)
                    self.visible_by_events.difference_update(event.hashes)
            assert self.visible_by_events == set(self.lru)

    return TierMachine


for _name, _factory in TIER_INDEX_FACTORIES.items():
    _case = machine_for(_factory).TestCase
    _case.settings = settings(
        max_examples=60, stateful_step_count=30, deadline=None, suppress_health_check=[HealthCheck.too_slow]
    )
    globals()[f"TestTierState_{_name}"] = _case
del _case, _name, _factory  # unittest classes are collected under any name
