"""Hypothesis state machine over manager + transfer engine + real G1/G2 bytes.

Every engine block's bytes are a function of its hash, so an onboarded block is checked byte
for byte. Jobs may stay pending across steps, succeed, or be failed; G2 slots may be
corrupted. Invariants: lookups see exactly the blocks the events say are stored; leased and
reserved blocks stay put; capacity holds; the stats add up to what the model counted.
"""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from kvbm.config import KvbmConfig
from kvbm.ids import BlockHash, Tier
from kvbm.layout import EngineKV
from kvbm.manager.block_manager import BlockManager
from kvbm.manager.events import BlockRemoved, BlockStored
from kvbm.tiers.host import HostBuffer
from kvbm.transfer.engine import TransferEngine
from kvbm.transfer.host_copy import host_handlers
from kvbm.transfer.jobs import TransferJob, failed_result

from .conftest import BLOCK_SIZE, make_hasher, make_tokens

G1_BLOCKS, G2_SLOTS, LAYERS = 16, 5, (48, 16)
_base = make_tokens(6 * BLOCK_SIZE, seed=1)
PROMPTS = [
    make_hasher().hash_prompt(tokens)
    for tokens in (
        _base,
        np.concatenate([_base[: 3 * BLOCK_SIZE], make_tokens(3 * BLOCK_SIZE, seed=2)]),
        make_tokens(4 * BLOCK_SIZE, seed=3),
    )
]


def content(block_hash: BlockHash) -> list[np.ndarray]:
    rng = np.random.default_rng(int.from_bytes(block_hash[:8], "little"))
    return [rng.integers(0, 256, width, dtype=np.uint8) for width in LAYERS]


class ManagerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        config = KvbmConfig(g2_capacity_blocks=G2_SLOTS, verify_g2_reads=True, transfer_thread=False)
        self.layers = [np.zeros((G1_BLOCKS, w), dtype=np.uint8) for w in LAYERS]
        g1 = EngineKV.from_tensors(self.layers)
        self.g2 = HostBuffer(G2_SLOTS, g1.layout.block_bytes)
        self.manager = BlockManager(config, block_size=BLOCK_SIZE, block_bytes=g1.layout.block_bytes)
        self.engine = TransferEngine(host_handlers(g1, self.g2), threaded=False)
        self.free_g1 = list(range(G1_BLOCKS))
        self.pending: list[TransferJob] = []
        self.visible: set[BlockHash] = set()
        self.corrupt_slots: set[int] = set()  # G2 slots whose bytes were flipped
        self.looked_up = self.hits = 0
        self.stored_ok = self.loaded_ok = self.jobs_done = self.jobs_failed = 0

    def teardown(self) -> None:
        self.engine.close()

    def drain_events(self) -> None:
        for event in self.manager.take_events():
            assert event.tier is Tier.G2
            if isinstance(event, BlockStored):
                assert not self.visible & set(event.hashes)
                self.visible.update(event.hashes)
            else:
                assert isinstance(event, BlockRemoved)
                assert set(event.hashes) <= self.visible
                self.visible.difference_update(event.hashes)

    def take_g1(self, n: int) -> list[int]:
        ids, self.free_g1 = self.free_g1[:n], self.free_g1[n:]
        return ids

    @rule(p=st.sampled_from(PROMPTS), data=st.data())
    def lookup(self, p, data) -> None:
        start = data.draw(st.integers(0, len(p)))
        match = self.manager.lookup(p, start=start)
        expected = 0
        while start + expected < len(p) and p.hashes[start + expected] in self.visible:
            expected += 1
        assert match.num_blocks == expected and match.tiers == (Tier.G2,) * expected
        self.looked_up += len(p) - start
        self.hits += expected

    @precondition(lambda self: len(self.free_g1) >= 3)
    @rule(p=st.sampled_from(PROMPTS), data=st.data(), evicting=st.booleans())
    def offload(self, p, data, evicting: bool) -> None:
        a = data.draw(st.integers(0, len(p) - 1))
        b = data.draw(st.integers(a + 1, min(len(p), a + 3)))
        ids = self.take_g1(b - a)
        for g1_id, h in zip(ids, p.hashes[a:b]):
            for layer, row in zip(self.layers, content(h)):
                layer[g1_id] = row
        plan = self.manager.blocks_evicting if evicting else self.manager.blocks_computed
        jobs = plan(p[a:b], ids)
        used = {int(i) for job in jobs for i in job.src_ids}
        self.free_g1 += [i for i in ids if i not in used]
        self.pending += jobs
        self.drain_events()

    @precondition(lambda self: len(self.free_g1) >= 6)
    @rule(p=st.sampled_from(PROMPTS))
    def onboard(self, p) -> None:
        n = self.manager.lookup(p).num_blocks
        self.looked_up += len(p)
        self.hits += n
        if not n:
            return
        ids = self.take_g1(n)
        plan = self.manager.onboard(p[:n], ids)
        assert plan.missing_block_ids.size == 0
        self.pending += plan.jobs

    @precondition(lambda self: self.pending)
    @rule(data=st.data(), fail=st.booleans())
    def finish(self, data, fail: bool) -> None:
        job = self.pending.pop(data.draw(st.integers(0, len(self.pending) - 1)))
        if fail:
            result = failed_result(job, "lost")
        else:
            self.engine.submit(job)
            [result] = self.engine.poll()
        expect_corrupt = [
            i for i, slot in enumerate(job.src_ids.tolist()) if job.src is Tier.G2 and slot in self.corrupt_slots
        ]
        if not fail:
            assert result.corrupt.tolist() == expect_corrupt
        self.manager.complete(result)
        self.jobs_done += 1
        self.jobs_failed += int(not result.ok)
        ok = np.ones(job.num_blocks, dtype=bool)
        ok[result.failed] = False
        if job.dst is Tier.G1:
            self.loaded_ok += int(ok.sum())
            for i in np.flatnonzero(ok).tolist():
                for layer, row in zip(self.layers, content(job.hashes[i])):
                    assert np.array_equal(layer[job.dst_ids[i]], row)
            self.free_g1 += job.dst_ids.tolist()
        else:
            self.stored_ok += int(ok.sum())
            self.free_g1 += job.src_ids.tolist()
            if not fail:
                self.corrupt_slots.difference_update(job.dst_ids.tolist())  # rewritten
        self.drain_events()

    @precondition(lambda self: self.visible)
    @rule(data=st.data())
    def corrupt_a_slot(self, data) -> None:
        candidates = [(p, i) for p in PROMPTS for i, h in enumerate(p.hashes) if h in self.visible]
        p, i = data.draw(st.sampled_from(candidates))
        match = self.manager.lookup(p, start=i)
        self.looked_up += len(p) - i
        self.hits += match.num_blocks
        slot = int(match.slots[0])
        if slot in self.corrupt_slots:
            return  # a second flip of the same byte could undo the first
        self.g2.rows[slot, data.draw(st.integers(0, self.g2.block_bytes - 1))] ^= 0x5A
        self.corrupt_slots.add(slot)

    @invariant()
    def stats_add_up(self) -> None:
        g2 = self.manager.stats().tier(Tier.G2)
        assert g2.used_blocks <= g2.capacity_blocks == G2_SLOTS
        reserved = {h for j in self.pending if j.dst is Tier.G2 for h in j.hashes}
        leased = {h for j in self.pending if j.src is Tier.G2 for h in j.hashes}
        assert g2.pinned_blocks == len(reserved) + len(leased)
        assert g2.hits == self.hits and g2.hits + g2.misses == self.looked_up
        assert g2.blocks_offloaded == self.stored_ok and g2.blocks_onboarded == self.loaded_ok
        assert g2.transfers == self.jobs_done and g2.transfer_failures == self.jobs_failed
        assert self.manager.pending_jobs == len(self.pending)
        assert g2.used_blocks >= len(self.visible) + len(reserved)


TestManagerState = ManagerMachine.TestCase
TestManagerState.settings = settings(
    max_examples=50, stateful_step_count=30, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
