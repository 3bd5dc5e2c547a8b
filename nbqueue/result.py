"""AsyncResult: the handle a send returns, readable from any process and after a restart.

Waiting (``get()``/``wait()``) never waits for something that cannot come:

- nbqueue records every task as PENDING when it is sent, so an id with no record is
  unknown, forgotten or expired: ``ResultNotFound`` at once;
- a task that has not started after ``NOTICE_AFTER`` seconds is checked against the
  live workers' heartbeats (their queues and registered task names): when none can run
  it, a warning says why, and so does the TimeoutError (views show it too);
- inside a task, a wait holds the worker thread: when no other free worker thread can
  run the awaited task (every thread serving its queue is held like this one), the
  wait raises ``DeadlockError`` at once instead of hanging (Celery forbids
  ``result.get()`` in a task outright; here it works while a thread is free). Waiting
  for another task is better written as a chain or a chord.
"""
from __future__ import annotations

import contextlib
import difflib
import logging
import time
from typing import Any, Callable, Iterator, NoReturn

from . import capture, payloads, serialization, states, taskprogress
from .backend import counts_from_states
from .builtin import CELL_TASK
from .context import current_task
from .errors import DeadlockError, TaskFailed, TaskRevoked

log = logging.getLogger(__name__)

#: seconds a waiter waits for a task that has not started before it checks whether any
#: live worker can run it (and says so when none can)
NOTICE_AFTER = 3.0
#: states of a task that still needs a worker thread to run it
_NOT_STARTED = (states.PENDING, states.RETRY)


_UNREAD = object()


def failure_from_record(record: dict) -> TaskFailed:
    """The error a failed (or revoked) record raises, naming its task: a ``%%task`` cell by its
    label (``%%task broken``), not by the built-in task that runs cells."""
    cls = TaskRevoked if record.get("state") == states.REVOKED else TaskFailed
    return cls(
        record["id"], record.get("exc_type"), record.get("error"), record.get("traceback"), name=_task_label(record)
    )


def _task_label(record: dict) -> str | None:
    name = record.get("name")
    if name != CELL_TASK:
        return name
    try:
        label = serialization.loads(record.get("kwargs") or "{}").get("label")
    except (ValueError, AttributeError):
        label = None
    return f"%%task {label}" if isinstance(label, str) and label else name


def value_from_record(app, record: dict, lazy: bool = False) -> Any:
    """A record's value; with ``lazy`` values stored out of band stay unread (``payloads.PayloadRef``)."""
    text = record.get("result")
    if text is None:
        return None
    value = serialization.loads(text)
    if value.__class__ in _SCALARS:         # its own form: nothing to decode, nothing out of band
        return value
    return app.serializer.decode(value, lazy=lazy)


#: JSON values that decode to themselves (every tagged value is an object)
_SCALARS = frozenset({int, float, str, bool, type(None)})


#: the longest value preview a snapshot holds (characters)
PREVIEW_LIMIT = 400

#: rows and columns of a DataFrame result a snapshot keeps for views
PREVIEW_ROWS, PREVIEW_COLUMNS = 5, 20


def table_preview(value: Any) -> tuple[Any, str] | None:
    """(first rows as a DataFrame, caption such as ``DataFrame 1,000×5``) for a DataFrame or Series
    value, or for a reference to one stored out of band (its first rows travel with the reference:
    nothing is read); None for anything else. Never raises."""
    try:
        if isinstance(value, payloads.PayloadRef):
            head = value.head() if value.type in ("DataFrame", "Series") else None
            return None if head is None else (head.to_frame() if head.ndim == 1 else head, value.summary)
        kind = type(value)
        if not kind.__module__.startswith("pandas") or kind.__name__ not in ("DataFrame", "Series"):
            return None
        if value.ndim == 1:
            name = f" {value.name!r}" if value.name is not None else ""
            return value.iloc[:PREVIEW_ROWS].to_frame(), f"Series {len(value):,}{name}"
        rows, cols = value.shape
        return value.iloc[:PREVIEW_ROWS, :PREVIEW_COLUMNS], f"DataFrame {rows:,}×{cols:,}"
    except Exception:  # a preview must not break a view
        return None


