"""Binary codecs: a frame, array or pickled object as bytes, and back.

``pack(obj) -> Blob(codec, data, info)`` and ``unpack(codec, data) -> obj`` are the one
place a value becomes bytes; serialization.py carries the bytes (base64 inside the JSON
envelope today; a payload store can carry them out of band without changing a codec).

Codecs:
- ``arrow``: pandas DataFrame, Series, Index and extension arrays as an Apache Arrow IPC
  stream. Exact: float bits, float32/float16, nullable integer/float/boolean/string dtypes,
  pandas ``str``, categoricals (categories, their dtype and order), tz-aware datetimes with
  their zone, timedeltas, periods, intervals, every datetime unit, MultiIndex rows and
  columns, index and column labels of any type (duplicates too), index/column/Series
  names, a DatetimeIndex's frequency, ``attrs`` and ``flags``, and in object columns
  ``None`` vs ``NaN`` vs ``pd.NA``. An object column (or index level, or label level) may
  hold one type out of str, bytes, bool, int (64-bit) and datetime.date, plus missing
  values of one kind; anything else (mixed types, lists, floats in an object column),
  complex and sparse columns, and third-party extension dtypes raise Unrepresentable
  naming the column.
- ``npy``: a numpy array in the .npy format read with ``allow_pickle=False``: dtype
  (structured too), shape and C/Fortran order, raw bytes. Object arrays are not blobs
  (serialization.py sends their items as JSON).
- ``pickle``: protocol 5, only for an App created with ``serializer="pickle"``.

Compression (``compression="zstd"`` or ``"lz4"``, the App's ``payload_compression``):
``arrow`` blobs use Arrow IPC's own buffer compression (the reader decompresses by
itself); ``npy`` and ``pickle`` bytes are compressed whole with pyarrow's codec, and
their info says so (``compression``, ``raw_size``), which ``unpack`` needs.

Decoding an ``arrow`` or ``npy`` blob runs no code of the sender's: Arrow's pandas
metadata names dtypes, it does not import anything.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import io
from typing import Any

from .errors import SerializationError

#: the JSON form of the values inside an Arrow stream's metadata (labels, dtypes' fixes): serialization.py
#: hands itself in when it is imported (use_json); it packs its binary values here
_json_form: Any = None


def use_json(form: Any) -> None:
    """Hand in the JSON form of values: ``form`` has ``to_jsonable(value, where)``, ``from_jsonable(obj)``,
    ``dumps(obj) -> str`` and ``loads(text)`` (the serialization module)."""
    global _json_form
    _json_form = form


def _form() -> Any:
    if _json_form is None:
        raise RuntimeError("nbqueue.blobs has no JSON form yet: import nbqueue.serialization, which hands it in")
    return _json_form

_META = b"nbqueue"                  # schema metadata: what to restore beyond pyarrow's own pandas metadata
_COLUMNS = b"nbqueue.columns"       # schema metadata: the column labels, an index-only Arrow IPC stream
_INDEX_FIELD = "__index_level_{}__"  # pyarrow's name for an unnamed index level stored as a column


#: the uncompressed size (bytes) of a record batch of a compressed Arrow stream
BATCH_BYTES = 16 << 20

#: codecs ``compression`` may name (both ship with pyarrow)
COMPRESSIONS = ("zstd", "lz4")


@dataclasses.dataclass(frozen=True)
class Blob:
    codec: str              # "arrow", "npy" or "pickle"
    data: Any               # bytes-like: bytes, or a pyarrow Buffer (no copy of a large IPC stream)
    info: dict = dataclasses.field(default_factory=dict)   # small and JSON-ready: type, shape; compression, raw_size

    @property
    def size(self) -> int:
        """Length of ``data`` in bytes."""
        return memoryview(self.data).nbytes


class Unrepresentable(Exception):
    """The value cannot be carried exactly by its codec; the text says why (the caller names the value)."""


def pack(obj: Any, compression: str | None = None) -> Blob:
    """A DataFrame, Series, Index, pandas extension array or numpy array as a Blob,
    compressed with ``compression`` (one of COMPRESSIONS) when given.

    Raises Unrepresentable (naming the column) when the value would not come back equal
    and of the same dtypes, TypeError for other types.
    """
    import numpy as np

    if type(obj) is np.ndarray:
        info = {"type": "ndarray", "dtype": str(obj.dtype), "shape": list(obj.shape)}
        return _compressed(Blob("npy", _npy_pack(obj), info), compression)
    return _arrow_pack(obj, compression)


def pack_pickle(obj: Any, where: str = "value", compression: str | None = None) -> Blob:
    """Pickle protocol 5 (the opt-in serializer); raises SerializationError naming ``where``."""
    import pickle

    try:
        data = pickle.dumps(obj, protocol=5)
    except Exception as exc:  # pickling errors come in many types
        raise SerializationError(f"{where} cannot be pickled: {exc}") from exc
    return _compressed(Blob("pickle", data, {"type": f"{type(obj).__module__}.{type(obj).__qualname__}"}), compression)


class Handoff:
    """Bytes given to ``unpack`` to own alone: it drops them as soon as it has decoded what it needs
    from them, so a large payload is not held by its caller while the value is built."""

    __slots__ = ("data",)

    def __init__(self, data: Any):
        self.data = data

    def take(self) -> Any:
        data, self.data = self.data, None
        return data


def unpack(codec: str, data: Any, info: dict | None = None) -> Any:
    """Inverse of pack and pack_pickle (callers check that pickle was opted in). ``data`` is
    bytes-like, or a Handoff of them; ``info`` is the blob's info when it may say ``compression``."""
    if codec == "arrow":
        return _arrow_unpack(data)
    data = data.take() if isinstance(data, Handoff) else data
    if info and info.get("compression"):
        data = _decompressed(data, info)
    if codec == "npy":
        return _npy_unpack(data)
    if codec == "pickle":
        import pickle

        return pickle.loads(data)
    raise SerializationError(f"unknown binary codec {codec!r} (written by a newer nbqueue?)")


