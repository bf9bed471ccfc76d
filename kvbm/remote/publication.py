"""Which block hashes a worker can serve, kept current from its stored/removed events.

The worker side (:class:`Publication`) folds :class:`~kvbm.manager.events.BlockStored` /
:class:`~kvbm.manager.events.BlockRemoved` events (drained with the manager's
``take_events()``) into a set of servable hashes: a hash is published while at least one of the
publishing tiers holds it (stored in G1 and G2, removed from G1: still published). Every change
bumps a version; the last ``history`` versions are kept so a router can ask for a delta.

The router side (:class:`PublishedView`) applies what ``export(since)`` returns: a snapshot
replaces its view, a delta moves it from version ``since`` to the new version. A delta that
does not start at the view's version is refused (``apply`` returns False): ask for a snapshot.

Wire form (JSON-safe): ``{"kind": "snapshot", "worker", "version", "hashes"}`` or
``{"kind": "delta", "worker", "since", "version", "added", "removed"}``; hash lists are base64
of 16-byte hashes back to back.
"""

from __future__ import annotations

import base64
import collections
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from kvbm.ids import BlockHash, Tier
from kvbm.manager.events import BlockRemoved, BlockStored, KvEvent
from kvbm.remote.metadata import join_hashes, split_hashes


class Publication:
    """Servable hashes of one worker, versioned (see the module docstring). Not thread-safe."""

    def __init__(self, worker: str, tiers: Iterable[Tier], *, history: int = 1024) -> None:
        if history < 1:
            raise ValueError(f"history must be positive, got {history}")
        self._worker = worker
        self._tiers = frozenset(tiers)
        self._where: dict[BlockHash, set[Tier]] = {}
        self._version = 0
        # (version, hashes whose published state changed in that version)
        self._changes: collections.deque[tuple[int, frozenset[BlockHash]]] = collections.deque(maxlen=history)

    @property
    def version(self) -> int:
        return self._version

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, block_hash: object) -> bool:
        return block_hash in self._where

    def apply(self, events: Iterable[KvEvent]) -> int:
        """Fold events in, oldest first; returns the version after them (bumped once if any
        published hash changed)."""
        changed: set[BlockHash] = set()
        where = self._where
        for event in events:
            if event.tier not in self._tiers:
                continue
            if isinstance(event, BlockStored):
                for h in event.hashes:
                    tiers = where.get(h)
                    if tiers is None:
                        where[h] = {event.tier}
                        changed.add(h)
                    else:
                        tiers.add(event.tier)
            elif isinstance(event, BlockRemoved):
                for h in event.hashes:
                    tiers = where.get(h)
                    if tiers is not None:
                        tiers.discard(event.tier)
                        if not tiers:
                            del where[h]
                            changed.add(h)
        if changed:
            self._version += 1
            self._changes.append((self._version, frozenset(changed)))
        return self._version

    def snapshot(self) -> dict[str, Any]:
        """Every published hash, sorted, at the current version."""
        return {
            "kind": "snapshot",
            "worker": self._worker,
            "version": self._version,
            "hashes": join_hashes(sorted(self._where)),
        }

    def export(self, since: int | None) -> dict[str, Any]:
        """A delta from version ``since`` when the history still covers it, else a snapshot."""
        if since is None or since > self._version or (since < self._version and not self._covers(since)):
            return self.snapshot()
        touched: set[BlockHash] = set()
        for version, hashes in self._changes:
            if version > since:
                touched |= hashes
        added = sorted(h for h in touched if h in self._where)
        removed = sorted(h for h in touched if h not in self._where)
        return {
            "kind": "delta",
            "worker": self._worker,
            "since": since,
            "version": self._version,
            "added": join_hashes(added),
            "removed": join_hashes(removed),
        }

    def _covers(self, since: int) -> bool:
        return bool(self._changes) and self._changes[0][0] <= since + 1


class PublishedView:
    """A router's copy of one worker's published hashes."""

    def __init__(self) -> None:
        self._hashes: set[BlockHash] = set()
        self._version: int | None = None

    @property
    def version(self) -> int | None:
        """Version of the view, ``None`` before the first snapshot."""
        return self._version

    @property
    def hashes(self) -> frozenset[BlockHash]:
        return frozenset(self._hashes)

    def __contains__(self, block_hash: object) -> bool:
        return block_hash in self._hashes

    def __len__(self) -> int:
        return len(self._hashes)

    def __iter__(self) -> Iterator[BlockHash]:
        return iter(self._hashes)

    def apply(self, message: Mapping[str, Any]) -> bool:
        """Apply a snapshot or a delta; False (view unchanged) for a delta that does not start
        at this view's version.

        Raises:
            ValueError: a malformed message.
        """
        try:
            kind = message["kind"]
            version = int(message["version"])
            if kind == "snapshot":
                self._hashes = set(_hashes(message["hashes"]))
            elif kind == "delta":
                if self._version is None or int(message["since"]) != self._version:
                    return False
                self._hashes.difference_update(_hashes(message["removed"]))
                self._hashes.update(_hashes(message["added"]))
            else:
                raise ValueError(f"unknown publication kind {kind!r}")
        except (KeyError, TypeError) as exc:
            raise ValueError(f"malformed publication: {exc!r}") from None
        self._version = version
        return True


def _hashes(data: str) -> tuple[BlockHash, ...]:
    return split_hashes(base64.b64decode(data))