def preview(value: Any, limit: int = 160) -> str:
    """A one-line repr, cut to ``limit`` characters (DataFrames by their shape); never raises."""
    kind = type(value)
    if kind.__module__.startswith("pandas") and hasattr(value, "shape"):
        text = f"<{kind.__name__} {' x '.join(map(str, value.shape))}>"
    else:
        try:
            text = repr(value)
        except Exception as exc:  # a repr that fails must not break a view
            text = f"<{kind.__name__}: repr failed: {exc}>"
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def outcome(app, record: dict | None) -> dict:
    """What a finished (or retrying) record says: ``value`` (a one-line preview of a SUCCESS's
    value, at most PREVIEW_LIMIT characters), ``value_error`` (why the value could not be
    decoded), ``table`` (:func:`table_preview` of a DataFrame or Series value), ``error``
    ("Type: message"), ``traceback``; None where there is none."""
    record = record or {}
    value = value_error = table = None
    if record.get("state") == states.SUCCESS:
        try:
            decoded = value_from_record(app, record, lazy=True)     # views never read payloads
        except Exception as exc:
            value_error = str(exc)
        else:
            value, table = preview(decoded, PREVIEW_LIMIT), table_preview(decoded)
    error = f"{record.get('exc_type') or 'Error'}: {record.get('error') or ''}" if record.get("error") else None
    return {"value": value, "value_error": value_error, "table": table, "error": error,
            "traceback": record.get("traceback")}


def _runtime(record: dict) -> float | None:
    """Seconds from start to finish; None until both are known."""
    if record.get("started_at") is not None and record.get("finished_at") is not None:
        return max(0.0, record["finished_at"] - record["started_at"])
    return None


#: running tasks whose reported progress a workflow's snapshot lists
PROGRESS_ROWS = 8
#: a workflow's snapshot sums reported progress over at most this many tasks
PROGRESS_SUM_LIMIT = 1000


def stopped_while_running(record: dict) -> bool:
    """A task cancelled (or past its time limit) after it started: it may still run in a thread."""
    if record.get("started_at") is None:
        return False
    return record.get("state") == states.REVOKED or record.get("exc_type") == "TimeLimitExceeded"


def stopping_note(stopping: dict | None) -> str:
    """What a view says while a thread task asked to stop has not returned (``stopping["state"]``
    "waiting"); "" otherwise."""
    if not stopping or stopping.get("state") != "waiting":
        return ""
    if stopping.get("why") == "time_limit":
        return ("past its time limit: a task in a thread cannot be stopped (time limits are soft in a thread pool; "
                "use pool='processes' for hard ones); waiting for it to notice (current_task().cancelled)")
    return "cancelled: waiting for the task (in a thread) to notice (current_task().cancelled / check_cancelled())"


def reported(records: list[dict]) -> dict:
    """What the tasks of ``records`` reported with ``nbqueue.report_progress``: ``sum`` (their
    reports added up, ``taskprogress.summed``: ``{"done", "total", "reporting"}`` or None),
    ``rows`` (the running tasks that reported, at most PROGRESS_ROWS: ``{"id", "name",
    "progress"}``) and ``stopping`` (``stopping_note`` of the first cancelled thread task that
    has not stopped yet, or "")."""
    rows = []
    waiting = ""
    for rec in records:
        value = taskprogress.of(rec)
        if value is not None and rec.get("state") not in states.READY_STATES and len(rows) < PROGRESS_ROWS:
            rows.append({"id": rec["id"], "name": rec.get("name") or "task", "progress": value})
        if not waiting:
            waiting = stopping_note(taskprogress.stopping(rec))
    return {"sum": taskprogress.summed(records), "rows": rows, "stopping": waiting}


def _elapsed(created: float | None, finished: float | None) -> float | None:
    """Seconds from ``created`` to ``finished`` (to now while not finished); None without ``created``."""
    if created is None:
        return None
    return max(0.0, (time.time() if finished is None else finished) - created)


def _waited(app, created_at: float | None) -> bool:
    """Whether something sent at ``created_at`` has waited long enough (NOTICE_AFTER) to check
    that some live worker can run it."""
    return created_at is not None and app.clock.time() - created_at >= NOTICE_AFTER


