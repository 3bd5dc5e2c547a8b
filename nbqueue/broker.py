"""The Broker protocol: what every broker implements, and the Delivery it hands out.

A broker stores encoded messages (text) per queue, hands them out with a lease and
takes back acknowledgements on *deliveries*, never on bare messages. Contract (tested
for every implementation by nbqueue.testing.contracts):

- ``publish(out)`` stores a message; ``eta`` in the future keeps it back until then.
  Publishing an id that is already waiting or in flight is a no-op (idempotent fan-in).
- ``reserve(queues, timeout=, lease=, limit=)`` returns up to ``limit`` deliveries,
  highest priority first, then oldest due; waits up to ``timeout`` seconds for one.
  A delivery not acked before its lease runs out is handed out again.
- ``ack``/``retry``/``extend``/``reject``/``release`` (and ``defer``/``count_lapse``,
  below) act on a delivery. They return False when the delivery is stale (its lease ran
  out and the message was reserved again), so a stale worker cannot act for a newer attempt.
- ``stats()`` gives ready / delayed / in_flight / dead per queue.
- ``purge_messages(queue)`` removes the queue's waiting messages (ready and delayed; a broker
  may also remove its dead letters and, where its store's purge does, messages in flight)
  and returns a ``Purged``: how many, and the bodies of those it can name, so that the App
  records their tasks REVOKED and ends their workflows (``App.purge``). ``complete`` is False
  where the store removed some without showing them (SQS's PurgeQueue); the App then looks
  for their tasks among the records. ``purge(queue)`` is its count.
- Bounded redelivery: a delivery that ends without being settled (its lease lapsed: the
  worker died or stalled) is a *lapse*. ``Delivery.lapsed`` counts the message's lapses so
  far; a message with a lapse behind it is delivered alone (never in a batch, so a message
  that kills its worker takes no batch-mates with it), and once ``max_deliveries`` (an
  App/broker option, default 5) deliveries have lapsed the broker hands it out with
  ``dead_reason`` set ("delivered N times without finishing") for the worker to fail its
  record and dead-letter it. ``release`` and ``retry`` are not lapses. A broker that cannot
  tell a lapse from a message that was only prefetched (AMQP) sets ``maybe_lapsed`` and
  leaves the count to the worker, which reads the task's record (see ``count_lapse``).
  ``defer`` puts a delivery after a lapse back until a due time, still marked so (the
  worker's answer to an earlier attempt that is still alive, see nbqueue.worker).
- A body that is not UTF-8 never fails a reserve: its delivery comes with ``dead_reason``
  set (the body holds the bytes as ``surrogateescape`` text, so they are kept as they were).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Sequence

from .options import count
from .urls import redact

#: deliveries that may end without finishing before a message is dead-lettered (option ``max_deliveries``)
DEFAULT_MAX_DELIVERIES = 5


@dataclasses.dataclass
class Outgoing:
    """A message ready to publish: its id, encoded body and routing."""

    id: str
    body: str
    queue: str
    eta: float | None = None
    priority: int = 0
    #: the envelope ``body`` encodes, where it is at hand (a worker handed its own message need not decode it)
    message: dict | None = dataclasses.field(default=None, repr=False, compare=False)


@dataclasses.dataclass
class Purged:
    """What a purge removed: how many messages, and the bodies of those the broker can name."""

    count: int
    bodies: list[str] = dataclasses.field(default_factory=list)
    #: every removed message is in ``bodies``; False where the store removed some without
    #: showing them (then ``count`` may be approximate)
    complete: bool = True


@dataclasses.dataclass
class Delivery:
    """One reservation of one message; acknowledge this, not the message."""

    message_id: str
    queue: str
    body: str
    attempt: int                 # how many times this message has been reserved (1 = first)
    lease_until: float
    tag: Any = None              # broker-specific handle (row token, list entry, AMQP delivery tag)
    priority: int = 0
    token: int | None = None     # the backend's fencing token, where the claim also began the task
    #: the decoded envelope, where the publisher of this process handed it over (see Outgoing.message)
    message: dict | None = dataclasses.field(default=None, repr=False, compare=False)
    #: earlier deliveries of this message that ended without finishing (their lease lapsed)
    lapsed: int = 0
    #: the delivery before this one ended unsettled, and only the task's record can tell whether it
    #: had begun (a lapse) or was only prefetched (AMQP; see Broker.count_lapse)
    maybe_lapsed: bool = False
    #: the record's fencing token when ``lapsed`` was last counted (brokers that need count_lapse)
    lapse_token: int = 0
    #: set by the broker when this message must be dead-lettered, not run: why (a body that is not
    #: UTF-8, ``max_deliveries`` deliveries without finishing)
    dead_reason: str | None = None

    @property
    def redelivered(self) -> bool:
        return self.attempt > 1

    @property
    def after_lapse(self) -> bool:
        """An earlier delivery of this message may have ended without finishing: it comes alone,
        and its task is begun only once no earlier attempt of it is still alive."""
        return self.lapsed > 0 or self.maybe_lapsed


@dataclasses.dataclass(frozen=True)
class Capabilities:
    """What a broker can do. The engine, the workflow step and the contract suites read these,
    never a broker's type."""

    #: ``priority`` orders delivery (highest first)
    priority: bool = True
    #: a delivery not acked before its lease runs out is handed out again (AMQP: only when the
    #: consumer's connection dies)
    leases_expire: bool = True
    #: publishing an id already waiting or in flight is a no-op (AMQP and SQS cannot tell)
    dedupes_publish: bool = True
    #: a message reserved by one consumer is never handed to another while its lease holds
    #: (SQS standard queues are at-least-once: a rare second copy may go out)
    delivers_once: bool = True
    #: ``stats()`` finds every queue by itself (AMQP reports only the queues it is told about)
    lists_queues: bool = True


