"""What goes in comes out, on every broker: a value that send accepts reaches the task
equal and of the same type, and comes back so to the waiting side; a value it cannot
carry is refused at send, naming the argument, and nothing is enqueued.

Messages are sent before the worker starts, so the worker reads them from the store
(the JSON body), not from the hand-over between threads of one process; one test runs
``nbqueue worker`` in another process.
"""
from __future__ import annotations

import datetime as dt
import decimal
import fractions
import zoneinfo
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import nbqueue
from nbqueue import Signature, chain, chord, group, serialization, states
from nbqueue.testing import wait_for

from conftest import cli_worker

PARIS = zoneinfo.ZoneInfo("Europe/Paris")


def echo_app(app):
    @app.task(name="echo")
    def echo(value):
        return value

    @app.task(name="describe")
    def describe(*args, **kwargs):
        """What the task received: the values and their types, as the worker decoded them."""
        return {"args": list(args), "kwargs": kwargs, "types": [type(a).__qualname__ for a in args]}

    @app.task(name="collect")
    def collect(values):
        return values

    return echo, describe, collect


def nested(depth: int, leaf=0):
    """A list ``depth`` levels deep."""
    value = leaf
    for _ in range(depth):
        value = [value]
    return value


def nested_tagged(depth: int):
    """``depth`` levels of containers with a deeper JSON form than lists: dicts with int keys and tuples."""
    value = 2**70
    for level in range(depth):
        value = {level: value} if level % 2 else (value,)
    return value


def depth_of(value) -> int:
    if isinstance(value, dict):
        return 1 + max(map(depth_of, value.values()), default=0)
    if isinstance(value, (list, tuple)):
        return 1 + max(map(depth_of, value), default=0)
    return 0


def nothing_enqueued(app) -> bool:
    return app.tasks().empty and all(
        row["ready"] + row["delayed"] + row["in_flight"] == 0 for row in app.broker.stats()
    )


# -- 1. integers of any size -----------------------------------------------------------------------
BIG = [2**64, -(2**64), 2**63, -(2**63) - 1, 10**400, 2**64 - 1]


def test_integers_of_any_size_come_back_as_the_same_int(app):
    echo, describe, collect = echo_app(app)
    r = echo.delay(2**64)
    nested_value = [2**70, {"k": 2**65, "list": [-(2**100), 7]}, (2**64,), {2**80: "key"}]
    r_nested = echo.delay(nested_value)
    r_described = describe.apply_async(BIG, kwargs={"n": 2**64})
    r_chain = app.send(chain(echo.s(2**64 + 1), echo.s()))              # a result carried on to the next step
    r_chord = app.send(chord([echo.s(2**64 + i) for i in range(3)], collect.s()))   # results gathered by the chord
    app.start_worker()
    assert r.get(timeout=30) == 2**64 and type(r.get(timeout=30)) is int
    assert r_nested.get(timeout=30) == nested_value
    out = r_described.get(timeout=30)
    assert out["args"] == BIG and out["types"] == ["int"] * len(BIG) and out["kwargs"] == {"n": 2**64}
    assert r_chain.get(timeout=30) == 2**64 + 1
    assert r_chord.get(timeout=30) == [2**64, 2**64 + 1, 2**64 + 2]
    frame = app.tasks()                   # the notebook's table decodes them too
    assert 2**64 in frame["result"].tolist()


# -- 3. types that come back as themselves --------------------------------------------------------------
TYPED = [
    dt.datetime(2024, 7, 1, 12, 30, tzinfo=PARIS),
    dt.datetime(2024, 10, 27, 2, 30, fold=1, tzinfo=PARIS),          # the second 02:30 of the night clocks go back
    dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc),
    dt.time(8, 15, tzinfo=PARIS),
    pd.Timestamp("2024-07-01 12:30:00.123456789", tz="Europe/Paris"),
    pd.Timestamp("2024-07-01").as_unit("s"),
    pd.Timedelta(1, "ns"),
    bytearray(b"\x00mutable"),
    np.float32(0.1), np.int64(-5), np.bool_(True), np.datetime64("2024-01-01T00:00:00.000000001"),
    decimal.Decimal("0.10"), fractions.Fraction(1, 3), dt.timedelta(days=999_999, microseconds=1),
]