class AsyncResult:
    """The state and, once ready, the value or error of one task."""

    # fields at their defaults until set (a handle is made per send: its construction stays small)
    #: the record once it is final (read once)
    _final: dict | None = None
    #: a callback's record is written only when it is fired: waiting for it is not an error
    _absent_ok = False
    #: the backend's wake-up version read before this task was sent (see wait_record)
    _sent_at_version: int | None = None
    #: the decoded value, read once (a frame out of band is loaded once)
    _value: Any = _UNREAD

    def __init__(self, task_id: str, app, *, name: str | None = None, absent_ok: bool = False):
        self.id = task_id
        self.app = app
        self._name = name
        if absent_ok:
            self._absent_ok = True
        #: results of the on_success/on_error callbacks sent with this task (the one that runs finishes)
        self.callbacks: list[AsyncResult] = []

    # -- reading the record ---------------------------------------------------------------
    def info(self) -> dict:
        """The stored record (state, times, retries, worker, output, ...); {} before it exists."""
        if self._final is not None:
            return dict(self._final)
        record = self.app.backend.get(self.id)
        if record is None:
            return {}
        if record["state"] in states.READY_STATES:
            self._final = record
        return dict(record)

    @property
    def name(self) -> str | None:
        return self._name or self.info().get("name")

    @property
    def state(self) -> str:
        return self.info().get("state") or states.PENDING

    def ready(self) -> bool:
        return self.state in states.READY_STATES

    def successful(self) -> bool:
        return self.state == states.SUCCESS

    def failed(self) -> bool:
        return self.state in (states.FAILURE, states.REVOKED)

    @property
    def result(self) -> Any:
        """The value if it succeeded, else None (no waiting)."""
        record = self.info()
        return self._value_of(record) if record.get("state") == states.SUCCESS else None

    def _value_of(self, record: dict) -> Any:
        if self._final is None:
            return value_from_record(self.app, record)
        if self._value is _UNREAD:
            self._value = value_from_record(self.app, self._final)
        return self._value

    @property
    def error(self) -> str | None:
        record = self.info()
        if not record.get("error"):
            return None
        return f"{record.get('exc_type') or 'Error'}: {record['error']}"

    @property
    def traceback(self) -> str | None:
        return self.info().get("traceback")

    @property
    def retries(self) -> int:
        return self.info().get("retries") or 0

    @property
    def output(self) -> str:
        """What the task printed (stdout and stderr)."""
        return self.info().get("output") or ""

    # -- waiting ------------------------------------------------------------------------------
    def wait(self, timeout: float | None = None) -> bool:
        """Block until the task is ready; False if the timeout passed first.

        Raises ResultNotFound for an id with no record, DeadlockError inside a task when
        no free worker thread could run this one (see the module docstring).
        """
        if self._final is not None:
            return True
        with _waiting(self.app, lambda: [self.app.backend.get(self.id)]) as between:
            return _wait_ids(self.app, [self.id], timeout, between, missing_ok=self._absent_ok)

    def get(self, timeout: float | None = None) -> Any:
        """The task's value; raises TaskFailed (remote type, message, traceback) or TimeoutError.

        Also raises ResultNotFound at once when the id has no record (unknown, forgotten
        or expired), and DeadlockError inside a task when no free worker thread could run
        this one. A task that has not started after a few seconds while no live worker
        can run it (none serves its queue, or none knows its name) is reported with a
        warning, and in the TimeoutError. Ctrl-C interrupts the wait: the task itself goes on.
        """
        record = self._final
        if record is None:
            backend = self.app.backend
            if not backend.reads_as_it_waits:
                record = self._read_final(backend)
        if record is None:
            try:
                with _waiting(self.app, lambda: [self.app.backend.get(self.id)]) as between:
                    record = self._wait_record(timeout, between)
            except KeyboardInterrupt:
                _stopped_waiting(self.id, "r")
            if record is None:
                state = self.state
                problem = between.problem or (waiting_problem(self.app, self.info()) if state in _NOT_STARTED else None)
                raise TimeoutError(f"task {self.name or ''} {self.id} not ready after {timeout}s (state {state})"
                                   + (f": {problem}" if problem else ""))
        if record["state"] == states.SUCCESS:
            return self._value_of(record)
        raise failure_from_record(record)

    def _read_final(self, backend) -> dict | None:
        """The record when the task is final, read once without arming a wait (the common
        case of a loop of ``get()`` over handles sent earlier; a backend that reads as it
        waits needs no such read); None otherwise. Whatever
        the read found, the wait that follows skips its own first read unless something
        was stored since (``wait_record``'s ``since``)."""
        since = backend.wake_version()
        record = backend.get(self.id)
        if record is not None and record["state"] in states.READY_STATES:
            self._final = record
            return record
        if record is not None or self._absent_ok:
            self._sent_at_version = since
        return None

    def _wait_record(self, timeout: float | None, between: Callable[[float], None] | None = None) -> dict | None:
        since, self._sent_at_version = self._sent_at_version, None
        missing_ok = self._absent_ok
        record = _in_slices(
            lambda t: self.app.backend.wait_record(self.id, timeout=t, since=since, missing_ok=missing_ok),
            timeout,
            between,
        )
        if record is not None:
            self._final = record
        return record

    def diagnose(self) -> str | None:
        """Why this task may never start, or None: for a task not started yet, checks the
        live workers' heartbeats (is one running, does one serve its queue, does one know
        its name). Views show it; ``get()`` says it after a few seconds of waiting."""
        return waiting_problem(self.app, self.info())

    def revoke(self, reason: str = "revoked by user", *, terminate: bool = False) -> bool:
        """``App.revoke(self.id, reason, terminate=terminate)``."""
        return self.app.revoke(self.id, reason, terminate=terminate)

    def cancel(self, reason: str = "cancelled by user") -> bool:
        """Cancel the task: not started, it never runs; running in a process pool, its child
        is stopped now; running in a thread, it is asked to stop (``current_task().cancelled``).
        Recorded REVOKED; ``get()`` then raises ``TaskRevoked``. False (nothing changes) when
        it had finished already, was cancelled before, or the id is unknown."""
        return self.app.revoke(self.id, reason, terminate=True)

    def reported_progress(self) -> dict | None:
        """What the task last reported with ``nbqueue.report_progress``: ``{"done", "total",
        "note", "at"}`` (``at``: Unix seconds), or None if it reported nothing (yet)."""
        from .taskprogress import of

        return of(self.app.backend.get(self.id))     # written after the final state too: not the cached record

    def forget(self) -> None:
        self.app.backend.forget([self.id])
        payloads.release(self.app, [self.id])      # the payloads only this record referenced go with it
        self._final = None
        self._value = _UNREAD

    def progress(self) -> dict:
        return self.app.backend.progress([self.id])

    def snapshot(self, *, diagnose: bool = True) -> dict:
        """What views show of this task, from one read of its record: ``kind`` ("task"),
        ``id``, ``label`` (the name to show), ``name``, ``state``, ``final`` (the state is
        final), ``retries``, ``worker``, ``queue``, ``created_at``, ``started_at``,
        ``finished_at`` (Unix seconds or None), ``elapsed`` (seconds from creation to the
        finish, or to now), ``runtime`` (seconds from start to finish), ``output`` (what the
        task printed so far; live while a worker thread of this process runs it), the
        ``outcome`` keys (``value`` preview, ``value_error``, ``error``, ``traceback``) and
        ``note``: why a task not started may never start (``diagnose=False`` skips that check,
        which reads the workers' heartbeats once the task has waited NOTICE_AFTER seconds);
        ``progress``: what it last reported (``taskprogress.of``: ``{"done", "total", "note",
        "at"}``) or None; ``stopped_while_running``: cancelled or past its time limit after it
        started; ``stopping``: ``{"why", "state"}`` once a thread task was asked to stop (its
        state "waiting" until it returned, then "stopped"), else None; ``stopping_note``: the
        words for a "waiting" one, else "".
        """
        record = self.info()
        stopped = stopped_while_running(record)
        if stopped:       # the stop is noted on the record after it became final: read it again
            record = self.app.backend.get(self.id) or record
        state = record.get("state") or states.PENDING
        final = state in states.READY_STATES
        output = record.get("output") or ""
        if not final:
            live = capture.peek(self.id)
            if live is not None and len(live) >= len(output):
                output = live
        note = ""
        if diagnose and state == states.PENDING and _waited(self.app, record.get("created_at")):
            note = waiting_problem(self.app, record) or ""
        stopping = taskprogress.stopping(record)
        return {"kind": "task", "id": self.id, "label": self._name or record.get("name") or "task",
                "name": record.get("name") or self._name, "state": state, "final": final,
                "retries": record.get("retries") or 0, "worker": record.get("worker"), "queue": record.get("queue"),
                "created_at": record.get("created_at"), "started_at": record.get("started_at"),
                "finished_at": record.get("finished_at"),
                "elapsed": _elapsed(record.get("created_at"), record.get("finished_at") if final else None),
                "runtime": _runtime(record), "output": output, **outcome(self.app, record), "note": note,
                "progress": taskprogress.of(record), "stopped_while_running": stopped, "stopping": stopping,
                "stopping_note": stopping_note(stopping)}

    def __repr__(self) -> str:
        return f"<AsyncResult {self.name or ''} {self.id} {self.state}>"

    def __eq__(self, other) -> bool:
        return isinstance(other, AsyncResult) and other.id == self.id

    def __hash__(self) -> int:
        return hash(self.id)


