"""Payloads: large binary values out of band, stored once under their content hash.

A frame, array or pickle whose packed bytes (blobs.py) are longer than the App's
``payload_threshold`` (default 1 MiB; ``None``: always inline) is written to a *payload
store* under ``sha256-<hex of its SHA-256>``, and the JSON of the message or result
carries a small reference instead of the bytes::

    {"__nbq__": "ref", "v": {"key": "sha256-…", "codec": "arrow", "size": 43891992,
                              "summary": "DataFrame 1,000,000×5, 44 MB", "type": "DataFrame",
                              "shape": [1000000, 5], "head": <the first rows, inline>, "store": "<where>"}}

So the queue's tables and keys stay small; ``app.tasks()`` and the notebook views read the
summary (and a DataFrame's first rows) from the reference and never load a payload; the
same bytes sent to a group of 100 tasks are stored once (a send packs each object once,
and a key already stored is only linked). Reading verifies the hash: a truncated or
altered payload raises PayloadCorrupt and is never decoded; one that is gone raises
PayloadMissing naming it (a worker fails that task with it, nothing else).

Stores (``App(payloads=...)``; by default beside the records):

- ``sqlite://`` results (and an SQLite broker with results elsewhere): files beside the
  SQLite file (``nbqueue.db-payloads/``), their links in tables of the file. The bytes are
  written outside any transaction (a large write never holds the file's write lock, nor
  joins a message's transaction) and renamed into place in a short one; no size limit.
- ``redis://``, ``rediss://``, ``memory://``: keys under the store's prefix
  (``P pl:<key>`` the bytes, ``P pl:<key>:refs`` a hash owner -> link time, ``P
  pl:owner:<owner>`` a set of keys, ``P pl:check`` a zset key -> next check); a value
  may be at most 512 MB (Redis' limit), checked before anything is written. A payload is
  scheduled for a sweep check, written, then linked (a Lua script), so a writer that dies
  in between leaves nothing the sweep does not find.
- any fsspec URL, for production: ``s3://bucket/prefix`` (``pip install 'nbqueue[s3]'``),
  ``file:///shared/dir``, ``gs://...``; ``payload_options={...}`` are the filesystem's
  options (``endpoint_url``, ``key``, ``secret``, ...). Layout under the root:
  ``data/<key>``, ``refs/<key>/<owner>`` and ``owners/<owner>/<key>`` (empty markers).
- AMQP or Memcache results with no SQLite or Redis broker have no default store (neither
  holds large values; local files would not reach workers on other machines): a value
  over the threshold is refused at send with PayloadTooLarge saying to set ``payloads=``.

Every App of a deployment (producers and workers) must use the same payload store.

Lifetime: a payload lives while a record references it. Each reference is a link
(payload key, owner), where the owner is the id of a task (or group) record whose
text holds the key: the sender links a message's payloads to its task id, a worker its
result's to the task id, a group's values to the group id, a callback's arguments to the
callback's id, and a ``%%task`` cell's captured inputs to the cell's task id. While a
send encodes, its payloads are held by a *pin* (an owner with no record), dropped when
the send's links are made. ``forget`` releases a task's
links at once and deletes the payloads left without any; ``purge`` releases those of the
tasks it revoked (see ``control.revoke_purged``); expired
records (``results_expire_in``; Redis TTLs too) and anything a crash left behind (a pin,
a link to a record never created, a half-written file) are found by ``sweep``, which the
workers run from their heartbeat (each worker process every ``SWEEP_EVERY`` seconds): a
link older than the store's ``grace`` (an hour) whose owner has no record is removed,
and a payload left without links is deleted. The SQLite and Redis stores link and delete
atomically; an fsspec store has no atomic operations, so a payload the sweep deletes at
the moment another sender stores the same bytes again can be lost (that task then fails
with PayloadMissing naming it).
"""
from __future__ import annotations

import contextlib
import contextvars
import hashlib
import logging
import re
import threading
import time
import uuid
from typing import Any, Callable, Iterable, Sequence
from urllib.parse import quote, unquote, urlsplit

from . import serialization
from .errors import ConfigurationError, PayloadCorrupt, PayloadError, PayloadMissing, PayloadTooLarge
from .options import url_query
from .serialization import PayloadRef, human_size, summary  # noqa: F401  (part of this module's interface)

log = logging.getLogger(__name__)

