"""JSON with type tags; pickle only by explicit opt-in.

Plain JSON values pass through untouched. Other supported types become
``{"__nbq__": TAG, ...}`` so they come back as the same type, equal, on the worker and
on the waiting side: integers beyond 64 bits, non-finite floats, tuple, set, frozenset,
dict with non-string keys, bytes, bytearray, memoryview, datetime/date/time (with their
``zoneinfo.ZoneInfo`` or ``datetime.timezone`` and fold), timedelta, Decimal, UUID,
Fraction, complex, numpy scalars and arrays, pandas Timestamp, Timedelta, NaT, NA, and
DataFrame, Series, Index and extension arrays (Arrow IPC, see blobs.py). Binary values
ride inside the JSON as base64 (``{"__nbq__": "blob", "v": {"codec", "b64", ...}}``), or,
through an App's ``Serializer`` when their bytes are larger than its ``payload_threshold``,
in its payload store, referenced by content hash (``{"__nbq__": "ref", "v": {"key", ...}}``,
see payloads.py); ``Serializer.decode(..., lazy=True)`` gives a reference as a
``PayloadRef`` (its summary) instead of reading it.

Refused with a SerializationError naming where the value sits (``where`` plus the path
inside it): any other type, a subclass of a supported type (it would arrive as its
base class), a string with a lone surrogate (it cannot be stored as UTF-8), a container
that contains itself, and nesting deeper than MAX_DEPTH containers (every decoder on
every store reads that deep). Decoding runs no code but for an opted-in pickle.
"""
from __future__ import annotations

import base64
import contextvars
import datetime as _dt
import decimal
import fractions
import io
import json
import logging
import sys
import uuid
import zoneinfo
from typing import Any

from . import blobs
from .errors import PayloadError, PayloadTooLarge, SerializationError

TAG = "__nbq__"

#: (Plane, owner) while an App's Serializer encodes: where large binary values go (payloads.py)
_ENCODING: contextvars.ContextVar = contextvars.ContextVar("nbqueue_encoding", default=None)
#: (Plane or None, lazy, {key: value}) while a Serializer decodes: how references are read
_DECODING: contextvars.ContextVar = contextvars.ContextVar("nbqueue_decoding", default=None)

#: Containers (list, dict, tuple, set, ...) may nest this many levels deep; deeper is refused
#: at send. At this depth the JSON text of a message stays well within what the JSON
#: decoders (orjson: 1,024 levels) and the recursive decoding below can read back.
MAX_DEPTH = 100

_INT_MIN, _INT_MAX = -(2**63), 2**63 - 1   # JSON decoders (orjson, other languages) keep 64-bit ints exact
#: the types of JSON's scalars: a decoded value of one of these is itself (``from_jsonable``)
_SCALARS = frozenset({str, int, float, bool, type(None)})


def plain(value: Any) -> bool:
    """``value`` is its own JSON form, as ``Serializer.encode`` gives it: None, a bool, an int
    of 64 bits, a finite float, an ASCII str (exactly these types, not subclasses)."""
    kind = value.__class__
    if kind is int:
        return _INT_MIN <= value <= _INT_MAX
    if kind is str:
        return value.isascii()
    if kind is float:
        return value - value == 0.0     # finite
    return value is None or kind is bool


class _Refusal(Exception):
    """Raised inside the encoder; to_jsonable turns it into a SerializationError with the path."""

    def __init__(self, reason: str, value: Any = None, kind: str = "type"):
        super().__init__(reason)
        self.reason, self.child, self.kind = reason, value, kind
        self.path: list[str] = []          # innermost first
        self.chain: list[Any] = []         # the containers the path runs through, innermost first

    def step(self, container: Any, label: str) -> None:
        self.path.append(label)
        self.chain.append(container)
        self.child = container