class Broker:
    """Base class; subclasses implement the abstract methods and declare ``capabilities``."""

    scheme: str = ""
    capabilities = Capabilities()
    #: errors of the store itself (unreachable, locked) beside ConnectionError and TimeoutError
    store_errors: tuple[type[BaseException], ...] = ()

    def __init__(self, url: str, *, clock=None, options: dict | None = None):
        from .clock import SYSTEM

        self.url = url
        self.clock = clock or SYSTEM
        self.options = dict(options or {})
        self.max_deliveries = max_deliveries_option(self.options)

    def limit_reason(self, lapsed: int) -> str | None:
        """The dead letter reason for a message whose ``lapsed`` deliveries ended without
        finishing, or None while it may be delivered again."""
        if lapsed >= self.max_deliveries:
            return f"delivered {lapsed} times without finishing (max_deliveries={self.max_deliveries})"
        return None

    # publishing
    def publish(self, out: Outgoing) -> None:
        self.publish_many([out])

    def publish_many(self, outs: Sequence[Outgoing]) -> None:
        raise NotImplementedError

    def start_publish(self, outs: Sequence[Outgoing]) -> Callable[[], None] | None:
        """``publish_many`` in two steps, where the store confirms apart: the messages are sent
        now and the returned function waits until they are durably queued (raising what
        ``publish_many`` raises; call it on this thread before its next publish). None: nothing
        was sent, this broker publishes only whole (``publish_many``)."""
        return None

    # consuming
    def reserve(
        self, queues: Sequence[str], *, timeout: float = 0.0, lease: float = 30.0, limit: int = 1
    ) -> list[Delivery]:
        raise NotImplementedError

    def ack(self, delivery: Delivery) -> bool:
        raise NotImplementedError

    def ack_many(self, deliveries: Sequence[Delivery]) -> list[bool]:
        return [self.ack(d) for d in deliveries]

    def retry(self, delivery: Delivery, *, body: str | None = None, eta: float | None = None) -> bool:
        """Put the message back (same id), with a new body and due time if given."""
        raise NotImplementedError

    def release(self, delivery: Delivery) -> bool:
        """Hand a reserved but unstarted message back at once (not a lapse)."""
        return self.retry(delivery)

    def defer(self, delivery: Delivery, *, eta: float) -> bool:
        """Put back until ``eta`` a delivery after a lapse whose earlier attempt is still alive:
        its next delivery is still ``after_lapse`` (where the lapse count marks it, as here,
        a plain retry does)."""
        return self.retry(delivery, eta=eta)

    def count_lapse(self, delivery: Delivery, token: int) -> bool:
        """Count a lapse the worker found for a ``maybe_lapsed`` delivery (the task's record
        shows an attempt begun since the last count, ``token``, that never finished): put the
        message back with ``lapsed + 1``. Brokers that count lapses themselves never set
        ``maybe_lapsed``; for them this only hands the message back."""
        return self.release(delivery)

    def extend(self, delivery: Delivery, lease: float) -> bool:
        raise NotImplementedError

    def reject(self, delivery: Delivery, reason: str) -> bool:
        """Move the message aside as a dead letter with a reason."""
        raise NotImplementedError

    # inspection and upkeep
    def purge(self, queue: str) -> int:
        """Remove the queue's waiting messages (see ``purge_messages``); how many."""
        return self.purge_messages(queue).count

    def purge_messages(self, queue: str) -> Purged:
        """Remove the queue's waiting messages, ready and delayed, returning them (see the
        module docstring). A broker that implements only ``purge`` names none of them."""
        if type(self).purge is Broker.purge:
            raise NotImplementedError
        return Purged(self.purge(queue), [], complete=False)

    def stats(self) -> list[dict]:
        """One dict per queue: queue, ready, delayed, in_flight, dead."""
        raise NotImplementedError

    def dead_letters(self, queue: str | None = None, limit: int = 100) -> list[dict]:
        """Dead-lettered messages: id, queue, reason, body."""
        return []

    def remove_dead_letters(self, queue: str, ids: Sequence[str]) -> int:
        """Delete these dead letters of ``queue`` (once re-driven, see ``App.redrive``); how
        many were removed. Raises UnsupportedOperation where the broker cannot."""
        from .errors import UnsupportedOperation

        raise UnsupportedOperation(f"the {self.scheme or type(self).__name__} broker cannot remove single dead letters")

    def upkeep(self) -> None:
        """Housekeeping a worker's heartbeat thread runs now and then (SQLite: WAL checkpoints)."""

    def wake(self) -> None:
        """Wake reservers of this process waiting in reserve() (used on shutdown)."""

    def close(self) -> None:
        pass

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {redact(self.url)}>"