def _in_slices(wait, timeout: float | None, between: Callable[[float], None] | None = None):
    """Call ``wait(seconds)`` in slices of at most 1 s until it returns something or the
    timeout passes (then None), so Ctrl-C is honoured promptly even on stores that block.
    ``between(waited)`` runs after each slice that returned nothing (it may raise)."""
    started = time.monotonic()
    deadline = None if timeout is None else started + timeout
    while True:
        remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
        slice_ = 1.0 if remaining is None else min(1.0, remaining)
        got = wait(slice_)
        if got:
            return got
        if remaining is not None and remaining <= slice_:
            return None
        if between is not None:
            between(time.monotonic() - started)


def _wait_ids(app, ids: list[str], timeout: float | None, between: Callable[[float], None] | None = None, *,
              missing_ok: bool = False) -> bool:
    return bool(_in_slices(lambda t: app.backend.wait(ids, timeout=t, missing_ok=missing_ok), timeout, between))


# -- why a wait may never end -----------------------------------------------------------------

def waiting_problem(app, record: dict | None) -> str | None:
    """Why a task that has not started may never start, from the live workers' heartbeats
    (``App.live_workers``): no worker is running, none serves its queue, or none of those
    has its name registered. None when some live worker can run it, or it has started."""
    if not record or record.get("state") not in _NOT_STARTED or record.get("name") == "nbqueue.group":
        return None
    return no_runner(app.live_workers(), record.get("queue"), record.get("name"))


