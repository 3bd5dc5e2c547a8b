"""Memcache result backend with pymemcache (``pip install 'nbqueue[memcache]'``).

URL: ``memcache://host:11211``, or several servers as machinery spells them,
``memcache://10.0.0.1:11211,10.0.0.2:11211`` (keys spread by hashing; pymemcache's
HashClient). Options (App keyword arguments or URL query): ``key_prefix`` (default
``nbq:``), ``index_size`` (tasks ``app.tasks()`` can list, default 10,000),
``max_item_size`` (bytes, 1024 or more, default 1 MiB: memcached's ``-I``), ``socket_timeout``
and ``socket_connect_timeout`` (seconds, more than 0, default 5), ``results_expire_in``,
``poll_interval`` (longest wait between two reads in ``wait()``, default 0.1 s). A value out
of range is a ConfigurationError naming it when the backend is made.

Capabilities:

- Records: JSON per task, written with the configured expiry (``results_expire_in``;
  none by default). Fencing (begin, set_state, store_result with a token) is a
  compare-and-swap loop (``gets``/``cas``); a record is created with ``add``, so an
  existing one is never overwritten.
- Groups: member lists in chunk keys written once, a bitmap of finished members
  changed by CAS (idempotent per member, atomic), the chord claimed once with ``add``;
  ``claim_once`` is ``add`` with a TTL.
- Waiting: back-off polling (``poll_interval``); waiters in this process are woken at once.
- Listing: **bounded**. Memcache cannot list keys: ``list()`` and ``app.tasks()`` read a
  ring of the ``index_size`` most recently created task ids (``lists_tasks =
  "recent"``); older tasks are still found by id. ``kv_items`` reads small per-namespace
  key lists kept beside the values.
- Eviction: memcached drops items when it runs out of memory, whatever their expiry.
  A small marker per task says the record existed: a record evicted before it was read
  is reported as FAILURE with ``exc_type`` ResultExpired (never PENDING for ever); one
  that expired as configured reads as gone (None), as on every backend. Schedules' state
  (kv values) and worker heartbeats can be evicted too: give memcached enough memory.
- Size: an item holds at most ``max_item_size`` bytes. A task whose arguments do not fit
  is refused at send (SerializationError); a result that does not fit is recorded as
  FAILURE with ``exc_type`` ResultTooLarge; printed output that does not fit is cut.
- ``expire()`` has nothing to sweep: memcached expires items itself and reads skip
  records past their ``expires_at``.
- Connections: a pool per process (pymemcache's PooledClient; thread-safe). A server
  that cannot be reached raises ConnectionLost naming it.
"""
from __future__ import annotations

import functools
import hashlib
import math
import time
from typing import Any, Callable, Sequence
from urllib.parse import urlsplit

from pymemcache.client.base import PooledClient
from pymemcache.client.hash import HashClient
from pymemcache.exceptions import MemcacheError, MemcacheServerError

from ...errors import ConfigurationError, ConnectionLost
from ...options import count, over_query, seconds, string, url_query
from ...urls import redact
from ..keyvalue import KEEP, KeyValueBackend, ValueTooLarge

OPTIONS = {"key_prefix": "nbq:", "index_size": 10_000, "max_item_size": 1_048_576, "socket_timeout": 5.0,
           "socket_connect_timeout": 5.0, "poll_interval": 0.1}
#: the options the backend reads from its URL's query
URL_OPTIONS = frozenset(OPTIONS) | {"results_expire_in"}
#: memcached reads an expiry over 30 days as a Unix time
RELATIVE_LIMIT_S = 30 * 86_400
#: room for memcached's own item header within max_item_size
ITEM_OVERHEAD = 512
#: the smallest max_item_size: memcached's smallest ``-I`` (1 KiB)
MIN_ITEM_SIZE = 1024


def _servers(url: str) -> list[tuple[str, int]]:
    netloc = urlsplit(url).netloc.rpartition("@")[2]
    servers = []
    for part in filter(None, netloc.split(",")):
        if part.startswith("["):                       # [::1]:11211
            host, _, port = part[1:].partition("]")
            port = port.lstrip(":")
        else:
            host, _, port = part.partition(":")
        try:
            servers.append((host or "127.0.0.1", int(port or 11211)))
        except ValueError:
            raise ConfigurationError(
                f"bad memcache server {part!r} in {redact(url)!r} (use memcache://host:11211[,host2:11211])"
            ) from None
    return servers or [("127.0.0.1", 11211)]


