"""The RabbitMQ topology nbqueue uses: queue names and arguments, the delay buckets, the headers
a message carries, where a message is routed, and the declarations and counts on a connection's
admin channel.

Per work queue ``<queue>`` (durable, ``x-max-priority=9``): the dead letters ``nbq.dead.<queue>``
(durable) and the delay queues ``nbq.delay.<queue>.<ms>``, one per power of two from 128 ms to
2**32 ms, each dead-lettering into ``<queue>`` through the default exchange and expiring unused
(``x-expires``) as a set. Everything is published through the default exchange.
"""
from __future__ import annotations

import logging
import math
import time
from typing import Any, Callable

import pika
import pika.exceptions as pex

from ...errors import BrokerError, ConfigurationError
from .client import close_quietly

log = logging.getLogger(__name__)

#: work queues are priority queues with this maximum
MAX_PRIORITY = 9
#: delay buckets are powers of two in milliseconds, from 2**MIN_BUCKET to 2**MAX_BUCKET
MIN_BUCKET, MAX_BUCKET = 7, 32
#: the longest per-message TTL and x-expires RabbitMQ's timers take (Erlang's limit)
MAX_TTL_MS = 2**32 - 1
DAY_MS = 86_400_000
#: the longest wait of one hop: a day less than the delay queues' x-expires, so a queue
#: re-declared an hour before a publish still outlives the message
MAX_HOP_MS = MAX_TTL_MS - DAY_MS
#: how often a publisher re-declares a delay queue (which renews its x-expires)
DELAY_REDECLARE_S = 3600.0

H_ATTEMPTS = "x-nbq-attempts"    # reservations before this copy was published
H_ETA = "x-nbq-eta-ms"           # due time (epoch ms) of a delayed message
H_REASON = "x-nbq-reason"        # why a message was dead-lettered
H_QUEUE = "x-nbq-queue"          # the work queue a dead letter came from
H_LAPSES = "x-nbq-lapses"        # deliveries that ended without finishing, counted so far
H_LAPSE_TOKEN = "x-nbq-lapse-token"  # the task record's fencing token when lapses were last counted
H_RECHECK = "x-nbq-recheck"      # put back while an earlier attempt was alive: look again before beginning


#: classic queues of version 2 (RabbitMQ 3.10+, the only version in 4.x; older servers ignore the
#: argument): a persistent message is confirmed sooner than by version 1's queue index (see broker.py)
QUEUE_VERSION = {"x-queue-version": 2}


def work_queue_arguments() -> dict:
    return {"x-max-priority": MAX_PRIORITY}


def dead_queue_name(queue: str) -> str:
    return f"nbq.dead.{queue}"


def delay_queue_name(queue: str, exponent: int) -> str:
    return f"nbq.delay.{queue}.{1 << exponent}"


def delay_queue_names(queue: str) -> list[str]:
    return [delay_queue_name(queue, k) for k in range(MIN_BUCKET, MAX_BUCKET + 1)]


def delay_bucket(delay_ms: int) -> int:
    """The exponent of the smallest bucket (2**k ms) that holds a delay of ``delay_ms``."""
    return min(MAX_BUCKET, max(MIN_BUCKET, (max(1, delay_ms) - 1).bit_length()))


def delay_queue_arguments(queue: str) -> dict:
    """The same for every bucket of a queue, so the buckets expire together, unused."""
    return {"x-dead-letter-exchange": "", "x-dead-letter-routing-key": queue, "x-expires": MAX_TTL_MS}


def int_header(headers: dict, name: str) -> int:
    """A positive integer header, else 0."""
    value = headers.get(name)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def route(
    message_id: str, queue: str, body: str, priority: int, eta: float | None, now: float, headers: dict
) -> tuple:
    """(work queue, routing key, delayed?, body bytes, properties) of one publish: a message due
    later goes to the delay queue of its bucket with a per-message expiration."""
    headers = dict(headers)
    expiration = None
    routing_key, delayed = queue, False
    if eta is not None and eta > now:
        delay_ms = min(math.ceil((eta - now) * 1000), MAX_HOP_MS)
        routing_key, delayed = delay_queue_name(queue, delay_bucket(delay_ms)), True
        expiration = str(delay_ms)
        headers[H_ETA] = int(eta * 1000)
    properties = pika.BasicProperties(
        message_id=message_id,
        delivery_mode=2,                       # persistent
        priority=max(0, min(MAX_PRIORITY, int(priority or 0))),
        content_type="application/json",
        content_encoding="utf-8",
        timestamp=int(now),
        expiration=expiration,
        headers=headers or None,
    )
    return queue, routing_key, delayed, body.encode("utf-8", "surrogateescape"), properties


def dead_letter_properties(message_id: str, queue: str, reason: str, now: float, headers: dict) -> pika.BasicProperties:
    """The properties of a dead letter: persistent, with why and where from in its headers."""
    return pika.BasicProperties(
        message_id=message_id,
        delivery_mode=2,  # persistent
        content_type="application/json",
        content_encoding="utf-8",
        timestamp=int(now),
        headers={H_REASON: str(reason), H_QUEUE: queue, **headers},
    )


class Shapes:
    """The arguments a work or delay queue is declared with: QUEUE_VERSION added for a new queue;
    a queue that exists without it (declared by an earlier nbqueue) is declared as it is."""

    def __init__(self) -> None:
        self.unversioned: set[str] = set()

    def arguments(self, name: str, arguments: dict) -> dict:
        return arguments if name in self.unversioned else {**arguments, **QUEUE_VERSION}

    def learn(self, name: str, exc: pex.ChannelClosedByBroker) -> bool:
        """Was a declare of ``name`` refused for its queue version alone (the first time)? Then
        the queue is declared without it from now on."""
        if exc.reply_code != 406 or "x-queue-version" not in str(exc.reply_text) or name in self.unversioned:
            return False
        self.unversioned.add(name)
        log.info("RabbitMQ queue %s exists without x-queue-version: declared as it is (a policy with "
                 "queue-version 2 converts it in place, its messages kept)", name)
        return True


