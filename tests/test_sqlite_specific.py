"""The SQLite default's hand-over: a task sent in a process where a worker thread waits
for work is given to that worker in the sending transaction, reserved and begun, so
the worker runs it without a claim. It must keep every guarantee of a claim: the
lease, redelivery, fencing, delays, the batch limit and the order of sending, and
nothing handed over from a rolled-back send.
"""
from __future__ import annotations

import threading
import time

import pytest

import nbqueue
from nbqueue import Signature, states
from nbqueue.broker import Outgoing
from nbqueue.clock import ManualClock
from nbqueue.drivers.sqlite import broker as sqlite_broker
from nbqueue.drivers.sqlite.broker import IDLE
from nbqueue.testing import wait_for
from nbqueue.wakeups import WAKEUPS


def idle_reservers(app) -> int:
    return IDLE.idle(app.broker.path)


class Reserver(threading.Thread):
    """A reserve() with hand-over in a thread of its own, as a worker's executor runs it."""

    def __init__(self, broker, queue, timeout=5.0, lease=10.0):
        super().__init__(daemon=True)
        self.broker, self.queue, self.timeout, self.lease = broker, queue, timeout, lease
        self.claimed: list = []
        self.got = None

    def run(self):
        self.got = self.broker.claim([self.queue], timeout=self.timeout, lease=self.lease, limit=4, handoff=True,
                                       on_claim=lambda ds: self.claimed.extend(ds))


def publish_to_idle_reserver(app, out: Outgoing, **reserver_options) -> Reserver:
    """Start a reserver, wait until it idles, publish ``out``, and return it once it returned."""
    reserver = Reserver(app.broker, out.queue, **reserver_options)
    reserver.start()
    wait_for(lambda: idle_reservers(app) == 1)
    app.broker.publish(out)
    reserver.join(5)
    return reserver


@pytest.fixture
def app(tmp_path):
    app = nbqueue.App(f"sqlite:///{tmp_path}/nbqueue.db")
    yield app
    app.close()


def test_a_task_sent_while_a_worker_of_this_process_waits_is_handed_over_and_runs_without_a_claim(app, monkeypatch):
    app.register_task("double", lambda x: 2 * x)
    claims = []
    real_claim = app.broker._claim

    def counting_claim(*args, **kwargs):
        got = real_claim(*args, **kwargs)
        claims.extend(got)
        return got

    monkeypatch.setattr(app.broker, "_claim", counting_claim)
    worker = app.start_worker(concurrency=1)
    try:
        for i in range(10):
            wait_for(lambda: idle_reservers(app) == 1)
            r = app.send_task(Signature("double", args=[i]))
            assert r.get(timeout=10) == 2 * i
            assert r.info()["worker"] == worker.name
    finally:
        worker.stop()
    assert claims == []                    # every one was handed over
    assert all(row["ready"] == row["in_flight"] == 0 for row in app.broker.stats())


def test_a_hand_over_is_recorded_as_received_in_the_sending_transaction(app):
    q = "handoff"
    reserver = publish_to_idle_reserver(app, Outgoing(id="m1", body="{}", queue=q))
    [d] = reserver.got
    assert d.message_id == "m1" and d.attempt == 1 and reserver.claimed == [d]   # on_claim ran for it
    assert app.broker.stats() == [{"queue": q, "ready": 0, "delayed": 0, "in_flight": 1, "dead": 0}]
    assert app.broker.ack(d) is True


def test_a_rolled_back_send_hands_nothing_over(app):
    """The hand-over is part of the sending transaction: when that fails after the
    hand-over (here the reserver's own begin raises in it), nothing was stored and the
    reserver gets nothing."""
    q = "handoff"

    def failing_begin(deliveries):
        raise RuntimeError("the send fails after the hand-over")

    got = []
    reserver = threading.Thread(
        target=lambda: got.extend(app.broker.claim([q], timeout=1.0, handoff=True, on_claim=failing_begin))
    )
    reserver.start()
    wait_for(lambda: idle_reservers(app) == 1)
    message, record, out = app.prepare(Signature("double", args=[1], queue=q))
    with pytest.raises(RuntimeError):
        app.publish([record], [out])
    reserver.join(5)
    assert got == []
    assert app.broker.stats() == [] and app.backend.get(out.id) is None     # neither message nor record stored


