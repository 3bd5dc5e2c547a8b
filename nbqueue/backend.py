"""The ResultBackend protocol: task records, group bookkeeping and waiting.

A record is a dict with the fields in ``FIELDS``; ``args``, ``kwargs``, ``result``
and ``meta`` hold JSON text (type-tagged, see serialization.py). The public methods
are written once here where they can be; stores implement the ``_``-prefixed parts.

Fencing: ``begin(id)`` moves a record to STARTED and returns a new token (the number
of attempts begun); ``store_result(..., token=t)`` and fenced ``set_state`` succeed
only while the record's token is still ``t`` and the record is not final, so a stale
attempt can never overwrite a newer one, and a final result is written exactly once.
"""
from __future__ import annotations

import builtins
import threading
import time
from typing import Iterable, Sequence

from . import states
from .errors import ResultNotFound
from .options import seconds
from .wakeups import WAKEUPS

FIELDS = (
    "id", "name", "state", "args", "kwargs", "result", "error", "exc_type", "traceback",
    "retries", "queue", "worker", "token", "group_id", "parent_id", "created_at",
    "started_at", "finished_at", "expires_at", "output", "meta",
)

COUNT_KEYS = ("pending", "running", "retrying", "succeeded", "failed", "revoked")
_STATE_TO_COUNT = {
    states.PENDING: "pending", states.RECEIVED: "running", states.STARTED: "running",
    states.RETRY: "retrying", states.SUCCESS: "succeeded", states.FAILURE: "failed",
    states.REVOKED: "revoked",
}


def counts_from_states(pairs: Iterable[tuple[str | None, int]], total: int) -> dict:
    """Turn (state, count) pairs into the progress dict; missing records count as pending."""
    counts = dict.fromkeys(COUNT_KEYS, 0)
    seen = 0
    for state, n in pairs:
        if state is None:
            continue
        counts[_STATE_TO_COUNT.get(state, "pending")] += n
        seen += n
    counts["pending"] += max(0, total - seen)
    counts["total"] = total
    counts["done"] = counts["succeeded"] + counts["failed"] + counts["revoked"]
    return counts


#: fields a text search looks in (their JSON text: arguments as sent, errors as recorded)
SEARCHED = ("args", "kwargs", "error", "exc_type", "traceback")
GROUP_TASK = "nbqueue.group"


def _one_of(value, wanted) -> bool:
    if wanted is None:
        return True
    if isinstance(wanted, (list, tuple, set, frozenset)):
        return value in wanted
    return value == wanted


def matches(record: dict, *, state=None, name=None, queue=None, since: float | None = None, until: float | None = None,
            text: str | None = None) -> bool:
    """Whether a record passes the listing filters: ``state``, ``name`` and ``queue`` equal
    (or one of, given a list), ``since <= created_at < until`` (Unix seconds), ``text`` a
    case-insensitive substring of one of the ``SEARCHED`` fields. Group records only when
    ``name`` names them."""
    if record.get("name") == GROUP_TASK and not _one_of(GROUP_TASK, name if name is not None else ()):
        return False
    if not (
        _one_of(record.get("state"), state)
        and _one_of(record.get("name"), name)
        and _one_of(record.get("queue"), queue)
    ):
        return False
    created = record.get("created_at") or 0.0
    if since is not None and created < since or until is not None and created >= until:
        return False
    if text:
        needle = text.lower()
        return any(needle in (record.get(f) or "").lower() for f in SEARCHED)
    return True