class QueueAdmin:
    """Declarations, counts, purges, deletes and peeks on one connection's admin channel;
    remembers what it declared so a publish declares each queue once."""

    def __init__(self, connection: pika.BlockingConnection, on_declare: Callable[[str], Any] = lambda name: None,
                 shapes: Shapes | None = None):
        self.connection = connection
        self.on_declare = on_declare
        self.shapes = shapes if shapes is not None else Shapes()
        self.declared: dict[str, float] = {}    # queue name -> monotonic time of the declare
        self._admin: Any = None

    # admin channel: declares, counts, purges, deletes, peeks
    def admin(self) -> Any:
        if self._admin is None or not self._admin.is_open:
            self._admin = self.connection.channel()
        return self._admin

    def declare(
        self, name: str, arguments: dict | None, *, refresh: float | None = None, versioned: bool = False
    ) -> None:
        """Declare a durable queue (``versioned``: of QUEUE_VERSION, unless it exists without)."""
        last = self.declared.get(name)
        if last is not None and (refresh is None or time.monotonic() - last < refresh):
            return
        if versioned and arguments is not None:
            arguments = self.shapes.arguments(name, arguments)
        try:
            self.admin().queue_declare(name, durable=True, arguments=arguments)
        except pex.ChannelClosedByBroker as exc:
            self._admin = None
            if versioned and self.shapes.learn(name, exc):
                return self.declare(name, {k: v for k, v in (arguments or {}).items() if k not in QUEUE_VERSION},
                                    refresh=refresh, versioned=True)
            if exc.reply_code == 406:
                raise ConfigurationError(
                    f"RabbitMQ queue {name!r} exists with other settings than nbqueue needs "
                    f"(durable, arguments {arguments}): {exc.reply_text}; delete it or use another queue name"
                ) from exc
            raise BrokerError(f"RabbitMQ refused to declare queue {name!r}: {exc.reply_code} {exc.reply_text}") from exc
        self.declared[name] = time.monotonic()
        self.on_declare(name)

    def declare_work_queue(self, queue: str) -> None:
        self.declare(queue, work_queue_arguments(), versioned=True)
        self.declare(dead_queue_name(queue), None)

    def declare_delay_queues(self, queue: str) -> None:
        """All buckets at once (hourly), so they exist and expire as a set."""
        arguments = delay_queue_arguments(queue)
        for name in delay_queue_names(queue):
            self.declare(name, arguments, refresh=DELAY_REDECLARE_S, versioned=True)

    def count(self, name: str) -> int | None:
        """Ready messages in a queue; None when it does not exist."""
        try:
            return self.admin().queue_declare(name, passive=True).method.message_count
        except pex.ChannelClosedByBroker as exc:
            self._admin = None
            if exc.reply_code == 404:
                self.declared.pop(name, None)
                return None
            raise

    def purge(self, name: str) -> int:
        try:
            return self.admin().queue_purge(name).method.message_count
        except pex.ChannelClosedByBroker as exc:
            self._admin = None
            if exc.reply_code == 404:
                return 0
            raise

    def drain(self, name: str) -> tuple[list[bytes], int]:
        """Remove the messages of an existing queue: those it held when asked (their bodies,
        taken one ``basic.get`` each, acknowledged as they come), then by ``queue.purge`` any
        published meanwhile (how many; their bodies are not seen). ([], 0) for no queue."""
        held = self.count(name)
        if not held:
            return [], 0
        bodies = []
        try:
            for _ in range(held):
                method, _properties, body = self.admin().basic_get(name, auto_ack=True)
                if method is None:
                    break
                bodies.append(body)
        except pex.ChannelClosedByBroker as exc:     # deleted meanwhile
            self._admin = None
            if exc.reply_code != 404:
                raise
            return bodies, 0
        return bodies, self.purge(name)

    def delete(self, name: str) -> None:
        self.admin().queue_delete(name)
        self.declared.pop(name, None)

    def peek(self, name: str, limit: int) -> list[tuple[Any, bytes]]:
        """Up to ``limit`` messages of an existing queue, left in place (get, then requeue)."""
        channel = self.connection.channel()
        got = []
        try:
            for _ in range(limit):
                method, properties, body = channel.basic_get(name, auto_ack=False)
                if method is None:
                    break
                got.append((properties, body))
        except pex.ChannelClosedByBroker as exc:     # deleted meanwhile: nothing (more) to show
            if exc.reply_code != 404:
                raise
        finally:
            close_quietly(channel)      # closing the channel requeues what it got
        return got

    def take(self, name: str, ids: set, limit: int) -> int:
        """Acknowledge (remove) the messages of an existing queue whose message id is in
        ``ids``, looking at most ``limit`` deep; the others go back (closing the channel)."""
        channel = self.connection.channel()
        removed = 0
        try:
            for _ in range(limit):
                method, properties, _body = channel.basic_get(name, auto_ack=False)
                if method is None:
                    break
                if properties.message_id in ids:
                    channel.basic_ack(method.delivery_tag)
                    removed += 1
                    if removed == len(ids):
                        break
        except pex.ChannelClosedByBroker as exc:     # deleted meanwhile
            if exc.reply_code != 404:
                raise
        finally:
            close_quietly(channel)
        return removed

