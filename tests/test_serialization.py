"""Serialization: JSON with type tags, errors at send time, pickle only by opt-in.

The encoding does not depend on the store (results are the same JSON text in every
backend), so these tests run on SQLite files of their own.
"""
from __future__ import annotations

import datetime as dt
import decimal
import threading
import time
import uuid

import numpy as np
import pandas as pd
import pytest

import nbqueue
from nbqueue import Signature, serialization, states
from nbqueue.serialization import Serializer


class Point:
    """A user class: not JSON, picklable (module level)."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __eq__(self, other):
        return isinstance(other, Point) and (self.x, self.y) == (other.x, other.y)


def wait_ready(app, result, timeout=15.0):
    worker = app.worker()
    deadline = time.monotonic() + timeout
    while not result.ready():
        assert time.monotonic() < deadline, f"{result!r} not ready within {timeout}s"
        worker.step()
        time.sleep(0.01)


def through_json(value, serializer=None):
    serializer = serializer or Serializer()
    text = serialization.dumps(serializer.encode(value))
    return serializer.decode(serialization.loads(text))


@pytest.fixture
def app(tmp_path):
    app = nbqueue.App(f"sqlite:///{tmp_path}/ser.db", default_queue="ser")
    yield app
    app.close()


def sample_frame():
    return pd.DataFrame(
        {
            "n": [1, 2, 3],
            "x": [1.5, np.nan, -2.25],
            "label": ["a", "b", "c"],
            "when": pd.to_datetime(["2024-01-01", "2024-02-29", "2024-12-31"]).as_unit("ns"),
            "flag": [True, False, True],
        },
        index=pd.Index([10, 20, 30], name="key"),
    )


SCALARS = [
    ("tuple", (1, "two", (3.0,))),
    ("set", {1, 2, 3}),
    ("frozenset", frozenset({"a", "b"})),
    ("bytes", b"\x00\xffbinary"),
    ("datetime", dt.datetime(2024, 5, 6, 7, 8, 9, 123456)),
    ("aware datetime", dt.datetime(2024, 5, 6, 7, 8, 9, tzinfo=dt.timezone(dt.timedelta(hours=2)))),
    ("date", dt.date(2024, 2, 29)),
    ("time", dt.time(23, 59, 1)),
    ("timedelta", dt.timedelta(days=1, seconds=3.5)),
    ("Decimal", decimal.Decimal("12345678901234567890.000000001")),
    ("UUID", uuid.UUID("12345678-1234-5678-1234-567812345678")),
    ("complex", 3 - 4j),
    ("non-string keys", {1: "one", (2, 3): "pair"}),
    ("nested", {"items": [(1, 2), {b"k"}], "when": dt.date(2020, 1, 1)}),
    ("infinity", float("inf")),
]


@pytest.mark.parametrize("label, value", SCALARS, ids=[label for label, _ in SCALARS])
def test_tagged_types_come_back_as_the_same_type(label, value):
    back = through_json(value)
    assert back == value and type(back) is type(value)


def test_nan_comes_back_as_nan():
    back = through_json(float("nan"))
    assert isinstance(back, float) and back != back


def test_dataframes_series_and_arrays_come_back_equal():
    frame = sample_frame()
    pd.testing.assert_frame_equal(through_json(frame), frame)
    series = pd.Series([1.5, 2.5, None], name="price")
    pd.testing.assert_series_equal(through_json(series), series)
    unnamed = pd.Series([1, 2, 3])
    pd.testing.assert_series_equal(through_json(unnamed), unnamed)
    for array in (np.arange(12, dtype=np.int32).reshape(3, 4), np.array([1.5, np.nan], dtype=np.float32), np.array(["a", "bc"])):
        back = through_json(array)
        assert isinstance(back, np.ndarray) and back.dtype == array.dtype and back.shape == array.shape
        np.testing.assert_array_equal(back, array)


def test_every_tagged_type_round_trips_through_a_task_on_a_worker(app):
    @app.task(name="echo")
    def echo(*args, **kwargs):
        return {"args": args, "kwargs": kwargs, "types": [type(a).__name__ for a in args]}

    values = [v for _, v in SCALARS]
    frame, array = sample_frame(), np.linspace(0, 1, 6).reshape(2, 3)
    r = echo.delay(*values, frame=frame, array=array, series=frame["x"])
    app.start_worker()
    out = r.get(timeout=15)
    assert out["args"] == tuple(values)                       # arguments reached the task intact ...
    assert out["types"] == [type(v).__name__ for v in values]  # ... as their own types
    pd.testing.assert_frame_equal(out["kwargs"]["frame"], frame)
    pd.testing.assert_series_equal(out["kwargs"]["series"], frame["x"])
    np.testing.assert_array_equal(out["kwargs"]["array"], array)


def test_unencodable_argument_fails_at_send_naming_it_and_nothing_is_enqueued(app):
    @app.task(name="configure")
    def configure(name, settings):
        return name

    with pytest.raises(nbqueue.SerializationError) as caught:
        configure.apply_async(("db", {"lock": threading.Lock()}), id="never-sent")
    assert "argument 2 ('settings') of task 'configure'['lock'] has type _thread.lock" in str(caught.value)
    with pytest.raises(nbqueue.SerializationError, match=r"keyword argument 'settings'.*has type .*Point"):
        configure.apply_async(kwargs={"name": "db", "settings": Point(1, 2)}, id="never-sent-either")
    assert isinstance(caught.value, TypeError)  # a SerializationError is also a TypeError
    assert app.backend.get("never-sent") is None and app.backend.get("never-sent-either") is None
    assert all(row["ready"] + row["delayed"] + row["in_flight"] == 0 for row in app.broker.stats())
    assert app.tasks().empty


def test_unencodable_result_fails_the_task_with_a_serialization_error(app):
    app.register_task("make_point", lambda: Point(1, 2))
    r = app.send_task(Signature("make_point"))
    wait_ready(app, r)
    with pytest.raises(nbqueue.TaskFailed) as caught:
        r.get(timeout=5)
    assert caught.value.exc_type == "SerializationError" and "result of task 'make_point'" in caught.value.message


def test_pickle_is_used_only_when_the_app_opts_in(tmp_path):
    url = f"sqlite:///{tmp_path}/pickle.db"
    json_app = nbqueue.App(url, default_queue="p")
    pickle_app = nbqueue.App(url, default_queue="p", serializer="pickle")
    try:
        def scale(point, k):
            return Point(point.x * k, point.y * k)

        json_app.register_task("scale", scale)
        pickle_app.register_task("scale", scale)
        with pytest.raises(nbqueue.SerializationError, match="serializer='pickle'"):
            json_app.send_task(Signature("scale", args=[Point(1, 2), 3]))

        r = pickle_app.send_task(Signature("scale", args=[Point(1, 2), 3]))
        wait_ready(pickle_app, r)
        assert r.get(timeout=5) == Point(3, 6)
    finally:
        json_app.close()
        pickle_app.close()


def test_a_json_only_worker_refuses_a_pickled_message_with_a_clear_failure(tmp_path):
    url = f"sqlite:///{tmp_path}/refuse.db"
    producer = nbqueue.App(url, default_queue="p", serializer="pickle")
    json_worker_app = nbqueue.App(url, default_queue="p")
    ran = []
    try:
        json_worker_app.register_task("scale", lambda point, k: ran.append(point))
        r = producer.send_task(Signature("scale", args=[Point(1, 2), 3]))
        wait_ready(json_worker_app, r)
        assert r.state == states.FAILURE and ran == []
        with pytest.raises(nbqueue.TaskFailed) as caught:
            r.get(timeout=5)
        assert caught.value.exc_type == "SerializationError"
        assert "pickle" in caught.value.message and "'scale'" in caught.value.message
    finally:
        producer.close()
        json_worker_app.close()
