"""The embedded SQLite store shared by the SQLite broker and backend.

WAL mode, ``synchronous=NORMAL``, a busy timeout, one connection per thread, and
writes in ``BEGIN IMMEDIATE`` transactions retried while the file is busy, so that
many threads and processes on one machine can share the file and no
"database is locked" reaches a user. Schemas are created with sqlite-utils.
"""
from __future__ import annotations

import contextlib
import logging
import os
import random
import sqlite3
import threading
import time
from urllib.parse import urlsplit

import sqlite_utils

from .errors import ConfigurationError

log = logging.getLogger(__name__)

DEFAULT_PATH = os.path.join(".nbqueue", "nbqueue.db")


def path_from_url(url: str | None) -> str:
    """``sqlite:///rel/path.db`` (relative), ``sqlite:////abs/path.db``; empty means the default file."""
    if not url:
        return os.path.abspath(DEFAULT_PATH)
    parts = urlsplit(url)
    if parts.scheme != "sqlite":
        raise ConfigurationError(f"not an sqlite:// URL: {url!r}")
    if parts.netloc:
        raise ConfigurationError(f"sqlite URLs have no host: write sqlite:///relative.db or sqlite:////absolute.db, not {url!r}")
    path = parts.path[1:] if parts.path.startswith("/") else parts.path
    if not path:
        return os.path.abspath(DEFAULT_PATH)
    if path == ":memory:":
        raise ConfigurationError("sqlite:///:memory: cannot be shared between threads; use memory:// for an in-process store")
    return os.path.abspath(path)


class SQLiteStore:
    """Per-thread connections to one database file, plus a write helper.

    One store per file and process (``SQLiteStore.shared(path)``), so the broker and
    the backend on the same file share connections and can write in one transaction:
    ``write()`` inside ``write()`` joins the outer transaction.
    """

    _schemas_done: set = set()
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
        directory = os.path.dirname(path)
        if directory:
            os.makedirs(directory, exist_ok=True)
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

    def _connect(self) -> sqlite3.Connection:
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
                    self._conn = self._connect()
        return self._conn

    def _after_fork(self) -> None:
        """In a forked child: fresh locks and connections (a connection must not cross a fork;
        the parent's are kept referenced, not closed, so the child never touches them)."""
        _ABANDONED.extend(c for c in (self._conn, self._checkpointer) if c is not None)
        self._lock = threading.RLock()
        self._checkpoint_lock = threading.Lock()
        self._depth = 0
        self._after_commit, self._after_rollback = [], []
        self._conn = self._checkpointer = None

    def ensure_schema(self, key: str, create) -> None:
        """Run ``create(sqlite_utils.Database)`` once per process and file."""
        marker = (self.path, key)
        if marker in SQLiteStore._schemas_done:
            return
        with SQLiteStore._schema_lock:
            if marker in SQLiteStore._schemas_done:
                return
            with self._lock:
                db = sqlite_utils.Database(self.conn)
                self._retry_locked(lambda: create(db))
            SQLiteStore._schemas_done.add(marker)

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

    def execute(self, sql: str, params=()) -> "Done":
        """One writing statement; atomic on its own (autocommit) unless inside write()."""
        with self._lock:
            conn = self.conn
            if self._depth:
                return Done(conn.execute(sql, params))
            return self._retry_locked(lambda: Done(conn.execute(sql, params)))

    def in_transaction(self) -> bool:
        """True when this thread is inside ``write()``."""
        return bool(self._depth) and self._lock._is_owned()

    def on_commit(self, fn) -> None:
        """Run fn after the current transaction commits (at once outside one)."""
        if self._depth and self._lock._is_owned():
            self._after_commit.append(fn)
        else:
            fn()

    def on_rollback(self, fn) -> None:
        """Run fn if the current transaction rolls back (never outside one)."""
        if self._depth and self._lock._is_owned():
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
            return self._retry_locked(lambda: self.conn.execute(sql, params).fetchall())

    def close(self) -> None:
        with self._lock, self._checkpoint_lock:
            for conn in (self._conn, self._checkpointer):
                if conn is not None:
                    with contextlib.suppress(Exception):
                        conn.close()
            self._conn = self._checkpointer = None


_ABANDONED: list = []


def _reset_after_fork() -> None:
    SQLiteStore._schema_lock = threading.Lock()
    for store in list(SQLiteStore._shared.values()):
        store._after_fork()


os.register_at_fork(after_in_child=_reset_after_fork)


class _Transaction:
    """The context manager behind ``SQLiteStore.write()`` (a class: it runs several times per task)."""

    __slots__ = ("store",)

    def __init__(self, store: SQLiteStore):
        self.store = store

    def __enter__(self) -> sqlite3.Connection:
        store = self.store
        store._lock.acquire()
        try:
            conn = store.conn
            if store._depth:            # only the lock's holder can be in one: ours, so join it
                store._depth += 1
                return conn
            store._retry_locked(lambda: conn.execute("BEGIN IMMEDIATE"))
        except BaseException:
            store._lock.release()
            raise
        store._depth = 1
        store._after_commit, store._after_rollback = [], []
        return conn

    def __exit__(self, exc_type, exc, tb) -> bool:
        store = self.store
        callbacks: list = []
        try:
            store._depth -= 1
            if store._depth:
                return False
            conn = store._conn
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
