"""AMQP (RabbitMQ) result backend with pika, as machinery designs it (``pip install 'nbqueue[amqp]'``).

URL: ``amqp://user:pass@host:5672/vhost`` (``amqps://`` for TLS), as for the AMQP broker,
passed as ``backend=``. Options (App keyword arguments or URL query): ``key_prefix``
(default ``nbq``), ``results_expire_in`` (default here: one day, see below),
``lock_timeout`` (seconds, 0 or more, to wait for a busy lock before BrokerError, default 30),
``poll_interval`` (longest wait between two reads in ``wait()``, default 0.1 s).

Design (machinery's): each task's state is a message in a queue named by the task id,
``<prefix>.r:<task id>``, declared with a per-queue expiry (``x-expires``: RabbitMQ
deletes a queue nobody has read for ``results_expire_in``). Unlike machinery, a state is
not consumed by reading it: a reader takes the message and hands it back (reject with
requeue), and a writer replaces it (publish the new state and acknowledge the old one in
one AMQP transaction), so ``get()`` reads the latest state any number of times, from any
process. The other bookkeeping uses queues the same way: groups
(``<prefix>.g:<id>``, its member chunks and finished-member bitmap, its chord claim),
worker heartbeats (``<prefix>.workers``), one-time claims and the small key-value store.

Atomicity: every read and change of a queue's state holds a lock: a token message in
one of 64 lock queues ``nbq.lock.<n>`` (shared by all prefixes; created on first use,
exactly once, under an exclusive queue ``nbq.lock-boot``). Holding the token (received,
not acknowledged) is holding the lock; RabbitMQ hands it back if the holder's connection
dies, so a crashed process never leaves a lock held. Fencing (begin and store_result
with a token), idempotent group counting and the chord claimed exactly once follow.

Capabilities and limits:

- Listing: **not supported** (``lists_tasks = "none"``). AMQP cannot enumerate queues, and
  this backend keeps no index: ``list(ids=[...])`` works, ``list()`` without ids (and so
  ``app.tasks()``) raises UnsupportedOperation. Use ``app.result(id)``, or SQLite, Redis or
  Memcache results to list tasks.
- Expiry: by disuse, as in machinery: a task's queue is deleted once nobody has read or
  written it for ``results_expire_in`` (one day when not configured, since every task
  has a queue; a PENDING task waiting longer than that in the broker loses its record
  until a worker begins it). A final record also reads as gone after its ``expires_at``.
  ``expire()`` has nothing to sweep.
- Speed: each read or change is a few round trips (lock, read, commit, unlock); use it
  where RabbitMQ is the only server, not for thousands of tasks a second. Waiting is
  back-off polling (``poll_interval``); waiters of this process are woken at once.
- A change whose commit was cut off by a lost connection is tried again once on a new
  connection, which can apply it twice (a state write is the same state twice; a group
  count is idempotent; a chord claim could then report False to both).

Threads: pika is not thread-safe; each thread has its own connection (two channels: one
for lock tokens, one in transaction mode for states). A forked child opens its own.
"""
from __future__ import annotations

import hashlib
import logging
import math
import os
import threading
import time
import zlib
from typing import Any, Sequence

import pika
import pika.exceptions as pex

from ...errors import BrokerError, ConnectionLost
from ...options import over_query, seconds, string
from ...urls import redact
from ..keyvalue import KEEP, KeyValueBackend
from .client import check_url, connection_parameters, refused

log = logging.getLogger(__name__)

#: seconds to wait for a busy lock when lock_timeout is not set
DEFAULT_LOCK_TIMEOUT_S = 30.0
OPTIONS: dict[str, Any] = {"key_prefix": "nbq", "lock_timeout": DEFAULT_LOCK_TIMEOUT_S, "poll_interval": 0.1}
#: the options the backend reads from its URL's query (removed before pika parses the URL)
URL_OPTIONS = frozenset(OPTIONS) | {"results_expire_in"}
#: results expire by disuse after this long when results_expire_in is not set
DEFAULT_EXPIRY_S = 86_400.0
LOCK_PREFIX, LOCK_STRIPES, BOOT_QUEUE = "nbq.lock", 64, "nbq.lock-boot"
CONNECTION_ERRORS = (
    pex.AMQPConnectionError,
    pex.ChannelWrongStateError,
    pex.StreamLostError,
    pex.ConnectionWrongStateError,
    OSError,
)
AUTH_ERRORS = (pex.ProbableAuthenticationError, pex.AuthenticationError, pex.ProbableAccessDeniedError)
PERSISTENT = pika.BasicProperties(delivery_mode=2)

