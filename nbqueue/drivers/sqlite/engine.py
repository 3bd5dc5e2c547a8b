"""The fused SQLite engine: broker and result backend in one file, one transaction for both.

Its fast paths, each a whole-method override of SplitEngine:

- ``transaction()``: one write transaction over messages and records, so a worker commits a
  batch's finish steps (results, follow-ups, acks, and the claim of its next batch) at once.
- ``send``: records and messages in one transaction; a send outside a caller's transaction
  may hand its messages straight to idle workers of this process, begun in that transaction.
- ``claim``: the tasks are begun inside the claim's own transaction (one write per batch).
- ``run_next``: a worker's own follow-ups are inserted already reserved by it and begun in
  the finishing transaction, so it runs the next chain step without another claim.
"""
from __future__ import annotations

from typing import Any, ContextManager, Sequence

from ...backend import ResultBackend
from ...broker import Broker, Outgoing
from ...engine import Begins, Claim, SplitEngine, decode
from .backend import CREATE_SQL, SQLiteBackend
from .broker import SQLiteBroker


class SQLiteEngine(SplitEngine):
    shares_transaction = True
    runs_next = True
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
        begun: dict[int, Claim] = {}

        def on_claim(deliveries: list) -> None:
            for c in self.begin(decode(deliveries), worker, begins):
                begun[id(c.delivery)] = c

        deliveries = self.broker.claim(
            list(queues), timeout=timeout, lease=lease, limit=limit, on_claim=on_claim, handoff=handoff
        )
        # only what was returned: a hand-over whose sending transaction rolled back was begun in
        # it, and is gone with it (its deliveries are not among those returned)
        missing = [d for d in deliveries if id(d) not in begun]
        if missing:
            for c in self.begin(decode(missing), worker, begins):
                begun[id(c.delivery)] = c
        return [begun[id(d)] for d in deliveries]

    def run_next(
        self, outgoing: Sequence[Outgoing], *, lease: float, worker: str, begins: Begins | None = None
    ) -> list[Claim]:
        deliveries = self.broker.publish_reserved(outgoing, lease=lease)
        return self.begin(decode(deliveries), worker, begins) if deliveries else []
