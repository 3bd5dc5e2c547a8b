"""Serialization: JSON with type tags, errors at send time, pickle only by opt-in.

The encoding does not depend on the store (results are the same JSON text in every
backend), so these tests run on SQLite files of their own.
"""
from __future__ import annotations

import collections
import datetime as dt
import decimal
import enum
import fractions
import threading
import time
import uuid
import zoneinfo

import dateutil.tz
import numpy as np
import pandas as pd
import pytest

import nbqueue
from nbqueue import Signature, serialization, states
from nbqueue.serialization import Serializer
from nbqueue.signature import to_message


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
    ("negative zero", -0.0),
    ("int beyond 64 bits", 2**64),
    ("negative int beyond 64 bits", -(2**63) - 1),
    ("int of 5,000 digits", 10**5000),
    ("ints nested in lists and dicts", [2**70, {"k": [2**100, {2**90: -(2**65)}]}]),
    ("bytearray", bytearray(b"\x00mutable")),
    ("memoryview", memoryview(b"view")),
    ("Paris datetime", dt.datetime(2024, 7, 1, 12, 30, tzinfo=zoneinfo.ZoneInfo("Europe/Paris"))),
    ("datetime with fold", dt.datetime(2024, 10, 27, 2, 30, fold=1, tzinfo=zoneinfo.ZoneInfo("Europe/Paris"))),
    ("UTC datetime", dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc)),
    ("named offset", dt.datetime(2024, 1, 1, tzinfo=dt.timezone(dt.timedelta(hours=5, microseconds=1), "X"))),
    ("time with zone", dt.time(8, 15, 0, 7, tzinfo=zoneinfo.ZoneInfo("Europe/Paris"))),
    ("huge timedelta", dt.timedelta(days=999_999_999, microseconds=1)),
    ("Decimal keeps its exponent", decimal.Decimal("-0.00")),
    ("Fraction", fractions.Fraction(2**70, 3)),
    ("complex with nan", complex(0.5, float("inf"))),
    ("pd.Timestamp with zone", pd.Timestamp("2024-07-01 12:30:00.123456789", tz="Europe/Paris")),
    ("pd.Timestamp in seconds", pd.Timestamp("3000-01-01").as_unit("s")),
    ("pd.Timedelta", pd.Timedelta(7, "ns")),
    ("numpy float32", np.float32(0.1)),
    ("numpy float64", np.float64(0.1)),
    ("numpy int8", np.int8(-3)),
    ("numpy uint64", np.uint64(2**64 - 1)),
    ("numpy bool", np.bool_(True)),
    ("numpy datetime64", np.datetime64("2024-01-01T00:00:00.000000001")),
    ("numpy timedelta64", np.timedelta64(3, "h")),
    ("numpy str", np.str_("héllo")),
    ("numpy complex64", np.complex64(1 - 2j)),
]


@pytest.mark.parametrize("label, value", SCALARS, ids=[label for label, _ in SCALARS])
def test_tagged_types_come_back_as_the_same_type(label, value):
    back = through_json(value)
    assert back == value and type(back) is type(value)
    if type(value) in (float, complex, decimal.Decimal, dt.datetime, dt.time, pd.Timestamp, pd.Timedelta) or isinstance(
        value, np.generic
    ):
        assert repr(back) == repr(value)    # -0.0, Decimal exponents, zones, folds, units, numpy scalar types
    for attr in ("tzinfo", "tz"):
        if getattr(value, attr, None) is not None:
            assert type(getattr(back, attr)) is type(getattr(value, attr)) and getattr(back, attr) == getattr(
                value, attr
            )


def test_big_ints_are_tagged_so_no_json_reader_turns_them_into_floats():
    assert serialization.to_jsonable(2**63 - 1) == 2**63 - 1 and serialization.to_jsonable(-(2**63)) == -(2**63)
    assert serialization.to_jsonable(2**63) == {"__nbq__": "int", "v": hex(2**63)}
    assert serialization.loads(serialization.dumps(Serializer().encode([2**64]))) == [
        {"__nbq__": "int", "v": "0x10000000000000000"}
    ]
    assert through_json(2**64) == 2**64 and type(through_json(2**64)) is int


def test_pandas_missing_values_keep_their_identity():
    assert through_json(pd.NaT) is pd.NaT and through_json(pd.NA) is pd.NA


