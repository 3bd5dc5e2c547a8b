"""Faults of the worker's own making, each from one small input, on every broker:

- a bad option (``retry_backoff={"kind": "bogus"}``) is refused at send, naming it; one
  that arrives anyway, or any error in the worker's own bookkeeping, fails or
  dead-letters that one message with the reason instead of re-running it every lease;
- a result that cannot be encoded or stored ends FAILURE with a reason naming the result;
- anything a task raises (``class Stop(BaseException)``) is recorded and the worker
  carries on; a worker whose executor threads died stops reporting itself alive;
- one task id is run once per batch, even when its message was published twice;
- counters shared by executor threads are exact;
- tasks reserved with a long-running one do not wait for it while a thread is idle;
- every kind of outcome is recorded while a batch-mate still runs; tasks prefetched behind
  it on a busy thread show RECEIVED until it ends.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import signal
import subprocess
import sys
import threading

import pytest

import nbqueue
from nbqueue import Signature, states, workflow
from nbqueue.broker import Outgoing
from nbqueue.testing import wait_for

from conftest import cli_worker


def queue_counts(app, queue: str | None = None) -> dict:
    queue = queue or app.default_queue
    for row in app.broker.stats():
        if row["queue"] == queue:
            return {k: row[k] for k in ("ready", "delayed", "in_flight", "dead")}
    return {"ready": 0, "delayed": 0, "in_flight": 0, "dead": 0}


def settled(app) -> bool:
    """Nothing of the default queue is waiting or held any more."""
    counts = queue_counts(app)
    return counts["ready"] == counts["delayed"] == counts["in_flight"] == 0


def publish_as_is(app, message: dict) -> None:
    """Publish an envelope as a producer other than this version's send would (no checks)."""
    record = {
        "id": message["id"],
        "name": message["name"],
        "state": states.PENDING,
        "args": "[]",
        "kwargs": "{}",
        "queue": message["queue"],
        "group_id": None,
        "parent_id": None,
        "created_at": app.clock.time(),
        "meta": None,
    }
    app.publish([record], [app.outgoing(message)])


# -- 6: options are checked at send; the worker's own errors fail one message ----------------------------


def test_bogus_retry_backoff_is_refused_at_send_naming_the_option(app):
    runs = []

    @app.task(name="plain")
    def plain():
        runs.append(1)
        raise ValueError("x")

    with pytest.raises(ValueError, match=r"retry_backoff of task 'boom' is invalid: unknown back-off kind 'bogus'"):
        app.task(name="boom", retry_count=1, retry_backoff={"kind": "bogus"})(lambda: None)
    with pytest.raises(ValueError, match=r"retry_backoff of task 'plain' is invalid: unknown back-off kind 'bogus'"):
        plain.apply_async(retry_count=1, retry_backoff={"kind": "bogus"})
    with pytest.raises(ValueError, match="retry_backoff"):
        app.send(plain.s().set(retry_count=1, retry_backoff={"kind": "bogus"}))
    assert app.backend.list() == [] and settled(app)             # nothing recorded, nothing published


BAD_OPTIONS = [
    ({"retry_backoff": {"kind": "fixed", "bse": 1}}, ValueError, "retry_backoff .* unknown key"),
    ({"retry_backoff": {"kind": "exponential", "base": -1}}, ValueError, "retry_backoff .* base"),
    ({"retry_backoff": {"kind": "fixed", "jitter": "yes"}}, ValueError, "retry_backoff .* jitter"),
    ({"retry_backoff": "fibonacci"}, TypeError, "retry_backoff"),
    ({"retry_count": -1}, ValueError, "retry_count .* at least 0"),
    ({"retry_count": 1.5}, TypeError, "retry_count .* int"),
    ({"retry_timeout": float("nan")}, ValueError, "retry_timeout .* finite"),
    ({"retry_timeout": "5"}, TypeError, "retry_timeout .* number"),
    ({"time_limit": 0}, ValueError, "time_limit .* more than 0"),
    ({"time_limit": "5"}, TypeError, "time_limit .* number"),
    ({"priority": 10}, ValueError, "priority .* between 0 and 9"),
    ({"priority": "high"}, TypeError, "priority of task 't' must be an int, not str 'high'"),
    ({"priority": 5.7}, TypeError, "priority of task 't' must be an int, not float 5.7"),
    ({"priority": True}, TypeError, "priority of task 't' must be an int, not bool True"),
    ({"eta": "tomorrow"}, TypeError, "eta .* datetime or a Unix timestamp"),
    ({"eta": float("nan")}, ValueError, "eta .* finite"),
    ({"countdown": float("inf")}, ValueError, "countdown .* finite"),
    ({"queue": "a,b"}, ValueError, "queue .* comma"),
    ({"queue": ""}, ValueError, "queue .* non-empty"),
    ({"queue": 7}, TypeError, "queue .* string"),
    ({"queue": "amq.mine"}, ValueError, "queue .*amq\\."),
    ({"queue": "q" * 201}, ValueError, "queue .* at most 200 bytes"),
    ({"headers": {1: "x"}}, TypeError, "headers .* string keys"),
    ({"headers": ["x"]}, TypeError, "headers .* dict"),
    ({"immutable": "no"}, TypeError, "immutable"),
]


