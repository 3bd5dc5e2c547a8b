"""DataFrames, Series, indexes and numpy arrays through the codec (Arrow IPC, .npy).

A property test (hypothesis) generates frames across the dtypes of the field and checks
that what comes back is equal with ``check_exact=True``, with the same dtypes, index,
column labels and names, the same float bits, and in object columns the same Python
types (``None`` stays ``None``, ``NaN`` stays ``NaN``). Frames Arrow cannot carry
exactly are refused at send, naming the column; with ``serializer="pickle"`` they are
pickled instead.
"""
from __future__ import annotations

import datetime as dt
import os
import zoneinfo

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import nbqueue
from nbqueue import blobs, serialization
from nbqueue.serialization import Serializer

# NBQUEUE_HYPOTHESIS_EXAMPLES=2000 for a deeper search than the suite's; no example database in the work tree
PROPERTY = settings(max_examples=int(os.environ.get("NBQUEUE_HYPOTHESIS_EXAMPLES", "60")), deadline=None, database=None,
                    print_blob=True, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def through(value, serializer=None):
    """Encode as a send does, to JSON text and back, and decode as a worker does."""
    serializer = serializer or Serializer()
    return serializer.decode(serialization.loads(serialization.dumps(serializer.encode(value, "the frame"))))


def assert_same_objects(left, right, what):
    """Object values: the same Python types one by one (None vs NaN vs pd.NA), and equal."""
    left, right = list(left), list(right)
    assert [type(v) for v in left] == [type(v) for v in right], f"{what}: {left!r} != {right!r}"
    for a, b in zip(left, right):
        if a is b or (type(a) is float and a != a and b != b):
            continue
        assert a == b, f"{what}: {a!r} != {b!r}"


def assert_same_index(left, right, what):
    pd.testing.assert_index_equal(left, right, exact=True, check_exact=True, check_names=True, check_categorical=True)
    assert list(left.names) == list(right.names) and [type(n) for n in left.names] == [type(n) for n in right.names], (
        what
    )
    for k in range(left.nlevels):
        a, b = left.get_level_values(k), right.get_level_values(k)
        assert a.dtype == b.dtype, f"{what} level {k}: {a.dtype} != {b.dtype}"
        if a.dtype == object:
            assert_same_objects(a, b, f"{what} level {k}")
    if isinstance(left, (pd.DatetimeIndex, pd.TimedeltaIndex)):
        assert left.freq == right.freq, what


def assert_same_frame(back, frame):
    assert type(back) is type(frame)
    pd.testing.assert_frame_equal(back, frame, check_exact=True, check_dtype=True, check_index_type=True,
                                  check_column_type=True, check_names=True, check_categorical=True, check_flags=True)
    assert_same_index(back.index, frame.index, "index")
    assert_same_index(back.columns, frame.columns, "column labels")
    assert back.attrs == frame.attrs
    for i in range(frame.shape[1]):
        assert_same_values(back.iloc[:, i], frame.iloc[:, i], f"column {i}")


def assert_same_values(back, series, what):
    assert back.dtype == series.dtype, f"{what}: {back.dtype} != {series.dtype}"
    if series.dtype == object:
        assert_same_objects(back, series, what)
    elif isinstance(series.dtype, np.dtype) and series.dtype.kind == "f":   # the bits, -0.0 included (NaN aside)
        a, b = back.to_numpy(), series.to_numpy()
        keep = ~np.isnan(b)
        assert np.array_equal(a[keep].view(f"u{a.itemsize}"), b[keep].view(f"u{b.itemsize}")), what
        assert np.array_equal(np.isnan(a), np.isnan(b)), what
    elif isinstance(series.dtype, pd.CategoricalDtype):
        assert back.dtype.categories.dtype == series.dtype.categories.dtype, what
        if series.dtype.categories.dtype == object:
            assert_same_objects(back.dtype.categories, series.dtype.categories, f"{what} categories")


def assert_same_series(back, series):
    assert type(back) is type(series)
    pd.testing.assert_series_equal(back, series, check_exact=True, check_dtype=True, check_index_type=True,
                                   check_names=True, check_categorical=True, check_flags=True)
    assert back.name == series.name and type(back.name) is type(series.name)
    assert_same_index(back.index, series.index, "index")
    assert_same_values(back, series, "values")


# -- strategies -------------------------------------------------------------------------------------
ZONES = [zoneinfo.ZoneInfo("Europe/Paris"), zoneinfo.ZoneInfo("America/New_York"), dt.timezone.utc,
         dt.timezone(dt.timedelta(hours=5, minutes=30))]
text = st.text(st.characters(exclude_categories=("Cs",)), max_size=6)
names = st.one_of(st.none(), text, st.integers(-5, 5), st.tuples(text, st.integers(0, 3)))


def _values(n: int):
    """Strategies for one column of length n: (values, dtype) pairs pandas builds a column from."""
    ints = lambda dtype: hnp.arrays(dtype, n)  # noqa: E731  every value of the dtype's range
    floats = lambda width, dtype: st.lists(st.floats(width=width), min_size=n, max_size=n).map(  # noqa: E731
        lambda v: np.array(v, dtype=dtype)
    )
    maybe = lambda s: st.lists(st.one_of(st.none(), s), min_size=n, max_size=n)  # noqa: E731
    moments = st.integers(-(2**62), 2**62)
    return st.one_of(
        floats(64, "float64"),
        floats(32, "float32"),
        floats(16, "float16"),
        ints("int8"),
        ints("int16"),
        ints("int32"),
        ints("int64"),
        ints("uint8"),
        ints("uint64"),
        ints("bool"),
        maybe(st.integers(-(2**63), 2**63 - 1)).map(lambda v: pd.array(v, dtype="Int64")),
        maybe(st.integers(0, 255)).map(lambda v: pd.array(v, dtype="UInt8")),
        maybe(st.floats(allow_nan=False)).map(lambda v: pd.array(v, dtype="Float64")),
        maybe(st.booleans()).map(lambda v: pd.array(v, dtype="boolean")),
        maybe(text).map(lambda v: pd.array(v, dtype="string")),
        maybe(text).map(lambda v: pd.array(v, dtype=pd.StringDtype("python"))),
        maybe(text).map(lambda v: pd.Series(v, dtype="str").array),
        # object columns: one type of value, one kind of missing value
        st.tuples(maybe(text), st.sampled_from([None, float("nan"), pd.NA])).map(lambda p: _objects(p[0], p[1])),
        maybe(st.binary(max_size=5)).map(lambda v: _objects(v, None)),
        maybe(st.integers(-(2**63), 2**63 - 1)).map(lambda v: _objects(v, None)),
        maybe(st.booleans()).map(lambda v: _objects(v, None)),
        maybe(st.dates()).map(lambda v: _objects(v, None)),
        st.tuples(
            st.lists(st.sampled_from(["a", "b", "c"]), min_size=n, max_size=n),
            st.booleans(),
            st.permutations(["c", "b", "a", "z"]),
            st.booleans(),
        ).map(lambda p: pd.Categorical(p[0], categories=pd.Index(p[2], dtype=object if p[3] else None), ordered=p[1])),
        st.tuples(st.lists(st.integers(0, 3), min_size=n, max_size=n), st.booleans()).map(
            lambda p: pd.Categorical(p[0], categories=[3, 2, 1, 0], ordered=p[1])
        ),
        st.tuples(
            st.lists(st.one_of(st.none(), moments), min_size=n, max_size=n), st.sampled_from(["s", "ms", "us", "ns"])
        ).map(lambda p: _moments(p[0], p[1], None)),
        st.tuples(
            st.lists(st.one_of(st.none(), st.integers(0, 2**50)), min_size=n, max_size=n), st.sampled_from(ZONES)
        ).map(lambda p: _moments(p[0], "us", p[1])),
        st.tuples(
            st.lists(st.one_of(st.none(), moments), min_size=n, max_size=n), st.sampled_from(["s", "ms", "us", "ns"])
        ).map(
            lambda p: pd.array(np.array([np.timedelta64("NaT") if v is None else v for v in p[0]], dtype=f"m8[{p[1]}]"))
        ),
    )


def _objects(values, missing):
    return pd.array([missing if v is None else v for v in values], dtype=object)


def _moments(values, unit, tz):
    array = np.array(
        [
            np.datetime64("NaT")
            if v is None
            else np.datetime64(v // {"s": 10**9, "ms": 10**6, "us": 10**3, "ns": 1}[unit], unit)
            for v in values
        ],
        dtype=f"M8[{unit}]",
    )
    index = pd.DatetimeIndex(array)
    return (index.tz_localize("UTC").tz_convert(tz) if tz is not None else index).array


def _index(n: int):
    return st.one_of(
        st.tuples(st.integers(-10, 10), st.integers(1, 3), names).map(
            lambda p: pd.RangeIndex(p[0], p[0] + n * p[1], p[1], name=p[2])
        ),
        st.tuples(st.lists(st.integers(-(2**63), 2**63 - 1), min_size=n, max_size=n), names).map(
            lambda p: pd.Index(p[0], dtype="int64", name=p[1])
        ),
        st.tuples(st.lists(text, min_size=n, max_size=n), names).map(lambda p: pd.Index(p[0], name=p[1])),
        st.tuples(st.lists(st.one_of(st.none(), text), min_size=n, max_size=n), names).map(
            lambda p: pd.Index(p[0], dtype=object, name=p[1])
        ),
        st.tuples(st.sampled_from(["D", "h", "2min", "W-SUN"]), st.sampled_from([None] + ZONES[:2]), names).map(
            lambda p: pd.date_range("2024-03-30", periods=n, freq=p[0], tz=p[1], name=p[2])
        ),
        st.tuples(
            st.lists(text, min_size=n, max_size=n),
            st.lists(st.integers(0, 2), min_size=n, max_size=n),
            st.tuples(names, names),
        ).map(lambda p: pd.MultiIndex.from_arrays([p[0], p[1]], names=list(p[2]))),
    )


def _labels(width: int):
    return st.one_of(
        st.lists(text, min_size=width, max_size=width).map(lambda v: pd.Index(v)),  # duplicates allowed
        st.lists(st.integers(-3, 3), min_size=width, max_size=width).map(lambda v: pd.Index(v, dtype="int64")),
        st.integers(0, 5).map(lambda start: pd.RangeIndex(start, start + width)),
        st.tuples(
            st.lists(st.tuples(st.sampled_from(["a", "b"]), st.integers(0, 2)), min_size=width, max_size=width),
            st.tuples(names, names),
        ).map(
            lambda p: (
                pd.MultiIndex.from_tuples(p[0], names=list(p[1]))
                if p[0]
                else pd.MultiIndex.from_arrays([[], []], names=list(p[1]))
            )
        ),
        st.tuples(st.lists(text, min_size=width, max_size=width), names).map(
            lambda p: pd.Index(p[0], dtype=object, name=p[1])
        ),
    )


@st.composite
def frames(draw):
    n = draw(st.integers(0, 6))
    width = draw(st.integers(0, 4))
    columns = [draw(_values(n)) for _ in range(width)]
    index = draw(_index(n))
    frame = pd.DataFrame(dict(enumerate(columns)), index=index) if columns else pd.DataFrame(index=index)
    for i, values in enumerate(columns):     # as generated: the constructor may infer from object values
        frame.isetitem(i, pd.Series(values, index=index, dtype=getattr(values, "dtype", None)))
    frame.columns = draw(_labels(width))
    if draw(st.booleans()):
        frame.attrs = {"source": draw(text), "version": draw(st.integers())}
    return frame


@st.composite
def series(draw):
    n = draw(st.integers(0, 6))
    values = draw(_values(n))
    return pd.Series(values, index=draw(_index(n)), name=draw(names), dtype=getattr(values, "dtype", None))


# -- properties -------------------------------------------------------------------------------------
@PROPERTY
@given(frames())
def test_frames_come_back_exactly(frame):
    assert_same_frame(through(frame), frame)


@PROPERTY
@given(frames())
def test_frames_come_back_exactly_with_the_pickle_serializer(frame):
    assert_same_frame(through(frame, Serializer(pickle=True)), frame)


@PROPERTY
@given(series())
def test_series_come_back_exactly(values):
    assert_same_series(through(values), values)


@PROPERTY
@given(st.one_of(frames().map(lambda f: f.index), frames().map(lambda f: f.columns)))
def test_indexes_come_back_exactly(index):
    back = through(index)
    assert type(back) is type(index)
    assert_same_index(back, index, "index")


scalar_dtypes = st.one_of(
    hnp.boolean_dtypes(),
    hnp.integer_dtypes(endianness="="),
    hnp.unsigned_integer_dtypes(endianness="="),
    hnp.floating_dtypes(endianness="="),
    hnp.complex_number_dtypes(endianness="="),
    hnp.datetime64_dtypes(endianness="="),
    hnp.timedelta64_dtypes(endianness="="),
    hnp.unicode_string_dtypes(endianness="="),
    hnp.byte_string_dtypes(),
    hnp.floating_dtypes(endianness=">"),
)


@PROPERTY
@given(
    hnp.arrays(
        st.one_of(scalar_dtypes, hnp.array_dtypes(scalar_dtypes, max_size=3)),
        hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4),
    ),
    st.sampled_from(["C", "F", "strided"]),
)
def test_arrays_come_back_exactly(array, layout):
    if layout == "F":
        array = np.asfortranarray(array)
    elif layout == "strided" and array.ndim:
        array = array[::2]
    back = through(array)
    assert type(back) is np.ndarray and back.dtype == array.dtype and back.shape == array.shape
    assert back.tobytes(order="A") == array.tobytes(order="A") or back.tobytes() == array.tobytes()
    if array.flags.f_contiguous and not array.flags.c_contiguous:
        assert back.flags.f_contiguous


@PROPERTY
@given(
    st.lists(st.one_of(st.none(), st.integers(), text, st.lists(st.integers(), max_size=2)), max_size=6),
    hnp.array_shapes(max_dims=1),
)
def test_object_arrays_keep_their_items(items, _shape):
    array = np.empty(len(items), dtype=object)
    for i, item in enumerate(items):
        array[i] = item
    back = through(array)
    assert back.dtype == object and back.shape == array.shape
    assert [type(v) for v in back] == [type(v) for v in array] and list(back) == list(array)


# -- the fault this replaces, and named cases --------------------------------------------------------
def test_float64_bits_and_float32_come_back_exactly_with_json_and_pickle():
    rng = np.random.default_rng(7)
    frame = pd.DataFrame(
        {"x": rng.random(1000), "y": rng.random(1000).astype("float32"), "k": rng.integers(0, 10, 1000)}
    )
    for serializer in (Serializer(), Serializer(pickle=True)):
        back = through(frame, serializer)
        assert back.equals(frame)
        assert back["y"].dtype == np.float32
        assert_same_frame(back, frame)


def test_a_wide_catalogue_of_dtypes_comes_back_exactly():
    n = 4
    frame = pd.DataFrame({
        "f64": [0.1, -0.0, np.nan, 1e-310],
        "f32": np.array([0.1, np.inf, -np.inf, np.nan], dtype="float32"),
        "Int64": pd.array([1, None, 2**62, -3], dtype="Int64"),
        "boolean": pd.array([True, None, False, True], dtype="boolean"),
        "string": pd.array(["a", None, "é", ""], dtype="string"),
        "str": pd.Series(["a", None, "b", "c"], dtype="str"),
        "none_vs_nan": pd.Series(["a", None, "b", None], dtype=object),
        "nan_not_none": pd.Series(["a", np.nan, "b", np.nan], dtype=object),
        "cat": pd.Categorical(["lo", "hi", "lo", None], categories=["lo", "mid", "hi"], ordered=True),
        "when": pd.date_range("2024-10-27 00:30", periods=n, freq="30min", tz="Europe/Paris"),
        "naive_s": pd.to_datetime(["2024-01-01", None, "1700-01-01", "2500-01-01"]).as_unit("s"),
        "delta": pd.to_timedelta([1, 2, None, 4], unit="ms"),
        "period": pd.period_range("2024-01", periods=n, freq="M"),
        "interval": pd.interval_range(0, n),
        "date_objects": pd.Series([dt.date(2024, 1, 1), None, dt.date(1, 1, 1), dt.date(9999, 12, 31)], dtype=object),
    }, index=pd.MultiIndex.from_product([["a", "b"], [1, 2]], names=["group", 7]))
    frame.columns = pd.MultiIndex.from_tuples([(c, i % 2) for i, c in enumerate(frame.columns)], names=["name", None])
    assert_same_frame(through(frame), frame)


def test_series_keep_their_name_and_index():
    for values in (
        pd.Series([1.5, 2.5, None], name="price", dtype="float32"),
        pd.Series([1, 2], name=("a", 1), index=pd.Index(["x", "y"], name=0)),
        pd.Series([], dtype="Int64"),
        pd.Series(pd.date_range("2024", periods=3, freq="D"), index=pd.date_range("2020", periods=3, freq="h")),
    ):
        assert_same_series(through(values), values)


def test_pandas_arrays_and_indexes_keep_their_type():
    categorical = pd.Categorical(["b", "a"], categories=["b", "a"], ordered=True)
    back = through(categorical)
    assert type(back) is pd.Categorical and back.equals(categorical) and back.ordered
    integers = pd.array([1, None], dtype="Int64")
    pd.testing.assert_extension_array_equal(through(integers), integers)
    for index in (pd.RangeIndex(3, 9, 2, name="r"), pd.date_range("2024", periods=3, freq="D", tz="Europe/Paris"),
                  pd.MultiIndex.from_product([[1, 2], ["a"]], names=["n", "s"]), pd.CategoricalIndex(["x", "y"])):
        back = through(index)
        assert type(back) is type(index)
        assert_same_index(back, index, "index")


def test_empty_frames_and_frames_without_columns():
    for frame in (
        pd.DataFrame(),
        pd.DataFrame(index=pd.Index(["a"], name="k")),
        pd.DataFrame({"a": pd.Series([], dtype="float32")}),
        pd.DataFrame(columns=pd.Index(["a", "b"])),
    ):
        assert_same_frame(through(frame), frame)


def test_duplicate_labels_flags_and_attrs_come_back():
    frame = pd.DataFrame([[1, 2.5]], columns=["a", "a"])
    assert_same_frame(through(frame), frame)
    flagged = pd.DataFrame({"a": [1]}).set_flags(allows_duplicate_labels=False)
    flagged.attrs = {"unit": "m"}
    back = through(flagged)
    assert back.flags.allows_duplicate_labels is False and back.attrs == {"unit": "m"}


UNREPRESENTABLE = [
    (
        "mixed objects",
        pd.DataFrame({"ok": [1, 2], "mixed": pd.Series([1, "one"], dtype=object)}),
        "column 'mixed' of object dtype mixing int and str",
    ),
    (
        "lists",
        pd.DataFrame({"tags": pd.Series([["a"], ["b"]], dtype=object)}),
        "column 'tags' of object dtype holding builtins.list",
    ),
    (
        "floats in objects",
        pd.DataFrame({"f": pd.Series([1.5, None], dtype=object)}),
        "column 'f' of object dtype holding float values",
    ),
    (
        "floats among other objects",          # the hint is to pick one type, not .astype(float)
        pd.DataFrame({"c": [1, "two", 3.0]}),
        "column 'c' of object dtype mixing float and int and str values",
    ),
    (
        "None and NaN",
        pd.DataFrame({"s": pd.Series(["a", None, np.nan], dtype=object)}),
        "column 's' of object dtype with missing values of different kinds",
    ),
    ("complex", pd.DataFrame({"z": np.array([1j, 2], dtype=complex)}), "column 'z' of dtype complex128"),
    ("sparse", pd.DataFrame({"sp": pd.arrays.SparseArray([0, 1])}), "column 'sp' of dtype Sparse"),
    ("huge int objects", pd.DataFrame({"big": pd.Series([2**64, 1], dtype=object)}), "column 'big'"),
    ("mixed labels", pd.DataFrame({1: [1.0], "a": [2.0]}), "column labels of object dtype mixing int and str"),
    (
        "mixed index",
        pd.DataFrame({"a": [1, 2]}, index=pd.Index([1, "x"], dtype=object)),
        "index of object dtype mixing int and str",
    ),
]


@pytest.mark.parametrize("label, frame, reason", UNREPRESENTABLE, ids=[u[0] for u in UNREPRESENTABLE])
def test_frames_arrow_cannot_carry_are_refused_naming_the_column_unless_pickle_is_opted_in(label, frame, reason):
    with pytest.raises(nbqueue.SerializationError) as caught:
        Serializer().encode(frame, "argument 1 ('df') of task 'clean'")
    assert str(caught.value).startswith("argument 1 ('df') of task 'clean' has ") and reason in str(caught.value), str(
        caught.value
    )
    back = through(frame, Serializer(pickle=True))       # the pickle serializer pickles it instead
    pd.testing.assert_frame_equal(back, frame, check_exact=True)
    assert serialization.to_jsonable is not None and Serializer(pickle=True).encode(frame)["v"]["codec"] == "pickle"


def test_a_frame_nested_in_arguments_is_named_with_its_path():
    frame = pd.DataFrame({"mixed": pd.Series([1, "one"], dtype=object)})
    with pytest.raises(
        nbqueue.SerializationError, match=r"^argument 1 of task 't', at \['data'\]\[0\]: has column 'mixed'"
    ):
        Serializer().encode({"data": [frame]}, "argument 1 of task 't'")


def test_pickle_uses_protocol_5():
    blob = blobs.pack_pickle({"a": 1})
    assert blob.codec == "pickle" and blob.data[:2] == b"\x80\x05"


def test_decoding_a_frame_or_array_runs_no_pickle():
    """An Arrow or .npy payload is data: a pickle smuggled under those codecs is refused."""
    import pickle

    evil = pickle.dumps(pd.DataFrame({"a": [1]}), protocol=5)
    for codec in ("arrow", "npy"):
        with pytest.raises(Exception) as caught:
            blobs.unpack(codec, evil)
        assert not isinstance(caught.value, AssertionError)
    tagged = {serialization.TAG: "blob", "v": {"codec": "pickle", "b64": serialization._b64(evil)}}
    with pytest.raises(nbqueue.SerializationError, match="serializer='pickle'"):
        Serializer().decode(tagged)
    with pytest.raises(ValueError, match="allow_pickle"):
        blobs.unpack("npy", _npy_with_objects())


def _npy_with_objects() -> bytes:
    import io

    buffer = io.BytesIO()
    np.save(buffer, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    return buffer.getvalue()
