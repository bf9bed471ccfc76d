"""Hypothesis state machine over manager + transfer engine + real G1/G2/G3 bytes.

Jobs queue up across steps and run in planning order (as the transfer engine runs them), some
are failed instead (a lost worker), and G3 slot files get flipped bytes. Every block handed to
G1 is checked byte for byte; every failed position must leave its G1 block untouched. With
nothing pending every lease is released; events agree with occupancy; capacity holds.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from kvbm.hashing import BlockHasher, HashedBlocks
from kvbm.ids import BlockHash, Tier
from kvbm.manager.events import BlockRemoved, BlockStored
from kvbm.transfer.jobs import TransferJob, failed_result

from .conftest import BLOCK_SIZE, STRIDE, build_node, g3_config, make_blocks, make_fingerprint, slot_file

G1_BLOCKS, G2_SLOTS, G3_SLOTS = 24, 3, 5


def _prompts() -> list[HashedBlocks]:
    rng = np.random.default_rng(7)
    base = rng.integers(0, 32000, 6 * BLOCK_SIZE)
    hasher = BlockHasher(make_fingerprint())
    return [
        hasher.hash_prompt(base),
        hasher.hash_prompt(np.concatenate([base[: 2 * BLOCK_SIZE], rng.integers(0, 32000, 3 * BLOCK_SIZE)])),
        hasher.hash_prompt(rng.integers(0, 32000, 4 * BLOCK_SIZE)),
    ]


PROMPTS = _prompts()


def machine_for(policy: str, g1_on_host: bool):
    class DiskMachine(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.dir = Path(tempfile.mkdtemp(prefix="kvbm-g3-state-"))
            config = g3_config(self.dir / "g3", g3_blocks=G3_SLOTS, g2_capacity_blocks=G2_SLOTS, offload_policy=policy)
            self.node = build_node(config, g1_blocks=G1_BLOCKS, g1_on_host=g1_on_host)
            self.free_g1 = list(range(G1_BLOCKS))
            self.queue: list[TransferJob] = []
            self.busy_g1: dict[int, list[int]] = {}  # job id -> G1 ids it reads or fills
            self.visible: dict[Tier, set[BlockHash]] = {Tier.G2: set(), Tier.G3: set()}

        def teardown(self) -> None:
            self.node.close()
            shutil.rmtree(self.dir, ignore_errors=True)

        def take_g1(self, n: int) -> list[int]:
            ids, self.free_g1 = self.free_g1[:n], self.free_g1[n:]
            return ids

        def enqueue(self, jobs: list[TransferJob], g1_ids: list[int]) -> None:
            for job in jobs:
                ids = [
                    int(i) for i in (job.src_ids if job.src is Tier.G1 else job.dst_ids if job.dst is Tier.G1 else [])
                ]
                self.busy_g1[job.job_id] = ids
            leftover = set(g1_ids) - {i for job in jobs for i in self.busy_g1[job.job_id]}
            self.free_g1 += sorted(leftover)
            self.queue += jobs

        @rule(p=st.sampled_from(PROMPTS), data=st.data())
        def compute(self, p, data) -> None:
            n = data.draw(st.integers(1, len(p)))
            if len(self.free_g1) < n:
                return
            ids = self.take_g1(n)
            self.node.fill_g1(ids, p.hashes[:n])
            evicting = data.draw(st.booleans())
            call = self.node.manager.blocks_evicting if evicting else self.node.manager.blocks_computed
            self.enqueue(call(p[:n], ids), ids)

        @rule(seed=st.integers(0, 40))
        def churn_g2(self, seed: int) -> None:
            """Other blocks pass through G2 at once, leaving older blocks in G3 only."""
            if len(self.free_g1) < G2_SLOTS:
                return
            filler = make_blocks(G2_SLOTS, seed=1000 + seed)
            ids = self.take_g1(G2_SLOTS)
            self.node.fill_g1(ids, filler.hashes)
            self.enqueue(self.node.manager.blocks_evicting(filler, ids), ids)
            self.connector_step()

        @rule(p=st.sampled_from(PROMPTS))
        def onboard(self, p) -> None:
            match = self.node.manager.lookup(p)
            n = match.num_blocks
            if not n or len(self.free_g1) < n:
                return
            ids = self.take_g1(n)
            for layer in self.node.layers:
                layer[ids] = 0
            plan = self.node.manager.onboard(p[:n], ids)
            self.enqueue(plan.jobs, ids)

        @rule()
        def take_jobs(self) -> None:
            self.enqueue(self.node.manager.take_jobs(), [])

        @precondition(lambda self: self.queue)
        @rule(data=st.data())
        def run_jobs(self, data) -> None:
            count = data.draw(st.integers(1, len(self.queue)))
            lost_jobs = st.integers(0, 7).map(lambda x: x == 0)
            fail = data.draw(st.lists(lost_jobs, min_size=count, max_size=count))
            self.run(count, fail)

        @rule()
        def connector_step(self) -> None:
            """What a connector does each step: submit what the manager has, run everything."""
            self.enqueue(self.node.manager.take_jobs(), [])
            self.run(len(self.queue), [False] * len(self.queue))

        def run(self, count: int, fail: list[bool]) -> None:
            jobs, self.queue = self.queue[:count], self.queue[count:]
            for job, lost in zip(jobs, fail):
                if lost:
                    result = failed_result(job, "worker lost")
                else:
                    self.node.engine.submit(job)
                    [result] = self.node.engine.poll()
                self.node.manager.complete(result)
                if job.dst is Tier.G1:
                    failed = set(result.failed.tolist())
                    for pos, (block_id, h) in enumerate(zip(job.dst_ids.tolist(), job.hashes)):
                        if pos in failed:
                            assert not any(layer[block_id].any() for layer in self.node.layers), "bad bytes reached G1"
                        else:
                            assert self.node.holds(block_id, h), "G1 got the wrong bytes"
                self.free_g1 += self.busy_g1.pop(job.job_id)
                # G1 ids of a two-hop onboarding's first job are none; the second frees them.

        @rule(p=st.sampled_from(PROMPTS), data=st.data())
        def corrupt_g3(self, p, data) -> None:
            match = self.node.manager.lookup(p)
            g3 = [int(s) for t, s in zip(match.tiers, match.slots.tolist()) if t is Tier.G3]
            if not g3:
                return
            slot = data.draw(st.sampled_from(g3))
            with open(slot_file(self.dir / "g3"), "r+b") as f:
                f.seek(slot * STRIDE + 17)
                f.write(b"\xa5\x5a")

        @invariant()
        def events_agree(self) -> None:
            for event in self.node.manager.take_events():
                seen = self.visible[event.tier]
                if isinstance(event, BlockStored):
                    assert not seen & set(event.hashes)
                    seen.update(event.hashes)
                else:
                    assert isinstance(event, BlockRemoved)
                    assert set(event.hashes) <= seen
                    seen.difference_update(event.hashes)

        @invariant()
        def occupancy(self) -> None:
            stats = self.node.manager.stats()
            assert stats.pending_jobs >= len(self.queue)  # demotions wait in the manager for take_jobs
            for tier, cap in ((Tier.G2, G2_SLOTS), (Tier.G3, G3_SLOTS)):
                t = stats.tier(tier)
                assert t.used_blocks <= cap
                assert t.used_blocks >= len(self.visible[tier])
                if not stats.pending_jobs:
                    assert t.pinned_blocks == 0, f"{tier.name} leases outlive their jobs"
                    assert t.used_blocks == len(self.visible[tier])

    return DiskMachine


for _policy in ("write_through", "on_eviction"):
    for _host in (True, False):
        _case = machine_for(_policy, _host).TestCase
        _case.settings = settings(
            max_examples=25, stateful_step_count=50, deadline=None, suppress_health_check=[HealthCheck.too_slow]
        )
        globals()[f"TestDiskState_{_policy}_{'host' if _host else 'gpu'}"] = _case
del _case, _policy, _host