@pytest.mark.parametrize("options, error, pattern", BAD_OPTIONS, ids=[str(o) for o, _, _ in BAD_OPTIONS])
def test_every_option_is_checked_at_send_naming_it(tmp_path, qname, options, error, pattern):
    app = nbqueue.App(f"sqlite:///{tmp_path}/opts.db", default_queue=qname("opts"))
    try:
        app.register_task("t", lambda: None)
        with pytest.raises(error, match=pattern):
            app.send(app.signature("t", **options))
        with pytest.raises(error, match=pattern):                # also as a callback's option
            app.send(app.signature("t").link(app.signature("t", **options)))
        assert app.backend.list() == [] and app.broker.stats() == []
    finally:
        app.close()


BAD_QUEUES = [(o["queue"], e, p) for o, e, p in BAD_OPTIONS if "queue" in o]


@pytest.mark.parametrize("queue, error, pattern", BAD_QUEUES, ids=[repr(q)[:12] for q, _, _ in BAD_QUEUES])
def test_bad_default_queue_is_refused_at_app_construction_naming_the_argument(tmp_path, queue, error, pattern):
    with pytest.raises(error, match=r"default_queue" + pattern.removeprefix("queue")):
        nbqueue.App(f"sqlite:///{tmp_path}/dq.db", default_queue=queue)


def test_good_options_still_pass(tmp_path, qname):
    app = nbqueue.App(f"sqlite:///{tmp_path}/opts.db", default_queue=qname("opts"))
    try:
        app.register_task("t", lambda: None)
        app.send(
            app.signature(
                "t",
                retry_count=2,
                retry_timeout=1.5,
                time_limit=3,
                priority=9,
                countdown=-1,
                queue="q-1.x:y",
                retry_backoff=nbqueue.Backoff("exponential", base=0.5, max=10, jitter=True),
                headers={"k": [1]},
                eta=None,
            )
        )
        app.send(
            app.signature(
                "t", retry_backoff={"kind": "fixed", "base": 2}, eta=dt.datetime(2030, 1, 1, tzinfo=dt.timezone.utc)
            )
        )
        assert len(app.backend.list()) == 2
    finally:
        app.close()


def test_bogus_retry_backoff_that_arrives_anyway_fails_the_task_once_with_the_reason(app_factory):
    """An envelope from elsewhere (an older producer, a hand-written message) with
    ``retry_count=1, retry_backoff={"kind": "bogus"}``: the task fails, is recorded FAILURE
    with the reason, and is not run again."""
    app = app_factory(visibility_timeout=2)
    runs = []

    @app.task(name="boom")
    def boom():
        runs.append(1)
        raise ValueError("x")

    message, _, _ = app.prepare(boom.s())
    message.update(retry_count=1, retry_backoff={"kind": "bogus"})
    publish_as_is(app, message)
    app.start_worker(concurrency=1)
    r = app.result(message["id"])
    with pytest.raises(nbqueue.TaskFailed) as failed:
        r.get(timeout=30)
    assert failed.value.exc_type == "ValueError"
    assert (
        "x" in failed.value.message
        and "retry options are invalid" in failed.value.message
        and "bogus" in failed.value.message
    )
    wait_for(lambda: settled(app), message="message acknowledged")
    assert runs == [1] and r.state == states.FAILURE


