"""The clock every loop reads, so tests can step time instead of sleeping."""
from __future__ import annotations

import threading
import time


class Clock:
    """Wall-clock seconds since the epoch (UTC)."""

    def time(self) -> float:
        return time.time()

    def sleep(self, seconds: float) -> None:
        if seconds > 0:
            time.sleep(seconds)


class ManualClock(Clock):
    """A clock that moves only when told to: ``clock.advance(60)``."""

    def __init__(self, start: float = 1_700_000_000.0):
        self._now = float(start)
        self._lock = threading.Lock()

    def time(self) -> float:
        with self._lock:
            return self._now

    def advance(self, seconds: float) -> float:
        with self._lock:
            self._now += seconds
            return self._now

    def set(self, now: float) -> None:
        with self._lock:
            self._now = float(now)

    def sleep(self, seconds: float) -> None:
        self.advance(max(0.0, seconds))


SYSTEM = Clock()