def test_a_send_inside_a_transaction_of_the_caller_is_not_handed_over(app):
    """A caller's transaction may run long: its messages go to the queue, not to a worker
    thread that would wait for the commit."""
    q = "handoff"
    reserver = Reserver(app.broker, q, timeout=0.5)
    reserver.start()
    wait_for(lambda: idle_reservers(app) == 1)
    with app.transaction():
        message, record, out = app.prepare(Signature("double", args=[1], queue=q))
        app.publish([record], [out])
        assert idle_reservers(app) == 1
    reserver.join(5)
    [d] = reserver.got + app.broker.reserve([q], timeout=1)     # claimed after the commit, by either
    assert d.message_id == out.id and reserver.claimed in ([], [d])


def test_a_reserver_handed_a_message_claims_nothing_more(tmp_path):
    """A reserve returns what was handed to it or what it claimed, never both: so it holds
    at most its limit, and a message handed over is not put behind messages sent after it
    (which it would run first, and which may run long). The clock stands still, so the
    messages sent after the hand-over are due for the reserver however early it looks."""
    app = nbqueue.App(f"sqlite:///{tmp_path}/nbqueue.db", clock=ManualClock())
    q = "handoff"
    reserver = Reserver(app.broker, q)
    with app.broker.store.write():      # the reserver reads the queue only once this commits
        reserver.start()
        wait_for(lambda: idle_reservers(app) == 1)
        app.broker.publish_many([Outgoing(id="first", body="{}", queue=q)], handoff=True)
        assert idle_reservers(app) == 0                                    # handed over
        app.broker.publish_many([Outgoing(id=f"then-{i}", body="{}", queue=q) for i in range(4)])
    reserver.join(10)
    assert [d.message_id for d in reserver.got] == ["first"]
    assert app.broker.stats() == [{"queue": q, "ready": 4, "delayed": 0, "in_flight": 1, "dead": 0}]
    assert [d.message_id for d in app.broker.reserve([q], limit=4)] == [f"then-{i}" for i in range(4)]
    app.close()


def test_a_reserver_handed_a_message_while_no_thread_waits_lingers_and_later_sends_go_to_the_queue(app, monkeypatch):
    """Handed a message while no thread of this process waits for a result, a reserver waits
    a moment before it returns it: the sender's next messages go to the queue meanwhile (its
    worker claims them as one batch as it commits the first), not to another idle reserver,
    which they do not wake either. A thread beginning to wait for a result ends the wait;
    then the other reserver is woken for what was queued meanwhile."""
    monkeypatch.setattr(sqlite_broker, "HANDOVER_LINGER", 600.0)
    q = "handoff"
    app.broker.poll_interval = 600.0            # found only when woken, not by polling
    looked, next_due = [], app.broker.next_due

    def looking(queues):                        # a reserver found nothing and is about to wait
        looked.append(threading.current_thread())
        return next_due(queues)

    monkeypatch.setattr(app.broker, "next_due", looking)
    first, second = Reserver(app.broker, q, timeout=60), Reserver(app.broker, q, timeout=60)
    first.start()
    wait_for(lambda: first in looked)
    second.start()
    wait_for(lambda: second in looked)
    app.broker.publish_many([Outgoing(id="m1", body="{}", queue=q)], handoff=True)     # to the one idle last
    for i in (2, 3):
        app.broker.publish_many([Outgoing(id=f"m{i}", body="{}", queue=q)], handoff=True)
    assert app.broker.stats() == [{"queue": q, "ready": 2, "delayed": 0, "in_flight": 1, "dead": 0}]
    time.sleep(0.2)
    assert first.is_alive() and second.is_alive() and idle_reservers(app) == 1
    assert app.backend.wait(["not-sent"], timeout=1) is False     # a wait for a result
    second.join(10)
    first.join(10)
    assert [d.message_id for d in second.got] == ["m1"]
    assert [d.message_id for d in first.got] == ["m2", "m3"]


def test_a_reserver_handed_a_message_while_a_thread_waits_for_a_result_returns_it_at_once(app, monkeypatch):
    monkeypatch.setattr(sqlite_broker, "HANDOVER_LINGER", 600.0)
    q = "handoff"
    waiting = threading.Thread(target=lambda: app.backend.wait(["not-sent"], timeout=30), daemon=True)
    waiting.start()
    wait_for(lambda: WAKEUPS._waiters.get(app.backend._wake_key))
    reserver = publish_to_idle_reserver(app, Outgoing(id="m1", body="{}", queue=q), timeout=60)
    assert not reserver.is_alive() and [d.message_id for d in reserver.got] == ["m1"]