def test_an_error_in_the_failure_path_fails_that_message_once_with_the_reason(app_factory, monkeypatch):
    """The worker's failure path itself breaks (here: publishing the error callbacks): the
    task is recorded FAILURE, its message dead-lettered with the reason, run once; the
    worker goes on with the next task."""
    app = app_factory(visibility_timeout=2)
    runs = []

    @app.task(name="bad")
    def bad():
        runs.append(1)
        raise ValueError("task error")

    app.register_task("good", lambda: "good")
    real_on_failure = workflow.on_failure

    def breaking_on_failure(app_, message, *args, **kwargs):
        if message.name == "bad":
            raise RuntimeError("error callback could not be published")
        return real_on_failure(app_, message, *args, **kwargs)

    monkeypatch.setattr(workflow, "on_failure", breaking_on_failure)
    r = bad.delay()
    good = app.send_task(app.signature("good"))
    app.start_worker(concurrency=1)
    assert good.get(timeout=30) == "good"
    wait_for(lambda: r.state == states.FAILURE, message="bad task recorded")
    wait_for(lambda: any(d["id"] == r.id for d in app.broker.dead_letters(app.default_queue)), message="dead letter")
    [dead] = [d for d in app.broker.dead_letters(app.default_queue) if d["id"] == r.id]
    assert "error callback could not be published" in dead["reason"]
    wait_for(lambda: settled(app), message="nothing held")
    assert runs == [1]


def test_an_error_before_the_task_runs_fails_that_message_once(app_factory, monkeypatch):
    """An unexpected error in the worker's processing of one message (here the check of
    whether it may run) dead-letters that message with the reason and records it FAILURE;
    it is not delivered again at every lease."""
    app = app_factory(visibility_timeout=2)
    app.register_task("victim", lambda: "ran")
    app.register_task("good", lambda: "good")
    from nbqueue.worker import Worker

    real_refusal = Worker._refusal
    calls = []

    def breaking_refusal(self, task, message):
        if message.name == "victim":
            calls.append(1)
            raise RuntimeError("bookkeeping broke")
        return real_refusal(self, task, message)

    monkeypatch.setattr(Worker, "_refusal", breaking_refusal)
    r = app.send_task(app.signature("victim"))
    good = app.send_task(app.signature("good"))
    app.start_worker(concurrency=1)
    assert good.get(timeout=30) == "good"
    with pytest.raises(nbqueue.TaskFailed, match="bookkeeping broke"):
        r.get(timeout=30)
    wait_for(lambda: settled(app), message="nothing held")
    [dead] = [d for d in app.broker.dead_letters(app.default_queue) if d["id"] == r.id]
    assert "bookkeeping broke" in dead["reason"] and calls == [1]


# -- 7: a result that cannot be encoded or stored --------------------------------------------------------


def _self_referencing():
    value: list = []
    value.append(value)
    return value


def _deep(depth: int = 1000):
    value: list = []
    for _ in range(depth):
        value = [value]
    return value


BAD_RESULTS = {"lone surrogate": lambda: "\ud800", "self-referencing list": _self_referencing, "1000-deep list": _deep}


@pytest.mark.parametrize("kind", list(BAD_RESULTS))
def test_a_result_that_cannot_be_encoded_or_stored_ends_failure_naming_the_result(app_factory, kind):
    app = app_factory(visibility_timeout=2)
    runs = []

    @app.task(name="bad_result")
    def bad_result():
        runs.append(1)
        return BAD_RESULTS[kind]()

    r = bad_result.delay()
    app.register_task("after", lambda: "after")
    after = app.send_task(app.signature("after"))
    app.start_worker(concurrency=1)
    with pytest.raises(nbqueue.TaskFailed) as failed:
        r.get(timeout=30)
    assert "result" in failed.value.message and "bad_result" in failed.value.message
    assert after.get(timeout=30) == "after"                    # the worker carries on
    wait_for(lambda: settled(app), message="message acknowledged")
    assert runs == [1]