def _compressed(blob: Blob, compression: str | None) -> Blob:
    """``blob`` with its bytes compressed whole (npy, pickle); the info says how to undo it."""
    if not compression:
        return blob
    import pyarrow as pa

    data = pa.compress(blob.data, codec=compression, asbytes=False)
    return Blob(blob.codec, data, {**blob.info, "compression": compression, "raw_size": blob.size})


def _decompressed(data: Any, info: dict):
    import pyarrow as pa

    codec, size = info["compression"], info.get("raw_size")
    if codec not in COMPRESSIONS or not isinstance(size, int) or size < 0:
        raise SerializationError(f"a blob compressed with {codec!r} (raw size {size!r}) that nbqueue cannot read")
    return pa.decompress(data, decompressed_size=size, codec=codec, asbytes=False)


# -- numpy -------------------------------------------------------------------------------------------
def _npy_pack(array) -> bytes:
    import numpy as np

    if array.dtype.hasobject:
        raise Unrepresentable(f"is an array of dtype {array.dtype} holding Python objects in fields, which nbqueue "
                              "cannot carry; create the App with serializer='pickle'")
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _npy_unpack(data: bytes):
    import numpy as np

    return np.lib.format.read_array(io.BytesIO(data), allow_pickle=False)


# -- pandas through Arrow IPC --------------------------------------------------------------------------
def _short(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


_OBJECT_TYPES = (str, bytes, bool, int, _dt.date)   # what an object column may hold (one of them)


def _null_types() -> dict:
    import pandas as pd

    return {type(None): None, float: "nan", type(pd.NA): "na", type(pd.NaT): "nat"}


def _object_fix(values, label: str) -> dict:
    """For an object-dtype column or level: check it holds one carried type and one kind of
    missing value; return how to restore it ({"type", "null"})."""
    import numpy as np

    array = np.asarray(values, dtype=object)
    kinds = set(map(type, array))
    nulls = _null_types()
    missing = [t for t in kinds if t in nulls]
    present = [t for t in kinds if t not in nulls]
    floats = float in kinds and any(v == v for v in array if type(v) is float)    # NaN is a missing value
    if len(present) + floats > 1:
        names = " and ".join(sorted({t.__name__ for t in present} | ({"float"} if floats else set())))
        raise Unrepresentable(f"has {label} of object dtype mixing {names} values, which Arrow cannot carry exactly; "
                              "convert it to one type or create the App with serializer='pickle'")
    if floats:
        raise Unrepresentable(
            f"has {label} of object dtype holding float values, which Arrow would not give back "
            "as Python objects; convert it (.astype(float)) or create the App with serializer='pickle'"
        )
    if present and present[0] not in _OBJECT_TYPES:
        raise Unrepresentable(
            f"has {label} of object dtype holding {present[0].__module__}.{present[0].__qualname__} "
            "values, which Arrow cannot carry exactly; convert it or create the App with serializer='pickle'"
        )
    if len(missing) > 1:
        raise Unrepresentable(f"has {label} of object dtype with missing values of different kinds "
                              f"({', '.join(sorted(repr(nulls[t]) for t in missing))}), which Arrow cannot tell apart; "
                              "use one kind, or create the App with serializer='pickle'")
    return {"type": present[0].__name__ if present else None, "null": nulls[missing[0]] if missing else None}


def _dtype_fix(values, dtype, label: str) -> dict | None:
    """How to restore what Arrow's own pandas metadata does not (None: nothing); raises
    Unrepresentable for dtypes Arrow cannot carry exactly."""
    import numpy as np
    import pandas as pd

    if isinstance(dtype, np.dtype):
        if dtype.kind == "O":
            return {"object": _object_fix(values, label)}
        if dtype.kind in "biufmM":
            return None
    elif isinstance(dtype, pd.CategoricalDtype):
        categories = dtype.categories
        fix = _dtype_fix(categories, categories.dtype, f"{label} categories")
        return {"categories": fix} if fix else None
    elif isinstance(dtype, pd.StringDtype):
        na_value = getattr(dtype, "na_value", pd.NA)
        return {"string": [dtype.storage, "nan" if na_value is not pd.NA else "na"]}
    elif type(dtype).__module__.startswith("pandas") and not isinstance(dtype, pd.SparseDtype):
        return None     # tz-aware datetimes, nullable numbers and booleans, periods, intervals, ArrowDtype
    raise Unrepresentable(f"has {label} of dtype {dtype}, which Arrow cannot carry exactly; convert it or create the "
                          "App with serializer='pickle'")


def _json(value: Any, label: str) -> Any:
    try:
        return _form().to_jsonable(value, label)
    except SerializationError as exc:
        raise Unrepresentable(f"cannot carry its {exc}") from None


def _index_meta(index, label: str) -> dict:
    import pandas as pd

    meta: dict[str, Any] = {}
    if any(name is not None for name in index.names):
        meta["names"] = _json(list(index.names), f"{label} names")
    if type(index) is pd.RangeIndex:    # also where no column gives the table its length
        meta["range"] = [index.start, index.stop, index.step]
        return meta
    if isinstance(index, pd.MultiIndex):
        fixes = {}
        for k, level in enumerate(index.levels):
            fix = _dtype_fix(level, level.dtype, f"{label} level {k}")
            if fix:
                fixes[str(k)] = fix
    else:
        fix = _dtype_fix(index, index.dtype, label)
        fixes = {"0": fix} if fix else {}
        freq = getattr(index, "freq", None) if isinstance(index, (pd.DatetimeIndex, pd.TimedeltaIndex)) else None
        if freq is not None:
            if pd.tseries.frequencies.to_offset(freq.freqstr) != freq:
                raise Unrepresentable(f"has {label} with frequency {freq!r}, which cannot be carried by name; "
                                      "drop it (index.freq = None) or create the App with serializer='pickle'")
            meta["freq"] = freq.freqstr
    if fixes:
        meta["fix"] = fixes
    return meta


def _table(frame, meta: dict, *, index_label: str = "index", series: bool = False):
    """An Arrow table of frame's values and row index (columns renamed "0", "1", ...; index levels unnamed)."""
    import numpy as np
    import pyarrow as pa

    index = frame.index
    meta["index"] = _index_meta(index, index_label)
    columns = frame.columns
    names = [str(i) for i in range(frame.shape[1])]

    def label(i: int) -> str:
        return "values" if series else f"column {_short(columns[i])}"

    fixes = {}
    for i, dtype in enumerate(frame.dtypes):
        if (
            isinstance(dtype, np.dtype) and dtype.kind in "biufmM"
        ):  # plain numbers and times: nothing to check or restore
            continue
        fix = _dtype_fix(frame.iloc[:, i], dtype, label(i))
        if fix:
            fixes[names[i]] = fix
    if fixes:
        meta["fix"] = fixes
    flat = frame.set_axis(names, axis=1).set_axis(index.set_names([None] * index.nlevels), axis=0)
    try:
        table = pa.Table.from_pandas(flat, preserve_index=None)   # a RangeIndex becomes metadata, other indexes columns
    except (pa.ArrowException, ValueError, TypeError, OverflowError) as exc:
        for i in range(flat.shape[1]):
            try:
                pa.Array.from_pandas(flat.iloc[:, i])
            except (pa.ArrowException, ValueError, TypeError, OverflowError) as column_exc:
                raise Unrepresentable(f"has {label(i)} that Arrow cannot carry ({column_exc}); "
                                      "convert it or create the App with serializer='pickle'") from None
        raise Unrepresentable(f"cannot be carried by Arrow: {exc}; create the App with serializer='pickle'") from None
    return table


def _ipc(table, meta: dict, extra: dict | None = None, compression: str | None = None, as_bytes: bool = True):
    """The IPC stream of ``table`` with nbqueue's metadata: bytes, or (``as_bytes=False``) the
    pyarrow Buffer it was written to, which spares a copy of a large stream."""
    import pyarrow as pa
    metadata = dict(table.schema.metadata or {})
    metadata[_META] = _form().dumps(meta).encode()
    metadata.update(extra or {})
    table = table.replace_schema_metadata(metadata)
    # compressed by one thread: threads compressing at once each hold a buffer (and the C allocator's arenas)
    options = pa.ipc.IpcWriteOptions(compression=compression, use_threads=False) if compression else None
    # compressed, a table goes in batches of about BATCH_BYTES: the writer holds one batch's compressed
    # buffers at a time beside the stream, and the reader decompresses into one batch's buffers at a time
    rows = max(1, table.num_rows * BATCH_BYTES // max(1, table.nbytes)) if compression else None

    def write(sink, options=options) -> None:
        with pa.ipc.new_stream(sink, table.schema, options=options) as writer:
            if table.num_rows or not table.num_columns:
                writer.write_table(table, max_chunksize=rows if options is not None else None)
            else:   # an empty batch all the same: it carries the categories of an empty categorical
                columns = [c.chunk(0) if c.num_chunks else pa.array([], c.type) for c in table.columns]
                writer.write_batch(pa.record_batch(columns, schema=table.schema))

    if as_bytes:
        sink = pa.BufferOutputStream()
        write(sink)
        return sink.getvalue().to_pybytes()
    # measured first, then written into a buffer of that size: a growing buffer would copy itself
    # as it doubles, and hold twice the stream at its peak
    mock = pa.MockOutputStream()
    write(mock, None)
    if not compression:
        buffer = pa.allocate_buffer(mock.size())
        write(pa.FixedSizeBufferWriter(buffer))
        return buffer
    # compressed: into a buffer of the uncompressed size plus the codecs' worst-case growth (under
    # 1/128 and a few bytes a buffer); its pages past the compressed stream are never written and
    # take no memory
    buffer = pa.allocate_buffer(mock.size() + mock.size() // 128 + 1024 * (1 + table.num_columns) + 65536)
    stream = pa.FixedSizeBufferWriter(buffer)
    try:
        write(stream)
    except (pa.ArrowException, OSError):     # over that bound after all: a growing buffer
        del stream, buffer
        sink = pa.BufferOutputStream()
        write(sink)
        return sink.getvalue()
    return buffer.slice(0, stream.tell())


def _pack_labels(columns) -> bytes:
    """The column labels (an Index of any kind) as an index-only Arrow IPC stream."""
    import pandas as pd

    meta = {"kind": "index"}
    table = _table(pd.DataFrame(index=columns), meta, index_label="column labels")
    return _ipc(table, meta)


def _arrow_pack(obj: Any, compression: str | None = None) -> Blob:
    import pandas as pd

    meta: dict[str, Any] = {}
    if isinstance(obj, pd.DataFrame):
        meta["kind"], frame = "frame", obj
    elif isinstance(obj, pd.Series):
        meta["kind"], frame = "series", obj.to_frame()
        if obj.name is not None:
            meta["name"] = _json(obj.name, "Series name")
    elif isinstance(obj, pd.Index):
        meta["kind"], frame = "index", pd.DataFrame(index=obj)
    elif isinstance(obj, pd.api.extensions.ExtensionArray):
        meta["kind"], frame = "array", pd.Series(obj).to_frame()
    else:
        raise TypeError(f"no binary codec for {type(obj).__qualname__}")
    if getattr(obj, "attrs", None):
        meta["attrs"] = _json(obj.attrs, "attrs")
    flags = getattr(obj, "flags", None)
    if flags is not None and not flags.allows_duplicate_labels:
        meta["no_duplicate_labels"] = True
    table = _table(frame, meta, index_label="values" if meta["kind"] == "index" else "index",
                   series=meta["kind"] in ("series", "array"))
    extra = {_COLUMNS: _pack_labels(frame.columns)} if meta["kind"] == "frame" else {}   # a Series' label is its name
    info = {"type": type(obj).__name__, "shape": list(getattr(obj, "shape", ()))}
    return Blob("arrow", _ipc(table, meta, extra, compression, as_bytes=False), info)


def _read(data: Any):
    """The table of an IPC stream (``data`` bytes-like or a Handoff), in memory of its own: the
    buffers read in place from ``data`` are copied, so the value built from the table never
    holds ``data`` (a whole payload) for one column's sake, and a Handoff's bytes are dropped here."""
    import pyarrow as pa

    source = pa.py_buffer(data.take() if isinstance(data, Handoff) else data)
    # one thread: threads decompressing at once each hold buffers (and the C allocator's arenas) of their own
    table = pa.ipc.open_stream(source, options=pa.ipc.IpcReadOptions(use_threads=False)).read_all()
    table = _detached(table, source)
    del source
    metadata = table.schema.metadata or {}
    if _META not in metadata:
        raise SerializationError("an Arrow payload without nbqueue's metadata")
    return table, _form().from_jsonable(_form().loads(metadata[_META])), metadata


def _detached(table, source):
    """``table`` with the chunks that point into ``source`` copied (an uncompressed stream is read
    in place; a compressed one is decompressed into buffers of its own, which are kept)."""
    import pyarrow as pa

    low, high = source.address, source.address + source.size

    def inside(chunk) -> bool:
        if _has_dictionary(chunk.type):     # a dictionary's buffers are not among the chunk's: copied whatever
            return True
        return any(b is not None and b.size and low <= b.address < high for b in chunk.buffers())

    columns, copied = [], False
    manager = pa.default_cpu_memory_manager()
    for column in table.columns:
        chunks = []
        for chunk in column.chunks:
            if inside(chunk):
                chunk, copied = chunk.copy_to(manager), True
            chunks.append(chunk)
        columns.append(pa.chunked_array(chunks, type=column.type))
    if not copied:
        return table
    return pa.Table.from_arrays(columns, schema=table.schema)


#: after a table this large (bytes) is converted, the memory Arrow's allocator kept is handed back at once
_RELEASE_ABOVE = 1 << 20


def _release_unused() -> None:
    """Hand back to the system the memory Arrow's allocator keeps after large buffers are freed (mimalloc,
    Arrow's default, keeps them for a while: the next value's buffers would come on top)."""
    import pyarrow as pa

    pa.default_memory_pool().release_unused()


def _fields(t) -> list:
    """The child fields of a nested Arrow type (none for others)."""
    return [t.field(i) for i in range(t.num_fields)] if hasattr(t, "num_fields") else []


def _has_dictionary(t) -> bool:
    import pyarrow as pa

    return pa.types.is_dictionary(t) or any(_has_dictionary(f.type) for f in _fields(t))


def _arrow_unpack(data: Any):
    import pandas as pd

    table, meta, metadata = _read(data)
    fixes = meta.get("fix") or {}
    # the Arrow columns the fixes read, taken before the conversion releases the table's own
    index_field = _INDEX_FIELD.format(0)
    kept = {name: table.column(name) for name in [*fixes, index_field] if name in table.column_names}
    size = table.nbytes
    frame = table.to_pandas(self_destruct=True)     # each column's memory released once it is converted
    del table
    if size >= _RELEASE_ABOVE:
        _release_unused()
    for name, fix in fixes.items():
        position = int(name)
        values = _fixed_values(frame.iloc[:, position], fix, kept.get(name))
        if "object" in fix:     # as a Series of dtype object: pandas would infer str from an object ndarray
            values = pd.Series(values, dtype=object, index=frame.index)
        frame.isetitem(position, values)
    frame.index = _restored_index(frame.index, meta["index"], kept.get(index_field))
    del kept
    kind = meta["kind"]
    if kind == "index":
        return frame.index
    if kind == "frame":
        frame.columns = _arrow_unpack(metadata[_COLUMNS])
        if "attrs" in meta:
            frame.attrs = meta["attrs"]
        return frame.set_flags(allows_duplicate_labels=False) if meta.get("no_duplicate_labels") else frame
    series = frame.iloc[:, 0]
    if kind == "array":
        return series.array
    series.name = meta.get("name")
    if "attrs" in meta:
        series.attrs = meta["attrs"]
    return series.set_flags(allows_duplicate_labels=False) if meta.get("no_duplicate_labels") else series


def _missing(code: str | None):
    import pandas as pd

    return {None: None, "nan": float("nan"), "na": pd.NA, "nat": pd.NaT}[code]


def _object_values(column, fix: dict):
    """An object ndarray of an Arrow column: Python str/bytes/bool/int/date, and the column's kind of missing value."""
    import numpy as np
    import pyarrow as pa

    t = column.type
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_binary(t) or pa.types.is_large_binary(t):
        values = column.to_numpy(zero_copy_only=False)     # objects already, None where missing
    else:
        values = np.empty(len(column), dtype=object)
        values[:] = column.to_pylist()
    if fix.get("null") is not None and column.null_count:
        values[column.is_null().to_numpy(zero_copy_only=False)] = _missing(fix["null"])
    return values


def _string_dtype(spec: list):
    import numpy as np
    import pandas as pd

    storage, na = spec
    try:
        return pd.StringDtype(storage, na_value=np.nan if na == "nan" else pd.NA)
    except TypeError:     # pandas before 2.3: no na_value
        return pd.StringDtype(storage)


def _fixed_level(level, fix: dict):
    """A level or categories Index (no missing values) with its dtype restored."""
    import pandas as pd

    if "object" in fix:
        return pd.Index(level.astype(object), dtype=object, name=level.name)
    if "string" in fix:
        return level.astype(_string_dtype(fix["string"]))
    return pd.CategoricalIndex(_fixed_categorical(level.values, fix["categories"]), name=level.name)


def _fixed_categorical(categorical, fix: dict):
    import pandas as pd

    categories = _fixed_level(categorical.categories, fix)
    return pd.Categorical.from_codes(
        categorical.codes, dtype=pd.CategoricalDtype(categories, ordered=categorical.ordered)
    )


def _fixed_values(values, fix: dict, column=None):
    """A column (Series) or flat index's values with the dtype the sender had."""
    if "object" in fix:
        return _object_values(column, fix["object"])
    if "string" in fix:
        dtype = _string_dtype(fix["string"])
        return values if values.dtype == dtype else values.astype(dtype)
    return _fixed_categorical(values.array, fix["categories"])


def _restored_index(index, meta: dict, column):
    """``column``: the index's Arrow column, when the table had one."""
    import pandas as pd

    fixes = meta.get("fix") or {}
    if "range" in meta:
        index = pd.RangeIndex(*meta["range"])
    elif isinstance(index, pd.MultiIndex):
        for k, fix in fixes.items():
            index = index.set_levels(_fixed_level(index.levels[int(k)], fix), level=int(k), verify_integrity=False)
    elif fixes:
        values = _fixed_values(index, fixes["0"], column)
        index = pd.Index(values, dtype=object) if "object" in fixes["0"] else pd.Index(values)
    if "freq" in meta:
        index = type(index)(index, freq=meta["freq"])
    names = meta.get("names")
    return index.set_names(names if names is not None else [None] * index.nlevels)


__all__ = ["Blob", "COMPRESSIONS", "Handoff", "Unrepresentable", "pack", "pack_pickle", "unpack"]
