"""RabbitMQ broker over AMQP 0-9-1 with pika (``pip install 'nbqueue[amqp]'``).

URL: ``amqp://user:pass@host:5672/vhost`` or ``amqps://...`` (TLS, host name checked);
the vhost is URL-quoted (``%2F`` is ``/``). pika's own query options work
(``?heartbeat=30&socket_timeout=5``), and so do ours: ``reconnect_timeout`` (seconds
to keep reconnecting before ConnectionLost, default 60), ``confirm_timeout`` (seconds
to wait for publisher confirms, default 30), ``publish_batch`` (messages per confirm
round trip, default 500), ``eta_tolerance`` (seconds, default 1.0). The same keys
may be passed as ``options``.

Capabilities:

- Durability: durable queues, persistent messages, publisher confirms; a publish the
  broker nacks, or returns as unroutable (``mandatory``), raises ``PublishRefused``.
  ``publish_many`` pipelines up to ``publish_batch`` messages per confirm round trip.
- Priority: yes, 0-9 (every work queue is declared with ``x-max-priority=9``). As with
  any AMQP consumer, messages already prefetched are not overtaken by a later,
  higher-priority one.
- Delays (eta, retry with eta): yes, no polling. A delayed message goes to a delay
  queue ``nbq.delay.<queue>.<ms>`` with a per-message ``expiration`` and is
  dead-lettered into ``<queue>`` when it expires. ``<ms>`` is the power of two (128 ms
  to 2**32 ms) at or above the delay, so a long delay never blocks a short one: it
  sits in another bucket. Within one bucket a message is never early and at most as
  late as the bucket's width, and only if it was published after a message of the same
  bucket that is due later (usually it is exact). A queue's delay queues are declared
  together on its first delayed publish, all with ``x-expires`` at RabbitMQ's timer limit
  (2**32 - 1 ms, about 49.7 days), re-declared hourly by publishers, so they come and
  go as a set (stats() probes one of them, not 26, and RabbitMQ logs no not_found
  errors for the others). A message waits at most that limit less a day in one hop;
  longer delays hop: the message reaches the work queue early with its eta in a header,
  and reserve() sends it back into the delay queues for the rest instead of handing it
  out. An eta in the past publishes directly. The dead-letter queue is declared with
  the work queue.
- Leases: no timer (``Capabilities.leases_expire`` False). RabbitMQ redelivers a message when the
  consumer's connection or channel dies, not when a lease runs out; ``extend()`` only
  confirms the delivery is still held. Note RabbitMQ's own ``consumer_timeout``
  (default 30 minutes in 3.8.15+): a delivery unacked for longer closes the channel and
  is redelivered, so raise it in rabbitmq.conf for notebooks that run longer.
- Attempts: 1, or 2 when RabbitMQ sets the redelivered flag; ``retry()`` carries the
  count in the ``x-nbq-attempts`` header, so a retried message counts on.
- Bounded redelivery (``max_deliveries``, default 5) on classic priority queues: RabbitMQ
  sets the redelivered flag on every message that goes back unacked, whether a worker was
  running it when it died or it was only prefetched (and ``x-delivery-count`` exists on
  quorum queues only), so the broker cannot count lapses by itself. A redelivered message
  comes with ``maybe_lapsed``; the worker reads the task's record and, if an attempt was
  begun after the last count (its fencing token is above the message's
  ``x-nbq-lapse-token`` header) and never finished, calls ``count_lapse()``: the message
  is published again with ``x-nbq-lapses`` one higher and that token, and the redelivered
  copy is acked. A message that was only prefetched is not counted. A message with a lapse
  (redelivered, or ``x-nbq-lapses`` above 0) is handed out alone. At ``max_deliveries``
  lapses the worker dead-letters it. One put back while its earlier attempt is alive
  (``defer``) carries ``x-nbq-recheck``, so it comes back ``maybe_lapsed`` as well.
- Bodies that are not UTF-8 are handed out with ``dead_reason`` set (text holding the
  bytes as ``surrogateescape``; dead letters keep the original bytes).
- Prefetch: ``basic.qos`` (channel-wide, ``global``) is set to the deliveries this
  process holds plus the ``limit`` its waiting reservers ask for, so a worker holds no
  more than it asked for (between reserve() calls up to that many wait prefetched).
  Consumers follow the queues reserve() asks for; a queue no reserver wants any more is
  cancelled and its prefetched messages requeued (RabbitMQ then marks them redelivered,
  so they count attempt 2). The first reserve() on a queue waits for its consumer to
  start (at most 2 s, even with ``timeout=0``), so it finds messages already waiting.
- Dedupe (publishing an id already waiting is a no-op): **no**. AMQP has no lookup by
  message id, so a repeat publish is a second message (``Capabilities.dedupes_publish`` False).
  Workers stay correct because the result backend refuses to run a task whose record is
  already final; fan-in relies on the backend's ``claim_chord``, not on the broker.
- Dead letters: ``reject()`` publishes to ``nbq.dead.<queue>`` (durable) with the reason
  in the ``x-nbq-reason`` header, then acks; ``dead_letters()`` peeks (get, then requeue).
- Stale deliveries: ``Delivery.tag`` is (session, delivery tag); after the channel or
  connection is replaced, ack/retry/reject/release/extend on an old delivery return False.
- Reconnects: with back-off after RabbitMQ restarts or drops the connection; after
  ``reconnect_timeout`` seconds without success, ``ConnectionLost``. A publish cut off
  before its confirm is published again (at least once: it may arrive twice). A wrong
  password or vhost on the first connection is a ``ConfigurationError`` at once.
- stats(): AMQP cannot list queues, so per queue this broker declared or was asked
  about (``stats(queues)``; ``App.status()`` asks about its default queue, its tasks'
  queues and the queues live workers serve, so ``nbqueue status`` from another process
  finds them) and that exists: ready (the queue's message count), delayed (sum over its
  delay queues), in_flight (deliveries held by *this process* only; AMQP does not report
  other consumers' unacked messages), dead.
- purge(queue) empties the queue, its delay queues and its dead letters (messages held
  unacked by consumers cannot be purged). ``delete_queues(names)`` deletes all three.

Threads: pika's BlockingConnection is not thread-safe. Consuming is confined to one
I/O thread per broker, which owns the consuming connection, pumps its heartbeats (so a
long task does not lose its connection) and carries out acks handed to it with
``add_callback_threadsafe``; reserve() and ack() may be called from any thread.
Publishing, declares and counts use one connection per calling thread. close() stops
the I/O thread (unacked messages return to their queues) and closes every connection;
call it when no other thread still uses the broker.

pika: BlockingConnection throughout; publisher confirms are pipelined through the
channel's underlying async channel (``BlockingChannel._impl``), since BlockingChannel
itself waits for each confirm (about 10x slower for bulk publishing).
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import math
import os
import threading
import time
from typing import Any, Callable, Iterable, Sequence

import pika
import pika.exceptions as pex

from ...broker import Broker, Capabilities, Delivery, Outgoing, queue_list, text_of
from ...errors import BrokerError, ConfigurationError, ConnectionLost, PublishRefused
from ...urls import redact
from .client import check_url, connection_parameters, refused

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

#: a reserve() on queues not consumed yet waits up to this long for the consumer to start,
#: then FIRST_PUSH_S for the messages RabbitMQ pushes at once (so timeout=0 still finds them)
SETUP_WAIT_S, FIRST_PUSH_S = 2.0, 0.05
#: stats() re-probes a queue found missing after this long (a probe that misses costs a
#: channel and an error line in RabbitMQ's log); queues this process declares are seen at once
MISSING_RECHECK_S = 5.0

#: our own URL query options (removed before pika parses the URL) and their defaults
OPTIONS = {"reconnect_timeout": 60.0, "confirm_timeout": 30.0, "publish_batch": 500, "eta_tolerance": 1.0}

#: errors that mean "this connection is gone": reconnect
CONNECTION_ERRORS = (pex.AMQPConnectionError, pex.ChannelWrongStateError, pex.StreamLostError, OSError)
AUTH_ERRORS = (pex.ProbableAuthenticationError, pex.AuthenticationError, pex.ProbableAccessDeniedError)


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


def _noop() -> None:
    pass


def _wake(connection: pika.BlockingConnection) -> None:
    """Make a process_data_events() of this connection return (safe from pika callbacks)."""
    try:
        connection.add_callback_threadsafe(_noop)
    except Exception:   # closing: process_data_events returns anyway
        pass


# -- the consuming side: one I/O thread per broker ------------------------------------------

@dataclasses.dataclass
class _Pending:
    """A message pushed to this process and not yet handed to a reserver."""

    seq: int
    queue: str
    delivery_tag: int
    redelivered: bool
    properties: pika.BasicProperties
    body: bytes


class _Session:
    """One consuming connection + channel. Delivery tags are only meaningful within it."""

    def __init__(self, connection: pika.BlockingConnection, channel: Any):
        self.connection = connection
        self.channel = channel
        self.alive = True
        self.prefetch: int | None = None
        self.consumers: dict[str, str] = {}          # queue -> consumer tag
        self.buffer: list[_Pending] = []             # pushed, not yet reserved
        self.outstanding: dict[int, str] = {}        # delivery tag -> queue, handed out, not settled

    def settle(self, delivery_tag: int, action: str) -> None:
        """Run on the I/O thread: ack or nack(requeue) one delivery of this session."""
        if not (self.alive and self.channel.is_open):
            return
        try:
            if action == "ack":
                self.channel.basic_ack(delivery_tag)
            else:
                self.channel.basic_nack(delivery_tag, requeue=True)
        except Exception:  # the channel died under us; the loop notices and reconnects
            log.debug("could not %s delivery %s", action, delivery_tag, exc_info=True)

    def ack_many(self, delivery_tags: list[int]) -> None:
        """Run on the I/O thread: ack several deliveries, written out with one flush."""
        if not (self.alive and self.channel.is_open):
            return
        try:
            for tag in delivery_tags[:-1]:
                self.channel._impl.basic_ack(tag)     # queued on the async channel, no flush yet
            self.channel.basic_ack(delivery_tags[-1])  # ... and flushed with the last
        except Exception:  # the channel died under us; the loop notices and reconnects
            log.debug("could not ack %d deliveries", len(delivery_tags), exc_info=True)

    def __repr__(self) -> str:
        return f"<amqp session {id(self):#x}{'' if self.alive else ' closed'}>"


@dataclasses.dataclass(eq=False)
class _Demand:
    """A reserve() call waiting for messages: which queues and how many."""

    queues: frozenset
    limit: int


class _Consumer(threading.Thread):
    """The I/O thread: owns the consuming connection, reconnects, applies demand and settles."""

    def __init__(self, broker: "AMQPBroker"):
        super().__init__(name="nbqueue-amqp-consumer", daemon=True)
        self.broker = broker
        self.stopping = False
        self.failed: BaseException | None = None
        self._sleep = threading.Event()

    # called from other threads
    def stop(self) -> None:
        self.stopping = True
        self._sleep.set()
        self.poke()

    def poke(self) -> None:
        """Wake the I/O loop (to apply a changed demand, or to stop)."""
        session = self.broker._session
        if session is not None:
            _wake(session.connection)

    # the thread
    def run(self) -> None:
        broker = self.broker
        down_since: float | None = None
        backoff = 0.05
        session: _Session | None = None
        while not self.stopping:
            session = None
            try:
                session = self._open()
                self._reconcile(session)      # back-off is reset only once a session is usable
                if down_since is not None:
                    log.info("consuming from %s again after %.1f s", redact(broker.url), time.monotonic() - down_since)
                down_since, backoff = None, 0.05
                while not self.stopping:
                    self._reconcile(session)
                    session.connection.process_data_events(time_limit=1.0)
                    if not session.channel.is_open:
                        raise pex.ChannelWrongStateError("the consuming channel was closed by the broker")
                session.connection.process_data_events(time_limit=0)   # settle what was handed over
            except CONNECTION_ERRORS + (pex.AMQPChannelError,) as exc:
                self._lost(session, exc)
                if self.stopping:
                    break
                now = time.monotonic()
                if down_since is None:
                    down_since = now
                    log.warning("lost the consuming connection to %s: %r; reconnecting", redact(broker.url), exc)
                if now - down_since >= broker.reconnect_timeout or (
                    isinstance(exc, AUTH_ERRORS) and not broker._ever_connected
                ):
                    self.failed = exc
                    with broker._cond:
                        broker._cond.notify_all()
                    log.error("giving up consuming from %s after %.1f s: %r", redact(broker.url), now - down_since, exc)
                    return
                self._sleep.wait(min(backoff, max(0.0, down_since + broker.reconnect_timeout - now)))
                backoff = min(backoff * 2, 2.0)
            except BaseException as exc:  # a bug: do not leave reservers waiting forever
                self._lost(session, exc)
                self.failed = exc
                with broker._cond:
                    broker._cond.notify_all()
                log.exception("the AMQP consumer thread stopped")
                return
        self._lost(session, None)

    def _open(self) -> _Session:
        broker = self.broker
        connection = pika.BlockingConnection(broker._params)
        try:
            channel = connection.channel()
            channel.basic_qos(prefetch_count=1, global_qos=True)
            channel.add_on_cancel_callback(functools.partial(self._on_broker_cancel, channel))
        except BaseException:
            _close_quietly(connection)
            raise
        session = _Session(connection, channel)
        session.prefetch = 1
        broker._ever_connected = True
        with broker._cond:
            broker._session = session
            broker._dirty = True
        return session

    def _lost(self, session: _Session | None, exc: BaseException | None) -> None:
        broker = self.broker
        if session is None:
            return
        with broker._cond:
            session.alive = False
            session.buffer.clear()          # the broker requeues everything unacked
            session.outstanding.clear()
            if broker._session is session:
                broker._session = None
            broker._cond.notify_all()
        _close_quietly(session.connection)

    def _on_broker_cancel(self, channel: Any, method_frame: Any) -> None:
        """RabbitMQ cancelled a consumer (its queue was deleted): forget it, requeue what it pushed."""
        tag = method_frame.method.consumer_tag
        broker = self.broker
        with broker._cond:
            session = broker._session
            if session is None or session.channel is not channel:
                return
            for queue, ctag in list(session.consumers.items()):
                if ctag == tag:
                    del session.consumers[queue]
            broker._dirty = True

    def _on_message(
        self, session: _Session, queue: str, _channel: Any, method: Any, properties: Any, body: bytes
    ) -> None:
        broker = self.broker
        with broker._cond:
            if not session.alive:
                return
            session.buffer.append(
                _Pending(next(broker._seq), queue, method.delivery_tag, bool(method.redelivered), properties, body)
            )
            # one message wants one reserver: wake one when every waiting reserver can take
            # it (worker threads ask for the same queues), not the whole herd
            if all(queue in d.queues for d in broker._demands):
                broker._cond.notify()
            else:
                broker._cond.notify_all()

    def _reconcile(self, session: _Session) -> None:
        """Make consumers and prefetch match the reservers waiting now (on the I/O thread)."""
        broker = self.broker
        with broker._cond:
            if not broker._dirty:
                return
            broker._dirty = False
            demands = list(broker._demands)
            if demands:
                wanted: set[str] = set().union(*(d.queues for d in demands))
                prefetch: int | None = broker._window(session)
            else:                        # nobody waiting: keep consuming what was asked for last
                wanted, prefetch = set(session.consumers), None
            cancel = [q for q in session.consumers if q not in wanted]
            add = sorted(q for q in wanted if q not in session.consumers)
        channel = session.channel
        if prefetch is not None and prefetch != session.prefetch:
            channel.basic_qos(prefetch_count=min(prefetch, 65535), global_qos=True)
            session.prefetch = prefetch
        for queue in cancel:
            channel.basic_cancel(session.consumers.pop(queue))
            with broker._cond:
                give_back = [p for p in session.buffer if p.queue == queue]
                session.buffer = [p for p in session.buffer if p.queue != queue]
            for pending in give_back:
                channel.basic_nack(pending.delivery_tag, requeue=True)
        for queue in add:
            channel.queue_declare(queue, durable=True, arguments=work_queue_arguments())
            tag = channel.basic_consume(queue, functools.partial(self._on_message, session, queue))
            with broker._cond:
                session.consumers[queue] = tag
                broker._cond.notify_all()      # reservers waiting for the consumer to start
            log.debug("consuming %s (%s)", queue, tag)


# -- the publishing side: one connection per calling thread -----------------------------------

class _ConfirmTimeout(pex.AMQPConnectionError):
    """No publisher confirm arrived in time: treat the connection as gone."""


class _Publisher:
    """One thread's connection: a confirm-mode channel to publish on and a plain one for admin."""

    def __init__(self, params: pika.ConnectionParameters, on_declare: Callable[[str], Any] = lambda name: None):
        self.thread = threading.current_thread()
        self.on_declare = on_declare
        self.connection = pika.BlockingConnection(params)
        self.declared: dict[str, float] = {}    # queue name -> monotonic time of the declare
        self._admin: Any = None
        self._channel: Any = None
        self._pending: dict[int, tuple[int, str | None, str]] = {}   # confirm tag -> (index, id, routing key)
        self._returned: dict[tuple[str | None, str], str] = {}
        self._refused: dict[int, str] = {}
        self._closed_reason: Exception | None = None
        self._next_tag = 1

    @property
    def is_open(self) -> bool:
        return self.connection.is_open

    def close(self) -> None:
        _close_quietly(self.connection)

    # admin channel: declares, counts, purges, deletes, peeks
    def admin(self) -> Any:
        if self._admin is None or not self._admin.is_open:
            self._admin = self.connection.channel()
        return self._admin

    def declare(self, name: str, arguments: dict | None, *, refresh: float | None = None) -> None:
        last = self.declared.get(name)
        if last is not None and (refresh is None or time.monotonic() - last < refresh):
            return
        try:
            self.admin().queue_declare(name, durable=True, arguments=arguments)
        except pex.ChannelClosedByBroker as exc:
            self._admin = None
            if exc.reply_code == 406:
                raise ConfigurationError(
                    f"RabbitMQ queue {name!r} exists with other settings than nbqueue needs "
                    f"(durable, arguments {arguments}): {exc.reply_text}; delete it or use another queue name"
                ) from exc
            raise BrokerError(f"RabbitMQ refused to declare queue {name!r}: {exc.reply_code} {exc.reply_text}") from exc
        self.declared[name] = time.monotonic()
        self.on_declare(name)

    def declare_work_queue(self, queue: str) -> None:
        self.declare(queue, work_queue_arguments())
        self.declare(dead_queue_name(queue), None)

    def declare_delay_queues(self, queue: str) -> None:
        """All buckets at once (hourly), so they exist and expire as a set."""
        arguments = delay_queue_arguments(queue)
        for name in delay_queue_names(queue):
            self.declare(name, arguments, refresh=DELAY_REDECLARE_S)

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
            _close_quietly(channel)      # closing the channel requeues what it got
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
            _close_quietly(channel)
        return removed

    # publishing with confirms, pipelined
    def _channel_for_publish(self) -> Any:
        if self._channel is not None and self._channel.is_open:
            return self._channel
        channel = self.connection.channel()
        impl = channel._impl   # pika's async channel: its confirm API lets us pipeline a batch
        ready: list[bool] = []

        def selected(_frame: Any) -> None:
            ready.append(True)
            _wake(self.connection)

        impl.confirm_delivery(ack_nack_callback=self._on_confirm, callback=selected)
        impl.add_on_return_callback(self._on_return)
        impl.add_on_close_callback(self._on_channel_closed)
        deadline = time.monotonic() + 30
        while not ready:
            if time.monotonic() > deadline:
                raise _ConfirmTimeout("confirm.select got no answer")
            self.connection.process_data_events(time_limit=1.0)
        self._channel, self._next_tag, self._closed_reason = channel, 1, None
        self._pending.clear()
        return channel

    def _on_confirm(self, frame: Any) -> None:
        method = frame.method
        nack = isinstance(method, pika.spec.Basic.Nack)
        tags = [t for t in self._pending if t <= method.delivery_tag] if method.multiple else [method.delivery_tag]
        for tag in tags:
            entry = self._pending.pop(tag, None)
            if entry is None:
                continue
            index, message_id, routing_key = entry
            returned = self._returned.pop((message_id, routing_key), None)
            if nack:
                self._refused[index] = "nacked by RabbitMQ (e.g. a queue length limit with overflow=reject-publish)"
            elif returned is not None:
                self._refused[index] = returned
        if not self._pending:
            _wake(self.connection)

    def _on_return(self, _channel: Any, method: Any, properties: Any, _body: bytes) -> None:
        self._returned[(properties.message_id, method.routing_key)] = (
            f"unroutable: no queue {method.routing_key!r} ({method.reply_code} {method.reply_text})"
        )

    def _on_channel_closed(self, _channel: Any, reason: Exception) -> None:
        self._closed_reason = reason
        _wake(self.connection)

    def publish(
        self, items: Sequence[tuple[int, str, bytes, pika.BasicProperties]], timeout: float
    ) -> tuple[set[int], dict[int, str]]:
        """Publish and wait for confirms. Returns (confirmed indexes, refused index -> reason).

        Raises a connection error when the connection drops or confirms do not come;
        the caller republishes what was not confirmed.
        """
        channel = self._channel_for_publish()
        impl = channel._impl
        self._refused, self._returned = {}, {}
        for index, routing_key, body, properties in items:
            self._pending[self._next_tag] = (index, properties.message_id, routing_key)
            self._next_tag += 1
            impl.basic_publish("", routing_key, body, properties, mandatory=True)
        deadline = time.monotonic() + timeout
        while self._pending:
            if self._closed_reason is not None:
                if not self.connection.is_open:
                    raise pex.StreamLostError(f"connection closed while publishing: {self._closed_reason!r}")
                # a channel error (not a dropped connection): what was not confirmed is refused
                reason, self._channel = self._closed_reason, None
                for index, *_ in self._pending.values():
                    self._refused[index] = f"channel closed by RabbitMQ: {reason}"
                self._pending.clear()
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _ConfirmTimeout(f"no publisher confirm within {timeout:g} s")
            self.connection.process_data_events(time_limit=min(remaining, 1.0))
        refused = self._refused
        return {i for i, *_ in items if i not in refused}, refused