def test_zone_aware_datetimes_timestamps_bytearrays_and_numpy_scalars_keep_their_type(app):
    echo, describe, collect = echo_app(app)
    r = describe.apply_async(TYPED)
    r_paris = echo.delay(dt.datetime(2024, 7, 1, 12, 30, tzinfo=PARIS))
    app.start_worker()
    out = r.get(timeout=30)
    assert out["types"] == [type(v).__qualname__ for v in TYPED]      # as the task received them
    for sent, back in zip(TYPED, out["args"]):                         # and as they came back
        assert type(back) is type(sent) and back == sent, (sent, back)
    assert [getattr(v, "fold", 0) for v in out["args"]] == [getattr(v, "fold", 0) for v in TYPED]
    paris = r_paris.get(timeout=30)
    assert paris.tzinfo is PARIS and paris.utcoffset() == dt.timedelta(hours=2)
    stamp = out["args"][4]
    assert stamp.tz == PARIS and stamp.unit == "ns" and stamp.nanosecond == 789


# -- 2. frames and arrays, with the JSON and the pickle serializer -------------------------------------
def sample_frame():
    rng = np.random.default_rng(20)
    index = pd.RangeIndex(1000, 1200, name="row")
    return pd.DataFrame({
        "x": rng.random(200),                                      # float64: every bit
        "y": rng.random(200).astype("float32"),                    # float32 stays float32
        "n": pd.array([None if i % 7 == 0 else i for i in range(200)], dtype="Int64"),
        "label": pd.Categorical(rng.choice(["lo", "hi"], 200), categories=["lo", "hi"], ordered=True),
        "when": pd.date_range("2024-01-01", periods=200, freq="h", tz="Europe/Paris"),
        "note": pd.Series([None if i % 5 == 0 else f"n{i}" for i in range(200)], dtype=object, index=index),
    }, index=index).rename_axis(columns="field")


@pytest.mark.parametrize("serializer", ["json", "pickle"])
def test_dataframes_series_and_arrays_come_back_exactly(app_factory, serializer):
    app = app_factory(serializer=serializer)
    echo, describe, collect = echo_app(app)
    frame = sample_frame()
    array = np.asfortranarray(np.arange(12, dtype=">i2").reshape(3, 4))
    r_frame, r_series, r_array = echo.delay(frame), echo.delay(frame["y"]), echo.delay(array)
    r_dtypes = describe.delay(frame)
    app.start_worker()
    back = r_frame.get(timeout=30)
    assert back.equals(frame)
    pd.testing.assert_frame_equal(back, frame, check_exact=True)
    assert back["y"].dtype == np.float32 and back.index.name == "row" and back.columns.name == "field"
    assert back["note"].tolist() == frame["note"].tolist() and back["note"].iloc[0] is None
    pd.testing.assert_series_equal(r_series.get(timeout=30), frame["y"], check_exact=True)
    back_array = r_array.get(timeout=30)
    assert back_array.dtype == array.dtype and back_array.flags.f_contiguous and np.array_equal(back_array, array)
    received = r_dtypes.get(timeout=30)["args"][0]                       # the worker had the same frame
    pd.testing.assert_frame_equal(received, frame, check_exact=True)