def no_runner(workers: list[dict], queue: str | None, name: str | None) -> str | None:
    """The reason none of ``workers`` (heartbeat infos) can run task ``name`` of ``queue``, or None."""
    if not workers:
        return ("no worker is running: start one with app.start_worker() in this process, or "
                f"`nbqueue worker --app MODULE:app --queues {queue}` in a shell")
    serving = [w for w in workers if queue in (w.get("queues") or ())]
    if not serving:
        served = sorted({q for w in workers for q in (w.get("queues") or ())})
        return (
            f"no live worker serves queue {queue!r} "
            f"(the {len(workers)} live worker(s) serve: {', '.join(served) or 'nothing'}); "
            f"start one with --queues {queue}"
        )
    # heartbeats list the task names each worker has registered (older workers' do not)
    if name and all("tasks" in w and name not in w["tasks"] for w in serving):
        known = sorted({t for w in serving for t in w["tasks"] if not t.startswith("nbqueue.")})
        hint = difflib.get_close_matches(name, known, n=1)
        return (f"no live worker of queue {queue!r} has a task named {name!r}"
                + (f" (did you mean {hint[0]!r}?)" if hint else f" (they know: {', '.join(known[:20]) or 'none'})"))
    return None


def free_threads(app, queue: str | None, name: str | None) -> int:
    """Worker threads that could still run a task ``name`` of ``queue``: those of the live
    workers serving the queue (and knowing the name) that are not held waiting inside a
    task. Workers of this process are counted exactly, others from their heartbeats."""
    ctx = current_task() or {}
    local = {w.name: w for w in [*app.workers, ctx.get("worker")] if w is not None and w.running}
    free = 0
    for w in local.values():
        if queue in w.queues and name in w.app.registry:
            free += w.concurrency - w.waiting
    for info in app.live_workers(max_age=0.5):
        if info.get("worker_id") in local or queue not in (info.get("queues") or ()):
            continue
        if "tasks" in info and name not in info["tasks"]:
            continue
        free += int(info.get("concurrency") or 1) - int(info.get("waiting") or 0)
    return free


class _Between:
    """What a waiter does between slices of waiting: inside a task, refuse a wait that no
    free worker thread can end; after NOTICE_AFTER seconds, say once why a task that has
    not started may never start (``problem`` keeps it for the TimeoutError)."""

    def __init__(self, app, records: Callable[[], list], ctx: dict | None):
        self.app = app
        self.records = records
        self.ctx = ctx
        self.problem: str | None = None
        self.noticed = False

    def check_deadlock(self) -> None:
        seen = set()
        for record in self.records():
            if record is None or record.get("state") not in _NOT_STARTED or record.get("name") == "nbqueue.group":
                continue
            queue, name = record.get("queue"), record.get("name")
            if (queue, name) in seen or free_threads(self.app, queue, name) > 0:
                seen.add((queue, name))
                continue
            ctx = self.ctx or {}
            reason = (
                no_runner(self.app.backend.workers(), queue, name)
                or f"every thread of the live workers serving queue {queue!r} is held by a task waiting like this one"
            )
            raise DeadlockError(
                f"task {ctx.get('name')!r} ({ctx.get('id')}) waits for task {name!r} ({record['id']}), "
                f"which no free worker thread can run ({reason}), so the wait would hold this thread for good. "
                "Do not wait for a result inside a task: send the follow-up as a chain (first.s(...) | then.s()), "
                "collect a group's results with "
                "nbqueue.chord(group, callback.s()), or give the workers more threads (concurrency)"
            )

    def __call__(self, waited: float) -> None:
        if self.ctx is not None:
            self.check_deadlock()
        if self.noticed or waited < NOTICE_AFTER:
            return
        self.noticed = True
        try:
            record = next((r for r in self.records() if r is not None and r.get("state") in _NOT_STARTED), None)
            self.problem = waiting_problem(self.app, record)
        except Exception:
            log.debug("could not check the live workers", exc_info=True)
            return
        if self.problem:
            log.warning(
                "nbqueue: task %r (%s) has not started after %.0fs: %s",
                record.get("name"),
                record["id"],
                waited,
                self.problem,
            )