def test_a_loop_of_round_trips_and_a_group_s_wait_do_not_wait_for_a_lingering_worker(app, monkeypatch):
    """Each send of a round trip (send, then wait for its result) is handed to the idle worker
    thread, which returns it at once as the sender begins to wait (or waits already)."""
    monkeypatch.setattr(sqlite_broker, "HANDOVER_LINGER", 600.0)
    app.register_task("double", lambda x: 2 * x)
    worker = app.start_worker(concurrency=2)
    try:
        for i in range(10):
            wait_for(lambda: idle_reservers(app) == 2)
            assert app.send_task(Signature("double", args=[i])).get(timeout=30) == 2 * i
        wait_for(lambda: idle_reservers(app) == 2)
        group = app.send(nbqueue.group(Signature("double", args=[i]) for i in range(6)))
        assert group.get(timeout=30) == [0, 2, 4, 6, 8, 10]
    finally:
        worker.stop()


def test_work_left_for_a_waiter_runs_once_in_the_next_thread_that_waits_and_is_refused_while_one_waits():
    key = ("before-wait-test", time.monotonic())
    ran: list = []
    assert WAKEUPS.before_wait(key, lambda: ran.append("first"))
    withdrawn = lambda: ran.append("withdrawn")     # noqa: E731
    assert WAKEUPS.before_wait(key, withdrawn)
    WAKEUPS.cancel_before_wait(key, withdrawn)
    WAKEUPS.wait(key, WAKEUPS.version(key), 0)
    WAKEUPS.wait(key, WAKEUPS.version(key), 0)
    assert ran == ["first"]
    with WAKEUPS.watching(key, "some-id"):
        assert not WAKEUPS.before_wait(key, lambda: ran.append("refused"))
    assert WAKEUPS.before_wait(key, lambda: ran.append("later"))
    with WAKEUPS.watching(key, "some-id"):
        assert ran == ["first", "later"]


def test_a_handed_over_message_whose_worker_died_is_delivered_again_after_its_lease(tmp_path):
    clock = ManualClock()
    app = nbqueue.App(f"sqlite:///{tmp_path}/nbqueue.db", clock=clock)
    q = "handoff"
    # handed over, then its worker dies
    [abandoned] = publish_to_idle_reserver(app, Outgoing(id="m1", body="{}", queue=q), lease=10).got
    assert app.broker.reserve([q], timeout=0, lease=10) == []
    clock.advance(10.5)
    [again] = app.broker.reserve([q], timeout=0, lease=10)
    assert again.message_id == "m1" and again.attempt == 2
    assert app.broker.ack(abandoned) is False         # the dead worker's delivery is stale
    assert app.broker.ack(again) is True
    app.close()


def test_a_delayed_message_is_not_handed_over_before_it_is_due(tmp_path):
    clock = ManualClock()
    app = nbqueue.App(f"sqlite:///{tmp_path}/nbqueue.db", clock=clock)
    q = "handoff"
    reserver = publish_to_idle_reserver(
        app, Outgoing(id="later", body="{}", queue=q, eta=clock.time() + 60), timeout=0.5
    )
    assert reserver.got == []
    assert app.broker.stats()[0]["delayed"] == 1
    clock.advance(61)
    [d] = app.broker.reserve([q], timeout=0)
    assert d.message_id == "later"
    app.close()


def test_a_worker_fed_by_hand_overs_still_takes_messages_from_other_processes(app, tmp_path):
    """Between hand-overs a worker skips reading the file, but not for longer than its poll
    interval: a message another process inserted straight into the file is still run."""
    import sqlite3

    app.register_task("double", lambda x: 2 * x)
    worker = app.start_worker(concurrency=1)
    try:
        wait_for(lambda: idle_reservers(app) == 1)
        assert app.send_task(Signature("double", args=[1])).get(timeout=10) == 2
        # another process's send: a record and a message written by a connection of its own
        other = nbqueue.App(f"sqlite:///{tmp_path}/nbqueue.db")
        message, record, out = other.prepare(Signature("double", args=[21]))
        conn = sqlite3.connect(app.broker.path, isolation_level=None)
        conn.execute(
            "INSERT INTO nbq_results(id, name, state, args, kwargs, queue, created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                record["id"],
                record["name"],
                states.PENDING,
                record["args"],
                record["kwargs"],
                record["queue"],
                time.time(),
            ),
        )
        conn.execute(
            "INSERT INTO nbq_messages(id, queue, priority, due, state, attempt, body, created) VALUES (?, ?, 0, ?, 0, "
            "0, ?, ?)",
            (out.id, out.queue, time.time(), out.body, time.time()),
        )
        conn.close()
        assert app.result(out.id).get(timeout=10) == 42
    finally:
        worker.stop()


