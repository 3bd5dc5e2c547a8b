"""Redis connections and what the driver's broker, backend and engine share: clients for
``redis://``, ``rediss://`` and ``memory://`` URLs (fakeredis in this process), the pipeline that
sends scripts as EVALSHA, connection errors as ConnectionLost, and the key prefix option.
"""
from __future__ import annotations

import functools
import ipaddress
import logging
import os
import pathlib
import select
import socket
import threading
import time
import weakref
from typing import TYPE_CHECKING, Any, Callable, Mapping, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from ... import states
from ...errors import ConfigurationError, ConnectionLost
from ...options import count, over_query, seconds, string, url_query
from ...urls import redact

try:
    import hiredis
    from redis._parsers import _HiredisParser as _HIREDIS_PARSER
    from redis._parsers.hiredis import NOT_ENOUGH_DATA as _NOT_ENOUGH_DATA
    from redis.connection import HiredisRespSerializer as _HIREDIS_PACKER
except ImportError:                 # redis-py packs and parses in Python without hiredis
    hiredis = None
    _HIREDIS_PACKER = _HIREDIS_PARSER = _NOT_ENOUGH_DATA = None

if TYPE_CHECKING:
    import fakeredis

log = logging.getLogger(__name__)

DEFAULT_PREFIX = "nbq:"
MIN_BLOCK = 0.01            # a blocking pop timeout of 0 would mean "forever"

_FAKE_SERVERS: dict[str, "fakeredis.FakeServer"] = {}
_FAKE_LOCK = threading.Lock()
_POOLS: "weakref.WeakSet[redis.ConnectionPool]" = (
    weakref.WeakSet()
)  # the pools connect() made (see _after_fork_in_child)


def fake_server(name: str) -> "fakeredis.FakeServer":
    """The in-process fakeredis server called ``name``, created on first use (its databases
    wake a blocked client only for a write to a key it waits on: nbqueue.drivers.redis.memory)."""
    from .memory import memory_server

    with _FAKE_LOCK:
        server = _FAKE_SERVERS.get(name)
        if server is None:
            server = _FAKE_SERVERS[name] = memory_server(name)
        return server


#: nbqueue's own options a Redis URL may carry in its query (taken out before redis-py reads it)
URL_OPTIONS = frozenset({"key_prefix", "max_block", "batch", "retries", "retry_base", "retry_cap"})
#: text arguments of redis-py's connection that its URLs pass on as given (no parser of its own)
_TEXT_PARAMETERS = frozenset({"client_name", "username", "password"})


@functools.lru_cache(maxsize=None)
def client_url_parameters(scheme: str) -> frozenset:
    """The query keys redis-py reads from a ``scheme``:// URL: those it converts
    (``URL_QUERY_ARGUMENT_PARSERS``) and the text ones its connection takes as given; over
    TLS (rediss://), its SSL connection's own arguments (``ssl_cert_reqs``, ``ssl_ca_certs``, ...)."""
    import inspect

    known = frozenset(redis.connection.URL_QUERY_ARGUMENT_PARSERS) | _TEXT_PARAMETERS
    if scheme == "rediss":
        ssl = redis.connection.SSLConnection
        known |= {name for name in inspect.signature(ssl.__init__).parameters if name.startswith("ssl_")}
    else:       # the TLS settings redis-py's parsers know mean nothing without TLS (redis-py refuses them)
        known = frozenset(name for name in known if not name.startswith("ssl_"))
    return known


def check_url(url: str) -> dict[str, str]:
    """The query of a redis://, rediss:// or memory:// URL, checked: ConfigurationError naming
    the URL for a key neither nbqueue (``URL_OPTIONS``) nor redis-py reads (memory://: nbqueue's
    only), and for a redis:// URL without ``//host`` or whose path is not a database number."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme == "memory":
        return url_query(url, URL_OPTIONS, hint="; memory:// takes nbqueue's options only")
    query = url_query(url, URL_OPTIONS, client_url_parameters(scheme), library="redis-py")
    example = f"{scheme}://[:password@]host[:port][/db]"
    if not url.lower().startswith(f"{scheme}://") or not parts.hostname:
        raise ConfigurationError(f"a Redis URL names its host after two slashes ({example}), not {redact(url)!r}")
    try:
        parts.port
    except ValueError:
        raise ConfigurationError(f"bad port in Redis URL {redact(url)!r} ({example})") from None
    db = parts.path.strip("/")
    if db and not db.isdigit():
        raise ConfigurationError(f"the path of a Redis URL is a database number ({example}), "
                                 f"not {parts.path!r} in {redact(url)!r}")
    return query


def database(url: str) -> str:
    """The database number a redis:// URL names (``?db=`` or its path; 0 where it names none)."""
    parts = urlsplit(url)
    return dict(parse_qsl(parts.query)).get("db") or parts.path.strip("/") or "0"


