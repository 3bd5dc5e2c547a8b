"""Control over running work: cancel, time limits inside a task, the task's own handle.

The channel is the result backend, so a cancel reaches every worker whatever the broker
(SQLite, memory, Redis, RabbitMQ, SQS) and wherever the worker runs:

- ``revoke(app, id, terminate=...)`` stores REVOKED on the task's record, unfenced: it
  is written only while the record is not final, so a task that finishes while its
  cancel is in flight keeps exactly one of SUCCESS or REVOKED, and the workflow follows
  that one. ``terminate=False`` on a running task also leaves a mark (``Keys.revoke_keep``) in the
  backend's key-value store: the task runs on, its result is discarded.
- every worker's heartbeat thread reads the states of the tasks it runs every
  ``CANCEL_POLL`` seconds (one small read, none while idle; at once when the App of its
  own process revokes). A running task found REVOKED has its workflow ended at once, and
  is stopped: in a process pool its child gets SIGTERM, then SIGKILL after
  ``CANCEL_GRACE`` (the pool replaces it); in a thread the task is asked to stop
  (``current_task().cancelled``, ``check_cancelled()`` raising ``TaskRevoked``) and its
  record says so (``meta["stopping"]``) until it returns, for the live views.
- ``revoke_purged`` revokes the tasks whose messages a purge removed, and ends their workflows
  (no worker will reach those messages to do it).
- a worker that reserved a task and has not started it checks the store before it
  starts it (``Worker._skip_revoked``); one that reaches the message later finds the
  record final and does not run it.

Time limits in a thread (in a child process the pool enforces them, see pool.py):
``soft_time_limit`` raises ``SoftTimeLimitExceeded`` in the task's thread at its next
Python instruction (``PyThreadState_SetAsyncExc``; a thread blocked in one long C call
sees it when the call returns); ``time_limit`` fails the record with
``TimeLimitExceeded`` and asks the task to stop, cooperatively: a thread cannot be
killed. Progress a task reports (progress.py) is written by the same heartbeat.
"""
from __future__ import annotations

import ctypes
import logging
import threading
import time
from typing import Any, Callable

from . import states
from . import taskprogress as _progress
from .broker import Purged
from .context import TaskContext, current_task
from .errors import SoftTimeLimitExceeded
from .message import Message
from .workflow import Keys

log = logging.getLogger(__name__)

CANCEL_POLL = 0.2       # seconds between a worker's reads of the states of the tasks it runs
CANCEL_GRACE = 1.0      # seconds from SIGTERM to SIGKILL when a cancel stops a child process
_ACTIVE = (states.RECEIVED, states.STARTED)


# -- the sender's side -------------------------------------------------------------------------------

def revoke(app, task_id: str, reason: str = "revoked", *, terminate: bool = False) -> bool:
    """Store REVOKED for ``task_id`` unless its record is final; True when this call did.

    False (nothing changes) for an unknown id, a finished task, or one revoked already.
    ``terminate``: a running task is stopped (see the module docstring); without it a
    running task runs on and its result is discarded.
    """
    if not isinstance(task_id, str) or not task_id:
        raise TypeError(f"task_id must be a non-empty str, not {type(task_id).__name__} {task_id!r}")
    state = app.backend.states_of([task_id]).get(task_id)    # (a store_result on an unknown id would create it)
    if state is None or state in states.READY_STATES:
        return False
    keep = not terminate and state in _ACTIVE
    if keep:
        app.backend.kv_set(Keys.revoke_keep(task_id), "1")
    revoked = app.backend.store_result(task_id, states.REVOKED, error=reason, exc_type="TaskRevoked")
    if keep and not revoked:
        app.backend.kv_set(Keys.revoke_keep(task_id), None)
    return revoked


def revoke_many(app, task_ids: list[str], reason: str, *, terminate: bool = True) -> int:
    """``App.revoke`` for each id that is not final yet (read in one query); how many were revoked."""
    found = app.backend.states_of(list(task_ids))
    todo = [i for i in dict.fromkeys(task_ids) if found.get(i) is not None and found[i] not in states.READY_STATES]
    return sum(1 for i in todo if app.revoke(i, reason, terminate=terminate))


#: the states of a task whose message waits in its queue (not begun by a worker)
_WAITING = (states.PENDING, states.RETRY)


