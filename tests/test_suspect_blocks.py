"""The scheduler side's ledger of engine blocks that may derive from a failed load."""

from __future__ import annotations

import numpy as np

from kvbm.connectors.vllm.suspect_blocks import SuspectBlocks
from kvbm.ids import JobId
from kvbm.transfer.jobs import JobResult

A = [10, 11, 12, 13, 14, 15]  # request A's engine blocks
B = [10, 11, 12, 20, 21]  # B shares A's first three through vLLM's prefix cache


def ok_result(job: int, n: int) -> JobResult:
    return JobResult(JobId(job), np.zeros(0, np.int64), np.zeros(0, np.int64), np.ones(n, np.uint64), None, 0.0)


def test_a_failed_block_makes_it_and_everything_after_it_suspect_in_every_table() -> None:
    ledger = SuspectBlocks()
    assert ledger.clean_prefix(A, 6) == 6 and len(ledger) == 0
    ledger.loads_failed({12}, [A, B, [30, 31]])
    assert ledger.clean_prefix(A, 6) == 2 and ledger.clean_prefix(B, 5) == 2
    assert ledger.clean_prefix([30, 31], 2) == 2
    assert len(ledger) == 6  # 12..15 of A and 20, 21 of B


def test_blocks_written_on_clean_blocks_are_clean_again_and_on_suspect_ones_suspect() -> None:
    ledger = SuspectBlocks()
    ledger.loads_failed({12}, [A])
    ledger.written(B, 3, 5)  # B computes 20, 21 on top of suspect 12
    assert ledger.clean_prefix(B, 5) == 2
    ledger.written(A, 2, 4)  # A, rewound to its failed block, writes 12 and 13 again
    assert ledger.clean_prefix(A, 6) == 4
    ledger.written(A, 4, 6)
    assert ledger.clean_prefix(A, 6) == 6
    assert ledger.clean_prefix(B, 5) == 3  # B's own blocks were computed on wrong KV: still suspect
    ledger.loaded([20, 21])  # reallocated and loaded: their bytes stand alone
    assert ledger.clean_prefix(B, 5) == 5 and len(ledger) == 0


def test_a_planned_store_depending_on_a_failed_block_fails_and_others_commit() -> None:
    ledger = SuspectBlocks()
    ledger.planned(JobId(1), "a", A[:6], 4, 2)  # A's blocks 4, 5, computed on 10..15
    ledger.planned(JobId(2), "c", [30, 31], 0, 2)
    ledger.loads_failed({12}, [A])
    tainted, store = ledger.settle(ok_result(1, 2))
    assert store is not None and (store.req_id, store.first) == ("a", 4)
    assert tainted.failed.tolist() == [0, 1] and tainted.checksums is None and "failed to load" in tainted.reason
    untouched, store = ledger.settle(ok_result(2, 2))
    assert store is None and untouched.ok
    # A result settles once: a second one (unknown job) passes through unchanged.
    again, store = ledger.settle(ok_result(1, 2))
    assert store is None and again.ok
