"""Redis result backend: ``redis://``, ``rediss://`` and ``memory://[NAME]`` (fakeredis).

Supports: fenced begin/set_state/store_result in Lua (a stale token or a final record
is never overwritten), atomic idempotent group counting, chords claimed exactly once,
progress of any number of tasks in one round trip, newest-first listing, expiry by
Redis TTL (``results_expire_in``), worker heartbeats with TTL, one-time claims
(SET NX PX) and a small key-value store. ``wait()`` blocks on per-task notification
lists (BLPOP), so waiters in any process wake when a result is stored.

Options as for nbqueue.drivers.redis.broker (``key_prefix``, retries, timeouts), plus
``results_expire_in`` (seconds) and ``poll_interval`` (longest single blocking wait
in ``wait()``, default 1.0 s).

Reading ahead: a backend on a Redis server remembers the tasks this process created, in
order (the last ``SENT_KEPT``). A wait for one of them (``wait_record``, as ``get()`` makes)
also reads the records of the tasks created right after it, in the same round trip, and keeps
those already final for the waits that follow (the loop ``[h.get() for h in handles]`` then
reads many records per round trip). A record kept so is given out once, within
``AHEAD_FOR`` seconds of its read, unless this backend forgot it meanwhile: a final record
changes only by ``forget``, expiry (checked when it is given out) and ``update`` of its
output or meta. How many are read ahead follows what the last reads found: doubling up to
``READ_AHEAD`` while all of them were final, down to how many were otherwise.

Keys (``P`` is the prefix)::

    P r:<task id>            hash    the record (FIELDS; an absent field is None)
    P results                zset    task id -> created_at (listing, newest first)
    P expiring               zset    task id -> expires_at (records with a TTL)
    P done:<task id>         list    a token pushed when the record becomes final
    P g:<group id>           hash    total, meta, created_at, chord (claimed flag)
    P g:<group id>:members   hash    member id -> position
    P g:<group id>:done      set     members counted as finished
    P w:<worker id>          string  heartbeat info (JSON), with a TTL
    P workers                zset    worker id -> expiry time
    P kv:<key>               string  kv_set values and claim_once markers
    P kv                     zset    kv_set keys (score 0, range by prefix)
"""
from __future__ import annotations

import collections
import itertools
import math
import threading
import time
from typing import Any, Sequence

from ... import serialization, states
from ...backend import FIELDS, ResultBackend, counts_from_states, matches
from ...errors import ResultNotFound
from ...urls import redact
from . import twins
from .client import LUA_FINAL, MIN_BLOCK, RAW, connect, guarded, key_prefix, lua, pipeline, register, url_options
from .twins import twin

_INT_FIELDS = frozenset({"retries", "token"})
_FLOAT_FIELDS = frozenset({"created_at", "started_at", "finished_at", "expires_at"})
_STATE_FIELDS = frozenset(FIELDS) - {"id", "state", "token"}     # the fields a state write may set
_BEGIN_OWNS = frozenset({"id", "state", "token", "worker", "started_at", "created_at", "retries"})
_CREATE_FIELDS = ("id", "name", "state", "args", "kwargs", "queue", "group_id", "parent_id", "created_at", "meta")
DONE_TTL_MS = 60_000        # a done token only bridges the gap between a waiter's check and its block
WAIT_KEYS = 64              # a waiter blocks on at most this many pending tasks at a time
CHUNK = 500                 # records per script call
READ_AHEAD = 64             # records a wait reads ahead at most (see the module docstring)
AHEAD_FOR = 0.5             # seconds a record read ahead may answer a wait
SENT_KEPT = 4096            # ids of tasks created here kept for reading ahead
AHEAD_SCAN = 64             # how far into those ids a wait looks for its own

# -- Lua (scripts in lua/*.lua) -----------------------------------------------------------

_CREATE = lua("create_records", "create", header=LUA_FINAL)
_BEGIN = lua("begin", "begin_many", header=LUA_FINAL)
_SET_STATE = lua("state", "set_state", header=LUA_FINAL + f"local DONE_TTL_MS = '{DONE_TTL_MS}'\n")
_UPDATE = lua("records", "update", header=LUA_FINAL)
_INIT_GROUP = lua("init_group")
_MEMBER_DONE = lua("member_done")
_CLAIM_CHORD = lua("claim_chord")
_GROUP_PROGRESS = lua("group_progress")

