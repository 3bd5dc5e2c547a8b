"""Workflows: chain, group and chord, nested, with fan-in that fires exactly once.

Every test runs on each kind of App (SQLite, memory://, Redis, RabbitMQ with results in
SQLite) unless it says otherwise. Most drive a worker in the test's own thread
(``Worker.step``/``drain``), so what ran and in which order is decided by the test,
not by timing; the tests about concurrency use a worker's threads. Crashes are
simulated by taking a delivery with ``broker.reserve`` and processing it with the ack
or a publish made to fail, then handing the delivery back, as a redelivery would.
"""
from __future__ import annotations

import collections
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

import nbqueue
from nbqueue import Backoff, ChainResult, ChordResult, GroupResult, Retry, TaskFailed, chain, chord, group, states
from nbqueue.result import AsyncResult
from nbqueue.signature import decode_body
from nbqueue.testing import dead_worker_name

from conftest import store_url

ROOT = Path(__file__).resolve().parents[1]


# -- helpers -------------------------------------------------------------------------------------

def make_tasks(app) -> SimpleNamespace:
    """The tasks these tests use; ``runs[name]`` counts executions, ``calls`` records (name, args)."""
    runs: collections.Counter = collections.Counter()
    calls: list = []
    lock = threading.Lock()

    def note(name, *args):
        with lock:
            runs[name] += 1
            calls.append((name, args))

    @app.task(name="add")
    def add(x, y):
        note("add", x, y)
        return x + y

    @app.task(name="mul")
    def mul(x, y):
        note("mul", x, y)
        return x * y

    @app.task(name="total")
    def total(values):
        note("total", values)
        return sum(values)

    @app.task(name="collect")
    def collect(*values):
        note("collect", *values)
        return list(values)

    @app.task(name="ident")
    def ident(x):
        note("ident", x)
        return x

    @app.task(name="boom")
    def boom(*args):
        note("boom", *args)
        raise ValueError(f"boom{list(args)}")

    @app.task(name="on_err")
    def on_err(error, label):
        note("on_err", error, label)
        return label

    @app.task(name="later")
    def later():
        note("later")
        raise Retry(countdown=3600, reason="not yet")

    return SimpleNamespace(add=add, mul=mul, total=total, collect=collect, ident=ident, boom=boom, on_err=on_err,
                           later=later, runs=runs, calls=calls)


def run_until(worker, *results, timeout: float = 60.0) -> None:
    """Process messages in this thread until every result is ready (the timeout only guards a hang)."""
    deadline = time.monotonic() + timeout
    while not all(r.ready() for r in results):
        if time.monotonic() > deadline:
            raise AssertionError(f"not finished: {[getattr(r, 'state', r) for r in results]}")
        worker.drain(timeout=5)


def queued(app) -> int:
    """Messages of the App's default queue in the broker: waiting, delayed or held by a worker."""
    for row in app.broker.stats():
        if row["queue"] == app.default_queue:
            return row["ready"] + row["delayed"] + row["in_flight"]
    return 0


def settle(app, worker) -> None:
    """Process whatever is left, then check nothing is: a duplicate message would be seen here."""
    worker.drain(timeout=5)
    assert queued(app) == 0


def reserve(app, n: int, timeout: float = 10.0) -> list:
    """Take ``n`` deliveries from the default queue in this thread (as a worker would)."""
    got, deadline = [], time.monotonic() + timeout
    while len(got) < n and time.monotonic() < deadline:
        got += app.broker.reserve([app.default_queue], timeout=0.5, lease=app.visibility_timeout, limit=n - len(got))
    assert len(got) == n, f"expected {n} deliveries, got {len(got)}"
    return got


def step_one(app, worker) -> None:
    """Process exactly one message, the next in the queue, in this thread."""
    worker.process(reserve(app, 1)[0])


def lose_first_ack(app, monkeypatch) -> list:
    """Drop the first acknowledgement the worker sends, alone, in a batch or in the engine's
    finish, as if its worker died right before it; returns the deliveries whose ack was lost."""
    skipped: list = []
    real_ack, real_ack_many, real_finish = app.broker.ack, app.broker.ack_many, app.engine.finish

    def ack(d):
        if not skipped:
            skipped.append(d)
            return False
        return real_ack(d)

    def ack_many(deliveries, **kwargs):
        deliveries = list(deliveries)
        if not skipped and deliveries:
            skipped.append(deliveries.pop(0))
        return real_ack_many(deliveries, **kwargs)

    def finish(outcomes, acks=(), **kwargs):
        acks = list(acks)
        if not skipped and acks:
            skipped.append(acks.pop(0))
        return real_finish(outcomes, acks, **kwargs)

    monkeypatch.setattr(app.broker, "ack", ack)
    monkeypatch.setattr(app.broker, "ack_many", ack_many)
    monkeypatch.setattr(app.engine, "finish", finish)
    return skipped


