"""Payloads of the Redis driver: keys of the server under the store's prefix (memory://: fakeredis)."""
from __future__ import annotations

import contextlib
from typing import Any
from urllib.parse import urlsplit

from ...payloads import KEY_PREFIX, REDIS_MAX, PayloadStore, _chunks, _valid, read_buffer
from .client import (
    _POOLS,
    URL_OPTIONS,
    client_settings,
    fake_server,
    key_prefix,
    lua,
    no_database,
    retry_policy,
    url_options,
)

# Lua for the Redis store (lua/payload_*.lua). ARGV[1] is the prefix P; payload keys are built from it.
_REDIS_LINK = lua("payload_link")
_REDIS_RELEASE = lua("payload_gone", "payload_release")
_REDIS_UNLINK = lua("payload_gone", "payload_unlink")


class RedisPayloads(PayloadStore):
    """Payloads as keys of a Redis server (``memory://``: fakeredis); see the module docstring."""

    max_size = REDIS_MAX

    def __init__(self, url: str, *, clock=None, options: dict | None = None):
        super().__init__(url, clock=clock)
        self.options = url_options(url, options)
        self.prefix = key_prefix(self.options)
        self.client = _redis_bytes_client(url, self.options)
        self.fake = urlsplit(url).scheme == "memory"
        self._link_script = self.client.register_script(_REDIS_LINK)
        self._release_script = self.client.register_script(_REDIS_RELEASE)
        self._unlink_script = self.client.register_script(_REDIS_UNLINK)

    @property
    def label(self) -> str:
        from ...urls import redact

        return f"{redact(self.url.split('?', 1)[0])} (keys under {self.prefix}pl:)"

    def _k(self, key: str) -> str:
        return f"{self.prefix}pl:{key}"

    def limit_text(self) -> str:
        if self.max_size == REDIS_MAX:
            return f"the 512 MB a Redis value can hold (the payload store is {self.label})"
        return super().limit_text()

    @staticmethod
    def _text(values) -> list[str]:
        return [v.decode() if isinstance(v, bytes) else str(v) for v in values]

    def link(self, keys, owner):
        keys, bad = _valid(keys)
        if not keys:
            return bad
        args = [self.prefix, owner, repr(self._now()), *keys]
        return bad + self._text(self._guard(lambda: self._link_script(args=args)))

    def _write(self, key, data, owner):
        # scheduled for a check first: a writer that dies after its SET leaves a payload the sweep finds
        now = self._now()
        self._guard(lambda: self.client.zadd(f"{self.prefix}pl:check", {key: now + self.grace}, nx=True))
        self._set(self._k(key), data)
        if self.link([key], owner):     # deleted in between by a release of the same bytes: once more
            self._set(self._k(key), data)
            self.link([key], owner)

    def _set(self, name: str, data: Any) -> None:
        """SET ``name`` to bytes-like ``data``, sent as they are: redis-py's packer would copy a large value
        twice (to bytes, then into the command)."""
        view = memoryview(data).cast("B")
        if self.fake:
            self._guard(lambda: self.client.set(name, view.tobytes()))
            return
        raw = name.encode()
        head = b"*3\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$%d\r\n" % (len(raw), raw, view.nbytes)
        pool = self.client.connection_pool
        conn = pool.get_connection()

        def send() -> None:
            conn.send_packed_command([head, view, b"\r\n"])
            conn.read_response()

        try:
            self._guard(lambda: conn.retry.call_with_retry(send, lambda error: conn.disconnect()))
        finally:
            pool.release(conn)

    #: fakeredis: a payload is read this many bytes at a time (GETRANGE)
    READ_CHUNK = 8 << 20

    def _read(self, key, name):
        if self.fake:
            return self._read_ranges(key, name)
        out = self._get_into(self._k(key))
        if out is None:
            raise self._missing(name)
        return out

    def _get_into(self, name: str) -> Any:
        """GET ``name``, its value received straight into a buffer of its size (read_buffer), or None:
        redis-py's reader would hold the value in its own buffer, then in a bytes object."""
        pool = self.client.connection_pool
        conn = pool.get_connection()

        def receive() -> Any:
            try:
                conn.send_command("GET", name)
                return _bulk_into(conn._sock)
            except BaseException:
                conn.disconnect()       # the reply may be half read: the connection is not reused as it is
                raise

        try:
            return self._guard(lambda: conn.retry.call_with_retry(receive, lambda error: conn.disconnect()))
        finally:
            pool.release(conn)

    def _read_ranges(self, key, name):
        size = self._guard(lambda: self.client.strlen(self._k(key)))
        if not size and not self._guard(lambda: self.client.exists(self._k(key))):
            raise self._missing(name)
        out = bytearray(size)
        pos = 0
        while pos < size:
            part = self._guard(lambda: self.client.getrange(self._k(key), pos, min(size, pos + self.READ_CHUNK) - 1))
            if not part:
                raise self._missing(name, " (deleted while it was read)")
            out[pos:pos + len(part)] = part
            pos += len(part)
        return out

    def release(self, owners):
        owners = list(dict.fromkeys(owners))
        return sum(int(self._guard(lambda c=c: self._release_script(args=[self.prefix, *c])))
                   for c in _chunks(owners, 500))

    def exists(self, key):
        return bool(self._guard(lambda: self.client.exists(self._k(key))))

    def delete(self, keys):
        n = 0
        for key in keys:
            owners = self._text(self._guard(lambda key=key: self.client.hkeys(self._k(key) + ":refs")))
            pipe = self.client.pipeline(transaction=True)
            pipe.delete(self._k(key))
            pipe.delete(self._k(key) + ":refs")
            pipe.zrem(f"{self.prefix}pl:check", key)
            for owner in owners:
                pipe.srem(f"{self.prefix}pl:owner:{owner}", key)
            n += self._guard(pipe.execute)[0]
        return n

    def keys(self):
        found = set()
        for raw in self.client.scan_iter(match=f"{self.prefix}pl:{KEY_PREFIX}*", count=1000):
            name = raw.decode()[len(self.prefix) + 3:]
            if not name.endswith(":refs"):
                found.add(name)
        return sorted(found)

    def links(self, key):
        raw = self._guard(lambda: self.client.hgetall(self._k(key) + ":refs"))
        return {k.decode(): float(v) for k, v in raw.items()}

    def stats(self):
        keys = self.keys()
        pipe = self.client.pipeline(transaction=False)
        for key in keys:
            pipe.strlen(self._k(key))
        return {"payloads": len(keys), "bytes": int(sum(self._guard(pipe.execute))) if keys else 0}

    def _due(self, now, limit):
        keys = self._text(self._guard(
            lambda: self.client.zrangebyscore(f"{self.prefix}pl:check", "-inf", now, start=0, num=limit)))
        if not keys:
            return []
        pipe = self.client.pipeline(transaction=False)
        for key in keys:
            pipe.hgetall(self._k(key) + ":refs")
            pipe.exists(self._k(key))
        replies = self._guard(pipe.execute)
        due, lost = [], []
        for i, key in enumerate(keys):
            refs, present = replies[2 * i], replies[2 * i + 1]
            if not present:
                lost.append(key)        # deleted by hand: the schedule and links go too
                continue
            due.append((key, {k.decode(): float(v) for k, v in refs.items()}))
        if lost:
            self.delete(lost)
        return due

    def _unlink(self, pairs, unlinked=()):
        flat = [x for pair in pairs for x in pair]
        return int(self._guard(lambda: self._unlink_script(args=[self.prefix, len(flat), *flat, *unlinked])))

    def _checked(self, keys, at):
        if keys:
            self._guard(lambda: self.client.zadd(f"{self.prefix}pl:check", dict.fromkeys(keys, at), xx=True))


    def _guard(self, fn):
        import redis

        from ...errors import ConnectionLost

        try:
            return fn()
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise ConnectionLost(f"{self!r}: {exc}") from exc
        except redis.ResponseError as exc:
            raise no_database(self.url, exc) or exc

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.client.close()


