"""Store drivers: one package per technology, found by URL scheme, imported lazily.

Each driver package's ``__init__`` declares, without importing its client library::

    NAME = "redis"                       # also the section name in a YAML config
    SCHEMES = ("redis", "rediss")        # URL schemes it serves
    BROKER = "nbqueue.drivers.redis.broker:RedisBroker"     # or None
    BACKEND = "nbqueue.drivers.redis.backend:RedisBackend"  # or None
    ENGINE = "nbqueue.drivers.redis.engine:RedisEngine"     # fused engine for a pair on one store, or None
    PAYLOADS = "nbqueue.drivers.redis.payloads:RedisPayloads"  # payload store for large values, or None
    OPTIONS = frozenset({...})           # App options its broker/backend read
    EXTRA = "redis"                      # pip extra that installs its client (None: standard library)
    RESULTS_BESIDE = True                # a broker URL of this driver is the default result backend too
    QUIET_LOGGERS = ("pika",)            # its client library's loggers, kept at WARNING by the CLI
                                         # unless --log-level DEBUG (connection chatter at INFO)
    MAX_QUEUE_NAME = 200                 # the longest queue name (UTF-8 bytes) its broker takes, with
                                         # the names nbqueue derives from it
    RESERVED_QUEUE_PREFIXES = {"amq.": "reserved by RabbitMQ"}   # queue names it refuses, and why
    LOCAL_SCHEMES = ("memory",)          # schemes whose store lives inside the process that opens it

Queue names are checked against every driver's rules at send, so a name that one broker
takes works on every broker.

Adding a store is adding such a package: App, the config checks and ``engine_for`` read
this registry (kombu's alias table, discovered instead of written out).
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib
import pkgutil
import threading
from typing import Any
from urllib.parse import urlsplit

from .. import signature as _signature
from ..errors import ConfigurationError


@dataclasses.dataclass(frozen=True)
class Driver:
    """What a driver package declares (see the module docstring)."""

    name: str
    schemes: tuple[str, ...]
    broker: str | None = None
    backend: str | None = None
    engine: str | None = None
    payloads: str | None = None
    options: frozenset = frozenset()
    extra: str | None = None
    results_beside: bool = False
    quiet_loggers: tuple[str, ...] = ()
    max_queue_name: int | None = None
    reserved_queue_prefixes: tuple[tuple[str, str], ...] = ()
    local_schemes: tuple[str, ...] = ()

    def load(self, kind: str) -> Any:
        """The class named by ``kind`` ("broker", "backend", "engine"); ConfigurationError naming
        the extra to install when its client library is missing."""
        spec = getattr(self, kind)
        if spec is None:
            raise ConfigurationError(f"the {self.name} driver has no {kind}")
        module, _, attr = spec.partition(":")
        try:
            return getattr(importlib.import_module(module), attr)
        except ImportError as exc:
            if self.extra is None or (exc.name or "").startswith("nbqueue"):
                raise
            raise ConfigurationError(f"the {self.name} {kind} needs an optional dependency ({exc.name}): "
                                     f"pip install 'nbqueue[{self.extra}]'") from exc


#: the store of an App given no URL: a file of this machine, nothing to start
DEFAULT_URL = "sqlite://"
#: the longest queue name, in UTF-8 bytes, where no driver declares a shorter one
MAX_QUEUE_NAME = 1000

_lock = threading.Lock()
_drivers: dict[str, Driver] = {}


def drivers() -> dict[str, Driver]:
    """Every driver package under nbqueue.drivers, by name (imported once, cheaply)."""
    if not _drivers:
        with _lock:
            if not _drivers:
                found = {}
                for info in pkgutil.iter_modules(__path__):
                    if not info.ispkg:
                        continue
                    mod = importlib.import_module(f"{__name__}.{info.name}")
                    found[mod.NAME] = Driver(
                        name=mod.NAME, schemes=tuple(mod.SCHEMES), broker=getattr(mod, "BROKER", None),
                        backend=getattr(mod, "BACKEND", None), engine=getattr(mod, "ENGINE", None),
                        payloads=getattr(mod, "PAYLOADS", None),
                        options=frozenset(getattr(mod, "OPTIONS", ())), extra=getattr(mod, "EXTRA", None),
                        results_beside=bool(getattr(mod, "RESULTS_BESIDE", False)),
                        quiet_loggers=tuple(getattr(mod, "QUIET_LOGGERS", ())),
                        max_queue_name=getattr(mod, "MAX_QUEUE_NAME", None),
                        reserved_queue_prefixes=tuple(getattr(mod, "RESERVED_QUEUE_PREFIXES", {}).items()),
                        local_schemes=tuple(getattr(mod, "LOCAL_SCHEMES", ())))
                _drivers.update(found)
    return _drivers


def schemes(kind: str | None = None) -> dict[str, Driver]:
    """URL scheme -> driver, of the drivers that have a ``kind`` ("broker", "backend", "payloads"; None: any)."""
    return {s: d for d in drivers().values() if kind is None or getattr(d, kind) for s in d.schemes}


def driver_for(url: str, kind: str | None = None) -> Driver:
    """The driver serving ``url``'s scheme; ConfigurationError suggesting the nearest scheme."""
    scheme = urlsplit(url).scheme.lower()
    table = schemes(kind)
    if scheme not in table:
        what = {"broker": "broker", "backend": "result backend"}.get(kind or "", "store")
        hint = difflib.get_close_matches(scheme, table, n=1)
        suggestion = f"; did you mean {hint[0]}://?" if hint else ""
        raise ConfigurationError(f"unknown {what} URL scheme {scheme!r} in {url!r}{suggestion} "
                                 f"(known: {', '.join(sorted(table))})")
    return table[scheme]


