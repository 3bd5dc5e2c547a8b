"""The consuming side of the RabbitMQ broker: one I/O thread per broker owns the consuming
connection (pika's BlockingConnection is not thread-safe), pumps its heartbeats, follows the
demand of the waiting reservers (consumers per queue, the ``basic.qos`` window) and writes the
acks other threads hold for it (see Session) and the requeues they hand to it with
``add_callback_threadsafe``.

``Consumption`` is what the broker holds: the current session (connection + channel; delivery
tags mean something only within it), the messages pushed and not yet reserved, the deliveries
handed out and not settled, and the reservers waiting. Reading the deliveries' headers (attempts,
lapses, long-delay hops) is here too.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import threading
import time
from typing import Any, Callable, Sequence

import pika
import pika.exceptions as pex

from ...broker import Delivery, text_of
from ...errors import ConnectionLost
from ...urls import redact
from .client import AUTH_ERRORS, CONNECTION_ERRORS, Link, close_quietly, send_now, wake
from .topology import (
    H_ATTEMPTS,
    H_ETA,
    H_LAPSE_TOKEN,
    H_LAPSES,
    H_RECHECK,
    Shapes,
    int_header,
    work_queue_arguments,
)

log = logging.getLogger(__name__)

#: a reserve() on queues not consumed yet waits up to this long for the consumer to start,
#: then FIRST_PUSH_S for the messages RabbitMQ pushes at once (so timeout=0 still finds them)
SETUP_WAIT_S, FIRST_PUSH_S = 2.0, 0.05
#: the longest an ack is held back (see Session) when no further delivery comes
HOLD_ACK_S = 0.02
#: the prefetch is lowered once it has been wider than the window needs for this long (prefetch_for)
LOWER_AFTER_S = 0.5
#: held acks written with the next delivery once this many are held; all written at HOLD_MAX
HOLD_ACKS, HOLD_MAX = 4, 8


@dataclasses.dataclass
class Pending:
    """A message pushed to this process and not yet handed to a reserver."""

    seq: int
    queue: str
    delivery_tag: int
    redelivered: bool
    properties: pika.BasicProperties
    body: bytes


class Session:
    """One consuming connection + channel. Delivery tags are only meaningful within it.

    Every delivery RabbitMQ pushed and this process has not settled on the wire is in one of
    ``buffer`` (pushed, not yet reserved), ``outstanding`` (handed out), ``claimed`` (taken out
    of outstanding by a settle on its way: a publish before its ack, a requeue handed to the I/O
    thread) or ``held`` (settled, its ack not written yet).

    Holding acks: a classic queue of version 2 deletes an index segment file when its last
    unacked message is acked, and makes it again for the next message, which delays that
    message's publisher confirm (measured on RabbitMQ 3.10: about 0.35 ms for a persistent
    message to a queue nobody consumes, 0.9-1.1 ms when a consumer acks each at once, 0.5 ms
    when it acks each at the next delivery), and each ack is a frame RabbitMQ's channel and
    queue processes handle one by one. So while reservers wait and the prefetch window has room
    to spare, acks are held (their deliveries' threads hand them over without waking the I/O
    thread) and written when a delivery arrives once HOLD_ACKS are held, as one
    ``basic.ack(multiple=True)`` up to the lowest delivery not settled yet (the others each
    with their own frame when all must go), or all of them when HOLD_MAX are held, after
    HOLD_ACK_S, or as soon as a waiting reserver would need their slots. A task's result is
    stored before its ack is handed over, so a held ack only widens the window in which a
    worker's death makes RabbitMQ redeliver a finished task (its record says it is finished;
    it is not run again).
    """

    def __init__(self, connection: pika.BlockingConnection, channel: Any):
        self.connection = connection
        self.channel = channel
        self.alive = True
        self.prefetch: int | None = None
        self.consumers: dict[str, str] = {}          # queue -> consumer tag
        self.buffer: list[Pending] = []              # pushed, not yet reserved
        self.outstanding: dict[int, str] = {}        # delivery tag -> queue, handed out, not settled
        self.claimed: set[int] = set()               # taken out of outstanding, settled but not written
        self.held: set[int] = set()                  # acked, the basic.ack not written yet (see above)
        self.held_since = 0.0                        # monotonic time the oldest held ack was handed over
        self.timer = False                           # a HOLD_ACK_S timer is armed on the I/O thread
        self.wide_since: float | None = None         # when the prefetch was last seen too wide (prefetch_for)
        self.asked = False                           # the I/O thread was asked to look at the held acks

    def unacked(self) -> int:
        """Deliveries RabbitMQ counts against the prefetch."""
        return len(self.buffer) + len(self.outstanding) + len(self.claimed) + len(self.held)

    def due_acks(self, everything: bool) -> list[tuple[int, bool]]:
        """Under the lock: take the held acks to write now as (delivery tag, multiple) frames: the
        ones below the lowest delivery not settled as one ``multiple`` ack, and with
        ``everything`` the others one by one."""
        if not self.held:
            return []
        unsettled = [*self.outstanding, *self.claimed, *(p.delivery_tag for p in self.buffer)]
        low = min(unsettled) if unsettled else None
        tags = sorted(self.held)
        below = tags if low is None else [t for t in tags if t < low]
        frames = [(below[-1], len(below) > 1)] if below else []
        if everything:
            frames += [(t, False) for t in tags[len(below):]]
            self.held.clear()
        else:
            self.held.difference_update(below)
        return frames

    def write_acks(self, frames: list[tuple[int, bool]]) -> None:
        """Run on the I/O thread: write ack frames out at once (one send)."""
        if not frames or not (self.alive and self.channel.is_open):
            return
        impl = self.channel._impl
        try:
            send_now(self.connection, lambda: [impl.basic_ack(tag, multiple) for tag, multiple in frames])
        except Exception:  # the channel died under us; the loop notices and reconnects
            log.debug("could not write %d acks", len(frames), exc_info=True)

    def requeue(self, delivery_tag: int) -> None:
        """Run on the I/O thread: nack (requeue) one delivery of this session."""
        if not (self.alive and self.channel.is_open):
            return
        try:
            self.channel.basic_nack(delivery_tag, requeue=True)
        except Exception:  # the channel died under us; the loop notices and reconnects
            log.debug("could not requeue delivery %s", delivery_tag, exc_info=True)

    def __repr__(self) -> str:
        return f"<amqp session {id(self):#x}{'' if self.alive else ' closed'}>"


def session_tag(delivery: Delivery) -> tuple[Session, int] | None:
    """The session and delivery tag of a delivery made by ``deliveries``; None for another tag."""
    tag = delivery.tag
    if isinstance(tag, tuple) and len(tag) == 2 and isinstance(tag[0], Session):
        return tag[0], tag[1]
    return None


@dataclasses.dataclass(eq=False)
class Demand:
    """A reserve() call waiting for messages: which queues and how many."""

    queues: frozenset
    limit: int


class Consumption:
    """The consuming state of one broker in one process, and the I/O thread that serves it."""

    def __init__(self, link: Link, shapes: Shapes):
        self.link = link
        self.shapes = shapes      # the publishers declare each queue first and learn its shape
        self.cond = threading.Condition()
        self.session: Session | None = None
        self.demands: list[Demand] = []
        self.dirty = False
        self.wakes = 0
        self.seq = itertools.count()
        self._thread: ConsumerThread | None = None
        self._thread_lock = threading.Lock()

    # -- reserving --------------------------------------------------------------------------
    def ensure_thread(self) -> ConsumerThread:
        with self._thread_lock:
            thread = self._thread
            if thread is None or thread.failed is not None or not thread.is_alive():
                thread = self._thread = ConsumerThread(self)
                thread.start()
            return thread

    def reserve(
        self, names: list[str], limit: int, timeout: float, convert: Callable[[list], list[Delivery]]
    ) -> list[Delivery]:
        """Wait up to ``timeout`` for messages of ``names`` and hand up to ``limit`` of them to
        ``convert`` (which may hold some back); [] at the timeout or on wake()."""
        started = time.monotonic()
        deadline = started + max(0.0, timeout)
        wanted = frozenset(names)
        demand = Demand(wanted, limit)
        consumer = self.ensure_thread()
        with self.cond:
            wakes = self.wakes
            setting_up = not self.consuming(wanted)
            self.demands.append(demand)
            session = self.session
            # wake the I/O thread only if consumers or the prefetch window must change
            change = (setting_up or session is None or self.prefetch_for(session, time.monotonic()) is not None
                      or not set(session.consumers) <= set().union(*(d.queues for d in self.demands))
                      or (bool(session.held) and not self.may_hold(session)))
            self.dirty = self.dirty or change
        if change:
            consumer.poke()
        try:
            while True:
                with self.cond:
                    while True:
                        taken = self.take(wanted, demand.limit)
                        if taken:
                            break
                        if consumer.failed is not None:
                            failure = consumer.failed
                            raise ConnectionLost(
                                f"cannot consume from RabbitMQ at {redact(self.link.url)}: {failure!r}"
                            ) from failure
                        if setting_up and self.consuming(wanted):
                            setting_up = False
                            deadline = max(deadline, time.monotonic() + FIRST_PUSH_S)
                        until = max(deadline, started + SETUP_WAIT_S) if setting_up else deadline
                        remaining = until - time.monotonic()
                        if remaining <= 0 or self.wakes != wakes:
                            return []
                        self.cond.wait(remaining)
                deliveries = convert(taken)
                if deliveries:
                    return deliveries
        finally:
            with self.cond:
                self.demands.remove(demand)
                self.dirty = self.dirty or bool(self.demands)   # the others' window, at the next turn

    def window(self, session: Session) -> int:
        """Under the lock: the prefetch the waiting reservers need (held + asked for)."""
        return max(1, len(session.outstanding) + sum(d.limit for d in self.demands))

    def prefetch_for(self, session: Session, now: float) -> int | None:
        """Under the lock: the prefetch to set now (the window), or None to keep the current one.

        The prefetch is kept between the window and the window plus the ``limit`` of the
        largest waiting reserver: raised at once to a wider window, lowered to it once it has
        been more than that ``limit`` above it for LOWER_AFTER_S (whenever looked at since,
        monotonic ``now``). A worker thread that takes one message of the several it asked for
        narrows the window until it asks again (and another thread between its ack and its
        next reserve() does the same), and each change is a ``basic.qos`` round trip; this
        band absorbs such swings. None as well while nobody waits (the prefetch is then left
        as it is)."""
        if not self.demands:
            return None
        window, current = self.window(session), session.prefetch or 0
        if window > current:
            session.wide_since = None
            return window
        if current - window <= max(d.limit for d in self.demands):
            session.wide_since = None
            return None
        if session.wide_since is None:
            session.wide_since = now
        if now - session.wide_since < LOWER_AFTER_S:
            return None
        session.wide_since = None
        return window

    def may_hold(self, session: Session) -> bool:
        """Under the lock: may the held acks stay held? Only while reservers wait and the
        prefetch leaves a delivery's room besides them and what is pushed, handed out or claimed."""
        room = min(session.prefetch or 1, self.window(session))
        return bool(self.demands) and session.unacked() < room

    def acked(self, session: Session, delivery_tags: list[int]) -> bool:
        """Hold the acks of claimed deliveries (any thread); the I/O thread is woken only to arm
        the HOLD_ACK_S timer or to write them (HOLD_MAX held, or their slots needed)."""
        with self.cond:
            if not session.alive:
                return False
            if not session.held:
                session.held_since = time.monotonic()
            session.claimed.difference_update(delivery_tags)
            session.held.update(delivery_tags)
            ask = not session.asked and (not session.timer or len(session.held) >= HOLD_MAX
                                         or not self.may_hold(session))
            session.asked = session.asked or ask
        if ask:
            try:
                session.connection.add_callback_threadsafe(functools.partial(self.look_at_acks, session))
            except Exception:   # closed: RabbitMQ requeues what was not acked
                return False
        return True

    def look_at_acks(self, session: Session) -> None:
        """Run on the I/O thread: write the held acks if they must go, and arm the timer."""
        with self.cond:
            session.asked = False
            frames = session.due_acks(True) if len(session.held) >= HOLD_MAX or not self.may_hold(session) else []
        session.write_acks(frames)
        self.arm(session)

    def arm(self, session: Session) -> None:
        """Run on the I/O thread: a timer to write held acks once the oldest is HOLD_ACK_S old."""
        with self.cond:
            if session.timer or not session.held or not session.alive:
                return
            session.timer = True
            delay = max(0.0, session.held_since + HOLD_ACK_S - time.monotonic())
        session.connection.call_later(delay, functools.partial(self._timer_fired, session))

    def _timer_fired(self, session: Session) -> None:
        with self.cond:
            session.timer = False
            overdue = bool(session.held) and time.monotonic() - session.held_since >= HOLD_ACK_S * 0.9
            frames = session.due_acks(True) if overdue else []
        session.write_acks(frames)
        self.arm(session)

    def write_all_acks(self, session: Session) -> None:
        """Run on the I/O thread: write every held ack."""
        with self.cond:
            frames = session.due_acks(True)
        session.write_acks(frames)

    def _requeue_on_io(self, session: Session, delivery_tag: int) -> None:
        session.requeue(delivery_tag)
        with self.cond:
            session.claimed.discard(delivery_tag)

    def consuming(self, queues: frozenset) -> bool:
        """Under the lock: is the current session consuming all of ``queues``?"""
        session = self.session
        return session is not None and all(q in session.consumers for q in queues)

    def take(self, queues: frozenset, limit: int) -> list[tuple[Session, Pending]]:
        """Under the lock: move up to ``limit`` buffered messages of ``queues`` to outstanding."""
        session = self.session
        if session is None or not session.buffer:
            return []
        mine = [p for p in session.buffer if p.queue in queues]
        if not mine:
            return []
        mine.sort(key=lambda p: (-(p.properties.priority or 0), p.seq))
        if after_lapse(mine[0]):
            taken = mine[:1]            # alone: a message that may have killed its worker takes no batch-mates along
        else:
            taken = list(itertools.takewhile(lambda p: not after_lapse(p), mine))[:limit]
        chosen = {id(p) for p in taken}
        session.buffer = [p for p in session.buffer if id(p) not in chosen]
        for p in taken:
            session.outstanding[p.delivery_tag] = p.queue
        return [(session, p) for p in taken]

    def wake(self) -> None:
        """Make every waiting reserve() return (empty)."""
        with self.cond:
            self.wakes += 1
            self.cond.notify_all()

    # -- settling -----------------------------------------------------------------------------
    def claim(self, delivery: Delivery) -> Session | None:
        """Take a current delivery out of outstanding (so no one else settles it); None if stale."""
        mine = session_tag(delivery)
        if mine is None:
            return None
        session, delivery_tag = mine
        with self.cond:
            if session is not self.session or not session.alive or delivery_tag not in session.outstanding:
                return None
            del session.outstanding[delivery_tag]
            session.claimed.add(delivery_tag)
            return session

    def unclaim(self, session: Session, delivery: Delivery) -> None:
        with self.cond:
            if session.alive and delivery.tag[1] in session.claimed:
                session.claimed.discard(delivery.tag[1])
                session.outstanding[delivery.tag[1]] = delivery.queue

    def handover(self, session: Session, delivery_tag: int, action: str) -> bool:
        """Ack (held, see Session) or have the I/O thread requeue a claimed delivery; neither waits
        (AMQP acks have no reply)."""
        if action == "ack":
            done = self.acked(session, [delivery_tag])
        else:
            try:
                requeue = functools.partial(self._requeue_on_io, session, delivery_tag)
                session.connection.add_callback_threadsafe(requeue)
                done = True
            except Exception:
                done = False
        with self.cond:
            self.dirty = self.dirty or bool(self.demands)   # the window follows what we hold
        return done

    def settle(self, delivery: Delivery, action: str) -> bool:
        session = self.claim(delivery)
        return session is not None and self.handover(session, delivery.tag[1], action)

    def settle_pending(self, session: Session, p: Pending, action: str) -> None:
        """Ack or requeue a message taken from the buffer that was not handed out as a delivery."""
        self.settle(Delivery("", p.queue, "", 1, 0.0, tag=(session, p.delivery_tag)), action)

    def ack_many(self, deliveries: Sequence[Delivery]) -> list[bool]:
        """The acks of a worker's batch held together (see Session)."""
        sessions = [self.claim(d) for d in deliveries]
        tags: dict[Session, list[int]] = {}
        for session, delivery in zip(sessions, deliveries):
            if session is not None:
                tags.setdefault(session, []).append(delivery.tag[1])
        failed: set = set()
        for session, session_tags in tags.items():   # one session, unless it was replaced meanwhile
            if not self.acked(session, session_tags):
                failed.add(session)
        if tags:
            with self.cond:
                self.dirty = self.dirty or bool(self.demands)   # the window follows what we hold
        return [s is not None and s not in failed for s in sessions]

    def holds(self, delivery: Delivery) -> bool:
        """Is this delivery current and still held (its session's channel open)?"""
        mine = session_tag(delivery)
        if mine is None:
            return False
        session, delivery_tag = mine
        with self.cond:
            current = session is self.session and session.alive and delivery_tag in session.outstanding
        return current and session.channel.is_open

    def held(self, queue: str) -> int:
        """Messages of ``queue`` this process holds: pushed or handed out, not settled."""
        with self.cond:
            session = self.session
            if session is None:
                return 0
            return sum(1 for q in session.outstanding.values() if q == queue) + sum(
                1 for p in session.buffer if p.queue == queue
            )

    def stop(self) -> None:
        """Stop the I/O thread (unacked messages go back to their queues)."""
        self.wake()
        with self._thread_lock:
            thread, self._thread = self._thread, None
        if thread is not None:
            thread.stop()
            if thread is not threading.current_thread():
                thread.join(10)