#: lock stripes known to exist, per server and vhost (shared by every backend of this process)
_BOOTED: set = set()
#: queues declared by this process, per server, vhost and prefix (for delete_queues)
_DECLARED: dict[tuple, set[str]] = {}
_DECLARED_LOCK = threading.Lock()


def _lock_timeout(value: object) -> float:
    """The ``lock_timeout`` option in seconds, 0 or more (``inf``: wait for ever; a URL gives it
    as text); the default when it is not given, ConfigurationError when it is not such a number."""
    return seconds("lock_timeout", value, DEFAULT_LOCK_TIMEOUT_S, infinite=True)


class _Missing:
    """basic_get found no queue."""


MISSING = _Missing()


class _Session:
    """One thread's connection: ``lk`` (publisher confirms) holds lock tokens, ``tx``
    (transaction mode) reads and replaces states."""

    def __init__(self, params: pika.ConnectionParameters):
        self.conn = pika.BlockingConnection(params)
        self.thread = threading.current_thread()
        self.lk = self.conn.channel()
        self.lk.confirm_delivery()
        self.tx = self._tx_channel()

    def _tx_channel(self):
        ch = self.conn.channel()
        ch.tx_select()
        return ch

    def reopen_tx(self) -> None:
        self.tx = self._tx_channel()

    def reopen_lk(self) -> None:
        self.lk = self.conn.channel()
        self.lk.confirm_delivery()

    def close(self) -> None:
        try:
            if self.conn.is_open:
                self.conn.close()
        except Exception:
            pass