class Colour(enum.IntEnum):
    RED = 1


Pair = collections.namedtuple("Pair", "a b")


REFUSED = [  # (label, value, reason, whether the pickle serializer carries it instead)
    (
        "IntEnum",
        Colour.RED,
        "has type test_serialization.Colour, a subclass of int that would arrive as a plain int",
        True,
    ),
    ("OrderedDict", collections.OrderedDict(a=1), "has type collections.OrderedDict, a subclass of dict", True),
    ("namedtuple", Pair(1, 2), "a subclass of tuple that would arrive as a plain tuple", True),
    (
        "lone surrogate",
        "ab\ud800",
        "is a string with a lone surrogate ('\\ud800' at index 2), which cannot be stored as UTF-8",
        True,
    ),
    ("surrogate key", {"\udc00": 1}, "key '\\udc00': is a string with a lone surrogate", True),
    (
        "dateutil zone",
        dt.datetime(2024, 1, 1, tzinfo=dateutil.tz.gettz("Europe/Paris")),
        "has time zone dateutil.tz",
        True,
    ),
    (
        "masked array",
        np.ma.array([1, 2], mask=[False, True]),
        "has type numpy.ma.MaskedArray, a subclass of numpy.ndarray",
        True,
    ),
    ("memoryview of ints", memoryview(np.arange(3)), "is a memoryview of format 'l'", False),
    ("a lock", threading.Lock(), "has type _thread.lock, which nbqueue cannot serialize as JSON", False),
]


@pytest.mark.parametrize("label, value, reason, picklable", REFUSED, ids=[r[0] for r in REFUSED])
def test_values_that_would_change_on_the_way_are_refused_naming_where_they_sit(label, value, reason, picklable):
    with pytest.raises(nbqueue.SerializationError) as caught:
        Serializer().encode({"outer": [0, value]}, "argument 1 ('x') of task 't'")
    message = str(caught.value)
    assert message.startswith("argument 1 ('x') of task 't', at ['outer'][1]") and reason in message, message
    message.encode("utf-8")                                  # the reason itself can always be stored
    if picklable:                                            # the pickle serializer carries it instead, type and all
        back = through_json({"outer": [0, value]}, Serializer(pickle=True))["outer"][1]
        assert type(back) is type(value) and repr(back) == repr(value)
    else:
        with pytest.raises(nbqueue.SerializationError, match="cannot be pickled"):
            Serializer(pickle=True).encode(value)


def test_nesting_is_limited_and_cycles_are_named_not_a_recursion_error():
    deepest = []
    inner = deepest
    for _ in range(serialization.MAX_DEPTH - 1):
        inner.append([])
        inner = inner[0]
    assert through_json(deepest) == deepest
    inner.append([])
    with pytest.raises(nbqueue.SerializationError, match=r"^value is nested more than 100 levels deep"):
        Serializer().encode(deepest)
    loop = {"a": [1]}
    loop["a"].append(loop)
    with pytest.raises(
        nbqueue.SerializationError, match=r"^x contains itself \(the whole value holds itself at \['a'\]\[1\]\)"
    ):
        Serializer().encode(loop, "x")
    inner_loop = [0, []]
    inner_loop[1].append(inner_loop[1])
    with pytest.raises(nbqueue.SerializationError, match=r"contains itself \(its item \[1\] holds itself at \[0\]\)"):
        Serializer().encode(inner_loop, "x")
    shared = [1]
    assert through_json([shared, shared, (shared,)]) == [[1], [1], ([1],)]   # shared, not cyclic: fine


def test_dumps_refuses_text_that_could_not_be_stored():
    with pytest.raises(nbqueue.SerializationError, match="lone surrogate"):
        serialization.dumps({"name": "\ud800"})
    deep = nested_lists(300)                         # beyond orjson's 254 levels: the standard library writes it
    assert serialization.loads(serialization.dumps(deep)) == deep


def nested_lists(depth):
    value = []
    for _ in range(depth):
        value = [value]
    return value