class ConsumerThread(threading.Thread):
    """The I/O thread: owns the consuming connection, reconnects, applies demand and settles."""

    def __init__(self, state: Consumption):
        super().__init__(name="nbqueue-amqp-consumer", daemon=True)
        self.state = state
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
        session = self.state.session
        if session is not None:
            wake(session.connection)

    # the thread
    def run(self) -> None:
        state, link = self.state, self.state.link
        down_since: float | None = None
        backoff = 0.05
        session: Session | None = None
        while not self.stopping:
            session = None
            try:
                session = self._open()
                self._reconcile(session)      # back-off is reset only once a session is usable
                if down_since is not None:
                    log.info("consuming from %s again after %.1f s", redact(link.url), time.monotonic() - down_since)
                down_since, backoff = None, 0.05
                while not self.stopping:
                    self._reconcile(session)
                    session.connection.process_data_events(time_limit=1.0)
                    if not session.channel.is_open:
                        raise pex.ChannelWrongStateError("the consuming channel was closed by the broker")
                session.connection.process_data_events(time_limit=0)   # settle what was handed over
                self.state.write_all_acks(session)
            except CONNECTION_ERRORS + (pex.AMQPChannelError,) as exc:
                self._lost(session, exc)
                if self.stopping:
                    break
                now = time.monotonic()
                if down_since is None:
                    down_since = now
                    log.warning("lost the consuming connection to %s: %r; reconnecting", redact(link.url), exc)
                if now - down_since >= link.reconnect_timeout or (
                    isinstance(exc, AUTH_ERRORS) and not link.ever_connected
                ):
                    self.failed = exc
                    with state.cond:
                        state.cond.notify_all()
                    log.error("giving up consuming from %s after %.1f s: %r", redact(link.url), now - down_since, exc)
                    return
                self._sleep.wait(min(backoff, max(0.0, down_since + link.reconnect_timeout - now)))
                backoff = min(backoff * 2, 2.0)
            except BaseException as exc:  # a bug: do not leave reservers waiting forever
                self._lost(session, exc)
                self.failed = exc
                with state.cond:
                    state.cond.notify_all()
                log.exception("the AMQP consumer thread stopped")
                return
        self._lost(session, None)

    def _open(self) -> Session:
        state = self.state
        connection = pika.BlockingConnection(state.link.params)
        try:
            channel = connection.channel()
            channel.basic_qos(prefetch_count=1, global_qos=True)
            channel.add_on_cancel_callback(functools.partial(self._on_broker_cancel, channel))
        except BaseException:
            close_quietly(connection)
            raise
        session = Session(connection, channel)
        session.prefetch = 1
        state.link.ever_connected = True
        with state.cond:
            state.session = session
            state.dirty = True
        return session

    def _lost(self, session: Session | None, exc: BaseException | None) -> None:
        state = self.state
        if session is None:
            return
        with state.cond:
            session.alive = False
            session.buffer.clear()          # the broker requeues everything unacked
            session.outstanding.clear()
            session.claimed.clear()
            session.held.clear()
            if state.session is session:
                state.session = None
            state.cond.notify_all()
        close_quietly(session.connection)

    def _on_broker_cancel(self, channel: Any, method_frame: Any) -> None:
        """RabbitMQ cancelled a consumer (its queue was deleted): forget it, requeue what it pushed."""
        tag = method_frame.method.consumer_tag
        state = self.state
        with state.cond:
            session = state.session
            if session is None or session.channel is not channel:
                return
            for queue, ctag in list(session.consumers.items()):
                if ctag == tag:
                    del session.consumers[queue]
            state.dirty = True

    def _on_message(
        self, session: Session, queue: str, _channel: Any, method: Any, properties: Any, body: bytes
    ) -> None:
        state = self.state
        with state.cond:
            if not session.alive:
                return
            session.buffer.append(
                Pending(next(state.seq), queue, method.delivery_tag, bool(method.redelivered), properties, body)
            )
            # this delivery is in the queue's index (the segment stays): a good time to write acks
            every = bool(session.held) and not state.may_hold(session)
            frames = session.due_acks(every) if every or len(session.held) >= HOLD_ACKS else []
            # one message wants one reserver: wake one when every waiting reserver can take
            # it (worker threads ask for the same queues), not the whole herd
            if all(queue in d.queues for d in state.demands):
                state.cond.notify()
            else:
                state.cond.notify_all()
        session.write_acks(frames)

    def _reconcile(self, session: Session) -> None:
        """Make consumers and prefetch match the reservers waiting now (on the I/O thread)."""
        state = self.state
        with state.cond:
            if not state.dirty:
                return
            state.dirty = False
            demands = list(state.demands)
            if demands:
                wanted: set[str] = set().union(*(d.queues for d in demands))
                prefetch = state.prefetch_for(session, time.monotonic())
            else:                        # nobody waiting: keep consuming what was asked for last
                wanted, prefetch = set(session.consumers), None
            cancel = [q for q in session.consumers if q not in wanted]
            add = sorted(q for q in wanted if q not in session.consumers)
            release = bool(session.held) and (bool(cancel) or not self.state.may_hold(session))
        if release:
            self.state.write_all_acks(session)
        channel = session.channel
        if prefetch is not None:
            channel.basic_qos(prefetch_count=min(prefetch, 65535), global_qos=True)
            session.prefetch = prefetch
        for queue in cancel:
            channel.basic_cancel(session.consumers.pop(queue))
            with state.cond:
                give_back = [p for p in session.buffer if p.queue == queue]
                session.buffer = [p for p in session.buffer if p.queue != queue]
            for pending in give_back:
                channel.basic_nack(pending.delivery_tag, requeue=True)
        for queue in add:
            channel.queue_declare(queue, durable=True, arguments=state.shapes.arguments(queue, work_queue_arguments()))
            tag = channel.basic_consume(queue, functools.partial(self._on_message, session, queue))
            with state.cond:
                session.consumers[queue] = tag
                state.cond.notify_all()      # reservers waiting for the consumer to start
            log.debug("consuming %s (%s)", queue, tag)