def url_options(url: str, options: Mapping[str, Any] | None) -> dict:
    """``options`` over nbqueue's own options in ``url``'s query (explicit options win); the URL
    checked first (``check_url``)."""
    query = {k: v for k, v in check_url(url).items() if k in URL_OPTIONS}
    return over_query(query, options)


def _client_url(url: str) -> str:
    """``url`` without nbqueue's own query options: what redis-py is given."""
    parts = urlsplit(url)
    if not parts.query:
        return url
    return urlunsplit(
        parts._replace(query=urlencode([(k, v) for k, v in parse_qsl(parts.query) if k not in URL_OPTIONS]))
    )


def connect(url: str, options: Mapping[str, Any], encoding_errors: str = "strict", warn: bool = True) -> redis.Redis:
    """A client for a redis://, rediss:// or memory:// URL, retrying on connection errors.
    ``encoding_errors``: how replies (and commands) are decoded (encoded), as for ``str.decode``;
    ``warn``: log a warning for a remote server reached without a password (once per store)."""
    parts = urlsplit(url)
    kwargs: dict[str, Any] = {"decode_responses": True, "encoding_errors": encoding_errors,
                              **client_settings(url, options)}
    retry = retry_policy(options)
    if parts.scheme == "memory":
        import fakeredis

        from .memory import MemoryConnection

        # an in-process server has no link to check: no health-check PING before each round trip
        kwargs["health_check_interval"] = 0
        client = fakeredis.FakeRedis(server=fake_server(parts.netloc or parts.path.strip("/") or "default"),
                                     connection_class=MemoryConnection, **kwargs)
    else:
        if warn:
            warn_if_exposed(url, options)
        client = redis.Redis.from_url(_client_url(url), **kwargs)
    # set on the pool, so fakeredis (which drops a retry= argument) retries like redis does
    client.set_retry(retry)
    _POOLS.add(client.connection_pool)
    return client


def client_settings(url: str, options: Mapping[str, Any], *, socket_timeout: float = 30.0,
                    client_name: str = "nbqueue") -> dict[str, Any]:
    """redis-py's connection arguments from the options (``socket_timeout``, ``socket_connect_timeout``,
    ``health_check_interval``, ``client_name``, and ``password`` where the URL has none), each
    checked: ConfigurationError naming an option whose value is out of range."""
    settings: dict[str, Any] = {
        "socket_timeout": seconds("socket_timeout", options.get("socket_timeout"), socket_timeout, positive=True),
        "socket_connect_timeout": seconds("socket_connect_timeout", options.get("socket_connect_timeout"), 5.0,
                                          positive=True),
        "health_check_interval": seconds("health_check_interval", options.get("health_check_interval"), 15.0),
        "client_name": string("client_name", options.get("client_name"), client_name),
    }
    password = string("password", options.get("password"), None)
    parts = urlsplit(url)
    if password is not None and parts.scheme != "memory" and not parts.password:
        settings["password"] = password
    return settings


def retry_policy(options: Mapping[str, Any]) -> Retry:
    """How a client retries on connection errors: ``retries`` times (0 or more), waits from
    ``retry_base`` seconds doubling up to ``retry_cap``; ConfigurationError for a value out of range."""
    return Retry(ExponentialBackoff(cap=seconds("retry_cap", options.get("retry_cap"), 5.0),
                                    base=seconds("retry_base", options.get("retry_base"), 0.05)),
                 count("retries", options.get("retries"), 10, minimum=0))


def _after_fork_in_child() -> None:
    """The parent's fakeredis servers (and a lock a thread of it held) stay with the parent.

    Each connection pool gets fresh locks: a pool's ``_lock`` that a thread of the parent held
    at the fork (sending or reading at that moment) stays held in the child, whose first
    command would wait on it for ever (redis-py's own after-fork reset takes that lock, and
    keeps it; its ``_fork_lock`` only times out, with ChildDeadlockedError). The child then
    drops the parent's connections and makes its own, as redis-py does after a fork."""
    global _FAKE_LOCK
    _FAKE_LOCK = threading.Lock()
    _FAKE_SERVERS.clear()
    for pool in list(_POOLS):
        pool._lock = threading.RLock()
        pool._fork_lock = threading.RLock()