def backend_calls(app, monkeypatch) -> list:
    """Record every call made on the App's result backend's public methods from outside it."""
    made: list = []
    depth = threading.local()
    backend = app.backend
    for name in dir(type(backend)):
        attr = getattr(backend, name, None)
        if name.startswith("_") or not callable(attr):
            continue

        def wrapper(*args, __name=name, __attr=attr, **kwargs):
            if not getattr(depth, "n", 0):
                made.append(__name)
            depth.n = getattr(depth, "n", 0) + 1
            try:
                return __attr(*args, **kwargs)
            finally:
                depth.n -= 1

        monkeypatch.setattr(backend, name, wrapper)
    return made


# -- constructors and senders ------------------------------------------------------------------------

def test_send_dispatches_on_type_and_returns_the_matching_result(app):
    t = make_tasks(app)
    assert type(app.send(t.add.s(1, 2))) is AsyncResult
    assert type(app.send(group(t.add.s(1, 1), t.add.s(2, 2)))) is GroupResult
    assert type(app.send(chain(t.add.s(1, 1), t.add.s(3)))) is ChainResult
    assert type(app.send(chord([t.add.s(1, 1)], t.total.s()))) is ChordResult
    assert type(app.send_group([t.add.s(1, 1), t.add.s(2, 2)])) is GroupResult      # a list becomes a group
    assert type(app.send_chain(chain(t.add.s(1, 1), t.add.s(3)))) is ChainResult
    assert type(app.send_chord(chord(group(t.add.s(1, 1)), t.total.s()))) is ChordResult
    assert type(app.send(t.add.s(1, 1) | t.add.s(2))) is ChainResult                  # sig | sig is a chain
    with pytest.raises(TypeError):
        app.send_chord(group(t.add.s(1, 1)))
    with pytest.raises(TypeError):
        app.send(object())
    with pytest.raises(TypeError):
        chord([t.add.s(1, 1)], group(t.total.s()))
    with pytest.raises(TypeError):
        group(t.add.s(1, 1), "add")


# -- group -------------------------------------------------------------------------------------------

def test_group_results_and_values_are_in_group_order_not_finishing_order(app):
    t = make_tasks(app)
    worker = app.worker()
    # member 1 has the higher priority, so it is reserved and finishes before member 0 (a three-step chain)
    res = app.send(
        group(
            chain(t.ident.si("a"), t.ident.si("b"), t.ident.si("first")),
            t.ident.si("second").set(priority=9),
            t.add.s(1, 2),
        )
    )
    assert [type(r) for r in res.results] == [ChainResult, AsyncResult, AsyncResult]
    assert not res.ready() and res.completed_count() == 0
    run_until(worker, res)
    finished = [args[0] for name, args in t.calls]
    assert finished.index("second") < finished.index("first")
    assert res.get(timeout=10) == ["first", "second", 3]
    assert [r.get(timeout=10) for r in res.results] == ["first", "second", 3]
    assert res.ready() and res.successful()
    assert res.completed_count() == 3                     # a chain member counts once, not per step


def test_group_completed_count_counts_members_that_succeeded(app):
    t = make_tasks(app)
    worker = app.worker()
    res = app.send(group(t.add.s(1, 1), t.boom.s(1), t.add.s(2, 2), t.boom.s(2)))
    run_until(worker, res)
    assert res.completed_count() == 2
    assert [r.state for r in res.results] == [states.SUCCESS, states.FAILURE, states.SUCCESS, states.FAILURE]
    with pytest.raises(TaskFailed) as err:
        res.get(timeout=10)
    assert err.value.exc_type == "ValueError" and err.value.message == "boom[1]"   # the first failure in group order


def test_group_is_ready_only_when_every_member_finished_even_after_a_failure(app):
    t = make_tasks(app)
    worker = app.worker()
    res = app.send(group(t.boom.s(), t.add.s(1, 1)))
    step_one(app, worker)                                 # only the failing member has run
    assert res.failed() and not res.ready()
    with pytest.raises(TaskFailed):
        res.get(timeout=10)                               # get() fails fast on the first failure
    run_until(worker, res)
    assert res.ready() and res.results[1].get(timeout=10) == 2


