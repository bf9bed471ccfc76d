"""Engine blocks whose KV may derive from a failed load, and the stores that must not commit.

When a synchronous load fails, vLLM has already scheduled the step that computes on top of
the loaded blocks: the failed block and every block its request computes after it hold wrong
KV. vLLM reports the failed blocks in that step's output (``invalid_block_ids``) and rewinds
the request to its first failed block, but under the ``recompute`` policy it keeps the wrong
blocks in its prefix cache until the request writes them again, and another request that
shares the prefix may compute on them meanwhile. kvbm must store none of it: the scheduler
side keeps this ledger.

    loads_failed(invalid, tables)  # a step's failed loads: its blocks from there on are suspect,
                                   # and planned stores that depend on one are tainted
    written(table, first, end)     # a step writes blocks [first, end) of a request: clean again
                                   # if everything before them is clean, else suspect too
    loaded(block_ids)              # a load is planned into these blocks: its bytes stand alone
    clean_prefix(table, n)         # how many of a request's first n blocks may be offered or held
    planned(job, req_id, table, first)  # a store of blocks computed on table[:len(table)]
    settle(result) -> (result, store)   # a store's result; a tainted store's becomes a failure

A block stays suspect until a step writes it on clean blocks, so a wrong block left in vLLM's
prefix cache is never stored, held for a decode worker, or trusted as a dependency. Checks cost
nothing while no block is suspect.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

import numpy as np

from kvbm.ids import JobId
from kvbm.transfer.jobs import JobResult


@dataclasses.dataclass(frozen=True)
class PlannedStore:
    """A store of a request's blocks ``[first, first + num_blocks)`` computed on ``depends_on``."""

    req_id: str
    depends_on: tuple[int, ...]  # the request's engine blocks up to the stored ones, at planning
    first: int
    num_blocks: int


class SuspectBlocks:
    """The ledger of blocks that may hold wrong KV (see the module docstring)."""

    def __init__(self) -> None:
        self._suspect: set[int] = set()
        self._planned: dict[JobId, PlannedStore] = {}
        self._tainted: set[JobId] = set()

    def __len__(self) -> int:
        return len(self._suspect)

    def loads_failed(self, invalid_block_ids: set[int], tables: Iterable[Sequence[int]]) -> None:
        """A step's loads into ``invalid_block_ids`` failed; ``tables`` are the block lists of
        the requests that may use them (a block shared through vLLM's prefix cache counts for
        every request holding it). Taints every planned store that depends on a suspect block:
        step N's failures arrive before any result of a store planned in step N or later."""
        self._suspect |= invalid_block_ids
        for table in tables:
            if invalid_block_ids.isdisjoint(table):
                continue
            first = next(i for i, b in enumerate(table) if b in invalid_block_ids)
            self._suspect.update(table[first:])
        for job_id, store in self._planned.items():
            if not self._suspect.isdisjoint(store.depends_on):
                self._tainted.add(job_id)

    def written(self, table: Sequence[int], first: int, end: int) -> None:
        """A step writes the request's blocks ``table[first:end]``."""
        if not self._suspect:
            return
        if self._suspect.isdisjoint(table[:first]):
            self._suspect.difference_update(table[first:end])
        else:
            self._suspect.update(table[first:end])

    def loaded(self, block_ids: Iterable[int]) -> None:
        """A load into ``block_ids`` is planned: loaded KV depends on no other engine block (if
        the load fails, the step's ``loads_failed`` marks them again)."""
        if self._suspect:
            self._suspect.difference_update(block_ids)

    def clean_prefix(self, table: Sequence[int], n: int) -> int:
        """How many of ``table[:n]`` come before the first suspect block."""
        if not self._suspect or self._suspect.isdisjoint(table[:n]):
            return n
        return next(i for i, b in enumerate(table[:n]) if b in self._suspect)

    def planned(self, job_id: JobId, req_id: str, depends_on: Sequence[int], first: int, num_blocks: int) -> None:
        """Remember a store until its result: it is tainted if one of ``depends_on`` fails."""
        self._planned[job_id] = PlannedStore(req_id, tuple(depends_on), first, num_blocks)

    def settle(self, result: JobResult) -> tuple[JobResult, PlannedStore | None]:
        """``result`` to apply, and the store it ends when that store was tainted (its blocks
        were computed on wrong KV: every block fails)."""
        store = self._planned.pop(result.job_id, None)
        if store is None or result.job_id not in self._tainted:
            return result, None
        self._tainted.discard(result.job_id)
        failed = dataclasses.replace(
            result,
            failed=np.arange(store.num_blocks, dtype=np.int64),
            checksums=None,
            reason="computed on top of a block that failed to load",
        )
        return failed, store