KEY_PREFIX = "sha256-"
_KEY_RE = re.compile(r"sha256-[0-9a-f]{64}")
_KEY_ONLY = re.compile(r"sha256-[0-9a-f]{64}\Z")
#: the default payload_threshold: values packed larger than this go to the payload store
DEFAULT_THRESHOLD = 1 << 20
#: how often (seconds) one worker of a deployment sweeps the payload store
SWEEP_EVERY = 60.0
#: links a sweep checks at most
SWEEP_LIMIT = 500
#: a DataFrame's reference carries its first rows and columns for previews
HEAD_ROWS, HEAD_COLUMNS, HEAD_LIMIT = 5, 20, 16_384
REDIS_MAX = 512 * 1024 * 1024


def key_of(data: Any) -> str:
    """The content address of bytes-like ``data``: ``sha256-<64 hex digits>``."""
    return KEY_PREFIX + hashlib.sha256(memoryview(data)).hexdigest()


#: a payload read is put in an anonymous memory map from this size (bytes) up
MAPPED_FROM = 1 << 20


def read_buffer(size: int) -> Any:
    """A writable buffer of ``size`` bytes for a payload being read: from MAPPED_FROM up an anonymous
    memory map, which goes back to the system the moment the last view of it is dropped (the C
    allocator would keep a freed block of some sizes, and the next payload would come on top)."""
    if size < MAPPED_FROM:
        return bytearray(size)
    import mmap

    return mmap.mmap(-1, size)


def keys_in(text: str | None) -> set[str]:
    """Payload keys written anywhere in ``text`` (a message body or record field, also
    inside JSON strings nested in it, as a cell's captured inputs are)."""
    if not text or KEY_PREFIX not in text:
        return set()
    return set(_KEY_RE.findall(text))


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# -- stores --------------------------------------------------------------------------------------------

