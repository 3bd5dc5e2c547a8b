"""Python twins of the driver's Lua scripts, run in their place on ``memory://``.

fakeredis runs every EVALSHA by compiling the script's Lua source again, checking the
interpreter's globals around each ``redis.call`` and collecting garbage after it: some
milliseconds per call, under the server's lock, for scripts Redis runs in microseconds.
A script registered here with ``twin`` (next to its definition, in the broker, the
result backend or the engine) is run on ``memory://`` as its Python function instead (see
nbqueue.drivers.redis.memory), inside the EVALSHA and under the server's lock, so as
atomic as the script. A function takes ``r`` (``redis.call``: a command name and its
arguments, the reply as RESP2 gives it to Lua, an error raised), the script's KEYS and
ARGV as bytes and the constants of the script's header, makes the script's calls and
returns what the script returns (a Lua number as an int, a string as bytes, a table as
a list, false as None). Scripts without a twin run as Lua on memory:// as well.

Each function is the twin of one Lua script (lua/<name>.lua, named in its docstring):
Redis runs the Lua, memory:// the Python, so a change to a script changes its twin here.
Two tests keep each pair equal: the broker, result backend and engine contract suites
(nbqueue.testing), run on redis:// and memory:// alike, and
tests/test_redis_specific.py's twin test, which runs the scripts' paths on memory:// once
with the twins and once with fakeredis' Lua and compares every reply and every key (and
fails for a registered twin its scenario does not run). A helper named after a Lua
function (``_lease``, ``_ack``, ``_write_state``...) is the twin of that function.
"""
from __future__ import annotations

import functools
import hashlib
from typing import Any, Callable

from ... import states

Redis = Callable[..., Any]
Script = Callable[[Redis, list, list], Any]

#: script SHA1 as EVALSHA names it -> the Python function run in its place
TWINS: dict[bytes, Script] = {}


class ErrorReply(Exception):
    """``return redis.error_reply(message)``: the script's reply is this error."""


def twin(source: str, fn: Callable[..., Any], **constants: Any) -> None:
    """Run ``fn`` (given ``constants``, the values of the script's header) in place of the Lua ``source``."""
    TWINS[hashlib.sha1(source.encode()).hexdigest().encode()] = functools.partial(fn, **constants)


def _num(value: Any) -> float | None:
    """Lua's ``tonumber``: None for nil/false or text that is no number."""
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        return None


FINAL = frozenset(s.encode() for s in states.READY_STATES)
RECEIVED = states.RECEIVED.encode()


# -- the broker's scripts (queues.lua helpers, then one function per script) --------------

def _qkey(p: bytes, q: bytes, kind: bytes) -> bytes:
    return p + b"q:" + q + b":" + kind


def _mkey(p: bytes, mid: bytes) -> bytes:
    return p + b"msg:" + mid


def _make_ready(r: Redis, p: bytes, q: bytes, mid: bytes, prio: bytes | None = None) -> None:
    """queues.lua's ``make_ready``; ``prio``: the message's priority, read from it when not given."""
    priority = _num(r("hget", _mkey(p, mid), b"priority") if prio is None else prio) or 0
    seq = r("incr", p + b"seq")
    r("zadd", _qkey(p, q, b"ready"), b"%d" % int((9 - priority) * 1e12 + seq), mid)


def _signal(r: Redis, p: bytes, q: bytes, count: int, tokens: int, signal_ttl: int) -> None:
    """queues.lua's ``signal``."""
    key = _qkey(p, q, b"signal")
    if r("lpush", key, *[b"1"] * min(count, tokens)) > tokens:
        r("ltrim", key, 0, tokens - 1)
    r("pexpire", key, signal_ttl)


def _begin_record(r: Redis, rec: bytes, index: bytes, mid: bytes, state: bytes, worker: bytes, now: bytes,
                  new: list[bytes]) -> int:
    """begin.lua's ``begin_record``."""
    current = r("hget", rec, b"state")
    if current is not None and current in FINAL:
        return 0
    if current is not None:
        r("hset", rec, b"state", state, b"worker", worker, b"started_at", now)
        return r("hincrby", rec, b"token", 1)
    r("hset", rec, *new, b"id", mid, b"state", state, b"token", 1, b"worker", worker, b"started_at", now,
      b"created_at", now)
    r("zadd", index, now, mid)
    return 1