# -- reading deliveries ---------------------------------------------------------------------------

def maybe_lapsed(p: Pending) -> bool:
    """The delivery before this one may have ended unfinished: it went back unacked, or was
    put back while an earlier attempt was alive (``defer``)."""
    return p.redelivered or int_header(p.properties.headers or {}, H_RECHECK) > 0


def after_lapse(p: Pending) -> bool:
    """A pushed message an earlier delivery of which may have ended without finishing."""
    return maybe_lapsed(p) or int_header(p.properties.headers or {}, H_LAPSES) > 0


def lapse_headers(delivery: Delivery) -> dict:
    """The lapse count a message published again carries on."""
    return {H_LAPSES: delivery.lapsed, H_LAPSE_TOKEN: delivery.lapse_token} if delivery.lapsed else {}


def deliveries(
    taken: list[tuple[Session, Pending]], lease: float, now: float, eta_tolerance: float,
    limit_reason: Callable[[int], str | None],
) -> tuple[list[Delivery], list[tuple[Session, Pending]]]:
    """The deliveries of messages taken from the buffer, and apart the ones not due yet (a long
    delay's intermediate hop, which go back to the delay queues)."""
    out, early = [], []
    for session, p in taken:
        headers = p.properties.headers or {}
        eta_ms = headers.get(H_ETA)
        if isinstance(eta_ms, int) and eta_ms / 1000 - now > eta_tolerance:
            early.append((session, p))      # a long delay's intermediate hop
            continue
        prior = headers.get(H_ATTEMPTS)
        attempt = (prior if isinstance(prior, int) else 0) + 1 + (1 if p.redelivered else 0)
        body, problem = text_of(p.body)
        lapsed = int_header(headers, H_LAPSES)
        out.append(Delivery(
            message_id=p.properties.message_id or "",
            queue=p.queue,
            body=body,
            attempt=attempt,
            lease_until=now + lease,
            tag=(session, p.delivery_tag),
            priority=p.properties.priority or 0,
            lapsed=lapsed,
            maybe_lapsed=maybe_lapsed(p),
            lapse_token=int_header(headers, H_LAPSE_TOKEN),
            dead_reason=problem or limit_reason(lapsed),
        ))
    return out, early


def hop_headers(p: Pending) -> dict:
    """The headers of a long-delay message sent back to the delay queues: RabbitMQ's death
    records dropped, an attempt counted if it came back unacked."""
    headers = dict(p.properties.headers or {})
    headers.pop("x-death", None)
    for name in ("x-first-death-queue", "x-first-death-reason", "x-first-death-exchange"):
        headers.pop(name, None)
    if p.redelivered:
        headers[H_ATTEMPTS] = int(headers.get(H_ATTEMPTS) or 0) + 1
    return headers