def test_idle_worker_threads_fed_by_hand_overs_do_not_read_the_queue_between_tasks(tmp_path):
    """A hand-over wakes only the reserver it goes to, and a worker thread that found the
    queue empty does not query it again (to claim its next batch as it commits, or while it
    waits) until something is published or its poll interval passed: a loop of sends to an
    idle in-process worker costs no reads of the messages table per task."""
    app = nbqueue.App(f"sqlite:///{tmp_path}/nbqueue.db", poll_interval=60)
    app.register_task("double", lambda x: 2 * x)
    reads: list[str] = []
    worker = app.start_worker(concurrency=4)
    try:
        wait_for(lambda: idle_reservers(app) == 4)
        assert app.send_task(Signature("double", args=[0])).get(timeout=10) == 0
        wait_for(lambda: idle_reservers(app) == 4)
        with app.broker.store._lock:
            app.broker.store.conn.set_trace_callback(
                lambda sql: reads.append(sql) if sql.lstrip().startswith("SELECT") and "nbq_messages" in sql else None
            )
        for i in range(30):
            wait_for(lambda: idle_reservers(app) == 4)      # every thread back to waiting, however slow the machine
            assert app.send_task(Signature("double", args=[i])).get(timeout=10) == 2 * i
    finally:
        worker.stop()
        app.close()
    assert len(reads) < 10, reads


def test_a_message_published_while_reservers_idle_wakes_one_of_them_per_set_of_queues(app):
    """New messages wake one idle reserver per set of queues (it wakes the next if it claims a
    full batch), not every one; ``wake()`` (a worker stopping) wakes them all."""
    from nbqueue.drivers.sqlite.broker import Slot

    slots = [Slot(["a"], 4, 10.0), Slot(["a"], 4, 10.0), Slot(["a"], 4, 10.0), Slot(["b"], 4, 10.0)]
    for slot in slots:
        IDLE.add(app.broker.path, slot)
    try:
        with app.transaction():                     # not handed over: a row to claim
            app.broker.publish(Outgoing(id="m1", body="{}", queue="a"))
            assert not any(slot.woken.is_set() for slot in slots)       # not before the commit
        assert [slot.woken.is_set() for slot in slots] == [True, False, False, True]
        app.broker.publish(Outgoing(id="m2", body="{}", queue="a"))       # the first is awake already
        assert [slot.woken.is_set() for slot in slots] == [True, True, False, True]
        for slot in slots:
            slot.woken.clear()
        # the first claimed a full batch: the next of its queues looks too
        IDLE.wake(app.broker.path, slots[0].queues, besides=slots[0])
        assert [slot.woken.is_set() for slot in slots] == [False, True, False, False]
        app.broker.wake()
        assert all(slot.woken.is_set() for slot in slots)
    finally:
        for slot in slots:
            IDLE.close(app.broker.path, slot)


def test_a_batch_claimed_in_the_last_commit_is_handed_back_when_the_worker_stops(app):
    """An executor claims its next batch in the commit of the last one; stopping then must
    hand that batch back unstarted (PENDING, ready at once), not leave it reserved."""
    app.register_task("nap", lambda i: time.sleep(0.02) or i)
    results = app.send_many([Signature("nap", args=[i]) for i in range(40)])
    worker = app.start_worker(concurrency=1, prefetch=2)
    wait_for(lambda: sum(r.ready() for r in results) >= 4)
    worker.stop()
    [row] = app.broker.stats()
    assert row["in_flight"] == 0 and row["ready"] == 40 - sum(r.ready() for r in results)
    assert {r.state for r in results} <= {states.SUCCESS, states.PENDING}
    app.start_worker(concurrency=2)
    assert [r.get(timeout=20) for r in results] == list(range(40))



