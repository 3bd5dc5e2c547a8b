"""The core: App, registration, signatures, results, workers, retries,
callbacks, unknown and malformed messages, delays, leases and fencing.

Behaviour that touches the broker or the result backend runs on every app kind
(``app`` / ``app_factory``: sqlite, memory, redis, amqp). Time-dependent behaviour
uses a ManualClock and ``Worker.step()`` (no sleeping) where the broker keeps time by
the App's clock; the rest waits with generous timeouts, never asserting speed.
"""
from __future__ import annotations

import datetime as dt
import logging
import random
import signal
import threading
import time

import pandas as pd
import pytest

import nbqueue
from nbqueue import Backoff, Signature, states
from nbqueue.broker import Broker, Outgoing
from nbqueue.clock import ManualClock
from nbqueue.engine import SplitEngine
from nbqueue.retry import fibonacci_next, next_delay
from nbqueue.testing import dead_worker_name, wait_for

# -- helpers ----------------------------------------------------------------------------------


def pump(worker, until, timeout: float = 15.0) -> None:
    """Run deliveries in this thread (``Worker.process``) until ``until()`` holds."""
    deadline = time.monotonic() + timeout
    while not until():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s of processing")
        for delivery in worker.app.broker.reserve(
            worker.queues, timeout=0.05, lease=worker.lease, limit=worker.concurrency
        ):
            worker.process(delivery)


def queue_counts(app, queue: str | None = None) -> dict:
    queue = queue or app.default_queue
    for row in app.broker.stats():
        if row["queue"] == queue:
            return {k: row[k] for k in ("ready", "delayed", "in_flight", "dead")}
    return {"ready": 0, "delayed": 0, "in_flight": 0, "dead": 0}


def queue_is_empty(app, queue: str | None = None) -> bool:
    counts = queue_counts(app, queue)
    return counts["ready"] == counts["delayed"] == counts["in_flight"] == 0


def leases_expire(app) -> bool:
    return app.broker.capabilities.leases_expire


def skip_unless_leases_expire(app) -> None:
    if not leases_expire(app):
        pytest.skip(f"{type(app.broker).__name__} lacks the leases_expire capability: it redelivers when the "
                    "consumer's connection dies, not when a lease timer runs out (proved by the killed-process test)")


#: brokers whose delays and leases follow the App's clock, so a ManualClock steps them
CLOCKED_KINDS = ["sqlite", "memory", "redis"]
clocked = pytest.mark.parametrize("app_kind", CLOCKED_KINDS)
#: RabbitMQ times delays itself (message TTLs into delay queues): the same behaviour, in real time
own_timer = pytest.mark.parametrize("app_kind", ["amqp"])


@pytest.fixture
def sqlite_app(tmp_path, qname):
    """An App on a fresh SQLite file, for behaviour that does not depend on the store."""
    app = nbqueue.App(f"sqlite:///{tmp_path}/core.db", default_queue=qname("sq"))
    yield app
    app.close()


def register_basics(app):
    @app.task(name="add")
    def add(x, y):
        return x + y

    @app.task(name="explode")
    def explode(detail):
        raise ValueError(f"bad input {detail}")

    return add, explode


# -- App construction and registration ----------------------------------------------------------


def test_app_without_broker_keeps_everything_in_dot_nbqueue_of_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    app = nbqueue.App(default_queue="defaults")
    try:
        expected = (tmp_path / ".nbqueue" / "nbqueue.db").resolve()
        assert app.broker.path == str(expected) and app.backend.path == str(expected)
        add, _ = register_basics(app)
        r = add.delay(20, 22)
        pump(app.worker(), r.ready)
    finally:
        app.close()
    # the same file, named by URL, holds the result
    other = nbqueue.App(f"sqlite:///{expected}", default_queue="defaults")
    try:
        assert other.result(r.id).get(timeout=5) == 42
    finally:
        other.close()


def test_task_decorator_and_register_functions_fill_the_registry(sqlite_app):
    app = sqlite_app

    @app.task
    def plain(x):
        return x * 10

    @app.task(name="custom", retry_count=3, retry_timeout=2, queue="special")
    def custom():
        return "c"

    app.register_task("by_name", lambda: "n")
    tasks = app.register_tasks({"first": lambda: 1, "second": lambda: 2})

    assert plain.name.endswith("plain") and app.registry[plain.name] is plain
    assert plain(4) == 40  # calling a task runs it here
    assert {"custom", "by_name", "first", "second"} <= set(app.registry)
    assert set(tasks) == {"first", "second"} and tasks["second"].fn() == 2
    sig = custom.s()
    assert (sig.name, sig.retry_count, sig.retry_timeout, sig.queue) == ("custom", 3, 2, "special")
    with pytest.raises(TypeError, match="unknown task option"):
        app.task(name="bad", retries=3)(lambda: None)


def test_registering_a_name_again_replaces_the_function(sqlite_app):
    app = sqlite_app
    app.register_task("greet", lambda who: f"old {who}")
    app.register_task("greet", lambda who: f"new {who}")
    r = app.send_task(Signature("greet", args=["cell"]))
    pump(app.worker(), r.ready)
    assert r.get(timeout=5) == "new cell"


