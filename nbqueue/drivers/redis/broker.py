"""Redis broker: ``redis://[:password@]host[:port][/db]``, ``rediss://`` (TLS), and
``memory://[NAME]`` (fakeredis inside this process; no socket).

Supports: priorities 0-9, delayed messages (eta) moved to ready in batches, leases
with redelivery (no reaper process: every reserve requeues expired leases), fenced
acks (attempt = fencing token), dead letters with a reason, idempotent publish by
message id (an id still stored, whether waiting, in flight or dead, is not published
again), batch reserve, blocking reserve woken by publishes from any process (and
returned early by ``wake()``), retry with exponential back-off on connection errors
(``ConnectionLost`` when it finally fails). Not for Redis Cluster: the scripts build
key names from the prefix.

Bounded redelivery: a lease that runs out adds one to the message's ``lapses`` (when a
reserve requeues it); a message with lapses is claimed alone and its record is not begun
in the claim (the worker first checks that no earlier attempt is alive), and after
``max_deliveries`` lapses it is handed out with ``dead_reason`` set. Claims are read
through a client that decodes with ``surrogateescape``, so a body that is not UTF-8
is handed out for dead-lettering instead of failing the whole claim.

``memory://NAME`` is the same code over a fakeredis ``FakeServer`` shared by name
within the process (default name ``default``); it needs ``fakeredis[lua]``. A forked
child cannot use its parent's ``memory://`` stores (it has a private copy that no
other process reads): they raise ConfigurationError there; a ``memory://`` App made in
the child gets a server of the child's own.

Options: ``key_prefix`` (default ``nbq:``; a missing final colon is added),
``max_block`` (longest single blocking wait in reserve, default 1.0 s), ``batch`` (due
messages moved per queue and call, default 1000), ``retries`` / ``retry_base`` /
``retry_cap`` (connection retry with exponential back-off, default 10 / 0.05 s / 5 s:
waits of 0.1 s doubling up to 5 s, so a worker rides out a Redis restart of about
25 s), ``socket_timeout`` (default 30 s), ``socket_connect_timeout`` (default 5 s),
``health_check_interval`` (default 15 s), ``client_name`` (shown by CLIENT LIST,
default ``nbqueue``), ``password`` (sent to a server whose URL carries none). Seconds
are finite numbers more than 0 (``retry_base``, ``retry_cap`` and ``health_check_interval``:
0 or more), ``batch`` a whole number of at least 1, ``retries`` of at least 0; any other
value is a ConfigurationError naming the option when the store is made. ``key_prefix``,
``max_block``, ``batch`` and ``retries`` / ``retry_base`` / ``retry_cap`` may also be given
in the URL's query, as amqp:// URLs take theirs (``redis://host:6379/0?key_prefix=myapp``),
so a URL alone (NBQUEUE_BROKER, a YAML file) can say it; an option passed explicitly wins
over the URL's. The query may also hold redis-py's own URL parameters (``socket_timeout``,
``db``, ``ssl_cert_reqs`` over rediss://, ...: nbqueue.drivers.redis.client.client_url_parameters),
which reach redis-py as given; any other key, an empty ``key_prefix``, or a URL without
``//host`` is a ConfigurationError when the store is made, and a database number the server
lacks one at the first command.

Keys (``P`` is the prefix)::

    P queues                 set    known queue names
    P seq                    string counter ordering ready and dead messages
    P msg:<id>               hash   queue, body, priority, attempt, lapses, reason
    P q:<queue>:ready        zset   id -> (9 - priority) * 1e12 + seq (lowest first)
    P q:<queue>:delayed      zset   id -> eta
    P q:<queue>:inflight     zset   id -> lease deadline
    P q:<queue>:dead         zset   id -> seq
    P q:<queue>:signal       list   wake-up tokens pushed by publish/retry (BLPOP); deleted by a
                                    claim that leaves the queue with nothing ready
    P wake:<broker instance> list   wake-up tokens for this instance's reservers
"""
from __future__ import annotations

import logging
import threading
import time
import uuid
from typing import Any, Callable, Sequence

import redis

from ...broker import Broker, Delivery, Outgoing, Purged, checked_text, queue_list, shown
from ...options import count, seconds
from . import twins
from .client import LUA_FINAL, MIN_BLOCK, RAW, connect, guarded, key_prefix, lua, pipeline, register, url_options
from .twins import twin

log = logging.getLogger(__name__)