def test_group_progress_counts_each_state_in_one_backend_call(app, monkeypatch):
    t = make_tasks(app)
    seen = {}

    @app.task(name="probe")
    def probe():
        seen["while_running"] = seen["group"].progress()
        return "probed"

    res = app.send(group(t.add.s(1, 1), t.boom.s(), t.later.s(), app.signature("probe")))
    seen["group"] = res
    before = res.progress()
    assert (before["pending"], before["total"], before["done"]) == (4, 4, 0)
    worker = app.worker()
    for _ in range(4):                                    # one message at a time, in publishing order
        step_one(app, worker)
    during = seen["while_running"]
    assert (during["succeeded"], during["failed"], during["retrying"], during["running"], during["pending"]) == (
        1,
        1,
        1,
        1,
        0,
    )
    calls = backend_calls(app, monkeypatch)
    after = res.progress()
    assert len(calls) == 1, calls
    assert {k: after[k] for k in ("pending", "running", "retrying", "succeeded", "failed", "total", "done")} == \
        {"pending": 0, "running": 0, "retrying": 1, "succeeded": 2, "failed": 1, "total": 4, "done": 3}


def test_nested_results_progress_counts_every_task_in_one_backend_call(app, monkeypatch):
    t = make_tasks(app)
    worker = app.worker()
    res = app.send(chain(t.add.s(1, 1), group(t.add.s(1), t.boom.s(), chain(t.add.s(5), t.add.s(6))), t.total.s()))
    cres = app.send(chord([chain(t.add.s(1, 1), t.add.s(2)), t.add.s(3, 3)], t.total.s()))
    run_until(worker, res, cres)
    calls = backend_calls(app, monkeypatch)
    progress = res.progress()
    assert len(calls) == 1, calls
    # add, add(1), add(5), add(6) succeeded; boom failed; total was not run
    assert (progress["succeeded"], progress["failed"], progress["revoked"], progress["total"]) == (4, 1, 1, 6)
    calls.clear()
    progress = cres.progress()
    assert len(calls) == 1, calls
    assert (progress["succeeded"], progress["total"]) == (4, 4)
    calls.clear()
    assert res.results[1].completed_count() == 2 and len(calls) == 1


# -- chain -------------------------------------------------------------------------------------------

def test_chain_appends_each_result_to_the_next_steps_args(app):
    t = make_tasks(app)
    res = app.send_chain(chain(t.add.s(1, 1), t.add.s(10), t.mul.s(3)))
    run_until(app.worker(), res)
    assert res.get(timeout=10) == 36
    assert [r.get(timeout=10) for r in res.results] == [2, 12, 36]
    assert [args for name, args in t.calls] == [(1, 1), (10, 2), (3, 12)]


def test_chain_immutable_step_does_not_receive_the_previous_result(app):
    t = make_tasks(app)
    res = app.send(chain(t.add.s(1, 1), t.add.si(5, 5), t.add.s(1)))
    run_until(app.worker(), res)
    assert res.get(timeout=10) == 11
    assert [args for name, args in t.calls] == [(1, 1), (5, 5), (1, 10)]


def test_failed_step_stops_the_chain_after_its_retries_and_the_rest_is_revoked(app):
    t = make_tasks(app)
    attempts = []

    @app.task(name="flaky", retry_count=2, retry_backoff=Backoff("fixed", base=0))
    def flaky(x):
        attempts.append(x)
        raise KeyError("still broken")

    res = app.send(chain(t.add.s(1, 1), flaky.s(), t.add.s(3), group(t.add.s(4), t.add.s(5))))
    run_until(app.worker(), res)
    assert attempts == [2, 2, 2]                          # the first run and two retries
    assert [r.state for r in res.results[:3]] == [states.SUCCESS, states.FAILURE, states.REVOKED]
    assert res.results[3].state == states.REVOKED and all(r.state == states.REVOKED for r in res.results[3].results)
    assert t.runs["add"] == 1                             # nothing after the failed step ran
    with pytest.raises(TaskFailed) as err:
        res.get(timeout=10)
    assert err.value.exc_type == "KeyError" and err.value.task_id == res.results[1].id
    assert res.results[2].info()["exc_type"] == "KeyError"


def test_steps_not_run_fire_their_error_callbacks(app):
    t = make_tasks(app)
    step = t.add.s(3)
    step.link_error(t.on_err.s("step not run"))
    res = app.send(chain(t.boom.s(), step))
    worker = app.worker()
    run_until(worker, res)
    settle(app, worker)
    assert t.runs["on_err"] == 1
    assert [args for name, args in t.calls if name == "on_err"] == [("boom[]", "step not run")]