@pytest.mark.parametrize("shape", ["chain", "group"])
def test_a_workflow_step_whose_result_cannot_be_stored_fails_its_workflow(app_factory, shape):
    """The same inside a chain or a group (their results are stored on other paths than a
    lone task's): the step ends FAILURE naming its result, and its workflow fails."""
    app = app_factory(visibility_timeout=2)
    runs = []

    @app.task(name="surrogate")
    def surrogate():
        runs.append(1)
        return "\ud800"

    app.register_task("fine", lambda *args: "fine")
    flow = app.send(nbqueue.chain(surrogate.s(), app.signature("fine")) if shape == "chain"
                    else nbqueue.group(surrogate.s(), app.signature("fine")))
    app.start_worker(concurrency=1)
    with pytest.raises(nbqueue.TaskFailed) as failed:
        flow.get(timeout=30)
    assert "result" in failed.value.message and "surrogate" in failed.value.message
    wait_for(lambda: settled(app), message="messages acknowledged")
    assert runs == [1] and app.broker.dead_letters(app.default_queue) == []


# -- 9: anything a task raises is recorded; dead executor threads are not reported alive -----------------


class Stop(BaseException):
    """Raised by a task: not an Exception."""


def test_a_task_raising_a_base_exception_is_recorded_and_the_worker_carries_on(app_factory):
    app = app_factory(visibility_timeout=2)

    @app.task(name="stopper")
    def stopper():
        raise Stop("halt")

    app.register_task("after", lambda: "after")
    r = stopper.delay()
    worker = app.start_worker(concurrency=1)
    with pytest.raises(nbqueue.TaskFailed) as failed:
        r.get(timeout=30)
    assert (failed.value.exc_type, failed.value.message) == ("Stop", "halt")
    assert app.send_task(app.signature("after")).get(timeout=30) == "after"
    assert all(t.is_alive() for t in worker._threads)
    wait_for(lambda: settled(app), message="message acknowledged")
    assert r.state == states.FAILURE


def test_a_worker_whose_executor_threads_died_stops_reporting_itself_alive(app_factory, monkeypatch):
    """A fault of the worker itself that kills its only executor thread: the heartbeat
    stops listing the worker, the message it held goes back to the queue, and the worker
    counts as stopped."""
    app = app_factory(visibility_timeout=30)
    app.register_task("add", lambda x, y: x + y)
    worker = app.worker(concurrency=1, heartbeat_interval=0.1)

    def dying(claims):
        raise Stop("executor killed")

    monkeypatch.setattr(worker, "run_claims", dying)
    monkeypatch.setattr(threading, "excepthook", lambda args: None)   # the thread's death is the point
    r = app.send_task(app.signature("add", args=[1, 2]))
    worker.start()
    wait_for(lambda: not worker.running, timeout=30, message="worker stopped")
    assert worker.crashed
    assert all(w["worker_id"] != worker.name for w in app.backend.workers())
    monkeypatch.undo()
    assert r.state in (states.PENDING, states.RECEIVED)
    app.start_worker(concurrency=1)                            # handed back: the next worker runs it at once
    assert r.get(timeout=20) == 3


def test_a_worker_announced_as_its_executor_threads_die_is_not_listed_after_it_stopped(app_factory, monkeypatch):
    """The heartbeat thread removes the record of a worker whose executors died while start()
    announces the worker (as a task's registration does too): the record does not outlive the
    worker. The announcement's write is held until the removal is done, the order that left a
    live record behind."""
    app = app_factory(visibility_timeout=30)
    app.register_task("add", lambda x, y: x + y)
    worker = app.worker(concurrency=1, heartbeat_interval=0.1)
    removed = threading.Event()
    worker_gone, heartbeat = app.backend.worker_gone, app.backend.heartbeat

    def removing(name):
        worker_gone(name)
        removed.set()

    def announcing(name, info, ttl):
        if threading.current_thread() is threading.main_thread():
            assert removed.wait(30)
        heartbeat(name, info, ttl)

    def dying(claims):
        raise Stop("executor killed")

    monkeypatch.setattr(app.backend, "worker_gone", removing)
    monkeypatch.setattr(app.backend, "heartbeat", announcing)
    monkeypatch.setattr(worker, "run_claims", dying)
    monkeypatch.setattr(threading, "excepthook", lambda args: None)
    app.send_task(app.signature("add", args=[1, 2]))
    worker.start()
    wait_for(lambda: not worker.running, timeout=30, message="worker stopped")
    assert worker.crashed
    assert all(w["worker_id"] != worker.name for w in app.backend.workers())


