"""The process pool: child processes that run task functions, one task at a time each.

``Worker(pool="processes")`` keeps its executor threads; each drives one child through
:meth:`ProcessPool.run`, which ships the function (``shipping.pack``: by value for a
notebook's functions, by reference for importable ones), runs it in a child and returns
a :class:`ChildOutcome`. The interface, for the worker and whatever schedules around it::

    pool = ProcessPool(2, max_tasks_per_child=100, max_memory_per_child=500_000)
    outcome = pool.run(fn_or_shipped, args, kwargs, task_id=..., name=..., time_limit=60,
                       soft_time_limit=50, on_output=lambda stream, text: ...)
    outcome.exit        # "ok" (the function returned or raised), "died", "time_limit", "stopped"
    outcome.value / outcome.exc_type, outcome.message, outcome.traceback / outcome.output
    outcome.unwrap()    # the value, or raises (see ChildOutcome.unwrap)
    pool.stop(task_id, reason)   # SIGTERM the child running it, SIGKILL after kill_grace
    pool.soft_limit(task_id)     # raise SoftTimeLimitExceeded in it (SIGUSR1 to its main thread)
    pool.close(grace)

Why our own supervision over stdlib ``multiprocessing`` rather than a pool library:
``concurrent.futures.ProcessPoolExecutor`` and loky mark the whole pool broken when one
child dies (every pending future fails with ``BrokenProcessPool`` /
``TerminatedWorkerError``) and cannot stop one running task; billiard (Celery's pool)
can do both and recycles by task count and memory, but it schedules jobs onto any free
child through its own queue and result-handler threads, where nbqueue's executor
threads already reserve, prefetch and order work, and it has no channel to stream a
running task's output to the live view. What remains is small: ``multiprocessing``
starts the children (``forkserver``, or ``spawn`` where there is no forkserver: never a
bare fork of a process that has threads, such as a kernel) and gives us pipes and
sentinels; this module adds the protocol, supervision and recycling.

Children:

- are started from a fork server that imported nbqueue once (a few ms each), with the
  parent's environment, ``sys.path`` and working directory as of their start;
- ignore SIGINT (a kernel interrupt signals the whole process group; it must not kill
  tasks); SIGUSR1 raises ``SoftTimeLimitExceeded`` in the running task; SIGTERM ends them;
- exit when the parent process dies (a thread waits on a pipe only the parent holds);
- send what a task writes to ``sys.stdout``/``sys.stderr`` (``print``, and ``logging``
  through a root handler at the parent's level) to the parent as it comes, at most
  every 50 ms, where the executor thread writes it to its own streams: nbqueue's
  per-task capture (``capture.py``) picks it up. Output written to file descriptors
  1 and 2 directly (C extensions, subprocesses) goes to the worker's own stdout/stderr.

The pipe protocol (pickled tuples): parent -> child ``("run", task_id, name, key, code or
None, arguments)`` or ``("exit",)``; child -> parent ``("started",)`` once the task's
function is about to run (its signal handlers installed: the parent sends no SIGUSR1
before that, see ``_Child.soft_limit``), ``("out", [(stream, text), ...])`` and
``("progress", (done, total, note))`` while the task runs, then ``("done", reply, peak
memory KiB)``. Stopping needs no message: it is a signal to the child (SIGTERM, then
SIGKILL after a grace: a task that ignores SIGTERM is killed all the same).

Supervision: a child that dies (a signal, ``os._exit``, the OOM killer) yields
``exit="died"`` with the signal or exit code, for that task only; the next task gets a
fresh child. A child is replaced after ``max_tasks_per_child`` tasks, or once its peak
resident memory (``ru_maxrss``) passes ``max_memory_per_child`` KiB (Celery's units),
between tasks. Arguments and results travel pickled (``pickle``, cloudpickle where
plain pickle cannot); a result that cannot be pickled fails the task naming it.
"""
from __future__ import annotations

import atexit
import collections
import dataclasses
import logging
import multiprocessing
import multiprocessing.connection
import os
import pickle
import queue as _queue
import select
import signal
import sys
import threading
import time
import traceback
import weakref
from typing import Any, Callable

from . import shipping
from .errors import NbqueueError, Retry, SoftTimeLimitExceeded, TimeLimitExceeded, WorkerLostError

log = logging.getLogger(__name__)

KILL_GRACE = 3.0          # seconds between SIGTERM and SIGKILL when a child is stopped
OUTPUT_INTERVAL = 0.05    # a child sends buffered output at least this often while a task prints
START_ALLOWANCE = 30.0    # seconds a child may take to begin a task (start-up, loading its code) beyond time_limit
_OUTPUT_CHUNK = 64 * 1024
_KNOWN_MAX = shipping._LOADED_MAX // 2


# -- what run() returns ---------------------------------------------------------------------------------