def _int_header(headers: dict, name: str) -> int:
    value = headers.get(name)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def _maybe_lapsed(p: _Pending) -> bool:
    """The delivery before this one may have ended unfinished: it went back unacked, or was
    put back while an earlier attempt was alive (``defer``)."""
    return p.redelivered or _int_header(p.properties.headers or {}, H_RECHECK) > 0


def _after_lapse(p: _Pending) -> bool:
    """A pushed message an earlier delivery of which may have ended without finishing."""
    return _maybe_lapsed(p) or _int_header(p.properties.headers or {}, H_LAPSES) > 0


def _lapse_headers(delivery: Delivery) -> dict:
    """The lapse count a message published again carries on."""
    return {H_LAPSES: delivery.lapsed, H_LAPSE_TOKEN: delivery.lapse_token} if delivery.lapsed else {}


def _close_quietly(thing: Any) -> None:
    try:
        if thing is not None and thing.is_open:
            thing.close()
    except Exception:
        pass


def _option(options: dict, query: dict, name: str) -> Any:
    default = OPTIONS[name]
    value = options.get(name, query.get(name, default))
    return type(default)(value)


# -- the broker -------------------------------------------------------------------------------

class AMQPBroker(Broker):
    """RabbitMQ broker; see the module docstring for what it supports."""

    scheme = "amqp"
    #: RabbitMQ redelivers on connection death, not on a lease timer; it cannot look a message
    #: up by id, so a repeated publish is a second message; it cannot list queues: stats()
    #: reports the queues it is told about (see stats)
    capabilities = Capabilities(leases_expire=False, dedupes_publish=False, lists_queues=False)

    def __init__(self, url: str, *, clock=None, options: dict | None = None):
        super().__init__(url, clock=clock, options=options)
        query = check_url(url)
        self.reconnect_timeout = _option(self.options, query, "reconnect_timeout")
        self.confirm_timeout = _option(self.options, query, "confirm_timeout")
        self.publish_batch = max(1, _option(self.options, query, "publish_batch"))
        self.eta_tolerance = _option(self.options, query, "eta_tolerance")
        self._params = connection_parameters(url, OPTIONS)
        if "blocked_connection_timeout" not in query:   # a resource alarm must not block a publisher forever
            self._params.blocked_connection_timeout = self.confirm_timeout

        self._pid = os.getpid()
        self._fresh_state()

    def _fresh_state(self) -> None:
        """Connection state of this process (called again in a forked child)."""
        self._cond = threading.Condition()
        self._session: _Session | None = None
        self._demands: list[_Demand] = []
        self._dirty = False
        self._wakes = 0
        self._seq = itertools.count()
        self._consumer: _Consumer | None = None
        self._consumer_lock = threading.Lock()
        self._ever_connected = getattr(self, "_ever_connected", False)

        self._local = threading.local()
        self._publishers: list[_Publisher] = []
        self._publishers_lock = threading.Lock()
        self._known: set[str] = set(getattr(self, "_known", ()))
        self._known_lock = threading.Lock()
        self._missing: dict[str, float] = {}     # queue name -> when a probe found it missing

    # -- connections ----------------------------------------------------------------------
    def _check_fork(self) -> None:
        """In a forked child, abandon the parent's connections (never close them: the
        sockets are shared with the parent) and start afresh."""
        if os.getpid() != self._pid:
            self._pid = os.getpid()
            self._fresh_state()

    def _publisher(self) -> _Publisher:
        pub = getattr(self._local, "publisher", None)
        if pub is not None and pub.is_open:
            return pub
        if pub is not None:
            self._drop_publisher(pub)
        pub = _Publisher(self._params, on_declare=lambda name: self._missing.pop(name, None))
        self._ever_connected = True
        self._local.publisher = pub
        with self._publishers_lock:
            gone = [p for p in self._publishers if not p.thread.is_alive()]
            self._publishers = [p for p in self._publishers if p.thread.is_alive()] + [pub]
        for p in gone:          # connections of threads that ended: nobody else uses them
            p.close()
        return pub

    def _drop_publisher(self, pub: _Publisher) -> None:
        if getattr(self._local, "publisher", None) is pub:
            self._local.publisher = None
        with self._publishers_lock:
            if pub in self._publishers:
                self._publishers.remove(pub)
        pub.close()

    def _with_publisher(self, work: Callable[[_Publisher], Any], what: str) -> Any:
        """Run ``work`` on this thread's connection, reconnecting with back-off until reconnect_timeout."""
        self._check_fork()
        started = time.monotonic()
        backoff = 0.05
        while True:
            pub = None
            try:
                pub = self._publisher()
                return work(pub)
            except CONNECTION_ERRORS as exc:
                if isinstance(exc, ConnectionLost):     # ours (an OSError too): already final
                    raise
                if pub is not None:
                    self._drop_publisher(pub)
                waited = time.monotonic() - started
                if isinstance(exc, AUTH_ERRORS) and not self._ever_connected:
                    raise refused(self.url, self._params, exc) from exc
                if waited >= self.reconnect_timeout:
                    raise ConnectionLost(
                        f"cannot reach RabbitMQ at {redact(self.url)} to {what} (tried for {waited:.1f} s): {exc!r}"
                    ) from exc
                log.warning("RabbitMQ connection lost while trying to %s: %r; retrying in %.2f s", what, exc, backoff)
                time.sleep(min(backoff, max(0.0, self.reconnect_timeout - waited)))
                backoff = min(backoff * 2, 2.0)

    def _note(self, queues: Iterable[str]) -> None:
        with self._known_lock:
            self._known.update(queues)

    def _known_queues(self) -> list[str]:
        with self._known_lock:
            return sorted(self._known)

    # -- publishing -----------------------------------------------------------------------
    def publish_many(self, outs: Sequence[Outgoing]) -> None:
        if not outs:
            return
        now = self.clock.time()
        self._note(o.queue for o in outs)
        plan = [self._route(o.id, o.queue, o.body, o.priority, o.eta, now, {}) for o in outs]
        self._publish_routed(plan, [o.id for o in outs])

    def _route(
        self, message_id: str, queue: str, body: str, priority: int, eta: float | None, now: float, headers: dict
    ) -> tuple:
        """(work queue, routing key, delayed?, body bytes, properties)."""
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

    def _publish_routed(self, plan: list[tuple], ids: list[str]) -> None:
        """Declare what the plan needs, publish it in confirmed batches, raise PublishRefused for refusals."""
        confirmed: set[int] = set()
        refused: dict[int, str] = {}

        def work(pub: _Publisher) -> None:
            for queue, _routing_key, delayed, _body, _props in plan:
                pub.declare_work_queue(queue)
                if delayed:
                    pub.declare_delay_queues(queue)
            todo = [
                (i, rk, body, props)
                for i, (_q, rk, _a, body, props) in enumerate(plan)
                if i not in confirmed and i not in refused
            ]
            for start in range(0, len(todo), self.publish_batch):
                ok, bad = pub.publish(todo[start:start + self.publish_batch], self.confirm_timeout)
                confirmed.update(ok)
                refused.update(bad)
                for index in bad:   # a vanished queue: declare it again next time
                    pub.declared.pop(plan[index][1], None)

        self._with_publisher(work, "publish")
        if refused:
            detail = "; ".join(f"{ids[i]}: {reason}" for i, reason in sorted(refused.items())[:5])
            more = f" (and {len(refused) - 5} more)" if len(refused) > 5 else ""
            exc = PublishRefused(f"RabbitMQ refused {len(refused)} of {len(plan)} messages: {detail}{more}")
            exc.message_ids = [ids[i] for i in sorted(refused)]
            raise exc

    # -- consuming ------------------------------------------------------------------------
    def _ensure_consumer(self) -> _Consumer:
        self._check_fork()
        with self._consumer_lock:
            consumer = self._consumer
            if consumer is None or consumer.failed is not None or not consumer.is_alive():
                consumer = self._consumer = _Consumer(self)
                consumer.start()
            return consumer

    def reserve(
        self, queues: Sequence[str], *, timeout: float = 0.0, lease: float = 30.0, limit: int = 1
    ) -> list[Delivery]:
        names = queue_list(queues)
        if not names:
            return []
        limit = max(1, int(limit))
        self._note(names)
        self._with_publisher(lambda pub: [pub.declare_work_queue(q) for q in names], "declare queues")
        started = time.monotonic()
        deadline = started + max(0.0, timeout)
        wanted = frozenset(names)
        demand = _Demand(wanted, limit)
        consumer = self._ensure_consumer()
        with self._cond:
            wakes = self._wakes
            setting_up = not self._consuming(wanted)
            self._demands.append(demand)
            session = self._session
            # wake the I/O thread only if consumers or the prefetch window must change
            change = (setting_up or session is None or session.prefetch != self._window(session)
                      or not set(session.consumers) <= set().union(*(d.queues for d in self._demands)))
            self._dirty = self._dirty or change
        if change:
            consumer.poke()
        try:
            while True:
                with self._cond:
                    while True:
                        taken = self._take(wanted, demand.limit)
                        if taken:
                            break
                        if consumer.failed is not None:
                            failure = consumer.failed
                            raise ConnectionLost(
                                f"cannot consume from RabbitMQ at {redact(self.url)}: {failure!r}"
                            ) from failure
                        if setting_up and self._consuming(wanted):
                            setting_up = False
                            deadline = max(deadline, time.monotonic() + FIRST_PUSH_S)
                        until = max(deadline, started + SETUP_WAIT_S) if setting_up else deadline
                        remaining = until - time.monotonic()
                        if remaining <= 0 or self._wakes != wakes:
                            return []
                        self._cond.wait(remaining)
                deliveries = self._deliveries(taken, lease)
                if deliveries:
                    return deliveries
        finally:
            with self._cond:
                self._demands.remove(demand)
                self._dirty = self._dirty or bool(self._demands)   # the others' window, at the next turn

    def _window(self, session: _Session) -> int:
        """Under the lock: the prefetch the waiting reservers need (held + asked for)."""
        return max(1, len(session.outstanding) + sum(d.limit for d in self._demands))

    def _consuming(self, queues: frozenset) -> bool:
        """Under the lock: is the current session consuming all of ``queues``?"""
        session = self._session
        return session is not None and all(q in session.consumers for q in queues)

    def _take(self, queues: frozenset, limit: int) -> list[tuple[_Session, _Pending]]:
        """Under the lock: move up to ``limit`` buffered messages of ``queues`` to outstanding."""
        session = self._session
        if session is None or not session.buffer:
            return []
        mine = [p for p in session.buffer if p.queue in queues]
        if not mine:
            return []
        mine.sort(key=lambda p: (-(p.properties.priority or 0), p.seq))
        if _after_lapse(mine[0]):
            taken = mine[:1]            # alone: a message that may have killed its worker takes no batch-mates along
        else:
            taken = list(itertools.takewhile(lambda p: not _after_lapse(p), mine))[:limit]
        chosen = {id(p) for p in taken}
        session.buffer = [p for p in session.buffer if id(p) not in chosen]
        for p in taken:
            session.outstanding[p.delivery_tag] = p.queue
        return [(session, p) for p in taken]

    def _deliveries(self, taken: list[tuple[_Session, _Pending]], lease: float) -> list[Delivery]:
        now = self.clock.time()
        out, early = [], []
        for session, p in taken:
            headers = p.properties.headers or {}
            eta_ms = headers.get(H_ETA)
            if isinstance(eta_ms, int) and eta_ms / 1000 - now > self.eta_tolerance:
                early.append((session, p))      # a long delay's intermediate hop
                continue
            prior = headers.get(H_ATTEMPTS)
            attempt = (prior if isinstance(prior, int) else 0) + 1 + (1 if p.redelivered else 0)
            body, problem = text_of(p.body)
            lapsed = _int_header(headers, H_LAPSES)
            out.append(Delivery(
                message_id=p.properties.message_id or "",
                queue=p.queue,
                body=body,
                attempt=attempt,
                lease_until=now + lease,
                tag=(session, p.delivery_tag),
                priority=p.properties.priority or 0,
                lapsed=lapsed,
                maybe_lapsed=_maybe_lapsed(p),
                lapse_token=_int_header(headers, H_LAPSE_TOKEN),
                dead_reason=problem or self.limit_reason(lapsed),
            ))
        for session, p in early:
            self._redelay(session, p, now)
        return out

    def _redelay(self, session: _Session, p: _Pending, now: float) -> None:
        headers = dict(p.properties.headers or {})
        headers.pop("x-death", None)
        for name in ("x-first-death-queue", "x-first-death-reason", "x-first-death-exchange"):
            headers.pop(name, None)
        if p.redelivered:
            headers[H_ATTEMPTS] = int(headers.get(H_ATTEMPTS) or 0) + 1
        eta = headers[H_ETA] / 1000
        routed = self._route(p.properties.message_id or "", p.queue, p.body.decode("utf-8", "surrogateescape"),
                             p.properties.priority or 0, eta, now, headers)
        try:
            self._publish_routed([routed], [p.properties.message_id or ""])
        except BaseException:
            self._settle(Delivery("", p.queue, "", 1, 0.0, tag=(session, p.delivery_tag)), "nack")
            raise
        self._settle(Delivery("", p.queue, "", 1, 0.0, tag=(session, p.delivery_tag)), "ack")
        log.debug("message %s is not due for %.0f s: sent back to the delay queues", p.properties.message_id, eta - now)

    # -- settling deliveries ----------------------------------------------------------------
    def _claim(self, delivery: Delivery) -> _Session | None:
        """Take a current delivery out of outstanding (so no one else settles it); None if stale."""
        self._check_fork()
        tag = delivery.tag
        if not (isinstance(tag, tuple) and len(tag) == 2 and isinstance(tag[0], _Session)):
            return None
        session, delivery_tag = tag
        with self._cond:
            if session is not self._session or not session.alive or delivery_tag not in session.outstanding:
                return None
            del session.outstanding[delivery_tag]
            return session

    def _unclaim(self, session: _Session, delivery: Delivery) -> None:
        with self._cond:
            if session.alive:
                session.outstanding[delivery.tag[1]] = delivery.queue

    def _handover(self, session: _Session, delivery_tag: int, action: str) -> bool:
        """Have the I/O thread ack or requeue (AMQP acks have no reply, so this does not wait)."""
        try:
            session.connection.add_callback_threadsafe(functools.partial(session.settle, delivery_tag, action))
        except Exception:
            return False
        with self._cond:
            self._dirty = self._dirty or bool(self._demands)   # the window follows what we hold
        return True

    def _settle(self, delivery: Delivery, action: str) -> bool:
        session = self._claim(delivery)
        return session is not None and self._handover(session, delivery.tag[1], action)

    def ack(self, delivery: Delivery) -> bool:
        return self._settle(delivery, "ack")

    def ack_many(self, deliveries: Sequence[Delivery]) -> list[bool]:
        """One hand-over to the I/O thread for the lot (a worker's batch), not one per delivery."""
        sessions = [self._claim(d) for d in deliveries]
        tags: dict[_Session, list[int]] = {}
        for session, delivery in zip(sessions, deliveries):
            if session is not None:
                tags.setdefault(session, []).append(delivery.tag[1])
        failed: set = set()
        for session, session_tags in tags.items():   # one session, unless it was replaced meanwhile
            try:
                session.connection.add_callback_threadsafe(functools.partial(session.ack_many, session_tags))
            except Exception:
                failed.add(session)
        if tags:
            with self._cond:
                self._dirty = self._dirty or bool(self._demands)   # the window follows what we hold
        return [s is not None and s not in failed for s in sessions]

    def release(self, delivery: Delivery) -> bool:
        """Requeue at once (RabbitMQ marks it redelivered, so the next attempt counts up; it is
        not counted as a lapse unless the task's record shows an attempt that never finished)."""
        return self._settle(delivery, "nack")

    def defer(self, delivery: Delivery, *, eta: float) -> bool:
        """``retry`` at ``eta``, marked (``x-nbq-recheck``) so that its next delivery is again
        ``maybe_lapsed``: alone, and begun only if no earlier attempt is alive."""
        return self._republish(delivery, delivery.body, eta, {**_lapse_headers(delivery), H_RECHECK: 1})

    def count_lapse(self, delivery: Delivery, token: int) -> bool:
        """Publish the message again with one more lapse counted at the record's fencing token
        ``token`` (confirmed), then ack this delivery; see the module docstring."""
        return self._republish(delivery, delivery.body, None, {H_LAPSES: delivery.lapsed + 1, H_LAPSE_TOKEN: token})

    def extend(self, delivery: Delivery, lease: float) -> bool:
        self._check_fork()
        tag = delivery.tag
        if not (isinstance(tag, tuple) and len(tag) == 2 and isinstance(tag[0], _Session)):
            return False
        session, delivery_tag = tag
        with self._cond:
            current = session is self._session and session.alive and delivery_tag in session.outstanding
        if current and session.channel.is_open:
            delivery.lease_until = self.clock.time() + lease
            return True
        return False

    def retry(self, delivery: Delivery, *, body: str | None = None, eta: float | None = None) -> bool:
        """Publish the message again (new body and eta if given), confirmed, then ack this delivery."""
        return self._republish(delivery, delivery.body if body is None else body, eta, _lapse_headers(delivery))

    def _republish(self, delivery: Delivery, body: str, eta: float | None, headers: dict) -> bool:
        session = self._claim(delivery)
        if session is None:
            return False
        now = self.clock.time()
        routed = self._route(
            delivery.message_id,
            delivery.queue,
            body,
            delivery.priority,
            eta,
            now,
            {H_ATTEMPTS: delivery.attempt, **headers},
        )
        try:
            self._publish_routed([routed], [delivery.message_id])
        except BaseException:
            self._unclaim(session, delivery)
            raise
        self._handover(session, delivery.tag[1], "ack")
        return True

    def reject(self, delivery: Delivery, reason: str) -> bool:
        """Dead-letter into nbq.dead.<queue> with the reason, confirmed, then ack this delivery."""
        session = self._claim(delivery)
        if session is None:
            return False
        now = self.clock.time()
        dead = dead_queue_name(delivery.queue)
        properties = pika.BasicProperties(
            message_id=delivery.message_id,
            delivery_mode=2,  # persistent
            content_type="application/json",
            content_encoding="utf-8",
            timestamp=int(now),
            headers={
                H_REASON: str(reason),
                H_QUEUE: delivery.queue,
                H_ATTEMPTS: delivery.attempt,
                **_lapse_headers(delivery),
            },
        )

        def work(pub: _Publisher) -> None:
            pub.declare_work_queue(delivery.queue)
            ok, bad = pub.publish(
                [(0, dead, delivery.body.encode("utf-8", "surrogateescape"), properties)], self.confirm_timeout
            )
            if bad:
                pub.declared.pop(dead, None)
                raise PublishRefused(f"RabbitMQ refused the dead letter of {delivery.message_id}: {bad[0]}")

        try:
            self._with_publisher(work, "dead-letter a message")
        except BaseException:
            self._unclaim(session, delivery)
            raise
        self._handover(session, delivery.tag[1], "ack")
        return True

    # -- inspection and upkeep -------------------------------------------------------------
    def stats(self, queues: Sequence[str] | None = None) -> list[dict]:
        """One dict per existing queue this broker declared or was asked about (plus ``queues``)."""
        if queues:
            self._note(queue_list(queues))
        names = self._known_queues()

        def work(pub: _Publisher) -> list[dict]:
            rows = []
            for queue in names:
                ready, dead = self._probe(pub, queue), self._probe(pub, dead_queue_name(queue))
                delayed, held = self._delayed(pub, queue), self._held(queue)
                if ready is None and dead is None and not delayed and not held:
                    continue  # asked about, but nothing was ever sent there
                rows.append(
                    {"queue": queue, "ready": ready or 0, "delayed": delayed, "in_flight": held, "dead": dead or 0}
                )
            return rows

        return self._with_publisher(work, "read queue stats")

    def _probe(self, pub: _Publisher, name: str) -> int | None:
        """Ready messages of a queue, None if it does not exist. A probe that misses costs a
        channel and a line in RabbitMQ's log, so a miss is remembered for MISSING_RECHECK_S
        (or until this process declares the queue)."""
        missed = self._missing.get(name)
        if missed is not None and time.monotonic() - missed < MISSING_RECHECK_S:
            return None
        count = pub.count(name)
        if count is None:
            self._missing[name] = time.monotonic()
        else:
            self._missing.pop(name, None)
        return count

    def _delayed(self, pub: _Publisher, queue: str) -> int:
        """Messages in the queue's delay queues (they come as a set: probe the first)."""
        first, *rest = delay_queue_names(queue)
        count = self._probe(pub, first)
        if count is None:
            return 0
        return count + sum(pub.count(name) or 0 for name in rest)

    def _held(self, queue: str) -> int:
        with self._cond:
            session = self._session
            if session is None:
                return 0
            return sum(1 for q in session.outstanding.values() if q == queue) + sum(
                1 for p in session.buffer if p.queue == queue
            )

    def purge(self, queue: str) -> int:
        """Remove the queue's ready, delayed and dead messages; returns how many."""
        self._note([queue])

        def work(pub: _Publisher) -> int:
            delays = delay_queue_names(queue)
            names = [queue, *(delays if self._probe(pub, delays[0]) is not None else [])]
            if self._probe(pub, dead_queue_name(queue)) is not None:
                names.append(dead_queue_name(queue))
            return sum(pub.purge(name) for name in names)

        return self._with_publisher(work, "purge")

    def dead_letters(self, queue: str | None = None, limit: int = 100) -> list[dict]:
        queues = [queue] if queue is not None else self._known_queues()
        if queue is not None:
            self._note([queue])

        def work(pub: _Publisher) -> list[dict]:
            rows: list[dict] = []
            for q in queues:
                if self._probe(pub, dead_queue_name(q)) is None:
                    continue
                for properties, body in pub.peek(dead_queue_name(q), limit - len(rows)):
                    headers = properties.headers or {}
                    reason = headers.get(H_REASON, "")
                    rows.append({
                        "id": properties.message_id or "",
                        "queue": headers.get(H_QUEUE, q),
                        "reason": reason.decode() if isinstance(reason, bytes) else str(reason),
                        "body": body.decode("utf-8", errors="replace"),
                    })
                if len(rows) >= limit:
                    break
            return rows

        return self._with_publisher(work, "read dead letters")

    def remove_dead_letters(self, queue: str, ids: Sequence[str]) -> int:
        wanted = set(ids)
        if not wanted:
            return 0

        def work(pub: _Publisher) -> int:
            if self._probe(pub, dead_queue_name(queue)) is None:
                return 0
            return pub.take(dead_queue_name(queue), wanted, len(wanted) + 1000)

        return self._with_publisher(work, "remove dead letters")

    def delete_queues(self, names: Iterable[str]) -> None:
        """Delete work queues with their delay and dead-letter queues (messages included)."""
        names = list(names)

        def work(pub: _Publisher) -> None:
            for queue in names:
                for name in (queue, *delay_queue_names(queue), dead_queue_name(queue)):
                    pub.delete(name)

        self._with_publisher(work, "delete queues")
        with self._known_lock:
            self._known.difference_update(names)

    def wake(self) -> None:
        with self._cond:
            self._wakes += 1
            self._cond.notify_all()

    def close(self) -> None:
        """Stop consuming (unacked messages go back to their queues) and close all connections.

        Call it when no other thread is using this broker any more.
        """
        self._check_fork()
        self.wake()
        with self._consumer_lock:
            consumer, self._consumer = self._consumer, None
        if consumer is not None:
            consumer.stop()
            if consumer is not threading.current_thread():
                consumer.join(10)
        with self._publishers_lock:
            publishers, self._publishers = self._publishers, []
        for pub in publishers:
            pub.close()
        self._local = threading.local()