# -- 11: a task id runs once per batch -----------------------------------------------------------------------


def test_a_message_published_twice_runs_once(app_factory):
    app = app_factory()
    runs = []

    @app.task(name="count")
    def count():
        runs.append(1)
        return len(runs)

    message, record, out = app.prepare(count.s())
    app.publish([record], [out])
    app.publish([record], [out])                               # RabbitMQ keeps both copies
    app.start_worker(concurrency=1, prefetch=4)
    assert app.result(message["id"]).get(timeout=30) == 1
    wait_for(lambda: settled(app), message="both copies settled")
    assert runs == [1]


def test_a_batch_holding_one_task_id_twice_runs_it_once(app_factory):
    """The worker's own guard, whatever the broker: two deliveries of one message in a batch."""
    app = app_factory()
    runs = []

    @app.task(name="count")
    def count():
        runs.append(1)
        return len(runs)

    r = count.delay()
    worker = app.worker(concurrency=1)
    deliveries = wait_for(lambda: app.broker.reserve(worker.queues, timeout=0.5, lease=30, limit=1), message="reserved")
    worker.process_batch([deliveries[0], dataclasses.replace(deliveries[0])])
    assert r.get(timeout=10) == 1 and runs == [1]
    wait_for(lambda: settled(app), message="settled")


# -- 19: exact counters -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_worker_with_two_threads_counts_5000_tasks_exactly(app_factory):
    app = app_factory()
    app.register_task("noop", lambda i: i)
    results = app.send_many([app.signature("noop", args=[i]) for i in range(5000)])
    worker = app.start_worker(concurrency=2, heartbeat_interval=0.2)
    assert app.backend.wait([r.id for r in results], timeout=240)
    wait_for(lambda: worker.processed == 5000, timeout=30, message=f"5000 counted (counted {worker.processed})")

    def reported():
        mine = [w for w in app.status()["workers"] if w["worker_id"] == worker.name]
        return mine and mine[0]["processed"] == 5000

    wait_for(reported, timeout=30, message="heartbeat reports 5000")
    assert (worker.processed, worker.failed) == (5000, 0)


# -- 30: batch-mates of a long task do not wait for it -----------------------------------------------------


def test_quick_tasks_reserved_with_a_long_one_run_on_the_idle_thread(app_factory):
    """Two threads; a long task (past its soft time limit) and three quick ones sent before
    the worker starts, so one thread reserves them together (prefetch 4): the quick ones run
    on the other thread while the long one is still running."""
    app = app_factory(visibility_timeout=30)
    release = threading.Event()

    @app.task(name="long", time_limit=0.5)
    def long():
        release.wait(30)
        return "long"

    @app.task(name="quick")
    def quick(i):
        return i

    slow = long.delay()
    quicks = [quick.delay(i) for i in range(3)]
    app.start_worker(concurrency=2, prefetch=4)
    try:
        assert [q.get(timeout=15) for q in quicks] == [0, 1, 2]
        assert not release.is_set()                                # the long task is still running
        wait_for(lambda: slow.state == states.FAILURE, message="time limit recorded")
    finally:
        release.set()
    wait_for(lambda: settled(app), message="settled")


def test_follow_ups_published_beside_a_long_task_run_on_the_idle_thread(app_factory):
    """A chain's first step and a long task reserved together: the step's follow-up (which
    the worker may publish to itself) does not wait for the long task either."""
    app = app_factory(visibility_timeout=30)
    release = threading.Event()

    @app.task(name="long")
    def long():
        release.wait(30)
        return "long"

    @app.task(name="inc")
    def inc(x):
        return x + 1

    flow = app.send(nbqueue.chain(inc.s(1), inc.s(), inc.s()))
    slow = long.delay()
    app.start_worker(concurrency=2, prefetch=4)
    try:
        assert flow.get(timeout=15) == 4
        assert not release.is_set() and not slow.ready()
    finally:
        release.set()
    assert slow.get(timeout=30) == "long"