class ChildLost(WorkerLostError):
    """The child running the task died or was stopped before the task finished.

    ``counts``: the task itself may be the cause (it died on its own), as opposed to
    being stopped by the worker (shutdown, cancel); ``signal``/``exitcode``: how it ended.
    """

    def __init__(self, message: str, *, signal: int | None = None, exitcode: int | None = None, counts: bool = True):
        super().__init__(message)
        self.signal = signal
        self.exitcode = exitcode
        self.counts = counts


_remote_types: dict[str, type] = {}


def _remote_exception(exc_type: str, message: str, traceback_text: str | None) -> Exception:
    """An exception named like the one the task raised in its child (``type(e).__name__``
    is what the worker records), carrying the child's traceback text as ``child_traceback``."""
    cls = _remote_types.get(exc_type)
    if cls is None:
        cls = _remote_types.setdefault(exc_type, type(exc_type, (Exception,), {"__module__": "nbqueue.pool"}))
    exc = cls(message)
    exc.child_traceback = traceback_text
    return exc


@dataclasses.dataclass
class ChildOutcome:
    """What became of one task in a child process.

    ``exit``: ``"ok"`` when the function returned (``value``) or raised (``exc_type``,
    ``message``, ``traceback``: the child's traceback text; ``retry``: ``(countdown,
    reason)`` for ``nbqueue.Retry``); ``"died"`` (``signal`` or ``exitcode``), ``"time_limit"``
    (stopped at its ``time_limit``), ``"stopped"`` (``pool.stop``/shutdown; ``reason``).
    ``output``: everything the task wrote to stdout/stderr, also passed to ``on_output`` as it came.
    """

    exit: str
    value: Any = None
    exc_type: str | None = None
    message: str = ""
    traceback: str | None = None
    retry: tuple[float, str] | None = None
    output: str = ""
    signal: int | None = None
    exitcode: int | None = None
    reason: str | None = None
    pid: int | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.exit == "ok" and self.exc_type is None and self.retry is None

    def unwrap(self) -> Any:
        """The value; or raises: ``Retry`` (the task asked for one), an exception named like
        the task's own (with ``child_traceback``), ``TimeLimitExceeded``, or ``ChildLost``."""
        if self.exit == "ok":
            if self.retry is not None:
                raise Retry(*self.retry)
            if self.exc_type is not None:
                raise _remote_exception(self.exc_type, self.message, self.traceback)
            return self.value
        if self.exit == "time_limit":
            exc = TimeLimitExceeded(self.message)
            exc.child_traceback = f"TimeLimitExceeded: {self.message}\n"
            raise exc
        how = f"signal {self.signal}" if self.signal else f"exit code {self.exitcode}"
        if self.exit == "stopped":
            raise ChildLost(
                f"worker child process stopped ({self.reason or 'stopped'})",
                signal=self.signal,
                exitcode=self.exitcode,
                counts=False,
            )
        raise ChildLost(f"worker child process died ({how})", signal=self.signal, exitcode=self.exitcode)


# -- the child's side -------------------------------------------------------------------------------------

class _ChildState:
    conn = None
    send_lock = threading.Lock()
    running = False              # a task function is on the main thread's stack (the soft limit may fire)
    pending: list = []           # [(stream, text)] not sent yet
    pending_size = 0
    wake = threading.Event()
    progress: tuple | None = None  # the latest report_progress not sent yet
    progress_at = 0.0


class _ChildStream:
    """sys.stdout/sys.stderr of a child: a running task's writes go to the parent."""

    def __init__(self, name: str, original):
        self._name = name
        self._original = original

    def write(self, text) -> int:
        if not _ChildState.running or not isinstance(text, str):
            return self._original.write(text) if self._original is not None else len(text)
        with _ChildState.send_lock:
            _ChildState.pending.append((self._name, text))
            _ChildState.pending_size += len(text)
            if _ChildState.pending_size >= _OUTPUT_CHUNK:
                _send_output_locked()
        _ChildState.wake.set()
        return len(text)

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        if _ChildState.running:
            with _ChildState.send_lock:
                _send_output_locked()
        elif self._original is not None:
            self._original.flush()

    def isatty(self) -> bool:
        return False

    def __getattr__(self, name):
        return getattr(self._original, name)


def _message(msg: tuple) -> bytes:
    """The pipe protocol's messages are tuples of plain values (texts, numbers, bytes)."""
    return pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)


def _send_output_locked() -> None:
    if not _ChildState.pending:
        return
    merged: list = []
    for stream, text in _ChildState.pending:
        if merged and merged[-1][0] == stream:
            merged[-1][1] += text
        else:
            merged.append([stream, text])
    _ChildState.pending, _ChildState.pending_size = [], 0
    _ChildState.conn.send_bytes(_message(("out", [tuple(m) for m in merged])))