class _waiting:
    """Around a wait (``with _waiting(app, records) as between``): ``records()`` reads the
    tasks waited for (the leaves of a workflow); ``between`` is the wait's ``_Between``.

    Inside a task run by a worker of this process, the waiting thread counts as held
    (``Worker.waiting``, also sent in its heartbeat) and the wait is refused at once with
    DeadlockError when no free thread could run what it waits for. (A class, not a
    generator: it runs around every wait.)
    """

    __slots__ = ("between", "held")

    def __init__(self, app, records: Callable[[], list]):
        ctx = current_task()
        worker = ctx.get("worker") if ctx else None
        if worker is None:
            self.between, self.held = _Between(app, records, None), None
        else:
            self.between = _Between(app, records, ctx)
            self.held = worker.holding_thread(self.between.check_deadlock)

    def __enter__(self) -> _Between:
        if self.held is not None:
            self.held.__enter__()
        return self.between

    def __exit__(self, *exc) -> Any:
        if self.held is not None:
            return self.held.__exit__(*exc)
        return None


def _stopped_waiting(task_id: str, var: str) -> NoReturn:
    """Ctrl-C (a kernel interrupt) during a wait stops the wait only: the task goes on, and
    the KeyboardInterrupt raised here says how to cancel it."""
    raise KeyboardInterrupt(f"stopped waiting for {task_id}; it was NOT cancelled and goes on running. To cancel "
                            f"it: {var}.cancel(), app.revoke({task_id!r}, terminate=True) or "
                            f"%nbqueue cancel {task_id}") from None


@contextlib.contextmanager
def _interrupted(task_id: str, var: str) -> Iterator[None]:
    """Around a wait: see ``_stopped_waiting``."""
    try:
        yield
    except KeyboardInterrupt:
        _stopped_waiting(task_id, var)


def _leaves(result) -> list[AsyncResult]:
    """The task results inside a (possibly nested) result, in order."""
    if isinstance(result, AsyncResult):
        return [result]
    return [leaf for child in result.children for leaf in _leaves(child)]