def _short(value: Any, limit: int = 40) -> str:
    text = repr(value)   # repr escapes lone surrogates, so the text is always storable
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _describe(exc: _Refusal, where: str) -> str:
    path = list(reversed(exc.path))
    if exc.kind == "depth":
        chain = list(reversed(exc.chain))
        seen: dict[int, int] = {}
        for i, container in enumerate(chain):
            first = seen.setdefault(id(container), i)
            if first != i:
                inner = "".join(path[first:i])
                outer = f"its item {''.join(path[:first])}" if first else "the whole value"
                return (f"{where} contains itself ({outer} holds itself at {inner}): a reference cycle cannot be sent "
                        "as JSON; send a copy without the cycle, or create the App with serializer='pickle'")
        return (f"{where} is nested more than {MAX_DEPTH} levels deep (nbqueue.serialization.MAX_DEPTH), "
                "too deep to be decoded safely; flatten it, or create the App with serializer='pickle'")
    if len(path) > 12:
        path = path[:6] + ["..."] + path[-5:]
    if not path:
        return f"{where} {exc.reason}"
    return f"{where}, at {''.join(path).strip()}: {exc.reason}"   # the path apart from the names in ``where``


def to_jsonable(obj: Any, where: str = "value") -> Any:
    """Turn obj into plain JSON types with tags; ``where`` names it in errors.

    Raises SerializationError (a TypeError) naming ``where`` and the path inside it.
    """
    try:
        return _enc(obj, 0)
    except _Refusal as exc:
        raise (PayloadTooLarge if exc.kind == "too-large" else SerializationError)(_describe(exc, where)) from None
    except RecursionError:   # a caller already deep in its stack; the limits above make this rare
        raise SerializationError(f"{where} is nested too deeply to be encoded here") from None