def _bulk_into(sock) -> Any:
    """A bulk string reply read from ``sock`` into a read_buffer (None for a nil reply)."""
    import redis

    head = bytearray()
    while b"\r\n" not in head:
        part = sock.recv(64)
        if not part:
            raise redis.ConnectionError("the server closed the connection during a payload's reply")
        head += part
    line, rest = bytes(head).split(b"\r\n", 1)
    if line[:1] == b"-":
        raise redis.ResponseError(line[1:].decode(errors="replace"))
    if line == b"_":        # RESP3's nil
        return None
    if line[:1] != b"$":
        raise redis.ConnectionError(f"unexpected reply to GET: {line[:40]!r}")
    size = int(line[1:])
    if size < 0:
        return None
    out = read_buffer(size)
    view = memoryview(out)
    pos = min(size, len(rest))
    view[:pos] = rest[:pos]
    tail = rest[pos:]
    while pos < size:
        got = sock.recv_into(view[pos:])
        if not got:
            raise redis.ConnectionError("the server closed the connection during a payload's reply")
        pos += got
    view.release()
    while len(tail) < 2:
        part = sock.recv(2 - len(tail))
        if not part:
            raise redis.ConnectionError("the server closed the connection during a payload's reply")
        tail += part
    if tail != b"\r\n":
        raise redis.ConnectionError("a payload's reply did not end where its length said")
    return out


def _redis_bytes_client(url: str, options: dict):
    """A client of the server ``url`` names (memory://: the same fakeredis server as the
    broker and backend) whose replies are bytes."""
    import redis

    parts = urlsplit(url)
    kwargs = client_settings(url, options, socket_timeout=60.0, client_name="nbqueue-payloads")
    retry = retry_policy(options)
    if parts.scheme == "memory":
        import fakeredis

        client = fakeredis.FakeRedis(server=fake_server(parts.netloc or parts.path.strip("/") or "default"), **kwargs)
    else:
        from urllib.parse import parse_qsl, urlencode, urlunsplit

        query = urlencode([(k, v) for k, v in parse_qsl(parts.query) if k not in URL_OPTIONS])
        client = redis.Redis.from_url(urlunsplit(parts._replace(query=query)), **kwargs)
        _POOLS.add(client.connection_pool)      # a forked child gets fresh locks for it, as for the broker's pools
    client.set_retry(retry)
    return client
