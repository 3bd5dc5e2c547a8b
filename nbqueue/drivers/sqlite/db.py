"""The embedded SQLite store shared by the SQLite broker and backend.

WAL mode, ``synchronous=NORMAL``, a busy timeout, one connection per process and
file used by one thread at a time under the store's lock (a second one runs WAL
checkpoints), and writes in ``BEGIN IMMEDIATE`` transactions retried while the file is busy, so that
many threads and processes on one machine can share the file and no
"database is locked" reaches a user. Schemas are created with sqlite-utils.

The file at the path is the store: when it is deleted or replaced (``rm -rf .nbqueue``
in a notebook), the next write, or a read after at most ``RECHECK`` seconds, opens the
file now at the path (creating it and its tables), so no process keeps writing into a
file nobody else can see.

Forks: a child must not use its parent's connections, and SQLite keeps per-process
lock bookkeeping that a fork copies, so a child made while another thread of the parent
was inside a statement or transaction would find its own connections busy forever. A
fork therefore waits (at most ``FORK_WAIT`` seconds) until no thread of this process is
using a store; the child then opens connections of its own. A store that stayed busy
past that cannot be used in the child: it raises ConfigurationError saying to use the
'spawn' or 'forkserver' start method.
"""
from __future__ import annotations

import contextlib
import logging
import os
import random
import sqlite3
import threading
import time
from typing import Any, Callable, Hashable, Literal, Tuple, TypeVar, cast
from urllib.parse import urlsplit

import sqlite_utils

from ...errors import ConfigurationError
from ...options import url_query

log = logging.getLogger(__name__)

DEFAULT_PATH = os.path.join(".nbqueue", "nbqueue.db")
RECHECK = 0.5        # seconds between checks, on reads, that the file at the path is still the one open
T = TypeVar("T")
#: what runs after the works of a combined transaction (see SQLiteStore.combine): (key, arg, run)
Then = Tuple[Hashable, Any, Callable[[sqlite3.Connection, list], list]]
FORK_WAIT = 10.0     # seconds a fork waits for this process's threads to finish their statements
COMBINE_ROUNDS = 2   # times a combined transaction takes the work waiting (see SQLiteStore.combine)


def path_from_url(url: str | None) -> str:
    """``sqlite:///rel/path.db`` (relative), ``sqlite:////abs/path.db``; empty means the default file."""
    if not url:
        return os.path.abspath(DEFAULT_PATH)
    parts = urlsplit(url)
    if parts.scheme != "sqlite":
        raise ConfigurationError(f"not an sqlite:// URL: {url!r}")
    url_query(url, (), hint="; an sqlite:// URL is the file's path alone")
    if parts.netloc:
        raise ConfigurationError(
            f"sqlite URLs have no host: write sqlite:///relative.db or sqlite:////absolute.db, not {url!r}"
        )
    path = parts.path[1:] if parts.path.startswith("/") else parts.path
    if not path:
        return os.path.abspath(DEFAULT_PATH)
    if path == ":memory:":
        raise ConfigurationError(
            "sqlite:///:memory: cannot be shared between threads; use memory:// for an in-process store"
        )
    return os.path.abspath(path)


