"""Inline mode (inline.py): every task runs in the caller at send time, as a worker would run it."""
from __future__ import annotations

import datetime as dt
import threading

import pandas as pd
import pytest

import nbqueue
from nbqueue import states


@pytest.fixture(params=["memory", "sqlite"])
def app(request, tmp_path):
    url = "memory://" + tmp_path.name if request.param == "memory" else f"sqlite:///{tmp_path}/nb.db"
    app = nbqueue.App(url, inline=True)
    yield app
    app.close()


def test_a_send_returns_a_finished_result_run_in_the_calling_thread(app):
    ran_in = []

    @app.task
    def add(x, y):
        ran_in.append(threading.current_thread())
        return x + y

    result = add.delay(2, 3)
    assert result.state == states.SUCCESS and result.get(timeout=0) == 5
    assert ran_in == [threading.current_thread()]
    assert app.tasks()["state"].tolist() == ["SUCCESS"]
    assert not app.workers                                  # no worker threads were started


def test_values_go_through_the_same_encoding(app):
    @app.task
    def echo(value):
        return value

    frame = pd.DataFrame({"a": pd.array([1, None], dtype="Int64"),
                          "t": pd.to_datetime(["2024-01-01", "2024-01-02"], utc=True)})
    out = echo.delay(frame).get(timeout=0)
    pd.testing.assert_frame_equal(out, frame)
    assert echo.delay((1, 2)).get(timeout=0) == (1, 2)
    assert echo.delay(dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc)).get(timeout=0).tzinfo is not None
    with pytest.raises(nbqueue.SerializationError, match=r"argument 1 \('value'\) of task"):
        echo.delay(object())
    with pytest.raises(nbqueue.TaskFailed, match="result of task"):
        app.task(lambda: object(), name="bad_result").delay().get(timeout=0)


def test_failures_are_recorded_not_raised_at_send_and_retries_do_not_wait(app):
    attempts = []

    @app.task(retry_count=3, retry_timeout=60)
    def flaky(x):
        attempts.append(x)
        if len(attempts) < 3:
            raise ValueError("not yet")
        return x * 2

    @app.task
    def broken():
        raise ZeroDivisionError("division by zero")

    result = flaky.delay(21)                                 # retry delays of a minute and more: skipped, not waited
    assert result.get(timeout=0) == 42 and result.retries == 2 and len(attempts) == 3
    failed = broken.delay()
    assert failed.state == states.FAILURE
    with pytest.raises(nbqueue.TaskFailed, match="ZeroDivisionError"):
        failed.get(timeout=0)
    assert app.clock.time() == pytest.approx(app.clock.base.time(), abs=1)   # the clock is set back afterwards


def test_callbacks_chains_groups_and_chords(app):
    @app.task
    def add(x, y):
        return x + y

    @app.task
    def total(values):
        return sum(values)

    @app.task
    def div(x, y):
        return x / y

    @app.task
    def note(*args):
        return list(args)

    linked = add.s(1, 2)
    linked.link(add.s(10))
    sent = app.send_task(linked)
    assert sent.get(timeout=0) == 3 and sent.callbacks[0].get(timeout=0) == 13
    erring = div.s(1, 0)
    erring.link_error(note.si("failed"))
    failed = app.send_task(erring)
    assert failed.state == states.FAILURE and failed.callbacks[0].get(timeout=0) == ["division by zero", "failed"]
    assert app.send(nbqueue.chain(add.s(1, 2), add.s(10), add.s(100))).get(timeout=0) == 113
    assert app.send(nbqueue.group([add.s(i, i) for i in range(5)])).get(timeout=0) == [0, 2, 4, 6, 8]
    assert app.send(nbqueue.chord([add.s(i, i) for i in range(5)], total.s())).get(timeout=0) == 20
    on_queue = app.send(nbqueue.chain(add.s(1, 1), add.s(1).set(queue="elsewhere")))
    assert on_queue.get(timeout=0) == 3                       # a step sent to another queue runs too


def test_an_eta_does_not_hold_the_send(app):
    @app.task
    def now_or_later():
        return "ran"

    assert now_or_later.apply_async(countdown=3600).get(timeout=0) == "ran"


def test_the_result_cache_works_inline(app):
    @app.task(cache=True)
    def square(x):
        return x * x

    first, second = square.delay(4), square.delay(4)
    assert first.get(timeout=0) == second.get(timeout=0) == 16
    assert app.cache_info(second.id)["from"] == first.id


# The example README.md shows, as it is there.

def test_readme_pytest_example():
    app = nbqueue.App("memory://", inline=True)

    @app.task(retry_count=2)
    def parse(text):
        return [int(x) for x in text.split(",")]

    assert parse.delay("1,2,3").get() == [1, 2, 3]
    with pytest.raises(nbqueue.TaskFailed, match="ValueError"):
        parse.delay("1,x").get()
    assert parse.delay("1,x").retries == 2