class ResultBackend:
    scheme = ""
    #: records (and expired claim markers) one sweep of upkeep() removes at most
    EXPIRE_BATCH = 1000
    #: seconds between sweeps while the last one found less than a batch
    EXPIRE_EVERY = 30.0
    #: what list() without ids sees: "all" live records, the "recent" ones (a bounded index),
    #: or "none" (it raises UnsupportedOperation; list(ids=...) still works)
    lists_tasks = "all"
    #: errors of the store itself (unreachable, locked) beside ConnectionError and TimeoutError
    store_errors: tuple[type[BaseException], ...] = ()
    #: a wait's first step also reads the record in the same round trip (``_block_then_get``
    #: returns at once for a final task): a waiter need not read before it waits
    reads_as_it_waits = False

    def __init__(self, url: str, *, clock=None, options: dict | None = None):
        from .clock import SYSTEM

        self.url = url
        self.clock = clock or SYSTEM
        self.options = dict(options or {})
        # seconds to keep a finished result; None (not given, or 0, as in machinery) keeps it
        self.results_expire_in: float | None = seconds("results_expire_in", self.options.get("results_expire_in"),
                                                       None) or None
        # the longest wait between two reads of a wait(): seconds, more than 0 (where not given, each
        # store sets its default)
        interval = seconds("poll_interval", self.options.pop("poll_interval", None), None, positive=True)
        if interval is not None:
            self.options["poll_interval"] = interval
        self._next_sweep = 0.0          # time.monotonic() of the next upkeep() sweep

    # -- records -----------------------------------------------------------------
    def create(self, records: Sequence[dict]) -> None:
        """Record sent tasks as PENDING; an existing record is left as it is."""
        raise NotImplementedError

    #: ``fill`` is implemented: records can be written after their messages were published
    fills_records = False

    def fill(self, records: Sequence[dict]) -> None:
        """``create`` for tasks whose messages are published already: a record a worker made
        meanwhile (``begin`` of an absent record) keeps its state, token and results and gains
        the fields it lacks (args, kwargs, group, parent, meta; the earlier ``created_at``)."""
        raise NotImplementedError

    def begin(self, task_id: str, *, worker: str = "", fields: dict | None = None) -> int | None:
        """Mark STARTED and return the new fencing token, or None if the record is final."""
        raise NotImplementedError

    def begin_many(self, ids: Sequence[str], *, worker: str = "", fields: dict | None = None) -> dict[str, int | None]:
        """``begin`` for a reserved batch: id -> token (None where final). Stores may do it in one write
        and record RECEIVED; the worker records STARTED for tasks that run long enough to be watched."""
        fields = fields or {}
        return {i: self.begin(i, worker=worker, fields=fields.get(i)) for i in ids}

    def set_state(self, task_id: str, state: str, *, token: int | None = None, **fields) -> bool:
        """Change a non-final record's state and fields (fenced when token is given)."""
        raise NotImplementedError

    def store_result(self, task_id: str, state: str, *, token: int | None = None, **fields) -> bool:
        """Write a final state once: SUCCESS with ``result``, FAILURE with ``error``/``exc_type``/``traceback``."""
        assert state in states.READY_STATES, state
        fields.setdefault("finished_at", self.clock.time())
        if self.results_expire_in:
            fields["expires_at"] = fields["finished_at"] + self.results_expire_in
        done = self._store_final(task_id, state, token, fields)
        if done:
            self._notify([task_id])
        return done

    def _store_final(self, task_id: str, state: str, token: int | None, fields: dict) -> bool:
        raise NotImplementedError

    def store_results(self, items: Sequence[tuple[str, str, int | None, dict]]) -> builtins.list[bool]:
        """``store_result`` for many ``(id, state, token, fields)``; stores may do it in one round trip."""
        return [self.store_result(task_id, state, token=token, **fields) for task_id, state, token, fields in items]

    def update(self, task_id: str, **fields) -> None:
        """Set fields without touching the state (task output, progress meta)."""
        raise NotImplementedError

    def get(self, task_id: str) -> dict | None:
        return self.get_many([task_id])[0]

    def get_many(self, ids: Sequence[str]) -> builtins.list[dict | None]:
        raise NotImplementedError

    def states_of(self, ids: Sequence[str]) -> dict[str, str]:
        """id -> state for the ids that have a record."""
        return {r["id"]: r["state"] for r in self.get_many(ids) if r is not None}

    # -- waiting -----------------------------------------------------------------
    def wait(self, ids: Sequence[str], timeout: float | None = None, *, missing_ok: bool = True) -> bool:
        """Block until every id is final (True) or the timeout passes (False).

        ``missing_ok=False``: raise ResultNotFound as soon as an id has no record (every
        task is recorded when it is sent, so it could never finish).

        Waits on a per-process wake-up and polls the store with back-off; stores with
        a push channel override ``_block``. Many ids are checked in order a slice at a
        time, so a wake-up costs one small query, not one over every id. While tasks keep
        finishing (workers in other processes draining them) the back-off starts over, so
        the last one is noticed within milliseconds, not a whole ``poll_interval``.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        self._listen()
        pending = list(ids)
        left = len(pending)
        interval = 0.001
        ceiling = float(self.options.get("poll_interval", 0.1))
        while True:
            version = WAKEUPS.version(self._wake_key)
            while pending:
                # the oldest pending id first: while it is not done, one tiny query per wake-up
                if len(pending) > 1:
                    first = self.states_of(pending[:1]).get(pending[0])
                    if first is None and not missing_ok:
                        raise ResultNotFound(pending[0])
                    if first not in states.READY_STATES:
                        break
                head = pending[:256]
                found = self.states_of(head)
                if not missing_ok and len(found) < len(head):
                    raise ResultNotFound(next(i for i in head if i not in found))
                still = [i for i in head if found.get(i) not in states.READY_STATES]
                pending = still + pending[len(head):]
                if still:
                    break
            if not pending:
                return True
            if len(pending) < left:
                interval = 0.001        # progress: look again soon
            left = len(pending)
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return False
            step = interval if remaining is None else min(interval, remaining)
            self._block(pending, version, step)
            if len(pending) > 1:
                time.sleep(min(0.002 * len(pending) / 256, 0.02))  # many waits: check a little less eagerly
            interval = min(interval * 2, ceiling)

    def wait_record(self, task_id: str, timeout: float | None = None, since: int | None = None, *,
                    missing_ok: bool = True) -> dict | None:
        """Block until one task is final and return its record (None on timeout): one read
        per wake-up, the record itself, rather than a state check and then a read.

        ``since``: ``wake_version()`` read before the task was sent; the first read is
        skipped while nothing was stored since (a task just sent is not final yet).
        ``missing_ok=False``: raise ResultNotFound as soon as a read finds no record.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        interval = 0.001
        ceiling = float(self.options.get("poll_interval", 0.1))
        self._listen()
        with WAKEUPS.watching(self._wake_key, task_id) as woken:
            record, read = None, False
            if since is None or WAKEUPS.version(self._wake_key) != since:
                woken.clear()
                record, read = self.get(task_id), True
            while record is None or record["state"] not in states.READY_STATES:
                if record is None and read and not missing_ok:
                    raise ResultNotFound(task_id)
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return None
                record = self._block_then_get(
                    task_id, woken, interval if remaining is None else min(interval, remaining)
                )
                read = True
                interval = min(interval * 2, ceiling)
            return record

    def _block_then_get(self, task_id: str, woken: threading.Event, timeout: float) -> dict | None:
        """Wait for a notification naming ``task_id``, then read its record (stores with
        a push channel override this, to do both in one round trip)."""
        woken.wait(timeout)
        woken.clear()
        return self.get(task_id)

    def wake_version(self) -> int:
        """The in-process wake-up count (see ``wait_record``'s ``since``)."""
        return WAKEUPS.version(self._wake_key)

    @property
    def _wake_key(self):
        return ("backend", self.url)

    def _listen(self) -> None:
        """Before a wait: make sure stores of other processes wake this one where a store can
        (nothing here: waits poll)."""

    def _block(self, pending: Sequence[str], version: int, timeout: float) -> None:
        WAKEUPS.wait(self._wake_key, version, timeout)

    def _notify(self, ids: Sequence[str]) -> None:
        WAKEUPS.notify(self._wake_key, ids)

    # -- groups ------------------------------------------------------------------
    def init_group(self, group_id: str, member_ids: Sequence[str], meta: dict | None = None) -> None:
        """Register a group and its members (idempotent)."""
        raise NotImplementedError

    def member_done(self, group_id: str, member_id: str) -> tuple[int, int]:
        """Count a member as finished, once however often it is called; returns (done, total)."""
        raise NotImplementedError

    def claim_chord(self, group_id: str) -> bool:
        """True exactly once per group."""
        raise NotImplementedError

    def group_info(self, group_id: str) -> dict | None:
        """``{"group_id", "total", "done", "members": [ids in order], "meta": {...}}``."""
        raise NotImplementedError

    def progress(self, ids: Sequence[str] = (), *, group_id: str | None = None) -> dict:
        """Counts by state for the ids (or a group's members) from one query."""
        raise NotImplementedError

    # -- listing and upkeep --------------------------------------------------------
    def list(
        self,
        *,
        state: str | None = None,
        name: str | None = None,
        limit: int | None = None,
        ids: Sequence[str] | None = None,
    ) -> builtins.list[dict]:
        """Records, newest first."""
        raise NotImplementedError

    def search(self, *, state=None, name=None, queue=None, since: float | None = None, until: float | None = None,
               text: str | None = None, offset: int = 0, limit: int = 50) -> builtins.list[dict]:
        """A page of records, newest first, matching every filter given (see ``matches``):
        the ``limit`` records after the first ``offset`` of them. Group bookkeeping records
        (``nbqueue.group``) only when ``name`` asks for them, as ``App.tasks()``.

        Written once here over ``list()`` (which sees what ``lists_tasks`` says: a bounded
        index of recent records on key-value stores); the SQLite backend answers it with
        one query that reads only the page's rows."""
        offset, limit = max(0, int(offset)), max(0, int(limit))
        simple = (
            queue is None
            and since is None
            and until is None
            and not text
            and not isinstance(state, (list, tuple, set, frozenset))
            and not isinstance(name, (list, tuple, set, frozenset))
        )
        if simple:      # the store's own filters, reading about as many records as the page needs
            wanted = offset + limit
            got = self.list(state=state, name=name, limit=2 * wanted + 64)
            found = [r for r in got if matches(r, state=state, name=name)]
            if len(found) >= wanted or len(got) < 2 * wanted + 64:
                return found[offset:wanted]
        found = [
            r
            for r in self.list()
            if matches(r, state=state, name=name, queue=queue, since=since, until=until, text=text)
        ]
        return found[offset:offset + limit]

    def counts(self, *, state=None, name=None, queue=None, since: float | None = None, until: float | None = None,
               text: str | None = None) -> dict[tuple[str, str], int]:
        """How many records match the filters (as ``search``), by ``(state, name)``."""
        out: dict[tuple[str, str], int] = {}
        for r in self.list():
            if matches(r, state=state, name=name, queue=queue, since=since, until=until, text=text):
                key = (r.get("state") or "", r.get("name") or "")
                out[key] = out.get(key, 0) + 1
        return out

    def forget(self, ids: Sequence[str]) -> int:
        raise NotImplementedError

    def expire(self, now: float | None = None, limit: int | None = None) -> int:
        """Delete records whose ``expires_at`` has passed (at most ``limit`` of them, and
        as many expired claim markers); how many were removed."""
        raise NotImplementedError

    def upkeep(self) -> None:
        """Housekeeping a worker's heartbeat thread runs now and then: expired records are
        removed in batches of ``EXPIRE_BATCH``, one batch per call while batches come back
        full, else one every ``EXPIRE_EVERY`` seconds. So results expire without a scheduler
        (Celery needs its beat for ``backend_cleanup``); reads ignore expired records anyway."""
        now = time.monotonic()
        if now < self._next_sweep:
            return
        removed = self.expire(limit=self.EXPIRE_BATCH)
        self._next_sweep = now + (0.0 if removed >= self.EXPIRE_BATCH else self.EXPIRE_EVERY)

    # -- workers and one-time claims -------------------------------------------------
    def heartbeat(self, worker_id: str, info: dict, ttl: float) -> None:
        raise NotImplementedError

    def worker_gone(self, worker_id: str) -> None:
        raise NotImplementedError

    def workers(self) -> builtins.list[dict]:
        """Live workers: worker_id, last_seen and the info they sent."""
        raise NotImplementedError

    def claim_once(self, key: str, ttl: float) -> bool:
        """True for the first caller of ``key``; False for everyone else until ``ttl`` passes."""
        raise NotImplementedError

    def kv_get(self, key: str) -> str | None:
        raise NotImplementedError

    def kv_set(self, key: str, value: str | None) -> None:
        """Small persistent values (schedules); ``None`` deletes."""
        raise NotImplementedError

    def kv_set_many(self, items: dict[str, str]) -> None:
        for key, value in items.items():
            self.kv_set(key, value)

    def kv_items(self, prefix: str) -> dict[str, str]:
        raise NotImplementedError

    def close(self) -> None:
        pass
