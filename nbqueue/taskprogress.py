"""Progress a task reports about itself: ``nbqueue.report_progress(done, total=None, note=None)``.

Inside a task (a worker thread, a child process of a process pool, a remote worker) the
call only notes the latest value: it costs no I/O. The worker's heartbeat thread writes
it to the task's record at most every ``WRITE_EVERY`` seconds (a few writes a second
however often the task reports), and once more when the task ends, so the last value
reported is the one stored. A child process sends its reports to its worker over the
pool's pipe (at most every ``SEND_EVERY`` s, the latest one kept). Outside a task the
call does nothing.

Stored in the record's ``meta`` (JSON) under ``"progress"``::

    {"done": 3, "total": 10, "note": "loss 0.210", "at": 1767225600.0}

beside ``"stopping"`` (``{"why": "cancel" | "time_limit", "state": "waiting" | "stopped"}``)
while a thread task has been asked to stop and has not returned yet. ``of(record)``
reads it back; live views draw a bar with the note, ``app.tasks()`` has the columns
``progress_done``, ``progress_total`` and ``progress_note``.
"""
from __future__ import annotations

import math
import threading
import time

from . import serialization

WRITE_EVERY = 0.25      # seconds: at most four writes a second per task
SEND_EVERY = 0.05       # seconds between reports a child process sends to its worker


class Progress:
    """The latest report of one task run and what of it is stored (thread-safe)."""

    def __init__(self) -> None:
        self.value: dict | None = None
        self.version = 0
        self.written = 0
        self.written_at = float("-inf")
        self.meta: dict | None = None     # the record's meta as read once, merged into on each write
        self.lock = threading.Lock()

    def set(self, done, total=None, note=None) -> None:
        value = checked(done, total, note)
        with self.lock:
            self.value = value
            self.version += 1


def checked(done, total=None, note=None) -> dict:
    """The report as stored; raises TypeError/ValueError naming the argument."""
    for name, x in (("done", done), ("total", total)):
        if x is None and name == "total":
            continue
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
            raise TypeError(f"report_progress: {name} must be a finite number, not {type(x).__name__} {x!r}")
    if total is not None and total < 0:
        raise ValueError(f"report_progress: total must be at least 0, not {total!r}")
    if note is not None and not isinstance(note, str):
        note = str(note)
    return {"done": done, "total": total, "note": note[:500] if note else note, "at": time.time()}


def report_progress(done, total=None, note=None) -> bool:
    """Report how far the running task has come: ``done`` of ``total`` (numbers; ``total``
    None when unknown) with an optional short ``note`` ("loss 0.210"). Cheap enough to call
    in a tight loop: it is stored a few times a second at most. Returns False outside a
    task (nothing is stored). Raises TypeError/ValueError for a value that is not a finite
    number."""
    from .context import current_task

    ctx = current_task()
    if ctx is None or not hasattr(ctx, "report_progress"):
        checked(done, total, note)
        return False
    ctx.report_progress(done, total, note)
    return True


def _merge(backend, task_id: str, progress: Progress, changes: dict) -> None:
    """Write ``changes`` into the record's meta (read once per task run)."""
    if progress.meta is None:
        record = backend.get(task_id) or {}
        try:
            progress.meta = serialization.loads(record["meta"]) if record.get("meta") else {}
        except Exception:
            progress.meta = {}
        if not isinstance(progress.meta, dict):
            progress.meta = {"value": progress.meta}
    progress.meta.update(changes)
    backend.update(task_id, meta=serialization.dumps(progress.meta))


def flush(backend, task_id: str, progress: Progress, now: float | None) -> bool:
    """Store the latest report if it is new and (unless ``now`` is None: the last write)
    ``WRITE_EVERY`` has passed since the last write; True when it wrote."""
    with progress.lock:
        if progress.version == progress.written or (now is not None and now - progress.written_at < WRITE_EVERY):
            return False
        value, version = progress.value, progress.version
    _merge(backend, task_id, progress, {"progress": value})
    progress.written, progress.written_at = version, time.monotonic()
    return True


def note_stopping(backend, task_id: str, progress: Progress, why: str, state: str) -> None:
    """Say on the record that the task was asked to stop (``state`` "waiting") or has stopped."""
    _merge(backend, task_id, progress, {"stopping": {"why": why, "state": state}})


def meta_of(record: dict | None) -> dict:
    if not record or not record.get("meta"):
        return {}
    try:
        meta = serialization.loads(record["meta"])
    except Exception:
        return {}
    return meta if isinstance(meta, dict) else {}


def of(record: dict | None) -> dict | None:
    """The progress stored on a record (``{"done", "total", "note", "at"}``), or None."""
    value = meta_of(record).get("progress")
    return value if isinstance(value, dict) else None


def stopping(record: dict | None) -> dict | None:
    """``{"why", "state"}`` while a thread task asked to stop has not returned, or after; else None."""
    value = meta_of(record).get("stopping")
    return value if isinstance(value, dict) else None


def fraction(value: dict | None) -> float | None:
    """done / total in [0, 1], or None without a total."""
    if not value or not value.get("total"):
        return None
    return max(0.0, min(1.0, float(value["done"]) / float(value["total"])))


def summed(records: list) -> dict | None:
    """Reports of many tasks added up: ``{"done", "total", "reporting"}`` over those that gave a
    total; a finished task that reported counts as complete. None when none reported."""
    from . import states

    done = total = 0.0
    reporting = 0
    for rec in records:
        value = of(rec)
        if not value or not value.get("total"):
            continue
        reporting += 1
        total += float(value["total"])
        full = rec.get("state") == states.SUCCESS
        done += float(value["total"]) if full else min(float(value["done"]), float(value["total"]))
    return {"done": done, "total": total, "reporting": reporting} if reporting else None