def test_values_written_by_earlier_versions_are_still_read():
    old = {
        "datetime": (
            {"__nbq__": "datetime", "v": "2024-05-06T07:08:09+02:00"},
            dt.datetime(2024, 5, 6, 7, 8, 9, tzinfo=dt.timezone(dt.timedelta(hours=2))),
        ),
        "timedelta": ({"__nbq__": "timedelta", "v": 90.5}, dt.timedelta(seconds=90.5)),
        "timestamp": ({"__nbq__": "timestamp", "v": "2024-01-01T00:00:00"}, pd.Timestamp("2024-01-01")),
        "ndarray": (
            {"__nbq__": "ndarray", "v": {"dtype": "<i4", "shape": [2], "data": "AQAAAAIAAAA="}},
            np.array([1, 2], dtype="<i4"),
        ),
    }
    for label, (tagged, expected) in old.items():
        back = Serializer().decode(tagged)
        assert type(back) is type(expected) and np.all(back == expected), label
    frame = pd.DataFrame({"a": [1, 2]})
    legacy = {"__nbq__": "dataframe", "v": frame.to_json(orient="table")}
    pd.testing.assert_frame_equal(Serializer().decode(legacy), frame)


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
    for array in (
        np.arange(12, dtype=np.int32).reshape(3, 4),
        np.array([1.5, np.nan], dtype=np.float32),
        np.array(["a", "bc"]),
    ):
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
    assert "argument 2 ('settings') of task 'configure', at ['lock']: has type _thread.lock" in str(caught.value)
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


def test_args_given_as_a_string_or_a_dict_are_refused_not_split(app):
    @app.task(name="shout")
    def shout(text):
        return text.upper()

    for args in ("abc", b"abc", {"text": "abc"}):
        with pytest.raises(TypeError, match=r"the args of task 'shout' must be a list or tuple of arguments"):
            shout.apply_async(args)
    assert app.tasks().empty


def test_keyword_names_are_plain_strings_in_the_message():
    message = to_message(Signature("t", kwargs={np.str_("a"): 1, "b": 2}), Serializer(), default_queue="q")
    assert message["kwargs"] == {"a": 1, "b": 2} and all(type(k) is str for k in message["kwargs"])
    for bad, shown in ((1, "1"), (None, "None"), ((1, 2), r"\(1, 2\)")):
        with pytest.raises(
            nbqueue.SerializationError, match=rf"^keyword argument {shown} of task 't' has a name of type"
        ):
            to_message(Signature("t", kwargs={bad: "x"}), Serializer(), default_queue="q")
    with pytest.raises(
        nbqueue.SerializationError, match="the name of a keyword argument of task 't' is a string with a lone surrogate"
    ):
        to_message(Signature("t", kwargs={"\udc00": "x"}), Serializer(), default_queue="q")


@pytest.mark.parametrize("value", [None, True, False, 0, -7, 2**63 - 1, "plain", ""])
def test_a_json_scalar_result_encodes_to_itself(value):
    encoded = Serializer().encode(value)
    assert encoded == value and type(encoded) is type(value)


@pytest.mark.parametrize("value, tagged", [
    (2**63, {"__nbq__": "int", "v": hex(2**63)}),
    (-(2**63) - 1, {"__nbq__": "int", "v": hex(-(2**63) - 1)}),
])
def test_a_scalar_json_cannot_carry_exactly_is_still_tagged(value, tagged):
    assert Serializer().encode(value) == tagged


def test_a_subclass_of_a_json_scalar_is_not_taken_for_the_scalar():
    with pytest.raises(serialization.SerializationError, match="a subclass of int"):
        Serializer().encode(Colour.RED)


def test_text_beyond_ascii_encodes_to_itself_and_a_lone_surrogate_is_refused():
    assert Serializer().encode("naïve ✓") == "naïve ✓"
    with pytest.raises(serialization.SerializationError, match="lone surrogate"):
        Serializer().encode("bad \udc80", "result of task 't'")


def test_decoded_arguments_are_json_scalars_as_they_are_and_tagged_values_decoded():
    serializer = Serializer()
    args, kwargs = [1, "a", None, 2.5, True], {"k": "v"}
    assert serializer.decode_arguments(args, kwargs) == (args, kwargs)
    when = dt.datetime(2024, 5, 1, 12, 30, tzinfo=dt.timezone.utc)
    encoded = [serializer.encode(when), 3, serializer.encode([2**64])]
    keywords = {"x": serializer.encode(decimal.Decimal("1.5"))}
    decoded_args, decoded_kwargs = serializer.decode_arguments(encoded, keywords)
    assert decoded_args == [when, 3, [2**64]] and decoded_kwargs == {"x": decimal.Decimal("1.5")}
