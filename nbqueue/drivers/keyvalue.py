"""A result backend written once over a few atomic key-value primitives.

Stores without queries or scripts (memcached, RabbitMQ queues used as registers) give
little more than "read keys", "add a key if absent" and "change one key atomically".
``KeyValueBackend`` writes every public ResultBackend method once over these; a store
implements only the ``_``-prefixed primitives:

- ``_read(keys) -> {key: text}`` for the keys that exist;
- ``_add(key, text, ttl) -> bool``: write only if absent;
- ``_change(key, change, ttl_of) -> result``: apply ``change(old text or None) ->
  (new text | KEEP | None to delete, result)`` atomically (compare-and-swap or a lock),
  ``ttl_of(new text)`` giving the expiry of what is written;
- ``_write(items, ttl)``: unconditional writes; ``_delete(keys)``;
- ``_touch(keys, ttl)``: set an expiry on existing keys (optional).

TTLs are seconds (float) or None for no expiry. Keys are text with the store's prefix
added by the store.

Layout (the store's prefix before each key)::

    r:<task id>          the record (JSON object of FIELDS)
    x:<task id>          "the record existed" marker (stores that evict): its expires_at or ""
    seq, i:<n>           the recent-ids ring: a counter and index_size slots holding ids
    g:<group id>         {"total", "meta", "created_at", "chunks"}
    g:<group id>:m:<k>   member ids, CHUNK per key, in order
    g:<group id>:done    hex bitmap of the members counted as finished
    g:<group id>:chord   present once the chord's callback was claimed
    workers              {worker id: {"info", "last_seen", "expires"}}
    once:<key>           claim_once markers (with their TTL)
    kv:<key>             kv_set values; kvn:<namespace> the keys of a namespace (JSON list),
                         kvns the namespaces (a key's namespace: up to its last ':')
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import orjson

from .. import serialization, states
from ..backend import FIELDS, ResultBackend, counts_from_states
from ..errors import SerializationError

#: ``_change`` callbacks return this to leave the key as it is
KEEP = object()
#: member ids per group chunk key
CHUNK = 2000
#: how long an "existed" marker outlives its record (so it is there when the record is missed)
MARKER_SLACK_S = 120.0


class ValueTooLarge(Exception):
    """A value over the store's item size (raised by a store's primitives)."""

    def __init__(self, key: str, size: int, limit: int):
        self.key, self.size, self.limit = key, size, limit
        super().__init__(f"{size:,} bytes under {key!r}; the store takes at most {limit:,}")


def dumps(value: Any) -> str:
    return orjson.dumps(value, default=str).decode()


def loads(text: str | bytes | None) -> Any:
    return None if text is None else orjson.loads(text)


def _final(rec: dict | None) -> bool:
    return rec is not None and rec.get("state") in states.READY_STATES


def _new_record(task_id: str, now: float) -> dict:
    rec = dict.fromkeys(FIELDS)
    rec.update(id=task_id, retries=0, token=0, created_at=now)
    return rec


class KeyValueBackend(ResultBackend):
    """ResultBackend over atomic key-value primitives; see the module docstring."""

    #: the store may drop keys on its own (memcached's LRU): markers tell "expired" from "never was"
    evicts = False
    #: list() without ids sees only the newest ``index_size`` tasks (0: list() needs ids)
    lists_tasks = "recent"
    index_size = 10_000

    def __init__(self, url: str, *, clock=None, options: dict | None = None):
        super().__init__(url, clock=clock, options=options)
        self._members_cache: dict[str, list[str]] = {}

    # -- primitives (stores implement these) ------------------------------------------------
    def _read(self, keys: Sequence[str]) -> dict[str, str]:
        raise NotImplementedError

    def _add(self, key: str, text: str, ttl: float | None = None) -> bool:
        raise NotImplementedError

    def _change(
        self,
        key: str,
        change: Callable[[str | None], tuple[Any, Any]],
        ttl_of: Callable[[str], float | None] = lambda text: None,
    ) -> Any:
        raise NotImplementedError

    def _write(self, items: dict[str, str], ttl: float | None = None) -> None:
        raise NotImplementedError

    def _delete(self, keys: Sequence[str]) -> None:
        raise NotImplementedError

    def _touch(self, keys: Sequence[str], ttl: float) -> None:
        """Give existing keys an expiry; stores that cannot leave them (expires_at still applies)."""

    # -- helpers ---------------------------------------------------------------------------
    def _ttl_of_record(self, text: str) -> float | None:
        expires = loads(text).get("expires_at")
        return None if expires is None else max(0.001, expires - self.clock.time())

    def _live(self, rec: dict | None) -> dict | None:
        if rec is not None and rec.get("expires_at") is not None and rec["expires_at"] <= self.clock.time():
            return None
        return rec

    def _created(self, ids: Sequence[str]) -> None:
        """Note new records: the recent-ids ring and, where the store evicts, their markers."""
        items: dict[str, str] = {}
        if self.index_size:
            end = self._counter("seq", len(ids))
            for offset, task_id in enumerate(ids):
                items[f"i:{(end - len(ids) + offset) % self.index_size}"] = task_id
        if self.evicts:
            items.update({f"x:{task_id}": "" for task_id in ids})
        if items:
            self._write(items)

    def _counter(self, key: str, n: int) -> int:
        """Add ``n`` to a counter; returns the new value."""
        return self._change(key, lambda old: (str(int(old or 0) + n), int(old or 0) + n))

    def _encode_record(self, rec: dict) -> str:
        return dumps({k: rec.get(k) for k in FIELDS})

    # -- records -----------------------------------------------------------------------------
    def create(self, records: Sequence[dict]) -> None:
        now = self.clock.time()
        added = []
        for r in records:
            rec = _new_record(r["id"], now)
            rec.update({k: v for k, v in r.items() if k in FIELDS and v is not None})
            rec["state"] = rec.get("state") or states.PENDING
            try:
                if self._add(f"r:{r['id']}", self._encode_record(rec)):
                    added.append(r["id"])
            except ValueTooLarge as exc:
                raise SerializationError(
                    f"task {r.get('name') or ''} {r['id']}: its record ({exc.size:,} bytes with its arguments) "
                    f"is over the result store's item size ({exc.limit:,} bytes); pass large values "
                    "some other way (a file, a URL)"
                ) from None
        if added:
            self._created(added)

    def begin(self, task_id: str, *, worker: str = "", fields: dict | None = None) -> int | None:
        return self._begin(task_id, worker, fields or {}, states.STARTED)

    def begin_many(self, ids: Sequence[str], *, worker: str = "", fields: dict | None = None) -> dict[str, int | None]:
        fields = fields or {}
        return {i: self._begin(i, worker, fields.get(i) or {}, states.RECEIVED) for i in ids}

    def _begin(self, task_id: str, worker: str, fields: dict, state: str) -> int | None:
        now = self.clock.time()
        created = []

        def change(old: str | None):        # may run again when another writer was first
            created.clear()
            rec = loads(old)
            if _final(self._live(rec)):
                return KEEP, None
            if rec is None or self._live(rec) is None:
                rec = _new_record(task_id, now)
                rec.update({k: v for k, v in fields.items() if k in FIELDS and k not in ("id", "state", "token")})
                created.append(task_id)
            elif fields.get("retries") is not None:
                rec["retries"] = fields["retries"]
            rec.update(state=state, token=int(rec.get("token") or 0) + 1, worker=worker, started_at=now)
            return self._encode_record(rec), rec["token"]

        token = self._change(f"r:{task_id}", change, self._ttl_of_record)
        if created:
            self._created(created)
        if token is not None:
            self._notify([task_id])
        return token

    def set_state(self, task_id: str, state: str, *, token: int | None = None, **fields) -> bool:
        done = self._write_state(task_id, state, token, fields)
        if done:
            self._notify([task_id])
        return done

    def _store_final(self, task_id: str, state: str, token: int | None, fields: dict) -> bool:
        try:
            return self._write_state(task_id, state, token, fields)
        except ValueTooLarge as exc:
            error = (
                f"the task's record is {exc.size:,} bytes, over the result store's item size ({exc.limit:,} bytes); "
                "return a smaller value (or a path or URL to it)"
            )
            small = {k: v for k, v in fields.items() if k in ("finished_at", "expires_at", "started_at", "worker")}
            return self._write_state(
                task_id,
                states.FAILURE,
                token,
                {
                    **small,
                    "exc_type": "ResultTooLarge",
                    "error": error,
                    "result": None,
                    "output": (fields.get("output") or "")[-4096:] or None,
                },
            )

    def _write_state(self, task_id: str, state: str, token: int | None, fields: dict) -> bool:
        fields = {k: v for k, v in fields.items() if k in FIELDS and k not in ("id", "state", "token")}
        now = self.clock.time()
        created = []

        def change(old: str | None):
            created.clear()
            rec = self._live(loads(old))
            if rec is None:
                if token is not None:
                    return KEEP, False
                rec = _new_record(task_id, fields.get("created_at", now))
                created.append(task_id)
            elif rec.get("state") in states.READY_STATES or (
                token is not None and int(rec.get("token") or 0) != int(token)
            ):
                return KEEP, False
            rec.update(fields)
            rec["state"] = state
            return self._encode_record(rec), True

        done = self._change(f"r:{task_id}", change, self._ttl_of_record)
        if created:
            self._created(created)
        if done and self.evicts and fields.get("expires_at") is not None:
            # the marker expires with the record (a little after), saying when it expired
            self._write({f"x:{task_id}": repr(fields["expires_at"])}, ttl=fields["expires_at"] - now + MARKER_SLACK_S)
        return done

    def update(self, task_id: str, **fields) -> None:
        fields = {k: v for k, v in fields.items() if k in FIELDS and k not in ("id", "state", "token")}
        if not fields:
            return

        def change(old: str | None):
            rec = loads(old)
            if rec is None:
                return KEEP, None
            rec.update(fields)
            return self._encode_record(rec), None

        try:
            self._change(f"r:{task_id}", change, self._ttl_of_record)
        except ValueTooLarge as exc:
            if not fields.get("output"):
                raise
            keep = max(0, len(fields["output"]) - (exc.size - exc.limit) - 256)
            fields["output"] = (
                "[... output cut: over the result store's item size]\n" + fields["output"][-keep:] if keep else None
            )
            self._change(f"r:{task_id}", change, self._ttl_of_record)

    def get_many(self, ids: Sequence[str]) -> list[dict | None]:
        ids = list(ids)
        found = self._read([f"r:{i}" for i in ids])
        out = [self._live(loads(found.get(f"r:{i}"))) for i in ids]
        if self.evicts:
            missing = [i for i, rec in zip(ids, out) if rec is None and f"r:{i}" not in found]
            if missing:
                markers = self._read([f"x:{i}" for i in missing])
                lost = {i: self._lost(i, markers[f"x:{i}"]) for i in missing if f"x:{i}" in markers}
                out = [lost.get(i) if rec is None else rec for i, rec in zip(ids, out)]
        return out

    def _lost(self, task_id: str, marker: str) -> dict | None:
        """The record of a task whose record is gone but whose marker is not: None when it
        expired as configured, else a FAILURE saying it was evicted."""
        now = self.clock.time()
        if marker and float(marker) <= now:
            return None
        rec = _new_record(task_id, now)
        rec.update(state=states.FAILURE, exc_type="ResultExpired", finished_at=now,
                   error=f"the record of task {task_id} was evicted from the result store before it was read "
                         "(memcached was out of memory: give it more with -m, or read results sooner)")
        return rec

    # -- groups -----------------------------------------------------------------------------
    def init_group(self, group_id: str, member_ids: Sequence[str], meta: dict | None = None) -> None:
        member_ids = list(member_ids)
        chunks = [member_ids[i:i + CHUNK] for i in range(0, len(member_ids), CHUNK)]
        header = {
            "total": len(member_ids),
            "meta": serialization.dumps(meta or {}),
            "created_at": self.clock.time(),
            "chunks": len(chunks),
        }
        if f"g:{group_id}" in self._read([f"g:{group_id}"]):
            return
        self._write({f"g:{group_id}:m:{k}": dumps(chunk) for k, chunk in enumerate(chunks)})
        self._add(f"g:{group_id}", dumps(header))

    def _group(self, group_id: str) -> tuple[dict, list[str]] | None:
        """(header, member ids) or None."""
        found = self._read([f"g:{group_id}"])
        if f"g:{group_id}" not in found:
            return None
        header = loads(found[f"g:{group_id}"])
        members = self._members_cache.get(group_id)
        if members is None:
            keys = [f"g:{group_id}:m:{k}" for k in range(header["chunks"])]
            chunks = self._read(keys)
            members = [m for key in keys for m in loads(chunks.get(key) or "[]")]
            if len(self._members_cache) > 256:
                self._members_cache.clear()
            self._members_cache[group_id] = members
        return header, members

    def member_done(self, group_id: str, member_id: str) -> tuple[int, int]:
        group = self._group(group_id)
        if group is None:
            raise KeyError(f"unknown group {group_id!r}")
        header, members = group
        total = header["total"]
        try:
            index = members.index(member_id)
        except ValueError:
            index = None

        def change(old: str | None):
            bits = bytearray.fromhex(old) if old else bytearray((total + 7) // 8)
            if index is None or bits[index // 8] & (1 << (index % 8)):
                return KEEP, _popcount(bits)
            bits[index // 8] |= 1 << (index % 8)
            return bits.hex(), _popcount(bits)

        done = self._change(f"g:{group_id}:done", change)
        if done >= total and self.results_expire_in:
            keys = [f"g:{group_id}", f"g:{group_id}:done", f"g:{group_id}:chord"] + [
                f"g:{group_id}:m:{k}" for k in range(header["chunks"])
            ]
            self._touch(keys, self.results_expire_in)
        return done, total

    def claim_chord(self, group_id: str) -> bool:
        if f"g:{group_id}" not in self._read([f"g:{group_id}"]):
            return False
        return self._add(f"g:{group_id}:chord", "1")

    def group_info(self, group_id: str) -> dict | None:
        group = self._group(group_id)
        if group is None:
            return None
        header, members = group
        bits = self._read([f"g:{group_id}:done"]).get(f"g:{group_id}:done")
        done = _popcount(bytearray.fromhex(bits)) if bits else 0
        return {
            "group_id": group_id,
            "total": header["total"],
            "done": done,
            "members": members,
            "meta": serialization.loads(header["meta"] or "{}"),
        }

    def progress(self, ids: Sequence[str] = (), *, group_id: str | None = None) -> dict:
        if group_id is not None:
            group = self._group(group_id)
            if group is None:
                return counts_from_states([], 0)
            ids, total = group[1], group[0]["total"]
        else:
            ids, total = list(ids), len(ids)
        tally: dict[str, int] = {}
        for state in self.states_of(ids).values():
            tally[state] = tally.get(state, 0) + 1
        return counts_from_states(tally.items(), total)

    # -- listing and upkeep --------------------------------------------------------------------
    def list(self, *, state=None, name=None, limit=None, ids=None) -> list[dict]:
        """Records, newest first. Without ``ids``: the newest ``index_size`` tasks only (the
        store cannot enumerate its keys)."""
        if ids is None:
            ids = self._recent_ids()
        rows = [r for r in self.get_many(list(ids)) if r is not None and (state is None or r["state"] == state)
                and (name is None or r["name"] == name)]
        rows.sort(key=lambda r: r.get("created_at") or 0.0, reverse=True)
        return rows if limit is None else rows[:int(limit)]

    def _recent_ids(self) -> list[str]:
        if not self.index_size:
            from ..errors import UnsupportedOperation

            raise UnsupportedOperation(
                f"the {self.scheme}:// result backend cannot list tasks (it has no index of them): "
                "pass ids, or keep results in SQLite, Redis or Memcache to list them"
            )
        end = int(self._read(["seq"]).get("seq") or 0)
        positions = [p % self.index_size for p in range(end - 1, max(-1, end - 1 - self.index_size), -1)]
        slots = self._read([f"i:{p}" for p in positions])
        seen: dict[str, None] = {}
        for p in positions:
            task_id = slots.get(f"i:{p}")
            if task_id is not None:
                seen.setdefault(task_id, None)
        return list(seen)

    def forget(self, ids: Sequence[str]) -> int:
        ids = list(ids)
        existing = self._read([f"r:{i}" for i in ids])
        self._delete([f"r:{i}" for i in ids] + ([f"x:{i}" for i in ids] if self.evicts else []))
        return len(existing)

    def expire(self, now: float | None = None) -> int:
        """Nothing to sweep: records carry their expiry and reads skip expired ones."""
        return 0

    # -- workers and one-time claims -------------------------------------------------------------
    def heartbeat(self, worker_id: str, info: dict, ttl: float) -> None:
        now = self.clock.time()

        def change(old: str | None):
            table = {w: e for w, e in (loads(old) or {}).items() if e["expires"] > now}
            table[worker_id] = {"info": info, "last_seen": now, "expires": now + ttl}
            return dumps(table), None

        self._change("workers", change)

    def worker_gone(self, worker_id: str) -> None:
        def change(old: str | None):
            table = loads(old) or {}
            if table.pop(worker_id, None) is None:
                return KEEP, None
            return dumps(table), None

        self._change("workers", change)

    def workers(self) -> list[dict]:
        now = self.clock.time()
        table = loads(self._read(["workers"]).get("workers")) or {}
        return [
            {"worker_id": w, "last_seen": e["last_seen"], **e["info"]}
            for w, e in sorted(table.items())
            if e["expires"] > now
        ]

    def claim_once(self, key: str, ttl: float) -> bool:
        now = self.clock.time()

        def change(old: str | None):
            if old is not None and float(old) > now:
                return KEEP, False
            return repr(now + ttl), True

        return self._change(f"once:{key}", change, lambda text: ttl)

    def kv_get(self, key: str) -> str | None:
        return self._read([f"kv:{key}"]).get(f"kv:{key}")

    def kv_set(self, key: str, value: str | None) -> None:
        self.kv_set_many({key: value})

    def kv_set_many(self, items: dict[str, str | None]) -> None:
        if not items:
            return
        sets = {f"kv:{k}": v for k, v in items.items() if v is not None}
        if sets:
            self._write(sets)
        gone = [k for k, v in items.items() if v is None]
        if gone:
            self._delete([f"kv:{k}" for k in gone])
        by_namespace: dict[str, tuple[set, set]] = {}
        for k, v in items.items():
            added, removed = by_namespace.setdefault(_namespace(k), (set(), set()))
            (removed if v is None else added).add(k)
        new_namespaces = []
        for namespace, (added, removed) in by_namespace.items():
            def change(old: str | None, added=added, removed=removed):
                keys = set(loads(old) or [])
                after = (keys | added) - removed
                return (KEEP if after == keys else dumps(sorted(after))), old is None
            if self._change(f"kvn:{namespace}", change) and added:
                new_namespaces.append(namespace)
        if new_namespaces:
            self._change("kvns", lambda old: (dumps(sorted(set(loads(old) or []) | set(new_namespaces))), None))

    def kv_items(self, prefix: str) -> dict[str, str]:
        namespaces = [
            n for n in loads(self._read(["kvns"]).get("kvns")) or [] if n.startswith(prefix) or prefix.startswith(n)
        ]
        indexes = self._read([f"kvn:{n}" for n in namespaces])
        keys = sorted({k for text in indexes.values() for k in loads(text) if k.startswith(prefix)})
        values = self._read([f"kv:{k}" for k in keys])
        return {k: values[f"kv:{k}"] for k in keys if f"kv:{k}" in values}


def _namespace(key: str) -> str:
    """A kv key's namespace: up to and including its last ':' ('' for none)."""
    return key[:key.rfind(":") + 1]


def _popcount(bits: bytearray) -> int:
    return int.from_bytes(bits, "little").bit_count()


__all__ = ["KeyValueBackend", "KEEP", "ValueTooLarge", "dumps", "loads"]