def test_a_frame_arrow_cannot_carry_is_refused_at_send_naming_the_column_or_pickled_when_opted_in(app_factory):
    app = app_factory()
    echo, describe, collect = echo_app(app)
    frame = pd.DataFrame({"mixed": pd.Series([1, "one"], dtype=object)})
    with pytest.raises(
        nbqueue.SerializationError, match=r"argument 1 \('value'\) of task 'echo' has column 'mixed' of object dtype"
    ):
        echo.delay(frame)
    assert nothing_enqueued(app)
    pickling = app_factory(serializer="pickle")
    echo, describe, collect = echo_app(pickling)
    r = echo.delay(frame)
    pickling.start_worker()
    pd.testing.assert_frame_equal(r.get(timeout=30), frame)


# -- 4. keyword names ---------------------------------------------------------------------------------
def test_non_string_keyword_names_are_refused_at_send_on_every_path(app):
    echo, describe, collect = echo_app(app)
    bad = Signature("describe", kwargs={1: "one"}, app=app)
    sends = {
        "apply_async": lambda: describe.apply_async(kwargs={1: "one"}),
        "send_task": lambda: app.send_task(Signature("describe", kwargs={1: "one"})),
        "send_many": lambda: app.send_many([describe.s(1), bad]),
        "group": lambda: app.send(group(describe.s(1), bad)),
        "chain": lambda: app.send(chain(describe.s(1), bad)),
        "chord header": lambda: app.send(chord([describe.s(1), bad], collect.s())),
        "chord callback": lambda: app.send(
            chord([describe.s(1)], Signature("collect", kwargs={(1, 2): "pair"}, app=app))
        ),
        "link": lambda: app.send_task(describe.s(1).link(bad)),
        "link_error": lambda: app.send_task(describe.s(1).link_error(bad)),
        "periodic": lambda: app.periodic("@every 1h", bad, name="bad-kwargs"),
        "periodic_task": lambda: app.periodic_task("@every 1h", kwargs={1: "one"})(lambda **kw: kw),
    }
    for path, send in sends.items():
        with pytest.raises(
            nbqueue.SerializationError,
            match=r"keyword argument (1|\(1, 2\)) of task '[^']+' has a "
            r"name of type (int|tuple); keyword argument names must be strings",
        ):
            send()
    assert nothing_enqueued(app)


# -- 5. nesting and cycles ------------------------------------------------------------------------------
def test_deep_and_self_containing_arguments_are_refused_at_send_naming_the_argument(app):
    echo, describe, collect = echo_app(app)
    loop = [1, 2]
    loop.append(loop)
    with pytest.raises(
        nbqueue.SerializationError, match=r"argument 1 \('value'\) of task 'echo' is nested more than 100 levels deep"
    ):
        echo.delay(nested(1000))
    with pytest.raises(
        nbqueue.SerializationError,
        match=r"argument 1 \('value'\) of task 'echo' contains itself \(the whole value holds itself at \[2\]\)",
    ):
        echo.delay(loop)
    with pytest.raises(
        nbqueue.SerializationError,
        match=r"keyword argument 'x' of task 'describe' contains itself \(its item \['a'\] holds itself at \[2\]\)",
    ):
        describe.apply_async(kwargs={"x": {"a": loop}})
    with pytest.raises(nbqueue.SerializationError, match="nested more than"):
        echo.delay(nested(serialization.MAX_DEPTH + 1))
    assert nothing_enqueued(app)


def test_the_deepest_value_send_accepts_round_trips_through_a_worker(app):
    echo, describe, collect = echo_app(app)
    deepest = nested(serialization.MAX_DEPTH)
    tagged = nested_tagged(serialization.MAX_DEPTH)
    r_list, r_tagged = echo.delay(deepest), echo.delay(tagged)
    r_chain = app.send(chain(echo.s(tagged), echo.s()))
    app.register_task("depths", lambda values: [depth_of(v) for v in values])
    r_chord = app.send(
        chord([echo.s(deepest), echo.s(tagged)], Signature("depths", app=app))
    )  # one level more, as arguments
    app.start_worker()
    assert r_list.get(timeout=30) == deepest
    assert r_tagged.get(timeout=30) == tagged
    assert r_chain.get(timeout=30) == tagged
    assert r_chord.get(timeout=30) == [serialization.MAX_DEPTH, serialization.MAX_DEPTH]