class _WorkflowResult:
    """Shared behaviour of group, chain and chord results."""

    app: Any
    children: list
    results: list

    @property
    def terminal_id(self) -> str:
        raise NotImplementedError

    def ready(self) -> bool:
        return self.app.backend.states_of([self.terminal_id]).get(self.terminal_id) in states.READY_STATES

    def wait(self, timeout: float | None = None) -> bool:
        with _waiting(self.app, self._leaf_records) as between:
            return _wait_ids(self.app, [self.terminal_id], timeout, between)

    def _leaf_records(self, limit: int = 1000) -> list:
        """The records of the tasks inside (at most ``limit``), for the checks a waiter makes."""
        return self.app.backend.get_many([r.id for r in self.leaves()[:limit]])

    def diagnose(self) -> str | None:
        """Why the first task inside that has not started may never start, or None (see AsyncResult.diagnose)."""
        record = next((r for r in self._leaf_records() if r is not None and r.get("state") in _NOT_STARTED), None)
        return waiting_problem(self.app, record)

    def successful(self) -> bool:
        return self.app.backend.states_of([self.terminal_id]).get(self.terminal_id) == states.SUCCESS

    def failed(self) -> bool:
        return self.app.backend.states_of([self.terminal_id]).get(self.terminal_id) in (states.FAILURE, states.REVOKED)

    @property
    def state(self) -> str:
        return self.app.backend.states_of([self.terminal_id]).get(self.terminal_id) or states.PENDING

    def leaves(self) -> list[AsyncResult]:
        return _leaves(self)

    def progress(self) -> dict:
        """Counts by state of every task inside, from one backend query."""
        return self.app.backend.progress([r.id for r in self.leaves()])

    def to_frame(self, limit: int | None = None):
        """One row per task (of the first ``limit`` tasks, when given): args, state, result, error, runtime, retries."""
        from .frames import records_frame

        leaves = self.leaves()[:limit]
        frame = records_frame(self.app, [r for r in self.app.backend.get_many([x.id for x in leaves]) if r is not None])
        order = {r.id: i for i, r in enumerate(leaves)}
        frame["position"] = frame["id"].map(order)
        return frame.sort_values("position").drop(columns="position").reset_index(drop=True)

    def _raise_failure(self) -> None:
        """Raise the error of the first task that failed, else of the first one revoked
        (not of those merely not run because of it)."""
        records = [r for r in self.app.backend.get_many([x.id for x in self.leaves()]) if r is not None]
        for rec in records:
            if rec["state"] == states.FAILURE:
                raise failure_from_record(rec)
        for rec in records:
            if rec["state"] == states.REVOKED and not (rec.get("traceback") or "").startswith("not run:"):
                raise failure_from_record(rec)
        terminal = self.app.backend.get(self.terminal_id)
        raise failure_from_record(
            terminal or {"id": self.terminal_id, "state": states.FAILURE, "error": "unknown failure"}
        )

    def cancel(self, reason: str = "cancelled by user") -> int:
        """Cancel every task inside that has not finished (``AsyncResult.cancel``): a chain
        stops and its later steps are recorded REVOKED; a group's or chord's unfinished
        members are revoked, and a chord's callback never runs (its error callbacks fire,
        once). Returns how many tasks this call cancelled (0: everything had finished)."""
        return self.app.cancel_all(reason, ids=[r.id for r in self.leaves()])

    def get(self, timeout: float | None = None) -> Any:
        """The workflow's value (a group's member values in order, a chain's last step's, a
        chord's callback's); raises the first task failure, or TimeoutError."""
        with _interrupted(self.terminal_id, "result"), _waiting(self.app, self._leaf_records) as between:
            record = _in_slices(
                lambda t: self.app.backend.wait_record(self.terminal_id, timeout=t, missing_ok=False), timeout, between
            )
        if record is None:
            problem = between.problem or self.diagnose()
            raise TimeoutError(
                f"{type(self).__name__} {self.terminal_id} not ready after {timeout}s"
                + (f": {problem}" if problem else "")
            )
        if record["state"] != states.SUCCESS:
            self._raise_failure()
        return self.app.serializer.decode(serialization.loads(record["result"]))

    # -- snapshots: what views show ----------------------------------------------------------------
    def snapshot(self, *, diagnose: bool = True) -> dict:
        """What views show of this workflow: ``kind`` ("group", "chord" or "chain"), ``id``,
        ``terminal_id``, ``label``, ``state`` (STARTED once a task inside started: a workflow's
        record is written when it finishes), ``terminal_state`` (as recorded), ``final`` (the
        terminal record is final; members may still be running: see ``counts``), ``counts`` (by
        state, of every task inside),
        ``size`` (members or steps), ``steps`` (a chain's steps: ``index``, ``name``, ``state``,
        ``runtime`` and the ``outcome`` keys; [] otherwise), ``callback_state`` (a chord's),
        ``created_at`` (the earliest record's), ``finished_at``, the ``outcome`` keys of the
        terminal record, ``note``: why the first task inside that has not started may
        never start (only computed with ``diagnose`` once the workflow waited NOTICE_AFTER seconds),
        and ``reported``: the progress the tasks inside reported (:func:`reported`, over at most
        PROGRESS_SUM_LIMIT of them).
        """
        terminal = self.app.backend.get(self.terminal_id) or {}
        counts, steps = self._counts_and_steps()
        terminal_state = terminal.get("state") or states.PENDING
        state = terminal_state
        if state == states.PENDING and counts["done"] + counts["running"] + counts["retrying"] > 0:
            state = states.STARTED
        final = terminal_state in states.READY_STATES
        times = [t for t in [terminal.get("created_at")] + [s["created_at"] for s in steps] if t is not None]
        created = min(times) if times else None
        note = ""
        if diagnose and state == states.PENDING and not final and _waited(self.app, created):
            note = self.diagnose() or ""
        return {"kind": self.kind, "id": self.id, "terminal_id": self.terminal_id, "label": self._label(),
                "state": state, "terminal_state": terminal_state, "final": final, "counts": counts,
                "size": len(self.results), "steps": steps,
                "callback_state": None, "created_at": created, "finished_at": terminal.get("finished_at"),
                **outcome(self.app, terminal), "note": note, "reported": self._reported()}

    def _reported(self) -> dict:
        ids = [leaf.id for leaf in self.leaves()[:PROGRESS_SUM_LIMIT]]
        return reported([r for r in self.app.backend.get_many(ids) if r is not None] if ids else [])

    @property
    def kind(self) -> str:
        return type(self).__name__.replace("Result", "").lower()

    def _label(self) -> str:
        label = getattr(self, "label", None)
        return str(label) if label else f"{self.kind} of {len(self.results)}"

    def _counts_and_steps(self) -> tuple[dict, list[dict]]:
        return self.progress(), []