def _guarded(method: Callable) -> Callable:
    """Connection failures become ConnectionLost naming the servers."""
    @functools.wraps(method)
    def call(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except ValueTooLarge:
            raise
        except (OSError, MemcacheError) as exc:
            if isinstance(exc, MemcacheServerError) and b"too large" in str(exc).encode().lower():
                raise ValueTooLarge("?", self.max_item_size + 1, self.max_item_size) from None
            raise ConnectionLost(
                f"memcached at {', '.join(f'{h}:{p}' for h, p in self.servers)}: {type(exc).__name__}: {exc}"
            ) from exc

    return call


class MemcacheBackend(KeyValueBackend):
    """Results in memcached; see the module docstring for what it supports."""

    scheme = "memcache"
    evicts = True
    lists_tasks = "recent"

    def __init__(self, url: str = "memcache://127.0.0.1:11211", *, clock=None, options: dict | None = None):
        query = url_query(url, URL_OPTIONS)
        super().__init__(url, clock=clock, options=over_query(query, options))

        def timeout(name: str) -> float:
            return seconds(name, self.options.get(name), OPTIONS[name], positive=True)

        prefix = string("key_prefix", self.options.get("key_prefix"), OPTIONS["key_prefix"], empty=False)
        self.prefix = prefix if prefix.endswith(":") else prefix + ":"
        self.options.setdefault("poll_interval", OPTIONS["poll_interval"])
        self.index_size = count("index_size", self.options.get("index_size"), OPTIONS["index_size"], minimum=0)
        self.max_item_size = count("max_item_size", self.options.get("max_item_size"), OPTIONS["max_item_size"],
                                   minimum=MIN_ITEM_SIZE)
        self.servers = _servers(url)
        common = dict(connect_timeout=timeout("socket_connect_timeout"), timeout=timeout("socket_timeout"),
                      no_delay=True, default_noreply=False)
        if len(self.servers) == 1:
            self.client = PooledClient(self.servers[0], **common)
        else:
            self.client = HashClient(self.servers, use_pooling=True, **common)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {redact(self.url)}>"

    @property
    def _wake_key(self):
        return ("memcache", tuple(self.servers), self.prefix)

    # -- keys and values ------------------------------------------------------------------
    def _k(self, key: str) -> str:
        """The memcache key: the prefixed key when memcache takes it, else a hash of it."""
        full = self.prefix + key
        if len(full) <= 240 and full.isascii() and full.isprintable() and " " not in full:
            return full
        return self.prefix + "#" + hashlib.sha256(key.encode("utf-8")).hexdigest()

    def _value(self, key: str, text: str) -> bytes:
        data = text.encode("utf-8")
        if len(data) + ITEM_OVERHEAD > self.max_item_size:
            raise ValueTooLarge(key, len(data), self.max_item_size - ITEM_OVERHEAD)
        return data

    @staticmethod
    def _expire(ttl: float | None) -> int:
        """Seconds for memcached (0: no expiry), rounded up; a Unix time beyond 30 days."""
        if not ttl:
            return 0
        seconds = max(1, math.ceil(ttl))
        return seconds if seconds <= RELATIVE_LIMIT_S else int(time.time() + seconds)

    # -- primitives ------------------------------------------------------------------------
    @_guarded
    def _read(self, keys: Sequence[str]) -> dict[str, str]:
        out: dict[str, str] = {}
        keys = list(keys)
        for start in range(0, len(keys), 500):
            chunk = keys[start:start + 500]
            names = {self._k(k): k for k in chunk}
            for name, value in self.client.get_many(list(names)).items():
                out[names[name if isinstance(name, str) else name.decode()]] = value.decode("utf-8")
        return out

    @_guarded
    def _add(self, key: str, text: str, ttl: float | None = None) -> bool:
        return bool(self.client.add(self._k(key), self._value(key, text), expire=self._expire(ttl), noreply=False))

    @_guarded
    def _change(self, key: str, change, ttl_of=lambda text: None) -> Any:
        name = self._k(key)
        pause = 0.0005
        while True:
            value, token = self.client.gets(name)
            new, result = change(None if value is None else value.decode("utf-8"))
            if new is KEEP:
                return result
            if new is None:
                self.client.delete(name, noreply=False)
                return result
            data = self._value(key, new)
            expire = self._expire(ttl_of(new))
            if value is None:
                stored = self.client.add(name, data, expire=expire, noreply=False)
            else:
                stored = self.client.cas(name, data, token, expire=expire, noreply=False)
            if stored:
                return result
            time.sleep(pause)           # another writer was first: read again
            pause = min(pause * 2, 0.02)

    @_guarded
    def _counter(self, key: str, n: int) -> int:
        """memcached's own ``incr`` (one round trip), created with ``add`` when missing."""
        name = self._k(key)
        value = self.client.incr(name, n, noreply=False)
        if value is None:
            if self.client.add(name, str(n).encode(), noreply=False):
                return n
            value = self.client.incr(name, n, noreply=False)
        return int(value)

    @_guarded
    def _write(self, items: dict[str, str], ttl: float | None = None) -> None:
        if not items:
            return
        data = {self._k(k): self._value(k, v) for k, v in items.items()}
        failed = self.client.set_many(data, expire=self._expire(ttl), noreply=False)
        if failed:
            raise ConnectionLost(f"memcached did not store {len(failed)} key(s), e.g. {failed[0]!r}")

    @_guarded
    def _delete(self, keys: Sequence[str]) -> None:
        if keys:
            self.client.delete_many([self._k(k) for k in keys], noreply=False)

    @_guarded
    def _touch(self, keys: Sequence[str], ttl: float) -> None:
        for key in keys:
            self.client.touch(self._k(key), self._expire(ttl), noreply=False)

    def close(self) -> None:
        try:
            self.client.close()
        except Exception:
            pass