def _send_progress_locked() -> None:
    if _ChildState.progress is None:
        return
    value, _ChildState.progress = _ChildState.progress, None
    _ChildState.progress_at = time.monotonic()
    _ChildState.conn.send_bytes(_message(("progress", value)))


def _report_progress(done, total, note) -> None:
    """``report_progress`` in a child: the latest report goes to the parent, at most every
    ``taskprogress.SEND_EVERY`` seconds (a later one replaces one not sent yet)."""
    from .taskprogress import SEND_EVERY

    with _ChildState.send_lock:
        _ChildState.progress = (done, total, note)
        if time.monotonic() - _ChildState.progress_at >= SEND_EVERY:
            _send_progress_locked()
            return
    _ChildState.wake.set()


def _output_flusher() -> None:
    while True:
        _ChildState.wake.wait()
        time.sleep(OUTPUT_INTERVAL)
        _ChildState.wake.clear()
        with _ChildState.send_lock:
            try:
                _send_output_locked()
                _send_progress_locked()
            except Exception:
                pass


def _watch_parent(alive) -> None:
    """Exit as soon as the parent process is gone (or closes the pipe to end this child)."""
    try:
        alive.recv_bytes()
    except BaseException:
        pass
    os._exit(0)


def _on_soft_limit(signum, frame) -> None:
    if _ChildState.running:
        raise SoftTimeLimitExceeded("the task ran longer than its soft time limit")


class _StderrHandler(logging.StreamHandler):
    """A root log handler writing to whatever sys.stderr is at the time (the task's channel)."""

    def __init__(self) -> None:
        logging.Handler.__init__(self)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _dumps(value: Any) -> bytes:
    try:
        return pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:
        import cloudpickle

        return cloudpickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)


def _format_tb(exc: BaseException) -> str:
    tb = exc.__traceback__
    tb = tb.tb_next if tb is not None and tb.tb_next is not None else tb   # not this module's frame
    return "".join(traceback.format_exception(type(exc), exc, tb))


def _maxrss_kib() -> int:
    try:
        import resource
    except ImportError:  # pragma: no cover - Windows
        return 0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss // 1024 if sys.platform == "darwin" else rss


def _child_main(conn, alive, settings: dict) -> None:
    """The child's loop: ("run", ...) -> ("out", ...)* ("done", ...); ("exit",) or EOF ends it."""
    from .context import TaskContext, _current, opened_process_app, use_process_app
    from .control import TaskControl

    os.environ.clear()
    os.environ.update(settings.get("env") or {})
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(signal, "SIGUSR1"):
        signal.signal(signal.SIGUSR1, _on_soft_limit)
    _ChildState.conn = conn
    use_process_app(*(settings.get("app") or (None, "the process pool was started without an App")))
    threading.Thread(target=_watch_parent, args=(alive,), name="nbqueue-child-watch", daemon=True).start()
    threading.Thread(target=_output_flusher, name="nbqueue-child-output", daemon=True).start()
    sys.stdout = _ChildStream("stdout", sys.stdout)
    sys.stderr = _ChildStream("stderr", sys.stderr)
    root = logging.getLogger()
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter(settings.get("log_format") or logging.BASIC_FORMAT))
    root.addHandler(handler)
    root.setLevel(settings.get("log_level") or logging.WARNING)
    while True:
        try:
            msg = pickle.loads(conn.recv_bytes())
        except (EOFError, OSError):
            break
        if msg[0] != "run":
            break
        _, task_id, name, key, data, payload = msg
        try:
            fn = shipping.load(key, data)
            args, kwargs = pickle.loads(payload)
        except BaseException as exc:
            reply = (
                "load_error",
                type(exc).__name__,
                f"cannot load task {name!r} in its child process: {exc}",
                _format_tb(exc),
            )
        else:
            control = TaskControl(task_id, name)
            control.on_progress = _report_progress
            context = TaskContext(id=task_id, name=name, app=opened_process_app(), token=None, worker=None,
                                  control=control)
            reset = _current.set(context)
            try:
                try:
                    _ChildState.running = True
                    with _ChildState.send_lock:
                        conn.send_bytes(_message(("started",)))
                    value = fn(*args, **kwargs)
                finally:
                    _ChildState.running = False
                try:
                    reply = ("ok", _dumps(value))
                except Exception as exc:
                    reply = (
                        "error",
                        "SerializationError",
                        f"the result of task {name!r} ({type(value).__name__}) cannot be sent back "
                        f"from its child process: {exc}",
                        None,
                    )
            except Retry as exc:
                reply = ("retry", exc.countdown, exc.reason)
            except BaseException as exc:  # the task's own failure, SystemExit included: the child goes on
                try:
                    text = str(exc)
                except Exception:
                    text = repr(exc)
                reply = ("error", type(exc).__name__, text, _format_tb(exc))
            finally:
                _current.reset(reset)
                del fn
        with _ChildState.send_lock:
            try:
                _send_output_locked()
                _send_progress_locked()
                conn.send_bytes(_message(("done", reply, _maxrss_kib())))
            except (OSError, ValueError):
                break
    os._exit(0)