def test_chain_step_delivered_twice_starts_the_next_step_once(app, monkeypatch):
    t = make_tasks(app)
    res = app.send(chain(t.add.s(1, 1), t.add.s(10), t.mul.s(3)))
    worker = app.worker(local_follow_ups=False)
    (first,) = reserve(app, 1)
    skipped = lose_first_ack(app, monkeypatch)
    worker.process(first)                                 # result stored, next step published, ack lost
    assert skipped == [first] and app.broker.release(first)
    delivered = []
    real_reserve = app.broker.reserve
    monkeypatch.setattr(
        app.broker, "reserve", lambda *a, **k: [delivered.append(d.message_id) or d for d in real_reserve(*a, **k)]
    )
    second = sorted(reserve(app, 2), key=lambda d: d.message_id != first.message_id)
    for d in second:                                      # the repeat first, while the next step still waits
        worker.process(d)
    run_until(worker, res)
    settle(app, worker)
    assert res.get(timeout=10) == 36
    assert delivered.count(res.results[1].id) == 1        # no second copy of the next step was queued
    assert t.runs["add"] == 2 and t.runs["mul"] == 1


# -- chord -------------------------------------------------------------------------------------------

def test_chord_callback_receives_member_results_in_group_order(app):
    t = make_tasks(app)
    res = app.send_chord(
        chord([chain(t.ident.si("x"), t.ident.si("slow")), t.ident.si("fast"), t.add.s(1, 2)], t.collect.s())
    )
    assert res.results[1] is res.header.results[1]
    run_until(app.worker(), res)
    assert res.get(timeout=10) == [["slow", "fast", 3]]
    assert res.header.get(timeout=10) == ["slow", "fast", 3]


def test_chord_immutable_callback_gets_no_results(app):
    t = make_tasks(app)
    res = app.send(chord([t.add.s(1, 1), t.add.s(2, 2)], t.collect.si("done")))
    run_until(app.worker(), res)
    assert res.get(timeout=10) == ["done"]


def test_chord_with_an_empty_header_calls_back_with_an_empty_list(app):
    t = make_tasks(app)
    res = app.send(chord([], t.total.s()))
    run_until(app.worker(), res)
    assert res.get(timeout=10) == 0
    assert [args for name, args in t.calls] == [([],)]
    assert app.send(group()).get(timeout=10) == []


def test_chord_callback_runs_once_when_members_finish_at_the_same_moment(app):
    t = make_tasks(app)
    n = 6
    barrier = threading.Barrier(n, timeout=30)

    @app.task(name="together")
    def together(i):
        barrier.wait()                                   # every member returns at once
        return i

    res = app.send(chord([together.s(i) for i in range(n)], t.total.s()))
    worker = app.start_worker(concurrency=n, prefetch=1)
    assert res.get(timeout=60) == sum(range(n))
    worker.stop()
    settle(app, app.worker())
    assert t.runs["total"] == 1
    assert app.backend.get(res.callback.id)["token"] == 1     # begun once: one attempt


@pytest.mark.parametrize(
    "callback_first", [False, True], ids=["redelivered-before-callback", "redelivered-after-callback"]
)
def test_chord_callback_runs_once_when_a_member_is_delivered_twice(app, monkeypatch, callback_first):
    t = make_tasks(app)
    res = app.send(chord([t.add.s(1, 1), t.add.s(2, 2), t.add.s(3, 3)], t.total.s()))
    worker = app.worker(local_follow_ups=False)
    deliveries = reserve(app, 3)
    for d in deliveries[:2]:
        worker.process(d)
    # the last member's worker stores its result and publishes the callback, then dies before its ack
    skipped = lose_first_ack(app, monkeypatch)
    worker.process(deliveries[2])
    assert skipped == [deliveries[2]] and res.header.ready()
    if callback_first:
        run_until(worker, res)
    assert app.broker.release(deliveries[2])              # the broker hands the member out again
    again = reserve(app, 1 if callback_first else 2)
    again.sort(key=lambda d: d.message_id != deliveries[2].message_id)   # the member first
    assert again[0].message_id == deliveries[2].message_id
    for d in again:
        worker.process(d)
    settle(app, worker)
    assert res.get(timeout=10) == 12
    assert t.runs["total"] == 1 and t.runs["add"] == 3
    assert app.backend.get(res.callback.id)["token"] == 1


