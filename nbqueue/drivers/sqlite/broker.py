"""SQLite broker: the embedded default (``sqlite:///path.db``; no URL means ./.nbqueue/nbqueue.db).

Supports: priorities 0-9, delayed messages (eta), leases with redelivery, fenced
acks, dead letters with a reason, idempotent publish by message id, batch reserve.
Many threads and processes on one machine may share the file. A publish from the
same process wakes a waiting reserve() at once; one from another process through the
wake-up channel beside the file (nbqueue.drivers.sqlite.wake), sent only while a reserver
of another process may wait (``ChannelWaiters``: the ``nbq_reservers`` table), with polling
as the fallback (back-off up to ``poll_interval``, default 0.1 s at the idle end).

One table holds every message. ``due`` is when the row may be reserved: the eta for a
waiting message, the lease deadline for a reserved one, so an expired lease makes the
row reservable again with no reaper. ``attempt`` counts reservations and is the
fencing token of a delivery. ``lapses`` counts reservations whose lease ran out: a claim
that finds a row still reserved (``state = 1``) past its deadline adds one. Such a row
is claimed alone, and after ``max_deliveries`` lapses it is handed out with
``dead_reason`` set (see nbqueue.broker). Bodies are read as bytes, so a row whose
body is not UTF-8 is handed out for dead-lettering instead of failing every claim.
"""
from __future__ import annotations

import functools
import itertools
import logging
import os
import secrets
import sqlite3
import threading
import time
from typing import Any, Callable, Iterable, Sequence

from ...broker import Broker, Delivery, Outgoing, Purged, shown, text_of
from ...options import seconds
from ...procs import process_alive
from ...wakeups import WAKEUPS
from . import wake as wakechannel
from .db import SQLiteStore, path_from_url, placeholders

log = logging.getLogger(__name__)


def _schema(db) -> None:
    db["nbq_messages"].create(
        {
            "seq": int,
            "id": str,
            "queue": str,
            "priority": int,
            "due": float,
            "state": int,
            "attempt": int,
            "body": str,
            "reason": str,
            "created": float,
            "lapses": int,
        },
        pk="seq",
        if_not_exists=True,
        not_null={"lapses"},
        defaults={"lapses": 0},
    )
    if "lapses" not in db["nbq_messages"].columns_dict:     # a file from before lapses were counted
        try:
            db["nbq_messages"].add_column("lapses", int, not_null_default=0)
        except sqlite3.OperationalError as exc:            # another process added it meanwhile
            if "duplicate column" not in str(exc):
                raise
    db.execute("CREATE UNIQUE INDEX IF NOT EXISTS nbq_messages_id ON nbq_messages(id)")
    db.execute(
        "CREATE INDEX IF NOT EXISTS nbq_messages_claim ON nbq_messages(queue, priority DESC, due) WHERE state < 2"
    )
    # a row per process whose reservers may wait for the wake-up channel (see ChannelWaiters)
    db.execute(
        "CREATE TABLE IF NOT EXISTS nbq_reservers (name TEXT PRIMARY KEY, pid INTEGER, since FLOAT) WITHOUT ROWID"
    )


#: seconds a reserver handed a message by a sender of this process waits before it returns it, while
#: no thread of this process waits for a result: the sender's next messages go to the queue meanwhile,
#: and the reserver's worker claims them as one batch when it commits this one (see ``SQLiteBroker._linger``)
HANDOVER_LINGER = 0.002

#: a waiting message per row of ``SQLiteBroker.message_rows``; an id already there is left alone
PUBLISH_SQL = (
    "INSERT OR IGNORE INTO nbq_messages(id, queue, priority, due, state, attempt, body, created) "
    "VALUES (?, ?, ?, ?, 0, 0, ?, ?)"
)


