"""The publishing side of the RabbitMQ broker: one connection per calling thread (pika's
BlockingConnection is not thread-safe), with a confirm-mode channel to publish on and an admin
channel for declarations and counts (``topology.QueueAdmin``).

Publisher confirms are pipelined through the channel's underlying async channel
(``BlockingChannel._impl``), since BlockingChannel itself waits for each confirm (about 10x
slower for bulk publishing). A publish is written out at once (its frames joined into one
send() call, ``client.send_now``) and its confirms are waited for apart (``Publisher.send``,
``Publisher.wait``), so a caller can do other work while they are on their way
(``Publishers.start_routed``). A publish the broker nacks, or returns as unroutable
(``mandatory``), is refused; a publish cut off before its confirm is published again after a
reconnect (at least once: it may arrive twice).
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable, Sequence

import pika
import pika.exceptions as pex
from pika.adapters.blocking_connection import _IoloopTimerContext

from ...errors import ConnectionLost, PublishRefused
from ...urls import redact
from .client import AUTH_ERRORS, CONNECTION_ERRORS, Link, close_quietly, refused, send_now, wake
from .topology import QueueAdmin, Shapes

log = logging.getLogger(__name__)


class ConfirmTimeout(pex.AMQPConnectionError):
    """No publisher confirm arrived in time: treat the connection as gone."""


class Publisher(QueueAdmin):
    """One thread's connection: a confirm-mode channel to publish on and a plain one for admin."""

    def __init__(self, params: pika.ConnectionParameters, on_declare: Callable[[str], Any] = lambda name: None,
                 shapes: Shapes | None = None):
        super().__init__(pika.BlockingConnection(params), on_declare, shapes)
        self.thread = threading.current_thread()
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
        close_quietly(self.connection)

    # publishing with confirms, pipelined
    def _channel_for_publish(self) -> Any:
        if self._channel is not None and self._channel.is_open:
            return self._channel
        channel = self.connection.channel()
        impl = channel._impl   # pika's async channel: its confirm API lets us pipeline a batch
        ready: list[bool] = []

        def selected(_frame: Any) -> None:
            ready.append(True)
            wake(self.connection)

        impl.confirm_delivery(ack_nack_callback=self._on_confirm, callback=selected)
        impl.add_on_return_callback(self._on_return)
        impl.add_on_close_callback(self._on_channel_closed)
        deadline = time.monotonic() + 30
        while not ready:
            if time.monotonic() > deadline:
                raise ConfirmTimeout("confirm.select got no answer")
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

    def _on_return(self, _channel: Any, method: Any, properties: Any, _body: bytes) -> None:
        self._returned[(properties.message_id, method.routing_key)] = (
            f"unroutable: no queue {method.routing_key!r} ({method.reply_code} {method.reply_text})"
        )

    def _on_channel_closed(self, _channel: Any, reason: Exception) -> None:
        self._closed_reason = reason
        wake(self.connection)

    def send(self, items: Sequence[tuple[int, str, bytes, pika.BasicProperties]]) -> None:
        """Publish ``(index, routing key, body, properties)`` items and write them out to the socket
        without waiting for their confirms (``wait``). Confirms still outstanding from an earlier
        ``send`` that was never waited for are waited for first (and their outcome dropped)."""
        if self._pending:
            self.wait(30.0)
        channel = self._channel_for_publish()
        impl = channel._impl
        self._refused, self._returned = {}, {}

        def emit() -> None:
            for index, routing_key, body, properties in items:
                self._pending[self._next_tag] = (index, properties.message_id, routing_key)
                self._next_tag += 1
                impl.basic_publish("", routing_key, body, properties, mandatory=True)

        send_now(self.connection, emit)      # the frames go out now, not at the next wait

    def wait(self, timeout: float) -> dict[int, str]:
        """Wait for the confirms of what ``send`` published; returns the refused indexes with why.

        Raises a connection error when the connection drops or confirms do not come in ``timeout``
        s; the caller publishes again what was not confirmed.
        """
        connection = self.connection
        deadline = time.monotonic() + timeout

        def answered() -> bool:
            return not self._pending or self._closed_reason is not None

        while self._pending:
            if self._closed_reason is not None:
                if not connection.is_open:
                    raise pex.StreamLostError(f"connection closed while publishing: {self._closed_reason!r}")
                # a channel error (not a dropped connection): what was not confirmed is refused
                reason, self._channel = self._closed_reason, None
                for index, *_ in self._pending.values():
                    self._refused[index] = f"channel closed by RabbitMQ: {reason}"
                self._pending.clear()
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ConfirmTimeout(f"no publisher confirm within {timeout:g} s")
            # process I/O until the confirms are in (the waiter is checked after every event), the
            # channel closes or the deadline passes (a timer wakes the loop then)
            with _IoloopTimerContext(remaining, connection._impl) as timer:
                connection._flush_output(answered, timer.is_ready)
        return self._refused

    def publish(
        self, items: Sequence[tuple[int, str, bytes, pika.BasicProperties]], timeout: float
    ) -> tuple[set[int], dict[int, str]]:
        """Publish and wait for confirms. Returns (confirmed indexes, refused index -> reason).

        Raises a connection error when the connection drops or confirms do not come;
        the caller republishes what was not confirmed.
        """
        self.send(items)
        refused = self.wait(timeout)
        return {i for i, *_ in items if i not in refused}, refused