def _text_ok(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _surrogate(text: str) -> _Refusal:
    index = next(i for i, c in enumerate(text) if 0xD800 <= ord(c) <= 0xDFFF)
    return _Refusal(f"is a string with a lone surrogate ({text[index]!r} at index {index}), which cannot be stored as "
                    "UTF-8 text; encode it (e.g. s.encode('utf-8', 'surrogatepass')) and send bytes", text)


def _enc(obj: Any, depth: int) -> Any:
    """``obj`` as JSON types with tags; ``depth`` counts the containers around it. Raises _Refusal."""
    t = type(obj)
    if t is str:
        if obj.isascii() or _text_ok(obj):
            return obj
        raise _surrogate(obj)
    if t is int:
        return obj if _INT_MIN <= obj <= _INT_MAX else {TAG: "int", "v": hex(obj)}   # hex: no digit limit either way
    if t is float:
        return obj if obj - obj == 0.0 else {TAG: "float", "v": repr(obj)}            # obj - obj is 0.0 when finite
    if obj is None or t is bool:
        return obj
    if t is list:
        return _enc_list(obj, depth)
    if t is dict:
        return _enc_dict(obj, depth)
    encode = _ENCODERS.get(t)
    if encode is not None:
        return encode(obj, depth)
    return _enc_other(obj, depth)


def _enc_list(obj: list, depth: int) -> list:
    if depth >= MAX_DEPTH:
        raise _Refusal("", obj, "depth")
    try:
        return [_enc(v, depth + 1) for v in obj]
    except _Refusal as exc:
        exc.step(obj, f"[{_position(obj, exc.child)}]")
        raise


def _enc_dict(obj: dict, depth: int) -> dict:
    """A dict with string keys stays a JSON object; any other is tagged as a list of pairs."""
    if depth >= MAX_DEPTH:
        raise _Refusal("", obj, "depth")
    try:
        if TAG in obj or not all(type(k) is str for k in obj):
            return {TAG: "dict", "v": [[_enc(k, depth + 1), _enc(v, depth + 1)] for k, v in obj.items()]}
        out = {}
        for k, v in obj.items():
            if not (k.isascii() or _text_ok(k)):
                raise _surrogate(k)
            out[k] = _enc(v, depth + 1)
        return out
    except _Refusal as exc:
        exc.step(obj, _dict_label(obj, exc.child))
        raise


def _enc_other(obj: Any, depth: int) -> Any:
    """pandas and numpy values, found by module (their many types are not in _ENCODERS); else a refusal."""
    module = type(obj).__module__
    if module.startswith("pandas"):
        return _pandas_to_json(obj, depth)
    if module.startswith("numpy"):
        return _numpy_to_json(obj, depth)
    raise _Refusal(_unsupported(obj), obj)


def _position(container: Any, child: Any) -> Any:
    for i, v in enumerate(container):
        if v is child:
            return i
    return "?"


def _dict_label(container: dict, child: Any) -> str:
    for k, v in container.items():
        if v is child:
            return f"[{_short(k)}]"
        if k is child:
            return f" key {_short(k)}"
    return "[?]"


def _sequence(tag: str):
    def encode(obj: Any, depth: int) -> dict:
        if depth >= MAX_DEPTH:
            raise _Refusal("", obj, "depth")
        try:
            return {TAG: tag, "v": [_enc(v, depth + 1) for v in obj]}
        except _Refusal as exc:
            exc.step(obj, f"[{_position(obj, exc.child)}]" if tag == "tuple" else " item")
            raise
    return encode


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _enc_tz(tz: Any) -> Any:
    """A tzinfo as JSON: a zone name (ZoneInfo) or a fixed offset in microseconds (datetime.timezone)."""
    t = type(tz)
    if t is zoneinfo.ZoneInfo:
        if tz.key is None:
            raise _Refusal("has a zoneinfo.ZoneInfo made from a file (it has no key), which cannot be carried by name; "
                           "use zoneinfo.ZoneInfo('Area/City')")
        return tz.key
    if t is _dt.timezone:
        offset = tz.utcoffset(None)
        out: dict[str, Any] = {"utc": offset // _dt.timedelta(microseconds=1)}
        name = tz.tzname(None)
        if name != _dt.timezone(offset).tzname(None):
            out["name"] = _enc(name, 0)
        return out
    raise _Refusal(f"has time zone {t.__module__}.{t.__qualname__}, which nbqueue cannot carry exactly; use "
                   "zoneinfo.ZoneInfo('Area/City') or datetime.timezone, or create the App with serializer='pickle'")


def _dec_tz(v: Any):
    if isinstance(v, str):
        return zoneinfo.ZoneInfo(v)
    offset = _dt.timedelta(microseconds=v["utc"])
    return _dt.timezone(offset, v["name"]) if "name" in v else _dt.timezone(offset)


def _enc_clock(tag: str):
    """datetime and time: the wall-clock text, the zone apart (so a ZoneInfo comes back as itself), fold."""
    def encode(obj: Any, depth: int) -> dict:
        tz = obj.tzinfo
        out = {TAG: tag, "v": (obj.replace(tzinfo=None) if tz is not None else obj).isoformat()}
        if tz is not None:
            try:
                out["tz"] = _enc_tz(tz)
            except _Refusal as exc:
                exc.child = obj
                raise
        if obj.fold:
            out["fold"] = 1
        return out
    return encode


def _dec_clock(parse):
    def decode(o: dict, p: bool):
        value = parse(o["v"])
        if "tz" in o:
            value = value.replace(tzinfo=_dec_tz(o["tz"]))
        if o.get("fold"):
            value = value.replace(fold=1)
        return value
    return decode


def _enc_memoryview(obj: memoryview, depth: int) -> dict:
    if obj.format != "B" or obj.ndim != 1:
        raise _Refusal(f"is a memoryview of format {obj.format!r} with {obj.ndim} dimension(s); only flat byte views "
                       "are carried: send bytes(view) or numpy.asarray(view)", obj)
    return {TAG: "memoryview", "v": _b64(obj.tobytes())}


def _enc_complex(obj: complex, depth: int) -> dict:
    return {TAG: "complex", "v": [_enc(obj.real, depth), _enc(obj.imag, depth)]}


def _enc_fraction(obj: fractions.Fraction, depth: int) -> dict:
    return {TAG: "fraction", "v": [_enc(obj.numerator, depth), _enc(obj.denominator, depth)]}


_ENCODERS = {
    tuple: _sequence("tuple"),
    set: _sequence("set"),
    frozenset: _sequence("frozenset"),
    bytes: lambda obj, depth: {TAG: "bytes", "v": _b64(obj)},
    bytearray: lambda obj, depth: {TAG: "bytearray", "v": _b64(obj)},
    memoryview: _enc_memoryview,
    _dt.datetime: _enc_clock("datetime"),
    _dt.time: _enc_clock("time"),
    _dt.date: lambda obj, depth: {TAG: "date", "v": obj.isoformat()},
    _dt.timedelta: lambda obj, depth: {TAG: "timedelta", "v": [obj.days, obj.seconds, obj.microseconds]},
    decimal.Decimal: lambda obj, depth: {TAG: "decimal", "v": str(obj)},
    uuid.UUID: lambda obj, depth: {TAG: "uuid", "v": str(obj)},
    complex: _enc_complex,
    fractions.Fraction: _enc_fraction,
}

_BASES = (bool, int, float, str, bytes, bytearray, list, dict, tuple, frozenset, set, _dt.datetime, _dt.date, _dt.time,
          _dt.timedelta, decimal.Decimal, uuid.UUID, complex, fractions.Fraction)


def _unsupported(obj: Any) -> str:
    t = type(obj)
    name = f"{t.__module__}.{t.__qualname__}"
    for base in _BASES:
        if isinstance(obj, base):
            return (f"has type {name}, a subclass of {base.__name__} that would arrive as a plain {base.__name__}; "
                    f"pass {base.__name__}(...) of it, or create the App with serializer='pickle'")
    return (f"has type {name}, which nbqueue cannot serialize as JSON; "
            "pass plain data (numbers, strings, lists, dicts, "
            "DataFrames, arrays) or create the App with serializer='pickle'")


# -- binary values: frames, arrays (blobs.py turns them into bytes and back) --------------------------
def _blob_to_json(blob) -> dict:
    """The JSON form of a blobs.Blob. The bytes ride inline as base64 (``b64``)."""
    v = {"codec": blob.codec, "b64": _b64(blob.data)}
    v.update(blob.info)
    return {TAG: "blob", "v": v}


def _blob_from_json(o: dict, allow_pickle: bool):
    v = o["v"]
    if v["codec"] == "pickle" and not allow_pickle:
        raise SerializationError(_PICKLE_REFUSED)
    return blobs.unpack(v["codec"], blobs.Handoff(base64.b64decode(v["b64"])), v)


def _binary(obj: Any, make) -> dict:
    """The JSON of a binary value; ``make(compression)`` packs it (a blobs.Blob). Through an
    App's Serializer, large ones go out of band (payloads.Plane.encode)."""
    active = _ENCODING.get()
    if active is None:
        return _blob_to_json(make(None))
    plane, owner = active
    return plane.encode(obj, make, owner, _blob_to_json)


def _pack(obj: Any, depth: int) -> dict:
    try:
        return _binary(obj, lambda compression: blobs.pack(obj, compression))
    except blobs.Unrepresentable as exc:
        raise _Refusal(str(exc), obj) from None
    except PayloadTooLarge as exc:
        raise _Refusal(str(exc), obj, "too-large") from None


def _dec_ref(o: dict, p: bool):
    """A value stored out of band: read from the payload store once per decode (equal payloads
    in one value decode to one object), or, decoding lazily, its PayloadRef."""
    plane, lazy, cache = _DECODING.get() or (None, False, None)
    v = o["v"]
    if lazy:
        return PayloadRef(v, plane)
    if v.get("codec") == "pickle" and not p:
        raise SerializationError(_PICKLE_REFUSED)
    if cache is not None and v["key"] in cache:
        return cache[v["key"]]
    value = PayloadRef(v, plane).load()
    if cache is not None:
        cache[v["key"]] = value
    return value


# -- values stored out of band (payloads.py stores and reads them; a reference is part of the JSON form) --
log = logging.getLogger("nbqueue.payloads")


def human_size(n: int) -> str:
    """``43891992`` -> ``"44 MB"`` (decimal units, as file managers show them)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            value = n / scale
            return f"{value:.1f} {unit}" if value < 9.95 else f"{value:,.0f} {unit}"
    return f"{n} bytes"


def summary(info: dict, size: int) -> str:
    """One line for a payload: ``DataFrame 1,000,000×5, 44 MB``, ``ndarray float64 1,000×1,000, 8.0 MB``."""
    kind, shape = str(info.get("type") or "value"), info.get("shape")
    if kind == "ndarray":
        dims = "×".join(f"{n:,}" for n in shape or []) or "scalar"
        text = f"ndarray {info.get('dtype', '')} {dims}".replace("  ", " ")
    elif kind == "DataFrame" and shape and len(shape) == 2:
        text = f"DataFrame {shape[0]:,}×{shape[1]:,}"
    elif shape:
        text = f"{kind} {shape[0]:,}"
    else:
        text = f"pickled {kind}" if info.get("pickled") else kind
    compression = info.get("compression")
    return f"{text}, {human_size(size)}" + (f" ({compression})" if compression else "")


class PayloadRef:
    """A value stored out of band, not loaded: what ``app.tasks()`` and the views show.

    ``repr()`` is the summary (``DataFrame 1,000,000×5, 44 MB``); ``head()`` the first rows
    of a DataFrame or Series (carried in the reference, no payload read); ``load()`` reads
    and decodes the value through the App's payload store (``plane``, a payloads.Plane).
    """

    __slots__ = ("key", "codec", "size", "summary", "info", "_v", "_plane")

    def __init__(self, v: dict, plane: Any = None):
        self.key, self.codec, self.size = v["key"], v["codec"], int(v.get("size") or 0)
        self.info = {k: x for k, x in v.items() if k not in ("key", "codec", "size", "summary", "head", "store")}
        self.summary = v.get("summary") or summary(self.info, self.size)
        self._v, self._plane = v, plane

    @property
    def type(self) -> str:
        return str(self.info.get("type") or "")

    @property
    def shape(self) -> tuple:
        return tuple(self.info.get("shape") or ())

    def head(self):
        """The first rows (at most 5) and columns (at most 20) of a DataFrame or Series, or None."""
        if not self._v.get("head"):
            return None
        try:
            return from_jsonable(self._v["head"])
        except Exception:  # a preview that cannot be read is no preview
            log.debug("cannot read the preview of %s", self.key, exc_info=True)
            return None

    def load(self) -> Any:
        """The value: read (hash checked) and decoded. Raises PayloadMissing or PayloadCorrupt."""
        if self._plane is None:
            raise PayloadError(f"payload {self.key} ({self.summary}) can only be read through an App's serializer "
                               "(app.serializer.decode), which knows the payload store")
        return self._plane.load(self._v)

    def __repr__(self) -> str:
        return self.summary

    __str__ = __repr__

    def __eq__(self, other: Any) -> bool:
        return isinstance(other, PayloadRef) and other.key == self.key

    def __hash__(self) -> int:
        return hash(self.key)


def _pandas_to_json(obj: Any, depth: int) -> Any:
    import pandas as pd

    t = type(obj)
    if t is pd.Timestamp:
        unit = getattr(obj, "unit", "ns")
        out = {TAG: "timestamp", "v": int(obj.to_datetime64().astype("int64")), "unit": unit}
        if obj.tz is not None:
            try:
                out["tz"] = _enc_tz(obj.tz)
            except _Refusal as exc:
                exc.child = obj
                raise
        return out
    if t is pd.Timedelta:
        unit = getattr(obj, "unit", "ns")
        return {TAG: "pd-timedelta", "v": int(obj.to_timedelta64().astype("int64")), "unit": unit}
    if obj is pd.NaT:
        return {TAG: "nat"}
    if obj is pd.NA:
        return {TAG: "na"}
    if t is pd.DataFrame or t is pd.Series or isinstance(obj, (pd.Index, pd.api.extensions.ExtensionArray)):
        return _pack(obj, depth)
    raise _Refusal(_unsupported(obj), obj)


def _numpy_to_json(obj: Any, depth: int) -> Any:
    import numpy as np

    if type(obj) is np.ndarray:
        if obj.dtype == object:
            if depth >= MAX_DEPTH:
                raise _Refusal("", obj, "depth")
            order = "F" if obj.flags.f_contiguous and not obj.flags.c_contiguous else "C"
            flat = obj.ravel(order=order)
            try:
                items = [_enc(v, depth + 1) for v in flat]
            except _Refusal as exc:
                exc.step(obj, f".flat[{_position(flat, exc.child)}]")
                raise
            return {TAG: "ndarray-objects", "v": {"shape": list(obj.shape), "order": order, "items": items}}
        return _pack(obj, depth)
    if isinstance(obj, np.generic):
        array = np.asarray(obj)
        if array.dtype.kind not in "biufcmMSU":
            raise _Refusal(f"is a numpy scalar of dtype {array.dtype}, which nbqueue cannot carry; "
                           "send it inside an array, or create the App with serializer='pickle'", obj)
        return {TAG: "npscalar", "dtype": array.dtype.str, "v": _b64(array.tobytes())}
    if isinstance(obj, np.ndarray):
        raise _Refusal(f"has type {type(obj).__module__}.{type(obj).__qualname__}, a subclass of numpy.ndarray that "
                       "would arrive as a plain array; pass numpy.asarray(...) of it, or create the App with "
                       "serializer='pickle'", obj)
    raise _Refusal(_unsupported(obj), obj)


# -- decoding ---------------------------------------------------------------------------------------
_PICKLE_REFUSED = "message carries pickled data but this App was not created with serializer='pickle'"


def from_jsonable(obj: Any, allow_pickle: bool = False) -> Any:
    """Inverse of to_jsonable. Runs no code: pickled values raise SerializationError
    unless ``allow_pickle`` (the App opted in with serializer='pickle')."""
    if isinstance(obj, list):
        return [from_jsonable(v, allow_pickle) for v in obj]
    if isinstance(obj, dict):
        tag = obj.get(TAG)
        if tag is None:
            return {k: from_jsonable(v, allow_pickle) for k, v in obj.items()}
        try:
            decode = _DECODERS[tag]
        except KeyError:
            raise SerializationError(f"unknown type tag {tag!r} (written by a newer nbqueue?)") from None
        return decode(obj, allow_pickle)
    return obj


def _dec_dataframe(o: dict, p: bool):   # written by nbqueue before Arrow IPC (pandas' JSON "table")
    import pandas as pd

    return pd.read_json(io.StringIO(o["v"]), orient="table")


def _dec_series(o: dict, p: bool):
    series = _dec_dataframe(o, p).iloc[:, 0]
    if series.name == "__series__":
        series.name = None
    return series


def _dec_ndarray(o: dict, p: bool):   # written by nbqueue before blobs (raw bytes in base64)
    import numpy as np

    v = o["v"]
    return np.frombuffer(base64.b64decode(v["data"]), dtype=np.dtype(v["dtype"])).reshape(v["shape"]).copy()


def _dec_ndarray_list(o: dict, p: bool):
    import numpy as np

    v = o["v"]
    return np.array(from_jsonable(v["items"], p), dtype=v["dtype"])


def _dec_ndarray_objects(o: dict, p: bool):
    import numpy as np

    v = o["v"]
    items = v["items"]
    flat = np.empty(len(items), dtype=object)
    for i, item in enumerate(items):   # item by item: a list item stays a list, not a new axis
        flat[i] = from_jsonable(item, p)
    return flat.reshape(v["shape"], order=v["order"])


def _dec_npscalar(o: dict, p: bool):
    import numpy as np

    return np.frombuffer(base64.b64decode(o["v"]), dtype=np.dtype(o["dtype"])).reshape(())[()]


def _dec_timestamp(o: dict, p: bool):
    import numpy as np
    import pandas as pd

    v = o["v"]
    if isinstance(v, str):   # written by nbqueue before units and zones were kept
        return pd.Timestamp(v)
    unit = o["unit"]
    ts = pd.Timestamp(np.datetime64(v, unit))
    if hasattr(ts, "as_unit"):
        ts = ts.as_unit(unit)
    if "tz" in o:
        ts = ts.tz_localize("UTC").tz_convert(_dec_tz(o["tz"]))
    return ts


def _dec_pd_timedelta(o: dict, p: bool):
    import numpy as np
    import pandas as pd

    unit = o["unit"]
    td = pd.Timedelta(np.timedelta64(o["v"], unit))
    return td.as_unit(unit) if hasattr(td, "as_unit") else td


def _dec_timedelta(o: dict, p: bool):
    v = o["v"]
    if isinstance(v, list):
        return _dt.timedelta(days=v[0], seconds=v[1], microseconds=v[2])
    return _dt.timedelta(seconds=v)   # written by nbqueue before days/seconds/microseconds


def _dec_pickle(o: dict, p: bool):   # written by nbqueue before blobs
    if not p:
        raise SerializationError(_PICKLE_REFUSED)
    import pickle

    return pickle.loads(base64.b64decode(o["v"]))


def _dec_nat(o: dict, p: bool):
    import pandas as pd

    return pd.NaT


def _dec_na(o: dict, p: bool):
    import pandas as pd

    return pd.NA


def _dec_dict(o: dict, p: bool) -> dict:
    return {from_jsonable(k, p): from_jsonable(x, p) for k, x in o["v"]}


_DECODERS = {
    "int": lambda o, p: int(o["v"], 16),
    "float": lambda o, p: float(o["v"]),
    "dict": _dec_dict,
    "tuple": lambda o, p: tuple(from_jsonable(x, p) for x in o["v"]),
    "set": lambda o, p: {from_jsonable(x, p) for x in o["v"]},
    "frozenset": lambda o, p: frozenset(from_jsonable(x, p) for x in o["v"]),
    "bytes": lambda o, p: base64.b64decode(o["v"]),
    "bytearray": lambda o, p: bytearray(base64.b64decode(o["v"])),
    "memoryview": lambda o, p: memoryview(base64.b64decode(o["v"])),
    "datetime": _dec_clock(_dt.datetime.fromisoformat),
    "date": lambda o, p: _dt.date.fromisoformat(o["v"]),
    "time": _dec_clock(_dt.time.fromisoformat),
    "timedelta": _dec_timedelta,
    "decimal": lambda o, p: decimal.Decimal(o["v"]),
    "uuid": lambda o, p: uuid.UUID(o["v"]),
    "complex": lambda o, p: complex(from_jsonable(o["v"][0], p), from_jsonable(o["v"][1], p)),
    "fraction": lambda o, p: fractions.Fraction(from_jsonable(o["v"][0], p), from_jsonable(o["v"][1], p)),
    "blob": _blob_from_json,
    "ref": _dec_ref,
    "ndarray-objects": _dec_ndarray_objects,
    "npscalar": _dec_npscalar,
    "timestamp": _dec_timestamp,
    "pd-timedelta": _dec_pd_timedelta,
    "nat": _dec_nat,
    "na": _dec_na,
    # tags written by earlier versions of nbqueue, still read
    "dataframe": _dec_dataframe,
    "series": _dec_series,
    "ndarray": _dec_ndarray,
    "ndarray-list": _dec_ndarray_list,
    "pickle": _dec_pickle,
}


class Serializer:
    """Encodes task arguments and results. ``pickle=True`` is an explicit opt-in: a value
    JSON cannot carry exactly is then pickled (protocol 5), and pickles are decoded.

    ``plane`` (a payloads.Plane, set by the App): binary values larger than its threshold
    are stored in its payload store and referenced (see payloads.py), compressed as it says.
    """

    def __init__(self, pickle: bool = False):
        self.pickle = pickle
        self.plane = None

    def encode(self, obj: Any, where: str = "value", owner: str | None = None) -> Any:
        """JSON-ready form of ``obj``; ``owner``: the record id its payloads are linked to (a
        task's result), else the surrounding send's pin (payloads.sending). Raises
        SerializationError (PayloadTooLarge for a value too large for the payload store)."""
        if plain(obj):
            return obj      # JSON as it is (the result of most tasks): no payload, no tag
        if self.plane is None:
            return self._encode(obj, where)
        token = _ENCODING.set((self.plane, owner))
        try:
            return self._encode(obj, where)
        finally:
            _ENCODING.reset(token)

    def _encode(self, obj: Any, where: str) -> Any:
        try:
            return to_jsonable(obj, where)
        except PayloadTooLarge:
            raise
        except SerializationError:
            if not self.pickle:
                raise

        try:
            return _binary(obj, lambda compression: blobs.pack_pickle(obj, where, compression))
        except PayloadTooLarge as exc:
            raise PayloadTooLarge(f"{where} {exc}") from None

    def decode_arguments(self, args: list, kwargs: dict) -> tuple[list, dict]:
        """A task's positional and keyword arguments, each decoded (see ``decode``)."""
        if _SCALARS.issuperset(map(type, args)) and _SCALARS.issuperset(map(type, kwargs.values())):
            return args, kwargs     # JSON scalars (the arguments of most tasks) decode to themselves
        return [self.decode(a) for a in args], {k: self.decode(v) for k, v in kwargs.items()}

    def decode(self, obj: Any, lazy: bool = False) -> Any:
        """Inverse of encode. Values stored out of band are read from the payload store (hash
        checked; PayloadMissing, PayloadCorrupt), or with ``lazy=True`` left as
        payloads.PayloadRef (a summary, and a DataFrame's first rows) without any read."""
        if self.plane is None and not lazy:
            return from_jsonable(obj, self.pickle)
        token = _DECODING.set((self.plane, lazy, {}))
        try:
            return from_jsonable(obj, self.pickle)
        finally:
            _DECODING.reset(token)


_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)

try:  # orjson encodes and decodes several times faster; the standard library covers what it cannot
    import orjson as _orjson
except ImportError:  # pragma: no cover - orjson is a dependency, but keep working without it
    _orjson = None


def dumps(obj: Any) -> str:
    """Compact JSON text of an already-jsonable structure.

    Raises SerializationError when the text could not be stored or read back (a lone
    surrogate, a cycle, a value JSON has no form for).
    """
    if _orjson is not None:
        try:
            return _orjson.dumps(obj).decode()
        except (TypeError, _orjson.JSONEncodeError):  # deeper than orjson writes (254 levels), for one
            pass
    try:
        text = _ENCODER.encode(obj)
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise SerializationError("text with a lone surrogate cannot be stored as UTF-8 JSON") from None
    except (ValueError, TypeError, RecursionError) as exc:
        raise SerializationError(f"cannot be written as JSON: {exc}") from None
    return text


def loads(text: str | bytes) -> Any:
    if _orjson is not None:
        try:
            return _orjson.loads(text)
        except _orjson.JSONDecodeError:
            pass  # let the standard library decide (and word the error)
    return json.loads(text)


# blobs.py writes the JSON form of labels and metadata inside the Arrow streams it packs
blobs.use_json(sys.modules[__name__])