def test_unknown_app_option_is_a_configuration_error(tmp_path):
    with pytest.raises(nbqueue.ConfigurationError, match="visibility_timout"):
        nbqueue.App(f"sqlite:///{tmp_path}/x.db", visibility_timout=5)


# -- Signature ----------------------------------------------------------------------------------


def test_signature_fields_travel_in_the_message(sqlite_app, qname):
    app = sqlite_app
    other_queue = qname("other")
    eta = dt.datetime(2031, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc)
    sig = Signature(
        "t",
        args=[1, "a"],
        kwargs={"k": 2},
        id="fixed-id",
        queue=other_queue,
        eta=eta,
        priority=7,
        headers={"trace": "abc"},
        retry_count=2,
        retry_timeout=3,
        immutable=True,
        on_success=[Signature("ok_cb")],
        on_error=[Signature("err_cb", args=[9])],
        ignore_when_not_registered=True,
    )
    message, record, out = app.prepare(sig.replace())
    assert (message["id"], message["name"], message["args"], message["kwargs"]) == ("fixed-id", "t", [1, "a"], {"k": 2})
    assert (message["queue"], message["eta"], message["priority"]) == (other_queue, eta.timestamp(), 7)
    assert message["headers"] == {"trace": "abc"}
    assert (message["retry_count"], message["retry_timeout"], message["immutable"]) == (2, 3, True)
    assert [m["name"] for m in message["on_success"]] == ["ok_cb"]
    assert [(m["name"], m["args"]) for m in message["on_error"]] == [("err_cb", [9])]
    assert message["ignore_when_not_registered"] is True
    assert (out.queue, out.eta, out.priority) == (other_queue, eta.timestamp(), 7)

    r = app.send_task(sig)
    assert r.id == "fixed-id" and r.state == states.PENDING
    assert queue_counts(app, other_queue)["delayed"] == 1 and queue_is_empty(app)


def test_countdown_is_counted_from_the_apps_clock(tmp_path):
    clock = ManualClock(1_800_000_000.0)
    app = nbqueue.App(f"sqlite:///{tmp_path}/c.db", clock=clock)
    try:
        message, _, _ = app.prepare(Signature("t", countdown=12.5))
        assert message["eta"] == 1_800_000_012.5
    finally:
        app.close()


def test_s_si_and_delay(sqlite_app):
    add, _ = register_basics(sqlite_app)
    sig, isig = add.s(1, 2), add.si(1, 2)
    assert (sig.name, sig.args, sig.immutable) == ("add", [1, 2], False)
    assert (isig.args, isig.immutable) == ([1, 2], True)
    r = add.delay(1, y=2)
    assert isinstance(r, nbqueue.AsyncResult) and r.state == states.PENDING
    assert queue_counts(sqlite_app)["ready"] == 1
    pump(sqlite_app.worker(), r.ready)
    assert r.get(timeout=5) == 3


def test_higher_priority_runs_first(app):
    if not app.broker.capabilities.priority:
        pytest.skip(f"{type(app.broker).__name__} declares no priority support")
    order = []
    app.register_task("mark", order.append)
    app.send_task(Signature("mark", args=["low"], priority=1))
    app.send_task(Signature("mark", args=["high"], priority=8))
    wait_for(lambda: queue_counts(app)["ready"] == 2)
    pump(app.worker(concurrency=1), lambda: len(order) == 2)
    assert order == ["high", "low"]


# -- AsyncResult ----------------------------------------------------------------------------------


def test_result_moves_from_pending_to_started_to_success_with_its_value(app):
    started, release = threading.Event(), threading.Event()

    @app.task(name="gated")
    def gated(x):
        started.set()
        release.wait(15)
        return x * 2

    r = gated.delay(21)
    assert (r.state, r.ready(), r.result, r.info()["name"]) == (states.PENDING, False, None, "gated")
    app.start_worker()
    assert started.wait(15)
    wait_for(lambda: r.state == states.STARTED)  # recorded while it runs
    assert not r.ready()
    release.set()
    assert r.get(timeout=15) == 42
    assert (r.state, r.ready(), r.successful(), r.failed()) == (states.SUCCESS, True, True, False)
    assert (r.result, r.error, r.traceback, r.retries) == (42, None, None, 0)
    info = r.info()
    assert info["id"] == r.id and info["started_at"] <= info["finished_at"]


def test_failed_task_raises_task_failed_with_remote_type_message_and_traceback(app):
    add, explode = register_basics(app)
    bad, good = explode.delay(42), add.delay(1, 2)
    app.start_worker()
    with pytest.raises(nbqueue.TaskFailed) as caught:
        bad.get(timeout=15)
    failure = caught.value
    assert (failure.task_id, failure.exc_type, failure.message) == (bad.id, "ValueError", "bad input 42")
    assert "raise ValueError" in failure.traceback and "explode" in failure.traceback
    assert (bad.state, bad.failed(), bad.successful()) == (states.FAILURE, True, False)
    assert bad.error == "ValueError: bad input 42" and "raise ValueError" in bad.traceback
    # the crash took nothing else down: the same worker runs the next task
    assert good.get(timeout=15) == 3
    assert app.workers and all(w.running for w in app.workers)