def revoke_purged(app, queue: str, purged: Purged, since: float) -> list[str]:
    """After ``purge(queue)`` removed ``purged``: record each of its tasks still waiting
    (PENDING or RETRY) REVOKED ("purged from queue ..."), and end the workflow it belongs
    to as a revoke does (``workflow.after_final`` with the purged message: the rest of a
    chain recorded REVOKED, a chord or group failed with its error callbacks fired).
    Returns the ids revoked.

    The broker names the purged messages by their bodies (SQLite and Redis in the same
    statement or script as the delete; RabbitMQ and SQS drain them, see their
    ``purge_messages``). Where it could not name every one (``purged.complete`` False: SQS's
    PurgeQueue removed delayed or in-flight messages unseen, RabbitMQ purged messages
    published during its drain), the records tell: PENDING or RETRY records of ``queue``
    created before ``since`` (when the purge began) are revoked too. That is a guess with a
    race: a task sent before the purge whose message a worker had reserved but not begun is
    revoked as well (its worker then skips it and ends its workflow), and a task purged this
    way has no message at hand, so its workflow is not advanced (its record is final, so no
    waiter waits for it). A result backend that cannot list its records (AMQP results) cannot
    make that guess: those tasks stay PENDING, and a warning says so.
    """
    from . import workflow

    messages: dict[str, Message] = {}
    for body in purged.bodies:
        try:
            message = Message.decode(body)
        except Exception:       # a body that is not an envelope (it could not have run either)
            continue
        messages.setdefault(message.id, message)
    ids = list(messages)
    if not purged.complete:
        ids += [i for i in _waiting_records(app, queue, since) if i not in messages]
    if not ids:
        return []
    found = app.backend.states_of(ids)
    reason = f"purged from queue {queue!r}"
    revoked = []
    for task_id in ids:
        if found.get(task_id) not in _WAITING or not app.revoke(task_id, reason):
            continue
        revoked.append(task_id)
        message = messages.get(task_id)
        if message is not None:
            workflow.after_final(app, message, app.backend.get(task_id) or {})
    return revoked


def _waiting_records(app, queue: str, since: float) -> list[str]:
    """The ids of PENDING or RETRY records of ``queue`` created before ``since``."""
    if app.backend.lists_tasks == "none":
        log.warning("purge: the %s broker removed messages of %r it could not name, and the result backend "
                    "cannot list its records: their tasks stay PENDING", app.broker.scheme, queue)
        return []
    return [r["id"] for state in _WAITING for r in app.backend.list(state=state)
            if r.get("queue") == queue and (r.get("created_at") or 0) <= since]


# -- inside a task -----------------------------------------------------------------------------------

_LOCK = threading.Lock()      # between a task's thread returning and a soft limit raised into it (held briefly)


class TaskControl:
    """What a running task and its worker share: the cancel request, the progress the task
    reports, and the thread running it (for a soft time limit). One per task run, cheap to
    make (nothing is allocated until a task reports progress or is asked to stop)."""

    __slots__ = ("task_id", "name", "reason", "progress", "on_progress", "_ident", "_done", "_raised")

    def __init__(self, task_id: str, name: str):
        self.task_id = task_id
        self.name = name
        self.reason: str | None = None          # "cancel" or "time_limit", once asked to stop
        self.progress: _progress.Progress | None = None     # made by the first report
        self.on_progress: Callable[..., None] | None = None   # set in a child process: sends to the parent
        self._ident: int | None = None          # the thread running the function (threads only)
        self._done = False
        self._raised = False

    @property
    def cancelled(self) -> bool:
        return self.reason is not None

    def request_stop(self, reason: str) -> bool:
        """Ask the task to stop (``cancelled`` becomes True); False if it was asked already."""
        if self.reason is not None:
            return False
        self.reason = reason
        return True

    def set_progress(self, done, total=None, note=None) -> None:
        """Note the task's latest report (see taskprogress.py); no I/O."""
        progress = self.progress
        if progress is None:
            progress = self.progress = _progress.Progress()
        progress.set(done, total, note)

    def call(self, fn: Callable, args, kwargs: dict) -> Any:
        """Run ``fn`` in this thread so that ``raise_in_thread`` can reach it, and never after it returns."""
        self._ident = threading.get_ident()
        try:
            return fn(*args, **kwargs)
        finally:
            with _LOCK:
                self._done = True
                if self._raised:
                    _set_async_exc(self._ident, None)   # one set but not raised yet is dropped

    def raise_in_thread(self, exc_type: type[BaseException]) -> bool:
        """Raise ``exc_type`` in the task's thread at its next Python instruction; False when
        the function is not running in a thread (anymore)."""
        with _LOCK:
            if self._done or self._ident is None:
                return False
            self._raised = True
            return _set_async_exc(self._ident, exc_type)