def test_chord_callback_runs_once_when_a_worker_dies_before_publishing_it(app, monkeypatch):
    t = make_tasks(app)
    res = app.send(chord([t.add.s(1, 1), t.add.s(2, 2)], t.total.s()))
    callback_id = res.callback.id
    worker = app.worker(local_follow_ups=False)
    first, last = reserve(app, 2)
    worker.process(first)
    real_publish, failed, dying = app.broker.publish_many, [], [True]

    def publish_many(outs):
        if any(o.id == callback_id for o in outs) and dying[0]:
            failed.append(callback_id)
            raise ConnectionError("worker died")
        return real_publish(outs)

    monkeypatch.setattr(app.broker, "publish_many", publish_many)
    worker.process(last)                                  # stores its result, counts it, dies publishing
    dying[0] = False
    assert failed and set(failed) == {callback_id}
    if getattr(worker, "group_commit", False):
        # broker and backend share one SQLite file: result, count and publish were one
        # transaction, rolled back together, so the member runs again
        assert app.backend.group_info(res.header.id)["done"] == 1 and not res.header.results[1].ready()
        runs = 3
    else:
        assert app.backend.group_info(res.header.id)["done"] == 2 and res.header.results[1].ready()
        runs = 2
    assert res.callback.state == states.PENDING and not res.header.ready()
    assert app.broker.release(last)                       # never acked: delivered again
    run_until(worker, res)
    settle(app, worker)
    assert res.get(timeout=10) == 6
    assert t.runs["total"] == 1 and t.runs["add"] == runs
    assert res.header.get(timeout=10) == [2, 4]


def test_chord_member_failure_revokes_the_callback_and_fires_its_error_callbacks_once(app):
    t = make_tasks(app)
    callback = t.total.s().link_error(t.on_err.s("callback not run"))
    res = app.send(chord([t.add.s(1, 1), t.boom.s(1), t.boom.s(2), t.add.s(2, 2)], callback))
    worker = app.worker()
    run_until(worker, res, res.header)
    settle(app, worker)
    assert t.runs["total"] == 0 and t.runs["add"] == 2 and t.runs["boom"] == 2
    assert res.callback.state == states.REVOKED
    assert t.runs["on_err"] == 1                          # two members failed; the error callback fires once
    error_args = [args for name, args in t.calls if name == "on_err"]
    assert error_args in ([("boom[1]", "callback not run")], [("boom[2]", "callback not run")])
    with pytest.raises(TaskFailed) as err:
        res.get(timeout=10)
    assert err.value.exc_type == "ValueError" and err.value.task_id == res.results[1].id
    assert res.header.state == states.FAILURE


# -- group concurrency -----------------------------------------------------------------------------

class LiveMembers:
    """Members published to the broker and not yet finished, counted as publishes happen.

    Wraps ``publish_many``: a member counts as live from just before its message is
    published until ``finished(id)``; ``high`` is the most ever live at once. Kept in
    this process, so it is exact whatever the broker's own statistics can tell.
    """

    def __init__(self, app, monkeypatch, name: str):
        self.name, self.lock = name, threading.Lock()
        self.published: set = set()
        self.done: set = set()
        self.high = 0
        real = app.broker.publish_many

        def publish_many(outs):
            with self.lock:
                self.published |= {o.id for o in outs if decode_body(o.body)["name"] == name}
                self.high = max(self.high, self.live())
            return real(outs)

        monkeypatch.setattr(app.broker, "publish_many", publish_many)
        if app.engine.runs_next:      # a worker's own follow-ups, claimed as published
            run_next = app.engine.run_next

            def claimed_run_next(outs, **kwargs):
                with self.lock:
                    self.published |= {o.id for o in outs if decode_body(o.body)["name"] == name}
                    self.high = max(self.high, self.live())
                return run_next(outs, **kwargs)

            monkeypatch.setattr(app.engine, "run_next", claimed_run_next)

    def live(self) -> int:
        return len(self.published - self.done)

    def finished(self, ids) -> None:
        with self.lock:
            self.done |= set(ids)