class PayloadStore:
    """Content-addressed bytes with reference tracking. Implementations: SQLitePayloads,
    RedisPayloads, FsspecPayloads. Owners are record ids (or pins, ``pin:...``)."""

    #: the largest payload (bytes) the store holds, None for no limit
    max_size: int | None = None
    #: seconds a link is left alone by ``sweep`` before its owner must have a record
    grace: float = 3600.0
    #: seconds between two sweeps' checks of the same payload's links
    check_every: float = 300.0

    def __init__(self, url: str, *, clock=None):
        from .clock import SYSTEM

        self.url = url
        self.clock = clock or SYSTEM
        self.reads = 0          # payloads read (get), for tests and stats
        self.writes = 0         # payloads written (put that found no copy)

    @property
    def label(self) -> str:
        from .urls import redact

        return redact(self.url)

    def limit_text(self) -> str:
        """What ``max_size`` is, for messages."""
        return f"the {human_size(self.max_size or 0)} the payload store {self.label} can hold"

    # -- the interface ---------------------------------------------------------------------
    def put(self, data: Any, owner: str) -> str:
        """Store bytes-like ``data`` (once: a stored key is only linked) linked to ``owner``; returns its key.
        Raises PayloadTooLarge over ``max_size``."""
        size = memoryview(data).nbytes
        if self.max_size is not None and size > self.max_size:
            raise PayloadTooLarge(f"a payload of {human_size(size)} is more than {self.limit_text()}")
        key = key_of(data)
        if not self.link([key], owner):
            return key
        self._write(key, data, owner)
        self.writes += 1
        return key

    def get(self, key: str, what: str | None = None) -> Any:
        """The bytes of ``key`` (bytes-like), their SHA-256 checked. Raises PayloadMissing, or
        PayloadCorrupt for bytes that do not match their key (never handed on for decoding).
        ``what``: how errors describe the value (its summary)."""
        if not isinstance(key, str) or not _KEY_ONLY.match(key):     # from a message: never a path or pattern
            raise PayloadCorrupt(f"{_short(key)} is not a payload key (sha256-<64 hex digits>); nothing was read")
        name = f"payload {key}" + (f" ({what})" if what else "")
        data = self._read(key, name)
        self.reads += 1
        if key_of(data) != key:
            raise PayloadCorrupt(f"{name} read from the payload store {self.label} does not match its SHA-256 "
                                 f"({memoryview(data).nbytes} bytes read): truncated or corrupted; it was not decoded")
        return data

    def link(self, keys: Iterable[str], owner: str) -> list[str]:
        """Link ``owner`` to each stored key; returns the keys not stored (left unlinked)."""
        raise NotImplementedError

    def release(self, owners: Sequence[str]) -> int:
        """Drop every link of ``owners``; delete payloads left without links. Returns how many were deleted."""
        raise NotImplementedError

    def exists(self, key: str) -> bool:
        raise NotImplementedError

    def delete(self, keys: Iterable[str]) -> int:
        """Delete payloads and their links whatever references them (administration, tests)."""
        raise NotImplementedError

    def keys(self) -> list[str]:
        """Every stored payload key."""
        raise NotImplementedError

    def links(self, key: str) -> dict[str, float]:
        """owner -> link time of ``key``."""
        raise NotImplementedError

    def stats(self) -> dict:
        """``{"payloads": n, "bytes": total}``."""
        raise NotImplementedError

    def sweep(self, alive: Callable[[list[str]], Iterable[str]], *, now: float | None = None,
              limit: int = SWEEP_LIMIT) -> int:
        """Remove links older than ``grace`` whose owner ``alive`` does not report (it returns
        the owners that have a record), and payloads left without links; returns how many
        payloads were deleted. At most ``limit`` payloads' links are checked per call, the
        least recently checked first; an error of ``alive`` removes nothing."""
        now = self._now() if now is None else now
        due = self._due(now, limit)
        owners = sorted({o for _, refs in due for o in refs if not o.startswith("pin:")})
        live = set(alive(owners)) if owners else set()
        before = now - self.grace
        dead = [(key, owner) for key, refs in due for owner, at in refs.items() if owner not in live and at <= before]
        # a payload is due a grace period after it was written at the earliest: one without links is an orphan
        unlinked = [key for key, refs in due if not refs]
        deleted = self._unlink(dead, unlinked) if dead or unlinked else 0
        self._checked([key for key, _ in due], now + self.check_every)
        return deleted + self._drop_orphans(before, limit)

    def close(self) -> None:
        pass

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.label}>"

    # -- what a store implements -----------------------------------------------------------
    def _now(self) -> float:
        return self.clock.time()

    def _write(self, key: str, data: Any, owner: str) -> None:
        raise NotImplementedError

    def _read(self, key: str, name: str) -> Any:
        raise NotImplementedError

    def _due(self, now: float, limit: int) -> list[tuple[str, dict[str, float]]]:
        raise NotImplementedError

    def _unlink(self, pairs: list[tuple[str, str]], unlinked: list[str] = ()) -> int:
        """Remove the links ``pairs`` (key, owner); delete the payloads of those keys, and of
        ``unlinked``, that are left without links (atomically where the store can). How many."""
        raise NotImplementedError

    def _checked(self, keys: list[str], at: float) -> None:
        pass

    def _drop_orphans(self, before: float, limit: int) -> int:
        return 0

    def _missing(self, name: str, detail: str = "") -> PayloadMissing:
        return PayloadMissing(f"{name} is not in the payload store {self.label}{detail}: it was deleted (by hand, "
                              "or with the records that referenced it: forget, expiry, purge), or the sender used "
                              "another payload "
                              "store (every App of a deployment needs the same payloads=)")


def _valid(keys: Iterable[str]) -> tuple[list[str], list]:
    """(the well-formed payload keys among ``keys``, sorted; the others, which are never looked up)."""
    keys = set(keys)
    good = sorted(k for k in keys if isinstance(k, str) and _KEY_ONLY.match(k))
    return good, [k for k in keys if k not in good]


def _chunks(seq: list, n: int):
    for i in range(0, len(seq), n):
        yield seq[i:i + n]


def check_fsspec_url(url: str) -> None:
    """ConfigurationError for an fsspec URL with a query (fsspec would read it as part of the
    path; the filesystem's options are the ``payload_options``)."""
    url_query(url, (), hint="; give the filesystem's options as payload_options")


