"""An in-memory broker of the toy driver: one store per URL in this process.

Supports: priorities, delayed messages (eta), leases that expire, publishes deduplicated by
id, dead letters, lapse counting (bounded redelivery): every method of the Broker interface.
"""
from __future__ import annotations

import dataclasses
import itertools
import threading
import time
from typing import Sequence

from nbqueue.broker import Broker, Capabilities, Delivery, Outgoing, Purged


@dataclasses.dataclass
class _Entry:
    message_id: str
    queue: str
    body: str
    priority: int
    due: float
    seq: int
    attempt: int = 0
    tag: int = 0                       # the current delivery's number; 0 while not reserved
    lease_until: float | None = None   # while reserved
    lapsed: int = 0


class _Store:
    """What the brokers on one URL share."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.entries: dict[tuple[str, str], _Entry] = {}
        self.dead: dict[str, list[dict]] = {}
        self.counter = itertools.count(1)


_STORES: dict[str, _Store] = {}
_STORES_LOCK = threading.Lock()


class ToyBroker(Broker):
    scheme = "toy"
    capabilities = Capabilities()

    def __init__(self, url: str, *, clock=None, options: dict | None = None):
        super().__init__(url, clock=clock, options=options)
        with _STORES_LOCK:
            self.store = _STORES.setdefault(url, _Store())

    # -- helpers (call holding the store's condition) -----------------------------------------
    def _lapse_expired(self, now: float) -> None:
        for e in self.store.entries.values():
            if e.lease_until is not None and e.lease_until <= now:
                e.lease_until, e.tag, e.lapsed = None, 0, e.lapsed + 1

    def _current(self, d: Delivery) -> _Entry | None:
        e = self.store.entries.get((d.queue, d.message_id))
        return e if e is not None and e.tag == d.tag and e.lease_until is not None else None

    def _take(self, queues: Sequence[str], limit: int, lease: float, now: float) -> list[Delivery]:
        ready = sorted((e for e in self.store.entries.values()
                        if e.queue in queues and e.lease_until is None and e.due <= now),
                       key=lambda e: (-e.priority, e.due, e.seq))
        taken: list[_Entry] = []
        for e in ready:
            if len(taken) == limit:
                break
            if e.lapsed:                      # after a lapse a message comes alone
                if not taken:
                    taken.append(e)
                    break
                continue
            taken.append(e)
        out = []
        for e in taken:
            e.attempt, e.tag, e.lease_until = e.attempt + 1, next(self.store.counter), now + lease
            out.append(Delivery(e.message_id, e.queue, e.body, e.attempt, e.lease_until, tag=e.tag,
                                priority=e.priority, lapsed=e.lapsed, dead_reason=self.limit_reason(e.lapsed)))
        return out

    # -- the Broker interface ---------------------------------------------------------------------
    def publish_many(self, outs: Sequence[Outgoing]) -> None:
        now = time.time()
        with self.store.cond:
            for out in outs:
                key = (out.queue, out.id)
                if key not in self.store.entries:
                    self.store.entries[key] = _Entry(out.id, out.queue, out.body, out.priority,
                                                     out.eta or now, next(self.store.counter))
            self.store.cond.notify_all()

    def reserve(self, queues: Sequence[str], *, timeout: float = 0.0, lease: float = 30.0,
                limit: int = 1) -> list[Delivery]:
        deadline = time.monotonic() + timeout
        with self.store.cond:
            while True:
                now = time.time()
                self._lapse_expired(now)
                got = self._take(list(queues), limit, lease, now)
                remaining = deadline - time.monotonic()
                if got or remaining <= 0:
                    return got
                self.store.cond.wait(min(remaining, 0.05))     # an eta or a lease may come due

    def ack(self, delivery: Delivery) -> bool:
        with self.store.cond:
            if self._current(delivery) is None:
                return False
            del self.store.entries[(delivery.queue, delivery.message_id)]
            return True

    def retry(self, delivery: Delivery, *, body: str | None = None, eta: float | None = None) -> bool:
        with self.store.cond:
            e = self._current(delivery)
            if e is None:
                return False
            e.body = body if body is not None else e.body
            e.due, e.seq, e.tag, e.lease_until = eta or time.time(), next(self.store.counter), 0, None
            self.store.cond.notify_all()
            return True

    def extend(self, delivery: Delivery, lease: float) -> bool:
        with self.store.cond:
            e = self._current(delivery)
            if e is None:
                return False
            e.lease_until = time.time() + lease
            return True

    def reject(self, delivery: Delivery, reason: str) -> bool:
        with self.store.cond:
            e = self._current(delivery)
            if e is None:
                return False
            del self.store.entries[(e.queue, e.message_id)]
            self.store.dead.setdefault(e.queue, []).append(
                {"id": e.message_id, "queue": e.queue, "reason": reason, "body": e.body})
            return True

    def purge_messages(self, queue: str) -> Purged:
        with self.store.cond:
            gone = [k for k, e in self.store.entries.items() if e.queue == queue and e.lease_until is None]
            return Purged(len(gone), [self.store.entries.pop(k).body for k in gone])

    def stats(self) -> list[dict]:
        now = time.time()
        rows: dict[str, dict] = {}
        with self.store.cond:
            for e in self.store.entries.values():
                row = rows.setdefault(e.queue, {"queue": e.queue, "ready": 0, "delayed": 0, "in_flight": 0, "dead": 0})
                kind = "in_flight" if e.lease_until is not None else "delayed" if e.due > now else "ready"
                row[kind] += 1
            for queue, dead in self.store.dead.items():
                rows.setdefault(queue, {"queue": queue, "ready": 0, "delayed": 0, "in_flight": 0, "dead": 0})
                rows[queue]["dead"] = len(dead)
        return list(rows.values())

    def dead_letters(self, queue: str | None = None, limit: int = 100) -> list[dict]:
        with self.store.cond:
            found = [d for q, dead in self.store.dead.items() if queue in (None, q) for d in dead]
        return found[:limit]

    def wake(self) -> None:
        with self.store.cond:
            self.store.cond.notify_all()