# -- the parent's side ------------------------------------------------------------------------------------

_context_lock = threading.Lock()


def _context(method: str | None):
    """The multiprocessing context children start from: forkserver where there is one, else spawn."""
    available = multiprocessing.get_all_start_methods()
    method = method or ("forkserver" if "forkserver" in available else "spawn")
    if method == "fork":
        raise ValueError(
            "start_method='fork' is not safe in a process with threads (a kernel); use 'forkserver' or 'spawn'"
        )
    if method not in available:
        raise ValueError(f"start method {method!r} is not available here (available: {', '.join(available)})")
    ctx = multiprocessing.get_context(method)
    if method == "forkserver":
        from multiprocessing import forkserver

        server = forkserver._forkserver
        with _context_lock:
            # children fork from a server that imported nbqueue once (added to whatever preload there is)
            if getattr(server, "_forkserver_pid", None) is None:
                # "__main__" only when the server can import it by path (a script), not a kernel's namespace
                preload = [m for m in getattr(server, "_preload_modules", None) or ["__main__"]
                           if m != "__main__" or _main_importable_by_path()]
                ctx.set_forkserver_preload(preload + ([] if __name__ in preload else [__name__]))
    return ctx


def _main_importable_by_path() -> bool:
    """True when ``__main__`` is a script the fork server can import by its path (stdlib's
    preload of ``"__main__"``); not for a notebook kernel (``__spec__`` None, no file), an
    IPython shell after ``%reset`` (no ``__spec__`` at all), ``python -m`` (imported by name
    instead) or an embedded interpreter without a ``__main__``."""
    main = sys.modules.get("__main__")
    if main is None or getattr(main, "__spec__", None) is not None:
        return False
    path = getattr(main, "__file__", None)
    return isinstance(path, str) and path.endswith(".py") and os.path.isfile(path)


_main_lock = threading.Lock()


class _MainForStart:
    """Around ``Process.start()``: ``__main__`` as multiprocessing's preparation step reads it.

    ``multiprocessing.spawn.get_preparation_data`` (run for each forkserver/spawn child and
    when the fork server starts) reads ``sys.modules['__main__'].__spec__``: it raises
    ``KeyError`` without a ``__main__`` (an embedded interpreter) and ``AttributeError``
    when the module has no ``__spec__`` (IPython's namespace after ``reset``, a stand-in
    module). For the start only, a missing ``__main__`` is an empty module and a missing
    ``__spec__`` is ``None`` (as on any module that was not imported); both are undone after.
    """

    def __enter__(self) -> None:
        _main_lock.acquire()
        self.added_main = self.added_spec = self.replaced_main = None
        try:
            main = sys.modules.get("__main__")
            if main is None:
                import types

                self.added_main = sys.modules["__main__"] = types.ModuleType("__main__")
            elif not hasattr(main, "__spec__"):
                try:
                    main.__spec__ = None
                    self.added_spec = main
                except Exception:     # cannot carry the attribute: an empty stand-in for the start
                    self.replaced_main = main
                    import types

                    self.added_main = sys.modules["__main__"] = types.ModuleType("__main__")
        except BaseException:
            _main_lock.release()
            raise

    def __exit__(self, *exc_info) -> None:
        try:
            if self.added_main is not None and sys.modules.get("__main__") is self.added_main:
                if self.replaced_main is not None:
                    sys.modules["__main__"] = self.replaced_main
                else:
                    del sys.modules["__main__"]
            if self.added_spec is not None and getattr(self.added_spec, "__spec__", 0) is None:
                try:
                    del self.added_spec.__spec__
                except Exception:
                    pass
        finally:
            _main_lock.release()