SIGNAL_TOKENS = 64          # at most this many wake-up tokens wait in a signal list
SIGNAL_TTL_MS = 5000        # a token older than this wakes nobody who would not wake anyway
PUBLISH_CHUNK = 500


def _begin_args(records: tuple[str, str, str] | None) -> list[str]:
    """The scripts' record arguments: ``records`` (record key prefix, results index, worker),
    or all '' when no record is to be begun (a broker alone never writes records; the
    driver's engine passes them, see nbqueue.drivers.redis.engine)."""
    return list(records) if records is not None else ["", "", ""]


def _token(reply: str) -> int | None:
    """A fencing token as a script returns it: '' (nothing begun) or 0 (a final record) is None."""
    return (int(reply) or None) if reply != "" else None


def publish_args(outs: Sequence[Outgoing], args: list) -> None:
    """Append the publish script's arguments for ``outs`` to ``args``: (id, queue, priority
    0-9, eta or '', body) per message (see lua/publish_messages.lua)."""
    for o in outs:
        priority = o.priority
        if type(priority) is not int or not 0 <= priority <= 9:
            priority = min(9, max(0, int(priority)))
        args += (o.id, o.queue, priority, "" if o.eta is None else repr(float(o.eta)), o.body)


# -- Lua (scripts in lua/*.lua) -----------------------------------------------------------

LUA_HEADER = f"local TOKENS, SIGNAL_TTL = {SIGNAL_TOKENS}, '{SIGNAL_TTL_MS}'\n" + LUA_FINAL
_PUBLISH = lua("queues", "publish_messages", "publish", header=LUA_HEADER)
_PUBLISH_RESERVED = lua("queues", "begin", "lease", "publish_reserved", header=LUA_HEADER)
_RESERVE = lua("queues", "begin", "lease", "reserve", header=LUA_HEADER)
_SETTLE = lua("queues", "ack", "settle", header=LUA_HEADER)
_PURGE = lua("queues", "purge", header=LUA_HEADER)

# the scripts memory:// runs as Python (see nbqueue.drivers.redis.twins)
twin(_PUBLISH, twins.publish, tokens=SIGNAL_TOKENS, signal_ttl=SIGNAL_TTL_MS)
twin(_PUBLISH_RESERVED, twins.publish_reserved)
twin(_RESERVE, twins.reserve)
twin(_SETTLE, twins.settle, tokens=SIGNAL_TOKENS, signal_ttl=SIGNAL_TTL_MS)


class _Waiting:
    """Counts a blocking round trip among the broker's waiters (see ``RedisBroker.wake``)."""

    __slots__ = ("broker",)

    def __init__(self, broker: "RedisBroker"):
        self.broker = broker

    def __enter__(self) -> None:
        with self.broker._lock:
            self.broker._waiting += 1

    def __exit__(self, *exc: object) -> None:
        with self.broker._lock:
            self.broker._waiting -= 1


