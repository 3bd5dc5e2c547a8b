"""The engine: the one object the worker and App talk to for a broker and result backend pair.

``SplitEngine`` implements it once over the plain Broker and ResultBackend protocols, for any
mix of stores (RabbitMQ with SQLite results, an SQLite broker with Redis results, SQS with
Memcache ...). A driver whose broker and backend can share one store (one SQLite file, one
Redis server and prefix) offers a fused engine, a subclass that overrides whole methods with
its fast paths (one transaction, one round trip). ``nbqueue.drivers.engine_for(broker, backend)``
is the only place that asks whether two stores are one.

What an engine does:

- ``send(records, outgoing)``: record tasks PENDING, then publish their messages (a fast
  worker's result is never overwritten by the PENDING record).
- ``publish(outgoing)``: publish messages whose records exist (workflow follow-ups).
- ``claim(queues, limit=, timeout=, lease=, worker=) -> list[Claim]``: reserve a batch, decode
  it and begin its tasks (RECEIVED, with fencing tokens).
- ``finish(outcomes, acks, then_claim=) -> Finished``: store final results, count group members,
  ack; given ``then_claim``, also claim the caller's next batch (in the same round trip where
  ``claims_in_finish``).
- ``run_next(outgoing, lease=, worker=) -> list[Claim]``: publish follow-ups already claimed by
  the caller, so a worker runs the next chain step without another claim (``runs_next``).
- ``extend(deliveries, lease)``, ``hand_back(deliveries)``, ``transaction()``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
from typing import Any, Callable, ContextManager, Protocol, Sequence, runtime_checkable

from . import states
from .backend import ResultBackend
from .broker import Broker, Delivery, Outgoing
from .errors import MessageError, PublishRefused
from .message import Message

log = logging.getLogger(__name__)

#: ``begins(message)``: whether a claimed task is begun (RECEIVED with a fencing token) by the claim
Begins = Callable[[Message], bool]


@dataclasses.dataclass
class Claim:
    """One claimed delivery: its decoded message, or why it must be dead-lettered, and its token.

    ``begun``: the claim began the task; ``token`` is then its fencing token (None: its
    record is final already). A claim not begun (a delivery after a lapse, a task the
    worker does not run) is begun, or not, by the worker."""

    delivery: Delivery
    message: Message | None = None
    reason: str | None = None
    begun: bool = False
    token: int | None = None


#: what becomes of an outcome's delivery once its record is written (``Outcome.then``)
ACK = "ack"                    # acknowledged: the task is finished (or there is nothing to run)
RETRY = "retry"                # back to its queue, due at ``eta`` (a RETRY state: with its changed message)
RELEASE = "release"            # back to its queue at once (not a lapse)
DEFER = "defer"                # back until ``eta``, nothing recorded: an earlier attempt is still alive
REJECT = "reject"              # dead-lettered with ``reason``; a waiting record fails with it
COUNT_LAPSE = "count_lapse"    # a lapse counted against the delivery limit (``Broker.count_lapse``)


@dataclasses.dataclass
class Outcome:
    """What to record of one delivery, and what becomes of the delivery then.

    ``state``: SUCCESS or FAILURE is final, stored with ``fields`` as
    ``ResultBackend.store_results`` takes them, fenced by ``token``; RETRY or PENDING puts the
    task back (``set_state``); ``""`` records nothing (the record is final already, or no
    task was begun). ``group``: count the task as a member of that group once stored. ``message``:
    the task's envelope, whose workflow advances once the outcome is recorded (None: nothing
    follows). ``then``, ``eta``, ``reason``: what becomes of the delivery (None where there is
    none to settle)."""

    delivery: Delivery | None
    task_id: str
    state: str
    token: int | None
    fields: dict
    group: str | None = None
    message: Message | None = None
    then: str = ACK
    eta: float | None = None
    reason: str | None = None


@dataclasses.dataclass
class Finished:
    """What ``finish`` did: per outcome, whether its result was stored, and for each outcome
    with a group, ``(done, total)`` once counted (None: the group is gone; a negative ``done``:
    counted before its result was stored, to be counted again)."""

    stored: list[bool]
    counts: list[tuple[int, int] | None]
    #: what ``then_claim`` claimed (decoded and begun, as ``claim`` returns it)
    claimed: list[Claim] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class NextClaim:
    """``finish``'s ``then_claim``: the arguments of a ``claim`` that does not wait."""

    queues: Sequence[str]
    limit: int
    lease: float
    worker: str
    begins: Begins | None = None


