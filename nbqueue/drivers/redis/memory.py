"""``memory://``: fakeredis in this process, with the driver's scripts run as their Python twins.

A ``memory://`` client (``connect`` in nbqueue.drivers.redis.client) gets a
``MemoryConnection``, whose server socket runs an EVALSHA of a script that has a twin
(nbqueue.drivers.redis.twins) as that function: where fakeredis would run the Lua, under
the server's lock, with the script's ``redis.call``s made through fakeredis' own command
table (``Call``; its most frequent reads and writes act on the key's value as those commands
do), so keys, types, expiry and blocked clients behave as with the Lua. An
EVALSHA of a script not loaded fails with NOSCRIPT as before; one without a twin runs as Lua.
The scripts of every task's path (``send``, ``reserve``, ``finish``) run as versions of their
twins that make each ``redis.call`` through the function ``Call`` would pick for it, called
straight, and read hashes and the heads of sorted sets from the stored values (``NATIVE``).
The connection hands each command to the socket as its arguments in bytes (``Command``),
the driver's pipelines included: the same fields fakeredis would parse out of RESP, without
packing and parsing it; an EVALSHA of a twin skips the command table's argument parsing,
and so does a BLPOP or BRPOP, whose passes pop from the stored list as fakeredis' do. The
connection decodes replies with the client's encoding directly. A ``memory://`` server's
databases (``MemoryDatabase``) wake a client blocked in BLPOP, BRPOP or BRPOPLPUSH only for
a write to a key it waits on, one client per value, and let a waiter in this process
(``KeyWait``: the result backend's wait for one task) wait for such a write, and read the
task's record, without a command. A server notes the process it is of: a connection made in
a child forked from it fails with ConfigurationError. Everything else is fakeredis' own (its
command table, data types, blocking waits of other commands and server lock), reached
through its socket class and its internal modules.
"""
from __future__ import annotations

import os
import queue
import threading
import time
from collections import defaultdict
from typing import Any, Callable

import hiredis
from fakeredis import FakeRedisConnection, FakeServer
from fakeredis._command_args_parsing import Float, Int, Timeout
from fakeredis._core._database import Database, Item
from fakeredis._helpers import SimpleError, null_terminate
from fakeredis._msgs import CONNECTION_ERROR_MSG, INVALID_HASH_MSG, SCRIPT_ERROR_MSG, WRONGTYPE_MSG
from fakeredis._socket import FakeSocket
from fakeredis._socket._resp import convert_to_resp2
from fakeredis.model import ExpiringMembersSet, Hash, ZSet
from redis.connection import Encoder, HiredisRespSerializer

from ...errors import ConfigurationError
from . import twins
from .twins import FINAL, RECEIVED, TWINS, ErrorReply, _num


def _arg(value: Any) -> bytes:
    """A ``redis.call`` argument as Lua passes it: strings as they are, numbers as ``%.17g``."""
    if type(value) is bytes:
        return value
    if type(value) in (int, float):
        return f"{value:.17g}".encode()
    return str(value).encode()


class Call:
    """``redis.call`` for a Python script: one command run through fakeredis' command
    table on the socket running the script (its errors raised, as the Lua call raises).

    The reads the twins make most (``EXISTS`` of one key, ``HGET``, ``HMGET``, ``ZCARD``, ``ZSCORE``,
    ``ZRANGE key 0 0 WITHSCORES``, a ``ZRANGEBYSCORE`` from ``-inf`` that finds nothing, and an ``HDEL``
    of fields the hash lacks, which writes nothing) are answered from the key's value as those commands answer
    them (an expired key is missing, a key of another type is WRONGTYPE), without the command
    table's argument and write-back machinery; a hash with field expiries takes the command
    table, whose read reports the fields expired by it. So are the writes they make (``HSET``,
    ``HINCRBY``, ``INCR``, ``ZADD key score member``, ``ZREM``, ``SADD``, ``LPUSH``, ``RPUSH``,
    ``PEXPIRE key ms``, ``DEL``: see ``_WRITES``) while nobody is subscribed to anything (a
    subscriber could be listening for keyspace events, which the command table sends)."""

    __slots__ = ("sock",)

    def __init__(self, sock: FakeSocket):
        self.sock = sock

    def __call__(self, name: str, *args: Any) -> Any:
        sock = self.sock
        server = sock._server
        if server.server_type == "redis":
            read = _READS.get(name)
            if read is not None:
                result = read(sock._db, args)
                if result is not _GENERIC:
                    return result
            else:
                write = _WRITES.get(name)
                # (a write that someone subscribed to keyspace events could hear takes the command table)
                if write is not None and not server.subscribers and not server.psubscribers:
                    result = write(sock, [a if type(a) is bytes else _arg(a) for a in args])
                    if result is not _GENERIC:
                        return result
        return self.command(name, args)

    def command(self, name: str, args: tuple) -> Any:
        sock = self.sock
        func, sig = sock._name_to_func(name)
        result = sock._run_command(func, sig, [_arg(a) for a in args], True)
        if isinstance(result, SimpleError):
            raise result
        return result


#: a fast read's answer: take the command table instead
_GENERIC = object()


def _live(db: Any, key: Any) -> Any:
    """The stored item at ``key``, None if missing or expired (then removed), as ``db[key]`` finds it."""
    item = db._dict.get(key)
    if item is not None and item.expireat is not None and item.expireat < db.time:
        del db._dict[key]
        return None
    return item


def _value(db: Any, key: Any, kind: type) -> Any:
    """The value at ``key`` (None if missing or expired), WRONGTYPE for a value not of ``kind``."""
    item = _live(db, key)
    if item is None:
        return None
    if type(item.value) is not kind:
        raise SimpleError(WRONGTYPE_MSG)
    return item.value


def _exists(db: Any, args: tuple) -> Any:
    if len(args) != 1 or type(args[0]) is not bytes:
        return _GENERIC
    return 1 if _live(db, args[0]) is not None else 0