def test_group_concurrency_keeps_at_most_n_members_queued_or_running(app, monkeypatch):
    limit, members = 2, 8
    cond = threading.Condition()
    seen = {"running": 0, "started": 0, "max_running": 0}
    live = LiveMembers(app, monkeypatch, "slot")

    @app.task(name="slot")
    def slot(i):
        with cond:
            seen["running"] += 1
            seen["started"] += 1
            seen["max_running"] = max(seen["max_running"], seen["running"])
            cond.notify_all()
            # wait for the other member that may run (none at the tail), then give a breach a moment to show
            cond.wait_for(lambda: seen["running"] >= limit or seen["started"] > members - limit, timeout=30)
            cond.wait_for(lambda: seen["running"] > limit, timeout=0.05)
            seen["running"] -= 1
        live.finished([nbqueue.current_task()["id"]])     # a member is released only after this
        return i

    res = app.send_group(group(slot.s(i) for i in range(members)), concurrency=limit)
    worker = app.start_worker(concurrency=4, prefetch=1)   # more threads than the limit
    assert res.get(timeout=60) == list(range(members))
    worker.stop()
    assert seen["max_running"] == limit
    assert live.high == limit and len(live.published) == members


def test_group_concurrency_bounds_the_messages_in_the_broker_also_when_members_fail(app_factory, monkeypatch):
    app = app_factory()
    t = make_tasks(app)
    limit = 2
    live = LiveMembers(app, monkeypatch, "add")
    live_boom = LiveMembers(app, monkeypatch, "boom")
    res = app.send_group(
        group(t.add.s(0, 0), t.boom.s(1), t.boom.s(2), t.add.s(3, 3), t.boom.s(4), t.add.s(5, 5), t.add.s(6, 6)),
        concurrency=limit,
    )
    members = [r.id for r in res.results]
    worker = app.worker()
    exact_stats = app_factory.kind != "amqp"  # RabbitMQ's counts lag its deliveries (see drivers/amqp/broker.py)
    high = queued(app)
    while not res.ready():
        step_one(app, worker)                              # nothing is held between two steps
        final = [i for i, state in app.backend.states_of(members).items() if state in states.READY_STATES]
        live.finished(final)
        live_boom.finished(final)
        assert live.live() + live_boom.live() <= limit
        if exact_stats:
            high = max(high, queued(app))
    settle(app, worker)
    assert high <= limit
    assert len(live.published | live_boom.published) == 7
    assert t.runs["add"] == 4 and t.runs["boom"] == 3       # every member ran, failed ones freed their slots
    assert res.state == states.FAILURE and res.completed_count() == 4


def test_a_limited_group_is_final_only_once_no_held_member_remains(app, monkeypatch):
    """A member's releaser deletes its held spec after publishing it, and the member may
    run and finish first (another worker thread): the group's completion deletes what is
    left before its record is stored, so no held spec outlives a final group."""
    t = make_tasks(app)
    deferred = []
    kv_set = app.backend.kv_set

    def releaser_late(key, value):
        # the releaser's own deletion (a lambda in the publisher's after actions) comes too late
        if value is None and key.startswith("nbq:held:") and sys._getframe(1).f_code.co_name == "<lambda>":
            deferred.append(key)
            return
        kv_set(key, value)

    monkeypatch.setattr(app.backend, "kv_set", releaser_late)
    res = app.send_group(group(t.add.s(i, 1) for i in range(7)), concurrency=2)
    run_until(app.worker(), res)
    assert res.get(timeout=10) == [1, 2, 3, 4, 5, 6, 7]
    assert len(deferred) == 5                                # members 2-6 were held, then released
    assert app.backend.kv_items("nbq:held:") == {}


def test_group_concurrency_limits_the_outermost_group_when_its_first_member_is_a_group(app):
    t = make_tasks(app)
    res = app.send_group(group(group(t.add.s(1, 1), t.add.s(2, 2)), t.add.s(3, 3), t.add.s(4, 4)), concurrency=1)
    assert queued(app) == 2                               # the inner group's two tasks; the others held
    run_until(app.worker(), res)
    assert res.get(timeout=10) == [[2, 4], 6, 8]
    assert [args for name, args in t.calls][2:] == [(3, 3), (4, 4)]


def test_group_concurrency_releases_a_member_whose_release_was_lost_in_a_crash(app, monkeypatch):
    """The worker counting member 0 dies before publishing member 2; member 1 then releases member 3.

    The redelivered member 0 must release member 2, or the group never completes.
    """
    t = make_tasks(app)
    res = app.send_group(group(t.add.s(i, 0) for i in range(6)), concurrency=2)
    m0, m1 = sorted(reserve(app, 2), key=lambda d: d.message_id != res.results[0].id)
    assert (m0.message_id, m1.message_id) == (res.results[0].id, res.results[1].id)
    worker = app.worker(local_follow_ups=False)
    real_publish, failed, dying = app.broker.publish_many, [], [True]

    def publish_many(outs):
        if dying[0]:                                      # every publish fails while the worker "dies"
            failed.append([o.id for o in outs])
            raise ConnectionError("worker died")
        return real_publish(outs)

    monkeypatch.setattr(app.broker, "publish_many", publish_many)
    worker.process(m0)
    dying[0] = False
    assert failed and all(ids == [res.results[2].id] for ids in failed)
    rolled_back = getattr(worker, "group_commit", False)  # one SQLite transaction: member 0 is not counted
    assert app.backend.group_info(res.id)["done"] == (0 if rolled_back else 1)
    worker.process(m1)                                    # releases member 2 (rolled back) or 3
    assert app.broker.release(m0)
    run_until(worker, res)
    settle(app, worker)
    assert res.get(timeout=10) == [0, 1, 2, 3, 4, 5]
    assert t.runs["add"] == (7 if rolled_back else 6)