def test_a_task_sent_before_long_ones_is_recorded_while_they_hold_both_threads(app):
    """Two idle threads; a failing task is sent, then a group of long ones that holds both
    threads: the failing task is handed to one thread, which does not also claim long ones
    to run before it; its FAILURE is recorded while the long ones still run. Several
    rounds, as the threads may wake between the two sends or not."""
    gate = threading.Event()

    @app.task(name="resize")
    def resize(width):
        gate.wait(120)              # longer than any wait below: the test sets it
        return width

    @app.task(name="parse")
    def parse(path):
        raise ValueError(f"{path} has no total line")

    app.start_worker(concurrency=2, prefetch=4)
    for n in range(6):
        gate.clear()
        wait_for(lambda: idle_reservers(app) == 2, timeout=30, message="both threads idle")
        failed = app.send_task(Signature("parse", args=[f"{n}.pdf"]))
        group = app.send(nbqueue.group(Signature("resize", args=[w]) for w in (640, 800, 1024, 1280)))
        try:
            wait_for(lambda: failed.state == states.FAILURE, timeout=60, message=f"round {n}: FAILURE recorded")
            with pytest.raises(nbqueue.TaskFailed, match=f"{n}.pdf has no total line"):
                failed.get(timeout=5)
            assert not gate.is_set() and not group.ready()
        finally:
            gate.set()
        assert group.get(timeout=60) == [640, 800, 1024, 1280]


# -- query plans -----------------------------------------------------------------------------------

def test_no_statement_of_a_task_s_life_scans_a_whole_table(tmp_path):
    """Sending, claiming, running, acknowledging and waiting, for single tasks, retries,
    a chain and a chord: every statement finds its rows through an index, so a deep
    queue or a long history does not slow each task down."""
    app = nbqueue.App(f"sqlite:///{tmp_path / 'plans.db'}", default_queue="q")
    app.register_task("add", lambda x, y: x + y)
    app.register_task("total", lambda values: sum(values))
    flaky_runs = []

    @app.task(name="flaky")
    def flaky():
        flaky_runs.append(1)
        if len(flaky_runs) < 2:
            raise ValueError("first time")
        return "ok"

    statements: list[str] = []
    # from the worker's start on: start_worker reads status() once (queue depths: a pass
    # over the messages), a cost of starting a worker, not of each task
    worker = app.start_worker(concurrency=2)
    app.broker.store.conn.set_trace_callback(statements.append)
    try:
        assert [r.get(timeout=10) for r in app.send_many([Signature("add", args=[i, i]) for i in range(20)])] == [
            2 * i for i in range(20)
        ]
        assert app.send_task(Signature("flaky", retry_count=1)).get(timeout=30) == "ok"
        assert (
            app.send_chain(nbqueue.chain(Signature("add", args=[1, 1]), Signature("add", args=[2]))).get(timeout=10)
            == 4
        )
        chord = nbqueue.chord(nbqueue.group(*[Signature("add", args=[i, 0]) for i in range(10)]), Signature("total"))
        assert app.send_chord(chord).get(timeout=10) == 45
    finally:
        worker.stop()
        app.broker.store.conn.set_trace_callback(None)
    plans = {}
    for sql in set(statements):
        if sql.lstrip().split(None, 1)[0].upper() in ("SELECT", "UPDATE", "DELETE", "INSERT", "WITH"):
            plans[sql] = [row[3] for row in app.broker.store.read("EXPLAIN QUERY PLAN " + sql)]
    assert plans
    scans = {sql: plan for sql, plan in plans.items()
             if any(step.startswith("SCAN") and "CONSTANT" not in step for step in plan)}
    # expiry sweeps of the small key-value table and reads of the reservers' table (a row
    # per process that waits for wake-ups) are the only full passes on the way
    scans = {sql: plan for sql, plan in scans.items()
             if "FROM nbq_kv WHERE expires" not in sql and "FROM nbq_reservers" not in sql}
    assert scans == {}


