"""Inline mode: ``App(..., inline=True)`` runs every task in the caller, at send time.

For unit tests of task code without a worker (as Huey's immediate mode, RQ's
``is_async=False``, Celery's ``task_always_eager``). Nothing is short-circuited: each
send is recorded and published to the App's store as usual, then a worker of this App
(:class:`Inline`) steps through the queues in the calling thread until nothing is left
that the send started. So arguments and results go through the same encoding (a value
the serializer refuses fails the same way), retries, callbacks, chains, groups and
chords follow the same rules, and records, ``app.tasks()`` and the result cache are
those of a worker. A failing task does not raise at send: its result's ``get()`` raises
TaskFailed, as ever.

Time is not waited for: retry delays and ETAs (``countdown``) are skipped by stepping
the App's clock (:class:`InlineClock`) forward while messages are due later, and set
back once the send's work is done. ``memory://`` is the usual store for tests::

    app = nbqueue.App("memory://", inline=True)
"""
from __future__ import annotations

import logging
import threading

from .clock import SYSTEM, Clock

log = logging.getLogger(__name__)

#: the clock is stepped forward at most this far (seconds) to reach delayed messages
HORIZON = 366 * 86400.0
#: worker steps one send may take before the runner gives up (a task that hands itself back forever)
MAX_STEPS = 100_000


class InlineClock(Clock):
    """Another clock (the system's by default) plus an offset the inline runner steps."""

    def __init__(self, base: Clock | None = None):
        self.base = base or SYSTEM
        self.offset = 0.0

    def time(self) -> float:
        return self.base.time() + self.offset

    def sleep(self, seconds: float) -> None:
        self.offset += max(0.0, seconds)


def _queues(value, out: set) -> None:
    """Every queue named anywhere in a message (its callbacks, its workflow's next steps)."""
    if isinstance(value, dict):
        queue = value.get("queue")
        if isinstance(queue, str):
            out.add(queue)
        for item in value.values():
            if isinstance(item, (dict, list)):
                _queues(item, out)
    elif isinstance(value, list):
        for item in value:
            _queues(item, out)


class Inline:
    """The runner of one inline App: a worker stepped in the thread that sends."""

    def __init__(self, app):
        self.app = app
        self.clock = app.clock if isinstance(app.clock, InlineClock) else None
        self._worker = None
        self._local = threading.local()
        self._lock = threading.RLock()     # one send's run at a time (the worker is stepped by one thread)

    @property
    def worker(self):
        if self._worker is None:
            from . import shipping

            queues = {self.app.default_queue, *(t.options.get("queue") for t in self.app.registry.values())} - {None}
            self._worker = self.app.worker(queues=shipping.with_code_queues(sorted(queues)), name="inline",
                                           unknown_grace=0.0, local_follow_ups=False)
        return self._worker

    def after_publish(self, outs: list) -> None:
        """Run what was just published (and everything it leads to) before the send returns."""
        if getattr(self._local, "running", False):
            return              # published by a task or a workflow step of the run under way: its loop takes it
        from . import shipping

        found: set = set()
        for out in outs:
            _queues(out.message if out.message is not None else {"queue": out.queue}, found)
        with self._lock:
            worker = self.worker
            worker.queues = shipping.with_code_queues(sorted(set(worker.queues) | found))
            self._local.running = True
            try:
                self._run(worker)
            finally:
                self._local.running = False
                if self.clock is not None:
                    self.clock.offset = 0.0

    def _run(self, worker) -> None:
        from . import shipping

        step = 0.5
        for _ in range(MAX_STEPS):
            if worker.step(limit=worker.prefetch):
                step = 0.5
                continue
            ready, delayed = self._waiting()
            if ready - set(worker.queues):         # a queue a workflow step or callback was sent to
                worker.queues = shipping.with_code_queues(sorted(set(worker.queues) | ready))
                continue
            if not delayed or self.clock is None or self.clock.offset > HORIZON:
                return
            self.clock.offset += step   # messages due later (retries, ETAs): step time forward, not wait
            step *= 2
        log.warning("inline mode: stopped after %d worker steps; tasks may be left in their queues", MAX_STEPS)

    def _waiting(self) -> tuple[set, bool]:
        """(queues with messages due now, whether any message is due later)."""
        try:
            stats = self.app.broker.stats()
        except Exception:
            return set(), False
        ready = {row["queue"] for row in stats if (row.get("ready") or 0) > 0}
        return ready, any((row.get("delayed") or 0) > 0 for row in stats)


__all__ = ["Inline", "InlineClock"]