# -- nesting -------------------------------------------------------------------------------------------

def test_chain_with_a_group_appends_the_previous_result_to_each_member_and_passes_the_list_on(app):
    t = make_tasks(app)
    res = app.send(chain(t.add.s(1, 1), group(t.add.s(1), t.add.s(2), t.add.si(7, 7)), t.total.s()))
    run_until(app.worker(), res)
    assert res.get(timeout=10) == 3 + 4 + 14
    first, members, last = res.results
    assert isinstance(members, GroupResult) and members.get(timeout=10) == [3, 4, 14]
    assert (first.get(timeout=10), last.get(timeout=10)) == (2, 21)


def test_chain_may_start_with_a_group_and_end_with_one(app):
    t = make_tasks(app)
    ends = app.send(chain(t.add.s(1, 1), group(t.add.s(1), t.mul.s(10))))
    starts = app.send(group(t.add.s(1, 1), t.add.s(2, 2)) | t.total.s())
    run_until(app.worker(), ends, starts)
    assert ends.get(timeout=10) == [3, 20] and isinstance(ends.results[1], GroupResult)
    assert starts.get(timeout=10) == 6 and [type(r) for r in starts.results] == [GroupResult, AsyncResult]


def test_chain_with_a_chord_passes_the_callbacks_value_on(app):
    t = make_tasks(app)
    res = app.send(chain(t.add.s(1, 1), chord([t.add.s(1), t.mul.s(10)], t.total.s()), t.add.s(100)))
    run_until(app.worker(), res)
    assert res.get(timeout=10) == (3 + 20) + 100
    assert isinstance(res.results[1], ChordResult) and res.results[1].get(timeout=10) == 23
    assert res.results[1].header.get(timeout=10) == [3, 20]


def test_group_of_chains_gives_each_chains_last_value(app):
    t = make_tasks(app)
    res = app.send(group(chain(t.add.s(1, 1), t.add.s(3)), chain(t.add.s(2, 2), t.mul.s(4), t.add.s(1)), t.add.s(0, 0)))
    run_until(app.worker(), res)
    assert res.get(timeout=10) == [5, 17, 0]
    assert [type(r) for r in res.results] == [ChainResult, ChainResult, AsyncResult]
    assert [r.get(timeout=10) for r in res.results[1].results] == [4, 16, 17]


def test_chord_whose_header_holds_chains_and_a_group(app):
    t = make_tasks(app)
    res = app.send(
        chord([chain(t.add.s(1, 1), t.add.s(3)), group(t.add.s(5, 5), t.add.s(6, 6)), t.add.s(7, 7)], t.collect.s())
    )
    run_until(app.worker(), res)
    assert res.get(timeout=10) == [[5, [10, 12], 14]]


def test_chain_of_a_group_of_chains_then_a_chord_with_a_chain_callback(app):
    t = make_tasks(app)
    res = app.send(chain(
        t.add.s(1, 1),                                                      # 2
        group(chain(t.add.s(1), t.mul.s(2)), t.add.s(10)),                  # [(2+1)*2, 2+10] = [6, 12]
        t.total.s(),                                                        # 18
        chord([t.add.s(1), t.add.s(2)], chain(t.total.s(), t.mul.s(10))),   # [19, 20] -> 39 -> 390
    ))
    run_until(app.worker(), res)
    assert res.get(timeout=10) == 390
    assert isinstance(res.results[3].callback, ChainResult)


def test_failure_inside_a_nested_group_fails_the_outer_workflow_with_the_members_error(app):
    t = make_tasks(app)
    res = app.send(chain(t.add.s(1, 1), group(chain(t.add.s(1), t.boom.s()), t.add.s(5)), t.total.s()))
    worker = app.worker()
    run_until(worker, res, res.results[1])
    settle(app, worker)
    assert t.runs["total"] == 0 and t.runs["add"] == 3
    assert res.results[2].state == states.REVOKED and res.results[1].state == states.FAILURE
    with pytest.raises(TaskFailed) as err:
        res.get(timeout=10)
    assert err.value.exc_type == "ValueError" and err.value.message == "boom[3]"


