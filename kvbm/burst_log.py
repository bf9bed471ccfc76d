"""Log repeated failures once per burst, not once per block.

A full disk fails every block written to it; logging each one floods the log and costs more
than the failure. :class:`BurstLog` logs the first failure of a burst with its detail, counts
the rest silently, and when a failure comes after ``quiet_s`` without any, logs how many the
previous burst suppressed before starting a new burst. Counting is exact either way; only the
log lines are rationed. The clock is injected so tests control bursts.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable


class BurstLog:
    """Rationed warnings for one kind of failure (thread-safe).

    Args:
        logger: where lines go.
        what: a short noun phrase naming the failure, e.g. ``"G3 write errors"``.
        quiet_s: a gap this long without failures ends a burst.
        clock: seconds, monotonic.
    """

    def __init__(
        self,
        logger: logging.Logger,
        what: str,
        *,
        quiet_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if quiet_s <= 0:
            raise ValueError(f"quiet_s must be positive, got {quiet_s}")
        self._logger = logger
        self._what = what
        self._quiet_s = quiet_s
        self._clock = clock
        self._lock = threading.Lock()
        self._last: float | None = None
        self._suppressed = 0
        self._total = 0
        self._bursts = 0

    @property
    def total(self) -> int:
        """Failures reported since construction (each ``count`` added)."""
        return self._total

    @property
    def bursts(self) -> int:
        """Bursts started, i.e. lines logged with a failure's detail."""
        return self._bursts

    def report(self, count: int, detail: str) -> None:
        """Record ``count`` failures described by ``detail``; logs only at a burst's start."""
        if count <= 0:
            return
        with self._lock:
            now = self._clock()
            self._total += count
            fresh = self._last is None or now - self._last >= self._quiet_s
            self._last = now
            if not fresh:
                self._suppressed += count
                return
            suppressed, self._suppressed = self._suppressed, 0
            self._bursts += 1
        if suppressed:
            self._logger.warning("%s: %d more in the previous burst were not logged", self._what, suppressed)
        self._logger.warning(
            "%s: %s (%d blocks); further failures are counted and logged again after %.0f s without any",
            self._what,
            detail,
            count,
            self._quiet_s,
        )