class AMQPBackend(KeyValueBackend):
    """Results in RabbitMQ queues, one per task; see the module docstring."""

    scheme = "amqp"
    evicts = False
    lists_tasks = "none"
    index_size = 0

    def __init__(self, url: str, *, clock=None, options: dict | None = None):
        query = check_url(url, URL_OPTIONS)
        ours = {k: v for k, v in query.items() if k in URL_OPTIONS}
        super().__init__(url, clock=clock, options=over_query(ours, options))
        if self.results_expire_in is None:
            self.results_expire_in = DEFAULT_EXPIRY_S
        prefix = string("key_prefix", self.options.get("key_prefix"), OPTIONS["key_prefix"], empty=False)
        self.prefix = prefix.rstrip(".:")
        self.lock_timeout = _lock_timeout(self.options.get("lock_timeout"))
        self.options.setdefault("poll_interval", OPTIONS["poll_interval"])
        self._params = connection_parameters(url, ours)
        self._server = (self._params.host, self._params.port, self._params.virtual_host)
        self._pid = os.getpid()
        self._fresh_state()

    def _fresh_state(self) -> None:
        self._local = threading.local()
        self._sessions: list[_Session] = []
        self._sessions_lock = threading.Lock()
        self._ever_connected = getattr(self, "_ever_connected", False)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {redact(self.url)}>"

    @property
    def _wake_key(self):
        return ("amqp-backend", self._server, self.prefix)

    # -- connections --------------------------------------------------------------------------
    def _session(self) -> _Session:
        if os.getpid() != self._pid:      # a forked child: the parent's sockets are not ours
            self._pid = os.getpid()
            self._fresh_state()
        s = getattr(self._local, "session", None)
        if s is not None and s.conn.is_open:
            return s
        try:
            s = _Session(self._params)
        except AUTH_ERRORS as exc:
            raise refused(self.url, self._params, exc) from exc
        except CONNECTION_ERRORS as exc:
            raise ConnectionLost(f"cannot reach RabbitMQ at {redact(self.url)} for results: {exc!r}") from exc
        self._ever_connected = True
        self._local.session = s
        with self._sessions_lock:
            gone = [x for x in self._sessions if not x.thread.is_alive()]
            self._sessions = [x for x in self._sessions if x.thread.is_alive()] + [s]
        for x in gone:
            x.close()
        return s

    def _drop_session(self) -> None:
        s = getattr(self._local, "session", None)
        self._local.session = None
        if s is not None:
            with self._sessions_lock:
                if s in self._sessions:
                    self._sessions.remove(s)
            s.close()

    def _locked(self, key: str, work):
        """Run ``work(session, queue name)`` holding ``key``'s lock; once more on a new connection
        if the connection drops."""
        for attempt in (1, 2):
            s = self._session()
            try:
                tag = self._acquire(s, key)
                try:
                    return work(s, self._queue(key))
                finally:
                    if s.lk.is_open:
                        s.lk.basic_reject(tag, requeue=True)
            except CONNECTION_ERRORS as exc:
                self._drop_session()
                if attempt == 2:
                    raise ConnectionLost(f"lost RabbitMQ at {redact(self.url)} while using results: {exc!r}") from exc
                log.warning("RabbitMQ connection for results lost (%r); reconnecting", exc)

    # -- locks ------------------------------------------------------------------------------------
    @staticmethod
    def _stripe(key: str) -> int:
        return zlib.crc32(key.encode("utf-8")) % LOCK_STRIPES

    def _acquire(self, s: _Session, key: str) -> int:
        stripe = self._stripe(key)
        name = f"{LOCK_PREFIX}.{stripe}"
        self._ensure_stripe(s, stripe)
        started = time.monotonic()
        recheck = started + 5.0
        pause = 0.0005
        while True:
            try:
                method, _, _ = s.lk.basic_get(name, auto_ack=False)
            except pex.ChannelClosedByBroker as exc:
                s.reopen_lk()
                if exc.reply_code != 404:
                    raise
                self._ensure_stripe(s, stripe, force=True)
                continue
            if method is not None:
                return method.delivery_tag
            now = time.monotonic()
            if now > recheck:
                self._ensure_stripe(s, stripe, force=True)
                recheck = now + 5.0
            if now - started > self.lock_timeout:
                raise BrokerError(
                    f"the results lock {name} on {redact(self.url)} has been busy for {self.lock_timeout:g} s"
                )
            time.sleep(pause)
            pause = min(pause * 2, 0.02)

    def _ensure_stripe(self, s: _Session, stripe: int, force: bool = False) -> None:
        """Create lock queue ``stripe`` with its one token, exactly once (under the boot queue)."""
        known = (self._server, stripe)
        if known in _BOOTED and not force:
            return
        name = f"{LOCK_PREFIX}.{stripe}"
        if self._exists(s, name):
            _BOOTED.add(known)
            return
        boot = s.conn.channel()
        try:
            pause = 0.005
            while True:
                try:
                    boot.queue_declare(BOOT_QUEUE, exclusive=True, auto_delete=True)
                    break
                except pex.ChannelClosedByBroker as exc:
                    if exc.reply_code != 405:         # 405 RESOURCE_LOCKED: another process boots a lock
                        raise
                    boot = s.conn.channel()
                    time.sleep(pause)
                    pause = min(pause * 2, 0.2)
            if not self._exists(s, name):
                s.lk.queue_declare(name, durable=True)
                s.lk.basic_publish("", name, b"lock", PERSISTENT)
            boot.queue_delete(BOOT_QUEUE)
        finally:
            if boot.is_open:
                boot.close()
        _BOOTED.add(known)

    @staticmethod
    def _exists(s: _Session, name: str) -> bool:
        probe = s.conn.channel()
        try:
            probe.queue_declare(name, passive=True)
            return True
        except pex.ChannelClosedByBroker as exc:
            if exc.reply_code == 404:
                return False
            raise
        finally:
            if probe.is_open:
                probe.close()

    # -- queues as registers ----------------------------------------------------------------------
    def _queue(self, key: str) -> str:
        name = f"{self.prefix}.{key}"
        if len(name.encode("utf-8")) > 200:
            name = f"{self.prefix}.#{hashlib.sha256(key.encode('utf-8')).hexdigest()}"
        return name

    @staticmethod
    def _take(s: _Session, queue: str):
        """(delivery tag, body) of the queue's state message, (None, None) when it is empty,
        MISSING when there is no such queue."""
        try:
            method, _, body = s.tx.basic_get(queue, auto_ack=False)
        except pex.ChannelClosedByBroker as exc:
            s.reopen_tx()
            if exc.reply_code == 404:
                return MISSING
            raise
        return (method.delivery_tag, body) if method is not None else (None, None)

    def _declare(self, s: _Session, queue: str, ttl: float | None) -> None:
        arguments = {"x-expires": max(1, math.ceil(ttl * 1000))} if ttl else None
        s.tx.queue_declare(queue, durable=True, arguments=arguments)
        with _DECLARED_LOCK:
            _DECLARED.setdefault((self._server, self.prefix), set()).add(queue)

    def _record_ttl(self, key: str) -> float | None:
        """Queues of task records, groups and the worker table expire by disuse; kv values stay."""
        return self.results_expire_in if key.startswith(("r:", "g:")) or key == "workers" else None

    # -- primitives ---------------------------------------------------------------------------------
    def _read(self, keys: Sequence[str]) -> dict[str, str]:
        out: dict[str, str] = {}
        for key in keys:
            def work(s: _Session, queue: str):
                got = self._take(s, queue)
                if got is MISSING or got[0] is None:
                    return None
                s.tx.basic_reject(got[0], requeue=True)
                s.tx.tx_commit()
                return got[1].decode("utf-8")

            text = self._locked(key, work)
            if text is not None:
                out[key] = text
        return out

    def _change(self, key: str, change, ttl_of=lambda text: None) -> Any:
        def work(s: _Session, queue: str):
            got = self._take(s, queue)
            tag, body = (None, None) if got is MISSING else got
            new, result = change(None if body is None else body.decode("utf-8"))
            if new is KEEP:
                if tag is not None:
                    s.tx.basic_reject(tag, requeue=True)
                    s.tx.tx_commit()
                return result
            if new is None:
                if tag is not None:
                    s.tx.basic_ack(tag)
                    s.tx.tx_commit()
                if got is not MISSING:
                    s.tx.queue_delete(queue)
                return result
            if got is MISSING:
                ttl = ttl_of(new)
                self._declare(s, queue, max(ttl or 0, self._record_ttl(key) or 0) or None)
            s.tx.basic_publish("", queue, new.encode("utf-8"), PERSISTENT)
            if tag is not None:
                s.tx.basic_ack(tag)
            s.tx.tx_commit()
            return result

        return self._locked(key, work)

    def _add(self, key: str, text: str, ttl: float | None = None) -> bool:
        return self._change(key, lambda old: (KEEP, False) if old is not None else (text, True), lambda _: ttl)

    def _write(self, items: dict[str, str], ttl: float | None = None) -> None:
        for key, text in items.items():
            self._change(key, lambda old, text=text: (text, None), lambda _: ttl)

    def _delete(self, keys: Sequence[str]) -> None:
        for key in keys:
            self._change(key, lambda old: (None, None) if old is not None else (KEEP, None))

    # -- tidying --------------------------------------------------------------------------------------
    def delete_queues(self) -> int:
        """Delete every queue this process declared under this backend's prefix (tests, tidy-ups)."""
        with _DECLARED_LOCK:
            names = sorted(_DECLARED.pop((self._server, self.prefix), set()) | {self._queue("workers")})
        s = self._session()
        for name in names:
            try:
                s.tx.queue_delete(name)
            except pex.ChannelClosedByBroker:
                s.reopen_tx()
        return len(names)

    def close(self) -> None:
        with self._sessions_lock:
            sessions, self._sessions = self._sessions, []
        for s in sessions:
            s.close()
        self._local = threading.local()
