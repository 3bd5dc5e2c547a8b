"""The fused SQLite engine: broker and result backend in one file, one transaction for both.

Its fast paths, each a whole-method override of SplitEngine:

- ``transaction()``: one write transaction over messages and records, so a worker commits a
  batch's finish steps (results, follow-ups, acks, and the claim of its next batch) at once.
- ``send``: records and messages in one transaction; a send outside a caller's transaction
  may hand its messages straight to idle workers of this process, begun in that transaction.
- ``claim``: the tasks are begun inside the claim's own transaction (one write per batch).
- ``finish``: results stored, acks and the claim of the next batch (``claims_in_finish``) in
  one transaction, shared with the finishes of the process's threads that wait for the file
  meanwhile (``SQLiteStore.combine``); the next batches of one worker's are claimed at once.
- ``run_next``: a worker's own follow-ups are inserted already reserved by it and begun in
  the finishing transaction, so it runs the next chain step without another claim.

Every other process using the file waits while one writes, so a write transaction holds
only its statements: statements and rows are built before it begins, and a claimed message
is read inside it only as far as beginning its task needs (its id and name); the envelope
is checked and the claims built once it has committed.
"""
from __future__ import annotations

from typing import Any, ContextManager, Sequence

from ... import serialization
from ...backend import ResultBackend
from ...broker import Broker, Delivery, Outgoing
from ...engine import Begins, Claim, Finished, NextClaim, Outcome, SplitEngine, decode
from ...errors import MessageError
from ...message import Message
from .backend import CREATE_SQL, SQLiteBackend
from .broker import SQLiteBroker