# the scripts memory:// runs as Python (see nbqueue.drivers.redis.twins)
twin(_CREATE, twins.create)
twin(_BEGIN, twins.begin_many)
twin(_SET_STATE, twins.set_state, done_ttl=DONE_TTL_MS)


def _encode(value: Any) -> str:
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, bool):
        return str(int(value))
    return str(value)


def _field_args(fields: dict, counted: bool = False) -> list[str]:
    """ARGV tail for the Lua ``apply``: count, name/value pairs, then names to delete (their
    count first where ``counted``)."""
    sets = [(k, v) for k, v in fields.items() if v is not None]
    deletes = [k for k, v in fields.items() if v is None]
    return [str(len(sets)), *(x for k, v in sets for x in (k, _encode(v))),
            *([str(len(deletes))] if counted else []), *deletes]


def _record(raw: dict) -> dict | None:
    if not raw:
        return None
    rec: dict[str, Any] = dict.fromkeys(FIELDS)
    rec["retries"] = rec["token"] = 0
    for name, value in raw.items():
        if name in _INT_FIELDS:
            rec[name] = int(value)
        elif name in _FLOAT_FIELDS:
            rec[name] = float(value)
        elif name in rec:
            rec[name] = value
    return rec


class RedisBackend(ResultBackend):
    scheme = "redis"
    reads_as_it_waits = True

    def __init__(self, url: str = "memory://", *, clock=None, options: dict | None = None):
        super().__init__(url, clock=clock, options=url_options(url, options))
        self.options.setdefault("poll_interval", 1.0)
        self.prefix = key_prefix(self.options)
        self.client = connect(url, self.options)
        self._key_wait = None
        if url.startswith("memory:"):
            from .memory import KeyWait

            self._key_wait = KeyWait
        # reading ahead (see the module docstring; memory:// reads without a round trip)
        self._sent: collections.deque[str] | None = None if self._key_wait else collections.deque(maxlen=SENT_KEPT)
        self._ahead: dict[str, tuple[dict, float]] = {}     # id -> (final record, monotonic time read)
        self._ahead_n = 1
        self._ahead_lock = threading.Lock()
        self._create = register(self.client, _CREATE)
        self._begin = register(self.client, _BEGIN)
        self._set_state = register(self.client, _SET_STATE)
        self._update = register(self.client, _UPDATE)
        self._init_group = register(self.client, _INIT_GROUP)
        self._member_done = register(self.client, _MEMBER_DONE)
        self._claim_chord = register(self.client, _CLAIM_CHORD)
        self._group_progress = register(self.client, _GROUP_PROGRESS)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {redact(self.url)}>"

    # -- key names -----------------------------------------------------------------
    def _rec(self, task_id: str) -> str:
        return f"{self.prefix}r:{task_id}"

    def _group_keys(self, group_id: str) -> list[str]:
        base = f"{self.prefix}g:{group_id}"
        return [base, f"{base}:members", f"{base}:done"]

    @property
    def _index(self) -> str:
        return f"{self.prefix}results"

    @property
    def _expiring(self) -> str:
        return f"{self.prefix}expiring"

    def _done_key(self, task_id: str) -> str:
        return f"{self.prefix}done:{task_id}"

    # -- records -----------------------------------------------------------------
    @guarded
    def create(self, records: Sequence[dict], client=None) -> None:
        self.created(records)
        now = self.clock.time()
        for start in range(0, len(records), CHUNK):
            keys: list[str] = [self._index]
            args: list = []
            self.create_args(records[start:start + CHUNK], now, keys, args)
            self._create(keys=keys, args=args, client=client)

    def created(self, records: Sequence[dict]) -> None:
        """Note the tasks of ``records``, created by this process, for reading ahead."""
        if self._sent is not None:
            with self._ahead_lock:
                self._sent.extend([r["id"] for r in records])

    def create_args(self, records: Sequence[dict], now: float, keys: list, args: list) -> None:
        """Append the create script's KEYS (each record's key) and ARGV (a count, then
        name/value pairs) for ``records`` to ``keys`` and ``args``: PENDING and created at
        ``now`` unless a record says otherwise (see lua/create_records.lua)."""
        for r in records:
            pairs: list = []
            for name in _CREATE_FIELDS:
                value = r.get(name)
                if name == "state" and not value:
                    value = states.PENDING
                elif value is None:
                    if name == "created_at":
                        value = now
                    else:
                        continue
                pairs += (name, value if type(value) is str else _encode(value))
            keys.append(self._rec(r["id"]))
            args.append(str(len(pairs) // 2))
            args += pairs

    @guarded
    def begin(self, task_id: str, *, worker: str = "", fields: dict | None = None) -> int | None:
        return self._begin_records([task_id], worker, {task_id: fields or {}}, states.STARTED)[task_id]

    @guarded
    def begin_many(self, ids: Sequence[str], *, worker: str = "", fields: dict | None = None) -> dict[str, int | None]:
        """``begin`` for a reserved batch in one script call; records go RECEIVED."""
        return self._begin_records(list(ids), worker, fields or {}, states.RECEIVED)

    def _begin_records(self, ids: list[str], worker: str, fields: dict, state: str) -> dict[str, int | None]:
        out: dict[str, int | None] = {}
        for start in range(0, len(ids), CHUNK):
            chunk = ids[start:start + CHUNK]
            args: list[Any] = [repr(self.clock.time()), worker, state]
            for task_id in chunk:
                extra = dict(fields.get(task_id) or {})
                retries = extra.pop("retries", None)
                pairs = [
                    (k, _encode(v)) for k, v in extra.items() if k in FIELDS and k not in _BEGIN_OWNS and v is not None
                ]
                args += [
                    task_id,
                    "" if retries is None else str(int(retries)),
                    len(pairs),
                    *(x for pair in pairs for x in pair),
                ]
            tokens = self._begin(keys=[self._index, *map(self._rec, chunk)], args=args)
            out.update((task_id, int(token) or None) for task_id, token in zip(chunk, tokens))
        return out

    @guarded
    def set_state(self, task_id: str, state: str, *, token: int | None = None, **fields) -> bool:
        return self._write_state(task_id, state, token, fields, ttl=None)  # the script wakes waiters of a final state

    def _store_final(self, task_id: str, state: str, token: int | None, fields: dict) -> bool:
        return self._write_state(task_id, state, token, fields, ttl=self.results_expire_in)

    @guarded
    def store_results(self, items: Sequence[tuple[str, str, int | None, dict]], client=None) -> list[bool]:
        """Final states of many tasks in one round trip (a pipeline of the set-state script);
        with ``client`` (a pipeline) the commands are only queued there."""
        pipe = client or pipeline(self.client)
        for task_id, state, token, fields in items:
            fields = dict(fields)
            fields.setdefault("finished_at", self.clock.time())
            self._write_state(task_id, state, token, fields, ttl=self.results_expire_in, client=pipe)
        return [] if client is not None else [reply == 1 for reply in pipe.execute()]

    @guarded
    def _write_state(
        self, task_id: str, state: str, token: int | None, fields: dict, ttl: float | None, client=None
    ) -> bool:
        reply = self._set_state(
            keys=[self._rec(task_id), self._index, self._expiring, self._done_key(task_id)],
            args=self._state_args(task_id, state, token, fields, ttl),
            client=client,
        )
        return reply == 1

    def _state_args(self, task_id: str, state: str, token: int | None, fields: dict, ttl: float | None,
                    counted: bool = False) -> list:
        """A state write's arguments (see lua/state.lua), made in one pass over ``fields``
        (record fields only; None deletes one); ``counted``: with the count of the names to
        delete (as the finish script reads them)."""
        now = self.clock.time()
        sets: list = []
        dels: list = []
        created: Any = now
        expires: Any = None
        for name, value in fields.items():
            if name not in _STATE_FIELDS:
                continue
            if name == "created_at":
                created = value
            elif name == "expires_at" and ttl:
                expires = value
                continue
            if value is None:
                dels.append(name)
            else:
                kind = type(value)
                sets += (name, value if kind is str else repr(value) if kind is float else _encode(value))
        ttl_ms = expires_at = ""
        if ttl:
            ttl_ms = str(max(1, math.ceil(ttl * 1000)))
            expires_at = _encode(expires or now + ttl)      # in the record too: reads check it
            sets += ("expires_at", expires_at)
        return [
            task_id,
            state,
            "" if token is None else str(int(token)),
            _encode(created),
            ttl_ms,
            expires_at,
            str(len(sets) // 2),
            *sets,
            *([str(len(dels))] if counted else []),
            *dels,
        ]

    @guarded
    def update(self, task_id: str, **fields) -> None:
        fields = {k: v for k, v in fields.items() if k in FIELDS and k not in ("id", "state")}
        if fields:
            self._update(keys=[self._rec(task_id)], args=_field_args(fields))

    @guarded
    def get_many(self, ids: Sequence[str]) -> list[dict | None]:
        pipe = pipeline(self.client)
        for task_id in ids:
            pipe.hgetall(self._rec(task_id))
        return [self._live(raw) for raw in pipe.execute()]

    def _live(self, raw: dict | list) -> dict | None:
        """The record read as ``raw`` (an HGETALL reply: a dict, or the flat list of names and
        values a raw pipeline reply is), or None when there is none or it has expired."""
        rec = _record(raw if isinstance(raw, dict) else dict(zip(raw[::2], raw[1::2])))
        if rec is not None and rec["expires_at"] is not None and rec["expires_at"] <= self.clock.time():
            return None
        return rec

    @guarded
    def states_of(self, ids: Sequence[str]) -> dict[str, str]:
        pipe = pipeline(self.client)
        for task_id in ids:
            pipe.hget(self._rec(task_id), "state")
        return {task_id: state for task_id, state in zip(ids, pipe.execute()) if state is not None}

    # -- waiting -----------------------------------------------------------------
    @guarded
    def _notify(self, ids: Sequence[str]) -> None:
        """Nothing to do: the set-state script pushes a token to a final task's done list,
        and waiters blocked on it wake at once."""

    def wait_record(self, task_id: str, timeout: float | None = None, since: int | None = None, *,
                    missing_ok: bool = True) -> dict | None:
        """As the base's, in one round trip per pass and without in-process wake-ups (the
        set-state script wakes waiters in every process): each pass blocks on the task's done
        list and reads the record (``_block_then_get``); a task that finished in the last
        DONE_TTL_MS has its token there, so it is read in one round trip. Without ``since`` (a
        task that may have finished long ago), or with no time left to wait, the first pass
        reads the record without blocking. A record read ahead (see the module docstring)
        answers without a round trip; the first pass reads ahead."""
        record = self._kept(task_id)
        if record is not None:
            return record
        ahead = self._ahead_of(task_id)
        deadline = None if timeout is None else time.monotonic() + timeout
        interval, ceiling = 0.001, float(self.options["poll_interval"])
        first = True
        while True:
            remaining = None if deadline is None else deadline - time.monotonic()
            if first and since is None or remaining is not None and remaining <= 0:
                record = self._read(task_id, ahead) if ahead else self.get(task_id)
            else:
                wait = interval if remaining is None else min(interval, remaining)
                record = self._block_then_get(task_id, None, wait, ahead)
            ahead = []
            if record is not None and record["state"] in states.READY_STATES:
                return record
            if record is None and not missing_ok:
                raise ResultNotFound(task_id)
            if remaining is not None and remaining <= 0:
                return None
            interval, first = min(interval * 2, ceiling), False

    def _ahead_of(self, task_id: str) -> list[str]:
        """The tasks created here right after ``task_id`` whose records a wait for it reads
        ahead (none unless ``task_id`` is among the first AHEAD_SCAN noted; it and those
        before it are dropped from the notes)."""
        sent = self._sent
        if not sent:
            return []
        with self._ahead_lock:
            try:
                at = sent.index(task_id, 0, min(len(sent), AHEAD_SCAN))
            except ValueError:
                return []
            for _ in range(at + 1):
                sent.popleft()
            kept = self._ahead
            return [i for i in itertools.islice(sent, 0, self._ahead_n) if i not in kept]

    def _kept(self, task_id: str) -> dict | None:
        """The final record of ``task_id`` read ahead, given out once: None when there is
        none, or it was read more than AHEAD_FOR seconds ago, or it has expired since."""
        if not self._ahead:
            return None
        with self._ahead_lock:
            kept = self._ahead.pop(task_id, None)
            sent = self._sent
            if kept is not None and sent and sent[0] == task_id:
                sent.popleft()
        if kept is None or time.monotonic() - kept[1] > AHEAD_FOR:
            return None
        record = kept[0]
        if record["expires_at"] is not None and record["expires_at"] <= self.clock.time():
            return None
        return record

    def _keep(self, ids: list[str], raws: list) -> None:
        """Keep the final records among ``raws`` (HGETALL replies for ``ids``) for the waits
        to come, and size the next read ahead by how many were final."""
        now = time.monotonic()
        final = []
        for task_id, raw in zip(ids, raws):
            record = self._live(raw)
            if record is not None and record["state"] in states.READY_STATES:
                final.append((task_id, (record, now)))
        with self._ahead_lock:
            kept = self._ahead
            if len(kept) + len(final) > 4 * READ_AHEAD:      # records nobody waited for: dropped
                for task_id in [i for i, (_, at) in kept.items() if now - at > AHEAD_FOR]:
                    del kept[task_id]
                if len(kept) + len(final) > 4 * READ_AHEAD:
                    kept.clear()
            kept.update(final)
            if len(final) == len(ids):
                if len(ids) >= self._ahead_n:
                    self._ahead_n = min(2 * self._ahead_n, READ_AHEAD)
            else:
                self._ahead_n = max(1, len(final))

    @guarded
    def _read(self, task_id: str, ahead: list[str]) -> dict | None:
        """``get(task_id)``, reading the records of ``ahead`` in the same round trip."""
        pipe = pipeline(self.client)
        pipe.command_stack += [(("HGETALL", self._rec(i)), RAW) for i in (task_id, *ahead)]
        raws = pipe.execute()
        self._keep(ahead, raws[1:])
        raw = raws[0]
        return self._live(raw)

    @guarded
    def _block_then_get(self, task_id: str, woken, timeout: float, ahead: Sequence[str] = ()) -> dict | None:
        """Block on the task's done list and read its record in one round trip: Redis
        runs the pipelined HGETALL as soon as the blocking pop returns; the records of
        ``ahead`` are read after it. On memory:// (in
        this process) the record is read first, and only a record not final waits, without
        a command, for a write to the done list, and the record is read without one as well
        (nbqueue.drivers.redis.memory.KeyWait)."""
        key = self._done_key(task_id)
        if self._key_wait is not None:
            with self._key_wait(self.client, [key.encode()]) as wait:
                record = self._live(wait.hgetall(self._rec(task_id)))
                if record is not None and record["state"] in states.READY_STATES:
                    return record
                if not wait.wait(max(MIN_BLOCK, timeout)):
                    return record
            return self._live(wait.hgetall(self._rec(task_id)))
        pipe = pipeline(self.client)
        pipe.command_stack += [
            (("BRPOPLPUSH", key, key, max(MIN_BLOCK, timeout)), RAW),  # rotated in place: other waiters see it too
            (("HGETALL", self._rec(task_id)), RAW),
        ]
        if ahead:
            pipe.command_stack += [(("HGETALL", self._rec(i)), RAW) for i in ahead]
        replies = pipe.execute()
        if ahead:
            self._keep(list(ahead), replies[2:])
        raw = replies[1]
        return self._live(raw)

    @guarded
    def _block(self, pending: Sequence[str], version: int, timeout: float) -> None:
        """Block until one of the first pending tasks is stored as final, or ``timeout``.

        Every waiter of a task wakes: a single task's list is rotated in place, and with
        several the popped token is handed back. Tokens are only pushed for final states,
        expire on their own, and ``forget`` deletes them.
        """
        keys = [self._done_key(t) for t in pending[:WAIT_KEYS]]
        if len(keys) == 1:
            # one task: rotate its list onto itself, which blocks while it is empty and
            # leaves the token in place for the task's other waiters (one round trip)
            self.client.brpoplpush(keys[0], keys[0], timeout=max(MIN_BLOCK, timeout))
            return
        popped = self.client.blpop(keys, timeout=max(MIN_BLOCK, timeout))
        if not popped:
            return
        key, token = popped
        # hand the token back for the task's other waiters; it expires on its own
        pipe = pipeline(self.client)
        pipe.rpush(key, token)
        pipe.pexpire(key, DONE_TTL_MS)
        pipe.execute()

    # -- groups ------------------------------------------------------------------
    @guarded
    def init_group(self, group_id: str, member_ids: Sequence[str], meta: dict | None = None) -> None:
        args = [len(member_ids), serialization.dumps(meta or {}), repr(self.clock.time()), *member_ids]
        self._init_group(keys=self._group_keys(group_id)[:2], args=args)

    @guarded
    def member_done(self, group_id: str, member_id: str) -> tuple[int, int]:
        reply = self._count_member(group_id, member_id)
        if reply is None:
            raise KeyError(f"unknown group {group_id!r}")
        return int(reply[0]), int(reply[1])

    def _count_member(self, group_id: str, member_id: str, client=None, if_succeeded: bool = False):
        """The member-done script, run (or queued on ``client``); ``if_succeeded``: count only
        if the member's record is SUCCESS (queued right behind the script storing it)."""
        ttl = "" if not self.results_expire_in else str(max(1, math.ceil(self.results_expire_in * 1000)))
        keys = self._group_keys(group_id) + ([self._rec(member_id)] if if_succeeded else [])
        return self._member_done(keys=keys, args=[member_id, ttl], client=client)

    @guarded
    def claim_chord(self, group_id: str) -> bool:
        return self._claim_chord(keys=self._group_keys(group_id)[:1]) == 1

    @guarded
    def group_info(self, group_id: str) -> dict | None:
        group, members, done = self._group_keys(group_id)
        pipe = pipeline(self.client)
        pipe.hmget(group, "total", "meta")
        pipe.hgetall(members)
        pipe.scard(done)
        (total, meta), positions, n_done = pipe.execute()
        if total is None:
            return None
        ordered = sorted(positions, key=lambda m: int(positions[m]))
        return {
            "group_id": group_id,
            "total": int(total),
            "done": n_done,
            "members": ordered,
            "meta": serialization.loads(meta or "{}"),
        }

    @guarded
    def progress(self, ids: Sequence[str] = (), *, group_id: str | None = None) -> dict:
        if group_id is not None:
            reply = self._group_progress(keys=self._group_keys(group_id)[:2], args=[self._rec("")])
            total, flat = int(reply[0]), reply[1:]
            return counts_from_states([(flat[i], int(flat[i + 1])) for i in range(0, len(flat), 2)], total)
        found = self.states_of(ids)
        pairs: dict[str, int] = {}
        for state in found.values():
            pairs[state] = pairs.get(state, 0) + 1
        return counts_from_states(pairs.items(), len(ids))

    # -- listing and upkeep --------------------------------------------------------
    #: the fields ``counts`` reads of each record (a text search reads whole records)
    _COUNTED = ("state", "name", "queue", "created_at", "expires_at")

    @guarded
    def counts(
        self, *, state=None, name=None, queue=None, since=None, until=None, text=None
    ) -> dict[tuple[str, str], int]:
        """As the base, reading only the fields the filters need (HMGET), not whole records."""
        if text:
            return super().counts(state=state, name=name, queue=queue, since=since, until=until, text=text)
        out: dict[tuple[str, str], int] = {}
        now, start, page = self.clock.time(), 0, 2000
        while True:
            chunk = self.client.zrevrange(self._index, start, start + page - 1)
            if not chunk:
                return out
            pipe = pipeline(self.client)
            for task_id in chunk:
                pipe.hmget(self._rec(task_id), *self._COUNTED)
            for values in pipe.execute():
                rec = dict(zip(self._COUNTED, values))
                if rec["state"] is None or rec["expires_at"] is not None and float(rec["expires_at"]) <= now:
                    continue
                rec["created_at"] = float(rec["created_at"] or 0.0)
                if matches(rec, state=state, name=name, queue=queue, since=since, until=until):
                    key = (rec["state"], rec["name"] or "")
                    out[key] = out.get(key, 0) + 1
            start += page

    @guarded
    def list(self, *, state=None, name=None, limit=None, ids=None) -> list[dict]:
        def wanted(rec: dict | None) -> bool:
            return (
                rec is not None and (state is None or rec["state"] == state) and (name is None or rec["name"] == name)
            )

        if ids is not None:
            rows = [r for r in self.get_many(list(ids)) if wanted(r)]
            rows.sort(key=lambda r: r["created_at"] or 0.0, reverse=True)
            return rows if limit is None else rows[:int(limit)]
        rows: list[dict] = []
        page = 500 if limit is None else max(50, 2 * int(limit))
        start = 0
        while limit is None or len(rows) < int(limit):
            chunk = self.client.zrevrange(self._index, start, start + page - 1)
            if not chunk:
                break
            records = self.get_many(chunk)
            gone = [task_id for task_id, rec in zip(chunk, records) if rec is None]
            rows += [r for r in records if wanted(r)]
            if gone:  # expired by TTL: drop from the index as we pass
                self.client.zrem(self._index, *gone)
                start -= len(gone)
            start += page
        return rows if limit is None else rows[:int(limit)]

    @guarded
    def forget(self, ids: Sequence[str]) -> int:
        ids = list(ids)
        if not ids:
            return 0
        if self._ahead:
            with self._ahead_lock:
                for task_id in ids:
                    self._ahead.pop(task_id, None)
        pipe = pipeline(self.client)
        pipe.delete(*[self._rec(i) for i in ids])
        pipe.zrem(self._index, *ids)
        pipe.zrem(self._expiring, *ids)
        pipe.delete(*[self._done_key(i) for i in ids])
        return pipe.execute()[0]

    @guarded
    def expire(self, now: float | None = None, limit: int | None = None) -> int:
        """Remove records past ``expires_at`` (at most ``limit``; Redis usually dropped the
        records already by their TTL, not their entries in the listing and expiry indexes)."""
        now = self.clock.time() if now is None else now
        if limit is None:
            ids = self.client.zrangebyscore(self._expiring, "-inf", repr(now))
        else:
            ids = self.client.zrangebyscore(self._expiring, "-inf", repr(now), start=0, num=int(limit))
        pipe = pipeline(self.client)
        if ids:
            pipe.delete(*[self._rec(i) for i in ids], *[self._done_key(i) for i in ids])
            pipe.zrem(self._index, *ids)
            pipe.zrem(self._expiring, *ids)
        pipe.zremrangebyscore(f"{self.prefix}workers", "-inf", repr(now))
        pipe.execute()
        return len(ids)

    # -- workers and claims --------------------------------------------------------
    @guarded
    def heartbeat(self, worker_id: str, info: dict, ttl: float) -> None:
        now = self.clock.time()
        pipe = pipeline(self.client)
        pipe.set(
            f"{self.prefix}w:{worker_id}",
            serialization.dumps({**info, "last_seen": now}),
            px=max(1, math.ceil(ttl * 1000)),
        )
        pipe.zadd(f"{self.prefix}workers", {worker_id: now + ttl})
        pipe.execute()

    @guarded
    def worker_gone(self, worker_id: str) -> None:
        pipe = pipeline(self.client)
        pipe.delete(f"{self.prefix}w:{worker_id}")
        pipe.zrem(f"{self.prefix}workers", worker_id)
        pipe.execute()

    @guarded
    def workers(self) -> list[dict]:
        index = f"{self.prefix}workers"
        now = self.clock.time()
        ids = sorted(self.client.zrangebyscore(index, f"({now!r}", "+inf"))
        infos = self.client.mget([f"{self.prefix}w:{w}" for w in ids]) if ids else []
        live = []
        for worker_id, text in zip(ids, infos):
            if text is None:
                continue
            info = serialization.loads(text)
            live.append({"worker_id": worker_id, "last_seen": info.pop("last_seen", None), **info})
        return live

    @guarded
    def claim_once(self, key: str, ttl: float) -> bool:
        return bool(self.client.set(f"{self.prefix}kv:{key}", "1", nx=True, px=max(1, math.ceil(ttl * 1000))))

    @guarded
    def kv_get(self, key: str) -> str | None:
        return self.client.get(f"{self.prefix}kv:{key}")

    @guarded
    def kv_set_many(self, items: dict[str, str]) -> None:
        if not items:
            return
        pipe = self.client.pipeline(transaction=True)
        pipe.mset({f"{self.prefix}kv:{k}": v for k, v in items.items()})
        pipe.zadd(f"{self.prefix}kv", dict.fromkeys(items, 0))
        pipe.execute()

    @guarded
    def kv_set(self, key: str, value: str | None) -> None:
        pipe = self.client.pipeline(transaction=True)
        if value is None:
            pipe.delete(f"{self.prefix}kv:{key}")
            pipe.zrem(f"{self.prefix}kv", key)
        else:
            pipe.set(f"{self.prefix}kv:{key}", value)
            pipe.zadd(f"{self.prefix}kv", {key: 0})
        pipe.execute()

    @guarded
    def kv_items(self, prefix: str) -> dict[str, str]:
        raw = prefix.encode()
        keys = self.client.zrangebylex(f"{self.prefix}kv", b"[" + raw, b"[" + raw + b"\xff")
        if not keys:
            return {}
        values = self.client.mget([f"{self.prefix}kv:{k}" for k in keys])
        return {k: v for k, v in zip(keys, values) if v is not None}

    def close(self) -> None:
        self.client.close()
