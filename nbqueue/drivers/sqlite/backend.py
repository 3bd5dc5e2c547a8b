"""SQLite result backend: the embedded default, usually the same file as the broker.

Records survive a kernel restart. Group counters are updated in one IMMEDIATE
transaction and are idempotent per member; chord claims are a single conditional
UPDATE. Waiters in this process are woken at once; those of other processes through
the wake-up channel beside the file (nbqueue.drivers.sqlite.wake), polling with back-off as the
fallback.
"""
from __future__ import annotations

import builtins
import sqlite3
from typing import Callable, Sequence

from ... import serialization, states
from ...backend import FIELDS, GROUP_TASK, SEARCHED, ResultBackend, counts_from_states
from ...wakeups import WAKEUPS
from . import wake as wakechannel
from .db import SQLiteStore, path_from_url, placeholders

_FINAL = tuple(states.READY_STATES)
_NOT_FINAL_SQL = f"state NOT IN ({','.join(repr(s) for s in _FINAL)})"
#: the columns ``create`` writes; ``fill`` completes a record a worker made first
_CREATED = ("id", "name", "state", "args", "kwargs", "queue", "group_id", "parent_id", "created_at", "meta")
_INSERT = f"INTO nbq_results({','.join(_CREATED)}) VALUES ({placeholders(len(_CREATED))})"
#: a PENDING record per row of ``SQLiteBackend.record_rows``; one already there is left alone
CREATE_SQL = f"INSERT OR IGNORE {_INSERT}"
#: the same rows completing a record already there: what it lacks, and the earlier creation time
FILL_SQL = (f"INSERT {_INSERT} ON CONFLICT(id) DO UPDATE SET "
            + ", ".join(f"{c} = COALESCE({c}, excluded.{c})"
                        for c in ("name", "args", "kwargs", "queue", "group_id", "parent_id", "meta"))
            + ", created_at = MIN(COALESCE(created_at, excluded.created_at), excluded.created_at)")


def _schema(db) -> None:
    db["nbq_results"].create(
        {
            "id": str,
            "name": str,
            "state": str,
            "args": str,
            "kwargs": str,
            "result": str,
            "error": str,
            "exc_type": str,
            "traceback": str,
            "retries": int,
            "queue": str,
            "worker": str,
            "token": int,
            "group_id": str,
            "parent_id": str,
            "created_at": float,
            "started_at": float,
            "finished_at": float,
            "expires_at": float,
            "output": str,
            "meta": str,
        },
        pk="id",
        if_not_exists=True,
        defaults={"retries": 0, "token": 0},
    )
    # listings walk the table newest first by rowid (the order records were written), so a
    # send writes no created_at index: a file from before drops its index
    db.execute("DROP INDEX IF EXISTS nbq_results_created")
    # partial: a plain task (no group) costs this index nothing
    db.execute("CREATE INDEX IF NOT EXISTS nbq_results_group ON nbq_results(group_id) WHERE group_id IS NOT NULL")
    db.execute("CREATE INDEX IF NOT EXISTS nbq_results_expires ON nbq_results(expires_at) WHERE expires_at IS NOT NULL")
    # tables keyed by text: WITHOUT ROWID, so a row lives in one B-tree instead of a table
    # and its primary-key index (fewer pages written per commit)
    db.execute(
        "CREATE TABLE IF NOT EXISTS nbq_groups (group_id TEXT PRIMARY KEY, total INTEGER, done INTEGER, chord_claimed "
        "INTEGER, "
        "meta TEXT, created_at FLOAT) WITHOUT ROWID"
    )
    db.execute(
        "CREATE TABLE IF NOT EXISTS nbq_group_members (group_id TEXT, member_id TEXT, idx INTEGER, done INTEGER, "
        "PRIMARY KEY (group_id, member_id)) WITHOUT ROWID"
    )
    db["nbq_workers"].create(
        {"worker_id": str, "info": str, "last_seen": float, "expires": float}, pk="worker_id", if_not_exists=True
    )
    db.execute("CREATE TABLE IF NOT EXISTS nbq_kv (key TEXT PRIMARY KEY, value TEXT, expires FLOAT) WITHOUT ROWID")
    db.execute("CREATE INDEX IF NOT EXISTS nbq_kv_expires ON nbq_kv(expires) WHERE expires IS NOT NULL")