def blocking_batch(app, *, blocker_first: bool = False):
    """Tasks sent before a worker starts, so that one thread reserves them all in one batch:
    a blocker (running until ``gate`` is set) and one task of each outcome kind a worker
    settles: FAILURE, SUCCESS, RETRY, a dead letter (a message without its fields, whose
    record fails), a FAILURE with an error callback and a SUCCESS with a callback (settled
    with what follows them). Returns (started, gate, blocker, outcomes by kind)."""
    started, gate = threading.Event(), threading.Event()

    @app.task(name="block")
    def block():
        started.set()
        gate.wait(120)          # longer than any wait below: the test sets it
        return "late"

    @app.task(name="boom")
    def boom(tag):
        raise ValueError(f"boom {tag}")

    @app.task(name="ok")
    def ok(x):
        return x

    @app.task(name="later")
    def later():
        raise nbqueue.Retry(countdown=3600, reason="not now")

    @app.task(name="note")
    def note(*args):
        return len(args)

    blocker = block.delay() if blocker_first else None
    outcomes = {"failure": boom.delay("plain"), "success": ok.delay(7), "retry": later.delay()}
    outcomes["failure with errback"] = app.send_task(boom.s("errback").link_error(note.s()))
    outcomes["success with callback"] = app.send_task(ok.s(8).link(note.s()))
    _, record, _ = app.prepare(app.signature("ok", args=[9], id=f"dead-{app.default_queue}"))
    app.backend.create([record])
    app.broker.publish_many([Outgoing(id=record["id"], body=json.dumps({"id": record["id"]}),
                                      queue=app.default_queue)])
    outcomes["dead letter"] = app.result(record["id"])
    if blocker is None:
        blocker = block.delay()
    return started, gate, blocker, outcomes


def assert_recorded(outcomes: dict, blocker, gate) -> None:
    """Every outcome of ``blocking_batch`` is recorded and readable while the blocker runs."""
    expected = {
        "failure": states.FAILURE,
        "success": states.SUCCESS,
        "retry": states.RETRY,
        "failure with errback": states.FAILURE,
        "success with callback": states.SUCCESS,
        "dead letter": states.FAILURE,
    }
    for kind, state in expected.items():
        wait_for(lambda: outcomes[kind].state == state, timeout=60, message=f"{kind} recorded {state}")
    with pytest.raises(nbqueue.TaskFailed, match="boom plain"):
        outcomes["failure"].get(timeout=5)
    with pytest.raises(nbqueue.TaskFailed, match="boom errback"):
        outcomes["failure with errback"].get(timeout=5)
    with pytest.raises(nbqueue.TaskFailed, match="lacks required field"):
        outcomes["dead letter"].get(timeout=5)
    assert outcomes["success"].get(timeout=5) == 7 and outcomes["success with callback"].get(timeout=5) == 8
    wait_for(lambda: blocker.state == states.STARTED, timeout=60, message="the blocker recorded STARTED")
    assert not gate.is_set() and not blocker.ready()                   # all recorded while the blocker still runs


def recorded_while_blocked(app, concurrency: int, blocker_first: bool) -> None:
    """A worker (``concurrency`` threads, prefetch 8) on ``blocking_batch``: every outcome is
    recorded while the blocker runs (``assert_recorded``), and the blocker ends once released."""
    started, gate, blocker, outcomes = blocking_batch(app, blocker_first=blocker_first)
    app.start_worker(concurrency=concurrency, prefetch=8)
    try:
        assert started.wait(60), "the blocker never started"
        assert_recorded(outcomes, blocker, gate)
    finally:
        gate.set()
    assert blocker.get(timeout=60) == "late"


@pytest.mark.parametrize("app_kind", ["sqlite", "memory", "redis"])
@pytest.mark.parametrize("concurrency", [2, 1])
def test_outcomes_are_recorded_while_a_batch_mate_still_runs(app_factory, concurrency):
    """One thread reserves a blocker with one task of each outcome kind (prefetch 8, the
    blocker last): each outcome is recorded, and visible to ``state`` and ``get()``, while the
    blocker is still running, on one thread as on two."""
    recorded_while_blocked(app_factory(visibility_timeout=60), concurrency, blocker_first=False)