def _set_async_exc(ident: int, exc_type: type[BaseException] | None) -> bool:
    """CPython's ``PyThreadState_SetAsyncExc`` (None clears a pending one)."""
    target = ctypes.py_object(exc_type) if exc_type is not None else None
    n = ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(ident), target)
    if n > 1:    # cannot happen for a live thread id; undo as the C API asks
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(ident), None)
        return False
    return n == 1


def check_cancelled() -> None:
    """Inside a task: raise ``TaskRevoked`` once it was cancelled; elsewhere nothing."""
    ctx = current_task()
    if isinstance(ctx, TaskContext):
        ctx.check_cancelled()


# -- the worker's side -----------------------------------------------------------------------------

class Watch:
    """A worker's heartbeat step for the tasks it runs: cancels, soft limits in threads, progress.

    ``tick(running)`` is called by the heartbeat thread every 0.1 s with the worker's
    ``{task id: run}``; each run holds its ``message`` and ``control`` (TaskControl).
    """

    def __init__(self, worker):
        self.worker = worker
        self._next_poll = 0.0

    def poke(self) -> None:
        """Read the states at the next tick (a revoke from this process's App)."""
        self._next_poll = 0.0

    def tick(self, running: dict) -> None:
        now = time.monotonic()
        for task_id, run in running.items():
            control = run.get("control")
            if control is None:
                continue
            self._soft_limit(task_id, run, control, now)
            if control.progress is not None:
                _progress.flush(self.worker.app.backend, task_id, control.progress, now)
        if running and now >= self._next_poll:
            self._next_poll = now + CANCEL_POLL
            self.poll(running)

    def _soft_limit(self, task_id: str, run: dict, control: TaskControl, now: float) -> None:
        soft = run["message"].soft_time_limit
        if not soft or run.get("soft_fired") or now - run["started"] < soft or self._in_child(run):
            return
        run["soft_fired"] = True
        if control.raise_in_thread(SoftTimeLimitExceeded):
            log.info("task %s (%s) passed its soft time limit of %gs", run["message"].name, task_id, soft)

    def _in_child(self, run: dict) -> bool:
        return self.worker.pool is not None and not run["message"].name.startswith("nbqueue.")

    def poll(self, running: dict) -> None:
        """Read the states of the running tasks; stop and settle those revoked meanwhile."""
        from . import workflow

        for task_id, run in running.items():     # revoked as it started: its child was not there yet
            if run.get("revoked") and not run.get("stopped"):
                self.stop(task_id, run, "cancel")
        todo = [task_id for task_id, run in running.items() if not run.get("revoked")]
        if not todo:
            return
        app = self.worker.app
        found = app.backend.states_of(todo)
        for task_id in todo:
            if found.get(task_id) != states.REVOKED:
                continue
            run = running[task_id]
            run["revoked"] = True
            # the workflow ends now, not when the task returns (its late result is fenced out then)
            workflow.after_final(app, run["message"], app.backend.get(task_id) or {})
            if app.backend.kv_get(Keys.revoke_keep(task_id)) is not None:
                app.backend.kv_set(Keys.revoke_keep(task_id), None)
                run["stopped"] = True      # left running: its result is discarded
                continue
            self.stop(task_id, run, "cancel")

    def stop(self, task_id: str, run: dict, reason: str) -> None:
        """Stop a running task: its child process (SIGTERM, SIGKILL after CANCEL_GRACE), or
        ask its thread (``cancelled``) and note on the record that it has not stopped yet."""
        if self._in_child(run):
            if self.worker.pool.stop(task_id, "cancelled", grace=CANCEL_GRACE):
                run["stopped"] = True
                log.info("task %s (%s) cancelled: stopping its child process", run["message"].name, task_id)
            else:
                log.info("task %s (%s) cancelled: no child runs it yet; stopping it at the next look",
                         run["message"].name, task_id)
            return
        run["stopped"] = True
        control = run.get("control")
        if control is not None and control.request_stop(reason):
            if control.progress is None:
                control.progress = _progress.Progress()
            _progress.note_stopping(self.worker.app.backend, task_id, control.progress, reason, "waiting")

    def finished(self, task_id: str, run: dict) -> None:
        """After the task's function returned or raised (its executor thread): write its last
        progress, and that a stop it was asked for is done."""
        control = run.get("control")
        if control is None or control.progress is None:
            return
        backend = self.worker.app.backend
        try:
            _progress.flush(backend, task_id, control.progress, None)
            if control.reason is not None:
                _progress.note_stopping(backend, task_id, control.progress, control.reason, "stopped")
        except Exception:
            log.warning("could not write the last progress of task %s", task_id, exc_info=True)
