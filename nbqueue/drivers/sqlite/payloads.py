"""Payloads of the SQLite driver: files beside the database file, their links in its tables."""
from __future__ import annotations

import contextlib
import os
import uuid

from ...errors import PayloadCorrupt
from ...payloads import KEY_PREFIX, PayloadStore, _chunks, _valid, read_buffer
from .db import SQLiteStore, path_from_url


class SQLitePayloads(PayloadStore):
    """Payloads as files beside an SQLite file (``<file>-payloads/ab/sha256-ab…``), their
    links in tables of that file; see the module docstring.

    A file is written under a temporary name first and renamed into place inside the
    transaction that records it, and a payload's file is removed inside the transaction
    that deletes its row, so writers, releases and sweeps of any process on the machine
    see a payload whole, and never lose one that another writer has just linked. Deleting
    a payload frees its disk space at once (rows of a table would leave free pages).
    """

    def __init__(self, url: str, *, clock=None, options: dict | None = None):
        """``options``: the App's options, as every payload store is given them (this one reads none)."""
        super().__init__(url, clock=clock)
        self.path = path_from_url(url)
        self.dir = self.path + "-payloads"
        self.store = SQLiteStore.shared(self.path)
        self.store.ensure_schema("payloads", _sqlite_schema)

    @property
    def label(self) -> str:
        return f"sqlite:///{self.path} (files in {self.dir})"

    def _file(self, key: str) -> str:
        return os.path.join(self.dir, key[len(KEY_PREFIX):len(KEY_PREFIX) + 2], key)

    def link(self, keys, owner):
        keys, missing = _valid(keys)
        if not keys:
            return missing
        now = self._now()
        with self.store.write() as conn:
            found: set[str] = set()
            for chunk in _chunks(keys, 500):
                marks = ",".join("?" * len(chunk))
                found.update(k for (k,) in conn.execute(f"SELECT key FROM nbq_payloads WHERE key IN ({marks})", chunk))
            for key in keys:
                if key in found:
                    conn.execute(_SQLITE_LINK, (owner, key, now))
                else:
                    missing.append(key)
        return missing

    def _write(self, key, data, owner):
        final = self._file(key)
        os.makedirs(os.path.dirname(final), exist_ok=True)
        tmp = f"{final}.tmp-{uuid.uuid4().hex}"
        view = memoryview(data).cast("B")
        try:
            with open(tmp, "wb") as fh:     # outside any transaction: other writers go on meanwhile
                fh.write(view)
            now = self._now()
            with self.store.write() as conn:
                if conn.execute("SELECT 1 FROM nbq_payloads WHERE key = ?", (key,)).fetchone() is None:
                    os.replace(tmp, final)
                    conn.execute("INSERT INTO nbq_payloads(key, size, created_at, check_at) VALUES (?, ?, ?, ?)",
                                 (key, view.nbytes, now, now + self.grace))
                conn.execute(_SQLITE_LINK, (owner, key, now))
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)

    def _read(self, key, name):
        try:
            with open(self._file(key), "rb") as fh:
                size = os.fstat(fh.fileno()).st_size
                out = read_buffer(size)
                got = fh.readinto(out)
        except FileNotFoundError:
            raise self._missing(name) from None
        if got != size:
            raise PayloadCorrupt(f"{name} in {self.label}: {got} of {size} bytes could be read (truncated); "
                                 "it was not decoded")
        return out

    def release(self, owners):
        owners = list(dict.fromkeys(owners))
        deleted = 0
        for chunk in _chunks(owners, 500):
            marks = ",".join("?" * len(chunk))
            with self.store.write() as conn:
                rows = conn.execute(f"SELECT DISTINCT key FROM nbq_payload_refs WHERE owner IN ({marks})", chunk)
                keys = [k for (k,) in rows]
                if not keys:
                    continue
                conn.execute(f"DELETE FROM nbq_payload_refs WHERE owner IN ({marks})", chunk)
                deleted += self._delete_unlinked(conn, keys)
        return deleted

    def _delete_unlinked(self, conn, keys: list[str]) -> int:
        """Delete (rows and files) the payloads among ``keys`` left without links, inside ``conn``'s transaction."""
        linked = "SELECT 1 FROM nbq_payload_refs WHERE key = ? LIMIT 1"
        gone = [k for k in keys if conn.execute(linked, (k,)).fetchone() is None]
        for chunk in _chunks(gone, 500):
            conn.execute(f"DELETE FROM nbq_payloads WHERE key IN ({','.join('?' * len(chunk))})", chunk)
        for key in gone:
            with contextlib.suppress(FileNotFoundError):
                os.remove(self._file(key))
        return len(gone)

    def exists(self, key):
        recorded = bool(self.store.read("SELECT 1 FROM nbq_payloads WHERE key = ?", (key,)))
        return recorded and os.path.exists(self._file(key))

    def delete(self, keys):
        keys = list(keys)
        n = 0
        for chunk in _chunks(keys, 500):
            marks = ",".join("?" * len(chunk))
            with self.store.write() as conn:
                conn.execute(f"DELETE FROM nbq_payload_refs WHERE key IN ({marks})", chunk)
                n += conn.execute(f"DELETE FROM nbq_payloads WHERE key IN ({marks})", chunk).rowcount
                for key in chunk:
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(self._file(key))
        return n

    def keys(self):
        return [k for (k,) in self.store.read("SELECT key FROM nbq_payloads ORDER BY key")]

    def links(self, key):
        return dict(self.store.read("SELECT owner, linked_at FROM nbq_payload_refs WHERE key = ?", (key,)))

    def stats(self):
        n, total = self.store.read("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM nbq_payloads")[0]
        return {"payloads": n, "bytes": total}

    def _due(self, now, limit):
        rows = self.store.read("SELECT key FROM nbq_payloads WHERE check_at <= ? ORDER BY check_at LIMIT ?",
                               (now, limit))
        keys = [k for (k,) in rows]
        due: dict[str, dict[str, float]] = {k: {} for k in keys}
        for chunk in _chunks(keys, 500):
            marks = ",".join("?" * len(chunk))
            for key, owner, at in self.store.read(
                    f"SELECT key, owner, linked_at FROM nbq_payload_refs WHERE key IN ({marks})", chunk):
                due[key][owner] = at
        return list(due.items())

    def _unlink(self, pairs, unlinked=()):
        with self.store.write() as conn:
            conn.executemany("DELETE FROM nbq_payload_refs WHERE key = ? AND owner = ?", pairs)
            return self._delete_unlinked(conn, sorted({k for k, _ in pairs} | set(unlinked)))

    def _checked(self, keys, at):
        if keys:
            with self.store.write() as conn:
                conn.executemany("UPDATE nbq_payloads SET check_at = ? WHERE key = ?", [(at, k) for k in keys])

    def _drop_orphans(self, before, limit):
        """Files no row records (a writer died between its file and its transaction), and temporary files."""
        deleted, stale = 0, []
        with contextlib.suppress(FileNotFoundError):
            for sub in os.scandir(self.dir):
                if not sub.is_dir():
                    continue
                for entry in os.scandir(sub.path):
                    with contextlib.suppress(FileNotFoundError):
                        if entry.stat().st_mtime <= before:
                            stale.append(entry)
                if len(stale) >= limit:
                    break
        if stale:
            with self.store.write() as conn:
                for entry in stale[:limit]:
                    key = entry.name.split(".tmp-", 1)[0]
                    recorded = conn.execute("SELECT 1 FROM nbq_payloads WHERE key = ?", (key,)).fetchone()
                    if ".tmp-" in entry.name or recorded is None:
                        with contextlib.suppress(FileNotFoundError):
                            os.remove(entry.path)
                        deleted += ".tmp-" not in entry.name
        return deleted


_SQLITE_LINK = ("INSERT INTO nbq_payload_refs(owner, key, linked_at) VALUES (?, ?, ?) "
                "ON CONFLICT(owner, key) DO UPDATE SET linked_at = excluded.linked_at")


def _sqlite_schema(db) -> None:
    db.execute("CREATE TABLE IF NOT EXISTS nbq_payloads (key TEXT PRIMARY KEY, size INTEGER NOT NULL, "
               "created_at FLOAT NOT NULL, check_at FLOAT NOT NULL) WITHOUT ROWID")
    db.execute("CREATE INDEX IF NOT EXISTS nbq_payloads_check ON nbq_payloads(check_at)")
    db.execute("CREATE TABLE IF NOT EXISTS nbq_payload_refs (owner TEXT NOT NULL, key TEXT NOT NULL, "
               "linked_at FLOAT NOT NULL, PRIMARY KEY (owner, key)) WITHOUT ROWID")
    db.execute("CREATE INDEX IF NOT EXISTS nbq_payload_refs_key ON nbq_payload_refs(key)")
