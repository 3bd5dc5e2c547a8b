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
from typing import Iterator
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
        self._local = threading.local()
        # threads of this process queue here for the write lock instead of sleeping in
        # SQLite's busy handler; other processes still meet the busy timeout
        self._write_lock = threading.RLock()
        self._all: list[sqlite3.Connection] = []
        self._all_lock = threading.Lock()

    @property
    def conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=self.busy_timeout, isolation_level=None, check_same_thread=False)
            conn.execute(f"PRAGMA busy_timeout={int(self.busy_timeout * 1000)}")
            self._retry_locked(lambda: conn.execute("PRAGMA journal_mode=WAL"))
            conn.execute("PRAGMA synchronous=NORMAL")
            # a checkpoint syncs the file: keep it off the committing thread's path (workers
            # run passive checkpoints from their heartbeat); this bounds the WAL regardless
            conn.execute("PRAGMA wal_autocheckpoint=10000")
            self._local.conn = conn
            with self._all_lock:
                self._all.append(conn)
        return conn

    def ensure_schema(self, key: str, create) -> None:
        """Run ``create(sqlite_utils.Database)`` once per process and file."""
        marker = (self.path, key)
        if marker in SQLiteStore._schemas_done:
            return
        with SQLiteStore._schema_lock:
            if marker in SQLiteStore._schemas_done:
                return
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

    @contextlib.contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """``with store.write() as conn:`` — one BEGIN IMMEDIATE transaction, retried while busy.

        Nested calls in the same thread join the outer transaction.
        """
        conn = self.conn
        if conn.in_transaction:
            yield conn
            return
        with self._write_lock:
            self._retry_locked(lambda: conn.execute("BEGIN IMMEDIATE"))
            self._local.after_commit = []
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                self._local.after_commit = []
                raise
            else:
                self._retry_locked(lambda: conn.execute("COMMIT"))
        callbacks, self._local.after_commit = self._local.after_commit, []
        for fn in callbacks:
            fn()

    def execute(self, sql: str, params=()) -> sqlite3.Cursor:
        """One writing statement; atomic on its own (autocommit) unless inside write()."""
        conn = self.conn
        if conn.in_transaction:
            return Done(conn.execute(sql, params))
        with self._write_lock:
            return self._retry_locked(lambda: Done(conn.execute(sql, params)))

    def on_commit(self, fn) -> None:
        """Run fn after the current transaction commits (at once outside one)."""
        if self.conn.in_transaction:
            self._local.after_commit.append(fn)
        else:
            fn()

    def checkpoint(self) -> None:
        """Copy the WAL back into the database without blocking readers or writers."""
        self.conn.execute("PRAGMA wal_checkpoint(PASSIVE)")

    def read(self, sql: str, params=()) -> list[tuple]:
        return self._retry_locked(lambda: self.conn.execute(sql, params).fetchall())

    def close(self) -> None:
        with self._all_lock:
            conns, self._all = self._all, []
        for conn in conns:
            with contextlib.suppress(Exception):
                conn.close()
        self._local = threading.local()


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