class Slot:
    """An idle reserver of this process, waiting for work: a sender of this process may
    hand it messages directly, already reserved by it (see ``IdleReservers``); its
    ``on_claim`` begins them, in the sender's transaction."""

    def __init__(self, queues: Iterable[str], limit: int, lease: float, on_claim=None) -> None:
        self.on_claim = on_claim
        self.queues = frozenset(queues)
        self.limit = limit
        self.lease = lease
        self.taken = False                  # a sender handed it messages (its send may not have finished)
        self.taken_at = 0.0                 # when (time.monotonic())
        self.version = 0                    # the broker's wake-up version then (see SQLiteBroker._linger)
        self.deliveries: list = []          # what was handed over, once the send finished
        self.settled = threading.Event()    # the send finished (or failed: then nothing was handed over)
        # what its reserver waits on: set by a hand-over to this slot once its send finished,
        # by new messages (``IdleReservers.wake``), never by a hand-over to another, and by
        # ``hurry``
        self.woken = threading.Event()
        self.hurried = False

    def hurry(self) -> None:
        """A thread of this process waits for a result: its reserver returns what it was
        handed at once (see ``SQLiteBroker._linger``)."""
        self.hurried = True
        self.woken.set()

    def wait(self) -> list:
        """What was handed over, waiting at most a lease for the send to finish (after that
        the messages are delivered again anyway)."""
        return self.deliveries if self.settled.wait(self.lease) else []


class IdleReservers:
    """Reservers of this process waiting for work, per database file, that a sender of
    this process may hand messages to directly (``Slot``s), the one that came last first:
    the thread that has just finished its tasks is handed the next, the others sleep on.
    A slot stays listed, taken, until its reserver returns: while it lingers (see
    ``SQLiteBroker._linger``) messages for its queues go to the queue, not to another
    reserver, and wake none (it claims them as it commits what it was handed)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._slots: dict[Any, list] = {}
        self._taken: dict[Any, int] = {}        # store -> how many of its listed slots are taken
        self._uniform: dict[Any, bool] = {}     # store -> its listed slots all serve the same queues

    def any(self, store: Any) -> bool:
        """Whether a sender may find an idle reserver of ``store`` (none is taken: a send
        while one is goes to the queue, see ``take``)."""
        return bool(self._slots.get(store)) and not self._taken.get(store)

    def idle(self, store: Any) -> int:
        """How many reservers of ``store`` wait untaken (for tests and status)."""
        with self._lock:
            return sum(not slot.taken for slot in self._slots.get(store, ()))

    def add(self, store: Any, slot: Any) -> None:
        with self._lock:
            slots = self._slots.setdefault(store, [])
            slots.append(slot)
            self._uniform[store] = all(other.queues == slot.queues for other in slots)

    def take(self, store: Any, outs: Sequence[Outgoing], now: float, on_take=None) -> tuple[Any, list]:
        """The idle reserver listed last that can run some of ``outs`` now (due, on its
        queues) and those messages, up to its limit; it is marked taken and ``on_take(slot)``
        runs under the lock. ``(None, [])`` when there is none, or when a reserver of one
        of their queues was handed messages and has not returned yet."""
        with self._lock:
            slots = self._slots.get(store) or ()
            if any(slot.taken and any(o.queue in slot.queues for o in outs) for slot in slots):
                return None, []
            for slot in reversed(slots):
                mine = [o for o in outs if o.queue in slot.queues and (o.eta is None or o.eta <= now)][: slot.limit]
                if mine:
                    slot.taken, slot.taken_at = True, time.monotonic()
                    self._taken[store] = self._taken.get(store, 0) + 1
                    if on_take is not None:
                        on_take(slot)
                    return slot, mine
        return None, []

    def withdraw(self, store: Any, slot: Slot) -> bool:
        """Close ``slot`` to senders before its reserver claims from the queue: True when
        closed, False when a sender took it first (then what it hands over is the reserve's
        whole batch). So a reserve returns what it was handed or what it claimed, never
        both: at most its limit, and a message handed over is never put behind messages
        sent after it."""
        with self._lock:
            if slot.taken:
                return False
            self._discard(store, slot)
            return True

    def wake(self, store: Any, queues: frozenset | None = None, every: bool = False, besides: Any = None) -> None:
        """New messages: wake one idle reserver of each set of queues (of ``queues`` only, if
        given; not ``besides``) that is not awake already, nor handed messages (it claims
        them next), or ``every`` one. One is enough: a reserver that claims a full batch
        wakes the next (see ``SQLiteBroker._reserve_loop``), and each finds the broker's
        wake-up version changed, so it reads the file before it waits again."""
        if not self._slots.get(store):
            return
        if self._taken.get(store) and self._uniform.get(store) and not every and besides is None:
            return                  # the one taken claims them
        with self._lock:
            seen: set = set() if every else {
                slot.queues for slot in self._slots.get(store) or () if slot.taken and slot is not besides}
            for slot in self._slots.get(store) or ():
                if slot is besides or not every and slot.woken.is_set():
                    continue
                if every or slot.queues not in seen and (queues is None or slot.queues == queues):
                    seen.add(slot.queues)
                    slot.woken.set()

    def close(self, store: Any, slot: Slot | None) -> list:
        """Withdraw a reserver that stops waiting; what a sender handed it meanwhile."""
        if slot is None:
            return []
        with self._lock:
            self._discard(store, slot)
            if not slot.taken:
                return []
        return slot.wait()

    def _discard(self, store: Any, slot: Slot) -> None:
        slots = self._slots.get(store)
        if slots and slot in slots:
            slots.remove(slot)
            if slot.taken:
                self._taken[store] -= 1
            self._uniform[store] = all(other.queues == slots[0].queues for other in slots)

    def _after_fork(self) -> None:
        """A forked child has none of its parent's reserver threads."""
        self._lock = threading.Lock()
        self._slots, self._taken, self._uniform = {}, {}, {}


