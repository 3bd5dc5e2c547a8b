"""The per-call send path: ``task.delay(*args, **kwargs)`` without a Signature.

A task's options were checked when it was registered, so each call only encodes its
arguments into a copy of the task's envelope template (every option field as
``Signature.to_message`` writes it, computed once per task: a ``Plan``). Arguments that
cannot be encoded fall back to the Signature path, whose error names the argument.

``send`` is a call without a tracing span, in full: the envelope is encoded in one JSON
call; plain arguments (ints of 64 bits, finite floats, ASCII strings, bools, None) are
their own JSON form, and the record's arguments are read out of that text. Tracing,
inline mode and arguments the serializer refuses go the general way (``App.send_call``).
"""
from __future__ import annotations

from typing import Any

from . import batching, payloads, provenance, serialization, shipping, states, tracing
from .broker import Outgoing
from .canvas import Signature
from .result import AsyncResult
from .signature import _keyword, new_id, to_message

try:
    from orjson import dumps as _orjson_dumps
except ImportError:     # pragma: no cover - orjson is a dependency
    _orjson_dumps = None

_DYNAMIC = ("id", "args", "kwargs", "created_at")
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
    encoded = _encoded(app, task, args, kwargs)
    if encoded is None:
        return None
    message: dict[str, Any] = {"id": new_id(), "name": task.name, "args": encoded[0], "kwargs": encoded[1]}
    message.update(plan(app, task).fields)
    message["created_at"] = now
    return message


def _encoded(app, task, args: tuple, kwargs: dict) -> tuple[list, dict] | None:
    """``args`` and ``kwargs`` through the app's serializer; None when one cannot be encoded."""
    encode = app.serializer.encode
    try:
        return [encode(value) for value in args], (
            {_keyword(k, task.name): encode(v) for k, v in kwargs.items()} if kwargs else {})
    except serialization.SerializationError:
        return None


def send(app, task, args: tuple, kwargs: dict) -> AsyncResult | None:
    """Send ``task(*args, **kwargs)`` (arguments checked already) when no tracing span is
    recorded: the AsyncResult, as ``App.send_call`` returns it; None when an argument
    cannot be encoded or spans are recorded (nothing was sent: the caller takes the
    general path, whose error names the argument)."""
    if tracing.tracer() is not None or _orjson_dumps is None:
        return None
    plain = True
    for value in args:
        if not serialization.plain(value):
            plain = False
            break
    if kwargs and plain:
        for key, value in kwargs.items():
            if key.__class__ is not str or not key.isascii() or not serialization.plain(value):
                plain = False
                break
    if plain:       # each argument is its own JSON form
        made = _envelope(app, task, list(args), dict(kwargs), True)
    else:
        with payloads.sending(app):        # values out of band: packed once, held until linked to the task
            encoded = _encoded(app, task, args, kwargs)
            if encoded is None:
                return None
            made = _envelope(app, task, encoded[0], encoded[1], False)
    if made is None:
        return None
    record, out = made
    if provenance._provider is not None:     # in a notebook: where it was sent from (provenance.py)
        provenance.stamp(task.s(), task, record)
    backend = app.engine.backend
    # the wake-up version before the send: a store whose wait reads as it waits skips a
    # useless first read with it (the others read once before they wait: see AsyncResult.get)
    since = backend.wake_version() if backend.reads_as_it_waits else None
    if not batching.hold(app, record, out):
        app.publish([record], [out])
    result = AsyncResult(out.id, app, name=task.name)
    result._sent_at_version = since
    return result


def _envelope(app, task, args: list, kwargs: dict, plain: bool) -> tuple[dict, Outgoing] | None:
    """The PENDING record and the Outgoing of one call with encoded ``args`` and ``kwargs``
    (``plain``: scalars only, so the args' JSON is read out of the envelope's); the payloads
    the body references linked to it. None when orjson cannot write the envelope."""
    cached = plan(app, task)
    now = app.clock.time()
    task_id = new_id()
    message = {"id": task_id, "name": task.name, "args": args, "kwargs": kwargs}
    message.update(cached.fields)
    message["created_at"] = now
    queue = cached.queue
    if task._ship:              # a notebook's function: carries its code, to a code queue (shipping.py)
        shipping.attach(app, task, message)
        queue = message["queue"]
    try:
        body = _orjson_dumps(message).decode()
        if plain:
            at = cached.args_at
            args_text = body[at:body.index(_KWARGS_KEY, at)]
        else:
            args_text = _orjson_dumps(args).decode()
    except TypeError:           # (orjson.JSONEncodeError) deeper than orjson writes, say
        return None
    record = {
        "id": task_id, "name": task.name, "state": states.PENDING, "args": args_text,
        "kwargs": serialization.dumps(kwargs) if kwargs else "{}",
        "queue": queue, "group_id": None, "parent_id": None, "created_at": now, "meta": None,
    }
    out = Outgoing(task_id, body, queue, cached.eta, cached.priority, message)
    if payloads.KEY_PREFIX in body:         # what it references (payloads.track: the body is searched for keys)
        payloads.track(app, task_id, body)
    return record, out
