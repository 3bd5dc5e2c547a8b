"""The message envelope: one task attempt, as a frozen dataclass with its field set written once.

The fields are machinery's in Python spelling (``id, name, args, kwargs, queue, eta, priority,
headers, retry_count, retry_timeout, immutable, on_success, on_error, group_id,
group_task_count, created_at``) plus ``retries`` (retries used so far), ``retry_backoff``,
``ignore_when_not_registered``, ``time_limit``, ``soft_time_limit``, ``workflow`` (what lets workflow.py advance
chains and chords), ``serializer`` and ``code`` (a function shipped from a notebook). Keys
this version does not know travel in ``extra`` and are encoded back as they came. Callbacks
(``on_success``, ``on_error``) are nested envelopes, kept as their JSON objects.

Encoded as one JSON object (nbqueue.serialization) with the fields at their defaults left
out: smaller bodies, less to encode. ``Message.check`` validates a decoded object's shape
(MessageError with the reason) from the same field table.
"""
from __future__ import annotations

import dataclasses
import operator
from typing import Any

from . import serialization
from .errors import MessageError


def _field(default: Any, *types: type) -> Any:
    """A field with its default and the JSON types a decoded value must have."""
    return dataclasses.field(default=default, metadata={"types": types})


@dataclasses.dataclass(frozen=True)
class Message:
    """One task attempt's envelope (see the module docstring)."""

    id: str = _field("", str)
    name: str = _field("", str)
    args: list = _field((), list)             # encoded arguments (nbqueue.serialization)
    kwargs: dict = _field(None, dict)
    queue: str | None = _field(None, str)
    eta: float | None = _field(None, int, float)     # Unix time it is due; None: at once
    priority: int = _field(0, int)                   # 0 (lowest) to 9
    headers: dict | None = _field(None, dict)
    retry_count: int = _field(0, int)                # retries left
    retry_timeout: float = _field(0, int, float)
    retry_backoff: dict | None = _field(None, dict)
    retries: int = _field(0, int)                    # retries used so far
    immutable: bool = _field(False, bool)
    on_success: list | None = _field(None, list)
    on_error: list | None = _field(None, list)
    ignore_when_not_registered: bool = _field(False, bool)
    time_limit: float | None = _field(None, int, float)
    soft_time_limit: float | None = _field(None, int, float)
    group_id: str | None = _field(None, str)
    group_task_count: int = _field(0, int)
    workflow: dict | None = _field(None, dict)
    created_at: float | None = _field(None, int, float)
    serializer: str | None = _field(None, str)
    code: dict | None = _field(None, dict)
    #: keys this version does not know, kept as they came
    extra: dict = dataclasses.field(default_factory=dict, compare=False)

    # -- conversion -----------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """The JSON object, fields at their defaults left out (``id``, ``name``, ``args`` and
        ``kwargs`` always present)."""
        out: dict = {"id": self.id, "name": self.name, "args": list(self.args), "kwargs": dict(self.kwargs or {})}
        for (name, default), value in zip(_DEFAULTS.items(), _optional_values(self)):
            if value != default:
                out[name] = value
        out.update(self.extra)
        return out

    @staticmethod
    def object_of(id: str, name: str, args: list, kwargs: dict, **optional: Any) -> dict:
        """``Message(id=id, name=name, args=args, kwargs=kwargs, **optional).to_dict()`` without
        building the Message (the send path makes one per task). Raises TypeError for a
        keyword that is not a field."""
        out: dict = {"id": id, "name": name, "args": list(args), "kwargs": dict(kwargs or {})}
        try:
            out.update({key: value for key, value in optional.items() if value != _DEFAULTS[key]})
        except KeyError as exc:
            raise TypeError(f"Message has no field {exc.args[0]!r}") from None
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "Message":
        """A Message of a checked JSON object (see ``check``). Unknown keys go to ``extra``; a
        field sent as ``null`` whose default is not None (``retries``, ``priority`` ...) holds
        its default.

        Built without ``__init__``: the object's ``__dict__`` takes the keys sent, and a field
        left out reads its default from the class (a decode per claimed task stays cheap)."""
        message = object.__new__(cls)
        fields = message.__dict__
        fields.update(data)
        if _NAMES.issuperset(data):
            fields["extra"] = {}
        else:
            fields["extra"] = {key: fields.pop(key) for key in data if key not in _NAMES}
        for key, value in data.items():     # (``None in data.values()`` compares every list and dict: slower)
            if value is None and key in _NOT_NULL:
                fields[key] = _NOT_NULL[key]
        return message

    def encode(self) -> str:
        return serialization.dumps(self.to_dict())

    @classmethod
    def decode(cls, body: str | bytes) -> "Message":
        """The Message a body encodes; MessageError with the reason when it is not one."""
        return cls.from_dict(decode_object(body))

    def copy(self, **changes: Any) -> "Message":
        """This message with ``changes`` (fields by name)."""
        return dataclasses.replace(self, **changes)

    # -- validation ------------------------------------------------------------------------------
    @staticmethod
    def check(data: Any) -> dict:
        """``data`` when it has the shape of an envelope (callbacks included); MessageError otherwise."""
        if not _exactly_typed(data):
            _check_types(data)
        for key in ("on_success", "on_error"):
            for callback in data.get(key) or []:
                Message.check(callback)
        return data


def _exactly_typed(data: Any) -> bool:
    """Whether ``data`` is an envelope whose fields have exactly the types JSON decodes to
    (what every producer sends): the quick part of ``Message.check``."""
    if type(data) is not dict or not data.keys() >= _REQUIRED_KEYS or not data["id"] or not data["name"]:
        return False
    for key, value in data.items():     # the fields sent (fewer than the fields there are)
        exact = _EXACT_TYPES.get(key)
        if exact is not None and type(value) not in exact:
            return False
    return True


def _check_types(data: Any) -> None:
    """MessageError with the reason when ``data`` (not ``_exactly_typed``) is not an envelope."""
    if not isinstance(data, dict):
        raise MessageError(f"message is a {type(data).__name__}, not a JSON object")
    missing = [f for f in REQUIRED if f not in data]
    if missing:
        raise MessageError(f"message lacks required field(s): {', '.join(missing)}")
    if not isinstance(data["id"], str) or not data["id"]:
        raise MessageError("message id must be a non-empty string")
    if not isinstance(data["name"], str) or not data["name"]:
        raise MessageError("message name must be a non-empty string")
    if not isinstance(data["args"], list):
        raise MessageError("message args must be a list")
    if not isinstance(data["kwargs"], dict):
        raise MessageError("message kwargs must be an object")
    for key, value in data.items():
        kinds = _TYPES.get(key)
        if kinds is None or value is None:
            continue
        if not isinstance(value, kinds) or isinstance(value, bool) and bool not in kinds:
            raise MessageError(f"message field {key!r} has the wrong type ({type(value).__name__})")


#: fields every envelope carries
REQUIRED = ("id", "name", "args", "kwargs")
_FIELDS = [f for f in dataclasses.fields(Message) if f.name != "extra"]
_NAMES = frozenset(f.name for f in _FIELDS)
_OPTIONAL = [f for f in _FIELDS if f.name not in REQUIRED]
#: field -> the JSON types its value may have (None is always allowed for an optional field)
_TYPES: dict[str, tuple] = {f.name: f.metadata["types"] for f in _OPTIONAL}
#: field -> the exact types its value may have as JSON decodes it (None: optional fields only)
_EXACT_TYPES: dict[str, frozenset] = {
    **{name: frozenset({kind}) for name, kind in zip(REQUIRED, (str, str, list, dict))},
    **{name: frozenset({*kinds, type(None)}) for name, kinds in _TYPES.items()},
}
_REQUIRED_KEYS = frozenset(REQUIRED)
#: optional field -> its default (a field left out of the JSON object holds its default)
_DEFAULTS: dict[str, Any] = {f.name: f.default for f in _OPTIONAL}
#: fields whose default is not None: a ``null`` sent for one reads as its default
_NOT_NULL: dict[str, Any] = {name: default for name, default in _DEFAULTS.items() if default is not None}
#: a Message's optional field values, in the order of _DEFAULTS
_optional_values = operator.attrgetter(*_DEFAULTS)


def decode_object(body: str | bytes) -> dict:
    """The checked JSON object a body encodes (the envelope as a dict, as the worker runs it)."""
    try:
        data = serialization.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise MessageError(f"message body is not valid JSON: {exc}") from None
    return Message.check(data)


__all__ = ["Message", "REQUIRED", "decode_object"]