def _lease(r: Redis, argv: list[bytes], q: bytes, mid: bytes, begin: bool) -> Any:
    """lease.lua's ``lease`` (its ARGV: prefix, now, deadline, record key prefix, index, worker)."""
    p, now, deadline, rec_prefix, index, worker = argv[:6]
    r("zadd", _qkey(p, q, b"inflight"), deadline, mid)
    if rec_prefix == b"" or not begin:
        return b""
    return _begin_record(r, rec_prefix + mid, index, mid, RECEIVED, worker, now, [b"queue", q])


def _ack(r: Redis, p: bytes, mid: bytes, attempt: bytes, rec: bytes | None, final: bool = False) -> int:
    """ack.lua's ``ack``."""
    key = _mkey(p, mid)
    current, q = r("hmget", key, b"attempt", b"queue")
    if current != attempt:
        return 0
    if rec and not final and (r("hget", rec, b"state") or b"") not in FINAL:
        return 0
    if r("zrem", _qkey(p, q, b"inflight"), mid) == 0:
        return 0
    r("del", key)
    return 1


def _publish_messages(r: Redis, argv: list[bytes], first: int, tokens: int, signal_ttl: int) -> int:
    """publish_messages.lua's ``publish_messages`` (``first``: an index from 0)."""
    p, now = argv[0], _num(argv[1])
    added: dict[bytes, int] = {}
    n = 0
    for i in range(first, len(argv) - 4, 5):
        mid, q, prio, eta, body = argv[i:i + 5]
        key = _mkey(p, mid)
        if r("exists", key) == 0:
            r("hset", key, b"queue", q, b"body", body, b"priority", prio, b"attempt", 0)
            if eta != b"" and _num(eta) > now:  # type: ignore[operator]
                r("zadd", _qkey(p, q, b"delayed"), eta, mid)
            else:
                _make_ready(r, p, q, mid, prio)
            added[q] = added.get(q, 0) + 1
            n += 1
    for q, count in added.items():
        r("sadd", p + b"queues", q)
        _signal(r, p, q, count, tokens, signal_ttl)
    return n


def publish(r: Redis, keys: list[bytes], argv: list[bytes], *, tokens: int, signal_ttl: int) -> Any:
    """publish.lua"""
    return _publish_messages(r, argv, 2, tokens, signal_ttl)


def publish_reserved(r: Redis, keys: list[bytes], argv: list[bytes]) -> Any:
    """publish_reserved.lua"""
    p = argv[0]
    out: list[Any] = []
    for i in range(6, len(argv) - 3, 4):
        mid, q, prio, body = argv[i:i + 4]
        key = _mkey(p, mid)
        if r("exists", key) == 0:
            r("hset", key, b"queue", q, b"body", body, b"priority", prio, b"attempt", 1)
            r("sadd", p + b"queues", q)
            out.append(_lease(r, argv, q, mid, True))
        else:
            out.append(b"-")
    return out


def _requeue_due(r: Redis, p: bytes, now: bytes, batch: bytes, queues: list[bytes]) -> None:
    """reserve.lua's first loop: expired leases (one more lapse each) and due delayed messages to ready."""
    for q in queues:
        for kind in (b"inflight", b"delayed"):
            key = _qkey(p, q, kind)
            for mid in r("zrangebyscore", key, b"-inf", now, b"LIMIT", 0, batch):
                r("zrem", key, mid)
                if kind == b"inflight" and r("exists", _mkey(p, mid)) == 1:
                    r("hincrby", _mkey(p, mid), b"lapses", 1)
                _make_ready(r, p, q, mid)


def _best(r: Redis, p: bytes, queues: list[bytes]) -> tuple[bytes, bytes] | None:
    """(queue, id) of the best-scored ready message across the queues (the first queue on a tie)."""
    best = None
    best_score = 0.0
    for q in queues:
        head = r("zrange", _qkey(p, q, b"ready"), 0, 0, b"WITHSCORES")
        if head and (best is None or float(head[1]) < best_score):
            best, best_score = (q, head[0]), float(head[1])
    return best


def _next_due(r: Redis, p: bytes, queues: list[bytes]) -> bytes:
    """The earliest lease deadline or eta across the queues, as its score text, or '' (the
    script may give a deadline of its own leases as it was passed: the same time)."""
    next_due = None
    for q in queues:
        for kind in (b"inflight", b"delayed"):
            head = r("zrange", _qkey(p, q, kind), 0, 0, b"WITHSCORES")
            if len(head) > 1 and (next_due is None or float(head[1]) < float(next_due)):
                next_due = head[1]
    return next_due if next_due is not None else b""