def store_options() -> frozenset:
    """Every option some driver reads (App passes them through as given)."""
    return frozenset().union(*(d.options for d in drivers().values()))


def quiet_loggers() -> tuple[str, ...]:
    """The client libraries' loggers the drivers declare too talkative at INFO."""
    return tuple(dict.fromkeys(name for d in drivers().values() for name in d.quiet_loggers))


@functools.lru_cache(maxsize=1)
def queue_name_rules() -> tuple[int, tuple[tuple[str, str], ...]]:
    """(the longest queue name, in UTF-8 bytes, that every driver takes; the (prefix, why) pairs
    some driver refuses), read once; nbqueue.signature checks every queue name by them."""
    found = drivers().values()
    longest = min((d.max_queue_name for d in found if d.max_queue_name), default=MAX_QUEUE_NAME)
    return longest, tuple(pair for d in found for pair in d.reserved_queue_prefixes)


_signature.use_queue_name_rules(queue_name_rules)


def holds_payloads(url: str) -> bool:
    """Whether the store ``url`` names can hold payloads (its driver has a payload store)."""
    driver = schemes().get(urlsplit(url).scheme.lower())
    return driver is not None and driver.payloads is not None


def local_to_process(url: str) -> bool:
    """Whether the store ``url`` names lives inside the process that opens it (another
    process opening the same URL gets a store of its own)."""
    scheme = urlsplit(url).scheme.lower()
    driver = schemes().get(scheme)
    return driver is not None and scheme in driver.local_schemes


def payload_store(url: str, *, clock=None, options: dict | None = None):
    """The payload store a URL names: a driver's that holds payloads (sqlite://, redis://,
    rediss://, memory://), or any fsspec URL (``s3://bucket/prefix``, ``file:///dir``)."""
    from ..payloads import FsspecPayloads

    scheme = urlsplit(url).scheme.lower()
    driver = schemes().get(scheme)
    if driver is not None and driver.payloads:
        return driver.load("payloads")(url, clock=clock, options=options)
    if driver is not None or scheme in ("http", "https"):
        raise ConfigurationError(f"payloads={url!r}: {scheme}:// cannot hold payloads; use an fsspec URL "
                                 f"('s3://bucket/prefix', 'file:///shared/dir') or one of "
                                 f"{', '.join(s + '://' for s in sorted(schemes('payloads')))}")
    return FsspecPayloads(url, clock=clock, options=(options or {}).get("payload_options"))


def engine_for(broker, backend):
    """The engine for a pair: the broker driver's fused engine where it serves this pair (the
    two share one store), else a SplitEngine over them. The only place that asks whether two
    stores are one."""
    from ..engine import SplitEngine

    driver = driver_for(broker.url, "broker")
    if driver.engine is not None:
        fused = driver.load("engine")
        if fused.serves(broker, backend):
            return fused(broker, backend)
    return SplitEngine(broker, backend)


def broker_from_url(url: str, **kwargs: Any):
    """A Broker for ``url`` (``clock=``, ``options=`` passed on)."""
    return driver_for(url, "broker").load("broker")(url, **kwargs)


def backend_from_url(url: str, **kwargs: Any):
    """A ResultBackend for ``url`` (``clock=``, ``options=`` passed on)."""
    return driver_for(url, "backend").load("backend")(url, **kwargs)


__all__ = [
    "DEFAULT_URL",
    "Driver",
    "engine_for",
    "holds_payloads",
    "local_to_process",
    "payload_store",
    "drivers",
    "schemes",
    "driver_for",
    "store_options",
    "quiet_loggers",
    "queue_name_rules",
    "broker_from_url",
    "backend_from_url",
]