os.register_at_fork(after_in_child=_after_fork_in_child)


def warn_if_exposed(url: str, options: Mapping[str, Any]) -> None:
    """Log a warning for a non-loopback Redis reached without a password."""
    parts = urlsplit(url)
    if parts.password or options.get("password"):
        return
    host = parts.hostname or "localhost"
    if _is_loopback(host):
        return
    log.warning("connecting to Redis at %s without a password: anyone who can reach it can read and "
                "inject tasks; set one (redis://:PASSWORD@host/db) or use a private network", redact(url))


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def key_prefix(options: Mapping[str, Any]) -> str:
    """The ``key_prefix`` option ending in ``:`` (``nbq`` and ``nbq:`` are the same prefix); an
    empty one is refused (on a shared server it would silently be the default's)."""
    prefix = string("key_prefix", options.get("key_prefix"), DEFAULT_PREFIX, empty=False)
    return prefix if prefix.endswith(":") else prefix + ":"


class ScriptPipeline(redis.client.Pipeline):
    """A pipeline without a transaction whose scripts go out as EVALSHA.

    redis-py's own pipeline asks SCRIPT EXISTS in a round trip of its own before every
    execute that runs a script. This one remembers, per connection, which scripts it
    has loaded; on a new connection (a first use, a reconnect after a restart) it puts
    SCRIPT LOAD for them at the front of the same write, so the server knows every
    script before the first command runs and the commands run in their order.
    A script lost while the connection stayed up (SCRIPT FLUSH by hand) fails with
    NOSCRIPT: such a command is run again on its own once its script is loaded, so it
    then runs after the pipeline's later commands.
    """

    def load_scripts(self) -> None:
        pass

    def __del__(self) -> None:
        """Nothing to reset: a ScriptPipeline never holds a connection between calls nor WATCHes."""

    def execute(self, raise_on_error: bool = True) -> list:
        stack, scripts = self.command_stack, {s.sha: s for s in self.scripts}
        self.command_stack, self.scripts = [], set()
        if not stack:
            return []
        # the round trip itself, retried on connection errors as redis-py's pipeline does,
        # without what this use has no need of (transactions, WATCH, client-side caching
        # hooks, per-call metrics: see _take)
        pool = self.connection_pool
        conn, taken = _take(pool)
        try:
            replies = conn.retry.call_with_retry(
                lambda: self._round_trip(conn, stack, scripts), lambda error: conn.disconnect()
            )
            lost = [i for i, reply in enumerate(replies) if isinstance(reply, redis.exceptions.NoScriptError)]
            if lost:
                conn._nbq_scripts = None        # the server forgot them: load again next time
        except BaseException:
            conn.disconnect()       # replies may be left unread (an interrupt): the next use reconnects
            raise
        finally:
            _give_back(pool, conn, taken)
        for i in lost:
            if stack[i][0][1] in scripts:
                _, sha, nkeys, *rest = stack[i][0]
                replies[i] = scripts[sha](keys=rest[:int(nkeys)], args=rest[int(nkeys):])
        if raise_on_error:
            self.raise_first_error(stack, replies)
        return replies

    def _round_trip(self, conn, stack: list, scripts: dict) -> list:
        conn.check_health()                 # may reconnect: before the socket is looked at
        if getattr(conn, "_sock", None) is None:
            conn.connect()
        sock = conn._sock
        known = getattr(conn, "_nbq_scripts", None)
        if known is None or known[0] is not sock:
            known = conn._nbq_scripts = (sock, set())
        loads = [script for sha, script in scripts.items() if sha not in known[1]]
        commands = [("SCRIPT", "LOAD", script.script) for script in loads] + [args for args, _ in stack]
        conn.send_packed_command(_packed(conn, commands), check_health=False)
        for _ in loads:
            conn.read_response()
        known[1].update(script.sha for script in loads)
        reader = _reader(conn)
        replies = []
        for args, options in stack:
            try:
                if options is not RAW and (options or args[0] != "EVALSHA"):
                    replies.append(redis.Redis.parse_response(self, conn, args[0], **options))
                elif reader is not None:
                    replies.append(_read(conn, reader))     # as the server sent it: no callback
                else:
                    replies.append(conn.read_response())
            except redis.ResponseError as exc:
                replies.append(exc)
        if reader is not None and conn.health_check_interval:
            conn.next_health_check = time.monotonic() + conn.health_check_interval
        return replies