def _hash(db: Any, args: tuple) -> Any:
    if len(args) < 2:
        return _GENERIC
    for a in args:
        if type(a) is not bytes:
            return _GENERIC
    value = _value(db, args[0], Hash)
    if value is not None and value._expiry_heap:        # field expiries: reads report them
        return _GENERIC
    return value


def _hget(db: Any, args: tuple) -> Any:
    if len(args) != 2:
        return _GENERIC
    value = _hash(db, args)
    return value if value is None or value is _GENERIC else value._values.get(args[1])


def _hmget(db: Any, args: tuple) -> Any:
    value = _hash(db, args)
    if value is _GENERIC:
        return value
    return [None] * (len(args) - 1) if value is None else [value._values.get(f) for f in args[1:]]


def _hdel(db: Any, args: tuple) -> Any:
    """``HDEL`` of fields the hash lacks: 0, nothing written (else the command table)."""
    value = _hash(db, args)
    if value is None:
        return 0
    if value is _GENERIC or any(f in value._values for f in args[1:]):
        return _GENERIC
    return 0


def _zscore(db: Any, args: tuple) -> Any:
    if len(args) != 2 or type(args[0]) is not bytes or type(args[1]) is not bytes:
        return _GENERIC
    value = _value(db, args[0], ZSet)
    score = None if value is None else value.get(args[1])
    return None if score is None else Float.encode(score, humanfriendly=False)


def _zcard(db: Any, args: tuple) -> Any:
    if len(args) != 1 or type(args[0]) is not bytes:
        return _GENERIC
    value = _value(db, args[0], ZSet)
    return 0 if value is None else len(value)


def _zrange(db: Any, args: tuple) -> Any:
    if args[1:] != (0, 0, b"WITHSCORES") or type(args[0]) is not bytes:
        return _GENERIC
    value = _value(db, args[0], ZSet)
    if not value:
        return []
    for score, member in value.islice_score(0, 1):
        return [member, Float.encode(score, humanfriendly=False)]
    return []


def _score_bound(text: Any) -> float | None:
    """``text`` as a plain score bound (``float`` of it), None for anything else (the command table reads it)."""
    try:
        return float(text) if b"_" not in text and text.strip() == text else None
    except (TypeError, ValueError):
        return None


def _zrangebyscore(db: Any, args: tuple) -> Any:
    """``ZRANGEBYSCORE key -inf max LIMIT 0 n`` where nothing is due: an empty reply (else the command table)."""
    if len(args) != 6 or args[1] != b"-inf" or args[3:5] != (b"LIMIT", 0) or type(args[0]) is not bytes:
        return _GENERIC
    top = _score_bound(args[2])
    if top is None:
        return _GENERIC
    value = _value(db, args[0], ZSet)
    if not value:
        return []
    for score, _ in value.islice_score(0, 1):
        if score > top:
            return []
    return _GENERIC


_READS: dict[str, Callable[[Any, tuple], Any]] = {
    "exists": _exists, "hget": _hget, "hmget": _hmget, "hdel": _hdel, "zcard": _zcard, "zscore": _zscore,
    "zrange": _zrange,
    "zrangebyscore": _zrangebyscore,
}


# -- writes answered from the key's value -----------------------------------------------------
#
# Each makes the change fakeredis' command makes to the stored value, with the same reply, the
# same errors (checked in the same order: the key's type, then the arguments) and the same
# expiry (a write keeps the key's TTL; a value emptied is removed), and tells the database as
# the command's write-back does (``notify_watch``: WATCHes and blocked clients). Arguments
# arrive as bytes (``_arg``); an argument list of another shape returns ``_GENERIC``.

def _item(db: Any, key: bytes, kind: type) -> Any:
    """The stored item at ``key`` (None if missing or expired), WRONGTYPE for a value not of ``kind``."""
    item = _live(db, key)
    if item is not None and type(item.value) is not kind:
        raise SimpleError(WRONGTYPE_MSG)
    return item


def _stored(db: Any, key: bytes, item: Any, value: Any) -> None:
    """``value`` written at ``key`` (in ``item``, or in a new item without expiry)."""
    if item is None:
        db[key] = Item(value)
    else:
        item.value = value
    db.notify_watch(key)


def _plain_hash(item: Any) -> Any:
    """The hash of ``item`` (a new one when None), or ``_GENERIC`` for one with field expiries."""
    if item is None:
        return Hash()
    value = item.value
    return _GENERIC if value._expiry_heap or value._expirations else value


def _hash_to_write(sock: Any, key: bytes) -> tuple[Any, Any, Any]:
    """(database, item, hash) of ``key`` for a write (see ``_plain_hash``)."""
    db = sock._db
    item = _item(db, key, Hash)
    return db, item, _plain_hash(item)


def _hset_write(sock: Any, args: list) -> Any:
    if len(args) < 3 or len(args) % 2 == 0:
        return _GENERIC
    key = args[0]
    db, item, value = _hash_to_write(sock, key)
    if value is _GENERIC:
        return value
    before = len(value._values)
    value._values.update(zip(args[1::2], args[2::2]))
    _stored(db, key, item, value)
    return len(value._values) - before


def _hincrby_write(sock: Any, args: list) -> Any:
    if len(args) != 3:
        return _GENERIC
    key = args[0]
    db, item, value = _hash_to_write(sock, key)
    if value is _GENERIC:
        return value
    amount = Int.decode(args[2])
    total = Int.decode(value._values.get(args[1], b"0"), decode_error=INVALID_HASH_MSG) + amount
    value._values[args[1]] = sock._encodeint(total)
    _stored(db, key, item, value)
    return total


def _incr_write(sock: Any, args: list) -> Any:
    if len(args) != 1:
        return _GENERIC
    db, key = sock._db, args[0]
    item = _item(db, key, bytes)
    total = Int.decode(b"0" if item is None else item.value) + 1
    _stored(db, key, item, sock._encodeint(total))
    return total