class SQLiteBackend(ResultBackend):
    store_errors = (sqlite3.OperationalError,)
    scheme = "sqlite"

    def __init__(self, url: str = "", *, clock=None, options: dict | None = None):
        super().__init__(url, clock=clock, options=options)
        self.path = path_from_url(url)
        self.store = SQLiteStore.shared(self.path)
        self.store.ensure_schema("backend", _schema)
        self._channel = wakechannel.channel_for(self.path).hold()
        self._channel_held = True

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.url or 'sqlite://'} (file {self.path})>"  # a relative URL's absolute path

    @property
    def _wake_key(self):
        return wakechannel.results_key(self.path)

    # -- records -----------------------------------------------------------------
    def create(self, records: Sequence[dict]) -> None:
        self._create(records, CREATE_SQL)

    fills_records = True

    def fill(self, records: Sequence[dict]) -> None:
        self._create(records, FILL_SQL)

    def _create(self, records: Sequence[dict], sql: str) -> None:
        if not records:
            return
        rows = self.record_rows(records)
        with self.store.write() as conn:
            conn.executemany(sql, rows)

    def record_rows(self, records: Sequence[dict]) -> list[tuple]:
        """The parameters of ``CREATE_SQL`` for ``records`` (built before a transaction begins)."""
        now = self.clock.time()
        pending = states.PENDING
        return [
            (r["id"], r.get("name"), r.get("state", pending), r.get("args"), r.get("kwargs"), r.get("queue"),
             r.get("group_id"), r.get("parent_id"), r.get("created_at", now), r.get("meta"))
            for r in records
        ]

    def begin(self, task_id: str, *, worker: str = "", fields: dict | None = None) -> int | None:
        now = self.clock.time()
        fields = dict(fields or {})
        row = self.store.execute(
            "UPDATE nbq_results SET state = ?, token = token + 1, worker = ?, started_at = ?, retries = COALESCE(?, "
            "retries) "
            f"WHERE id = ? AND {_NOT_FINAL_SQL} RETURNING token",
            (states.STARTED, worker, now, fields.get("retries"), task_id),
        ).fetchone()
        if row is not None:
            self._notify([task_id])
            return row[0]
        with self.store.write() as conn:
            row = conn.execute(
                "UPDATE nbq_results SET state = ?, token = token + 1, worker = ?, started_at = ? WHERE id = ? AND "
                f"{_NOT_FINAL_SQL} RETURNING token",
                (states.STARTED, worker, now, task_id),
            ).fetchone()
            if row is not None:
                return row[0]
            if conn.execute("SELECT 1 FROM nbq_results WHERE id = ?", (task_id,)).fetchone():
                return None
            cols = {
                "id": task_id,
                "state": states.STARTED,
                "token": 1,
                "worker": worker,
                "started_at": now,
                "created_at": now,
            }
            cols.update({k: v for k, v in fields.items() if k in FIELDS and k not in cols})
            conn.execute(
                f"INSERT INTO nbq_results({','.join(cols)}) VALUES ({placeholders(len(cols))})", tuple(cols.values())
            )
            return 1

    def begin_many(self, ids: Sequence[str], *, worker: str = "", fields: dict | None = None) -> dict[str, int | None]:
        return self.begin_each(ids, worker, (fields or {}).get)

    def begin_each(self, ids: Sequence[str], worker: str,
                   fields_of: Callable[[str], dict | None]) -> dict[str, int | None]:
        """``begin_many`` with ``fields_of(id)`` (None: no fields), asked only for an id that has
        no record yet (a record is then made with them), as RECEIVED."""
        ids = list(ids)
        now = self.clock.time()
        out: dict[str, int | None] = {}
        with self.store.write() as conn:
            for start in range(0, len(ids), 900):
                chunk = ids[start:start + 900]
                out.update(conn.execute(
                    f"UPDATE nbq_results SET state = ?, token = token + 1, worker = ?, started_at = ? "
                    f"WHERE id IN ({placeholders(len(chunk))}) AND {_NOT_FINAL_SQL} RETURNING id, token",
                    (states.RECEIVED, worker, now, *chunk),
                ).fetchall())
            missing = [i for i in ids if i not in out]
            if missing:
                existing = {
                    i
                    for (i,) in conn.execute(
                        f"SELECT id FROM nbq_results WHERE id IN ({placeholders(len(missing))})", missing
                    )
                }
                for task_id in missing:
                    if task_id in existing:
                        out[task_id] = None
                        continue
                    extra = fields_of(task_id) or {}
                    cols = {
                        "id": task_id,
                        "state": states.RECEIVED,
                        "token": 1,
                        "worker": worker,
                        "started_at": now,
                        "created_at": now,
                    }
                    cols.update({k: v for k, v in extra.items() if k in FIELDS and k not in cols})
                    conn.execute(
                        f"INSERT INTO nbq_results({','.join(cols)}) VALUES ({placeholders(len(cols))})",
                        tuple(cols.values()),
                    )
                    out[task_id] = 1
        return out

    def set_state(self, task_id: str, state: str, *, token: int | None = None, **fields) -> bool:
        fields = {k: v for k, v in fields.items() if k in FIELDS}
        sets = ", ".join(["state = ?"] + [f"{k} = ?" for k in fields])
        sql = f"UPDATE nbq_results SET {sets} WHERE id = ? AND {_NOT_FINAL_SQL}"
        params: list = [state, *fields.values(), task_id]
        if token is not None:
            sql += " AND token = ?"
            params.append(token)
        with self.store.write() as conn:
            changed = conn.execute(sql, params).rowcount
            if (
                not changed
                and token is None
                and not conn.execute("SELECT 1 FROM nbq_results WHERE id = ?", (task_id,)).fetchone()
            ):
                cols = {"id": task_id, "state": state, "created_at": self.clock.time(), **fields}
                conn.execute(
                    f"INSERT INTO nbq_results({','.join(cols)}) VALUES ({placeholders(len(cols))})",
                    tuple(cols.values()),
                )
                changed = 1
        if changed:
            self._notify([task_id])
        return bool(changed)

    def store_results(self, items) -> list[bool]:
        """Many final results with one statement where they share their fields (a worker's batch)."""
        items = list(items)
        prepared = self.results_rows(items)
        if prepared is None:
            return super().store_results(items)
        return self.store_rows(items, *prepared)

    def results_rows(self, items: Sequence[tuple]) -> tuple[str, list] | None:
        """The statement that stores final results ``(id, state, token, fields)`` and its rows,
        where they share one: the same fields, each with a token; else None."""
        keys = {tuple(sorted(f)) for _, _, _, f in items}
        if len(keys) != 1 or any(token is None for _, _, token, _ in items):
            return None
        now = self.clock.time()
        names = [k for k in keys.pop() if k in FIELDS and k not in ("id", "state", "token")] + ["finished_at"]
        expires = now + self.results_expire_in if self.results_expire_in else None
        sql = (f"UPDATE nbq_results SET state = ?, {', '.join(f'{k} = ?' for k in names)}, expires_at = ? "
               f"WHERE id = ? AND {_NOT_FINAL_SQL} AND token = ?")
        rows = [(state, *[f.get(k, now) if k == "finished_at" else f.get(k) for k in names], expires, task_id, token)
                for task_id, state, token, f in items]
        return sql, rows

    def store_rows(self, items: Sequence[tuple], sql: str, rows: list) -> list[bool]:
        """Store ``items`` with the statement and rows ``results_rows`` made of them: whether each
        was stored (not fenced out)."""
        with self.store.write() as conn:
            changed = conn.executemany(sql, rows).rowcount
        self._notify([i[0] for i in items])
        if changed == len(items):
            return [True] * len(items)
        found = self.states_of([i[0] for i in items])       # some were fenced out: say which ones stuck
        return [found.get(i[0]) == i[1] for i in items]

    def _store_final(self, task_id: str, state: str, token: int | None, fields: dict) -> bool:
        return self.set_state(task_id, state, token=token, **fields)

    def update(self, task_id: str, **fields) -> None:
        fields = {k: v for k, v in fields.items() if k in FIELDS and k not in ("id", "state")}
        if not fields:
            return
        with self.store.write() as conn:
            conn.execute(
                f"UPDATE nbq_results SET {', '.join(f'{k} = ?' for k in fields)} WHERE id = ?",
                (*fields.values(), task_id),
            )

    def get_many(self, ids: Sequence[str]) -> list[dict | None]:
        found: dict[str, dict] = {}
        now = self.clock.time()
        ids = list(ids)
        for start in range(0, len(ids), 900):
            chunk = ids[start:start + 900]
            for row in self.store.read(
                f"SELECT {','.join(FIELDS)} FROM nbq_results WHERE id IN ({placeholders(len(chunk))})", chunk
            ):
                rec = dict(zip(FIELDS, row))
                if rec["expires_at"] is not None and rec["expires_at"] <= now:
                    continue
                found[rec["id"]] = rec
        return [found.get(i) for i in ids]

    def states_of(self, ids: Sequence[str]) -> dict[str, str]:
        out: dict[str, str] = {}
        ids = list(ids)
        for start in range(0, len(ids), 900):
            chunk = ids[start:start + 900]
            out.update(
                self.store.read(f"SELECT id, state FROM nbq_results WHERE id IN ({placeholders(len(chunk))})", chunk)
            )
        return out

    # -- groups ------------------------------------------------------------------
    def init_group(self, group_id: str, member_ids: Sequence[str], meta: dict | None = None) -> None:
        with self.store.write() as conn:
            conn.execute(
                "INSERT OR IGNORE INTO nbq_groups(group_id, total, done, chord_claimed, meta, created_at) "
                "VALUES (?, ?, 0, 0, ?, ?)",
                (group_id, len(member_ids), serialization.dumps(meta or {}), self.clock.time()),
            )
            conn.executemany(
                "INSERT OR IGNORE INTO nbq_group_members(group_id, member_id, idx, done) VALUES (?, ?, ?, 0)",
                [(group_id, m, i) for i, m in enumerate(member_ids)],
            )

    def member_done(self, group_id: str, member_id: str) -> tuple[int, int]:
        with self.store.write() as conn:
            if conn.execute(
                "UPDATE nbq_group_members SET done = 1 WHERE group_id = ? AND member_id = ? AND done = 0",
                (group_id, member_id),
            ).rowcount:
                conn.execute("UPDATE nbq_groups SET done = done + 1 WHERE group_id = ?", (group_id,))
            row = conn.execute("SELECT done, total FROM nbq_groups WHERE group_id = ?", (group_id,)).fetchone()
        if row is None:
            raise KeyError(f"unknown group {group_id!r}")
        return row[0], row[1]

    def claim_chord(self, group_id: str) -> bool:
        with self.store.write() as conn:
            return (
                conn.execute(
                    "UPDATE nbq_groups SET chord_claimed = 1 WHERE group_id = ? AND chord_claimed = 0", (group_id,)
                ).rowcount
                == 1
            )

    def group_info(self, group_id: str) -> dict | None:
        row = self.store.read("SELECT total, done, meta FROM nbq_groups WHERE group_id = ?", (group_id,))
        if not row:
            return None
        members = [
            m
            for (m,) in self.store.read(
                "SELECT member_id FROM nbq_group_members WHERE group_id = ? ORDER BY idx", (group_id,)
            )
        ]
        total, done, meta = row[0]
        return {
            "group_id": group_id,
            "total": total,
            "done": done,
            "members": members,
            "meta": serialization.loads(meta or "{}"),
        }

    def progress(self, ids: Sequence[str] = (), *, group_id: str | None = None) -> dict:
        if group_id is not None:
            total = self.store.read("SELECT total FROM nbq_groups WHERE group_id = ?", (group_id,))
            in_group = self.store.read(
                "SELECT state, COUNT(*) FROM nbq_results WHERE group_id = ? GROUP BY state", (group_id,)
            )
            return counts_from_states(in_group, total[0][0] if total else sum(n for _, n in in_group))
        ids = list(ids)
        pairs: list = []
        for start in range(0, len(ids), 900):
            chunk = ids[start:start + 900]
            pairs += self.store.read(
                f"SELECT state, COUNT(*) FROM nbq_results WHERE id IN ({placeholders(len(chunk))}) GROUP BY state",
                chunk,
            )
        return counts_from_states(pairs, len(ids))

    # -- listing and upkeep --------------------------------------------------------
    def list(self, *, state=None, name=None, limit=None, ids=None) -> list[dict]:
        where, params = ["(expires_at IS NULL OR expires_at > ?)"], [self.clock.time()]
        if state is not None:
            where.append("state = ?")
            params.append(state)
        if name is not None:
            where.append("name = ?")
            params.append(name)
        if ids is not None:
            ids = list(ids)
            where.append(f"id IN ({placeholders(len(ids))})")
            params += ids
        sql = (
            f"SELECT {','.join(FIELDS)} FROM nbq_results WHERE {' AND '.join(where)} "
            "ORDER BY rowid DESC"
        )
        if limit is not None:
            sql += " LIMIT ?"
            params.append(int(limit))
        return [dict(zip(FIELDS, row)) for row in self.store.read(sql, params)]

    # (annotations below name ``builtins.list``: in this class, ``list`` is the method above)
    def _filters(self, state, name, queue, since, until, text) -> tuple[str, builtins.list]:
        """The WHERE clause (and its parameters) of ``search`` and ``counts``."""
        where, params = ["(expires_at IS NULL OR expires_at > ?)"], [self.clock.time()]
        for column, wanted in (("state", state), ("name", name), ("queue", queue)):
            if wanted is None:
                continue
            values = list(wanted) if isinstance(wanted, (list, tuple, set, frozenset)) else [wanted]
            where.append(f"{column} IN ({placeholders(len(values))})")
            params += values
        if name is None or GROUP_TASK not in (name if isinstance(name, (list, tuple, set, frozenset)) else [name]):
            where.append("(name IS NULL OR name != ?)")
            params.append(GROUP_TASK)
        if since is not None:
            where.append("created_at >= ?")
            params.append(float(since))
        if until is not None:
            where.append("created_at < ?")
            params.append(float(until))
        if text:
            pattern = "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
            where.append("(" + " OR ".join(f"{f} LIKE ? ESCAPE '\\'" for f in SEARCHED) + ")")
            params += [pattern] * len(SEARCHED)
        return " AND ".join(where), params

    def search(
        self, *, state=None, name=None, queue=None, since=None, until=None, text=None, offset=0, limit=50
    ) -> builtins.list[dict]:
        """One read-only query: the table walked newest first by rowid (the order records were
        written), each filter checked row by row, until the page is full."""
        where, params = self._filters(state, name, queue, since, until, text)
        sql = (
            f"SELECT {','.join(FIELDS)} FROM nbq_results WHERE {where} "
            "ORDER BY rowid DESC LIMIT ? OFFSET ?"
        )
        return [
            dict(zip(FIELDS, row)) for row in self.store.read(sql, [*params, max(0, int(limit)), max(0, int(offset))])
        ]

    def counts(
        self, *, state=None, name=None, queue=None, since=None, until=None, text=None
    ) -> dict[tuple[str, str], int]:
        where, params = self._filters(state, name, queue, since, until, text)
        rows = self.store.read(
            f"SELECT state, name, COUNT(*) FROM nbq_results WHERE {where} GROUP BY state, name", params
        )
        return {(s or "", n or ""): c for s, n, c in rows}

    def forget(self, ids: Sequence[str]) -> int:
        ids = list(ids)
        with self.store.write() as conn:
            return conn.execute(f"DELETE FROM nbq_results WHERE id IN ({placeholders(len(ids))})", ids).rowcount

    def expire(self, now: float | None = None, limit: int | None = None) -> int:
        """Expired records (with the bookkeeping of groups whose record they are) and expired
        claim markers; at most ``limit`` of each."""
        now = self.clock.time() if now is None else now
        cap = -1 if limit is None else int(limit)          # LIMIT -1: no limit
        with self.store.write() as conn:
            ids = [
                i
                for (i,) in conn.execute(
                    "SELECT id FROM nbq_results WHERE expires_at IS NOT NULL AND expires_at <= ? LIMIT ?", (now, cap)
                )
            ]
            for start in range(0, len(ids), 500):
                chunk = ids[start:start + 500]
                marks = placeholders(len(chunk))
                conn.execute(f"DELETE FROM nbq_results WHERE id IN ({marks})", chunk)
                conn.execute(f"DELETE FROM nbq_groups WHERE group_id IN ({marks})", chunk)
                conn.execute(f"DELETE FROM nbq_group_members WHERE group_id IN ({marks})", chunk)
            markers = conn.execute(
                "DELETE FROM nbq_kv WHERE key IN (SELECT key FROM nbq_kv WHERE expires IS NOT NULL AND expires <= ? "
                "LIMIT ?)",
                (now, cap),
            ).rowcount
        return len(ids) + markers

    # -- workers and claims --------------------------------------------------------
    def heartbeat(self, worker_id: str, info: dict, ttl: float) -> None:
        now = self.clock.time()
        with self.store.write() as conn:
            conn.execute(
                "INSERT INTO nbq_workers(worker_id, info, last_seen, expires) VALUES (?, ?, ?, ?) "
                "ON CONFLICT(worker_id) DO UPDATE SET info = excluded.info, last_seen = excluded.last_seen, expires = "
                "excluded.expires",
                (worker_id, serialization.dumps(info), now, now + ttl),
            )

    def worker_gone(self, worker_id: str) -> None:
        with self.store.write() as conn:
            conn.execute("DELETE FROM nbq_workers WHERE worker_id = ?", (worker_id,))

    def workers(self) -> builtins.list[dict]:
        rows = self.store.read(
            "SELECT worker_id, info, last_seen FROM nbq_workers WHERE expires > ? ORDER BY worker_id",
            (self.clock.time(),),
        )
        return [{"worker_id": w, "last_seen": s, **serialization.loads(i)} for w, i, s in rows]

    def claim_once(self, key: str, ttl: float) -> bool:
        now = self.clock.time()
        with self.store.write() as conn:
            conn.execute("DELETE FROM nbq_kv WHERE key = ? AND expires IS NOT NULL AND expires <= ?", (key, now))
            return (
                conn.execute(
                    "INSERT OR IGNORE INTO nbq_kv(key, value, expires) VALUES (?, '1', ?)", (key, now + ttl)
                ).rowcount
                == 1
            )

    def kv_get(self, key: str) -> str | None:
        row = self.store.read(
            "SELECT value FROM nbq_kv WHERE key = ? AND (expires IS NULL OR expires > ?)", (key, self.clock.time())
        )
        return row[0][0] if row else None

    def kv_set(self, key: str, value: str | None) -> None:
        with self.store.write() as conn:
            if value is None:
                conn.execute("DELETE FROM nbq_kv WHERE key = ?", (key,))
            else:
                conn.execute(
                    "INSERT INTO nbq_kv(key, value, expires) VALUES (?, ?, NULL) ON CONFLICT(key) "
                    "DO UPDATE SET value = excluded.value, expires = NULL",
                    (key, value),
                )

    def kv_set_many(self, items: dict[str, str]) -> None:
        with self.store.write() as conn:
            conn.executemany(
                "INSERT INTO nbq_kv(key, value, expires) VALUES (?, ?, NULL) "
                "ON CONFLICT(key) DO UPDATE SET value = excluded.value, expires = NULL",
                list(items.items()),
            )

    def kv_items(self, prefix: str) -> dict[str, str]:
        rows = self.store.read(
            "SELECT key, value FROM nbq_kv WHERE key >= ? AND key < ? AND (expires IS NULL OR expires > ?)",
            (prefix, prefix + "\uffff", self.clock.time()),
        )
        return dict(rows)

    def _notify(self, ids) -> None:
        def notify() -> None:
            super(SQLiteBackend, self)._notify(ids)
            self._channel.send(wakechannel.RESULTS, wakechannel.ids_payload(ids))

        self.store.on_commit(notify)

    def _listen(self) -> None:
        """Results stored by other processes wake this process's waiters (see nbqueue.drivers.sqlite.wake)."""
        self._channel.listen(wakechannel.RESULTS, wakechannel.local_waker(WAKEUPS.notify, self._wake_key))

    def close(self) -> None:
        # the store is shared by every broker and backend on this file in this process; the
        # wake-up channel's listeners end with the last of them
        held, self._channel_held = self._channel_held, False
        if held:
            self._channel.release()