class SQLiteStore:
    """One connection to one database file, shared by the process's threads one at a time
    under a re-entrant lock held for a whole transaction, plus a write helper.

    One store per file and process (``SQLiteStore.shared(path)``), so the broker and
    the backend on the same file share connections and can write in one transaction:
    ``write()`` inside ``write()`` joins the outer transaction.
    """

    _schema_lock = threading.Lock()
    _shared: dict = {}

    @classmethod
    def shared(cls, path: str) -> "SQLiteStore":
        with cls._schema_lock:
            store = cls._shared.get(path)
            if store is None:
                store = cls._shared[path] = cls(path)
            return store

    def __init__(self, path: str, busy_timeout: float = 30.0):
        self.path = path
        self.busy_timeout = busy_timeout
        # One connection per process and file, used by one thread at a time: SQLite drops
        # a connection's page cache whenever another connection has written, so with a
        # connection per thread every statement after another thread's commit re-read its
        # pages (measured: a primary-key read ~0.1 ms instead of ~0.01 ms). Writes are
        # serialized anyway; the lock is held for a whole transaction, so a thread never
        # sees another's uncommitted writes. Other processes meet the busy timeout.
        self._lock = threading.RLock()
        self._depth = 0                     # write() nesting of the lock's holder
        self._after_commit: list = []
        self._after_rollback: list = []
        self._conn: sqlite3.Connection | None = None
        self._checkpointer: sqlite3.Connection | None = None
        self._checkpoint_lock = threading.Lock()
        self._schemas: dict = {}             # key -> create(db), run again when the file is opened afresh
        self._ident: tuple | None = None     # (st_dev, st_ino) of the file the connection has open
        self._checked = 0.0                  # when a read last checked that identity
        self._unusable: str | None = None    # why this forked child cannot use the store (see _after_fork)
        self._fork_held = (False, False)     # the locks a fork in progress holds (see _before_fork)
        self._jobs: list[_Job] = []          # work of threads waiting for the lock (see combine)
        self._jobs_lock = threading.Lock()

    def _connect(self) -> sqlite3.Connection:
        if self._unusable:
            raise ConfigurationError(self._unusable)
        directory = os.path.dirname(self.path)
        if directory:
            os.makedirs(directory, exist_ok=True)
        conn = sqlite3.connect(self.path, timeout=self.busy_timeout, isolation_level=None, check_same_thread=False)
        conn.execute(f"PRAGMA busy_timeout={int(self.busy_timeout * 1000)}")
        self._retry_locked(lambda: conn.execute("PRAGMA journal_mode=WAL"))
        conn.execute("PRAGMA synchronous=NORMAL")
        # a checkpoint syncs the file: keep it off the committing thread's path (workers
        # run passive checkpoints from their heartbeat); this bounds the WAL regardless
        conn.execute("PRAGMA wal_autocheckpoint=10000")
        return conn

    @property
    def conn(self) -> sqlite3.Connection:
        """The process's connection; use it only while holding the store's lock (inside ``write()``)."""
        if self._conn is None:
            with self._lock:
                if self._conn is None:
                    conn = self._connect()
                    self._ident = self._file_ident()
                    self._conn = conn
        return self._conn

    def _file_ident(self) -> tuple | None:
        """(st_dev, st_ino) of the file at the path; None when there is none."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        except OSError:                  # cannot tell (permissions): take it as unchanged
            return self._ident
        return (st.st_dev, st.st_ino)

    def _check_file(self) -> None:
        """Holding the lock, outside a transaction: if the file at the path is no longer the
        one the connection has open (deleted, or replaced), open the one now there."""
        if self._conn is None:
            return
        ident = self._file_ident()
        self._checked = time.monotonic()
        if ident is not None and ident == self._ident:
            return
        log.warning("nbqueue: the SQLite file %s was %s; opening it afresh (what the old file held is gone)",
                    self.path, "deleted" if ident is None else "replaced")
        old, self._conn = self._conn, None
        with contextlib.suppress(Exception):
            old.close()
        with self._checkpoint_lock:
            if self._checkpointer is not None:
                with contextlib.suppress(Exception):
                    self._checkpointer.close()
                self._checkpointer = None
        db = sqlite_utils.Database(self.conn)
        for create in self._schemas.values():
            self._retry_locked(lambda: create(db))

    def _before_fork(self) -> None:
        """In the forking thread: wait until no other thread uses the store (see the module docstring)."""
        held = self._lock.acquire(timeout=FORK_WAIT)
        if held and self._depth:                 # the forking thread itself is inside a transaction
            self._fork_held = (True, False)
            return
        self._fork_held = (held, held and self._checkpoint_lock.acquire(timeout=FORK_WAIT))

    def _after_fork_in_parent(self) -> None:
        held, checkpoint = self._fork_held
        self._fork_held = (False, False)
        if checkpoint:
            self._checkpoint_lock.release()
        if held:
            self._lock.release()

    def _after_fork(self) -> None:
        """In a forked child: fresh locks and connections (a connection must not cross a fork;
        the parent's are kept referenced, not closed, so the child never touches them). If
        the fork could not wait for the parent's threads to leave the store, the child's
        SQLite bookkeeping may show locks that nobody will release: refuse to use it."""
        held, checkpoint = self._fork_held
        self._fork_held = (False, False)
        _ABANDONED.extend(c for c in (self._conn, self._checkpointer) if c is not None)
        if not (held and checkpoint) and (self._conn is not None or self._checkpointer is not None):
            self._unusable = (
                f"this process was forked while another thread of its parent was using the SQLite file {self.path}, "
                "so SQLite cannot be used safely here: start child processes with multiprocessing's 'spawn' or "
                "'forkserver' method (multiprocessing.get_context('spawn')), or fork while no task is being sent or run"
            )
        self._lock = threading.RLock()
        self._checkpoint_lock = threading.Lock()
        self._jobs, self._jobs_lock = [], threading.Lock()
        self._depth = 0
        self._after_commit, self._after_rollback = [], []
        self._conn = self._checkpointer = None

    def ensure_schema(self, key: str, create) -> None:
        """Run ``create(sqlite_utils.Database)`` once per process and file (again whenever the
        file is opened afresh, see ``_check_file``)."""
        with self._lock:
            self._check_file()
            if key in self._schemas:
                return
            db = sqlite_utils.Database(self.conn)
            self._retry_locked(lambda: create(db))
            self._schemas[key] = create

    def _retry_locked(self, fn):
        delay = 0.005
        deadline = time.monotonic() + max(self.busy_timeout, 1.0) * 4
        while True:
            try:
                return fn()
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) and "busy" not in str(exc):
                    raise
                if time.monotonic() > deadline:
                    raise
                time.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, 0.2)

    def write(self) -> "_Transaction":
        """``with store.write() as conn:`` — one BEGIN IMMEDIATE transaction, retried while busy.

        Nested calls in the same thread join the outer transaction.
        """
        return _Transaction(self)

    def combine(self, work: Callable[[sqlite3.Connection], T], then: "Then | None" = None) -> tuple[T, Any]:
        """``(work(conn), None)`` in a write transaction, as ``with write() as conn:``, but
        committed together with the work of other threads of this process that wait for the
        store meanwhile: the thread that gets the lock runs every waiting ``work`` in its
        transaction (each in a savepoint of its own, so one that raises is undone alone and its
        exception raised in its own thread), and one commit covers them all. A thread inside a
        transaction already runs ``work`` in it. ``work`` must not depend on the thread it runs
        in; its ``on_commit``/``on_rollback`` callbacks run in the thread that commits.

        ``then``: ``(key, arg, run)``; once every ``work`` of the transaction has run, the
        ``then`` of those that did not raise run together, one call per key:
        ``run(conn, [arg, ...])`` returns a list as long, whose item for this call is the second
        of the pair returned (an exception it raises fails every work of the transaction)."""
        if self._depth and self._lock._is_owned():  # type: ignore[attr-defined]
            return self._alone(work, then)
        job = _Job(work, then)
        if self._lock.acquire(blocking=False):
            try:
                if not self._jobs:          # nobody waits: a transaction of its own
                    return self._alone(work, then)
                with self._jobs_lock:
                    self._jobs.append(job)
                self._run_jobs()
            finally:
                self._lock.release()
        else:
            with self._jobs_lock:
                self._jobs.append(job)
            with self._lock:
                if not job.done:
                    self._run_jobs()
        if job.error is not None:
            raise job.error
        return job.result, job.then_result

    def _alone(self, work: Callable[[sqlite3.Connection], T], then: "Then | None") -> tuple[T, Any]:
        """``combine`` of one work in a transaction of its own, or in the caller's."""
        with self.write() as conn:
            result = work(conn)
            return result, (then[2](conn, [then[1]])[0] if then is not None else None)

    @staticmethod
    def _run_thens(conn: sqlite3.Connection, jobs: "list[_Job]") -> None:
        """The ``then`` of ``jobs`` whose work succeeded, one ``run`` per key (see ``combine``)."""
        groups: dict = {}
        for job in jobs:
            if job.then is not None and job.error is None:
                groups.setdefault(job.then[0], []).append(job)
        for group in groups.values():
            results = group[0].then[2](conn, [job.then[1] for job in group])
            for job, result in zip(group, results):
                job.then_result = result

    def _run_jobs(self) -> None:
        """Holding the lock, outside a transaction: the waiting jobs (``combine``) in one
        transaction; those that came while they ran too, ``COMBINE_ROUNDS`` times at most (the
        file stays locked for other processes meanwhile). A job alone runs without a savepoint."""
        taken: list[_Job] = []
        try:
            with self.write() as conn:
                for _ in range(COMBINE_ROUNDS):
                    with self._jobs_lock:
                        jobs, self._jobs = self._jobs, []
                    if not jobs:
                        break
                    taken += jobs
                    if len(taken) == 1:         # alone so far: it needs no savepoint (it fails the transaction)
                        taken[0].result = taken[0].work(conn)
                        continue
                    for job in jobs:
                        self._run_job(conn, job)
                self._run_thens(conn, taken)
        except BaseException as exc:     # the commit failed, or a job alone in the transaction raised
            for job in taken:
                if job.error is None:
                    job.error = exc
            if not isinstance(exc, Exception):
                raise
        finally:
            for job in taken:
                job.done = True

    def _run_job(self, conn: sqlite3.Connection, job: "_Job") -> None:
        """One job of ``_run_jobs`` in a savepoint: undone alone (its rollback callbacks run at
        once) when it raises an Exception, which its own thread then raises."""
        commits, rollbacks = self._after_commit, self._after_rollback
        self._after_commit, self._after_rollback = [], []
        conn.execute("SAVEPOINT nbq_job")
        try:
            job.result = job.work(conn)
        except Exception as exc:
            job.error = exc
            undo = self._after_rollback
            self._after_commit, self._after_rollback = commits, rollbacks
            try:
                conn.execute("ROLLBACK TO nbq_job")
                conn.execute("RELEASE nbq_job")
            finally:        # (an error that rolled the whole transaction back fails every job: see _run_jobs)
                _run_all(undo)
            return
        except BaseException:
            commits.extend(self._after_commit)
            rollbacks.extend(self._after_rollback)
            self._after_commit, self._after_rollback = commits, rollbacks
            raise
        conn.execute("RELEASE nbq_job")
        commits.extend(self._after_commit)
        rollbacks.extend(self._after_rollback)
        self._after_commit, self._after_rollback = commits, rollbacks

    def execute(self, sql: str, params=()) -> "Done":
        """One writing statement; atomic on its own (autocommit) unless inside write()."""
        with self._lock:
            if self._depth:
                return Done(self.conn.execute(sql, params))
            self._check_file()
            conn = self.conn
            return self._retry_locked(lambda: Done(conn.execute(sql, params)))

    def in_transaction(self) -> bool:
        """True when this thread is inside ``write()``."""
        return bool(self._depth) and self._lock._is_owned()  # type: ignore[attr-defined]

    def on_commit(self, fn) -> None:
        """Run fn after the current transaction commits (at once outside one)."""
        if self._depth and self._lock._is_owned():  # type: ignore[attr-defined]
            self._after_commit.append(fn)
        else:
            fn()

    def on_rollback(self, fn) -> None:
        """Run fn if the current transaction rolls back (never outside one)."""
        if self._depth and self._lock._is_owned():  # type: ignore[attr-defined]
            self._after_rollback.append(fn)

    def checkpoint(self) -> None:
        """Copy the WAL back into the database without blocking readers or writers
        (on a connection of its own, so the process's connection stays free)."""
        with self._checkpoint_lock:
            if self._checkpointer is None:
                self._checkpointer = self._connect()
            self._checkpointer.execute("PRAGMA wal_checkpoint(PASSIVE)")

    def read(self, sql: str, params=()) -> list[tuple]:
        with self._lock:
            if not self._depth and time.monotonic() - self._checked > RECHECK:
                self._check_file()
            return self._retry_locked(lambda: self.conn.execute(sql, params).fetchall())

    def close(self) -> None:
        with self._lock, self._checkpoint_lock:
            for conn in (self._conn, self._checkpointer):
                if conn is not None:
                    with contextlib.suppress(Exception):
                        conn.close()
            self._conn = self._checkpointer = None


_ABANDONED: list = []
_FORKING: list = []              # the stores whose locks the fork in progress holds
_FORK_LOCK = threading.Lock()    # one fork at a time through these hooks


def _before_fork() -> None:
    _FORK_LOCK.acquire()
    with SQLiteStore._schema_lock:
        _FORKING[:] = list(SQLiteStore._shared.values())
    for store in _FORKING:
        store._before_fork()


def _after_fork_in_parent() -> None:
    for store in reversed(_FORKING):
        store._after_fork_in_parent()
    _FORKING.clear()
    _FORK_LOCK.release()


def _reset_after_fork() -> None:
    global _FORK_LOCK
    SQLiteStore._schema_lock = threading.Lock()
    for store in list(SQLiteStore._shared.values()):
        store._after_fork()
    _FORKING.clear()
    _FORK_LOCK = threading.Lock()


os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent, after_in_child=_reset_after_fork)