class GroupResult(_WorkflowResult):
    """Members' results in group order."""

    def __init__(self, group_id: str, results: list, app):
        self.id = group_id
        self.results = results
        self.app = app

    @property
    def children(self) -> list:
        return self.results

    @property
    def terminal_id(self) -> str:
        return self.id

    def __len__(self) -> int:
        return len(self.results)

    def __iter__(self):
        return iter(self.results)

    def __getitem__(self, i):
        return self.results[i]

    def member_ids(self) -> list[str]:
        """The id holding each member's result (a chain's last step, a nested group's own id)."""
        return [r.id if isinstance(r, AsyncResult) else r.terminal_id for r in self.results]

    def completed_count(self) -> int:
        """How many members succeeded (a member that is a chain counts once, when its last step did)."""
        found = self.app.backend.states_of(self.member_ids())
        return sum(1 for state in found.values() if state == states.SUCCESS)

    def ready(self) -> bool:
        """True once every member has finished (succeeded, failed, or was not run).

        A failed member makes the group's record FAILURE at once, and ``get()`` raises
        then; the group is ready only when the other members are done too.
        """
        ids = [self.id] + self.member_ids()
        found = self.app.backend.states_of(ids)
        return all(found.get(i) in states.READY_STATES for i in ids)

    def progress(self) -> dict:
        if all(isinstance(r, AsyncResult) for r in self.results):
            return self.app.backend.progress(group_id=self.id)
        return self.app.backend.progress([r.id for r in self.leaves()])

    def __repr__(self) -> str:
        return f"<GroupResult {self.id} {len(self.results)} members {self.state}>"


class ChainResult(_WorkflowResult):
    """The steps' results; ``get()`` is the last step's value."""

    def __init__(self, results: list, app):
        self.results = results
        self.app = app

    @property
    def id(self) -> str:
        return self.terminal_id

    @property
    def children(self) -> list:
        return self.results

    @property
    def terminal_id(self) -> str:
        last = self.results[-1]
        return last.id if isinstance(last, AsyncResult) else last.terminal_id

    def _label(self) -> str:
        label = getattr(self, "label", None)
        return str(label) if label else f"chain of {len(self.results)} steps"

    def _counts_and_steps(self) -> tuple[dict, list[dict]]:
        """Counts of every task inside and one entry per step, from one read of their records."""
        leaves = self.leaves()
        records = dict(zip([r.id for r in leaves], self.app.backend.get_many([r.id for r in leaves])))
        counts = counts_from_states([((rec or {}).get("state"), 1) for rec in records.values()], len(leaves))
        return counts, [self._step(i, step, records) for i, step in enumerate(self.results)]

    def _step(self, index: int, step, records: dict) -> dict:
        if isinstance(step, AsyncResult):
            record = records.get(step.id) or {}
            name = step._name or record.get("name") or "task"
        else:
            record = self.app.backend.get(step.terminal_id) or {}
            name = f"{step.kind} of {len(step.leaves())}"
        return {"index": index + 1, "name": name, "state": record.get("state") or states.PENDING,
                "created_at": record.get("created_at"), "runtime": _runtime(record), **outcome(self.app, record)}

    def __repr__(self) -> str:
        return f"<ChainResult {len(self.results)} steps {self.state}>"


class ChordResult(_WorkflowResult):
    """A header group and its callback; ``get()`` is the callback's value."""

    def __init__(self, header: GroupResult, callback, app):
        self.header = header
        self.callback = callback
        self.app = app

    @property
    def id(self) -> str:
        return self.terminal_id

    @property
    def results(self) -> list:
        return self.header.results

    @property
    def children(self) -> list:
        return [self.header, self.callback]

    @property
    def terminal_id(self) -> str:
        return self.callback.id if isinstance(self.callback, AsyncResult) else self.callback.terminal_id

    def snapshot(self, *, diagnose: bool = True) -> dict:
        snap = super().snapshot(diagnose=diagnose)
        snap["callback_state"] = snap["terminal_state"]
        return snap

    def _label(self) -> str:
        label = getattr(self, "label", None)
        return str(label) if label else f"chord of {len(self.header)}"

    def _counts_and_steps(self) -> tuple[dict, list[dict]]:
        return self.header.progress(), []

    def __repr__(self) -> str:
        return f"<ChordResult {len(self.header)} members {self.state}>"