#: ZADD's options: an argument spelled as one of them is read as it (the command table decides)
_ZADD_OPTIONS = frozenset((b"nx", b"xx", b"ch", b"incr", b"gt", b"lt"))


def _zadd_write(sock: Any, args: list) -> Any:
    """``ZADD key score member`` (no options)."""
    if len(args) != 3:
        return _GENERIC
    db, key, member = sock._db, args[0], args[2]
    item = _item(db, key, ZSet)
    if null_terminate(args[1]) in _ZADD_OPTIONS or null_terminate(member) in _ZADD_OPTIONS:
        return _GENERIC
    score = Float.decode(args[1])
    if sock.version >= (7,):
        score = 0.0 + score
    value = ZSet() if item is None else item.value
    before = len(value)
    if value.add(member, score):
        _stored(db, key, item, value)
    return len(value) - before


def _zrem_write(sock: Any, args: list) -> Any:
    if len(args) < 2:
        return _GENERIC
    db, key = sock._db, args[0]
    item = _item(db, key, ZSet)
    if item is None:
        return 0
    value = item.value
    before = len(value)
    for member in args[1:]:
        value.discard(member)
    removed = before - len(value)
    if removed:
        db.notify_watch(key)
        if not value:
            db.pop(key, None)
    return removed


def _sadd_write(sock: Any, args: list) -> Any:
    if len(args) < 2:
        return _GENERIC
    db, key = sock._db, args[0]
    item = _item(db, key, ExpiringMembersSet)
    value = ExpiringMembersSet() if item is None else item.value
    before = len(value)
    value.update(args[1:])
    _stored(db, key, item, value)          # written (and told) even when every member was there
    return len(value) - before


def _push_write(front: bool) -> Callable[[Any, list], Any]:
    def push(sock: Any, args: list) -> Any:
        if len(args) < 2:
            return _GENERIC
        db, key = sock._db, args[0]
        item = _item(db, key, list)
        value = [] if item is None else item.value
        if front:
            for element in args[1:]:
                value.insert(0, element)
        else:
            value.extend(args[1:])
        _stored(db, key, item, value)
        return len(value)

    return push


def _pexpire_write(sock: Any, args: list) -> Any:
    """``PEXPIRE key ms`` (no options)."""
    if len(args) != 2:
        return _GENERIC
    db, key = sock._db, args[0]
    ms = Int.decode(args[1])
    if sock._invalid_expire_in("pexpire", ms, 1, relative=True) is not None:
        return _GENERIC
    item = _live(db, key)
    if item is None:
        return 0
    item.expireat = db.time + ms / 1000.0
    db.schedule_expiry(key, item.expireat)
    db.notify_watch(key)
    return 1


def _del_write(sock: Any, args: list) -> Any:
    if not args:
        return _GENERIC
    db, deleted = sock._db, 0
    for key in dict.fromkeys(args):
        if _live(db, key) is not None:
            db.notify_watch(key)
            db.pop(key, None)
            deleted += 1
    return deleted


_WRITES: dict[str, Callable[[Any, list], Any]] = {
    "hset": _hset_write, "hincrby": _hincrby_write, "incr": _incr_write, "zadd": _zadd_write,
    "zrem": _zrem_write, "sadd": _sadd_write, "lpush": _push_write(True), "rpush": _push_write(False),
    "pexpire": _pexpire_write, "del": _del_write,
}


# -- blocked clients woken by a write to a key they wait on -------------------------------------

class MemoryDatabase(Database):
    """fakeredis' database, waking a ``MemorySocket`` blocked in BLPOP, BRPOP or BRPOPLPUSH only
    for a write to a key it waits on (fakeredis' own wakes every blocked client at every write):
    the first client blocked on that key not woken yet, while fewer clients are woken (and not
    yet served) than the key's list holds values (one for a key of another type or not stored
    yet), so a write that adds nothing to pop (a PEXPIRE, a pop) wakes nobody more. A client that
    leaves its wait while a key of its still holds a value wakes the next one blocked on that
    key, so every value finds a client, as with Redis. Clients blocked in other commands (or
    through other sockets) wake at every write, as fakeredis wakes them."""

    def __init__(self, lock: Any) -> None:
        super().__init__(lock)
        #: key -> the MemorySockets (and KeyWaits) blocked on it, in the order they blocked
        self.blocked: dict[bytes, list[Any]] = {}
        #: the blocked socket running its pass after a wake-up (its own writes tell the database)
        self.serving: Any = None

    def notify_watch(self, key: bytes) -> None:
        if self._watches:
            for sock in self._watches.get(key, ()):
                sock.notify_watch()
        socks = self.blocked.get(key)
        if socks:
            # told before the write-back: a list changed in place by this write is stored as it ends
            item = self._dict.get(key)
            values = len(item.value) if item is not None and type(item.value) is list else 1
            if sum(1 for sock in socks if sock.woken and sock is not self.serving) < values:
                _wake_next(socks)
        if self.condition._waiters:         # type: ignore[attr-defined]
            self.condition.notify_all()
        if self._change_callbacks:
            for callback in self._change_callbacks:
                callback()

    def wake_all(self) -> None:
        super().wake_all()
        for socks in self.blocked.values():
            for sock in socks:
                sock.wake()


def _wake_next(socks: list) -> None:
    """Wake the first of ``socks`` not woken yet."""
    for sock in socks:
        if not sock.woken:
            sock.wake()
            return


def _block(db: MemoryDatabase, waiter: Any, keys: Any) -> None:
    """Register ``waiter`` (``woken``, ``wake()``) as blocked on ``keys`` (under the server's lock)."""
    for key in keys:
        db.blocked.setdefault(key, []).append(waiter)


def _unblock(db: MemoryDatabase, waiter: Any, keys: Any) -> None:
    """Take ``waiter`` off ``keys`` (under the server's lock); a key of them still holding a value
    wakes the next waiter blocked on it (a write wakes one waiter only)."""
    for key in keys:
        waiters = db.blocked[key]
        waiters.remove(waiter)
        if not waiters:
            del db.blocked[key]
    for key in keys:
        waiters = db.blocked.get(key)
        if waiters and key in db:
            _wake_next(waiters)