@runtime_checkable
class Engine(Protocol):
    broker: Broker
    backend: ResultBackend
    #: ``transaction()`` spans broker and backend: a worker commits a batch's finish steps together
    shares_transaction: bool
    #: ``run_next`` can take follow-ups for the caller
    runs_next: bool
    #: ``finish`` counts group members in the round trip that stores their results
    counts_members: bool
    #: ``finish``'s ``then_claim`` claims in the round trip that stores the results
    claims_in_finish: bool
    #: errors of the stores themselves (unreachable, locked): a message is left to its lease
    store_errors: tuple[type[BaseException], ...]

    def send(self, records: Sequence[dict], outgoing: Sequence[Outgoing]) -> None: ...

    def publish(self, outgoing: Sequence[Outgoing]) -> None: ...

    def claim(self, queues: Sequence[str], *, limit: int, timeout: float, lease: float, worker: str,
              begins: Begins | None = None, handoff: bool = False) -> list[Claim]: ...

    def finish(self, outcomes: Sequence[Outcome], acks: Sequence[Delivery] = (),
               then_claim: NextClaim | None = None) -> Finished: ...

    def run_next(
        self, outgoing: Sequence[Outgoing], *, lease: float, worker: str, begins: Begins | None = None
    ) -> list[Claim]: ...

    def extend(self, deliveries: Sequence[Delivery], lease: float) -> None: ...

    def hand_back(self, deliveries: Sequence[Delivery]) -> None: ...

    def transaction(self) -> ContextManager[Any]: ...

    def close(self) -> None: ...


def _always(message: Message) -> bool:
    return True