class Publishers:
    """The publishing connections of one broker in one process, one per calling thread."""

    def __init__(self, link: Link, on_declare: Callable[[str], Any], shapes: Shapes):
        self.link = link
        self.on_declare = on_declare
        self.shapes = shapes
        self._local = threading.local()
        self._all: list[Publisher] = []
        self._lock = threading.Lock()

    def current(self) -> Publisher:
        """This thread's open connection (opened now if needed)."""
        pub = getattr(self._local, "publisher", None)
        if pub is not None and pub.is_open:
            return pub
        if pub is not None:
            self.drop(pub)
        pub = Publisher(self.link.params, on_declare=self.on_declare, shapes=self.shapes)
        self.link.ever_connected = True
        self._local.publisher = pub
        with self._lock:
            gone = [p for p in self._all if not p.thread.is_alive()]
            self._all = [p for p in self._all if p.thread.is_alive()] + [pub]
        for p in gone:          # connections of threads that ended: nobody else uses them
            p.close()
        return pub

    def drop(self, pub: Publisher) -> None:
        if getattr(self._local, "publisher", None) is pub:
            self._local.publisher = None
        with self._lock:
            if pub in self._all:
                self._all.remove(pub)
        pub.close()

    def run(self, work: Callable[[Publisher], Any], what: str) -> Any:
        """Run ``work`` on this thread's connection, reconnecting with back-off until reconnect_timeout."""
        link = self.link
        started = time.monotonic()
        backoff = 0.05
        while True:
            pub = None
            try:
                pub = self.current()
                return work(pub)
            except CONNECTION_ERRORS as exc:
                if isinstance(exc, ConnectionLost):     # ours (an OSError too): already final
                    raise
                if pub is not None:
                    self.drop(pub)
                waited = time.monotonic() - started
                if isinstance(exc, AUTH_ERRORS) and not link.ever_connected:
                    raise refused(link.url, link.params, exc) from exc
                if waited >= link.reconnect_timeout:
                    raise ConnectionLost(
                        f"cannot reach RabbitMQ at {redact(link.url)} to {what} (tried for {waited:.1f} s): {exc!r}"
                    ) from exc
                log.warning("RabbitMQ connection lost while trying to %s: %r; retrying in %.2f s", what, exc, backoff)
                time.sleep(min(backoff, max(0.0, link.reconnect_timeout - waited)))
                backoff = min(backoff * 2, 2.0)

    def publish_routed(self, plan: list[tuple], ids: list[str], batch: int, confirm_timeout: float) -> None:
        """Declare what the plan (``topology.route`` tuples) needs, publish it in confirmed batches
        of ``batch``, raise PublishRefused for refusals."""
        self.start_routed(plan, ids, batch, confirm_timeout)()

    def start_routed(self, plan: list[tuple], ids: list[str], batch: int,
                     confirm_timeout: float) -> Callable[[], None]:
        """``publish_routed`` in two steps: declare what the plan needs and publish its first batch
        (written out, confirms outstanding), then return the function that waits for those
        confirms, publishes the other batches (confirmed) and raises PublishRefused for refusals.
        Call that function on this thread, before the next publish on it."""
        confirmed: set[int] = set()
        refusals: dict[int, str] = {}
        in_flight: list[tuple[Publisher, list]] = []      # the batch sent and not yet waited for

        def settle(pub: Publisher, items: list, bad: dict[int, str]) -> None:
            confirmed.update(i for i, *_ in items if i not in bad)
            refusals.update(bad)
            for index in bad:   # a vanished queue: declare it again next time
                pub.declared.pop(plan[index][1], None)

        def work(pub: Publisher, first_only: bool) -> None:
            if in_flight:
                sent_on, items = in_flight.pop()
                if sent_on is pub:      # on another connection (a reconnect): published again below
                    settle(pub, items, pub.wait(confirm_timeout))
                    if len(confirmed) + len(refusals) == len(plan):
                        return          # all answered (the usual case): nothing to declare or publish
            for queue, _routing_key, delayed, _body, _props in plan:
                pub.declare_work_queue(queue)
                if delayed:
                    pub.declare_delay_queues(queue)
            todo = [
                (i, rk, body, props)
                for i, (_q, rk, _a, body, props) in enumerate(plan)
                if i not in confirmed and i not in refusals
            ]
            for start in range(0, len(todo), batch):
                items = todo[start:start + batch]
                pub.send(items)
                if first_only:
                    in_flight.append((pub, items))
                    return
                settle(pub, items, pub.wait(confirm_timeout))

        def finish() -> None:
            self.run(lambda pub: work(pub, False), "publish")
            if refusals:
                detail = "; ".join(f"{ids[i]}: {reason}" for i, reason in sorted(refusals.items())[:5])
                more = f" (and {len(refusals) - 5} more)" if len(refusals) > 5 else ""
                exc = PublishRefused(f"RabbitMQ refused {len(refusals)} of {len(plan)} messages: {detail}{more}")
                exc.message_ids = [ids[i] for i in sorted(refusals)]
                raise exc

        self.run(lambda pub: work(pub, True), "publish")
        return finish

    def close(self) -> None:
        """Close every thread's connection."""
        with self._lock:
            publishers, self._all = self._all, []
        for pub in publishers:
            pub.close()
        self._local = threading.local()
