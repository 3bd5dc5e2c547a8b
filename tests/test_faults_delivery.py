"""Delivery faults: a task that kills its worker, a message that cannot be decoded, and a
task whose lease lapses while it holds the GIL.

- A message delivered ``max_deliveries`` times (default 5) without finishing is
  dead-lettered with "delivered N times without finishing" and its record fails; its
  batch-mates run. With real ``nbqueue worker`` processes that die (``os._exit``) and
  with in-process workers whose deaths are simulated, on every broker.
- A message whose body is not UTF-8 (or not JSON, or lacks fields) is dead-lettered
  with the reason, its record fails, and the rest of its batch runs.
- A task holding the GIL longer than its lease is not begun again by another worker
  while its attempt is alive; it completes once.
"""
from __future__ import annotations

import os
import signal
import socket
import sqlite3
import threading
import time

import pytest
from test_processes import Workers, side_rows

import nbqueue
from nbqueue import Signature, states
from nbqueue.broker import Outgoing
from nbqueue.errors import ConfigurationError, TaskFailed
from nbqueue.testing import dead_worker_name, wait_for

#: the App kinds of tests/conftest.py, and SQS (moto; results in SQLite)
KINDS_AND_SQS = ["sqlite", "memory", "redis", "amqp", "sqs"]


@pytest.fixture
def workers(tmp_path):
    w = Workers(tmp_path)
    yield w
    w.cleanup()


def publish_signatures(app, sigs) -> None:
    """Publish in one go, so the first worker claims them in one batch, in this order."""
    records, outs = [], []
    for sig in sigs:
        _, record, out = app.prepare(sig)
        records.append(record)
        outs.append(out)
    app.publish(records, outs)


def queue_stats(app) -> dict:
    return next((r for r in app.broker.stats() if r["queue"] == app.default_queue),
                {"ready": 0, "delayed": 0, "in_flight": 0, "dead": 0})


def settled(app) -> bool:
    s = queue_stats(app)
    return s["ready"] == s["delayed"] == s["in_flight"] == 0


# -- a task that kills its worker: bounded redelivery -----------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("app_kind", ["sqlite", "redis", "amqp", "sqs"])
def test_task_that_kills_its_worker_process_is_dead_lettered_after_five_deliveries_and_its_batch_mates_run(
    app_factory, workers
):
    app = app_factory(visibility_timeout=1)
    mates = [f"mate{i}" for i in range(3)]
    publish_signatures(
        app, [Signature("die", args=["poison"], id="poison")] + [Signature("note", args=[m], id=m) for m in mates]
    )
    started: list = []

    def done():
        if not started or started[-1].poll() is not None:  # a worker died: start the next, as a supervisor would
            assert len(started) < 8, f"{len(started)} workers died; the poison message was never dead-lettered"
            started.append(workers.start(app, "--concurrency", "1", "--prefetch", "4"))
        return (app.result("poison").state == states.FAILURE
                and all(app.result(m).state == states.SUCCESS for m in mates))

    wait_for(done, timeout=120, interval=0.1, message="poison dead-lettered and batch-mates done")
    attempts = [key for (key,) in side_rows(workers.side_db, "SELECT key FROM attempts ORDER BY seq")]
    assert attempts.count("poison") == 5
    assert sorted(k for k in attempts if k != "poison") == mates          # each batch-mate ran once
    assert [p.returncode for p in started[:-1]] == [1] * 5                # five workers died, the sixth lives on
    with pytest.raises(TaskFailed, match="delivered 5 times without finishing") as failed:
        app.result("poison").get(timeout=5)
    assert failed.value.exc_type == "DeliveryLimitExceeded"
    dead = wait_for(lambda: [d for d in app.broker.dead_letters(app.default_queue) if d["id"] == "poison"])
    assert "delivered 5 times without finishing" in dead[0]["reason"]
    assert [app.result(m).get(timeout=5) for m in mates] == mates
    last = started[-1]
    assert last.poll() is None
    last.send_signal(signal.SIGTERM)
    assert last.wait(30) == 0


def test_app_option_max_deliveries_reaches_the_broker_and_is_checked(tmp_path):
    app = nbqueue.App(f"sqlite:///{tmp_path}/a.db", max_deliveries=2)
    assert app.broker.max_deliveries == 2
    assert nbqueue.App(f"sqlite:///{tmp_path}/a.db").broker.max_deliveries == 5
    with pytest.raises(ConfigurationError, match="max_deliveries"):
        nbqueue.App(f"sqlite:///{tmp_path}/a.db", max_deliveries=0)
    assert (
        nbqueue.App.from_env(
            {"NBQUEUE_BROKER": f"sqlite:///{tmp_path}/a.db", "NBQUEUE_MAX_DELIVERIES": "3"}
        ).broker.max_deliveries
        == 3
    )


