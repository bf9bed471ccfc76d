"""Which worker gets a request: pure functions over worker records, no I/O.

Contract:
    * :func:`choose_prefill` prefers the worker whose published KV blocks cover the longest
      prefix of the prompt's chained block hashes (a block is reusable only if every block
      before it is), then the least loaded one.
    * :func:`choose_by_load` (decode and aggregated hops) takes the least loaded worker.
    * Load is ``in_flight`` first, then ``routed`` (requests ever sent), so idle workers take
      turns; the id breaks the last tie, which makes every choice deterministic.
    * Both return None when there is no candidate.

Published hashes come from a :data:`PublishedHashes` callable (worker id -> the hashes the
worker has announced, e.g. from kvbm's block stored/removed events); the default publishes
nothing, which reduces prefill choice to load.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Hashable, Sequence

from kvbm.serving.workers import Worker

PublishedHashes = Callable[[str], Collection[Hashable]]


def no_published_hashes(worker_id: str) -> Collection[Hashable]:
    """The default :data:`PublishedHashes`: no worker has announced any block."""
    return ()


def prefix_overlap(prompt_hashes: Sequence[Hashable], published: Collection[Hashable]) -> int:
    """Number of leading prompt blocks present in ``published``."""
    count = 0
    for block_hash in prompt_hashes:
        if block_hash not in published:
            break
        count += 1
    return count


def _load_key(worker: Worker) -> tuple[int, int, str]:
    return worker.in_flight, worker.routed, worker.id


def choose_by_load(workers: Sequence[Worker]) -> Worker | None:
    """The least loaded worker, or None for an empty sequence."""
    return min(workers, key=_load_key, default=None)


def choose_prefill(
    workers: Sequence[Worker], prompt_hashes: Sequence[Hashable], published: PublishedHashes = no_published_hashes
) -> Worker | None:
    """The worker with the longest cached prefix of the prompt, then the least loaded.

    Args:
        workers: candidates (already filtered to ACTIVE, healthy prefill workers).
        prompt_hashes: the prompt's chained block hashes, in order; empty when unknown.
        published: worker id -> the hashes that worker holds.
    """
    if not prompt_hashes:
        return choose_by_load(workers)
    overlaps = {w.id: prefix_overlap(prompt_hashes, published(w.id)) for w in workers}
    return min(workers, key=lambda w: (-overlaps[w.id], *_load_key(w)), default=None)