# -- 7. results that cannot be encoded -------------------------------------------------------------------
def test_a_result_that_cannot_be_encoded_ends_failure_naming_the_result_and_the_worker_carries_on(app):
    loop: list = []
    loop.append(loop)
    results = {"surrogate": "\ud800", "self_list": loop, "deep_list": nested(1000)}
    for name, value in results.items():
        app.register_task(name, lambda value=value: value)
    reasons = {
        "surrogate": "is a string with a lone surrogate",
        "self_list": "contains itself",
        "deep_list": "is nested more than 100 levels deep",
    }
    sent = {name: app.send_task(Signature(name)) for name in results}
    after = app.send_task(Signature("echo_after", args=["fine"]))
    app.register_task("echo_after", lambda x: x)
    app.start_worker()
    for name, r in sent.items():
        wait_for(lambda: r.state == states.FAILURE, 30, message=f"{name} ends FAILURE")
        with pytest.raises(nbqueue.TaskFailed) as caught:
            r.get(timeout=5)
        assert caught.value.exc_type == "SerializationError"
        assert f"result of task {name!r}" in caught.value.message and reasons[name] in caught.value.message
    assert after.get(timeout=30) == "fine"


def test_a_string_with_a_lone_surrogate_is_refused_at_send_naming_the_argument(app):
    echo, describe, collect = echo_app(app)
    with pytest.raises(
        nbqueue.SerializationError,
        match=r"argument 1 \('value'\) of task 'echo', at \[1\]: is a string with a lone surrogate",
    ):
        echo.delay(["ok", "bad \ud800"])
    with pytest.raises(
        nbqueue.SerializationError,
        match=r"keyword argument 'k' of task 'describe', at key '\\udc00': is a string with a lone surrogate",
    ):
        describe.apply_async(kwargs={"k": {"\udc00": 1}})
    assert nothing_enqueued(app)


# -- the same through `nbqueue worker` in another process ----------------------------------------------
TASKS_MODULE = '''
import nbqueue
app = nbqueue.App.from_env()

@app.task(name="echo")
def echo(value):
    return value

@app.task(name="dtypes")
def dtypes(frame):
    return {str(k): str(v) for k, v in frame.dtypes.items()}
'''


@pytest.mark.parametrize("app_kind", ["sqlite", "redis", "amqp"], indirect=True)    # memory:// lives inside one process
def test_a_worker_process_receives_and_returns_values_exactly(app, tmp_path):
    (tmp_path / "exact_tasks.py").write_text(TASKS_MODULE)
    frame = sample_frame()
    sent = [
        2**64,
        [2**70, {"k": -(2**65)}],
        dt.datetime(2024, 7, 1, 12, 30, tzinfo=PARIS),
        bytearray(b"x"),
        np.float32(1.5),
        nested_tagged(serialization.MAX_DEPTH),
    ]
    results = [app.send_task(Signature("echo", args=[value])) for value in sent]
    r_frame = app.send_task(Signature("echo", args=[frame]))
    r_dtypes = app.send_task(Signature("dtypes", args=[frame]))
    with cli_worker(app, tmp_path, "exact_tasks", NBQUEUE_LOG_LEVEL="WARNING") as (proc, log):
        wait_for(lambda: r_dtypes.ready() or proc.poll() is not None, 60, message="the worker process ran the tasks")
        assert proc.poll() is None, Path(log).read_text(errors="replace")
        for value, r in zip(sent, results):
            back = r.get(timeout=30)
            assert type(back) is type(value) and back == value
        pd.testing.assert_frame_equal(r_frame.get(timeout=30), frame, check_exact=True)
        assert r_dtypes.get(timeout=30) == {str(k): str(v) for k, v in frame.dtypes.items()}