def test_get_raises_timeout_error_while_no_worker_runs_the_task(app):
    add, _ = register_basics(app)
    r = add.delay(1, 1)
    with pytest.raises(TimeoutError):
        r.get(timeout=0.3)
    assert r.state == states.PENDING


def test_tasks_frame_lists_records_and_filters_by_state_name_and_limit(app):
    add, explode = register_basics(app)
    ok1, ok2, bad = add.delay(1, 2), add.delay(3, 4), explode.delay("x")
    pump(app.worker(), lambda: all(r.ready() for r in (ok1, ok2, bad)))

    frame = app.tasks()
    required = [
        "id",
        "name",
        "state",
        "args",
        "kwargs",
        "result",
        "error",
        "retries",
        "queue",
        "created",
        "started",
        "finished",
        "runtime",
    ]
    assert set(required) <= set(frame.columns)
    assert set(frame["id"]) == {ok1.id, ok2.id, bad.id}
    row = frame.set_index("id").loc[ok1.id]
    assert (row["name"], row["state"], row["args"], row["kwargs"], row["result"]) == ("add", "SUCCESS", [1, 2], {}, 3)
    assert pd.isna(row["error"]) and row["retries"] == 0 and row["queue"] == app.default_queue
    assert row["created"] <= row["started"] <= row["finished"] and row["runtime"] >= 0

    failed = app.tasks(state="FAILURE")
    assert list(failed["id"]) == [bad.id] and failed.iloc[0]["error"] == "ValueError: bad input x"
    assert set(app.tasks(name="add")["id"]) == {ok1.id, ok2.id}
    assert len(app.tasks(limit=2)) == 2


def test_a_new_app_on_the_same_store_reads_earlier_results(app_factory):
    first = app_factory()
    add, explode = register_basics(first)
    ok, bad = add.delay(2, 3), explode.delay(7)
    pump(first.worker(), lambda: ok.ready() and bad.ready())
    first.close()

    restarted = app_factory()  # a new kernel: nothing registered, nothing cached
    assert restarted.result(ok.id).get(timeout=5) == 5
    with pytest.raises(nbqueue.TaskFailed, match="bad input 7"):
        restarted.result(bad.id).get(timeout=5)
    assert set(restarted.tasks()["id"]) == {ok.id, bad.id}


def test_results_survive_a_restart_until_results_expire_in(tmp_path):
    clock = ManualClock()
    url = f"sqlite:///{tmp_path}/expire.db"
    app = nbqueue.App(url, clock=clock, results_expire_in=60)
    add, _ = register_basics(app)
    r = add.delay(1, 2)
    pump(app.worker(), r.ready)
    app.close()

    restarted = nbqueue.App(url, clock=clock, results_expire_in=60)
    try:
        clock.advance(59)
        assert restarted.result(r.id).get(timeout=5) == 3
        clock.advance(2)
        assert restarted.result(r.id).info() == {} and restarted.result(r.id).state == states.PENDING
        restarted.backend.expire()
        assert restarted.tasks().empty
    finally:
        restarted.close()


# -- workers --------------------------------------------------------------------------------------


def test_started_worker_runs_in_daemon_threads_and_installs_no_signal_handlers(sqlite_app):
    app = sqlite_app
    add, _ = register_basics(app)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    before = set(threading.enumerate())
    worker = app.start_worker(concurrency=3)
    try:
        assert add.delay(2, 2).get(timeout=15) == 4
        new = [t for t in threading.enumerate() if t not in before]
        assert len([t for t in new if t.name.startswith("nbqueue-worker")]) == 3
        assert new and all(t.daemon for t in new)
        assert {s: signal.getsignal(s) for s in handlers} == handlers
        assert worker in app.workers and worker.running
    finally:
        worker.stop(wait=True, timeout=15)
    assert not worker.running and worker not in app.workers


def test_run_blocks_until_stop_is_called_from_another_thread(sqlite_app):
    app = sqlite_app
    add, _ = register_basics(app)
    worker = app.worker()
    runner = threading.Thread(target=worker.run, daemon=True)
    runner.start()
    assert add.delay(5, 5).get(timeout=15) == 10
    assert runner.is_alive()
    worker.stop(wait=True, timeout=15)
    runner.join(15)
    assert not runner.is_alive()


def test_stop_finishes_the_running_task_and_hands_back_the_unstarted_ones(app_factory):
    app = app_factory(visibility_timeout=120)  # a held-back message would need the whole lease
    started, release = threading.Event(), threading.Event()

    @app.task(name="gated")
    def gated():
        started.set()
        release.wait(15)
        return "finished"

    add, _ = register_basics(app)
    running, waiting = gated.delay(), add.delay(1, 1)
    worker = app.start_worker(concurrency=1, prefetch=4)  # may reserve both at once
    assert started.wait(15)
    worker.stop(wait=False)
    release.set()
    assert worker.join(15)
    assert running.get(timeout=5) == "finished"
    assert not waiting.ready()  # the stopped worker did not run it
    # not lost and not held until the lease runs out: the next worker runs it at once
    pump(app.worker(), waiting.ready, timeout=20)
    assert waiting.get(timeout=5) == 2