@pytest.mark.parametrize("app_kind", ["sqlite", "memory", "redis"])
def test_outcomes_reserved_behind_a_blocker_are_recorded_on_the_idle_thread(app_factory):
    """The blocker first in the batch: its batch-mates run on the other thread, and their
    outcomes are recorded while it still runs."""
    recorded_while_blocked(app_factory(visibility_timeout=60), 2, blocker_first=True)


@pytest.mark.parametrize("app_kind", ["sqlite", "memory", "redis"])
def test_tasks_prefetched_behind_a_blocker_on_one_thread_show_received_until_it_ends(app_factory):
    """One thread, prefetch 8, the blocker first in the batch: its batch-mates wait for it
    (prefetch), and their state says so: RECEIVED by this worker, not started. The dead
    letter needs no run: it is settled at once. Once the blocker ends, every outcome is
    recorded."""
    app = app_factory(visibility_timeout=60)
    started, gate, blocker, outcomes = blocking_batch(app, blocker_first=True)
    worker = app.start_worker(concurrency=1, prefetch=8)
    try:
        assert started.wait(60), "the blocker never started"
        wait_for(lambda: outcomes["dead letter"].state == states.FAILURE, timeout=60, message="dead letter recorded")
        wait_for(lambda: blocker.state == states.STARTED, timeout=60, message="the blocker recorded STARTED")
        waiting = [r for kind, r in outcomes.items() if kind != "dead letter"]
        assert [r.state for r in waiting] == [states.RECEIVED] * len(waiting)
        assert {app.backend.get(r.id)["worker"] for r in waiting} == {worker.name}
    finally:
        gate.set()
    assert blocker.get(timeout=60) == "late"
    assert outcomes["success"].get(timeout=60) == 7
    wait_for(lambda: outcomes["retry"].state == states.RETRY, timeout=60, message="retry recorded")
    with pytest.raises(nbqueue.TaskFailed, match="boom plain"):
        outcomes["failure"].get(timeout=60)


# -- the command-line worker -------------------------------------------------------------------------------


CLI_TASKS = '''
import nbqueue

app = nbqueue.App.from_env()


class Stop(BaseException):
    pass


@app.task(name="stopper")
def stopper():
    raise Stop("halt")


@app.task(name="noop")
def noop(i):
    return i
'''


@pytest.mark.slow
@pytest.mark.parametrize("app_kind", ["sqlite", "redis"])
def test_cli_worker_records_a_base_exception_and_counts_5000_tasks_exactly(app_factory, tmp_path):
    app = app_factory()
    stopped = app.send_task(Signature("stopper"))
    results = app.send_many([Signature("noop", args=[i]) for i in range(5000)])
    (tmp_path / "faulttasks.py").write_text(CLI_TASKS)
    with cli_worker(app, tmp_path, "faulttasks", "--concurrency", "2", NBQUEUE_LOG_LEVEL="WARNING") as (proc, log):
        with pytest.raises(nbqueue.TaskFailed, match="halt"):
            stopped.get(timeout=60)
        assert app.backend.wait([r.id for r in results], timeout=240)
        assert proc.poll() is None, log.read_text()
        wait_for(
            lambda: any(w.get("pid") == proc.pid and w.get("processed") == 5000 for w in app.backend.workers()),
            timeout=30,
            message="heartbeat reports 5000",
        )
        status = subprocess.run(
            [sys.executable, "-m", "nbqueue", "status"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
            env=dict(
                os.environ,
                NBQUEUE_BROKER=app.broker_url,
                NBQUEUE_BACKEND=app.backend_url,
                NBQUEUE_DEFAULT_QUEUE=app.default_queue,
            ),
        )
        [row] = [line.split() for line in status.stdout.splitlines() if str(proc.pid) in line.split()]
        assert row[-1] == "5000", status.stdout                # the processed column
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        assert "stopped after 5000 task(s)" in log.read_text(), log.read_text()