class KeyWait:
    """A wait in this process for a write to one of ``keys`` (bytes) of a memory:// client's
    database, woken as a client blocked on them in BLPOP would be (see ``MemoryDatabase``), with
    no command sent: ``with KeyWait(client, keys) as wait:`` (registered) ... ``wait.wait(seconds)``
    (True once woken; it stays woken). ``wait.hgetall(key)`` reads a hash of that database, also
    without a command."""

    woken = False

    def __init__(self, client: Any, keys: list[bytes]):
        self._client = client
        kwargs = client.connection_pool.connection_kwargs
        self._server: FakeServer = kwargs["server"]
        self._db = self._server.dbs[kwargs.get("db", 0)]
        self._keys = keys
        self._event = threading.Event()

    def hgetall(self, key: str) -> dict:
        """``client.hgetall(key)``: the hash's fields and values decoded as the client decodes
        replies (``{}`` for a key missing or expired), read under the server's lock as HGETALL
        reads them. A key of another type, a hash with field expiries, a database of another kind
        and a server of another process (a forked child's private copy) take the command instead,
        which answers (or fails) as it does."""
        server, db = self._server, self._db
        if type(db) is not MemoryDatabase or forked_store(server) is not None:
            return self._client.hgetall(key)
        with server.lock:
            db.time = time.time()
            item = _live(db, key.encode())
            if item is None:
                return {}
            value = item.value
            if type(value) is not Hash or value._expiry_heap or value._expirations:
                pairs = None
            else:
                pairs = list(value._values.items())
        if pairs is None:
            return self._client.hgetall(key)
        encoder = self._client.connection_pool.get_encoder()
        if not encoder.decode_responses:
            return dict(pairs)
        encoding, errors = encoder.encoding, encoder.encoding_errors
        return {field.decode(encoding, errors): v.decode(encoding, errors) for field, v in pairs}

    def wake(self) -> None:
        self.woken = True
        self._event.set()

    def wait(self, timeout: float) -> bool:
        return self._event.wait(timeout)

    def __enter__(self) -> KeyWait:
        if isinstance(self._db, MemoryDatabase):
            with self._server.lock:
                _block(self._db, self, self._keys)
        return self

    def __exit__(self, *exc: Any) -> None:
        if isinstance(self._db, MemoryDatabase):
            with self._server.lock:
                _unblock(self._db, self, self._keys)


def memory_server(name: str = "default") -> FakeServer:
    """The fakeredis server of ``memory://NAME``, whose databases are ``MemoryDatabase``s, noting
    its name and the process it is of (``owner_pid``): a ``MemoryConnection`` made in a child
    forked from that process fails (see ``forked_store``)."""
    server = FakeServer()
    server.dbs = defaultdict(lambda: MemoryDatabase(server.lock))
    server.owner_pid = os.getpid()  # type: ignore[attr-defined]
    server.store_name = name  # type: ignore[attr-defined]
    return server


def forked_store(server: FakeServer) -> ConfigurationError | None:
    """The error of a use of ``server`` in a process other than its own (a forked child's private copy
    of it, which no worker of the parent will ever read), or None in its own process."""
    owner = getattr(server, "owner_pid", None)
    if owner is None or owner == os.getpid():
        return None
    return ConfigurationError(
        f"memory://{getattr(server, 'store_name', '')} is a store inside process {owner}, and this process "
        f"({os.getpid()}) was forked from it: its copy is private and no worker of the parent will ever read it. "
        "Share tasks between processes through sqlite:// or redis:// (forked children then work), or start the "
        "child with multiprocessing's 'spawn' or 'forkserver' method and make its App and worker in the child"
    )


class Command(tuple):
    """One command's arguments as the bytes RESP would carry, handed to the server socket as they
    are: the client packs no RESP and the socket parses none (``MemoryConnection.pack_command``)."""


def _command(args: tuple) -> Command | None:
    """``args`` as the redis-py packer (hiredis) sends them: a command name with a space split
    in two, text as UTF-8, an int in decimal, a float as ``repr``; None for another type (the
    packer then reports it)."""
    name = args[0]
    if isinstance(name, str):
        name = name.encode()
    head = name.split() if b" " in name else [name]
    try:
        fields = [arg.encode() if type(arg) is str else arg if type(arg) is bytes else _FIELD[type(arg)](arg)
                  for arg in args[1:]]
    except KeyError:
        return None
    return Command(head + fields)


#: a command's argument of another type than text or bytes as the packer sends it
_FIELD: dict[type, Callable[[Any], bytes]] = {int: b"%d".__mod__, float: lambda arg: repr(arg).encode()}