# -- scale ----------------------------------------------------------------------------------------------

def thread_kind(thread: threading.Thread) -> str:
    """A thread's name without its number: ``nbqueue-worker-1`` is of kind ``nbqueue-worker``."""
    return thread.name.rstrip("0123456789").rstrip("-") if thread.name.startswith("nbqueue-") else thread.name


@pytest.mark.slow
@pytest.mark.parametrize("app_kind", ["sqlite", "memory"])
def test_chord_of_2000_members_calls_back_once_with_no_thread_per_member(app):
    """The threads alive while the members run are the worker's (one per slot, its heartbeat)
    and at most one wake-up listener per kind of event, whenever each of them starts: the
    count depends on the concurrency, not on the members or the waiters."""
    n = 2_000
    runs = collections.Counter()
    ran_in, seen = set(), []

    @app.task(name="square")
    def square(i):
        ran_in.add(threading.current_thread().name)
        if i % 100 == 0:
            seen.append(list(threading.enumerate()))
        return i * i

    @app.task(name="sum_all")
    def sum_all(values):
        runs["sum_all"] += 1
        return [len(values), sum(values)]

    before = set(threading.enumerate())
    worker = app.start_worker(concurrency=2)
    res = app.send_chord(chord([square.s(i) for i in range(n)], sum_all.s()))
    assert res.get(timeout=600) == [n, sum(i * i for i in range(n))]
    worker.stop()
    assert runs["sum_all"] == 1
    assert ran_in <= {"nbqueue-worker-0", "nbqueue-worker-1"}
    assert len(seen) == n // 100
    started = {t for threads in seen for t in threads} - before
    kinds = collections.Counter(thread_kind(t) for t in started)
    assert kinds["nbqueue-worker"] == 2 and kinds["nbqueue-heartbeat"] == 1, kinds
    assert set(kinds) <= {"nbqueue-worker", "nbqueue-heartbeat", "nbqueue-wake-m", "nbqueue-wake-r"}, kinds
    assert all(count == 1 for kind, count in kinds.items() if kind != "nbqueue-worker"), kinds
    assert res.header.completed_count() == n


# -- the example --------------------------------------------------------------------------------------

def test_workflows_example_prints_the_group_chord_and_chain_values(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("NBQUEUE_BROKER", None)
    env.pop("NBQUEUE_BACKEND", None)
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "workflows.py")], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert "group: [2, 4, 6]" in lines
    assert "chord: 48" in lines
    assert "chain: 22" in lines
    assert (tmp_path / ".nbqueue" / "nbqueue.db").exists()    # the embedded default, in the working directory


@pytest.mark.parametrize("kind", ["sqlite", "memory", "redis"])
def test_follow_up_reserved_by_a_worker_that_dies_runs_once_on_another(kind, tmp_path):
    """Given a worker that published the next chain step already reserved to itself (the
    fast path of SQLite, and of Redis with results on the same server) and died before
    running it, when its lease runs out, another worker runs the step, once, and the
    chain completes."""
    app = nbqueue.App(store_url(kind, tmp_path), visibility_timeout=0.5)
    ran = []

    @app.task(name="step")
    def step(label, previous=None):
        ran.append(label)
        return f"{previous}>{label}" if previous else label

    res = app.send_chain(chain(step.s("a"), step.s("b")))
    dying = app.worker(name=dead_worker_name())   # its leases lapse and it is taken for dead
    assert dying.local_follow_ups
    real_run_batch, calls = dying._run_batch, []

    def run_first_batch_only(claims, local):
        calls.append([c.delivery.message_id for c in claims])
        if len(calls) == 1:
            real_run_batch(claims, local)                # runs "a", reserves "b" for itself
        # the second batch (its own follow-up "b") is lost with the worker

    dying._run_batch = run_first_batch_only
    assert dying.step() == 1
    assert ran == ["a"] and len(calls) == 2              # "b" was taken locally, then the worker "died"
    assert app.broker.stats()[0]["in_flight"] == 1
    survivor = app.worker()
    deadline = time.monotonic() + 10
    while not res.ready() and time.monotonic() < deadline:
        survivor.step()
        time.sleep(0.05)
    assert res.get(timeout=1) == "a>b"
    assert ran == ["a", "b"]