class RedisBroker(Broker):
    scheme = "redis"

    def __init__(self, url: str = "memory://", *, clock=None, options: dict | None = None):
        super().__init__(url, clock=clock, options=url_options(url, options))
        self.prefix = key_prefix(self.options)
        # a blocking pop must return well before the socket timeout would break it
        self.max_block = min(seconds("max_block", self.options.get("max_block"), 1.0, positive=True),
                             seconds("socket_timeout", self.options.get("socket_timeout"), 30.0, positive=True) / 2)
        self.batch = count("batch", self.options.get("batch"), 1000)
        self.client = connect(url, self.options)
        # claims and dead letters are read through this one: a body that is not UTF-8 comes back
        # as surrogateescape text (see nbqueue.broker.checked_text) instead of failing the call
        self._reader = connect(url, self.options, encoding_errors="surrogateescape", warn=False)
        self._publish = register(self.client, _PUBLISH)
        self._publish_reserved = register(self.client, _PUBLISH_RESERVED)
        self._reserve = register(self.client, _RESERVE)
        self._settle = register(self.client, _SETTLE)
        self._purge = register(self.client, _PURGE)
        self._wake_key = f"{self.prefix}wake:{uuid.uuid4().hex}"
        self._waiting = 0
        self._lock = threading.Lock()
        self._drained = threading.local()   # .last: (queues, next due) when this thread's last claim emptied them

    def _key(self, queue: str, kind: str) -> str:
        return f"{self.prefix}q:{queue}:{kind}"

    # -- publishing --------------------------------------------------------------
    @guarded
    def publish_many(self, outs: Sequence[Outgoing], client=None) -> None:
        for start in range(0, len(outs), PUBLISH_CHUNK):
            args: list[Any] = [self.prefix, repr(self.clock.time())]
            publish_args(outs[start:start + PUBLISH_CHUNK], args)
            self._publish(args=args, client=client)

    @guarded
    def publish_reserved(
        self, outs: Sequence[Outgoing], *, lease: float, records: tuple[str, str, str] | None = None
    ) -> list[Delivery]:
        """Publish messages already reserved by the caller (a worker's own follow-ups, such as
        the next step of a chain), their ``records`` begun in the same call (see ``claim``). They
        are ordinary messages with a lease: if the caller dies they are delivered again.
        Ids already present are left alone and not returned."""
        now = self.clock.time()
        args: list[Any] = [self.prefix, repr(now), repr(now + lease), *_begin_args(records)]
        for o in outs:
            args += [o.id, o.queue, min(9, max(0, int(o.priority))), o.body]
        tokens = self._publish_reserved(args=args)
        return [
            Delivery(
                message_id=o.id,
                queue=o.queue,
                body=o.body,
                attempt=1,
                lease_until=now + lease,
                tag=1,
                priority=o.priority,
                token=_token(token),
                message=o.message,
            )
            for o, token in zip(outs, tokens)
            if token != "-"
        ]

    @guarded
    def ack_many(self, deliveries: Sequence[Delivery], client=None, records: dict | None = None) -> list[bool]:
        """``client``: a pipeline to queue the acks on (nothing returned); ``records``: message
        id -> result record key, whose acks act only once that record is final (see
        nbqueue.drivers.redis.engine)."""
        pipe = client or pipeline(self.client)
        now = repr(self.clock.time())
        for d in deliveries:
            self._settle(
                args=[self.prefix, d.message_id, str(d.tag), "ack", now, (records or {}).get(d.message_id, "")],
                client=pipe,
            )
        return [] if client is not None else [reply == 1 for reply in pipe.execute()]

    # -- consuming ---------------------------------------------------------------
    def reserve(
        self, queues: Sequence[str], *, timeout: float = 0.0, lease: float = 30.0, limit: int = 1
    ) -> list[Delivery]:
        return self.claim(queues, timeout=timeout, lease=lease, limit=limit)

    @guarded
    def claim(self, queues: Sequence[str], *, timeout: float = 0.0, lease: float = 30.0, limit: int = 1,
              records: tuple[str, str, str] | None = None) -> list[Delivery]:
        """``reserve`` that, given ``records`` (record key prefix, results index, worker: the
        result backend on this server, as the driver's engine passes them), also begins the
        claimed tasks' records in the claim script; each delivery's ``token`` is then its
        fencing token (None where the record is final)."""
        queues = queue_list(queues)
        key = tuple(queues)
        deadline = time.monotonic() + max(0.0, timeout)
        # (queues, next due) while this thread knows these queues hold nothing ready: from
        # its last call (unless this one may not wait), then from each claim of this call
        empty = self._drained.__dict__.pop("last", None)
        if timeout <= 0 or (empty is not None and empty[0] != key):
            empty = None
        while True:
            now = self.clock.time()
            if empty is not None and (empty[1] is None or empty[1] > now):
                # nothing ready and nothing delayed due: anything published since has pushed
                # a signal token, so block on the signal lists before claiming again
                next_due = empty[1]
            else:
                deliveries, next_due, more = self._claim(queues, now, lease, limit, records)
                if deliveries:
                    if not more:
                        self._drained.last = (key, next_due)
                    return deliveries
                empty = (key, next_due)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._drained.last = empty          # still known empty: the next call waits first
                return []
            wait = min(remaining, self.max_block)
            if next_due is not None:
                wait = min(wait, max(0.0, next_due - now) + 0.001)
            woken, (deliveries, next_due, more) = self._sleep_then_claim(queues, wait, now, lease, limit, records)
            if deliveries or woken:
                if deliveries and not more:
                    self._drained.last = (key, next_due)
                return deliveries
            empty = (key, next_due)

    def drained(self, queues: Sequence[str]) -> bool:
        """Whether this thread's last claim on ``queues`` left nothing ready in them (its next
        claim waits for a publish first)."""
        last = getattr(self._drained, "last", None)
        return last is not None and last[0] == tuple(queue_list(queues))

    def queue_claim(self, pipe, queues: Sequence[str], *, lease: float, limit: int,
                    records: tuple[str, str, str] | None = None,
                    wait: float = 0.0) -> tuple[Callable[[list], list[Delivery]], int]:
        """Queue a claim on ``pipe``, a pipeline of ``self._reader``: one that does not wait
        (``claim`` with no timeout), or given ``wait`` (seconds) and queues this thread's last
        claim left empty (``drained``), one that first waits up to ``wait`` for a publish or a
        ``wake()``, as ``claim`` does (run ``pipe`` inside ``waiting()`` then). Returns the
        function that reads the claim's reply (the last of the replies it queued) into
        deliveries, noting for this thread's next claim whether it left the queues empty,
        and how many replies it queued (1, or 2 with a wait)."""
        queues = queue_list(queues)
        now = self.clock.time()
        replies = 1
        last = getattr(self._drained, "last", None)
        if wait > 0 and last is not None and last[0] == tuple(queues) and (last[1] is None or last[1] > now):
            if last[1] is not None:
                wait = min(wait, last[1] - now + 0.001)
            wait = max(MIN_BLOCK, wait)
            self._queue_wait(pipe, queues, wait)
            lease += wait       # a lease from the end of the wait: never shorter than asked
            replies = 2
        self._reserve(args=self._claim_args(queues, now, lease, limit, records), client=pipe)

        def parse(reply: list) -> list[Delivery]:
            deliveries, next_due, more = self._parse_claim(reply, now + lease)
            if deliveries and more:
                self._drained.__dict__.pop("last", None)
            else:
                self._drained.last = (tuple(queues), next_due)
            return deliveries

        return parse, replies

    def _queue_wait(self, pipe, queues: list[str], wait: float) -> None:
        """Queue on ``pipe`` a wait of up to ``wait`` seconds (at least MIN_BLOCK) for a publish
        signal of ``queues`` or a ``wake()``: a BLPOP whose reply, the key and token popped or
        None, is read as the server sent it."""
        keys = [self._wake_key] + [self._key(q, "signal") for q in queues]
        pipe.command_stack.append((("BLPOP", *keys, wait), RAW))

    def waiting(self) -> "_Waiting":
        """A context for a round trip that blocks on this broker's wake-up key: ``wake()`` ends it."""
        return _Waiting(self)

    def _claim_args(self, queues: list[str], now: float, lease: float, limit: int, records: tuple | None) -> list:
        return [
            self.prefix,
            repr(now),
            repr(now + lease),
            *_begin_args(records),
            max(1, int(limit)),
            self.batch,
            *queues,
        ]

    def _parse_claim(self, reply: list, lease_until: float) -> tuple[list[Delivery], float | None, bool]:
        """The reserve script's reply: the deliveries claimed, the next due time when no
        ready message is left, and whether any is."""
        next_due = float(reply[0]) if reply[0] != "" else None
        deliveries = []
        for mid, q, body, attempt, prio, token, lapses in zip(*[iter(reply[2:])] * 7):
            body, problem = checked_text(body)
            deliveries.append(
                Delivery(
                    message_id=mid,
                    queue=q,
                    body=body,
                    attempt=int(attempt),
                    lease_until=lease_until,
                    tag=int(attempt),
                    priority=int(prio or 0),
                    token=_token(token),
                    lapsed=int(lapses),
                    dead_reason=problem or self.limit_reason(int(lapses)),
                )
            )
        return deliveries, next_due, reply[1] == "1"

    def _claim(
        self, queues: list[str], now: float, lease: float, limit: int, records: tuple | None = None
    ) -> tuple[list[Delivery], float | None, bool]:
        """Run the reserve script once (see ``_parse_claim``)."""
        return self._parse_claim(
            self._reserve(args=self._claim_args(queues, now, lease, limit, records), client=self._reader), now + lease
        )

    def _sleep_then_claim(self, queues: list[str], wait: float, now: float, lease: float, limit: int,
                          records: tuple | None) -> tuple[bool, tuple[list[Delivery], float | None, bool]]:
        """Block until a publish signal, a wake() or ``wait`` seconds, then claim:
        one round trip, as Redis runs the pipelined reserve script the moment the blocking
        pop returns. The claim compares due times with the time from before the wait, so
        nothing delayed is moved early, and its lease runs from the end of the longest
        wait, so it is never shorter than asked (at most ``wait`` longer). Returns (woken by
        wake(), claim)."""
        wait = max(MIN_BLOCK, wait)
        lease += wait
        pipe = pipeline(self._reader)
        self._queue_wait(pipe, queues, wait)
        self._reserve(args=self._claim_args(queues, now, lease, limit, records), client=pipe)
        with self.waiting():
            popped, reply = pipe.execute()
        return bool(popped) and popped[0] == self._wake_key, self._parse_claim(reply, now + lease)

    def _settle_op(self, delivery: Delivery, op: str, *extra: Any) -> bool:
        args = [self.prefix, delivery.message_id, str(delivery.tag), op, repr(self.clock.time()), *extra]
        return self._settle(args=args) == 1

    @guarded
    def ack(self, delivery: Delivery) -> bool:
        return self._settle_op(delivery, "ack")

    @guarded
    def retry(self, delivery: Delivery, *, body: str | None = None, eta: float | None = None) -> bool:
        due = "" if eta is None else repr(float(eta))
        return self._settle_op(delivery, "retry", due, "0" if body is None else "1", body or "")

    @guarded
    def extend(self, delivery: Delivery, lease: float) -> bool:
        until = self.clock.time() + lease
        ok = self._settle_op(delivery, "extend", repr(until))
        if ok:
            delivery.lease_until = until
        return ok

    @guarded
    def reject(self, delivery: Delivery, reason: str) -> bool:
        return self._settle_op(delivery, "reject", reason)

    # -- inspection --------------------------------------------------------------
    def _queues(self) -> list[str]:
        return sorted(self.client.smembers(f"{self.prefix}queues"))

    @guarded
    def purge_messages(self, queue: str) -> Purged:
        """Every message of the queue (waiting, delayed, in flight, dead) goes, ``batch`` per
        script call; each call returns the bodies it deleted."""
        bodies: list[str] = []
        while True:
            got = self._purge(args=[self.prefix, queue, self.batch], client=self._reader)
            bodies += [checked_text(b)[0] for b in got]
            if len(got) < self.batch:
                return Purged(len(bodies), bodies)

    @guarded
    def stats(self) -> list[dict]:
        queues = self._queues()
        now = repr(self.clock.time())
        pipe = pipeline(self.client)
        for q in queues:
            pipe.zcard(self._key(q, "ready"))
            pipe.zcount(self._key(q, "delayed"), "-inf", now)
            pipe.zcount(self._key(q, "delayed"), f"({now}", "+inf")
            pipe.zcard(self._key(q, "inflight"))
            pipe.zcard(self._key(q, "dead"))
        counts = pipe.execute()
        rows = []
        for i, q in enumerate(queues):
            ready, due, delayed, in_flight, dead = counts[5 * i:5 * i + 5]
            rows.append({"queue": q, "ready": ready + due, "delayed": delayed, "in_flight": in_flight, "dead": dead})
        return rows

    @guarded
    def dead_letters(self, queue: str | None = None, limit: int = 100) -> list[dict]:
        out: list[dict] = []
        for q in ([queue] if queue is not None else self._queues()) if limit > 0 else []:
            ids = self.client.zrange(self._key(q, "dead"), 0, limit - len(out) - 1)
            pipe = pipeline(self._reader)
            for mid in ids:
                pipe.hmget(f"{self.prefix}msg:{mid}", "reason", "body")
            for mid, (reason, body) in zip(ids, pipe.execute()):
                out.append({"id": mid, "queue": q, "reason": reason, "body": shown(body)})
            if len(out) >= limit:
                break
        return out

    @guarded
    def remove_dead_letters(self, queue: str, ids: Sequence[str]) -> int:
        ids = list(ids)
        if not ids:
            return 0
        pipe = pipeline(self.client)
        for mid in ids:
            pipe.zrem(self._key(queue, "dead"), mid)
        gone = [mid for mid, n in zip(ids, pipe.execute()) if n]
        if gone:                                # only what this call took out of the dead set
            self.client.delete(*[f"{self.prefix}msg:{mid}" for mid in gone])
        return len(gone)

    def wake(self) -> None:
        """Make this broker's reserve() calls that are blocked now return at once."""
        with self._lock:
            waiting = self._waiting
        if not waiting:
            return
        try:
            pipe = pipeline(self.client)
            pipe.lpush(self._wake_key, *["1"] * waiting)
            pipe.pexpire(self._wake_key, SIGNAL_TTL_MS)
            pipe.execute()
        except redis.RedisError:
            log.debug("could not wake reservers", exc_info=True)

    def close(self) -> None:
        self.client.close()
        self._reader.close()
