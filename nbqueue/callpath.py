"""The per-call send path: ``task.delay(*args, **kwargs)`` without a Signature.

A task's options were checked when it was registered, so each call only encodes its
arguments into a copy of the task's envelope template (every option field as
``Signature.to_message`` writes it, computed once per task: a ``Plan``). Arguments that
cannot be encoded fall back to the Signature path, whose error names the argument.

``send`` is the common case in full: plain arguments (ints of 64 bits, finite floats,
ASCII strings, bools, None), no tracing span: the arguments are their own JSON form,
the envelope is encoded in one JSON call and the record's arguments are read out of
that text. Anything else goes the general way (``App.send_call``).
"""
from __future__ import annotations

import time
from typing import Any

from . import batching, payloads, provenance, serialization, shipping, states, tracing
from .broker import Outgoing
from .canvas import Signature
from .clock import SYSTEM
from .result import AsyncResult
from .signature import _keyword, new_id, to_message

try:
    from orjson import dumps as _orjson_dumps
except ImportError:     # pragma: no cover - orjson is a dependency
    _orjson_dumps = None

_DYNAMIC = ("id", "args", "kwargs", "created_at")
_INT_MIN, _INT_MAX = serialization._INT_MIN, serialization._INT_MAX
#: the text that ends an envelope's args (a key: plain arguments hold no object)
_KWARGS_KEY = ',"kwargs":'


class Plan:
    """What every message of one task shares, for one App's default queue and serializer:
    ``fields`` (the envelope's option fields, as ``to_message`` writes them), their
    ``queue``, ``priority`` and ``eta``, and ``args_at``: where the args start in an
    encoded envelope (after the id, always 36 characters, and the name)."""

    __slots__ = ("key", "fields", "queue", "priority", "eta", "args_at")

    def __init__(self, key: tuple, name: str, fields: dict):
        self.key = key
        self.fields = fields
        self.queue: str = fields["queue"]
        self.priority: int = fields.get("priority", 0)
        self.eta: float | None = fields.get("eta")
        head = serialization.dumps({"id": "0" * 36, "name": name, "args": []})
        self.args_at = len(head) - len("[]}")


def plan(app, task) -> Plan:
    """``task``'s Plan for ``app`` (made once, kept on the task)."""
    key = (app.default_queue, app.serializer.pickle)
    cached = task._plan
    if cached is not None and cached.key == key:
        return cached
    sig = Signature(task.name, app=app, **task.options)
    message = to_message(sig, app.serializer, default_queue=app.default_queue, fn=task.fn, now=0.0)
    fields = {k: v for k, v in message.items() if k not in _DYNAMIC and k != "name"}
    task._plan = made = Plan(key, task.name, fields)
    return made


def template(app, task) -> dict:
    """The envelope fields of ``task``'s messages other than id, name, arguments and time."""
    return plan(app, task).fields


def call_message(app, task, args: tuple, kwargs: dict, now: float) -> dict | None:
    """The envelope of one call, as ``to_message(task.s(*args, **kwargs), ...)`` would make it;
    None when an argument cannot be encoded (the caller takes the Signature path)."""
    encode = app.serializer.encode
    try:
        encoded_args = [encode(value) for value in args]
        encoded_kwargs = {_keyword(k, task.name): encode(v) for k, v in kwargs.items()} if kwargs else {}
    except serialization.SerializationError:
        return None
    message: dict[str, Any] = {"id": new_id(), "name": task.name, "args": encoded_args, "kwargs": encoded_kwargs}
    message.update(plan(app, task).fields)
    message["created_at"] = now
    return message


def _plain(value: Any) -> bool:
    """``value`` is its own JSON form, as ``Serializer.encode`` would give it (see ``send``)."""
    kind = value.__class__
    if kind is int:
        return _INT_MIN <= value <= _INT_MAX
    if kind is str:
        return value.isascii()
    if kind is float:
        return value - value == 0.0
    return value is None or kind is bool


def send(app, task, args: tuple, kwargs: dict) -> AsyncResult | None:
    """Send ``task(*args, **kwargs)`` (arguments checked already) when every argument is
    plain and no tracing span is recorded: the AsyncResult, as ``App.send_call`` returns
    it; None otherwise (nothing was sent: the caller takes the general path)."""
    for value in args:          # _plain, inline: this loop runs for every argument of every send
        kind = value.__class__
        if kind is int:
            if _INT_MIN <= value <= _INT_MAX:
                continue
        elif kind is str:
            if value.isascii():
                continue
        elif kind is float:
            if value - value == 0.0:
                continue
        elif value is None or kind is bool:
            continue
        return None
    if kwargs:
        for key, value in kwargs.items():
            if key.__class__ is not str or not key.isascii() or not _plain(value):
                return None
    if tracing.tracer() is not None or _orjson_dumps is None:
        return None
    cached = task._plan
    if cached is None or cached.key != (app.default_queue, app.serializer.pickle):
        cached = plan(app, task)
    clock = app.clock
    now = time.time() if clock is SYSTEM else clock.time()
    task_id = new_id()
    name = task.name
    message = {"id": task_id, "name": name, "args": list(args), "kwargs": dict(kwargs)}
    message.update(cached.fields)
    message["created_at"] = now
    queue = cached.queue
    if task._ship:              # a notebook's function: carries its code, to a code queue (shipping.py)
        shipping.attach(app, task, message)
        queue = message["queue"]
    try:
        body = _orjson_dumps(message).decode()
    except TypeError:           # (orjson.JSONEncodeError) a value of the options orjson does not write
        return None
    at = cached.args_at
    record = {
        "id": task_id, "name": name, "state": states.PENDING,
        "args": body[at:body.index(_KWARGS_KEY, at)],
        "kwargs": serialization.dumps(message["kwargs"]) if kwargs else "{}",
        "queue": queue, "group_id": None, "parent_id": None, "created_at": now, "meta": None,
    }
    out = Outgoing(task_id, body, queue, cached.eta, cached.priority, message)
    if payloads.KEY_PREFIX in body:         # a string argument that looks like a payload key (payloads.track)
        payloads.track(app, task_id, body)
    if provenance._provider is not None:     # in a notebook: where it was sent from (provenance.py)
        provenance.stamp(task.s(), task, record)
    backend = app.backend
    # the wake-up version before the send: a store whose wait reads as it waits skips a
    # useless first read with it (the others read once before they wait: see AsyncResult.get)
    since = backend.wake_version() if backend.reads_as_it_waits else None
    if not batching.hold(app, record, out):
        app.publish([record], [out])
    result = AsyncResult(task_id, app, name=name)
    result._sent_at_version = since
    return result
