"""Wake-ups inside one process: a producer wakes a reserver or waiter of the same store at once.

Below the protocol modules: brokers and result backends of every driver use ``WAKEUPS``.
"""
from __future__ import annotations

import contextlib
import logging
import os
import threading
from typing import Any, Callable, Iterable

log = logging.getLogger(__name__)


class LocalWakeups:
    """Per-process wake-ups keyed by a store's identity (a file path, a server).

    Lets a producer in the same process wake a sleeping reserver or waiter at once,
    instead of the reserver polling. Other processes poll with back-off, unless the driver
    feeds these wake-ups from a channel between processes too (the SQLite driver's, beside
    its file). A waiter for particular task ids ``watch``es them and is woken only by a
    notification that names one of them (a chain's waiter sleeps through its hundred steps).

    Work may also be left for the next waiter of a key (``before_wait``): a reserver of this
    process that lingers over messages handed to it (the SQLite broker's hand-over) is hurried
    by the first thread of this process that begins to wait for a result.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._conds: dict[Any, threading.Condition] = {}
        self._versions: dict[Any, int] = {}
        self._watches: dict[Any, dict[str, set]] = {}
        self._waiters: dict[Any, int] = {}                  # key -> threads in wait() or watching()
        self._before: dict[Any, list] = {}                  # key -> callables for its next waiter

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
        self._arrive(key)
        try:
            cond = self.condition(key)
            with cond:
                if self._versions.get(key, 0) == seen_version and timeout > 0:
                    cond.wait(timeout)
                return self._versions.get(key, 0)
        finally:
            self._leave(key)

    @contextlib.contextmanager
    def watching(self, key: Any, task_id: str):
        """``with WAKEUPS.watching(key, id) as ev:`` an Event set by each notification naming id."""
        ev = threading.Event()
        with self._lock:
            self._watches.setdefault(key, {}).setdefault(task_id, set()).add(ev)
        self._arrive(key)
        try:
            yield ev
        finally:
            self._leave(key)
            with self._lock:
                evs = self._watches[key][task_id]
                evs.discard(ev)
                if not evs:
                    del self._watches[key][task_id]

    def before_wait(self, key: Any, fn: Callable[[], Any]) -> bool:
        """Have the next thread that waits on ``key`` in this process (``wait``, ``watching``)
        call ``fn()`` before it waits (once; an exception is logged). False, and nothing
        registered, when a thread waits on ``key`` now: the caller does the work itself."""
        with self._lock:
            if self._waiters.get(key):
                return False
            self._before.setdefault(key, []).append(fn)
            return True

    def cancel_before_wait(self, key: Any, fn: Callable[[], Any]) -> None:
        """Withdraw ``fn`` (``before_wait``) if no waiter has taken it yet."""
        with self._lock:
            fns = self._before.get(key)
            if fns:
                self._before[key] = [f for f in fns if f is not fn]

    def _arrive(self, key: Any) -> None:
        """A thread begins to wait on ``key``: count it, then run what was left for a waiter."""
        with self._lock:
            self._waiters[key] = self._waiters.get(key, 0) + 1
            fns = self._before.pop(key, None) if key in self._before else None
        for fn in fns or ():
            try:
                fn()
            except Exception:
                log.exception("work left for a waiter failed")

    def _leave(self, key: Any) -> None:
        with self._lock:
            self._waiters[key] -= 1


    def _after_fork(self) -> None:
        """In a forked child: the parent's other threads are gone, and a lock one of them held
        would stay held; fresh locks and conditions, no watchers (the versions are kept)."""
        self._lock = threading.Lock()
        self._conds = {}
        self._watches = {}
        self._waiters = {}
        self._before = {}


WAKEUPS = LocalWakeups()
os.register_at_fork(after_in_child=WAKEUPS._after_fork)
