"""Tasks for the tests that run ``nbqueue worker --app proc_tasks:app`` in subprocesses.

The App comes from the environment (NBQUEUE_BROKER, NBQUEUE_BACKEND,
NBQUEUE_DEFAULT_QUEUE, NBQUEUE_VISIBILITY_TIMEOUT). Side effects go to a separate
SQLite file named by NBQUEUE_TEST_SIDE_DB (or, for the many-task test, to one file per
process in NBQUEUE_TEST_SIDE_DIR), so a test counts executions where nbqueue never writes.
"""
from __future__ import annotations

import os
import sqlite3
import threading
import time

import nbqueue

app = nbqueue.App.from_env()

SIDE_SCHEMA = """
CREATE TABLE IF NOT EXISTS executed (task_id TEXT PRIMARY KEY, pid INTEGER);
CREATE TABLE IF NOT EXISTS attempts (seq INTEGER PRIMARY KEY AUTOINCREMENT, key TEXT, pid INTEGER);
"""


def side_db(path: str | None = None) -> sqlite3.Connection:
    conn = sqlite3.connect(path or os.environ["NBQUEUE_TEST_SIDE_DB"], timeout=60, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.executescript(SIDE_SCHEMA)
    return conn


_append_fd: list = []
_append_lock = threading.Lock()


@app.task(name="append_id")
def append_id(task_id):
    """Append this task's id to a file of this process's own (one write(2) per line)."""
    with _append_lock:
        if not _append_fd:
            path = os.path.join(os.environ["NBQUEUE_TEST_SIDE_DIR"], f"executed-{os.getpid()}.txt")
            _append_fd.append(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644))
    os.write(_append_fd[0], f"{task_id}\n".encode())
    return task_id


@app.task(name="add")
def add(x, y):
    return x + y


@app.task(name="nap")
def nap(seconds, key):
    """Note an attempt, sleep, then record completion under ``key`` (exactly once or it fails)."""
    conn = side_db()
    try:
        conn.execute("INSERT INTO attempts(key, pid) VALUES (?, ?)", (key, os.getpid()))
        time.sleep(seconds)
        conn.execute("INSERT INTO executed(task_id, pid) VALUES (?, ?)", (key, os.getpid()))
    finally:
        conn.close()
    return os.getpid()


@app.task(name="hang_first_attempt")
def hang_first_attempt(key):
    """The first attempt hangs (so the test can kill its worker); a later one completes once."""
    conn = side_db()
    try:
        conn.execute("INSERT INTO attempts(key, pid) VALUES (?, ?)", (key, os.getpid()))
        (n,) = conn.execute("SELECT COUNT(*) FROM attempts WHERE key = ?", (key,)).fetchone()
        if n == 1:
            time.sleep(600)
        conn.execute("INSERT INTO executed(task_id, pid) VALUES (?, ?)", (key, os.getpid()))
    finally:
        conn.close()
    return n


def note_attempt(key: str) -> None:
    conn = side_db()
    try:
        conn.execute("INSERT INTO attempts(key, pid) VALUES (?, ?)", (key, os.getpid()))
    finally:
        conn.close()


@app.task(name="die")
def die(key):
    """Note the attempt, then end the whole worker process at once, as a crash in C code would."""
    note_attempt(key)
    os._exit(1)


@app.task(name="note")
def note(key):
    """Note each execution under ``key`` and return it."""
    note_attempt(key)
    return key


@app.task(name="hold_gil")
def hold_gil(n, key):
    """Note the attempt, then hold the GIL in one C call (``sum(range(n))``) for as long as that takes."""
    note_attempt(key)
    return sum(range(n))


@app.task(name="spin")
def spin(path, steps, pause=0.05):
    """Append a line ``<pid> <i>`` to ``path`` per step and report progress; stop when
    cancelled (cooperative in a thread; in a child process a cancel stops the process)."""
    task = nbqueue.current_task()
    for i in range(steps):
        with open(path, "a") as fh:
            fh.write(f"{os.getpid()} {i}\n")
        nbqueue.report_progress(i + 1, steps, note=f"step {i + 1}")
        task.check_cancelled()
        time.sleep(pause)
    return steps
