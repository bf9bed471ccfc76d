"""Block stored/removed events, for KV-aware routing.

Tiers emit into one shared :class:`EventLog` (so events keep their global order across tiers);
the owner drains it with ``take()``. The log is bounded: when nobody drains it, the oldest
events are dropped and counted in ``dropped`` (reported in the stats) instead of growing
without limit. A capacity of 0 disables collection.
"""

from __future__ import annotations

import collections
import dataclasses

from kvbm.ids import BlockHash, Tier


@dataclasses.dataclass(frozen=True)
class BlockStored:
    """Blocks became readable in ``tier``, in the order they were committed."""

    tier: Tier
    hashes: tuple[BlockHash, ...]


@dataclasses.dataclass(frozen=True)
class BlockRemoved:
    """Blocks stopped being readable in ``tier`` (evicted or discarded)."""

    tier: Tier
    hashes: tuple[BlockHash, ...]


KvEvent = BlockStored | BlockRemoved


class EventLog:
    """Bounded FIFO of events. Not thread-safe: used from the manager's thread only."""

    def __init__(self, capacity: int) -> None:
        if capacity < 0:
            raise ValueError(f"capacity must be >= 0, got {capacity}")
        self._capacity = capacity
        self._events: collections.deque[KvEvent] = collections.deque()
        self._dropped = 0

    @property
    def dropped(self) -> int:
        """Events discarded because the log was full."""
        return self._dropped

    def emit(self, event: KvEvent) -> None:
        if not self._capacity or not event.hashes:
            return
        if len(self._events) == self._capacity:
            self._events.popleft()
            self._dropped += 1
        self._events.append(event)

    def take(self) -> list[KvEvent]:
        """Return and forget every event emitted since the last call, oldest first."""
        events = list(self._events)
        self._events.clear()
        return events
