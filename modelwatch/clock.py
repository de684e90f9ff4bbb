"""Time as a dependency: pure decisions take times; threads get them from a `Clock`."""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def monotonic(self) -> float:
        """Seconds on a clock that never goes back (for timers)."""
        ...

    def time(self) -> float:
        """Wall-clock seconds since the epoch (for event times and persisted deadlines)."""
        ...


class SystemClock:
    def monotonic(self) -> float:
        return time.monotonic()

    def time(self) -> float:
        return time.time()