def test_worker_survives_a_backend_error_during_heartbeat(sqlite_app, monkeypatch):
    app = sqlite_app
    add, _ = register_basics(app)
    failures = []

    def broken_heartbeat(*args, **kwargs):
        failures.append(1)
        raise ConnectionError("backend unreachable")

    monkeypatch.setattr(app.backend, "heartbeat", broken_heartbeat)
    worker = app.start_worker(heartbeat_interval=0.05)
    wait_for(lambda: len(failures) >= 3)
    assert add.delay(3, 4).get(timeout=15) == 7
    assert worker.running


# -- retries ------------------------------------------------------------------------------------


def test_fibonacci_delays_seeded_by_retry_timeout():
    assert [fibonacci_next(v) for v in (0, 1, 2, 3, 5, 8)] == [1, 2, 3, 5, 8, 13]
    timeout, delays = 0.0, []
    for done in range(5):
        delay, timeout = next_delay(done, timeout, None)
        delays.append(delay)
    assert delays == [1, 2, 3, 5, 8]
    assert next_delay(0, 5, None) == (8.0, 8)  # seeded: starts after the given timeout


def test_backoff_exponential_and_fixed_with_max_and_jitter():
    exp = Backoff("exponential", base=1, factor=2, max=5)
    assert [next_delay(n, 0, exp)[0] for n in range(5)] == [1, 2, 4, 5, 5]
    assert [next_delay(n, 0, Backoff("fixed", base=5))[0] for n in range(3)] == [5, 5, 5]
    assert next_delay(6, 0, Backoff("fibonacci", max=4).to_dict())[0] == 1  # from a message: a dict
    assert next_delay(0, 20, Backoff("fibonacci", max=4))[0] == 4
    rng = random.Random(7)
    jittered = [next_delay(0, 0, Backoff("fixed", base=10, jitter=True), rng=rng)[0] for _ in range(40)]
    assert all(5 <= d <= 10 for d in jittered) and len(set(jittered)) > 1
    assert Backoff.from_dict(exp.to_dict()) == exp
    with pytest.raises(ValueError, match="unknown back-off"):
        Backoff("linear")


@clocked
def test_failing_task_retries_under_the_same_id_after_fibonacci_delays(app_factory):
    clock = ManualClock()
    app = app_factory(clock=clock)
    seen_ids = []

    @app.task(name="flaky", retry_count=3, retry_timeout=0)
    def flaky(x):
        seen_ids.append(nbqueue.current_task()["id"])
        if len(seen_ids) < 3:
            raise ConnectionError(f"attempt {len(seen_ids)} failed")
        return x + 1

    r = flaky.delay(1)
    worker = app.worker()
    pump(worker, lambda: r.state == states.RETRY)
    assert (r.retries, r.error) == (1, "ConnectionError: attempt 1 failed")

    clock.advance(0.9)                     # first delay: 1 s
    assert worker.step() == 0 and len(seen_ids) == 1
    clock.advance(0.2)
    pump(worker, lambda: len(seen_ids) == 2 and r.state == states.RETRY)
    assert r.retries == 2

    clock.advance(1.9)                     # second delay: 2 s
    assert worker.step() == 0 and len(seen_ids) == 2
    clock.advance(0.2)
    pump(worker, r.ready)
    assert r.get(timeout=5) == 2
    assert seen_ids == [r.id] * 3 and r.retries == 2


def test_retry_backoff_option_sets_the_delay(tmp_path):
    clock = ManualClock()
    app = nbqueue.App(f"sqlite:///{tmp_path}/backoff.db", clock=clock)
    try:
        calls = []

        @app.task(name="once_broken", retry_count=1, retry_backoff=Backoff("fixed", base=7))
        def once_broken():
            calls.append(1)
            if len(calls) == 1:
                raise RuntimeError("first")
            return "second"

        r = once_broken.delay()
        worker = app.worker()
        pump(worker, lambda: r.state == states.RETRY)
        clock.advance(6.9)
        assert worker.step() == 0
        clock.advance(0.2)
        pump(worker, r.ready)
        assert r.get(timeout=5) == "second"
    finally:
        app.close()


@clocked
def test_raising_retry_runs_again_later_without_using_retry_count(app_factory):
    clock = ManualClock()
    app = app_factory(clock=clock)
    calls = []

    @app.task(name="polite")
    def polite():
        calls.append(1)
        if len(calls) == 1:
            raise nbqueue.Retry(countdown=5, reason="rate limited")
        return "done"

    r = polite.delay()  # retry_count is 0: only Retry can bring it back
    worker = app.worker()
    pump(worker, lambda: r.state == states.RETRY)
    assert r.retries == 0 and "rate limited" in r.error
    clock.advance(4.9)
    assert worker.step() == 0 and len(calls) == 1
    clock.advance(0.2)
    pump(worker, r.ready)
    assert r.get(timeout=5) == "done" and len(calls) == 2 and r.retries == 0


# -- callbacks ----------------------------------------------------------------------------------


def test_success_callback_gets_the_result_appended_unless_immutable(app):
    add, _ = register_basics(app)

    @app.task(name="note")
    def note(*args):
        return list(args)

    sig = add.s(2, 3).link(note.s("mutable")).link(note.si("immutable"))
    r = app.send_task(sig)
    assert len(r.callbacks) == 2
    pump(app.worker(), lambda: all(c.ready() for c in r.callbacks))
    assert r.get(timeout=5) == 5
    assert [c.get(timeout=5) for c in r.callbacks] == [["mutable", 5], ["immutable"]]