class FsspecPayloads(PayloadStore):
    """Payloads as objects or files under an fsspec URL (s3://, file://, gs://, ...)."""

    def __init__(self, url: str, *, clock=None, options: dict | None = None):
        try:
            import fsspec
        except ImportError as exc:
            raise ConfigurationError(f"payloads={url!r} needs fsspec (and s3fs for s3://): "
                                     "pip install 'nbqueue[s3]'") from exc
        super().__init__(url, clock=clock)
        check_fsspec_url(url)
        options = dict(options or {})
        scheme = urlsplit(url).scheme.lower()
        if scheme in ("file", "local", ""):
            options.setdefault("auto_mkdir", True)
        try:
            self.fs, root = fsspec.core.url_to_fs(url, **options)
        except ImportError as exc:
            raise ConfigurationError(f"payloads={url!r} needs an fsspec implementation for {scheme}:// ({exc}); "
                                     "for S3: pip install 'nbqueue[s3]'") from exc
        self.root = root.rstrip("/")
        protocols = self.fs.protocol if isinstance(self.fs.protocol, (tuple, list)) else (self.fs.protocol,)
        self.local = "file" in protocols
        self._cursor = 0
        self._next_check: dict[str, float] = {}     # key -> when this process checks its links again

    def _data(self, key: str) -> str:
        return f"{self.root}/data/{key}"

    def _ref(self, key: str, owner: str) -> str:
        return f"{self.root}/refs/{key}/{quote(owner, safe='')}"

    def _owned(self, owner: str, key: str = "") -> str:
        return f"{self.root}/owners/{quote(owner, safe='')}" + (f"/{key}" if key else "")

    def _now(self) -> float:
        return time.time()      # compared with the store's modification times

    def _ls(self, path: str, detail: bool = False) -> list:
        self.fs.invalidate_cache(path)
        try:
            return self.fs.ls(path, detail=detail)
        except FileNotFoundError:
            return []

    def _touch(self, owner: str, key: str) -> None:
        self.fs.pipe_file(self._ref(key, owner), b"")
        self.fs.pipe_file(self._owned(owner, key), b"")

    def _put_data(self, key: str, data: Any) -> None:
        path = self._data(key)
        raw = data if isinstance(data, bytes) else memoryview(data).cast("B").tobytes()
        if self.local:              # a reader never sees half a file: write beside it, then rename
            tmp = f"{path}.tmp-{uuid.uuid4().hex}"
            self.fs.pipe_file(tmp, raw)
            self.fs.mv(tmp, path)
        else:                       # an object store's PUT is atomic
            self.fs.pipe_file(path, raw)

    def _exists(self, path: str) -> bool:
        self.fs.invalidate_cache(path)
        return self.fs.exists(path)

    def link(self, keys, owner):
        keys, missing = _valid(keys)
        for key in keys:
            if self._exists(self._data(key)):
                self._touch(owner, key)
            else:
                missing.append(key)
        return missing

    def _write(self, key, data, owner):
        self._put_data(key, data)
        self._touch(owner, key)
        if not self._exists(self._data(key)):     # deleted by a release or sweep in between: write it again
            self._put_data(key, data)

    def _read(self, key, name):
        try:
            return self.fs.cat_file(self._data(key))
        except FileNotFoundError:
            raise self._missing(name) from None

    def _rm(self, paths: list[str]) -> None:
        for path in paths:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(path)

    def _delete_if_unlinked(self, key: str) -> int:
        if self._ls(f"{self.root}/refs/{key}"):
            return 0
        if not self._exists(self._data(key)):
            return 0
        self._rm([self._data(key)])
        return 1

    def release(self, owners):
        deleted = 0
        for owner in dict.fromkeys(owners):
            keys = [p.rstrip("/").rsplit("/", 1)[-1] for p in self._ls(self._owned(owner))]
            if not keys:
                continue
            self._rm([self._ref(k, owner) for k in keys] + [self._owned(owner, k) for k in keys])
            deleted += sum(self._delete_if_unlinked(k) for k in keys)
        return deleted

    def exists(self, key):
        return self._exists(self._data(key))

    def delete(self, keys):
        n = 0
        for key in keys:
            owners = list(self.links(key))
            self._rm([self._ref(key, o) for o in owners] + [self._owned(o, key) for o in owners])
            if self._exists(self._data(key)):
                self._rm([self._data(key)])
                n += 1
        return n

    def keys(self):
        return sorted(name for name in (p.rstrip("/").rsplit("/", 1)[-1] for p in self._ls(f"{self.root}/data"))
                      if name.startswith(KEY_PREFIX) and ".tmp-" not in name)

    def links(self, key):
        return {unquote(info["name"].rstrip("/").rsplit("/", 1)[-1]): _mtime(info)
                for info in self._ls(f"{self.root}/refs/{key}", detail=True)}

    def stats(self):
        infos = [i for i in self._ls(f"{self.root}/data", detail=True) if ".tmp-" not in i["name"]]
        return {"payloads": len(infos), "bytes": int(sum(i.get("size") or 0 for i in infos))}

    def _due(self, now, limit):
        """Payloads written at least a grace period ago, ``limit`` at a time, in turn."""
        named = ((i["name"].rstrip("/").rsplit("/", 1)[-1], i) for i in self._ls(f"{self.root}/data", detail=True))
        keys = sorted(name for name, info in named
                      if name.startswith(KEY_PREFIX) and ".tmp-" not in name and _mtime(info) <= now - self.grace
                      and self._next_check.get(name, 0.0) <= now)
        if not keys:
            return []
        start = self._cursor % len(keys)
        window = (keys[start:] + keys[:start])[:limit]
        self._cursor = start + len(window)
        return [(key, self.links(key)) for key in window]

    def _checked(self, keys, at):
        if len(self._next_check) > 100_000:
            self._next_check.clear()
        self._next_check.update(dict.fromkeys(keys, at))

    def _unlink(self, pairs, unlinked=()):
        self._rm([self._ref(k, o) for k, o in pairs] + [self._owned(o, k) for k, o in pairs])
        return sum(self._delete_if_unlinked(k) for k in sorted({k for k, _ in pairs} | set(unlinked)))

    def _drop_orphans(self, before, limit):
        """Temporary files of writes whose process died before the rename (payloads without links
        are found through ``_due``)."""
        stale = [i["name"] for i in self._ls(f"{self.root}/data", detail=True)
                 if ".tmp-" in i["name"] and _mtime(i) <= before]
        self._rm(stale[:limit])
        return 0