class MemorySocket(FakeSocket):
    """fakeredis' server socket, running the scripts registered in nbqueue.drivers.redis.twins as
    Python, taking a ``Command`` without RESP in between, and blocked in BLPOP, BRPOP or
    BRPOPLPUSH on a ``MemoryDatabase`` until a write to one of its keys (see there)."""

    #: the keys of the blocking pop running, its condition on the server's lock, whether it was woken
    _pop_keys: tuple | None = None
    _wakeup: threading.Condition | None = None
    woken = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # the replies waiting to be read: FakeSocket's queue.Queue takes a lock and a condition
        # per put and get; this one takes neither (what readers use of it: put, get,
        # get_nowait, qsize, empty)
        self.responses = queue.SimpleQueue()  # type: ignore[assignment]

    def put_response(self, msg: Any) -> None:
        """FakeSocket's ``put_response``: the reply queued and ``response_ready`` set, which
        only a FakeSelector clears (setting it again when set wakes nobody)."""
        responses = self.responses
        if responses is not None:
            responses.put(msg)
            ready = self.response_ready
            if not ready.is_set():
                ready.set()

    def blpop(self, *args: bytes) -> Any:
        return self._keyed(args[:-1], super().blpop, args)

    def brpop(self, *args: bytes) -> Any:
        return self._keyed(args[:-1], super().brpop, args)

    def brpoplpush(self, source: bytes, destination: bytes, timeout: float) -> Any:
        return self._keyed((source,), super().brpoplpush, (source, destination, timeout))

    def _keyed(self, keys: tuple, pop: Callable[..., Any], args: tuple) -> Any:
        self._pop_keys = keys
        try:
            return pop(*args)
        finally:
            self._pop_keys = None

    def wake(self) -> None:
        """End this socket's wait (under the server's lock)."""
        self.woken = True
        if self._wakeup is not None:
            self._wakeup.notify()

    def _blocking(self, timeout: float | None, func: Callable[[bool], Any],
                  shape: Callable[[Any], Any] | None = None) -> Any:
        """fakeredis' ``_blocking`` for a blocking pop on a ``MemoryDatabase``: the same passes,
        replies and timeout, waiting on this socket's own condition, registered under its keys."""
        keys, db = self._pop_keys, self._db
        if keys is None or not isinstance(db, MemoryDatabase):
            return super()._blocking(timeout, func, shape)
        ret = func(True)
        if ret is not None or self._in_transaction:
            return ret if shape is None else shape(ret)
        if self._wakeup is None:
            self._wakeup = threading.Condition(self._server.lock)
        deadline = time.time() + timeout if timeout else None
        self._blocked = True
        _block(db, self, keys)
        try:
            while True:
                left = None if deadline is None else deadline - time.time()
                if left is not None and left <= 0:
                    return None if shape is None else shape(None)
                self.woken = False
                if self._wakeup.wait(timeout=left) is False:
                    return None if shape is None else shape(None)
                if self._unblock_reason is not None:
                    self._take_unblock_reason()
                    return None if shape is None else shape(None)
                db.serving = self
                try:
                    ret = func(False)
                finally:
                    db.serving = None
                if ret is not None:
                    return ret if shape is None else shape(ret)
        finally:
            self._blocked = False
            self._unblock_reason = None
            _unblock(db, self, keys)

    def sendall(self, data: Any) -> None:
        if type(data) is not Command:
            return super().sendall(data)
        if not self._server.connected or self._killed:
            raise self._connection_error_class(CONNECTION_ERROR_MSG)
        if self._paused:                    # commands wait in the parser's buffer: this one goes after them
            return super().sendall(hiredis.pack_command(tuple(data)))
        if not self._run_twin(data) and not self._run_pop(data):
            self._process_command(list(data))
        return None

    def _plain(self) -> bool:
        """Whether this client's next command may skip the command table: a Redis server, the
        client not in a transaction, not subscribed and without CLIENT REPLY set."""
        return not (self.server_type != "redis" or self._queueing or self._pubsub or self._reply_off
                    or self._reply_skip or self._reply_skip_next)

    def _run_locked(self, fields: Command, run: Callable[[], Any]) -> bool:
        """``run()`` as ``_process_command`` runs a command: the ACL check, then under the server's
        lock closed sockets cleaned out, the clock read and the command run, its reply (in the
        client's protocol) or error queued. False (nothing done) where the ACL refuses the command:
        the command table then answers."""
        server = self._server
        try:
            server.acl.validate_command(self._client_info.user, self._client_info, list(fields))
        except SimpleError:
            return False
        result: Any
        with server.lock:
            while server.closed_sockets:
                sock = server.closed_sockets.pop()()
                if sock:
                    sock._cleanup(server)
            now = time.time()
            for db in server.dbs.values():
                db.time = now
            try:
                result = run()
                if self._client_info.protocol_version == 2:
                    result = convert_to_resp2(result)
            except SimpleError as exc:
                result = exc
        self.put_response(self._decode_result(result))
        return True

    def _run_twin(self, fields: Command) -> bool:
        """An EVALSHA of a script with a twin run as ``_process_command`` runs it (``_run_locked``)
        without the command table's argument parsing and reply checks; False (nothing done) for
        any other command, or for a client the command table serves (see ``_plain``)."""
        if len(fields) < 3 or fields[0] not in (b"EVALSHA", b"evalsha") or fields[1] not in TWINS or not self._plain():
            return False
        try:
            numkeys = Int.decode(fields[2])
        except SimpleError:
            return False
        return self._run_locked(fields, lambda: self.evalsha(fields[1], numkeys, *fields[3:]))

    def _run_pop(self, fields: Command) -> bool:
        """A BLPOP or BRPOP on a ``MemoryDatabase`` run as ``_process_command`` runs it
        (``_run_locked``), its passes (``_pop_pass``) taking the value off the stored list as
        fakeredis' do, without the command table's argument parsing and write-back; False
        (nothing done) for any other command, a timeout the command refuses, a client the command
        table serves (see ``_plain``) or a server with subscribers (who may hear keyspace events)."""
        name = fields[0]
        if name in (b"BLPOP", b"blpop"):
            left = True
        elif name in (b"BRPOP", b"brpop"):
            left = False
        else:
            return False
        server = self._server
        if (len(fields) < 3 or type(self._db) is not MemoryDatabase or not self._plain() or server.subscribers
                or server.psubscribers):
            return False
        try:
            timeout = Timeout.decode(fields[-1])
        except SimpleError:
            return False
        keys = tuple(fields[1:-1])

        def run() -> Any:
            self._pop_keys = keys
            try:
                return self._blocking(timeout, lambda first: self._pop_pass(keys, left, first),
                                      self._empty_blocking_reply)
            finally:
                self._pop_keys = None

        return self._run_locked(fields, run)

    def _pop_pass(self, keys: tuple, left: bool, first_pass: bool) -> list | None:
        """fakeredis' ``_bpop_pass``: [key, value] popped from the head (``left``) or tail of the
        first of ``keys`` holding a list with values (a key left empty removed), None when none
        does; a key of another type is WRONGTYPE on the first pass and passed over after."""
        db = self._db
        for key in keys:
            item = _live(db, key)
            if item is None:
                continue
            value = item.value
            if type(value) is not list:
                if first_pass:
                    raise SimpleError(WRONGTYPE_MSG)
                continue
            if value:
                popped = value.pop(0) if left else value.pop()
                db.notify_watch(key)
                if not value:
                    db.pop(key, None)
                return [key, popped]
        return None

    def evalsha(self, sha1: bytes, numkeys: int, *keys_and_args: bytes) -> Any:
        fn = TWINS.get(sha1)
        if fn is None or sha1 not in self._server.script_cache or not 0 <= numkeys <= len(keys_and_args):
            return super().evalsha(sha1, numkeys, *keys_and_args)
        # as fakeredis' EVAL: the script's calls reply in RESP2 and see no HIMPORT fieldsets of the caller
        self._script_resp = 2
        caller_fieldsets, self._fieldsets = self._fieldsets, {}
        # a twin of NATIVE runs as its version there while no subscriber may hear keyspace events
        native = NATIVE.get(getattr(fn, "func", None))   # type: ignore[arg-type]
        server = self._server
        if native is not None and (server.subscribers or server.psubscribers or server.server_type != "redis"):
            native = None
        try:
            if native is not None:
                return native(Call(self), list(keys_and_args[:numkeys]), list(keys_and_args[numkeys:]),
                              **fn.keywords)  # type: ignore[attr-defined]
            return fn(Call(self), list(keys_and_args[:numkeys]), list(keys_and_args[numkeys:]))
        except SimpleError:
            raise
        except ErrorReply as exc:
            raise SimpleError(str(exc)) from exc
        except Exception as exc:        # what a Lua runtime error would be
            raise SimpleError(SCRIPT_ERROR_MSG.format(sha1.decode(), exc)) from exc
        finally:
            self._script_resp = None
            self._fieldsets = caller_fieldsets