def reserve(r: Redis, keys: list[bytes], argv: list[bytes]) -> Any:
    """reserve.lua"""
    p, now = argv[0], argv[1]
    limit = _num(argv[6])
    queues = argv[8:]
    _requeue_due(r, p, now, argv[7], queues)
    out: list[Any] = [b"", b"0"]
    claimed = 0
    drained = False         # every ready set found empty (and nothing made ready since)
    while claimed < limit:  # type: ignore[operator]
        best = _best(r, p, queues)
        if best is None:
            drained = True
            break
        q, mid = best
        key = _mkey(p, mid)
        body, prio, lapses_field = r("hmget", key, b"body", b"priority", b"lapses")
        lapses = _num(lapses_field) or 0
        if body is not None and lapses > 0 and claimed > 0:
            break
        r("zrem", _qkey(p, q, b"ready"), mid)
        if body is not None:
            attempt = r("hincrby", key, b"attempt", 1)
            token = _lease(r, argv, q, mid, lapses == 0)
            for v in (mid, q, body, attempt, prio, token, int(lapses)):
                if v is None:       # Lua's ipairs stops at the first nil
                    break
                out.append(v)
            claimed += 1
            if lapses > 0:
                break
    # (the script's ZCARDs, whose answer is known where the loop found the ready sets empty);
    # a queue left with nothing ready drops its wake-up tokens
    for q in queues:
        if not drained and r("zcard", _qkey(p, q, b"ready")) > 0:
            out[1] = b"1"
        else:
            r("del", _qkey(p, q, b"signal"))
    if out[1] == b"0":
        out[0] = _next_due(r, p, queues)
    return out


def settle(r: Redis, keys: list[bytes], argv: list[bytes], *, tokens: int, signal_ttl: int) -> Any:
    """settle.lua"""
    p, mid, attempt, op, now = argv[0], argv[1], argv[2], argv[3], _num(argv[4])
    if op == b"ack":
        return _ack(r, p, mid, attempt, argv[5] if len(argv) > 5 else None)
    key = _mkey(p, mid)
    current, q = r("hmget", key, b"attempt", b"queue")
    if current != attempt:
        return 0
    inflight = _qkey(p, q, b"inflight")
    if r("zscore", inflight, mid) is None:
        return 0
    if op == b"extend":
        r("zadd", inflight, argv[5], mid)
    elif op == b"retry":
        r("zrem", inflight, mid)
        if argv[6] == b"1":
            r("hset", key, b"body", argv[7])
        if argv[5] != b"" and _num(argv[5]) > now:  # type: ignore[operator]
            r("zadd", _qkey(p, q, b"delayed"), argv[5], mid)
        else:
            _make_ready(r, p, q, mid)
        _signal(r, p, q, 1, tokens, signal_ttl)
    elif op == b"reject":
        r("zrem", inflight, mid)
        r("hset", key, b"reason", argv[5])
        r("zadd", _qkey(p, q, b"dead"), r("incr", p + b"seq"), mid)
    else:
        raise ErrorReply("unknown op " + op.decode("utf-8", "replace"))
    return 1


# -- the result backend's scripts --------------------------------------------------------

def _write_state(r: Redis, rec: bytes, index: bytes, expiring: bytes, done: bytes, a: list[bytes],
                 sets: list[bytes], dels: list[bytes], done_ttl: int) -> int:
    """state.lua's ``write_state``."""
    mid, state, token, created, ttl_ms, expires_at = a
    current, current_token = r("hmget", rec, b"state", b"token")
    if current is not None:
        if current in FINAL:
            return 0
        if token != b"" and (current_token if current_token is not None else b"0") != token:
            return 0
    else:
        if token != b"":
            return 0
        r("hset", rec, b"id", mid, b"created_at", created)
        r("zadd", index, created, mid)
    r("hset", rec, b"state", state, *sets)
    if dels:
        r("hdel", rec, *dels)
    if ttl_ms != b"":
        r("pexpire", rec, ttl_ms)
        r("zadd", expiring, expires_at, mid)
    if state in FINAL:
        r("rpush", done, b"1")
        r("pexpire", done, done_ttl)
    return 1