def doomed_and_alert(app, retry_count: int):
    """A task that always fails after ``retry_count`` retries, and an error callback that
    records the errors it is given: (doomed, alert, alerts)."""
    alerts: list = []

    @app.task(name="doomed", retry_count=retry_count, retry_timeout=0)
    def doomed():
        raise RuntimeError("still broken")

    @app.task(name="alert")
    def alert(error, label):
        alerts.append(error)
        return f"{label}: {error}"

    return doomed, alert, alerts


@clocked
def test_error_callback_runs_once_after_the_final_failure_with_the_error_first(app_factory):
    clock = ManualClock()
    app = app_factory(clock=clock)
    doomed, alert, alerts = doomed_and_alert(app, retry_count=2)

    @app.task(name="never")
    def never(*args):
        raise AssertionError("a success callback ran after a failure")

    r = app.send_task(doomed.s().link_error(alert.s("pager")).link(never.s()))
    [success_cb, error_cb] = r.callbacks
    worker = app.worker()

    pump(worker, lambda: r.state == states.RETRY)
    assert error_cb.info() == {} and queue_counts(app)["ready"] == 0   # no callback between retries
    clock.advance(1.1)
    pump(worker, lambda: r.retries == 2)
    assert r.state == states.RETRY and error_cb.info() == {}
    clock.advance(2.1)
    pump(worker, lambda: r.ready() and error_cb.ready())
    assert r.state == states.FAILURE and r.retries == 2
    assert error_cb.get(timeout=5) == "pager: still broken"
    assert worker.step() == 0 and alerts == ["still broken"]
    assert success_cb.info() == {}


@own_timer
def test_retries_and_retry_exceptions_wait_their_delays_on_rabbitmq(app):
    attempts = {"flaky": [], "polite": []}   # (started, failed-at or None) per attempt

    @app.task(name="flaky", retry_count=3, retry_timeout=0)
    def flaky():
        attempts["flaky"].append([time.time(), None, nbqueue.current_task()["id"]])
        if len(attempts["flaky"]) < 3:
            attempts["flaky"][-1][1] = time.time()
            raise ConnectionError("not yet")
        return "third time"

    @app.task(name="polite")
    def polite():
        attempts["polite"].append([time.time(), None, nbqueue.current_task()["id"]])
        if len(attempts["polite"]) == 1:
            attempts["polite"][-1][1] = time.time()
            raise nbqueue.Retry(countdown=0.5, reason="rate limited")
        return "after a pause"

    r_flaky, r_polite = flaky.delay(), polite.delay()
    app.start_worker(concurrency=2)
    assert r_polite.get(timeout=20) == "after a pause" and r_polite.retries == 0
    assert r_flaky.get(timeout=30) == "third time" and r_flaky.retries == 2
    for (started, _, _), (_, failed, _), delay in zip(attempts["flaky"][1:], attempts["flaky"], [1, 2]):
        assert started >= failed + delay           # Fibonacci: 1 s, then 2 s
    assert attempts["polite"][1][0] >= attempts["polite"][0][1] + 0.5
    assert {a[2] for a in attempts["flaky"]} == {r_flaky.id}


@own_timer
def test_error_callback_runs_once_after_the_final_failure_on_rabbitmq(app):
    doomed, alert, alerts = doomed_and_alert(app, retry_count=1)
    r = app.send_task(doomed.s().link_error(alert.s("pager")))
    [error_cb] = r.callbacks
    worker = app.worker()
    pump(worker, lambda: r.state == states.RETRY)
    assert error_cb.info() == {}                    # no callback between retries
    pump(worker, lambda: r.ready() and error_cb.ready())
    assert r.state == states.FAILURE and error_cb.get(timeout=5) == "pager: still broken"
    assert worker.app.broker.reserve(worker.queues, timeout=0.3, lease=5) == [] and alerts == ["still broken"]


# -- unknown tasks and malformed messages -----------------------------------------------------------


def test_unknown_task_fails_naming_it_and_is_not_requeued(app):
    register_basics(app)
    r = app.send_task(Signature("no.such.task", args=[1]))
    worker = app.worker()
    pump(worker, r.ready)
    with pytest.raises(nbqueue.TaskFailed) as caught:
        r.get(timeout=5)
    assert caught.value.exc_type == "NotRegistered"
    assert "'no.such.task'" in caught.value.message and "not registered" in caught.value.message
    assert worker.app.broker.reserve(worker.queues, timeout=0.3, lease=5) == []
    wait_for(lambda: queue_is_empty(app))


def test_unknown_task_marked_ignore_when_not_registered_is_dropped_with_a_log_line(app, caplog):
    caplog.set_level(logging.WARNING, logger="nbqueue.worker")
    r = app.send_task(Signature("no.such.task", ignore_when_not_registered=True))
    worker = app.worker()
    pump(worker, lambda: any("no.such.task" in rec.getMessage() for rec in caplog.records))
    assert "not registered" in caplog.text
    assert r.state == states.PENDING  # dropped, not failed
    assert worker.app.broker.reserve(worker.queues, timeout=0.3, lease=5) == []
    wait_for(lambda: queue_is_empty(app))