def _mtime(info: dict) -> float:
    """Modification time (epoch seconds) of an fsspec listing entry, whatever the filesystem calls it."""
    for field in ("mtime", "LastModified", "last_modified", "updated", "created"):
        value = info.get(field)
        if value is None:
            continue
        if isinstance(value, (int, float)):
            return float(value)
        if hasattr(value, "timestamp"):
            return value.timestamp()
        with contextlib.suppress(ValueError):
            import datetime as _dt

            return _dt.datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()
    return 0.0


# -- the App's data plane: encoding out of band, loading, lifetime -------------------------------------

class Plane:
    """An App's payload settings and (created on first use) its store."""

    def __init__(self, *, url: str | None, threshold: int | None, compression: str | None, clock=None,
                 options: dict | None = None, why_none: str = "", resolve: Callable[..., PayloadStore] | None = None):
        """``resolve(url, clock=, options=)``: the store a URL names (nbqueue.drivers.payload_store)."""
        self.resolve = resolve or (
            lambda url, **kwargs: FsspecPayloads(
                url, clock=kwargs.get("clock"), options=(kwargs.get("options") or {}).get("payload_options")
            )
        )
        self.url, self.threshold, self.compression = url, threshold, compression
        self.clock, self.options, self.why_none = clock, dict(options or {}), why_none
        self._store: PayloadStore | None = None
        self._lock = threading.Lock()
        self._next_sweep = 0.0

    @property
    def store(self) -> PayloadStore | None:
        if self._store is None and self.url is not None:
            with self._lock:
                if self._store is None:
                    self._store = self.resolve(self.url, clock=self.clock, options=self.options)
        return self._store

    def encode(self, obj: Any, make: Callable[[str | None], Any], owner: str | None,
               inline: Callable[[Any], dict]) -> dict:
        """The JSON of a binary value: inline, or (larger than the threshold) a reference to
        its payload, stored linked to ``owner`` (else to the send's pin). Raises PayloadTooLarge."""
        scope = _SCOPE.get()
        if scope is not None:
            hit = scope.memo.get(id(obj))
            if hit is not None and hit[0] is obj:
                return hit[1]
        self._check_before_packing(obj)
        blob = make(self.compression)
        if self.threshold is None or blob.size <= self.threshold:
            out = inline(blob)
        else:
            out = self._reference(obj, blob, owner, scope)
            del blob
            _release_unused()
        if scope is not None:
            scope.memo[id(obj)] = (obj, out)
        return out

    def _check_before_packing(self, obj: Any) -> None:
        """An array over the store's limit is refused before it is copied into bytes."""
        if self.compression or self.threshold is None:
            return
        import numpy as np

        if type(obj) is np.ndarray and not obj.dtype.hasobject:
            store = self.store
            limit = store.max_size if store is not None else None
            what = f"ndarray {obj.dtype} {'×'.join(f'{n:,}' for n in obj.shape)} of {human_size(obj.nbytes)}"
            if store is None and obj.nbytes > self.threshold:
                raise PayloadTooLarge(self._no_store(what))
            if limit is not None and obj.nbytes > limit:
                raise PayloadTooLarge(self._too_large(what, store))

    def _no_store(self, what: str) -> str:
        return (f"is {what}, over payload_threshold ({human_size(self.threshold)}), and this App has no payload store "
                f"({self.why_none}); keep large values in one that every worker reaches: "
                "App(..., payloads='s3://bucket/prefix') or payloads='file:///shared/dir' "
                "(or raise payload_threshold to send it inline)")

    @staticmethod
    def _too_large(what: str, store: PayloadStore) -> str:
        return (f"is {what}, more than {store.limit_text()}; keep large values in a payload store without that limit: "
                "App(..., payloads='s3://bucket/prefix') or payloads='file:///shared/dir' (or sqlite:///path.db)")

    def _reference(self, obj: Any, blob, owner: str | None, scope) -> dict:
        info = dict(blob.info)
        if blob.codec == "pickle":
            info["pickled"] = True
        if self.compression and blob.codec == "arrow":
            info["compression"] = self.compression
        text = summary(info, blob.size)
        store = self.store
        what = f"{text.rsplit(', ', 1)[0]} of {human_size(blob.size)} packed"
        if store is None:
            raise PayloadTooLarge(self._no_store(what))
        if store.max_size is not None and blob.size > store.max_size:
            raise PayloadTooLarge(self._too_large(what, store))
        if owner is None:
            if scope is not None:
                if scope.pin is None:
                    scope.pin = f"pin:{uuid.uuid4().hex}"
                scope.store = store
                owner = scope.pin
            else:
                # no send around it: the sweep drops the pin after the grace period
                owner = f"pin:{uuid.uuid4().hex}"
        key = store.put(blob.data, owner)
        v = {"key": key, "codec": blob.codec, "size": blob.size, "summary": text, **info, "store": store.label}
        head = _head(obj)
        if head is not None:
            v["head"] = head
        return {serialization.TAG: "ref", "v": v}

    def load(self, v: dict) -> Any:
        from . import blobs

        store = self.store
        what = v.get("summary") or v["key"]
        if store is None:
            raise PayloadError(f"payload {v['key']} ({what}) cannot be read: this App has no payload store "
                               f"({self.why_none}); it was written to {v.get('store', 'another store')}: "
                               "create the App with the same payloads=")
        _release_unused()           # what earlier values left in Arrow's allocator, before this one is read
        return blobs.unpack(v["codec"], blobs.Handoff(store.get(v["key"], what)), v)   # dropped once decoded

    def upkeep(self, app) -> int:
        """One sweep, at most every SWEEP_EVERY seconds per process (a sweep with nothing due is one small query)."""
        now = time.monotonic()
        if now < self._next_sweep or self.url is None:
            return 0
        self._next_sweep = now + SWEEP_EVERY
        return self.store.sweep(lambda ids: app.backend.states_of(ids))