def _reader(conn) -> Any:
    """The hiredis reader of ``conn`` where its replies may be read from it straight (``_read``):
    a redis-py connection that reads replies as redis-py's own do, with hiredis; else None
    (a fakeredis connection reads its own way)."""
    parser = getattr(conn, "_parser", None)
    if _HIREDIS_PARSER is None or type(parser) is not _HIREDIS_PARSER or type(conn).read_response is not _READ_RESPONSE:
        return None
    return parser._reader


_READ_RESPONSE = redis.connection.AbstractConnection.read_response


def _read(conn, reader) -> Any:
    """One reply of ``conn`` from its hiredis ``reader``, as ``conn.read_response()`` returns it
    (an error reply raised, a RESP3 push handed to the parser's handlers and skipped, connection
    errors as redis-py's), without its per-reply steps."""
    parser = conn._parser
    try:
        while True:
            reply = reader.gets()
            while reply is _NOT_ENOUGH_DATA:
                parser.read_from_socket()
                reply = reader.gets()
            push = parser._hiredis_PushNotificationType
            if push is None or type(reply) is list or not isinstance(reply, push):
                break
            parser.handle_push_response(reply)
    except (redis.ConnectionError, redis.TimeoutError):
        raise
    except OSError as exc:
        raise redis.ConnectionError(f"Error while reading from {conn._host_error()} : {exc.args}") from exc
    kind = type(reply)
    if kind is str or kind is int or reply is None:
        return reply
    if isinstance(reply, Exception):
        raise reply
    if kind is list and reply and isinstance(reply[0], redis.ConnectionError):
        raise reply[0]
    return reply


def _packed(conn, commands: list) -> list:
    """``commands`` in RESP, as ``conn.pack_commands`` makes them: packed by hiredis straight
    away (as redis-py's hiredis packer does, without its pass over every argument) where the
    connection packs with hiredis, no command name holds a space and every argument is text,
    bytes or a number."""
    if (_HIREDIS_PACKER is not None and type(getattr(conn, "_command_packer", None)) is _HIREDIS_PACKER
            and " " not in "".join([args[0] for args in commands])):
        try:
            return [b"".join([hiredis.pack_command(args) for args in commands])]
        except TypeError:           # a buffer (bytearray, memoryview): redis-py's packer copies it first
            pass
    return conn.pack_commands(commands)


def _pool_takes_directly() -> bool:
    """Whether redis-py's ConnectionPool keeps the attributes ``_take`` reads (true of the
    releases the tests cover); with another layout every call goes through ``get_connection()``."""
    pool = redis.ConnectionPool()
    return all(hasattr(pool, name) for name in ("_lock", "_available_connections", "_in_use_connections", "pid"))


_DIRECT = _pool_takes_directly()


def _take(pool) -> tuple[Any, bool]:
    """A connection of ``pool`` and whether it was taken here: an idle connection of a plain
    redis-py pool in the process that made it is taken off the pool's list directly, without
    redis-py's per-call metrics; otherwise ``pool.get_connection()``. Either way a connection
    with unread data (see ``_unread``) is disconnected first, to be connected afresh. A
    ``ScriptPipeline`` reads every reply it asks for, and disconnects when it cannot."""
    plain = _DIRECT and type(pool) is redis.ConnectionPool and "get_connection" not in vars(pool)
    if plain and pool.pid == os.getpid():
        with pool._lock:
            conn = pool._available_connections.pop() if pool._available_connections else None
            if conn is not None:
                pool._in_use_connections.add(conn)
        if conn is not None:
            if _unread(conn):       # left with a reply unread elsewhere (an interrupted command): start afresh
                conn.disconnect()
            return conn, True
    try:
        conn = pool.get_connection()
    except BaseException:
        # redis-py hands a new connection whose handshake was cut short back to the pool
        # connected, its replies unread: idle connections start afresh
        pool.disconnect(inuse_connections=False)
        raise
    if _unread(conn):               # redis-py skips its own check where maintenance notifications are on
        conn.disconnect()
    return conn, False