class SQLiteEngine(SplitEngine):
    shares_transaction = True
    runs_next = True
    claims_in_finish = True
    broker: SQLiteBroker
    backend: SQLiteBackend

    @staticmethod
    def serves(broker: Broker, backend: ResultBackend) -> bool:
        """True when both live in the same SQLite file (they then share one store object)."""
        return isinstance(broker, SQLiteBroker) and isinstance(backend, SQLiteBackend) and backend.store is broker.store

    def transaction(self) -> ContextManager[Any]:
        return self.broker.store.write()

    def send(self, records: Sequence[dict], outgoing: Sequence[Outgoing]) -> None:
        """The rows are built first; the write transaction only runs the two inserts."""
        store = self.broker.store
        outermost = not store.in_transaction()
        record_rows = self.backend.record_rows(records) if records else None
        now = self.broker.clock.time()
        message_rows = self.broker.message_rows(outgoing, now)
        with store.write() as conn:
            if record_rows:
                conn.executemany(CREATE_SQL, record_rows)
            if message_rows:
                self.broker.insert_messages(conn, outgoing, message_rows, now, handoff=outermost)

    def claim(self, queues: Sequence[str], *, limit: int, timeout: float, lease: float, worker: str,
              begins: Begins | None = None, handoff: bool = False) -> list[Claim]:
        """``handoff``: publishers of this process may hand messages straight to this call
        while it waits; they are begun in the publisher's transaction and returned with the rest."""
        begun: dict[int, tuple] = {}

        def on_claim(deliveries: list) -> None:
            begun.update(self._begin_claimed(deliveries, worker, begins))

        deliveries = self.broker.claim(
            list(queues), timeout=timeout, lease=lease, limit=limit, on_claim=on_claim, handoff=handoff
        )
        return self._claims(deliveries, begun, worker, begins)

    def finish(self, outcomes: Sequence[Outcome], acks: Sequence[Delivery] = (),
               then_claim: NextClaim | None = None) -> Finished:
        """SplitEngine.finish in one transaction, its statements' rows built before it begins."""
        items = [(o.task_id, o.state, o.token, o.fields) for o in outcomes]
        prepared = self.backend.results_rows(items) if items else None

        def work(conn) -> tuple[list, list]:
            if prepared is not None:
                stored = self.backend.store_rows(items, *prepared)
            else:
                stored = self.backend.store_results(items) if items else []
            counts: list[tuple[int, int] | None] = [
                self.backend.member_done(o.group, o.task_id) if ok else (-1, 0)
                for o, ok in zip(outcomes, stored) if o.group is not None
            ]
            if acks:
                self.broker.ack_all(acks)
            return list(stored), counts

        # the finishes of this process's threads that wait meanwhile are committed with this one,
        # and the next batches of those of the same worker claimed together
        then = None
        if then_claim is not None:
            then = ((tuple(then_claim.queues), then_claim.lease, then_claim.worker, then_claim.begins),
                    then_claim.limit, self._claim_for(then_claim))
        (stored, counts), claimed = self.broker.store.combine(work, then)
        if then_claim is not None:
            deliveries, begun = claimed
            claimed = self._claims(deliveries, begun, then_claim.worker, then_claim.begins)
        return Finished(stored=stored, counts=counts, claimed=claimed or [])

    def _claim_for(self, then_claim: NextClaim):
        """What claims, inside a finish's transaction, the next batches of finishes of one
        worker (``SQLiteStore.combine``'s ``then``): ``run(conn, limits)`` claims ``sum(limits)``
        messages at once and gives each finish ``(deliveries, begun)`` of at most its limit,
        in order (the best messages to the first)."""
        def run(conn, limits: list[int]) -> list[tuple[list[Delivery], dict[int, tuple]]]:
            begun: dict[int, tuple] = {}
            deliveries = self.broker.claim(
                list(then_claim.queues), timeout=0, lease=then_claim.lease, limit=sum(limits),
                on_claim=lambda got: begun.update(self._begin_claimed(got, then_claim.worker, then_claim.begins)))
            shares = []
            for limit in limits:
                mine, deliveries = deliveries[:limit], deliveries[limit:]
                shares.append((mine, {id(d): begun[id(d)] for d in mine if id(d) in begun}))
            return shares

        return run

    def run_next(
        self, outgoing: Sequence[Outgoing], *, lease: float, worker: str, begins: Begins | None = None
    ) -> list[Claim]:
        deliveries = self.broker.publish_reserved(outgoing, lease=lease)
        return self.begin(decode(deliveries), worker, begins) if deliveries else []

    # -- claims --------------------------------------------------------------------------------
    def _begin_claimed(self, deliveries: list[Delivery], worker: str, begins: Begins | None) -> dict[int, tuple]:
        """Inside the claim's transaction: begin the claimed tasks ``begins`` accepts (not after
        a lapse, nor one marked dead). Returns, by ``id(delivery)``, ``(envelope, message, token)``
        for each delivery whose body names a task (``message`` None where it does not): the
        envelope (a dict) is not checked yet (``_claims`` does, after the commit), and
        ``token`` is ``False`` where the task was not begun."""
        seen: dict[int, tuple] = {}
        wanted: dict[str, Message] = {}
        for d in deliveries:
            data, message = _named(d)
            seen[id(d)] = (data, message, False)
            if message is not None and d.dead_reason is None and not d.after_lapse and (
                    begins is None or begins(message)):
                wanted[message.id] = message
        if not wanted:
            return seen
        tokens = self.backend.begin_each(list(wanted), worker, lambda task_id: {
            "retries": wanted[task_id].retries, "name": wanted[task_id].name, "queue": wanted[task_id].queue})
        for d in deliveries:
            data, message, _ = seen[id(d)]
            if message is not None and message.id in wanted:
                seen[id(d)] = (data, message, tokens[message.id])
        return seen

    def _claims(self, deliveries: list[Delivery], begun: dict[int, tuple], worker: str,
                begins: Begins | None) -> list[Claim]:
        """After the claim's commit: the claims of ``deliveries``, each envelope checked (see
        ``_begin_claimed``). A delivery its claim did not see (a hand-over whose sending
        transaction rolled back is not among ``deliveries``) is decoded and begun here."""
        claims: list[Claim] = []
        unseen: list[Claim] = []
        for d in deliveries:
            seen = begun.get(id(d))
            if seen is None:
                [claim] = decode([d])
                unseen.append(claim)
            else:
                claim = _checked(d, *seen)
            claims.append(claim)
        if unseen:
            self.begin(unseen, worker, begins)
        return claims


def _named(d: Delivery) -> tuple[Any, Message | None]:
    """A delivery's envelope (the JSON object, not checked yet) and, where it names a task by
    this delivery's id, its Message; ``(None, None)`` where the body is not JSON."""
    if d.message is not None:        # handed over by a publisher of this process: checked there
        return d.message, Message.from_dict(d.message)
    if d.dead_reason is not None:
        return None, None
    try:
        data = serialization.loads(d.body)
    except (ValueError, UnicodeDecodeError):
        return None, None
    if type(data) is dict and data.get("id") == d.message_id and isinstance(data.get("name"), str) and data["name"]:
        return data, Message.from_dict(data)
    return data, None


def _checked(d: Delivery, data: Any, message: Message | None, token: Any) -> Claim:
    """The claim of a delivery ``_begin_claimed`` saw: its message once the envelope checks out
    (else the reason, as ``decode`` gives it), begun where ``token`` is not ``False``."""
    if data is None or d.dead_reason is not None:       # not JSON, or marked dead: as decode says
        return decode([d])[0]
    if d.message is None:
        try:
            Message.check(data)
        except MessageError as exc:
            return Claim(d, reason=str(exc))
    if message is None:
        message = Message.from_dict(data)
    if token is False:
        return Claim(d, message=message)
    d.token = token
    return Claim(d, message=message, begun=True, token=token)
