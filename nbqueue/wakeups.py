"""Wake-ups inside one process: a producer wakes a reserver or waiter of the same store at once.

Below the protocol modules: brokers and result backends of every driver use ``WAKEUPS``.
"""
from __future__ import annotations

import contextlib
import os
import threading
from typing import Any, Iterable


class LocalWakeups:
    """Per-process wake-ups keyed by a store's identity (a file path, a server).

    Lets a producer in the same process wake a sleeping reserver or waiter at once,
    instead of the reserver polling. Other processes poll with back-off, unless the driver
    feeds these wake-ups from a channel between processes too (the SQLite driver's, beside
    its file). A waiter for particular task ids ``watch``es them and is woken only by a
    notification that names one of them (a chain's waiter sleeps through its hundred steps).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._conds: dict[Any, threading.Condition] = {}
        self._versions: dict[Any, int] = {}
        self._watches: dict[Any, dict[str, set]] = {}

    def condition(self, key: Any) -> threading.Condition:
        cond = self._conds.get(key)
        if cond is None:
            with self._lock:
                cond = self._conds.get(key)
                if cond is None:
                    cond = self._conds[key] = threading.Condition()
                    self._versions.setdefault(key, 0)     # kept across a fork (see _after_fork)
        return cond

    def version(self, key: Any) -> int:
        return self._versions.get(key, 0)

    def notify(self, key: Any, ids: Iterable[str] | None = None) -> None:
        """A new version for ``key``; wakes its waiters and the watchers of ``ids`` (all when None)."""
        cond = self.condition(key)
        with cond:
            self._versions[key] = self._versions.get(key, 0) + 1
            cond.notify_all()
        watches = self._watches.get(key)
        if watches:
            with self._lock:
                if ids is None:
                    events = [ev for evs in watches.values() for ev in evs]
                else:
                    events = [ev for i in ids for ev in watches.get(i, ())]
            for ev in events:
                ev.set()

    def poke(self, key: Any) -> None:
        """Wake the waiters without a new version: they look at their own state (a
        reserver its hand-over slot) and, finding nothing else changed, wait again."""
        cond = self.condition(key)
        with cond:
            cond.notify_all()

    def wait(self, key: Any, seen_version: int, timeout: float) -> int:
        """Wait until notified after ``seen_version`` or timeout; returns the version now."""
        cond = self.condition(key)
        with cond:
            if self._versions.get(key, 0) == seen_version and timeout > 0:
                cond.wait(timeout)
            return self._versions.get(key, 0)

    @contextlib.contextmanager
    def watching(self, key: Any, task_id: str):
        """``with WAKEUPS.watching(key, id) as ev:`` an Event set by each notification naming id."""
        ev = threading.Event()
        with self._lock:
            self._watches.setdefault(key, {}).setdefault(task_id, set()).add(ev)
        try:
            yield ev
        finally:
            with self._lock:
                evs = self._watches[key][task_id]
                evs.discard(ev)
                if not evs:
                    del self._watches[key][task_id]


    def _after_fork(self) -> None:
        """In a forked child: the parent's other threads are gone, and a lock one of them held
        would stay held; fresh locks and conditions, no watchers (the versions are kept)."""
        self._lock = threading.Lock()
        self._conds = {}
        self._watches = {}


WAKEUPS = LocalWakeups()
os.register_at_fork(after_in_child=WAKEUPS._after_fork)