def max_deliveries_option(options: dict) -> int:
    """The ``max_deliveries`` option: a whole number of at least 1 (ConfigurationError otherwise;
    text of digits, as from an environment variable or a URL, is read as its number)."""
    return count("max_deliveries", options.get("max_deliveries"), DEFAULT_MAX_DELIVERIES)


def text_of(raw: bytes) -> tuple[str, str | None]:
    """A message body read as bytes: (its text, None), or, when it is not UTF-8, (the bytes as
    ``surrogateescape`` text, which encodes back to them unchanged, and the reason)."""
    try:
        return raw.decode("utf-8"), None
    except UnicodeDecodeError as exc:
        return raw.decode(
            "utf-8", "surrogateescape"
        ), f"message body is not valid UTF-8 ({exc.reason} at byte {exc.start})"


def checked_text(text: str) -> tuple[str, str | None]:
    """``text_of`` for a body a client decoded with ``surrogateescape``."""
    if text.isascii():
        return text, None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text_of(text.encode("utf-8", "surrogateescape"))
    return text, None


def shown(text: str | None) -> str | None:
    """A body for display: undecodable bytes (``surrogateescape`` text) as U+FFFD."""
    if text is None or text.isascii():
        return text
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def queue_list(queues: str | Iterable[str]) -> list[str]:
    if isinstance(queues, str):
        return [q.strip() for q in queues.split(",") if q.strip()]
    return list(queues)