class _Packer(HiredisRespSerializer):
    """redis-py's hiredis packer, as a type of its own: the driver's pipeline packs with hiredis
    itself only for a connection whose packer is redis-py's (nbqueue.drivers.redis.client._packed),
    so a ``MemoryConnection``'s pipelines go through its ``pack_commands`` (``Command``s)."""


def _decoded(value: Any, encoding: str, errors: str, other: Callable[[Any], Any]) -> Any:
    """``value`` with its bytes decoded (in lists and dicts too); a value of another type as
    ``other`` decodes it."""
    kind = type(value)
    if kind is bytes:
        return value.decode(encoding, errors)
    if kind is list:
        return [item.decode(encoding, errors) if type(item) is bytes else _decoded(item, encoding, errors, other)
                for item in value]
    if kind is dict:
        return {_decoded(k, encoding, errors, other): _decoded(v, encoding, errors, other) for k, v in value.items()}
    if kind is int or value is None:
        return value
    return other(value)


class MemoryConnection(FakeRedisConnection):
    """A fakeredis connection to a ``MemorySocket``, sending it ``Command``s (its pipelines too)."""

    def _construct_command_packer(self, packer: Any) -> Any:
        return packer if packer is not None else _Packer()

    def pack_command(self, *args: Any) -> list:
        command = _command(args)
        return [command] if command is not None else super().pack_command(*args)

    def pack_commands(self, commands: Any) -> list:
        return [chunk for args in commands for chunk in self.pack_command(*args)]

    def send_command(self, *args: Any, **kwargs: Any) -> None:
        self.send_packed_command(self.pack_command(*args), check_health=kwargs.get("check_health", True))

    def _decode(self, response: Any) -> Any:
        """fakeredis' decoding of a reply for a client that decodes replies: bytes, in lists and
        dicts too, decoded with the client's encoding directly (other values as fakeredis decodes them)."""
        encoder = self.encoder  # type: ignore[attr-defined]
        if type(encoder) is not Encoder or not encoder.decode_responses:
            return super()._decode(response)
        return _decoded(response, encoder.encoding, encoder.encoding_errors, super()._decode)

    def _connect(self) -> FakeSocket:
        """A ``MemorySocket`` on the server; ConfigurationError in a child forked from the server's
        process (every command there fails so: redis-py connects afresh after a fork)."""
        server = self._server
        forked = forked_store(server) if server is not None else None
        if forked is not None:
            raise forked
        if server is None or not server.connected:
            raise self._connection_error_class(CONNECTION_ERROR_MSG)
        return MemorySocket(server, client_class=self._client_class, db=self.db,
                            lua_modules=self._lua_modules, client_info=self._client_info)


# -- the hot scripts on the stored values ------------------------------------------------------
#
# ``send``, ``reserve`` and ``finish`` (the scripts of every task's path) as their twins, each
# ``redis.call`` made by the function ``Call`` would pick for it (``_READS``, ``_WRITES``: the
# same checks, errors and writes), called straight with the arguments as bytes, and a key just
# found missing written without looking it up again. Run in place of the twin by ``evalsha``
# while nobody is subscribed (as ``Call`` takes ``_WRITES``); a call those functions leave to
# the command table goes to it (``Call.command``), as it does from ``Call``.

def _write(call: Call, fn: Callable[[Any, list], Any], name: str, args: list) -> Any:
    """``redis.call(name, *args)`` of a write through its ``_WRITES`` function."""
    result = fn(call.sock, args)
    return call.command(name, tuple(args)) if result is _GENERIC else result


def _read(call: Call, fn: Callable[[Any, tuple], Any], name: str, args: tuple) -> Any:
    """``redis.call(name, *args)`` of a read through its ``_READS`` function."""
    result = fn(call.sock._db, args)
    return call.command(name, args) if result is _GENERIC else result


def _new_hash(db: Any, key: bytes, pairs: Any) -> None:
    """``HSET key *pairs`` of a key found missing (pairs: a non-empty sequence of field-value pairs)."""
    value = Hash()
    value._values.update(pairs)
    db[key] = Item(value)
    db.notify_watch(key)