# Not on SQS: a standard queue may hand one message to two consumers at once, and an abandoned
# thread of this simulation then finishes the task; SQS's counting is covered by the contract
# suite and tests/test_stores.py, and its dying worker processes by the test above.
@pytest.mark.parametrize("app_kind", ["sqlite", "memory", "redis", "amqp"])
def test_message_delivered_max_deliveries_times_without_finishing_is_dead_lettered_in_process(app_factory):
    """The same with in-process workers, on every broker. A "dying" worker (an App of its own,
    named as a process that has ended, stepped in a thread) runs the poison task, which
    never returns; the worker is then abandoned: its App is closed (RabbitMQ redelivers at
    once) and its leases run out. Tasks reserved with the poison run on later workers."""
    ran: list = []
    release = threading.Event()
    entered = threading.Event()

    def poison():
        ran.append("poison")
        entered.set()
        release.wait(60)                                # the worker "died" here

    def with_tasks(app):
        app.register_task("poison", poison)
        app.register_task("mate", lambda x: ran.append(x) or x)
        return app

    app = with_tasks(app_factory(max_deliveries=3))
    publish_signatures(
        app, [app.signature("poison", id="p")] + [app.signature("mate", args=[i], id=f"m{i}") for i in range(3)]
    )
    threads = []
    try:
        for death in range(3):
            entered.clear()
            dying = with_tasks(app_factory(visibility_timeout=0.3, max_deliveries=3))
            worker = dying.worker(name=dead_worker_name(f"gone{death}"), prefetch=4)

            def run(worker=worker):
                while not entered.is_set() and not release.is_set():
                    if not worker.step(limit=4):
                        time.sleep(0.02)

            threads.append(threading.Thread(target=run, daemon=True))
            threads[-1].start()
            assert entered.wait(30), f"the poison task did not run a {death + 1}th time"
            dying.close()
        healthy = app.worker(prefetch=4)

        def done():
            healthy.step()
            return settled(app) and all(app.result(f"m{i}").state == states.SUCCESS for i in range(3))

        wait_for(done, timeout=30, message="poison dead-lettered, mates done")
        runs = list(ran)                                # (the "dead" workers must not go on below)
    finally:
        release.set()
        for t in threads:
            t.join(10)
    assert runs.count("poison") == 3 and sorted(x for x in runs if x != "poison") == [0, 1, 2]
    rec = app.result("p").info()
    assert (rec["state"], rec["exc_type"]) == (states.FAILURE, "DeliveryLimitExceeded")
    assert "delivered 3 times without finishing" in rec["error"]
    dead = wait_for(lambda: [d for d in app.broker.dead_letters(app.default_queue) if d["id"] == "p"])
    assert "delivered 3 times without finishing" in dead[0]["reason"]


def _reserve_some(worker):
    got = []

    def reserve():
        got[:] = [worker.reserve(0.2, 4)]
        return got[0]

    wait_for(reserve, timeout=15, message="a delivery")
    return got[0]


# -- undecodable and malformed messages ---------------------------------------------------------------


def inject_raw(app, kind: str, message_id: str, raw: bytes) -> None:
    """Put a message whose body is these exact bytes on the App's default queue."""
    queue = app.default_queue
    if kind == "sqlite":
        conn = sqlite3.connect(app.broker.path, isolation_level=None)
        now = time.time()
        conn.execute("INSERT INTO nbq_messages(id, queue, priority, due, state, attempt, body, created) "
                     "VALUES (?, ?, 0, ?, 0, 0, CAST(? AS TEXT), ?)", (message_id, queue, now, raw, now))
        conn.close()
    elif kind in ("memory", "redis"):
        import redis

        from nbqueue.drivers.redis.client import _client_url, fake_server

        app.broker.publish(Outgoing(id=message_id, body="{}", queue=queue))
        if kind == "memory":
            import fakeredis

            client = fakeredis.FakeRedis(server=fake_server(app.broker.url.split("://", 1)[1]))
        else:
            client = redis.Redis.from_url(_client_url(app.broker.url))
        client.hset(f"{app.broker.prefix}msg:{message_id}", "body", raw)
        client.close()
    else:
        import pika

        app.broker._with_publisher(lambda pub: pub.declare_work_queue(queue), "declare")
        conn = pika.BlockingConnection(pika.URLParameters(app.broker.url))
        conn.channel().basic_publish("", queue, raw, pika.BasicProperties(message_id=message_id, delivery_mode=2))
        conn.close()


