"""The worker's heartbeat thread: STARTED states, live output and time limits of running tasks,
lease extensions, the worker's heartbeat record, cancels, soft limits and progress of running tasks
(control.Watch), stale flushes."""
from __future__ import annotations

import logging
import os
import socket
import threading
import time

from .. import builtin, capture, payloads, states
from .batch import STALE_FLUSH, STARTED_AFTER, _Batch, _safe_text
from .execute import timed_out

log = logging.getLogger(__name__)


class Heartbeat:
    """The heartbeat thread's part of Worker (a mixin: Worker holds the state)."""

    def _heartbeat_loop(self) -> None:
        """Every 0.1 s while tasks run: STARTED states, live output, time limits.
        Every ``heartbeat_interval``: lease extensions and the worker's heartbeat record.
        Once the worker stops, only what its running and held tasks need (their leases, limits,
        output, and the heartbeat record that says they are alive): no upkeep, and with none
        left no store call, so a stop is not held up by a store that does not answer; the
        thread ends with the last executor."""
        next_beat, next_upkeep = 0.0, time.monotonic() + 0.5   # no checkpoint at start: work comes first
        reported_alive = self.concurrency
        while True:
            stopping = self._stopping.is_set()
            if stopping and not any(t.is_alive() for t in self._threads if t is not threading.current_thread()):
                return
            alive = self._executors_alive()
            if not alive and not self._stopping.is_set():       # read again: a stop since ends them too
                self._executors_died()
                return
            try:
                with self._held_lock:
                    running = dict(self._running)
                for task_id, run in running.items():
                    try:
                        self._watch_running(task_id, run)
                    except Exception:
                        log.warning("worker %s: watching task %s failed", self.name, task_id, exc_info=True)
                self.control.tick(running)
                self._flush_stale()
                if time.monotonic() >= next_beat:
                    next_beat = time.monotonic() + self.heartbeat_interval
                    with self._held_lock:
                        held = list(self._held.values())
                    if held or not stopping:
                        self.app.engine.extend(held, self.lease)
                    if alive < reported_alive and not stopping:
                        log.error(
                            "worker %s: %d of %d executor thread(s) died",
                            self.name,
                            self.concurrency - alive,
                            self.concurrency,
                        )
                    reported_alive = alive
                    if running or held or not stopping:
                        self._beat(len(running))
            except Exception:
                log.warning("worker %s: heartbeat failed", self.name, exc_info=True)
            if not stopping and time.monotonic() >= next_upkeep:
                next_upkeep = time.monotonic() + 0.5
                try:
                    self.app.broker.upkeep()
                    self.app.backend.upkeep()       # expired results go without a scheduler
                    payloads.upkeep(self.app)       # payloads no record references any more
                except Exception:
                    log.debug("worker %s: broker upkeep failed", self.name, exc_info=True)
            if not self._stopping.is_set():
                self._stopping.wait(min(STARTED_AFTER, self.heartbeat_interval))
            else:
                time.sleep(0.05)

    def _beat(self, running: int) -> None:
        """Write this worker's heartbeat: who it is, its queues and threads, the task names it
        has registered (so a worker lacking one leaves its messages to this one, and waiters
        can tell when no live worker can run a task) and its threads held waiting in a task."""
        with self._held_lock:
            holding = sorted({d.message_id for d in self._held.values()})     # see _attempt_alive
        info = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "queues": self.queues,
            "concurrency": self._executors_alive() if self._threads else self.concurrency,
            "heartbeat_interval": self.heartbeat_interval,
            "holding": holding,
            "running": running,
            "processed": self.processed,
            "waiting": self.waiting,
            "tasks": sorted(list(self.app.registry)),
            "pool": "processes" if self.pool is not None else "threads",
            "allow_code": self.allow_code,
            "origin": builtin.PROCESS_TOKEN,
        }
        if self._record_gone:
            return
        self.app.backend.heartbeat(self.name, info, ttl=max(3 * self.heartbeat_interval, 2.0))
        if self._record_gone:           # removed while this was written: it may have landed after the removal
            self.app.backend.worker_gone(self.name)

    def announce(self) -> None:
        """Write the heartbeat now (at start, and when the App registers a task), not at the next beat."""
        if not self.running:
            return
        with self._held_lock:
            running = len(self._running)
        try:
            self._beat(running)
        except Exception:
            log.warning("worker %s: heartbeat failed", self.name, exc_info=True)

    def _flush_stale(self) -> None:
        """Commit finished tasks that wait in a batch whose executor is busy with a long task,
        so a result never waits for a slow batch-mate longer than a heartbeat tick."""
        with self._held_lock:
            batches = list(self._batches)
        for batch in batches:
            if batch.waiting() >= STALE_FLUSH:
                batch.flush()

    def _watch_running(self, task_id: str, run: dict) -> None:
        if time.monotonic() - run["started"] < STARTED_AFTER:
            return
        fields = {}
        if not run.get("marked"):
            run["marked"] = True
            self.app.backend.set_state(task_id, states.STARTED, token=run["token"], started_at=run["started_at"])
        text = capture.peek(task_id)
        if text and text != run.get("flushed"):
            fields["output"] = _safe_text(text)
            run["flushed"] = text
        if fields:
            self.app.backend.update(task_id, **fields)
        self._enforce_time_limit(task_id, run)

    def _enforce_time_limit(self, task_id: str, run: dict) -> None:
        """A task running in a thread past its hard time limit: a thread cannot be killed, so its
        FAILURE (``execute.timed_out``) is settled now as any outcome is (recorded, its workflow
        advanced; its executor still holds the delivery and acknowledges it once the task
        returns, its late result fenced out), and the task is asked to stop. Looked at again
        at the next tick until its record is final. In a child process the pool stops the task
        at its limit instead."""
        limit = run.get("time_limit")
        if not limit or run.get("timed_out") or time.monotonic() - run["started"] <= limit:
            return
        if self.pool is not None and not run["message"].name.startswith("nbqueue."):
            return
        batch = _Batch(self, [], runs_next=False)      # its follow-ups are published: no executor runs this batch
        batch.settle(timed_out(task_id, run, limit, capture.peek(task_id)))
        batch.flush()
        record = self.app.backend.get(task_id) or {}
        if record.get("state") in states.READY_STATES:
            run["timed_out"] = True
            with self._held_lock:
                running = self._running.get(task_id) is run       # not returned meanwhile
            if running and not run.get("stopped"):
                self.control.stop(task_id, run, "time_limit")   # cooperative: current_task().cancelled