IDLE = IdleReservers()


def _schema_of(path: str, db) -> None:
    """The broker's schema, run when the process opens the file at ``path`` (again when the
    file there was replaced: this process's row of ``nbq_reservers`` went with the old one)."""
    _schema(db)
    WAITERS.forget(path)


class ChannelWaiters:
    """Per database file, this process's reservers that may wait for a wake-up from another
    process, and whether the file says so to those processes.

    A sender of another process sends its wake-up datagrams (see ``nbqueue.drivers.sqlite.wake``)
    only while the file's ``nbq_reservers`` table has a row of some other process, read in
    the send's own transaction: a datagram costs the sender a system call and the receiver
    a thread switch, which a worker busy with a backlog does not need. The row is written
    in the transaction of a claim that found nothing for a reserver about to wait (so a
    message committed after it sees the row, and one committed before is found by that
    claim), and deleted in the transaction of a claim that filled its batch while no
    reserver of this process was in its reserve loop (the worker has a backlog). A
    reserver counts itself (``enter``/``leave``) before its first claim, so a row is never
    deleted under a reserver that has not claimed yet. Rows of processes gone are removed
    by ``SQLiteBroker.upkeep``; a process whose reservers do not write rows (without the
    channel) polls instead, as before."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._inside: dict[str, int] = {}      # path -> reservers of this process in their reserve loop
        self._marked: dict[str, bool] = {}     # path -> this process's row is there (or being written)
        self.name = f"{os.getpid()}-{secrets.token_hex(4)}"

    def enter(self, path: str) -> None:
        with self._lock:
            self._inside[path] = self._inside.get(path, 0) + 1

    def leave(self, path: str) -> None:
        with self._lock:
            self._inside[path] -= 1

    def marked(self, path: str) -> bool:
        return self._marked.get(path, False)

    def set_marked(self, path: str, marked: bool) -> None:
        """Inside the write transaction that writes (True) or deletes (False) the row."""
        with self._lock:
            self._marked[path] = marked

    def forget(self, path: str) -> None:
        """The file at ``path`` was opened afresh: it holds no row of this process."""
        self.set_marked(path, False)

    def unmark_if_idle(self, path: str) -> bool:
        """True (and the row counts as gone) when the row is there and no reserver of this
        process is in its reserve loop: the caller deletes it in its transaction."""
        with self._lock:
            if self._marked.get(path) and not self._inside.get(path):
                self._marked[path] = False
                return True
            return False

    def _after_fork(self) -> None:
        """A forked child has no reservers yet and is another process (another row)."""
        self._lock = threading.Lock()
        self._inside, self._marked = {}, {}
        self.name = f"{os.getpid()}-{secrets.token_hex(4)}"


WAITERS = ChannelWaiters()
os.register_at_fork(after_in_child=WAITERS._after_fork)


def _published_waker(key: Any, path: str) -> Callable[[bytes], None]:
    """What wakes this process's reservers of the file ``path`` when messages were committed
    (the wake-up channel's handler, for commits of other processes): a new wake-up version
    (reservers without a slot wake; none reads its file again before it changed) and one
    idle reserver with a slot per set of queues (``IdleReservers.wake``)."""
    def published(payload: bytes) -> None:
        WAKEUPS.notify(key, ())
        IDLE.wake(path)

    return published
os.register_at_fork(after_in_child=IDLE._after_fork)


class SQLiteBroker(Broker):
    scheme = "sqlite"
    store_errors = (sqlite3.OperationalError,)

    def __init__(self, url: str = "", *, clock=None, options: dict | None = None):
        super().__init__(url, clock=clock, options=options)
        self.poll_interval = seconds("poll_interval", self.options.get("poll_interval"), 0.1, positive=True)
        self.path = path_from_url(url)
        self.store = SQLiteStore.shared(self.path)
        self.store.ensure_schema("broker", functools.partial(_schema_of, self.path))
        self._wake_key = ("sqlite-broker", self.path)
        self._quiet = threading.local()     # .last: (wake-up version, next due, when) as this thread last found nothing
        self._channel = wakechannel.channel_for(self.path).hold()   # publishes of other processes wake our reservers
        self._published_elsewhere = _published_waker(self._wake_key, self.path)
        self._channel_held = True

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.url or 'sqlite://'} (file {self.path})>"  # a relative URL's absolute path

    # -- publishing --------------------------------------------------------------
    def publish_many(self, outs: Sequence[Outgoing], handoff: bool = False) -> None:
        """``handoff``: the caller's transaction is this send's own (short), so its messages may
        go to idle reservers of this process; a long transaction must not hold them."""
        if not outs:
            return
        now = self.clock.time()
        rows = self.message_rows(outs, now)
        with self.store.write() as conn:
            self.insert_messages(conn, outs, rows, now, handoff=handoff)

    @staticmethod
    def message_rows(outs: Sequence[Outgoing], now: float) -> list[tuple]:
        """The parameters of ``PUBLISH_SQL`` for ``outs`` published at ``now`` (built before a
        transaction begins)."""
        return [(o.id, o.queue, int(o.priority), now if o.eta is None else o.eta, o.body, now) for o in outs]

    def insert_messages(self, conn: sqlite3.Connection, outs: Sequence[Outgoing], rows: list[tuple], now: float, *,
                        handoff: bool = False) -> None:
        """Inside the caller's write transaction: publish ``outs``, whose ``message_rows`` are
        ``rows``; with ``handoff``, idle reservers of this process may take some first (see
        ``publish_many``)."""
        if handoff and IDLE.any(self.path):
            rest = self._hand_over(outs, now)
            if len(rest) != len(outs):
                kept = {o.id for o in rest}
                rows = [r for r in rows if r[0] in kept]
        if rows:
            conn.executemany(PUBLISH_SQL, rows)
            if self._channel.has_peers(wakechannel.MESSAGES) and conn.execute(
                    "SELECT 1 FROM nbq_reservers WHERE name != ? LIMIT 1", (WAITERS.name,)).fetchone():
                self.store.on_commit(self._published)
            else:
                self.store.on_commit(self._published_here)

    def publish_reserved(self, outs: Sequence[Outgoing], *, lease: float) -> list[Delivery]:
        """Publish messages already reserved by the caller (a worker's own follow-ups).

        They are ordinary messages with a lease: if the caller dies they are delivered
        again. Ids already present are left alone and not returned.
        """
        now = self.clock.time()
        deliveries = []
        with self.store.write() as conn:
            for o in outs:
                row = conn.execute(
                    "INSERT OR IGNORE INTO nbq_messages(id, queue, priority, due, state, attempt, body, created) "
                    "VALUES (?, ?, ?, ?, 1, 1, ?, ?) RETURNING seq",
                    (o.id, o.queue, int(o.priority), now + lease, o.body, now),
                ).fetchone()
                if row is not None:
                    deliveries.append(
                        Delivery(
                            message_id=o.id,
                            queue=o.queue,
                            body=o.body,
                            attempt=1,
                            lease_until=now + lease,
                            tag=(row[0], 1),
                            priority=o.priority,
                            message=o.message,
                        )
                    )
        return deliveries

    def _hand_over(self, outs: Sequence[Outgoing], now: float) -> Sequence[Outgoing]:
        """Give due messages to idle reservers of this process; return the rest.

        The messages are inserted already reserved (an ordinary lease: if that worker dies
        they are delivered again) and begun by the reserver's ``on_claim``, all in the
        publisher's transaction; the reserver returns them once it commits. This saves a
        claim per message and a wake-up's worth of latency for a worker in the same kernel.
        """
        def settle_with_transaction(slot: Slot) -> None:   # whatever happens next: the reserver waits for it
            def settled() -> None:
                slot.settled.set()
                slot.woken.set()

            def undone() -> None:
                slot.deliveries.clear()
                settled()

            slot.version = WAKEUPS.version(self._wake_key)
            self.store.on_commit(settled)
            self.store.on_rollback(undone)

        while outs:
            slot, mine = IDLE.take(self.path, outs, now, on_take=settle_with_transaction)
            if slot is None:
                return outs
            taken = {o.id for o in mine}
            outs = [o for o in outs if o.id not in taken]
            slot.deliveries = self.publish_reserved(mine, lease=slot.lease)
            if slot.deliveries and slot.on_claim is not None:
                slot.on_claim(slot.deliveries)
        return outs

    # -- consuming ---------------------------------------------------------------
    def _claim(self, queues: Sequence[str], now: float, lease: float, limit: int, on_claim=None,
               slot: Slot | None = None, mark: bool = False) -> list[Delivery]:
        """Claim up to ``limit`` due messages, best first. ``slot``: the caller's hand-over slot,
        withdrawn in the claim's transaction (``IdleReservers.withdraw``); nothing is claimed
        when a sender took it first. ``mark``: the caller waits for the wake-up channel if
        nothing is claimed; its process's row of ``nbq_reservers`` is written then (see
        ``ChannelWaiters``). A full batch claimed while no reserver of this process is in
        its reserve loop deletes that row."""
        qs = placeholders(len(queues))
        # a cheap read first, so idle pollers never take the write lock (inside a write
        # transaction already, the claim's own query answers it); a reserver whose process
        # has no row yet claims in a write transaction, which writes the row if it finds nothing
        if (not self.store.in_transaction() and (not mark or WAITERS.marked(self.path)) and not self.store.read(
            f"SELECT 1 FROM nbq_messages WHERE queue IN ({qs}) AND state < 2 AND due <= ? LIMIT 1", (*queues, now)
        )):
            return []
        with self.store.write() as conn:
            # the best due rows, read whole (the write lock is held: the update below changes
            # them as read); one whose lease ran out (state 1) or ran out before is claimed alone
            candidates = conn.execute(
                f"""SELECT seq, id, queue, CAST(body AS BLOB), attempt, priority, lapses, state FROM nbq_messages
                    WHERE queue IN ({qs}) AND state < 2 AND due <= ? ORDER BY priority DESC, due, seq LIMIT ?""",
                (*queues, now, limit),
            ).fetchall()
            if not candidates or slot is not None and not IDLE.withdraw(self.path, slot):
                if mark and not candidates and not WAITERS.marked(self.path):
                    self._mark(conn, now, True)
                return []
            if candidates[0][7] == 1 or candidates[0][6]:
                rows = candidates[:1]
            else:
                rows = list(itertools.takewhile(lambda r: r[7] != 1 and not r[6], candidates))
            # no RETURNING: SQLite runs it as a trigger per row, dearer than this computing the values
            conn.execute(
                f"UPDATE nbq_messages SET state = 1, due = ?, attempt = attempt + 1, lapses = lapses + (state = 1) "
                f"WHERE seq IN ({placeholders(len(rows))})",
                (now + lease, *[r[0] for r in rows]),
            )
            if len(rows) >= limit and not mark and WAITERS.unmark_if_idle(self.path):
                self._mark(conn, now, False)
            rows.sort(key=lambda r: (-r[5], r[0]))
            deliveries = [self._delivery(r, now + lease) for r in rows]
            if on_claim is not None:
                on_claim(deliveries)
        return deliveries

    def _mark(self, conn: sqlite3.Connection, now: float, marked: bool) -> None:
        """Inside a write transaction: write (``marked``) or delete this process's row of
        ``nbq_reservers``; ``WAITERS`` says so at once, and again otherwise on a rollback."""
        if marked:
            conn.execute("INSERT OR REPLACE INTO nbq_reservers(name, pid, since) VALUES (?, ?, ?)",
                         (WAITERS.name, os.getpid(), now))
        else:
            conn.execute("DELETE FROM nbq_reservers WHERE name = ?", (WAITERS.name,))
        WAITERS.set_marked(self.path, marked)
        self.store.on_rollback(lambda: WAITERS.set_marked(self.path, not marked))

    def _delivery(self, row: tuple, lease_until: float) -> Delivery:
        """The delivery of a claimed row as ``_claim`` read it (before its update)."""
        seq, message_id, queue, raw, attempt, priority, lapses, state = row
        attempt, lapses = attempt + 1, lapses + (state == 1)
        body, problem = text_of(raw or b"")
        return Delivery(
            message_id=message_id,
            queue=queue,
            body=body,
            attempt=attempt,
            lease_until=lease_until,
            tag=(seq, attempt),
            priority=priority,
            lapsed=lapses,
            dead_reason=problem or self.limit_reason(lapses),
        )

    def next_due(self, queues: Sequence[str]) -> float | None:
        row = self.store.read(
            f"SELECT MIN(due) FROM nbq_messages WHERE queue IN ({placeholders(len(queues))}) AND state < 2",
            tuple(queues),
        )
        return row[0][0] if row else None

    def reserve(
        self, queues: Sequence[str], *, timeout: float = 0.0, lease: float = 30.0, limit: int = 1
    ) -> list[Delivery]:
        return self.claim(queues, timeout=timeout, lease=lease, limit=limit)

    def claim(self, queues: Sequence[str], *, timeout: float = 0.0, lease: float = 30.0, limit: int = 1, on_claim=None,
              handoff: bool = False) -> list[Delivery]:
        """``reserve`` for the driver's engine: ``on_claim(deliveries)`` runs inside the claim's
        transaction (the engine begins the tasks there: one write per batch). ``handoff``:
        publishers of this process may hand messages over directly while this call runs (see
        ``_hand_over``); ``on_claim`` then runs in the publisher's transaction, and what was
        handed over is returned instead of a claim (never both: ``IdleReservers.withdraw``)."""
        if not (handoff and timeout > 0):
            return self._reserve_loop(queues, timeout, lease, limit, on_claim, None)
        slot = Slot(queues, limit, lease, on_claim)
        IDLE.add(self.path, slot)
        return self._reserve_with_slot(slot, lambda: self._reserve_loop(queues, timeout, lease, limit, on_claim, slot))

    def _reserve_with_slot(self, slot: Slot | None, claim: Callable[[], list]) -> list[Delivery]:
        """Run ``claim()`` (the reserve loop) while ``slot``, if any, is open for a hand-over;
        return what it claimed or else what it was handed (see ``IdleReservers.withdraw``). If
        ``claim`` raises, what was handed over meanwhile goes back to the queue at once."""
        try:
            got = claim()
        except BaseException:
            for d in IDLE.close(self.path, slot):
                try:
                    self.release(d)
                except Exception:
                    pass                    # its lease brings it back
            raise
        return got + IDLE.close(self.path, slot)

    def _reserve_loop(
        self, queues: Sequence[str], timeout: float, lease: float, limit: int, on_claim, slot
    ) -> list[Delivery]:
        # publishes of other processes wake this process (else they are found by polling)
        if timeout > 0:
            pushed = self._channel.listen(wakechannel.MESSAGES, self._published_elsewhere)
        else:
            pushed = self._channel.listening(wakechannel.MESSAGES)
        if not (pushed and timeout > 0):
            return self._reserve_waiting(queues, timeout, lease, limit, on_claim, slot, pushed, False)
        # this reserver may wait for another process's publish: counted before its first
        # claim, so the file's row that makes senders wake this process stays meanwhile
        WAITERS.enter(self.path)
        try:
            return self._reserve_waiting(queues, timeout, lease, limit, on_claim, slot, pushed, True)
        finally:
            WAITERS.leave(self.path)

    def _reserve_waiting(self, queues: Sequence[str], timeout: float, lease: float, limit: int, on_claim,
                         slot: Slot | None, pushed: bool, mark: bool) -> list[Delivery]:
        """``_reserve_loop``'s loop; ``mark``: a claim that finds nothing writes this process's
        row of ``nbq_reservers`` (see ``ChannelWaiters``) before the reserver waits."""
        deadline = time.monotonic() + max(0.0, timeout)
        # a reserver with a slot is woken by every publish it cares about: no need to poll
        # in short steps (without the channel, back off from a millisecond)
        interval = self.poll_interval if slot is not None and pushed else 0.001
        while True:
            if slot is not None:
                slot.woken.clear()
                if slot.taken:
                    self._linger(slot)
                    return []
            version = WAKEUPS.version(self._wake_key)
            now = self.clock.time()
            quiet = getattr(self._quiet, "last", None)
            if ((slot is not None or pushed) and quiet is not None and quiet[0] == version
                    and (quiet[1] is None or quiet[1] > now) and time.monotonic() - quiet[2] < self.poll_interval
                    and (not mark or WAITERS.marked(self.path))):
                # this thread, waiting for a hand-over, found nothing (and read when the next
                # message is due), and nothing was published in this process since (a
                # hand-over does not count) nor, where the wake-up channel says so, in another:
                # do not read again yet, nor to claim a batch as it commits the one handed
                # over, so a worker fed by hand-overs does not query the file between tasks
                # (it still reads it every poll_interval)
                if timeout <= 0:
                    return []
                due = quiet[1]
            else:
                got = self._claim(queues, now, lease, limit, on_claim, slot, mark=mark)
                if got:
                    self._quiet.last = None
                    if slot is not None and len(got) >= limit:
                        IDLE.wake(self.path, slot.queues, besides=slot)     # there may be more: another looks
                    return got
                if timeout <= 0:
                    return []
                due = self.next_due(queues)
                if slot is not None:
                    self._quiet.last = (version, due, time.monotonic())
            remaining = deadline - time.monotonic()
            if slot is not None and slot.taken:
                self._linger(slot)
                return []
            if remaining <= 0:
                return []
            wait = min(remaining, interval)
            if due is not None:
                wait = min(wait, max(0.0, due - now) + 0.0005)
            if slot is None:
                WAKEUPS.wait(self._wake_key, version, wait)
                self._quiet.last = None
            elif slot.woken.wait(wait):
                if WAKEUPS.version(self._wake_key) == version:
                    continue    # woken for a hand-over to this slot: nothing new to read
                self._quiet.last = None
            elif not pushed:
                self._quiet.last = None     # no wake-ups from other processes: poll with back-off
            interval = min(interval * 2, self.poll_interval)

    def _linger(self, slot: Slot) -> None:
        """A sender of this process handed ``slot`` messages: wait until ``HANDOVER_LINGER``
        after that, so that the worker runs them with the messages its sender sends next (as
        one batch, claimed as it commits these), unless a thread of this process waits for
        a result, or begins to (it hurries the slot: ``LocalWakeups.before_wait``). Messages
        published since the hand-over woke no other reserver (``IdleReservers.wake``): then
        one is woken now, and it wakes the next if it claims a full batch."""
        key = wakechannel.results_key(self.path)
        hurry = slot.hurry
        try:
            if slot.hurried or not WAKEUPS.before_wait(key, hurry):
                return
            try:
                while not slot.hurried:
                    left = slot.taken_at + HANDOVER_LINGER - time.monotonic()
                    if left <= 0:
                        return
                    slot.woken.clear()
                    if slot.hurried:
                        return
                    slot.woken.wait(left)
            finally:
                WAKEUPS.cancel_before_wait(key, hurry)
        finally:
            if WAKEUPS.version(self._wake_key) != slot.version:
                IDLE.wake(self.path, slot.queues, besides=slot)

    def _fenced(self, sql: str, params: tuple, delivery: Delivery) -> bool:
        seq, attempt = delivery.tag
        return (
            self.store.execute(sql + " WHERE seq = ? AND attempt = ? AND state = 1", (*params, seq, attempt)).rowcount
            == 1
        )

    def ack(self, delivery: Delivery) -> bool:
        return self._fenced("DELETE FROM nbq_messages", (), delivery)

    def ack_many(self, deliveries: Sequence[Delivery]) -> list[bool]:
        # a statement per delivery by primary key: cheaper than one matching row values (a
        # temporary table) and RETURNING which were deleted (a trigger per row)
        sql = "DELETE FROM nbq_messages WHERE seq = ? AND attempt = ? AND state = 1"
        with self.store.write() as conn:
            return [conn.execute(sql, d.tag).rowcount == 1 for d in deliveries]

    def ack_all(self, deliveries: Sequence[Delivery]) -> int:
        """``ack_many`` in as few statements as there are chunks of 300, for a caller that needs
        no answer per delivery: how many were acknowledged (the others were stale)."""
        done = 0
        with self.store.write() as conn:
            for start in range(0, len(deliveries), 300):
                tags = [d.tag for d in deliveries[start:start + 300]]
                done += conn.execute(
                    f"DELETE FROM nbq_messages WHERE seq IN ({placeholders(len(tags))}) AND state = 1 "
                    f"AND attempt = CASE seq {'WHEN ? THEN ? ' * len(tags)}END",
                    (*[seq for seq, _ in tags], *[v for tag in tags for v in tag]),
                ).rowcount
        return done

    def retry(self, delivery: Delivery, *, body: str | None = None, eta: float | None = None) -> bool:
        due = eta if eta is not None else self.clock.time()
        if body is None:
            ok = self._fenced("UPDATE nbq_messages SET state = 0, due = ?", (due,), delivery)
        else:
            ok = self._fenced("UPDATE nbq_messages SET state = 0, due = ?, body = ?", (due, body), delivery)
        self.store.on_commit(self._published)
        return ok

    def extend(self, delivery: Delivery, lease: float) -> bool:
        until = self.clock.time() + lease
        ok = self._fenced("UPDATE nbq_messages SET due = ?", (until,), delivery)
        if ok:
            delivery.lease_until = until
        return ok

    def reject(self, delivery: Delivery, reason: str) -> bool:
        return self._fenced("UPDATE nbq_messages SET state = 2, reason = ?", (reason,), delivery)

    # -- inspection --------------------------------------------------------------
    def purge_messages(self, queue: str) -> Purged:
        """Every message of the queue (waiting, delayed, in flight, dead) goes; the bodies come
        back from the same statement."""
        rows = self.store.execute(
            "DELETE FROM nbq_messages WHERE queue = ? RETURNING CAST(body AS BLOB)", (queue,)
        ).rows
        return Purged(len(rows), [text_of(b or b"")[0] for (b,) in rows])

    def stats(self) -> list[dict]:
        now = self.clock.time()
        rows = self.store.read(
            """SELECT queue,
                      SUM(state = 0 AND due <= ?), SUM(state = 0 AND due > ?), SUM(state = 1), SUM(state = 2)
               FROM nbq_messages GROUP BY queue ORDER BY queue""",
            (now, now),
        )
        return [
            {"queue": q, "ready": r or 0, "delayed": d or 0, "in_flight": f or 0, "dead": x or 0}
            for q, r, d, f, x in rows
        ]

    def dead_letters(self, queue: str | None = None, limit: int = 100) -> list[dict]:
        sql = "SELECT id, queue, reason, CAST(body AS BLOB) FROM nbq_messages WHERE state = 2"
        params: tuple = ()
        if queue is not None:
            sql += " AND queue = ?"
            params = (queue,)
        rows = self.store.read(sql + " ORDER BY seq LIMIT ?", (*params, limit))
        return [{"id": i, "queue": q, "reason": r, "body": shown(text_of(b or b"")[0])} for i, q, r, b in rows]

    def remove_dead_letters(self, queue: str, ids: Sequence[str]) -> int:
        ids = list(ids)
        removed = 0
        for start in range(0, len(ids), 900):
            chunk = ids[start:start + 900]
            removed += self.store.execute(
                f"DELETE FROM nbq_messages WHERE state = 2 AND queue = ? AND id IN ({placeholders(len(chunk))})",
                (queue, *chunk),
            ).rowcount
        return removed

    def upkeep(self) -> None:
        self.store.checkpoint()
        self._forget_reservers_gone()

    def _forget_reservers_gone(self) -> None:
        """Delete the ``nbq_reservers`` rows of processes that no longer exist (their senders
        would otherwise keep sending wake-ups for them)."""
        gone = [name for name, pid in self.store.read("SELECT name, pid FROM nbq_reservers")
                if process_alive(pid) is False]
        for name in gone:
            self.store.execute("DELETE FROM nbq_reservers WHERE name = ?", (name,))

    def wake(self) -> None:
        """Wake every reserver of this file, in this process and (through the wake-up channel) others."""
        WAKEUPS.notify(self._wake_key)
        IDLE.wake(self.path, every=True)
        self._channel.send(wakechannel.MESSAGES)

    def _published(self) -> None:
        """After a commit of new or returned messages: one idle reserver per set of queues here
        (see ``IdleReservers.wake``), the reservers without a slot, and other processes."""
        self._published_here()
        self._channel.send(wakechannel.MESSAGES)

    def _published_here(self) -> None:
        """``_published`` when no reserver of another process waits (see ``ChannelWaiters``)."""
        self._published_elsewhere(b"")

    def close(self) -> None:
        # the store is shared by every broker and backend on this file in this process; the
        # wake-up channel's listeners end with the last of them
        held, self._channel_held = self._channel_held, False
        if held:
            self._channel.release()
            self._unmark_on_close()

    def _unmark_on_close(self) -> None:
        """Delete this process's row of ``nbq_reservers`` when none of its reservers of the file
        waits any more (best effort: rows of processes gone are also removed by ``upkeep``)."""
        if not WAITERS.marked(self.path):
            return
        try:
            with self.store.write() as conn:
                if WAITERS.unmark_if_idle(self.path):
                    self._mark(conn, self.clock.time(), False)
        except Exception as exc:                 # a store that cannot be written: upkeep elsewhere removes it
            log.debug("could not delete the reservers' row of %s: %s", self.path, exc)
