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
    """Per-thread connections to one database file, plus a write helper."""

    _schemas_done: set = set()
    _schema_lock = threading.Lock()

    def __init__(self, path: str, busy_timeout: float = 30.0):
        self.path = path
        self.busy_timeout = busy_timeout
        directory = os.path.dirname(path)
        if directory:
            os.makedirs(directory, exist_ok=True)
        self._local = threading.local()
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
        """``with store.write() as conn:`` — one BEGIN IMMEDIATE transaction, retried while busy."""
        conn = self.conn
        self._retry_locked(lambda: conn.execute("BEGIN IMMEDIATE"))
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        else:
            self._retry_locked(lambda: conn.execute("COMMIT"))

    def read(self, sql: str, params=()) -> list[tuple]:
        return self._retry_locked(lambda: self.conn.execute(sql, params).fetchall())

    def close(self) -> None:
        with self._all_lock:
            conns, self._all = self._all, []
        for conn in conns:
            with contextlib.suppress(Exception):
                conn.close()
        self._local = threading.local()


def placeholders(n: int) -> str:
    return ",".join("?" * n)