def test_undecodable_and_malformed_messages_are_dead_lettered_with_a_reason_and_their_batch_mates_run(app_factory):
    kind = app_factory.kind
    app = app_factory()

    @app.task(name="add")
    def add(x, y):
        return x + y

    # a task the user sent, whose message reaches the broker as bytes that are not UTF-8
    _, record, _ = app.prepare(app.signature("add", args=[1, 2], id="mangled"))
    app.backend.create([record])
    inject_raw(app, kind, "mangled", b'{"id": "mangled", "name": "add", "args": [1, 2], "kwargs": {"s": "caf\xe9"}}')
    app.broker.publish_many([Outgoing(id="notjson", body="{not json", queue=app.default_queue),
                             Outgoing(id="nofields", body='{"id": "nofields"}', queue=app.default_queue)])
    good = [add.delay(i, 1) for i in range(5)]
    worker = app.worker(prefetch=8)     # all eight in one batch
    wait_for(lambda: (worker.step(limit=8), settled(app))[1], timeout=20, message="queue settled")
    assert [r.get(timeout=10) for r in good] == [1, 2, 3, 4, 5]
    dead = {
        d["id"]: d
        for d in wait_for(
            lambda: len(app.broker.dead_letters(app.default_queue)) == 3 and app.broker.dead_letters(app.default_queue)
        )
    }
    assert "not valid UTF-8" in dead["mangled"]["reason"]
    assert "not valid JSON" in dead["notjson"]["reason"]
    assert "lacks required field" in dead["nofields"]["reason"]
    assert "caf" in dead["mangled"]["body"]                           # shown, with the bad byte replaced
    with pytest.raises(TaskFailed, match="not valid UTF-8") as failed:
        app.result("mangled").get(timeout=5)                          # the sender learns why, at once
    assert failed.value.exc_type == "MessageError"
    assert worker.step(limit=8) == 0


def test_undecodable_message_is_dead_lettered_by_a_running_worker(app_factory):
    """The started (threaded) worker: the message goes to the dead letters, later tasks run."""
    kind = app_factory.kind
    app = app_factory()

    @app.task(name="add")
    def add(x, y):
        return x + y

    inject_raw(app, kind, "raw", b"\xff\xfe\x00garbage")
    app.start_worker(concurrency=2)
    assert add.delay(2, 3).get(timeout=20) == 5
    dead = wait_for(lambda: [d for d in app.broker.dead_letters(app.default_queue) if d["id"] == "raw"], timeout=20)
    assert "not valid UTF-8" in dead[0]["reason"]


# -- a task holding the GIL past its lease ------------------------------------------------------------


def gil_loop_size(seconds: float) -> int:
    """n such that ``sum(range(n))`` (one C call, GIL held throughout) takes about ``seconds`` here."""
    n = 10_000_000
    best = min(_timed_sum(n) for _ in range(3))
    return int(n * seconds / max(best, 1e-4))


def _timed_sum(n: int) -> float:
    started = time.perf_counter()
    sum(range(n))
    return time.perf_counter() - started


@pytest.mark.parametrize("app_kind", ["sqlite", "redis", "sqs"])
def test_task_holding_the_gil_longer_than_its_lease_completes_once_on_two_worker_processes(app_factory, workers):
    """RabbitMQ has no lease timer (a delivery lasts as long as its connection): not affected."""
    app = app_factory(visibility_timeout=1)
    procs = [workers.start(app, "--concurrency", "2") for _ in range(2)]
    for proc in procs:
        workers.wait_serving(app, proc)
    n = gil_loop_size(4.0)     # past a lease of 1 s plus a claim's wait (Redis: up to 0.25 s here)
    r = app.send_task(Signature("hold_gil", args=[n, "gil"]))
    assert r.get(timeout=60) == n * (n - 1) // 2
    assert (
        len(side_rows(workers.side_db, "SELECT pid FROM attempts WHERE key = 'gil'")) == 1
    )  # begun once, never fenced out
    wait_for(lambda: settled(app), timeout=20, message="message acknowledged")
    for proc in procs:
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
    assert [proc.wait(30) for proc in procs] == [0, 0]