#: the schema of a file written before records were listed by rowid (it had a created_at index)
_EARLIER_SCHEMA = """
CREATE TABLE "nbq_results" ("id" TEXT PRIMARY KEY, "name" TEXT, "state" TEXT, "args" TEXT, "kwargs" TEXT,
    "result" TEXT, "error" TEXT, "exc_type" TEXT, "traceback" TEXT, "retries" INTEGER DEFAULT 0, "queue" TEXT,
    "worker" TEXT, "token" INTEGER DEFAULT 0, "group_id" TEXT, "parent_id" TEXT, "created_at" REAL,
    "started_at" REAL, "finished_at" REAL, "expires_at" REAL, "output" TEXT, "meta" TEXT);
CREATE INDEX nbq_results_created ON nbq_results(created_at);
CREATE INDEX nbq_results_group ON nbq_results(group_id) WHERE group_id IS NOT NULL;
CREATE INDEX nbq_results_expires ON nbq_results(expires_at) WHERE expires_at IS NOT NULL;
CREATE TABLE nbq_groups (group_id TEXT PRIMARY KEY, total INTEGER, done INTEGER, chord_claimed INTEGER, meta TEXT,
    created_at FLOAT) WITHOUT ROWID;
CREATE TABLE nbq_group_members (group_id TEXT, member_id TEXT, idx INTEGER, done INTEGER,
    PRIMARY KEY (group_id, member_id)) WITHOUT ROWID;
CREATE TABLE "nbq_workers" ("worker_id" TEXT PRIMARY KEY, "info" TEXT, "last_seen" REAL, "expires" REAL);
CREATE TABLE nbq_kv (key TEXT PRIMARY KEY, value TEXT, expires FLOAT) WITHOUT ROWID;
CREATE INDEX nbq_kv_expires ON nbq_kv(expires) WHERE expires IS NOT NULL;
CREATE TABLE "nbq_messages" ("seq" INTEGER PRIMARY KEY, "id" TEXT, "queue" TEXT, "priority" INTEGER, "due" REAL,
    "state" INTEGER, "attempt" INTEGER, "body" TEXT, "reason" TEXT, "created" REAL,
    "lapses" INTEGER NOT NULL DEFAULT 0);
CREATE UNIQUE INDEX nbq_messages_id ON nbq_messages(id);
CREATE INDEX nbq_messages_claim ON nbq_messages(queue, priority DESC, due) WHERE state < 2;
"""


def test_a_file_with_the_earlier_schema_opens_drops_its_created_at_index_and_keeps_working(tmp_path):
    """A file written with the created_at index: opened, the index is gone (a send writes
    one page less), what it held is listed and run, and new tasks are listed newest first."""
    import sqlite3

    path = tmp_path / "earlier.db"
    maker = nbqueue.App(f"sqlite:///{tmp_path / 'maker.db'}", default_queue="q")
    old = [maker.prepare(Signature("double", args=[i])) for i in range(3)]
    maker.close()
    conn = sqlite3.connect(path, isolation_level=None)
    conn.executescript(_EARLIER_SCHEMA)
    for _, record, out in old:
        conn.execute(
            "INSERT INTO nbq_results(id, name, state, args, kwargs, queue, created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (record["id"], record["name"], states.PENDING, record["args"], record["kwargs"], record["queue"],
             record["created_at"]),
        )
        conn.execute(
            "INSERT INTO nbq_messages(id, queue, priority, due, state, attempt, body, created) "
            "VALUES (?, ?, 0, ?, 0, 0, ?, ?)",
            (out.id, out.queue, time.time(), out.body, time.time()),
        )
    conn.close()

    app = nbqueue.App(f"sqlite:///{path}", default_queue="q")
    try:
        app.register_task("double", lambda x: 2 * x)
        indexes = {name for (name,) in app.broker.store.read("SELECT name FROM sqlite_master WHERE type = 'index'")}
        assert "nbq_results_created" not in indexes
        assert {"nbq_messages_id", "nbq_messages_claim", "nbq_results_expires"} <= indexes
        assert [r["id"] for r in app.backend.list()] == [o.id for _, _, o in reversed(old)]
        new = [app.send_task(Signature("double", args=[10 + i])) for i in range(3)]
        newest = [r["id"] for r in app.find_tasks(limit=4)]
        assert newest == [r.id for r in reversed(new)] + [old[-1][2].id]
        worker = app.start_worker(concurrency=2)
        try:
            assert [app.result(o.id).get(timeout=10) for _, _, o in old] == [0, 2, 4]
            assert [r.get(timeout=10) for r in new] == [20, 22, 24]
        finally:
            worker.stop()
        assert app.count_tasks() == {(states.SUCCESS, "double"): 6}
    finally:
        app.close()


# -- write work of several threads in one transaction (SQLiteStore.combine) ------------------------------------------