def _plain_hash_at(db: Any, key: bytes) -> Any:
    """The hash at ``key`` for a read or a write (None if missing or expired, then removed),
    WRONGTYPE for a value of another type, ``_GENERIC`` for a hash with field expiries."""
    item = _live(db, key)
    if item is None:
        return None
    value = item.value
    if type(value) is not Hash:
        raise SimpleError(WRONGTYPE_MSG)
    return _GENERIC if value._expiry_heap or value._expirations else value


def _hmget_of(call: Call, key: bytes, *fields: bytes) -> list:
    """``HMGET key *fields`` (as ``_hmget``)."""
    value = _plain_hash_at(call.sock._db, key)
    if value is None:
        return [None] * len(fields)
    if value is _GENERIC:
        return call("hmget", key, *fields)
    get = value._values.get
    return [get(field) for field in fields]


def _hget_of(call: Call, key: bytes, field: bytes) -> Any:
    """``HGET key field`` (as ``_hget``)."""
    value = _plain_hash_at(call.sock._db, key)
    if value is None:
        return None
    if value is _GENERIC:
        return call("hget", key, field)
    return value._values.get(field)


def _hset(call: Call, db: Any, key: bytes, flat: list) -> None:
    """``HSET key *flat`` (as ``_hset_write``; the reply unused)."""
    value = _plain_hash_at(db, key) if flat and not len(flat) % 2 else _GENERIC
    if value is _GENERIC:
        call("hset", key, *flat)
        return
    pairs = zip(flat[::2], flat[1::2])
    if value is None:
        _new_hash(db, key, pairs)
    else:
        value._values.update(pairs)
        db.notify_watch(key)


def _n_make_ready(call: Call, p: bytes, q: bytes, mid: bytes, prio: bytes | None = None) -> None:
    if prio is None:
        prio = _hget_of(call, p + b"msg:" + mid, b"priority")
    priority = _num(prio) or 0
    seq = _write(call, _incr_write, "incr", [p + b"seq"])
    _write(call, _zadd_write, "zadd", [p + b"q:" + q + b":ready", b"%d" % int((9 - priority) * 1e12 + seq), mid])


def _n_signal(call: Call, p: bytes, q: bytes, count: int, tokens: int, signal_ttl: int) -> None:
    key = p + b"q:" + q + b":signal"
    if _write(call, _LPUSH, "lpush", [key, *[b"1"] * min(count, tokens)]) > tokens:
        call("ltrim", key, 0, tokens - 1)
    _write(call, _pexpire_write, "pexpire", [key, _arg(signal_ttl)])


def _n_create_records(call: Call, keys: list, argv: list, i: int) -> int:
    db = call.sock._db
    for rec in keys[1:]:
        n = int(float(argv[i]))
        pairs = argv[i + 1:i + 1 + 2 * n]
        if _live(db, rec) is None:
            fields = dict(zip(pairs[::2], pairs[1::2]))
            if pairs and not len(pairs) % 2:
                _new_hash(db, rec, fields)
            else:
                call("hset", rec, *pairs)
            created, mid = fields.get(b"created_at"), fields.get(b"id")
            if created is None or mid is None:      # a nil argument of redis.call
                raise ErrorReply("ERR Lua redis lib command arguments must be strings or integers")
            _write(call, _zadd_write, "zadd", [keys[0], created, mid])
        i += 1 + 2 * n
    return i


def _n_publish_messages(call: Call, argv: list, first: int, tokens: int, signal_ttl: int) -> int:
    db = call.sock._db
    p, now = argv[0], _num(argv[1])
    added: dict[bytes, int] = {}
    n = 0
    for i in range(first, len(argv) - 4, 5):
        mid, q, prio, eta, body = argv[i:i + 5]
        key = p + b"msg:" + mid
        if _live(db, key) is None:
            _new_hash(db, key, ((b"queue", q), (b"body", body), (b"priority", prio), (b"attempt", b"0")))
            if eta != b"" and _num(eta) > now:  # type: ignore[operator]
                _write(call, _zadd_write, "zadd", [p + b"q:" + q + b":delayed", eta, mid])
            else:
                _n_make_ready(call, p, q, mid, prio)
            added[q] = added.get(q, 0) + 1
            n += 1
    for q, count in added.items():
        _write(call, _sadd_write, "sadd", [p + b"queues", q])
        _n_signal(call, p, q, count, tokens, signal_ttl)
    return n


def _native_send(call: Call, keys: list, argv: list, *, tokens: int, signal_ttl: int) -> Any:
    """twins.send"""
    return _n_publish_messages(call, argv, _n_create_records(call, keys, argv, 2), tokens, signal_ttl)


def _n_begin_record(call: Call, rec: bytes, index: bytes, mid: bytes, state: bytes, worker: bytes, now: bytes,
                    new: list) -> int:
    db = call.sock._db
    current = _hget_of(call, rec, b"state")
    if current is not None and current in FINAL:
        return 0
    if current is not None:
        _hset(call, db, rec, [b"state", state, b"worker", worker, b"started_at", now])
        return _write(call, _hincrby_write, "hincrby", [rec, b"token", b"1"])
    _hset(call, db, rec, [*new, b"id", mid, b"state", state, b"token", b"1", b"worker", worker, b"started_at", now,
                          b"created_at", now])
    _write(call, _zadd_write, "zadd", [index, now, mid])
    return 1


def _n_lease(call: Call, argv: list, q: bytes, mid: bytes, begin: bool) -> Any:
    p, now, deadline, rec_prefix, index, worker = argv[:6]
    _write(call, _zadd_write, "zadd", [p + b"q:" + q + b":inflight", deadline, mid])
    if rec_prefix == b"" or not begin:
        return b""
    return _n_begin_record(call, rec_prefix + mid, index, mid, RECEIVED, worker, now, [b"queue", q])