def _release_unused() -> None:
    """Hand the memory Arrow's allocator keeps after a large stream back to the system now."""
    try:
        import pyarrow as pa

        pa.default_memory_pool().release_unused()
    except Exception:  # an allocator without it
        pass


def _head(obj: Any) -> dict | None:
    """The first rows and columns of a DataFrame or Series, inline, for previews (None if too big)."""
    kind = type(obj).__name__
    if kind not in ("DataFrame", "Series") or not type(obj).__module__.startswith("pandas"):
        return None
    from . import blobs

    try:
        head = obj.iloc[:HEAD_ROWS, :HEAD_COLUMNS] if kind == "DataFrame" else obj.iloc[:HEAD_ROWS]
        blob = blobs.pack(head)
    except Exception:  # a preview is optional
        log.debug("no preview for a %s", kind, exc_info=True)
        return None
    return serialization._blob_to_json(blob) if blob.size <= HEAD_LIMIT else None


def attach(app, *, resolve: Callable[..., PayloadStore], holds: Callable[[str], bool]) -> Plane:
    """Configure ``app.serializer`` with the App's payload options (``payloads``,
    ``payload_threshold``, ``payload_compression``, ``payload_options``); returns the Plane.
    ``resolve(url, clock=, options=)`` makes the store a URL names; ``holds(url)``: whether a
    store URL (the App's results, then its broker) can hold payloads (nbqueue.drivers)."""
    option = app.config.option
    url = option("payloads")
    why = ""
    if url is not None and not holds(url):
        check_fsspec_url(url)         # when the App is made (the store itself is made on first use)
    if url is None:
        for candidate in (app.backend_url, app.broker_url):
            if holds(candidate):
                url = candidate
                break
        else:
            why = (f"its results ({urlsplit(app.backend_url).scheme}://) and broker "
                   f"({urlsplit(app.broker_url).scheme}://) cannot hold large values")
    threshold = option("payload_threshold")
    options = {k: v for k, v in app.config.options.items() if k not in ("clock",)}
    plane = Plane(
        url=url,
        threshold=None if threshold is None else int(threshold),
        compression=option("payload_compression"),
        clock=app.clock,
        options=options,
        why_none=why,
        resolve=resolve,
    )
    app.serializer.plane = plane
    return plane