def _unread(conn) -> bool:
    """Whether ``conn`` has something to read before it is asked anything (a reply nobody
    read, or the server's end of a closed connection): one ``poll`` (``select`` where there
    is none) without waiting on a plain socket, redis-py's ``can_read()`` on others (TLS
    buffers data select cannot see), where a connection the server closed counts as unread."""
    sock = conn._sock
    if sock is None:
        return False
    if type(sock) is socket.socket:
        try:
            if _POLL is not None:
                poller = _POLL()
                poller.register(sock, select.POLLIN)
                return bool(poller.poll(0))
            return bool(select.select([sock], (), (), 0)[0])
        except ValueError:      # a descriptor select cannot take (at or above FD_SETSIZE)
            pass
    try:
        return conn.can_read()
    except redis.ConnectionError:
        return True             # closed by the server: disconnected and connected afresh


_POLL = getattr(select, "poll", None)


def _give_back(pool, conn, taken: bool) -> None:
    """Return ``conn`` to ``pool`` as ``_take`` took it."""
    if not taken:
        pool.release(conn)
        return
    with pool._lock:
        try:
            pool._in_use_connections.remove(conn)
        except KeyError:            # the pool was reset meanwhile (a fork): not its connection any more
            return
        pool._available_connections.append(conn)


#: the options of a command queued on a ScriptPipeline whose reply is returned as the server
#: sent it, without redis-py's response callback (``pipe.command_stack.append((args, RAW))``)
RAW: dict = {}


def pipeline(client: redis.Redis) -> ScriptPipeline:
    """A ``ScriptPipeline`` on ``client`` (a Redis or FakeRedis)."""
    return ScriptPipeline(client.connection_pool, client.response_callbacks, False, None)


class Script(redis.commands.core.Script):
    """A registered script called as redis-py's are (``script(keys=, args=, client=)``), sent
    as EVALSHA straight onto a ``ScriptPipeline``: queued on one given as ``client``, else
    run in a pipeline of its own on ``client`` (or the client it was registered on), where
    redis-py's own call would ask SCRIPT EXISTS or go through its per-command machinery."""

    def __call__(self, keys=None, args=None, client=None):
        keys = keys or ()
        command = ("EVALSHA", self.sha, len(keys), *keys, *(args or ()))
        # (a type check: isinstance goes through a Protocol's slow check for redis-py's classes)
        pipe = client if type(client) is ScriptPipeline else pipeline(client or self.registered_client)
        pipe.scripts.add(self)
        pipe.command_stack.append((command, {}))
        if pipe is client:
            return pipe
        reply = pipe.execute(raise_on_error=False)[0]
        if isinstance(reply, Exception):
            raise reply
        return reply


def register(client: redis.Redis, text: str) -> Script:
    """``text`` as a ``Script`` of ``client`` (see ``Script``)."""
    return Script(client, text)



F = TypeVar("F", bound=Callable[..., Any])


def guarded(method: F) -> F:
    """Turn redis connection errors that survived the client's retries into ConnectionLost,
    and a database the server does not have into a ConfigurationError naming the URL."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise ConnectionLost(f"{self!r}: {exc}") from exc
        except redis.ResponseError as exc:
            url = getattr(self, "url", None) or self.broker.url     # (an engine: its broker's store)
            raise no_database(url, exc) or exc

    return wrapper  # type: ignore[return-value]


def no_database(url: str, exc: redis.ResponseError) -> ConfigurationError | None:
    """The error to raise for ``exc`` when it says the server has no database of the number
    ``url`` names (SELECT when connecting), else None."""
    if "DB index is out of range" not in str(exc):
        return None
    error = ConfigurationError(f"the Redis server of {redact(url)} has no database {database(url)} ({exc}); "
                               "a server has 16 (0 to 15) unless its configuration sets `databases`")
    error.__cause__ = exc
    return error


# The final task states, as a Lua set (shared with nbqueue.drivers.redis.backend).
LUA_FINAL = "local FINAL = {" + ", ".join(f"{s} = true" for s in sorted(states.READY_STATES)) + "}\n"

#: the driver's Lua scripts, one file each (lua/*.lua)
LUA_DIR = pathlib.Path(__file__).with_name("lua")


@functools.lru_cache(maxsize=None)
def _lua_file(name: str) -> str:
    return (LUA_DIR / f"{name}.lua").read_text(encoding="utf-8")


def lua(*names: str, header: str = "") -> str:
    """A script: ``header`` (constants) and the files ``lua/<name>.lua`` joined in order (a
    file of helpers before the script that uses them)."""
    return header + "".join(_lua_file(name) for name in names)