def _n_ack(call: Call, p: bytes, mid: bytes, attempt: bytes, rec: bytes | None, final: bool = False) -> int:
    key = p + b"msg:" + mid
    current, q = _hmget_of(call, key, b"attempt", b"queue")
    if current != attempt:
        return 0
    if rec and not final and (_hget_of(call, rec, b"state") or b"") not in FINAL:
        return 0
    if _write(call, _zrem_write, "zrem", [p + b"q:" + q + b":inflight", mid]) == 0:
        return 0
    _write(call, _del_write, "del", [key])
    return 1


def _n_write_state(call: Call, rec: bytes, index: bytes, expiring: bytes, done: bytes, a: list, sets: list,
                   dels: list, done_ttl: int) -> int:
    db = call.sock._db
    mid, state, token, created, ttl_ms, expires_at = a
    current, current_token = _hmget_of(call, rec, b"state", b"token")
    if current is not None:
        if current in FINAL:
            return 0
        if token != b"" and (current_token if current_token is not None else b"0") != token:
            return 0
    else:
        if token != b"":
            return 0
        _hset(call, db, rec, [b"id", mid, b"created_at", created])
        _write(call, _zadd_write, "zadd", [index, created, mid])
    _hset(call, db, rec, [b"state", state, *sets])
    if dels:
        _read(call, _hdel, "hdel", (rec, *dels))
    if ttl_ms != b"":
        _write(call, _pexpire_write, "pexpire", [rec, ttl_ms])
        _write(call, _zadd_write, "zadd", [expiring, expires_at, mid])
    if state in FINAL:
        _write(call, _RPUSH, "rpush", [done, b"1"])
        _write(call, _pexpire_write, "pexpire", [done, _arg(done_ttl)])
    return 1


def _native_finish(call: Call, keys: list, argv: list, *, done_ttl: int) -> Any:
    """twins.finish"""
    p = argv[0]
    rec_prefix, index, expiring, done_prefix = twins.finish_keys(p)
    states, acks = twins.finish_args(argv)
    stored = [_n_write_state(call, rec_prefix + mid, index, expiring, done_prefix + mid, head, fields, extra,
                             done_ttl)
              for mid, head, fields, extra in states]
    final = twins._written_final(states, stored)
    for mid, attempt, checked in acks:
        _n_ack(call, p, mid, attempt, rec_prefix + mid if checked == b"1" else b"", mid in final)
    return stored


def _n_requeue_due(call: Call, p: bytes, now: bytes, batch: bytes, queues: list) -> None:
    db = call.sock._db
    top = _score_bound(now)
    for q in queues:
        for kind in (b"inflight", b"delayed"):
            key = p + b"q:" + q + b":" + kind
            head = _n_first(db, key)
            if head is None or (top is not None and head[0] > top):
                continue            # nothing due (as ``_zrangebyscore`` finds)
            for mid in _read(call, _zrangebyscore, "zrangebyscore", (key, b"-inf", now, b"LIMIT", 0, batch)):
                _write(call, _zrem_write, "zrem", [key, mid])
                if kind == b"inflight" and _read(call, _exists, "exists", (p + b"msg:" + mid,)) == 1:
                    _write(call, _hincrby_write, "hincrby", [p + b"msg:" + mid, b"lapses", b"1"])
                _n_make_ready(call, p, q, mid)


def _n_first(db: Any, key: bytes) -> Any:
    """(score, member) of the lowest member of the sorted set at ``key``, None where it has none:
    what ``ZRANGE key 0 0 WITHSCORES`` tells (its score as text ``float`` reads back exactly)."""
    value = _value(db, key, ZSet)
    return value._byscore[0] if value else None


def _native_reserve(call: Call, keys: list, argv: list) -> Any:
    """twins.reserve"""
    db = call.sock._db
    p, now = argv[0], argv[1]
    limit = _num(argv[6])
    queues = argv[8:]
    _n_requeue_due(call, p, now, argv[7], queues)
    out: list[Any] = [b"", b"0"]
    claimed = 0
    drained = False
    while claimed < limit:  # type: ignore[operator]
        best = None
        best_score = 0.0
        for q in queues:
            head = _n_first(db, p + b"q:" + q + b":ready")
            if head is not None and (best is None or head[0] < best_score):
                best, best_score = (q, head[1]), head[0]
        if best is None:
            drained = True
            break
        q, mid = best
        key = p + b"msg:" + mid
        body, prio, lapses_field = _hmget_of(call, key, b"body", b"priority", b"lapses")
        lapses = _num(lapses_field) or 0
        if body is not None and lapses > 0 and claimed > 0:
            break
        _write(call, _zrem_write, "zrem", [p + b"q:" + q + b":ready", mid])
        if body is not None:
            attempt = _write(call, _hincrby_write, "hincrby", [key, b"attempt", b"1"])
            token = _n_lease(call, argv, q, mid, lapses == 0)
            for v in (mid, q, body, attempt, prio, token, int(lapses)):
                if v is None:
                    break
                out.append(v)
            claimed += 1
            if lapses > 0:
                break
    for q in queues:
        if not drained and _read(call, _zcard, "zcard", (p + b"q:" + q + b":ready",)) > 0:
            out[1] = b"1"
        else:
            _write(call, _del_write, "del", [p + b"q:" + q + b":signal"])
    if out[1] == b"0":
        next_due = None
        for q in queues:
            for kind in (b"inflight", b"delayed"):
                head = _n_first(db, p + b"q:" + q + b":" + kind)
                if head is not None and (next_due is None or head[0] < next_due):
                    next_due = head[0]
        out[0] = b"" if next_due is None else Float.encode(next_due, humanfriendly=False)
    return out


#: the twins (functions of nbqueue.drivers.redis.twins) run as their versions above, while
#: nobody is subscribed to anything on the server
NATIVE: dict[Callable[..., Any], Callable[..., Any]] = {
    twins.send: _native_send, twins.finish: _native_finish, twins.reserve: _native_reserve,
}
_LPUSH = _WRITES["lpush"]
_RPUSH = _WRITES["rpush"]