def _create_records(r: Redis, keys: list[bytes], argv: list[bytes], i: int) -> int:
    """create_records.lua's ``create_records`` (``i``: an index from 0)."""
    for rec in keys[1:]:
        n = int(float(argv[i]))
        pairs = argv[i + 1:i + 1 + 2 * n]
        if r("exists", rec) == 0:
            fields = dict(zip(pairs[::2], pairs[1::2]))
            r("hset", rec, *pairs)
            created, mid = fields.get(b"created_at"), fields.get(b"id")
            if created is None or mid is None:      # a nil argument of redis.call
                raise ErrorReply("ERR Lua redis lib command arguments must be strings or integers")
            r("zadd", keys[0], created, mid)
        i += 1 + 2 * n
    return i


def create(r: Redis, keys: list[bytes], argv: list[bytes]) -> Any:
    """create.lua"""
    _create_records(r, keys, argv, 0)
    return 1


def send(r: Redis, keys: list[bytes], argv: list[bytes], *, tokens: int, signal_ttl: int) -> Any:
    """send.lua"""
    return _publish_messages(r, argv, _create_records(r, keys, argv, 2), tokens, signal_ttl)


def begin_many(r: Redis, keys: list[bytes], argv: list[bytes]) -> Any:
    """begin_many.lua"""
    now, worker, state = argv[:3]
    tokens = []
    i = 3
    for rec in keys[1:]:
        mid, retries, n = argv[i], argv[i + 1], int(float(argv[i + 2]))
        new = argv[i + 3:i + 3 + 2 * n]
        token = _begin_record(r, rec, keys[0], mid, state, worker, now, new)
        if token != 0 and retries != b"":
            r("hset", rec, b"retries", retries)
        tokens.append(token)
        i += 3 + 2 * n
    return tokens


def set_state(r: Redis, keys: list[bytes], argv: list[bytes], *, done_ttl: int) -> Any:
    """set_state.lua"""
    rec, index, expiring, done = keys[:4]
    n = int(float(argv[6]))
    return _write_state(r, rec, index, expiring, done, argv[:6], argv[7:7 + 2 * n], argv[7 + 2 * n:], done_ttl)


# -- the engine's scripts ----------------------------------------------------------------

def finish_args(argv: list[bytes]) -> tuple[list[tuple], list[tuple]]:
    """finish.lua's arguments after its first two, split: ``(states, acks)``, each state
    ``(id, head (6 values), fields, extra)`` and each ack ``(id, attempt, checked)``."""
    states, i = [], 2
    for _ in range(int(float(argv[1]))):
        mid, n = argv[i], int(float(argv[i + 6]))
        j = i + 7 + 2 * n
        m = int(float(argv[j]))
        states.append((mid, argv[i:i + 6], argv[i + 7:j], argv[j + 1:j + 1 + m]))
        i = j + m + 1
    return states, [tuple(argv[k:k + 3]) for k in range(i, len(argv), 3)]


def finish(r: Redis, keys: list[bytes], argv: list[bytes], *, done_ttl: int) -> Any:
    """finish.lua"""
    p = argv[0]
    rec_prefix, index, expiring, done_prefix = finish_keys(p)
    states, acks = finish_args(argv)
    stored = [_write_state(r, rec_prefix + mid, index, expiring, done_prefix + mid, head, fields, extra, done_ttl)
              for mid, head, fields, extra in states]
    final = _written_final(states, stored)
    for mid, attempt, checked in acks:
        _ack(r, p, mid, attempt, rec_prefix + mid if checked == b"1" else b"", mid in final)
    return stored


def finish_keys(p: bytes) -> tuple[bytes, bytes, bytes, bytes]:
    """finish.lua's key names under prefix ``p``: record key prefix, results index, expiring
    index, done-list key prefix (as nbqueue.drivers.redis.backend names them)."""
    return p + b"r:", p + b"results", p + b"expiring", p + b"done:"


def _written_final(states: list[tuple], stored: list[int]) -> set[bytes]:
    """finish.lua's ``final``: the ids whose records the finish wrote in a final state (and
    did not expire at once with a ttl of 0 or less), which their acks need not read again."""
    return {mid for (mid, head, _, _), ok in zip(states, stored)
            if ok == 1 and head[1] in FINAL and (head[4] == b"" or (_num(head[4]) or 0) > 0)}