def combined_while_held(store, works: list) -> tuple[list, list[str]]:
    """Run each of ``works`` through ``store.combine`` in a thread of its own while this thread
    holds the store in a transaction, so that all of them wait and are run together once it
    commits: the outcome per work (its result or the exception raised), and the statements
    after the holder's."""
    outcomes: list = [None] * len(works)
    statements: list[str] = []

    def run(i: int) -> None:
        try:
            outcomes[i] = store.combine(works[i])[0]
        except Exception as exc:
            outcomes[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(works))]
    with store.write():
        for t in threads:
            t.start()
        wait_for(lambda: len(store._jobs) == len(works))
        store.conn.set_trace_callback(statements.append)
    for t in threads:
        t.join(10)
    store.conn.set_trace_callback(None)
    return outcomes, statements


def test_finishes_of_threads_waiting_for_the_store_are_committed_in_one_transaction(app):
    store = app.broker.store
    store.execute("CREATE TABLE t (k TEXT PRIMARY KEY)")

    def insert(key):
        return lambda conn: conn.execute("INSERT INTO t VALUES (?)", (key,)).rowcount

    outcomes, statements = combined_while_held(store, [insert("a"), insert("b"), insert("c")])
    assert outcomes == [1, 1, 1]
    assert [s for s in statements if s in ("BEGIN IMMEDIATE", "COMMIT")] == ["COMMIT", "BEGIN IMMEDIATE", "COMMIT"]
    assert sorted(k for (k,) in store.read("SELECT k FROM t")) == ["a", "b", "c"]


def test_a_combined_work_that_fails_is_undone_alone_and_raises_in_its_own_thread(app):
    store = app.broker.store
    store.execute("CREATE TABLE t (k TEXT PRIMARY KEY)")
    seen: list = []

    def insert(key, fail=False):
        def work(conn):
            conn.execute("INSERT INTO t VALUES (?)", (key,))
            store.on_commit(lambda: seen.append(("committed", key)))
            store.on_rollback(lambda: seen.append(("undone", key)))
            if fail:
                raise ValueError(key)
            return key
        return work

    outcomes, _ = combined_while_held(store, [insert("a"), insert("b", fail=True), insert("c")])
    assert outcomes[0] == "a" and outcomes[2] == "c"
    assert isinstance(outcomes[1], ValueError) and outcomes[1].args == ("b",)
    assert sorted(k for (k,) in store.read("SELECT k FROM t")) == ["a", "c"]
    assert sorted(seen) == [("committed", "a"), ("committed", "c"), ("undone", "b")]


def test_a_combined_work_alone_that_fails_rolls_back_and_raises(app):
    store = app.broker.store
    store.execute("CREATE TABLE t (k TEXT PRIMARY KEY)")
    undone: list = []

    def work(conn):
        conn.execute("INSERT INTO t VALUES ('a')")
        store.on_rollback(lambda: undone.append("a"))
        raise ValueError("a")

    with pytest.raises(ValueError):
        store.combine(work)
    assert undone == ["a"] and store.read("SELECT k FROM t") == []
    assert store.combine(lambda conn: conn.execute("INSERT INTO t VALUES ('b')").rowcount) == (1, None)
    assert store.read("SELECT k FROM t") == [("b",)]


def test_the_next_batches_of_finishes_committed_together_are_claimed_at_once_each_within_its_limit(app):
    from nbqueue.engine import NextClaim

    app.register_task("double", lambda x: 2 * x)
    sent = [app.send_task(Signature("double", args=[i])) for i in range(10)]
    store = app.broker.store
    finished: list = [None, None]

    def finish(i: int) -> None:
        finished[i] = app.engine.finish([], then_claim=NextClaim([app.default_queue], limit=3, lease=30.0,
                                                                 worker="w"))

    claims: list[str] = []
    threads = [threading.Thread(target=finish, args=(i,)) for i in range(2)]
    with store.write():
        for t in threads:
            t.start()
        wait_for(lambda: len(store._jobs) == 2)
        store.conn.set_trace_callback(lambda sql: claims.append(sql) if "SET state = 1" in sql else None)
    for t in threads:
        t.join(10)
    store.conn.set_trace_callback(None)
    assert len(claims) == 1                                           # one claim for both
    got = [[c.message.id for c in f.claimed] for f in finished]
    assert [len(ids) for ids in got] == [3, 3] and not set(got[0]) & set(got[1])
    for f in finished:
        for c in f.claimed:
            assert c.begun and c.token == 1
            assert app.backend.get(c.message.id)["state"] == states.RECEIVED
    assert app.broker.stats()[0]["ready"] == 4
    assert sorted(got[0] + got[1]) == sorted(r.id for r in sent[:6])