def test_malformed_messages_are_dead_lettered_and_the_worker_keeps_going(app):
    add, _ = register_basics(app)
    queue = app.default_queue
    worker = app.start_worker()
    app.broker.publish(Outgoing(id="not-json", body="{this is not json", queue=queue))
    app.broker.publish(Outgoing(id="no-name", body='{"id": "no-name", "args": [], "kwargs": {}}', queue=queue))
    app.broker.publish(Outgoing(id="not-object", body="[1, 2, 3]", queue=queue))
    assert add.delay(2, 2).get(timeout=15) == 4
    dead = wait_for(
        lambda: (lambda d: d if len(d) == 3 else None)({x["id"]: x["reason"] for x in app.broker.dead_letters(queue)})
    )
    assert "not valid JSON" in dead["not-json"]
    assert "lacks required field" in dead["no-name"] and "name" in dead["no-name"]
    assert "not a JSON object" in dead["not-object"]
    assert worker.running
    wait_for(lambda: queue_counts(app)["dead"] == 3 and queue_is_empty(app))


# -- delayed tasks --------------------------------------------------------------------------------


@clocked
def test_countdown_and_eta_tasks_never_run_before_they_are_due(app_factory):
    clock = ManualClock()
    app = app_factory(clock=clock)
    add, _ = register_basics(app)
    soon = add.apply_async((1, 1), countdown=30)
    later = app.send_task(
        Signature("add", args=[2, 2], eta=dt.datetime.fromtimestamp(clock.time() + 60, tz=dt.timezone.utc))
    )
    worker = app.worker()
    assert worker.step() == 0
    assert queue_counts(app)["delayed"] == 2
    clock.advance(29.9)
    assert worker.step() == 0
    clock.advance(0.2)
    pump(worker, soon.ready)
    assert soon.get(timeout=5) == 2 and later.state == states.PENDING
    assert soon.info()["started_at"] >= soon.info()["created_at"] + 30
    clock.advance(29.7)                    # 59.8 s after sending
    assert worker.step() == 0
    clock.advance(0.3)
    pump(worker, later.ready)
    assert later.get(timeout=5) == 4


@clocked
def test_many_due_tasks_become_ready_together(app_factory):
    clock = ManualClock()
    app = app_factory(clock=clock)
    add, _ = register_basics(app)
    results = [add.apply_async((i, 0), countdown=10 + (i % 5)) for i in range(200)]
    assert queue_counts(app) == {"ready": 0, "delayed": 200, "in_flight": 0, "dead": 0}
    clock.advance(20)
    assert queue_counts(app)["ready"] + queue_counts(app)["delayed"] == 200
    worker = app.worker(concurrency=4)
    pump(worker, lambda: all(r.ready() for r in results), timeout=60)
    assert [r.get(timeout=5) for r in results] == list(range(200))


@clocked
def test_step_runs_its_pass_at_the_time_it_is_given(app_factory):
    """Given a task due in 30 s, when the worker steps at 29.9 s nothing runs, and stepped at
    30.1 s it runs with that time as its start (the stores read it from the App's clock)."""
    clock = ManualClock()
    app = app_factory(clock=clock)
    add, _ = register_basics(app)
    sent_at = clock.time()
    r = add.apply_async((1, 1), countdown=30)
    worker = app.worker()
    assert worker.step(now=sent_at + 29.9) == 0
    assert worker.step(now=sent_at + 30.1) == 1
    assert r.get(timeout=5) == 2 and r.info()["started_at"] == pytest.approx(sent_at + 30.1)
    assert worker.step(now=sent_at) == 0 and clock.time() == pytest.approx(sent_at + 30.1)   # time never goes back


def test_step_at_a_given_time_needs_a_settable_clock(sqlite_app):
    with pytest.raises(ValueError, match="ManualClock"):
        sqlite_app.worker().step(now=0.0)


@own_timer
def test_many_due_tasks_become_ready_together_on_rabbitmq(app):
    add, _ = register_basics(app)
    results = [add.apply_async((i, 0), countdown=0.5) for i in range(200)]
    wait_for(lambda: queue_counts(app)["ready"] == 200, timeout=20)  # all out of the delay queue
    pump(app.worker(concurrency=4), lambda: all(r.ready() for r in results), timeout=60)
    assert [r.get(timeout=5) for r in results] == list(range(200))


def test_delayed_tasks_on_a_running_worker_start_after_their_eta(app):
    add, _ = register_basics(app)
    app.start_worker(concurrency=2)
    countdowns = [0.2 * (i % 4) for i in range(12)]
    results = [add.apply_async((i, i), countdown=c) for i, c in enumerate(countdowns)]
    eta = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=0.5)
    by_eta = app.send_task(Signature("add", args=[10, 10], eta=eta))
    assert [r.get(timeout=20) for r in results] == [2 * i for i in range(12)]
    for r, countdown in zip(results, countdowns):
        info = r.info()
        assert info["started_at"] >= info["created_at"] + countdown
    assert by_eta.get(timeout=20) == 20 and by_eta.info()["started_at"] >= eta.timestamp()


# -- delivery: leases, heartbeats, fencing -----------------------------------------------------------