def plane_of(app) -> Plane | None:
    return getattr(getattr(app, "serializer", None), "plane", None)


class _Scope:
    __slots__ = ("memo", "pin", "store", "owned")

    def __init__(self, owner: str | None = None) -> None:
        self.memo: dict[int, tuple[Any, dict]] = {}
        self.pin: str | None = owner
        self.store: PayloadStore | None = None
        self.owned = owner is not None


_SCOPE: contextvars.ContextVar = contextvars.ContextVar("nbqueue_payload_scope", default=None)


class sending:
    """``with payloads.sending(app):`` around one send (a task, a send_many, a whole workflow):
    each object is packed once, and the payloads written meanwhile are held by one pin until
    the send's links are made (then the pin is dropped: a payload no message references, as
    after a refused argument, is deleted at once). With ``owner`` (a task id known before its
    message is sent, as a ``%%task`` cell's) the payloads are linked to it and stay linked.
    Nested, it joins the outer one. (A class, not a generator: it runs on every send.)"""

    __slots__ = ("scope", "token")

    def __init__(self, app=None, owner: str | None = None):
        self.scope = None if _SCOPE.get() is not None else _Scope(owner)
        self.token = None

    def __enter__(self) -> "_Scope":
        if self.scope is None:
            return _SCOPE.get()
        self.token = _SCOPE.set(self.scope)
        return self.scope

    def __exit__(self, *exc) -> None:
        scope = self.scope
        if scope is None:
            return
        _SCOPE.reset(self.token)
        if scope.pin is not None and not scope.owned and scope.store is not None:
            try:
                scope.store.release([scope.pin])
            except Exception:  # the sweep drops the pin after the grace period
                log.warning("could not drop the pin of a send's payloads; the sweep will", exc_info=True)


def track(app, owner: str, *texts: str | None) -> None:
    """Link the payloads referenced in ``texts`` (a message body, a record's JSON) to ``owner``."""
    for text in texts:
        if text and KEY_PREFIX in text:
            break
    else:           # the common case, on every send: nothing to link
        return
    keys: set[str] = set()
    for text in texts:
        keys |= keys_in(text)
    if not keys:
        return
    plane = plane_of(app)
    store = plane.store if plane is not None else None
    if store is None:
        return
    missing = store.link(keys, owner)
    if missing:
        log.warning("task %s refers to payload(s) the payload store %s does not hold: %s",
                    owner, store.label, ", ".join(missing))


def release(app, owners: Sequence[str]) -> int:
    """After records are forgotten: drop their links and delete payloads left without any."""
    plane = plane_of(app)
    if plane is None or plane.url is None or not owners:
        return 0
    return plane.store.release(list(owners))


def upkeep(app) -> int:
    """From a worker's heartbeat: sweep the App's payload store now and then (see Plane.upkeep)."""
    plane = plane_of(app)
    return plane.upkeep(app) if plane is not None else 0


__all__ = ["PayloadStore", "FsspecPayloads", "PayloadRef", "Plane",
           "attach", "sending", "track", "release", "upkeep", "key_of", "keys_in", "summary",
           "human_size", "DEFAULT_THRESHOLD", "SWEEP_EVERY"]
