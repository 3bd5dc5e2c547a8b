"""The per-call send path: ``task.delay(*args, **kwargs)`` without a Signature.

A task's options were checked when it was registered, so each call only encodes its
arguments into a copy of the task's envelope template (every option field as
``Signature.to_message`` writes it, computed once per task). Arguments that cannot be
encoded fall back to the Signature path, whose error names the argument.
"""
from __future__ import annotations

from typing import Any

from . import serialization
from .canvas import Signature
from .signature import _keyword, new_id, to_message

_DYNAMIC = ("id", "args", "kwargs", "created_at")


def template(app, task) -> dict:
    """The envelope fields of ``task``'s messages other than id, arguments and time (cached
    on the task, for this App's default queue and serializer)."""
    key = (app.default_queue, app.serializer.pickle)
    cached = getattr(task, "_envelope", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    sig = Signature(task.name, app=app, **task.options)
    message = to_message(sig, app.serializer, default_queue=app.default_queue, fn=task.fn, now=0.0)
    fields = {k: v for k, v in message.items() if k not in _DYNAMIC}
    task._envelope = (key, fields)
    return fields


def call_message(app, task, args: tuple, kwargs: dict, now: float) -> dict | None:
    """The envelope of one call, as ``to_message(task.s(*args, **kwargs), ...)`` would make it;
    None when an argument cannot be encoded (the caller takes the Signature path)."""
    encode = app.serializer.encode
    try:
        encoded_args = [encode(value) for value in args]
        encoded_kwargs = {_keyword(k, task.name): encode(v) for k, v in kwargs.items()} if kwargs else {}
    except serialization.SerializationError:
        return None
    fields = template(app, task)
    message: dict[str, Any] = {"id": new_id(), "name": task.name, "args": encoded_args, "kwargs": encoded_kwargs}
    message.update(fields)
    message["created_at"] = now
    return message