class _Transaction:
    """The context manager behind ``SQLiteStore.write()`` (a class: it runs several times per task)."""

    __slots__ = ("store",)

    def __init__(self, store: SQLiteStore):
        self.store = store

    def __enter__(self) -> sqlite3.Connection:
        store = self.store
        store._lock.acquire()
        try:
            if store._depth:            # only the lock's holder can be in one: ours, so join it
                store._depth += 1
                return store.conn
            store._check_file()
            conn = store.conn
            store._retry_locked(lambda: conn.execute("BEGIN IMMEDIATE"))
        except BaseException:
            store._lock.release()
            raise
        store._depth = 1
        store._after_commit, store._after_rollback = [], []
        return conn

    def __exit__(self, exc_type, exc, tb) -> Literal[False]:
        store = self.store
        callbacks: list = []
        try:
            store._depth -= 1
            if store._depth:
                return False
            conn = cast(sqlite3.Connection, store._conn)     # opened by __enter__
            if exc_type is not None:
                self._roll_back(conn)
                return False
            try:
                store._retry_locked(lambda: conn.execute("COMMIT"))
            except BaseException:
                self._roll_back(conn)
                raise
            callbacks = store._after_commit
        finally:
            if not store._depth:
                store._after_commit, store._after_rollback = [], []
            store._lock.release()
        _run_all(callbacks)
        return False

    def _roll_back(self, conn) -> None:
        store = self.store
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        undo, store._after_rollback = store._after_rollback, []
        store._after_commit = []
        _run_all(undo)


def _run_all(callbacks: list) -> None:
    """Run every callback, even when one raises (each may be what another thread waits for)."""
    for fn in callbacks:
        try:
            fn()
        except Exception:
            log.exception("a transaction callback failed")


class _Job:
    """A thread's work for ``SQLiteStore.combine`` and what became of it."""

    __slots__ = ("work", "then", "done", "result", "then_result", "error")

    def __init__(self, work, then: "Then | None" = None) -> None:
        self.work = work
        self.then = then
        self.done = False
        self.result: Any = None
        self.then_result: Any = None
        self.error: BaseException | None = None


class Done:
    """A statement run to completion (rows fetched), so no lock outlives the call."""

    __slots__ = ("rows", "rowcount")

    def __init__(self, cursor: sqlite3.Cursor):
        self.rows = cursor.fetchall()
        self.rowcount = cursor.rowcount

    def fetchone(self):
        return self.rows[0] if self.rows else None

    def fetchall(self):
        return self.rows


def placeholders(n: int) -> str:
    return ",".join("?" * n)