class _Child:
    """One child process and the pipes to it; driven by one thread at a time."""

    def __init__(self, pool: "ProcessPool", index: int):
        self.pool = pool
        self.index = index
        self.proc = None
        self.conn = None
        self.alive_w = None
        self.known: collections.OrderedDict[str, bool] = collections.OrderedDict()   # function keys it holds
        self.tasks = 0
        self.task_id: str | None = None
        self.stop_reason: str | None = None
        self.lock = threading.Lock()
        self.started = False        # the child said it runs the current task (its SIGUSR1 handler is set)
        self.soft_due = False       # a soft limit passed before that: signalled once it says so
        self._soft_lock = threading.Lock()

    @property
    def pid(self) -> int | None:
        proc = self.proc
        return proc.pid if proc is not None else None

    def replace_soon(self) -> None:
        """Start a successor in the background (a dead or retired child), so the next task need not wait."""
        def start() -> None:
            try:
                self.ensure_started()
            except NbqueueError:
                pass
            except Exception:
                log.warning("process pool: could not start child %d", self.index, exc_info=True)

        if not (self.pool.closed or self.pool.draining):
            threading.Thread(target=start, name="nbqueue-pool-replace", daemon=True).start()

    def ensure_started(self) -> None:
        with self.lock:
            if self.proc is None:       # one that died idle fails the next send, and is replaced then
                self._start()

    def _start(self) -> None:
        if self.pool.closed or self.pool.draining:
            raise NbqueueError("the process pool is closed")
        ctx = self.pool.context
        parent_conn, child_conn = ctx.Pipe(duplex=True)
        alive_r, alive_w = ctx.Pipe(duplex=False)
        proc = ctx.Process(
            target=_child_main,
            args=(child_conn, alive_r, self.pool._settings()),
            name=f"nbqueue-child-{self.index}",
            daemon=False,
        )
        try:
            with _MainForStart():
                proc.start()
        finally:
            child_conn.close()
            alive_r.close()
        self.proc, self.conn, self.alive_w = proc, parent_conn, alive_w
        self.wait = _waiter(parent_conn, proc.sentinel)
        self.known, self.tasks, self.stop_reason = collections.OrderedDict(), 0, None
        self.pool.started += 1
        log.debug("process pool: child %d started (pid %d)", self.index, proc.pid)

    def _discard(self) -> None:
        """Forget the current process (dead or retiring): close our ends, reap it later."""
        proc, self.proc = self.proc, None
        for end in (self.conn, self.alive_w):
            try:
                if end is not None:
                    end.close()
            except OSError:
                pass
        self.conn = self.alive_w = None
        self.known = collections.OrderedDict()
        if proc is not None:
            self.pool._reap_later(proc)

    def retire(self) -> None:
        """Let the child exit (between tasks); the next task starts a new one."""
        with self.lock:
            if self.proc is None:
                return
            try:
                self.conn.send_bytes(_message(("exit",)))
            except OSError:
                pass
            self._discard()

    def signal(self, signum: int) -> bool:
        proc = self.proc
        if proc is None or proc.exitcode is not None:
            return False
        try:
            os.kill(proc.pid, signum)
            return True
        except ProcessLookupError:
            return False

    def soft_limit(self) -> bool:
        """Raise ``SoftTimeLimitExceeded`` in the current task (SIGUSR1), or as soon as the child
        says it runs it: a signal before its handler is installed would kill a fresh child."""
        if not hasattr(signal, "SIGUSR1"):
            return False
        with self._soft_lock:
            if not self.started:
                self.soft_due = True
                return True
        return self.signal(signal.SIGUSR1)

    def _on_started(self) -> None:
        with self._soft_lock:
            self.started, due, self.soft_due = True, self.soft_due, False
        if due:
            self.signal(signal.SIGUSR1)

    def terminate(self, reason: str, grace: float) -> None:
        """SIGTERM now, SIGKILL after ``grace`` seconds if it is still there."""
        proc = self.proc
        if proc is None:
            return
        self.stop_reason = self.stop_reason or reason
        if not self.signal(signal.SIGTERM):
            return

        def kill() -> None:
            if proc.exitcode is None:
                try:
                    proc.kill()
                except OSError:
                    pass

        timer = threading.Timer(grace, kill)
        timer.daemon = True
        timer.start()

    def run(self, shipped: shipping.Shipped, payload: bytes, task_id: str, name: str, time_limit: float | None,
            soft_time_limit: float | None, on_output: Callable[[str, str], None] | None,
            on_progress: Callable[..., None] | None = None) -> ChildOutcome:
        started = time.monotonic()
        with self._soft_lock:
            self.started = self.soft_due = False
        for attempt in (1, 2):
            self.ensure_started()
            try:
                code = None if shipped.key in self.known else shipped.data     # the child keeps what it loaded
                self.conn.send_bytes(_message(("run", task_id, name, shipped.key, code, payload)))
                break
            except OSError as exc:  # it died while idle: the task never reached it; start another
                with self.lock:
                    self._discard()
                if attempt == 2:
                    return ChildOutcome(
                        "died", message=f"cannot reach a new child process: {exc}", seconds=time.monotonic() - started
                    )
        self.known[shipped.key] = True
        self.known.move_to_end(shipped.key)
        while len(self.known) > _KNOWN_MAX:     # fewer than the child keeps (shipping._LOADED_MAX)
            self.known.popitem(last=False)
        self.task_id = task_id
        output: list[str] = []
        # both limits count from the child's "started" (the function's start, as Celery's), not
        # from a fresh child's start-up; a child that never begins is stopped START_ALLOWANCE later
        soft_at = None
        hard_at = started + time_limit + START_ALLOWANCE if time_limit else None
        conn, wait = self.conn, self.wait
        try:
            while True:
                deadline = min((t for t in (soft_at, hard_at) if t is not None), default=None)
                timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
                ready = wait(timeout)
                if not ready:
                    soft_at, hard_at = self._enforce(soft_at, hard_at)
                    continue
                try:
                    while "message" in ready:
                        msg = pickle.loads(conn.recv_bytes())
                        if msg[0] == "out":
                            for stream, text in msg[1]:
                                output.append(text)
                                if on_output is not None:
                                    on_output(stream, text)
                        elif msg[0] == "started":
                            if soft_time_limit:
                                soft_at = time.monotonic() + soft_time_limit
                            if time_limit and hard_at is not None:
                                hard_at = time.monotonic() + time_limit
                            self._on_started()
                        elif msg[0] == "progress":
                            if on_progress is not None:
                                on_progress(*msg[1])
                        elif msg[0] == "done":
                            return self._done(msg, output, started, shipped.key)
                        ready = wait(0)
                except (EOFError, OSError):    # its end of the pipe closed: it is gone
                    return self._died(task_id, output, started, time_limit)
                if "exited" in ready:
                    return self._died(task_id, output, started, time_limit)
        finally:
            self.task_id = None

    def _enforce(self, soft_at: float | None, hard_at: float | None) -> tuple[float | None, float | None]:
        """Act on the limits that are due (soft: SIGUSR1 to the task; hard: stop the child);
        the ones still to come."""
        now = time.monotonic()
        if soft_at is not None and now >= soft_at:
            soft_at = None
            self.soft_limit()
        if hard_at is not None and now >= hard_at:
            hard_at = None
            self.terminate("time_limit", self.pool.kill_grace)
        return soft_at, hard_at

    def _done(self, msg: tuple, output: list, started: float, key: str) -> ChildOutcome:
        _, reply, rss = msg
        self.tasks += 1
        outcome = ChildOutcome("ok", output="".join(output), pid=self.pid, seconds=time.monotonic() - started)
        if reply[0] == "ok":
            try:
                outcome.value = pickle.loads(reply[1])
            except Exception as exc:
                outcome.exc_type, outcome.message = (
                    "SerializationError",
                    f"cannot read the result sent back by the child process: {exc}",
                )
        elif reply[0] == "retry":
            outcome.retry = (reply[1], reply[2])
        else:
            outcome.exc_type, outcome.message, outcome.traceback = reply[1], reply[2], reply[3]
            if reply[0] == "load_error":
                self.known.pop(key, None)
        pool = self.pool
        if self.stop_reason is not None:    # signalled as it finished: it may go any moment
            self.stop_reason = None
            self.retire()
        elif (pool.max_tasks_per_child and self.tasks >= pool.max_tasks_per_child) or \
                (pool.max_memory_per_child and rss > pool.max_memory_per_child):
            log.info(
                "process pool: recycling child %d (pid %s) after %d task(s), peak memory %d KiB",
                self.index,
                self.pid,
                self.tasks,
                rss,
            )
            pool.recycled += 1
            self.retire()
            self.replace_soon()
        return outcome

    def _died(self, task_id: str, output: list, started: float, time_limit: float | None) -> ChildOutcome:
        proc = self.proc
        proc.join(5)
        code = proc.exitcode
        reason, self.stop_reason = self.stop_reason, None
        with self.lock:
            self._discard()
        self.pool.died += 1
        self.replace_soon()
        outcome = ChildOutcome("died", output="".join(output), pid=proc.pid, seconds=time.monotonic() - started,
                               signal=-code if code is not None and code < 0 else None, exitcode=code)
        if reason == "time_limit":
            outcome.exit, outcome.message = (
                "time_limit",
                f"task ran longer than its time limit of {time_limit:g}s; its child process was stopped",
            )
        elif reason is not None:
            outcome.exit, outcome.reason = "stopped", reason
        else:
            log.warning("process pool: child %d (pid %d) died (%s) running task %s", self.index, proc.pid,
                        f"signal {outcome.signal}" if outcome.signal else f"exit code {code}", task_id)
        return outcome

    def close(self, grace: float) -> None:
        with self.lock:
            proc = self.proc
            if proc is None:
                return
            if self.task_id is None:
                try:
                    self.conn.send_bytes(_message(("exit",)))
                except OSError:
                    pass
        if self.task_id is not None:
            self.terminate("the worker stopped", self.pool.kill_grace)
        proc.join(grace if self.task_id is None else grace + self.pool.kill_grace)
        if proc.exitcode is None:
            proc.kill()
            proc.join(5)
        with self.lock:
            if self.proc is proc:
                self._discard()


