"""RabbitMQ broker over AMQP 0-9-1 with pika (``pip install 'nbqueue[amqp]'``).

URL: ``amqp://user:pass@host:5672/vhost`` or ``amqps://...`` (TLS, host name checked);
the vhost is URL-quoted (``%2F`` is ``/``). pika's own query options work
(``?heartbeat=30&socket_timeout=5``), and so do ours: ``reconnect_timeout`` (seconds
to keep reconnecting before ConnectionLost, 0 or more, ``inf`` for ever; default 60),
``confirm_timeout`` (seconds to wait for publisher confirms, more than 0, default 30),
``publish_batch`` (messages per confirm round trip, 1 or more, default 500),
``eta_tolerance`` (seconds, 0 or more, default 1.0). The same keys may be passed as
``options`` (which win over the URL's); a value out of range is a ConfigurationError
naming it when the broker is made.

Capabilities:

- Durability: durable queues, persistent messages, publisher confirms; a publish the
  broker nacks, or returns as unroutable (``mandatory``), raises ``PublishRefused``.
  Work and delay queues are classic queues of version 2 (``x-queue-version=2``, RabbitMQ
  3.10+; older servers ignore it), which confirm a persistent message sooner than version 1
  (RabbitMQ 3.10 here, one publish at a time to a priority queue: 0.35 ms against 0.6 ms;
  see consumer.Session for what a consumer's acks do to it); a queue that already exists
  without the argument is used as it is (declaring it with other arguments would fail); a
  policy converts it in place, messages kept:
  ``rabbitmqctl set_policy --apply-to queues cqv2 '^myqueue$' '{"queue-version":2}'``.
  ``publish_many`` pipelines up to ``publish_batch`` messages per confirm round trip.
  ``start_publish`` writes the messages out and returns the function that waits for their
  confirms: the engine records the tasks (in SQLite) meanwhile.
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
- Prefetch: ``basic.qos`` (channel-wide, ``global``) follows the deliveries this process
  holds plus the ``limit`` its waiting reservers ask for (the window): raised at once to a
  wider window, lowered only once it has been more than the largest waiting reserver's
  ``limit`` above it for half a second, so worker threads that each take one message and
  come back for more do not re-set it per message (each change is a round trip); meanwhile
  RabbitMQ may push up to the wider prefetch (between reserve() calls they wait prefetched).
  Acks are held back a little and written together (see consumer.Session).
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
  unacked by consumers cannot be purged), draining them by ``basic.get`` so that the
  purged messages' tasks can be revoked (see ``purge_messages``). ``delete_queues(names)`` deletes all three.

Threads: pika's BlockingConnection is not thread-safe. Consuming is confined to one
I/O thread per broker, which owns the consuming connection, pumps its heartbeats (so a
long task does not lose its connection) and writes the acks other threads hold for it and
the requeues they hand to it with ``add_callback_threadsafe``; reserve() and ack() may be
called from any thread.
Publishing, declares and counts use one connection per calling thread. close() stops
the I/O thread (unacked messages return to their queues) and closes every connection;
call it when no other thread still uses the broker.

Modules: ``topology`` (queue names and arguments, delay buckets, headers, routing, the
declarations), ``consumer`` (the I/O thread, deliveries, acks), ``publisher`` (one connection
per thread, pipelined confirms); this module composes them into the Broker protocol.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any, Callable, Iterable, Sequence

from ...broker import Broker, Capabilities, Delivery, Outgoing, Purged, queue_list, text_of
from ...errors import PublishRefused
from ...options import count, over_query, seconds
from .client import Link, check_url, connection_parameters
from .consumer import Consumption, Pending, Session, deliveries, hop_headers, lapse_headers
from .publisher import Publisher, Publishers
from .topology import (
    H_ATTEMPTS,
    H_ETA,
    H_LAPSE_TOKEN,
    H_LAPSES,
    H_QUEUE,
    H_REASON,
    H_RECHECK,
    Shapes,
    dead_letter_properties,
    dead_queue_name,
    delay_queue_names,
    route,
)

log = logging.getLogger(__name__)

#: stats() re-probes a queue found missing after this long (a probe that misses costs a
#: channel and an error line in RabbitMQ's log); queues this process declares are seen at once
MISSING_RECHECK_S = 5.0

#: our own URL query options (removed before pika parses the URL) and their defaults
OPTIONS: dict[str, Any] = {"reconnect_timeout": 60.0, "confirm_timeout": 30.0, "publish_batch": 500,
                          "eta_tolerance": 1.0}


def _nothing() -> None:
    pass


class AMQPBroker(Broker):
    """RabbitMQ broker; see the module docstring for what it supports."""

    scheme = "amqp"
    #: RabbitMQ redelivers on connection death, not on a lease timer; it cannot look a message
    #: up by id, so a repeated publish is a second message; it cannot list queues: stats()
    #: reports the queues it is told about (see stats)
    capabilities = Capabilities(leases_expire=False, dedupes_publish=False, lists_queues=False)

    def __init__(self, url: str, *, clock=None, options: dict | None = None):
        super().__init__(url, clock=clock, options=options)
        query = check_url(url, OPTIONS)
        option = over_query(query, self.options).get
        # reconnect_timeout: inf keeps reconnecting; a confirm_timeout of 0 would refuse every publish
        self.reconnect_timeout: float = seconds("reconnect_timeout", option("reconnect_timeout"),
                                                OPTIONS["reconnect_timeout"], infinite=True)
        self.confirm_timeout: float = seconds("confirm_timeout", option("confirm_timeout"),
                                              OPTIONS["confirm_timeout"], positive=True)
        self.publish_batch: int = count("publish_batch", option("publish_batch"),
                                        OPTIONS["publish_batch"])
        self.eta_tolerance: float = seconds("eta_tolerance", option("eta_tolerance"),
                                            OPTIONS["eta_tolerance"])
        self._params = connection_parameters(url, OPTIONS)
        if "blocked_connection_timeout" not in query:   # a resource alarm must not block a publisher forever
            self._params.blocked_connection_timeout = self.confirm_timeout
        self._link = Link(url, self._params, self.reconnect_timeout)
        self._known: set[str] = set()
        self._shapes = Shapes()
        self._pid = os.getpid()
        self._fresh_state()

    def _fresh_state(self) -> None:
        """Connection state of this process (called again in a forked child)."""
        self._consumption = Consumption(self._link, self._shapes)
        self._publishers = Publishers(self._link, lambda name: self._missing.pop(name, None), self._shapes)
        self._known_lock = threading.Lock()
        self._missing: dict[str, float] = {}     # queue name -> when a probe found it missing

    # -- connections ----------------------------------------------------------------------
    def _check_fork(self) -> None:
        """In a forked child, abandon the parent's connections (never close them: the
        sockets are shared with the parent) and start afresh."""
        if os.getpid() != self._pid:
            self._pid = os.getpid()
            self._fresh_state()

    def _with_publisher(self, work: Callable[[Publisher], Any], what: str) -> Any:
        """Run ``work`` on this thread's connection, reconnecting with back-off until reconnect_timeout."""
        self._check_fork()
        return self._publishers.run(work, what)

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
        plan = [route(o.id, o.queue, o.body, o.priority, o.eta, now, {}) for o in outs]
        self._publish_routed(plan, [o.id for o in outs])

    def start_publish(self, outs: Sequence[Outgoing]) -> Callable[[], None]:
        """``publish_many`` in two steps: the messages are written out to RabbitMQ now (the first
        ``publish_batch`` of them), and the returned function waits for their confirms (publishing
        the rest), raising what ``publish_many`` raises. Call it on this thread before the next
        publish; until it returns nothing is confirmed. The split engine writes the task records
        in between, while the confirms are on their way."""
        if not outs:
            return _nothing
        now = self.clock.time()
        self._note(o.queue for o in outs)
        plan = [route(o.id, o.queue, o.body, o.priority, o.eta, now, {}) for o in outs]
        self._check_fork()
        return self._publishers.start_routed(plan, [o.id for o in outs], self.publish_batch, self.confirm_timeout)

    def _publish_routed(self, plan: list[tuple], ids: list[str]) -> None:
        self._check_fork()
        self._publishers.publish_routed(plan, ids, self.publish_batch, self.confirm_timeout)

    # -- consuming ------------------------------------------------------------------------
    def reserve(
        self, queues: Sequence[str], *, timeout: float = 0.0, lease: float = 30.0, limit: int = 1
    ) -> list[Delivery]:
        names = queue_list(queues)
        if not names:
            return []
        limit = max(1, int(limit))
        self._note(names)

        def work(pub: Publisher) -> None:
            for name in names:
                pub.declare_work_queue(name)

        self._with_publisher(work, "declare queues")
        return self._consumption.reserve(names, limit, timeout, lambda taken: self._deliveries(taken, lease))

    def _deliveries(self, taken: list[tuple[Session, Pending]], lease: float) -> list[Delivery]:
        now = self.clock.time()
        out, early = deliveries(taken, lease, now, self.eta_tolerance, self.limit_reason)
        for session, p in early:
            self._redelay(session, p, now)
        return out

    def _redelay(self, session: Session, p: Pending, now: float) -> None:
        """Send a long delay's intermediate hop back to the delay queues, then ack it."""
        headers = hop_headers(p)
        eta = headers[H_ETA] / 1000
        routed = route(p.properties.message_id or "", p.queue, p.body.decode("utf-8", "surrogateescape"),
                       p.properties.priority or 0, eta, now, headers)
        try:
            self._publish_routed([routed], [p.properties.message_id or ""])
        except BaseException:
            self._consumption.settle_pending(session, p, "nack")
            raise
        self._consumption.settle_pending(session, p, "ack")
        log.debug("message %s is not due for %.0f s: sent back to the delay queues", p.properties.message_id, eta - now)

    # -- settling deliveries ----------------------------------------------------------------
    def ack(self, delivery: Delivery) -> bool:
        self._check_fork()
        return self._consumption.settle(delivery, "ack")

    def ack_many(self, deliveries: Sequence[Delivery]) -> list[bool]:
        """One hand-over to the I/O thread for the lot (a worker's batch), not one per delivery."""
        self._check_fork()
        return self._consumption.ack_many(deliveries)

    def release(self, delivery: Delivery) -> bool:
        """Requeue at once (RabbitMQ marks it redelivered, so the next attempt counts up; it is
        not counted as a lapse unless the task's record shows an attempt that never finished)."""
        self._check_fork()
        return self._consumption.settle(delivery, "nack")

    def defer(self, delivery: Delivery, *, eta: float) -> bool:
        """``retry`` at ``eta``, marked (``x-nbq-recheck``) so that its next delivery is again
        ``maybe_lapsed``: alone, and begun only if no earlier attempt is alive."""
        return self._republish(delivery, delivery.body, eta, {**lapse_headers(delivery), H_RECHECK: 1})

    def count_lapse(self, delivery: Delivery, token: int) -> bool:
        """Publish the message again with one more lapse counted at the record's fencing token
        ``token`` (confirmed), then ack this delivery; see the module docstring."""
        return self._republish(delivery, delivery.body, None, {H_LAPSES: delivery.lapsed + 1, H_LAPSE_TOKEN: token})

    def extend(self, delivery: Delivery, lease: float) -> bool:
        self._check_fork()
        if self._consumption.holds(delivery):
            delivery.lease_until = self.clock.time() + lease
            return True
        return False

    def retry(self, delivery: Delivery, *, body: str | None = None, eta: float | None = None) -> bool:
        """Publish the message again (new body and eta if given), confirmed, then ack this delivery."""
        return self._republish(delivery, delivery.body if body is None else body, eta, lapse_headers(delivery))

    def _republish(self, delivery: Delivery, body: str, eta: float | None, headers: dict) -> bool:
        self._check_fork()
        session = self._consumption.claim(delivery)
        if session is None:
            return False
        now = self.clock.time()
        routed = route(delivery.message_id, delivery.queue, body, delivery.priority, eta, now,
                       {H_ATTEMPTS: delivery.attempt, **headers})
        try:
            self._publish_routed([routed], [delivery.message_id])
        except BaseException:
            self._consumption.unclaim(session, delivery)
            raise
        self._consumption.handover(session, delivery.tag[1], "ack")
        return True

    def reject(self, delivery: Delivery, reason: str) -> bool:
        """Dead-letter into nbq.dead.<queue> with the reason, confirmed, then ack this delivery."""
        self._check_fork()
        session = self._consumption.claim(delivery)
        if session is None:
            return False
        dead = dead_queue_name(delivery.queue)
        properties = dead_letter_properties(delivery.message_id, delivery.queue, reason, self.clock.time(),
                                            {H_ATTEMPTS: delivery.attempt, **lapse_headers(delivery)})

        def work(pub: Publisher) -> None:
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
            self._consumption.unclaim(session, delivery)
            raise
        self._consumption.handover(session, delivery.tag[1], "ack")
        return True

    # -- inspection and upkeep -------------------------------------------------------------
    def stats(self, queues: Sequence[str] | None = None) -> list[dict]:
        """One dict per existing queue this broker declared or was asked about (plus ``queues``)."""
        if queues:
            self._note(queue_list(queues))
        names = self._known_queues()

        def work(pub: Publisher) -> list[dict]:
            rows = []
            for queue in names:
                ready, dead = self._probe(pub, queue), self._probe(pub, dead_queue_name(queue))
                delayed, held = self._delayed(pub, queue), self._consumption.held(queue)
                if ready is None and dead is None and not delayed and not held:
                    continue  # asked about, but nothing was ever sent there
                rows.append(
                    {"queue": queue, "ready": ready or 0, "delayed": delayed, "in_flight": held, "dead": dead or 0}
                )
            return rows

        return self._with_publisher(work, "read queue stats")

    def _probe(self, pub: Publisher, name: str) -> int | None:
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

    def _delayed(self, pub: Publisher, queue: str) -> int:
        """Messages in the queue's delay queues (they come as a set: probe the first)."""
        first, *rest = delay_queue_names(queue)
        count = self._probe(pub, first)
        if count is None:
            return 0
        return count + sum(pub.count(name) or 0 for name in rest)

    def purge_messages(self, queue: str) -> Purged:
        """Remove the queue's ready, delayed and dead messages. RabbitMQ's ``queue.purge``
        returns only a count, so each queue is drained instead: the messages it holds when
        asked are taken by ``basic.get`` (their bodies returned), then ``queue.purge`` removes
        any published during the drain, unseen (``complete`` False when there were any).
        Messages held unacknowledged by consumers are not purged (RabbitMQ cannot), and a
        drain pays one round trip per message."""
        self._note([queue])

        def work(pub: Publisher) -> Purged:
            delays = delay_queue_names(queue)
            names = [queue, *(delays if self._probe(pub, delays[0]) is not None else [])]
            if self._probe(pub, dead_queue_name(queue)) is not None:
                names.append(dead_queue_name(queue))
            bodies: list[str] = []
            unseen = 0
            for name in names:
                got, late = pub.drain(name)
                bodies += [text_of(b)[0] for b in got]
                unseen += late
            return Purged(len(bodies) + unseen, bodies, complete=not unseen)

        return self._with_publisher(work, "purge")

    def dead_letters(self, queue: str | None = None, limit: int = 100) -> list[dict]:
        queues = [queue] if queue is not None else self._known_queues()
        if queue is not None:
            self._note([queue])

        def work(pub: Publisher) -> list[dict]:
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

        def work(pub: Publisher) -> int:
            if self._probe(pub, dead_queue_name(queue)) is None:
                return 0
            return pub.take(dead_queue_name(queue), wanted, len(wanted) + 1000)

        return self._with_publisher(work, "remove dead letters")

    def delete_queues(self, names: Iterable[str]) -> None:
        """Delete work queues with their delay and dead-letter queues (messages included)."""
        names = list(names)

        def work(pub: Publisher) -> None:
            for queue in names:
                for name in (queue, *delay_queue_names(queue), dead_queue_name(queue)):
                    pub.delete(name)

        self._with_publisher(work, "delete queues")
        with self._known_lock:
            self._known.difference_update(names)

    def wake(self) -> None:
        self._consumption.wake()

    def close(self) -> None:
        """Stop consuming (unacked messages go back to their queues) and close all connections.

        Call it when no other thread is using this broker any more.
        """
        self._check_fork()
        self._consumption.stop()
        self._publishers.close()