def test_unacknowledged_task_is_redelivered_after_its_lease_and_runs_once(app_factory):
    clock = ManualClock()
    app = app_factory(clock=clock, visibility_timeout=10)
    skip_unless_leases_expire(app)
    runs = []
    app.register_task("job", lambda: runs.append(1) or "ran")
    r = app.send_task(Signature("job"))
    [abandoned] = wait_for(lambda: app.broker.reserve([app.default_queue], timeout=0.1, lease=10))  # its worker died
    worker = app.worker()
    clock.advance(9.5)
    assert worker.step() == 0 and runs == []
    clock.advance(1)
    pump(worker, r.ready)
    assert r.get(timeout=5) == "ran" and runs == [1]
    assert app.broker.ack(abandoned) is False  # the dead worker's delivery is stale
    assert queue_is_empty(app)


def test_result_is_stored_before_the_ack_and_a_finished_task_delivered_again_is_not_rerun(app, monkeypatch):
    runs = []
    app.register_task("once", lambda: runs.append(1) or len(runs))
    state_at_ack = []
    real_ack = app.broker.ack

    def watching_ack(delivery):
        state_at_ack.append(app.backend.get(delivery.message_id)["state"])
        return real_ack(delivery)

    monkeypatch.setattr(app.broker, "ack", watching_ack)
    real_ack_many = app.broker.ack_many

    def watching_ack_many(deliveries):
        state_at_ack.extend(app.backend.get(d.message_id)["state"] for d in deliveries)
        return real_ack_many(deliveries)

    if type(app.engine).finish is not SplitEngine.finish:
        # an engine that stores results and acks in one round trip, run in order by the server:
        # what can be checked is that an ack goes after its task's result in the same call,
        # or acks a task whose result was stored already
        real_finish = app.engine.finish

        def watching_finish(outcomes, acks=(), **kwargs):
            ids = {o.task_id for o in outcomes}
            for d in acks:
                record = app.backend.get(d.message_id) or {}
                stored_first = d.message_id in ids or record.get("state") in states.READY_STATES
                state_at_ack.append(states.SUCCESS if stored_first else "acked before its result was queued")
            return real_finish(outcomes, acks, **kwargs)

        monkeypatch.setattr(app.engine, "finish", watching_finish)
    elif type(app.broker).ack_many is not Broker.ack_many:      # a broker that acks a batch at once
        monkeypatch.setattr(app.broker, "ack_many", watching_ack_many)
    message, record, out = app.prepare(Signature("once"))
    app.publish([record], [out])
    worker = app.worker()
    pump(worker, lambda: len(state_at_ack) == 1)
    assert state_at_ack == [states.SUCCESS]
    # the same message once more, as if its worker had died after storing the result, before the ack
    app.broker.publish(out)
    pump(worker, lambda: len(state_at_ack) == 2)
    assert runs == [1] and app.result(out.id).get(timeout=5) == 1
    wait_for(lambda: queue_is_empty(app))


def _slowpoke(app, first_running: threading.Event, release_first: threading.Event, attempts: list):
    """A task whose first attempt waits for ``release_first``; every attempt returns its number."""

    @app.task(name="slowpoke")
    def slowpoke():
        attempts.append(len(attempts) + 1)
        n = attempts[-1]
        if n == 1:
            first_running.set()
            release_first.wait(15)
        return f"attempt {n}"

    return slowpoke


@clocked
def test_stale_attempt_cannot_overwrite_the_newer_result(app_factory):
    clock = ManualClock()
    app = app_factory(clock=clock, visibility_timeout=5)
    first_running, release_first, attempts = threading.Event(), threading.Event(), []
    r = _slowpoke(app, first_running, release_first, attempts).delay()
    # named as a process that has ended: once its lease lapses its attempt is taken for dead
    stale_worker, fresh_worker = app.worker(name=dead_worker_name()), app.worker()
    [d1] = wait_for(lambda: app.broker.reserve([app.default_queue], timeout=0.1, lease=5))
    first = threading.Thread(target=stale_worker.process, args=(d1,), daemon=True)
    first.start()  # no heartbeat thread runs for it: its lease is not extended
    assert first_running.wait(15)
    clock.advance(6)
    pump(fresh_worker, r.ready)
    assert r.get(timeout=5) == "attempt 2"
    release_first.set()
    first.join(15)
    assert not first.is_alive() and attempts == [1, 2]
    assert app.result(r.id).get(timeout=5) == "attempt 2"
    assert queue_is_empty(app)


@own_timer
def test_attempt_orphaned_by_a_lost_connection_cannot_overwrite_the_newer_result(app_factory):
    first_app, second_app = app_factory(), app_factory()
    first_running, release_first, attempts = threading.Event(), threading.Event(), []
    for a in (first_app, second_app):
        _slowpoke(a, first_running, release_first, attempts)
    r = first_app.send_task(Signature("slowpoke"))
    [d1] = wait_for(lambda: first_app.broker.reserve([first_app.default_queue], timeout=0.1, lease=5))
    first = threading.Thread(target=first_app.worker(name=dead_worker_name()).process, args=(d1,), daemon=True)
    first.start()
    assert first_running.wait(15)
    first_app.broker.close()  # the connection dies: RabbitMQ hands the message to another consumer
    pump(second_app.worker(), r.ready)
    assert r.get(timeout=5) == "attempt 2"
    release_first.set()
    first.join(15)
    assert not first.is_alive() and attempts == [1, 2]
    assert second_app.result(r.id).get(timeout=5) == "attempt 2"