class SplitEngine:
    """The engine over any Broker and ResultBackend: each step one call to each store."""

    shares_transaction = False
    runs_next = False
    counts_members = False
    claims_in_finish = False

    def __init__(self, broker: Broker, backend: ResultBackend):
        self.broker = broker
        self.backend = backend
        self.store_errors: tuple[type[BaseException], ...] = tuple(dict.fromkeys(
            (ConnectionError, TimeoutError, *broker.store_errors, *backend.store_errors)))

    # -- sending ------------------------------------------------------------------------------
    def send(self, records: Sequence[dict], outgoing: Sequence[Outgoing]) -> None:
        """Record the tasks PENDING and publish their messages; both are done when it returns.

        Where the broker can publish without waiting for its confirms (``start_publish``) and the
        backend can complete a record a worker made first (``fills_records``), the messages go out first
        and the records are written while the confirms are on their way (a record that cannot be
        written raises once the confirms are in; its task, queued already, still runs: the
        worker's ``begin`` makes its record). Otherwise the records are written first. Messages
        the broker refuses (``PublishRefused`` with ``message_ids``) have their records failed
        with the reason, then the error is raised."""
        try:
            confirmed = self.broker.start_publish(outgoing) if self.backend.fills_records else None
            if confirmed is None:
                with self.transaction():
                    self.backend.create(records)
                    self.broker.publish_many(outgoing)
                return
            try:
                self.backend.fill(records)
            except BaseException:
                confirmed()     # the messages are out: their confirms are still waited for, then the error raised
                raise
            confirmed()
        except PublishRefused as exc:
            self._fail_refused(exc)
            raise

    def _fail_refused(self, exc: PublishRefused) -> None:
        """Fail the records of refused messages (never delivered: nothing else would end them)."""
        ids = exc.message_ids
        if not ids:
            return
        fields = {"exc_type": "PublishRefused", "error": str(exc)}
        try:
            self.backend.store_results([(i, states.FAILURE, None, dict(fields)) for i in ids])
        except Exception:
            log.warning("could not record %d refused message(s) as failed", len(ids), exc_info=True)

    def publish(self, outgoing: Sequence[Outgoing]) -> None:
        self.broker.publish_many(outgoing)

    def transaction(self) -> ContextManager[Any]:
        return contextlib.nullcontext()

    # -- claiming -----------------------------------------------------------------------------
    def claim(self, queues: Sequence[str], *, limit: int, timeout: float, lease: float, worker: str,
              begins: Begins | None = None, handoff: bool = False) -> list[Claim]:
        """Reserve up to ``limit`` deliveries (waiting up to ``timeout`` s), decode them and begin
        the tasks ``begins`` accepts (all by default), except deliveries after a lapse."""
        deliveries = self.broker.reserve(list(queues), timeout=timeout, lease=lease, limit=limit)
        return self.begin(decode(deliveries), worker, begins) if deliveries else []

    def begin(self, claims: list[Claim], worker: str, begins: Begins | None = None) -> list[Claim]:
        """Begin the decoded claims ``begins`` accepts (one ``begin_many`` call): tokens set."""
        begins = begins or _always
        wanted = [c for c in claims if c.message is not None and not c.delivery.after_lapse and begins(c.message)]
        if not wanted:
            return claims
        fields = {
            c.message.id: {"retries": c.message.retries, "name": c.message.name, "queue": c.delivery.queue}
            for c in wanted
            if c.message is not None
        }
        tokens = self.backend.begin_many(list(fields), worker=worker, fields=fields)
        for c in wanted:
            assert c.message is not None
            if c.message.id in tokens:
                c.begun, c.token = True, tokens[c.message.id]
                c.delivery.token = c.token
        return claims

    def run_next(
        self, outgoing: Sequence[Outgoing], *, lease: float, worker: str, begins: Begins | None = None
    ) -> list[Claim]:
        """Nothing taken: a split pair publishes follow-ups as usual (``runs_next`` is False)."""
        return []

    # -- finishing ----------------------------------------------------------------------------
    def finish(self, outcomes: Sequence[Outcome], acks: Sequence[Delivery] = (),
               then_claim: NextClaim | None = None) -> Finished:
        """Store the outcomes' results (fenced), count those with a group, then ack ``acks``;
        then, given ``then_claim``, claim without waiting (``Finished.claimed``)."""
        stored = (
            self.backend.store_results([(o.task_id, o.state, o.token, o.fields) for o in outcomes]) if outcomes else []
        )
        counts: list[tuple[int, int] | None] = [self.backend.member_done(o.group, o.task_id) if ok else (-1, 0)
                                                for o, ok in zip(outcomes, stored) if o.group is not None]
        if acks:
            self.broker.ack_many(list(acks))
        claimed = [] if then_claim is None else self.claim(
            then_claim.queues, limit=then_claim.limit, timeout=0, lease=then_claim.lease, worker=then_claim.worker,
            begins=then_claim.begins)
        return Finished(stored=list(stored), counts=counts, claimed=claimed)

    # -- leases -------------------------------------------------------------------------------
    def extend(self, deliveries: Sequence[Delivery], lease: float) -> None:
        for d in deliveries:
            self.broker.extend(d, lease)

    def hand_back(self, deliveries: Sequence[Delivery]) -> None:
        """Put claimed, unstarted deliveries back at once (not a lapse): a task the claim began
        is PENDING again (fenced by its token), its message released. One that cannot be handed
        back returns when its lease runs out."""
        from . import states

        for d in deliveries:
            try:
                if d.token:
                    self.backend.set_state(d.message_id, states.PENDING, token=d.token)
                self.broker.release(d)
            except Exception:
                log.warning("could not hand back %s; it returns when its lease runs out", d.message_id, exc_info=True)

    def close(self) -> None:
        self.broker.close()
        self.backend.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.broker!r} {self.backend!r}>"


def decode(deliveries: Sequence[Delivery]) -> list[Claim]:
    """Claims of deliveries, each message decoded once into a ``Message``; a delivery the broker
    marked (``dead_reason``) or whose body is not a valid message comes with the reason."""
    claims = []
    for d in deliveries:
        if d.dead_reason is not None:
            claims.append(Claim(d, reason=d.dead_reason))
            continue
        try:
            # a message handed over in this process is at hand: no need to decode and check it
            claims.append(Claim(d, message=Message.from_dict(d.message) if d.message is not None
                                else Message.decode(d.body)))
        except MessageError as exc:
            claims.append(Claim(d, reason=str(exc)))
    return claims


__all__ = ["Engine", "Claim", "Outcome", "Finished", "NextClaim", "SplitEngine", "decode",
           "ACK", "RETRY", "RELEASE", "DEFER", "REJECT", "COUNT_LAPSE"]
