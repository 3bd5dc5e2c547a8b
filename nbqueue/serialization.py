"""JSON with type tags; pickle only by explicit opt-in.

Plain JSON values pass through untouched. Other supported types become
``{"__nbq__": TAG, "v": ...}`` so they come back as the same type on the worker:
tuple, set, frozenset, bytes, datetime, date, time, timedelta, Decimal, UUID,
complex, pandas DataFrame/Series and numpy arrays and scalars. Anything else raises
SerializationError naming where in the value it sits.
"""
from __future__ import annotations

import base64
import datetime as _dt
import decimal
import io
import json
import pickle
import uuid
from typing import Any

from .errors import SerializationError

TAG = "__nbq__"


def _tagged(tag: str, value: Any) -> dict:
    return {TAG: tag, "v": value}


def to_jsonable(obj: Any, where: str = "value") -> Any:
    """Turn obj into plain JSON types with tags; ``where`` names it in errors."""
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int):
        return obj
    if isinstance(obj, float):
        if obj != obj or obj in (float("inf"), float("-inf")):
            return _tagged("float", repr(obj))
        return obj
    if isinstance(obj, list):
        return [to_jsonable(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj) and TAG not in obj:
            return {k: to_jsonable(v, f"{where}[{k!r}]") for k, v in obj.items()}
        return _tagged("dict", [[to_jsonable(k, f"{where} key {k!r}"), to_jsonable(v, f"{where}[{k!r}]")] for k, v in obj.items()])
    if isinstance(obj, tuple):
        return _tagged("tuple", [to_jsonable(v, f"{where}[{i}]") for i, v in enumerate(obj)])
    if isinstance(obj, frozenset):
        return _tagged("frozenset", [to_jsonable(v, f"{where} item") for v in obj])
    if isinstance(obj, set):
        return _tagged("set", [to_jsonable(v, f"{where} item") for v in obj])
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return _tagged("bytes", base64.b64encode(bytes(obj)).decode("ascii"))
    if isinstance(obj, _dt.datetime):
        return _tagged("datetime", obj.isoformat())
    if isinstance(obj, _dt.date):
        return _tagged("date", obj.isoformat())
    if isinstance(obj, _dt.time):
        return _tagged("time", obj.isoformat())
    if isinstance(obj, _dt.timedelta):
        return _tagged("timedelta", obj.total_seconds())
    if isinstance(obj, decimal.Decimal):
        return _tagged("decimal", str(obj))
    if isinstance(obj, uuid.UUID):
        return _tagged("uuid", str(obj))
    if isinstance(obj, complex):
        return _tagged("complex", [obj.real, obj.imag])
    mod = type(obj).__module__
    if mod.startswith("pandas"):
        return _pandas_to_json(obj, where)
    if mod.startswith("numpy"):
        return _numpy_to_json(obj, where)
    raise SerializationError(
        f"{where} has type {type(obj).__module__}.{type(obj).__qualname__}, which nbqueue cannot "
        "serialize as JSON; pass plain data (numbers, strings, lists, dicts, DataFrames, arrays) "
        "or create the App with serializer='pickle'"
    )


def _pandas_to_json(obj: Any, where: str) -> Any:
    import pandas as pd

    if isinstance(obj, pd.DataFrame):
        return _tagged("dataframe", obj.to_json(orient="table", date_format="iso", double_precision=15))
    if isinstance(obj, pd.Series):
        return _tagged("series", obj.to_frame(name=obj.name if obj.name is not None else "__series__").to_json(orient="table", date_format="iso", double_precision=15))
    if isinstance(obj, pd.Timestamp):
        return _tagged("timestamp", obj.isoformat())
    if isinstance(obj, pd.Timedelta):
        return _tagged("timedelta", obj.total_seconds())
    raise SerializationError(f"{where} has type {type(obj).__qualname__}, which nbqueue cannot serialize as JSON")


def _numpy_to_json(obj: Any, where: str) -> Any:
    import numpy as np

    if isinstance(obj, np.ndarray):
        if obj.dtype.kind in "biufcmM" and not obj.dtype.hasobject:
            data = np.ascontiguousarray(obj)
            return _tagged("ndarray", {"dtype": data.dtype.str, "shape": list(data.shape), "data": base64.b64encode(data.tobytes()).decode("ascii")})
        return _tagged("ndarray-list", {"dtype": str(obj.dtype), "items": to_jsonable(obj.tolist(), where)})
    if isinstance(obj, np.generic):
        return to_jsonable(obj.item(), where)
    raise SerializationError(f"{where} has type {type(obj).__qualname__}, which nbqueue cannot serialize as JSON")


def from_jsonable(obj: Any) -> Any:
    """Inverse of to_jsonable."""
    if isinstance(obj, list):
        return [from_jsonable(v) for v in obj]
    if isinstance(obj, dict):
        tag = obj.get(TAG)
        if tag is None:
            return {k: from_jsonable(v) for k, v in obj.items()}
        return _DECODERS[tag](obj["v"])
    return obj


def _decode_dataframe(text: str):
    import pandas as pd

    return pd.read_json(io.StringIO(text), orient="table")


def _decode_series(text: str):
    frame = _decode_dataframe(text)
    series = frame.iloc[:, 0]
    if series.name == "__series__":
        series.name = None
    return series


def _decode_ndarray(v: dict):
    import numpy as np

    return np.frombuffer(base64.b64decode(v["data"]), dtype=np.dtype(v["dtype"])).reshape(v["shape"]).copy()


def _decode_ndarray_list(v: dict):
    import numpy as np

    return np.array(from_jsonable(v["items"]), dtype=v["dtype"])


def _decode_timestamp(v: str):
    import pandas as pd

    return pd.Timestamp(v)


_DECODERS = {
    "float": float,
    "dict": lambda v: {from_jsonable(k): from_jsonable(x) for k, x in v},
    "tuple": lambda v: tuple(from_jsonable(x) for x in v),
    "set": lambda v: {from_jsonable(x) for x in v},
    "frozenset": lambda v: frozenset(from_jsonable(x) for x in v),
    "bytes": lambda v: base64.b64decode(v),
    "datetime": _dt.datetime.fromisoformat,
    "date": _dt.date.fromisoformat,
    "time": _dt.time.fromisoformat,
    "timedelta": lambda v: _dt.timedelta(seconds=v),
    "decimal": decimal.Decimal,
    "uuid": uuid.UUID,
    "complex": lambda v: complex(v[0], v[1]),
    "dataframe": _decode_dataframe,
    "series": _decode_series,
    "ndarray": _decode_ndarray,
    "ndarray-list": _decode_ndarray_list,
    "timestamp": _decode_timestamp,
    "pickle": lambda v: pickle.loads(base64.b64decode(v)),
}


class Serializer:
    """Encodes task arguments and results. ``pickle=True`` is an explicit opt-in."""

    def __init__(self, pickle: bool = False):
        self.pickle = pickle

    def encode(self, obj: Any, where: str = "value") -> Any:
        if self.pickle:
            try:
                return to_jsonable(obj, where)
            except SerializationError:
                try:
                    return _tagged("pickle", base64.b64encode(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)).decode("ascii"))
                except Exception as exc:  # pickling errors come in many types
                    raise SerializationError(f"{where} cannot be pickled: {exc}") from exc
        return to_jsonable(obj, where)

    def decode(self, obj: Any) -> Any:
        if not self.pickle and _contains_pickle(obj):
            raise SerializationError("message carries pickled data but this App was not created with serializer='pickle'")
        return from_jsonable(obj)


def _contains_pickle(obj: Any) -> bool:
    if isinstance(obj, dict):
        if obj.get(TAG) == "pickle":
            return True
        return any(_contains_pickle(v) for v in obj.values())
    if isinstance(obj, list):
        return any(_contains_pickle(v) for v in obj)
    return False


_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)

try:  # orjson encodes and decodes several times faster; the standard library covers what it cannot
    import orjson as _orjson
except ImportError:  # pragma: no cover - orjson is a dependency, but keep working without it
    _orjson = None


def dumps(obj: Any) -> str:
    """Compact JSON text of an already-jsonable structure."""
    if _orjson is not None:
        try:
            return _orjson.dumps(obj).decode()
        except (TypeError, _orjson.JSONEncodeError):  # integers beyond 64 bits, for one
            pass
    return _ENCODER.encode(obj)


def loads(text: str | bytes) -> Any:
    if _orjson is not None:
        try:
            return _orjson.loads(text)
        except _orjson.JSONDecodeError:
            pass  # let the standard library decide (and word the error)
    return json.loads(text)