def test_task_running_longer_than_its_lease_is_not_redelivered(app_factory):
    app = app_factory(visibility_timeout=0.5)
    runs = []

    @app.task(name="long")
    def long():
        runs.append(1)
        time.sleep(1.5)  # three leases long; the heartbeat keeps extending it
        return "done"

    r = long.delay()
    app.start_worker()
    app.start_worker()  # would pick the message up if its lease ran out
    assert r.get(timeout=20) == "done"
    assert runs == [1]
    wait_for(lambda: queue_is_empty(app))


@clocked
def test_kernel_worker_hands_back_a_task_it_does_not_know_yet_then_runs_it(app_factory):
    """Given a worker with a grace period (a notebook kernel's: the cells defining tasks may
    run after it starts), a task it does not know is handed back, not failed; once the task
    is registered it runs; after the grace period an unknown task fails as usual."""
    clock = ManualClock()
    app = app_factory(clock=clock)
    worker = app.worker(unknown_grace=60)
    res = app.send_task(Signature("defined_later", args=[2]))
    assert worker.step() == 1
    assert res.state == states.PENDING                      # handed back, not failed
    app.register_task("defined_later", lambda x: x * 10)
    clock.advance(2)
    pump(worker, res.ready)
    assert res.get(timeout=5) == 20
    clock.advance(120)                                       # past the grace period
    late = app.send_task(Signature("never_defined"))
    pump(worker, late.ready)
    with pytest.raises(nbqueue.TaskFailed, match="not registered"):
        late.get(timeout=5)


def test_a_finish_that_fails_is_dead_lettered_and_its_batch_mates_are_recorded(app, monkeypatch):
    """Given two tasks reserved in one batch, when finishing one of them raises (here its
    follow-up step breaks), then that message is dead-lettered with the reason and the
    other task's result is recorded: one bad message never holds back the batch."""
    app.register_task("fine", lambda: "fine")
    app.register_task("cursed", lambda: "cursed")
    real_on_success = nbqueue.workflow.on_success

    def breaking_on_success(app_, message, result_text, **kwargs):
        if message.name == "cursed":
            raise RuntimeError("follow-up step broke")
        return real_on_success(app_, message, result_text, **kwargs)

    monkeypatch.setattr(nbqueue.workflow, "on_success", breaking_on_success)
    cursed = app.signature("cursed")
    cursed.on_success = [app.signature("fine")]          # not a plain finish: goes through on_success
    bad = app.send_task(cursed)
    good = app.send_task(app.signature("fine"))
    worker = app.worker(concurrency=2)
    pump(worker, lambda: good.ready() and any(d["id"] == bad.id for d in app.broker.dead_letters(app.default_queue)))
    assert good.get(timeout=5) == "fine"
    [dead] = [d for d in app.broker.dead_letters(app.default_queue) if d["id"] == bad.id]
    assert "follow-up step broke" in dead["reason"]


def test_a_finished_task_result_does_not_wait_for_a_slow_batch_mate(app):
    """Given a worker thread that reserved a fast task and a slow one together (prefetch),
    the fast task's result is readable while the slow one still runs: the slow one is only
    released once the fast result has been read, so waiting for it would deadlock."""
    release = threading.Event()
    app.register_task("fast", lambda: "fast")
    app.register_task("slow", lambda: release.wait(30) and "slow")
    fast = app.send_task(app.signature("fast"))
    slow = app.send_task(app.signature("slow"))
    worker = app.start_worker(concurrency=1, prefetch=4)
    try:
        assert fast.get(timeout=15) == "fast"
        assert not slow.ready()
    finally:
        release.set()
    assert slow.get(timeout=15) == "slow"
    worker.stop()


def test_event_hooks_run_inside_the_task_context_and_see_each_outcome(app):
    @app.task(name="add")
    def add(x, y):
        return x + y

    @app.task(name="boom")
    def boom():
        raise ValueError("boom")

    worker = app.worker(1)
    seen = []
    worker.events.on_start.append(lambda message, queue: seen.append(("start", nbqueue.current_task()["id"])))
    worker.events.on_finish.append(
        lambda message, queue, outcome, seconds: seen.append((outcome, nbqueue.current_task()["id"]))
    )
    ok, failed = add.delay(1, 2), boom.delay()
    worker.drain()
    assert ok.get(timeout=10) == 3 and failed.state == states.FAILURE
    assert seen == [("start", ok.id), ("SUCCESS", ok.id), ("start", failed.id), ("FAILURE", failed.id)]
    assert nbqueue.current_task() is None


def test_without_hooks_a_task_still_sees_its_context_and_the_worker_thread_leaves_it(app):
    @app.task(name="whoami")
    def whoami():
        return nbqueue.current_task()["id"]

    worker = app.worker(1)
    handle = whoami.delay()
    worker.drain()
    assert handle.get(timeout=10) == handle.id and nbqueue.current_task() is None