def _waiter(conn, sentinel: int) -> Callable[[float | None], set]:
    """``wait(timeout)`` -> a set of what is ready: "message" (the pipe from the child has
    data or was closed) and/or "exited" (the child process ended). One poll object per
    child (``multiprocessing.connection.wait`` builds a selector on each call)."""
    if hasattr(select, "poll"):
        poller = select.poll()
        fd = conn.fileno()
        poller.register(fd, select.POLLIN)
        poller.register(sentinel, select.POLLIN)

        def wait(timeout: float | None) -> set:
            events = poller.poll(None if timeout is None else max(0, int(timeout * 1000 + 0.999)))
            return {"message" if got == fd else "exited" for got, _ in events}
    else:  # pragma: no cover - Windows
        def wait(timeout: float | None) -> set:
            ready = multiprocessing.connection.wait([conn, sentinel], timeout)
            return {"message" if r is conn else "exited" for r in ready}
    return wait


_pools: "weakref.WeakSet[ProcessPool]" = weakref.WeakSet()


class ProcessPool:
    """``size`` child processes, each running one task at a time (see the module docstring).

    ``max_tasks_per_child``: replace a child after this many tasks; ``max_memory_per_child``:
    after a task that left its peak resident memory above this many KiB; ``start_method``:
    ``"forkserver"`` (default where available) or ``"spawn"``; ``kill_grace``: seconds
    from SIGTERM to SIGKILL when a child is stopped.
    """

    def __init__(self, size: int, *, max_tasks_per_child: int | None = None, max_memory_per_child: int | None = None,
                 start_method: str | None = None, kill_grace: float = KILL_GRACE, app: Any = None):
        if size < 1:
            raise ValueError("a process pool needs at least one child")
        self.size = int(size)
        self.max_tasks_per_child = int(max_tasks_per_child) if max_tasks_per_child else None
        self.max_memory_per_child = int(max_memory_per_child) if max_memory_per_child else None
        self.kill_grace = float(kill_grace)
        #: (opener, why not) of the App its children send tasks with (``App.process_opener``)
        self.app_opener = app.process_opener() if app is not None else None
        self.context = _context(start_method)
        self.children = [_Child(self, i) for i in range(self.size)]
        self._idle: _queue.SimpleQueue = _queue.SimpleQueue()
        for child in self.children:
            self._idle.put(child)
        self._retiring: list = []
        self._lock = threading.Lock()
        self._deaths: collections.OrderedDict[str, int] = collections.OrderedDict()
        self.closed = False
        self.draining = False          # the worker is stopping: no new children
        self.started = self.died = self.recycled = 0
        _pools.add(self)

    def _settings(self) -> dict:
        root = logging.getLogger()
        fmt = next((h.formatter._fmt for h in root.handlers if getattr(h, "formatter", None) is not None), None)
        return {"env": dict(os.environ), "log_level": root.getEffectiveLevel(), "log_format": fmt,
                "app": self.app_opener}

    def start(self, wait: bool = False) -> "ProcessPool":
        """Start every child (in a background thread unless ``wait``), so the first tasks need
        not; also opens a closed pool again (a worker started again after a stop)."""
        self.closed = self.draining = False
        def warm() -> None:
            for child in self.children:
                if self.closed:
                    return
                try:
                    child.ensure_started()
                except Exception:
                    log.warning("process pool: could not start child %d", child.index, exc_info=True)

        if wait:
            warm()
        else:
            threading.Thread(target=warm, name="nbqueue-pool-start", daemon=True).start()
        return self

    def pids(self) -> list[int]:
        """Process ids of the live children."""
        return [p for p in (c.pid for c in self.children if c.proc is not None and c.proc.exitcode is None) if p]

    def run(
        self,
        target: Callable | shipping.Shipped,
        args=(),
        kwargs: dict | None = None,
        *,
        task_id: str,
        name: str | None = None,
        time_limit: float | None = None,
        soft_time_limit: float | None = None,
        on_output: Callable[[str, str], None] | None = None,
        on_progress: Callable[..., None] | None = None,
    ) -> ChildOutcome:
        """Run ``target(*args, **kwargs)`` in a free child and wait for it (blocks this thread).

        ``target``: a function (shipped with ``shipping.pack``) or a ``Shipped`` already
        made; ``time_limit`` (s, from when the function starts in its child, a fresh child's start-up
        not counted, as Celery's; a child that has not begun ``START_ALLOWANCE`` s after that
        is stopped too): stop the child then (``exit="time_limit"``); ``soft_time_limit`` (s,
        counted the same way): raise ``SoftTimeLimitExceeded`` in the task then;
        ``on_output(stream, text)``: each piece of output as it arrives (default: written
        to this thread's ``sys.stdout``/``sys.stderr``, where nbqueue's capture takes it);
        ``on_progress(done, total, note)``: each ``report_progress`` of the task (at most
        every ``taskprogress.SEND_EVERY`` s).
        Raises ``SerializationError`` (arguments that cannot be pickled) or ``NbqueueError``
        (a closed pool); anything the task does is in the outcome.
        """
        if self.closed:
            raise NbqueueError("the process pool is closed")
        name = name or getattr(target, "__name__", "task")
        try:
            shipped = (
                target
                if isinstance(target, shipping.Shipped)
                else getattr(target, "nbqueue_shipped", None) or shipping.pack(target)
            )
        except Exception as exc:
            from .errors import SerializationError

            culprit = shipping.unpicklable(target)
            what = f"it {culprit}, which" if culprit else "it, or something it reads,"
            raise SerializationError(
                f"task {name!r} cannot be sent to a child process: {what} cannot be pickled "
                f"({type(exc).__name__}: {exc}); run it on a thread pool"
            ) from exc
        payload = _pack_arguments(name, args, kwargs or {})
        child = self._idle.get()
        try:
            return child.run(shipped, payload, task_id, name, time_limit, soft_time_limit,
                             _write_here if on_output is None else on_output, on_progress)
        finally:
            self._idle.put(child)
            self._reap()

    def call(self, target, args=(), kwargs=None, **options) -> Any:
        """``run(...).unwrap()``: the value, or the exception (see ``ChildOutcome.unwrap``)."""
        return self.run(target, args, kwargs, **options).unwrap()

    def _running(self, task_id: str) -> _Child | None:
        return next((c for c in self.children if c.task_id == task_id), None)

    def stop(self, task_id: str, reason: str = "stopped", grace: float | None = None) -> bool:
        """Stop the child running ``task_id`` (SIGTERM, SIGKILL after ``grace``); its
        ``run`` returns ``exit="stopped"`` with ``reason``. False if no child runs it."""
        child = self._running(task_id)
        if child is None:
            return False
        child.terminate(reason, self.kill_grace if grace is None else grace)
        return True

    def stop_running(self, reason: str, grace: float | None = None) -> int:
        """Stop every child that is running a task, starting no successors (the worker is
        stopping); returns how many."""
        self.draining = True
        stopped = 0
        for child in self.children:
            if child.task_id is not None:
                child.terminate(reason, self.kill_grace if grace is None else grace)
                stopped += 1
        return stopped

    def soft_limit(self, task_id: str) -> bool:
        """Raise ``SoftTimeLimitExceeded`` in the task now (SIGUSR1 to its child's main thread)."""
        child = self._running(task_id)
        return bool(child is not None and child.soft_limit())

    def note_death(self, task_id: str) -> int:
        """Count a child death caused by ``task_id`` in this pool; returns the count so far."""
        with self._lock:
            n = self._deaths.pop(task_id, 0) + 1
            self._deaths[task_id] = n
            while len(self._deaths) > 10_000:
                self._deaths.popitem(last=False)
        return n

    def forget_deaths(self, task_id: str) -> None:
        with self._lock:
            self._deaths.pop(task_id, None)

    def _reap_later(self, proc) -> None:
        with self._lock:
            self._retiring.append((proc, time.monotonic()))

    def _reap(self) -> None:
        """Join children that exited; kill retired ones that did not exit within a few seconds."""
        with self._lock:
            retiring, self._retiring = self._retiring, []
        keep = []
        for proc, since in retiring:
            if proc.exitcode is not None:
                proc.join(0)
                continue
            if time.monotonic() - since > self.kill_grace:
                proc.kill()
            keep.append((proc, since))
        if keep:
            with self._lock:
                self._retiring.extend(keep)

    def close(self, grace: float = 5.0) -> None:
        """Stop the children: idle ones exit at once; a running one is stopped (SIGTERM, then
        SIGKILL). Stop the worker's threads first to let running tasks finish."""
        self.closed = True
        for child in self.children:
            try:
                child.close(grace)
            except Exception:
                log.warning("process pool: closing child %d failed", child.index, exc_info=True)
        with self._lock:
            retiring, self._retiring = self._retiring, []
        for proc, _ in retiring:
            proc.join(grace)
            if proc.exitcode is None:
                proc.kill()
                proc.join(5)

    def __repr__(self) -> str:
        return f"<ProcessPool size={self.size} pids={self.pids()}>"


def _write_here(stream: str, text: str) -> None:
    """Write a child's output to this thread's stream (nbqueue's capture routes it to the task)."""
    getattr(sys, stream, sys.stdout).write(text)


def _pack_arguments(name: str, args, kwargs: dict) -> bytes:
    try:
        return pickle.dumps((tuple(args), kwargs), protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:
        import cloudpickle

        from .errors import SerializationError

        try:
            return cloudpickle.dumps((tuple(args), kwargs), protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:
            raise SerializationError(
                f"the arguments of task {name!r} cannot be sent to a child process: {exc}"
            ) from exc


@atexit.register
def _close_pools() -> None:
    """At interpreter exit (a kernel shutting down): no child outlives this process."""
    for pool in list(_pools):
        try:
            pool.close(grace=1.0)
        except Exception:
            pass


__all__ = ["ProcessPool", "ChildOutcome", "ChildLost", "KILL_GRACE"]