@pytest.mark.parametrize("app_kind", ["sqlite", "redis", "sqs"])
def test_task_holding_the_gil_longer_than_its_lease_completes_once_between_a_kernel_worker_and_a_worker_process(
    app_factory, workers
):
    """A notebook's own (threaded) worker and an ``nbqueue worker`` process share the queue;
    whichever takes the task stalls every thread of its process for about 4 s."""
    app = app_factory(visibility_timeout=1)
    here: list = []
    app.register_task("hold_gil", lambda n, key: here.append(key) or sum(range(n)))
    proc = workers.start(app, "--concurrency", "2")
    workers.wait_serving(app, proc)
    app.start_worker(concurrency=2)
    n = gil_loop_size(4.0)     # past a lease of 1 s plus a claim's wait (Redis: up to 0.25 s here)
    r = app.send_task(Signature("hold_gil", args=[n, "gil"]))
    assert r.get(timeout=60) == n * (n - 1) // 2
    there = side_rows(workers.side_db, "SELECT pid FROM attempts WHERE key = 'gil'")
    assert len(here) + len(there) == 1                                   # begun once, never fenced out
    wait_for(lambda: settled(app), timeout=20, message="message acknowledged")
    assert proc.poll() is None
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0


def _stalled_delivery(app_factory, register):
    """A worker of this process (an App of its own) reserves the task and begins it, then
    stalls, as a thread holding the GIL would: no heartbeat, no lease extension, until its
    lease has lapsed; on RabbitMQ (no lease timer) its connection is lost instead."""
    stalled_app = app_factory(visibility_timeout=0.5)
    register(stalled_app)
    stalled = stalled_app.worker()
    claims = _reserve_some(stalled)
    deliveries = [c.delivery for c in claims]
    if stalled_app.broker.capabilities.leases_expire:
        wait_for(lambda: stalled_app.clock.time() > deliveries[0].lease_until + 0.05, message="lease lapsed")
    else:
        stalled_app.broker.close()
    return stalled, claims


@pytest.mark.parametrize("app_kind", KINDS_AND_SQS)
def test_redelivered_task_whose_attempt_is_alive_is_put_back_and_the_attempt_is_recorded(app_factory):
    runs: list = []

    def register(app):
        app.register_task("count", lambda x: runs.append(x) or x)

    app = app_factory(visibility_timeout=0.5)
    register(app)
    r = app.send_task(app.signature("count", args=[7]))
    stalled, claims = _stalled_delivery(app_factory, register)
    other = app.worker()
    wait_for(lambda: (other.step(), queue_stats(app)["delayed"] == 1)[1], timeout=10, message="put back for a lease")
    assert runs == []                                   # its attempt is alive: not begun again
    assert r.state in (states.RECEIVED, states.STARTED)
    stalled.run_claims(claims)                          # the stalled attempt goes on and finishes
    assert runs == [7] and r.get(timeout=5) == 7
    wait_for(lambda: (other.step(), settled(app))[1], timeout=10, message="message acknowledged")
    assert runs == [7]


@pytest.mark.parametrize("app_kind", KINDS_AND_SQS)
def test_redelivered_task_whose_worker_died_runs_at_once(app_factory):
    runs: list = []

    def register(app):
        app.register_task("count", lambda x: runs.append(x) or x)

    app = app_factory(visibility_timeout=0.5)
    register(app)
    r = app.send_task(app.signature("count", args=[8]))
    gone_app = app_factory(visibility_timeout=0.5)
    register(gone_app)
    gone = gone_app.worker(name=dead_worker_name())
    _reserve_some(gone)                                 # begun by the claim, as its worker would, before it died
    gone_app.close()
    other = app.worker()
    wait_for(lambda: other.step() and runs, timeout=10, message="run again")
    assert runs == [8] and r.get(timeout=5) == 8


@pytest.mark.parametrize("app_kind", KINDS_AND_SQS)
def test_redelivered_task_that_a_heartbeating_worker_no_longer_holds_runs_at_once(app_factory):
    """A worker that heartbeats extends the leases of what it holds: one it let lapse is not
    its any more (unless its heartbeat lists it), so waiting for it would wait forever."""
    runs: list = []

    def register(app):
        app.register_task("count", lambda x: runs.append(x) or x)

    app = app_factory(visibility_timeout=0.5)
    register(app)
    r = app.send_task(app.signature("count", args=[9]))
    stalled, _ = _stalled_delivery(app_factory, register)
    other = app.worker()

    def step():
        app.backend.heartbeat(stalled.name, {"host": socket.gethostname(), "pid": os.getpid(), "holding": []}, ttl=30)
        return other.step() and runs

    wait_for(step, timeout=10, message="run again")
    assert runs == [9] and r.get(timeout=5) == 9
