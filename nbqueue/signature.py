"""The message envelope (nbqueue.message) that carries a Signature (canvas.py) to a worker: encoding,
checking, decoding."""
from __future__ import annotations

import dataclasses
import datetime as _dt
import inspect
import math
import numbers
import os
import random
import reprlib
import time
from typing import Any, Callable

from . import serialization
from .canvas import Signature
from .message import Message, decode_object

_ids = random.Random()             # a private generator: a notebook's random.seed() must not repeat ids
os.register_at_fork(after_in_child=_ids.seed)


def new_id() -> str:
    """A time-ordered (version 7, RFC 9562) UUID string: 48 bits of Unix time in milliseconds,
    then 74 random bits. Ids made later sort later (to the millisecond), so the indexes keyed
    by task id (the records' and the SQLite broker's messages') grow at one end and a batch
    of tasks touches a few index pages instead of one page per task."""
    rand = _ids.getrandbits(74)
    h = "%032x" % ((time.time_ns() // 1_000_000 & _MS_MASK) << 80 | _VERSION_VARIANT | (rand >> 62) << 64
                   | rand & _RAND_B_MASK)
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


_MS_MASK = (1 << 48) - 1
_RAND_B_MASK = (1 << 62) - 1
_VERSION_VARIANT = 0x7 << 76 | 0b10 << 62


def to_message(sig: Signature, serializer: serialization.Serializer, *, default_queue: str, fn: Callable | None = None,
               now: float | None = None) -> dict:
    """The JSON-ready envelope (a new id unless the signature has one; the signature
    itself is not changed); raises SerializationError naming the bad argument.

    Fields at their defaults are left out: smaller bodies, less to encode (readers use .get).
    """
    now = time.time() if now is None else now
    check_options(sig)
    try:
        args = [serializer.encode(value) for value in sig.args]
        kwargs = {_keyword(key, sig.name): serializer.encode(value) for key, value in sig.kwargs.items()}
    except serialization.SerializationError:   # again, naming the argument (only worth it on failure)
        names = _parameter_names(fn)
        args = [serializer.encode(value, _arg_label(sig.name, i, names)) for i, value in enumerate(sig.args)]
        kwargs = {_keyword(key, sig.name): serializer.encode(value, f"keyword argument {key!r} of task {sig.name!r}")
                  for key, value in sig.kwargs.items()}
    backoff = sig.retry_backoff
    return Message.object_of(
        id=sig.id or new_id(), name=sig.name, args=args, kwargs=kwargs, queue=sig.queue or default_queue,
        eta=sig.eta_timestamp(now), priority=int(sig.priority), retry_count=int(sig.retry_count),
        headers=serializer.encode(sig.headers, f"headers of task {sig.name!r}") if sig.headers else None,
        retry_timeout=sig.retry_timeout,
        retries=int(sig.retries),
        immutable=bool(sig.immutable),
        retry_backoff=backoff if backoff is None or isinstance(backoff, dict) else backoff.to_dict(),
        on_success=[
            to_message(s, serializer, default_queue=default_queue, fn=_task_fn(s), now=now) for s in sig.on_success
        ]
        or None,
        on_error=[to_message(s, serializer, default_queue=default_queue, fn=_task_fn(s), now=now) for s in sig.on_error]
        or None,
        ignore_when_not_registered=bool(sig.ignore_when_not_registered),
        time_limit=sig.time_limit,
        soft_time_limit=sig.soft_time_limit,
        group_id=sig.group_id,
        group_task_count=sig.group_task_count,
        workflow=sig.workflow,
        created_at=now,
        serializer="pickle" if serializer.pickle else None,
    )


def _refuse(sig: Signature, option: str, problem: str, kind: type = ValueError) -> Exception:
    """The error check_options raises: ``kind("<option> of task '<name>' <problem>")``."""
    return kind(f"{option} of task {sig.name!r} {problem}")


def _check_number(
    sig: Signature, option: str, value: Any, *, minimum: float | None = 0, above: bool = False, optional: bool = False
) -> None:
    """A finite int or float (not a bool), at least ``minimum`` (more than it where ``above``;
    any where ``minimum`` is None); None passes where ``optional``."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _refuse(sig, option, f"must be a number, not {type(value).__name__} {value!r}", TypeError)
    if not math.isfinite(value):
        raise _refuse(sig, option, f"must be a finite number, not {value!r}")
    if minimum is not None and (value <= minimum if above else value < minimum):
        raise _refuse(sig, option, f"must be {'more than' if above else 'at least'} {minimum:g}, not {value!r}")


def _check_integer(sig: Signature, option: str, value: Any, low: int, high: int | None = None) -> None:
    """An integral number (not a bool) from ``low`` to ``high`` (no upper bound where None)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise _refuse(sig, option, f"must be an int, not {type(value).__name__} {value!r}", TypeError)
    if value < low or high is not None and value > high:
        raise _refuse(
            sig,
            option,
            f"must be {f'between {low} and {high}' if high is not None else f'at least {low}'}, not {value!r}",
        )


def _check_flag(sig: Signature, option: str, value: Any) -> None:
    """True or False, nothing else."""
    if not isinstance(value, bool):
        raise _refuse(sig, option, f"must be True or False, not {type(value).__name__} {value!r}", TypeError)


def _check_backoff(sig: Signature) -> None:
    """retry_backoff: None, a nbqueue.Backoff, or a dict of its fields that Backoff.from_dict accepts."""
    if sig.retry_backoff is None:
        return
    from .retry import Backoff

    backoff = sig.retry_backoff
    if isinstance(backoff, dict):
        unknown = set(backoff) - {f.name for f in dataclasses.fields(Backoff)}
        if unknown:
            raise _refuse(sig, "retry_backoff", f"has unknown key(s) {', '.join(map(repr, sorted(map(str, unknown))))} "
                                                "(known: kind, base, factor, max, jitter)")
        try:
            Backoff.from_dict(backoff)
        except (TypeError, ValueError) as exc:
            raise _refuse(sig, "retry_backoff", f"is invalid: {exc}") from None
    elif not isinstance(backoff, Backoff):
        raise _refuse(
            sig, "retry_backoff", f"must be a nbqueue.Backoff or its dict, not {type(backoff).__name__}", TypeError
        )


def _check_schedule(sig: Signature) -> None:
    """countdown (any finite number of seconds) and eta (a datetime or a finite Unix timestamp)."""
    if sig.countdown is not None:
        _check_number(sig, "countdown", sig.countdown, minimum=None)
    if sig.eta is not None and not isinstance(sig.eta, _dt.datetime):
        if isinstance(sig.eta, bool) or not isinstance(sig.eta, (int, float)):
            raise _refuse(
                sig, "eta", f"must be a datetime or a Unix timestamp, not {type(sig.eta).__name__} {sig.eta!r}",
                TypeError,
            )
        _check_number(sig, "eta", sig.eta, minimum=None)


def _check_headers(sig: Signature) -> None:
    """headers: None or a dict with string keys."""
    if sig.headers is None:
        return
    if not isinstance(sig.headers, dict):
        raise _refuse(sig, "headers", f"must be a dict, not {type(sig.headers).__name__}", TypeError)
    bad = [k for k in sig.headers if not isinstance(k, str)]
    if bad:
        raise _refuse(sig, "headers", f"must have string keys, not {bad[0]!r}", TypeError)


def _check_callbacks(sig: Signature) -> None:
    """on_success and on_error hold Signatures only (each is checked itself when it is encoded)."""
    for option in ("on_success", "on_error"):
        for callback in getattr(sig, option):
            if not isinstance(callback, Signature):
                raise _refuse(
                    sig, option, f"must hold signatures (task.s(...)), not {type(callback).__name__}", TypeError
                )


def check_options(sig: Signature) -> None:
    """Refuse at send what a worker could not use: raises TypeError (a wrong type) or
    ValueError (a wrong value) naming the option and the task. Covers retry_count,
    retry_timeout, retry_backoff, time_limit, soft_time_limit, priority, eta, countdown, queue, headers,
    id, immutable and ignore_when_not_registered, and the callbacks' types (each
    callback is checked when it is encoded)."""
    _check_integer(sig, "retry_count", sig.retry_count, 0)
    _check_number(sig, "retry_timeout", sig.retry_timeout)
    _check_number(sig, "time_limit", sig.time_limit, above=True, optional=True)
    _check_number(sig, "soft_time_limit", sig.soft_time_limit, above=True, optional=True)
    _check_integer(sig, "priority", sig.priority, 0, 9)
    _check_integer(sig, "retries", sig.retries, 0)
    _check_flag(sig, "immutable", sig.immutable)
    _check_flag(sig, "ignore_when_not_registered", sig.ignore_when_not_registered)
    _check_backoff(sig)
    _check_schedule(sig)
    if sig.queue is not None:
        check_queue_name(sig.queue, f"queue of task {sig.name!r}")
    _check_headers(sig)
    if sig.id is not None and (not isinstance(sig.id, str) or not sig.id):
        raise _refuse(sig, "id", f"must be a non-empty string, not {sig.id!r}", TypeError)
    _check_callbacks(sig)


def _no_queue_name_rules() -> tuple[int, tuple[tuple[str, str], ...]]:
    return 1000, ()


#: the drivers' rules for queue names (nbqueue.drivers.queue_name_rules), handed in by the
#: registry (use_queue_name_rules), which this module is below
_queue_name_rules: Callable[[], tuple[int, tuple[tuple[str, str], ...]]] = _no_queue_name_rules


def use_queue_name_rules(rules: Callable[[], tuple[int, tuple[tuple[str, str], ...]]]) -> None:
    """Check queue names by ``rules()``: (the longest name in UTF-8 bytes, (prefix, why) pairs refused)."""
    global _queue_name_rules
    _queue_name_rules = rules


def check_queue_name(queue: Any, label: str = "queue") -> None:
    """A queue name every broker and ``nbqueue worker -Q a,b`` can use: a non-empty string
    without commas, control characters or surrounding spaces, within the length every driver
    takes and starting with no prefix a driver reserves (``drivers.queue_name_rules``), so every
    name derived from it fits every broker. Raises TypeError or ValueError naming it."""
    if not isinstance(queue, str):
        raise TypeError(f"{label} must be a string, not {type(queue).__name__} {queue!r}")
    longest, reserved = _queue_name_rules()
    problem = None
    if not queue or queue.strip() != queue:
        problem = "must be non-empty, without leading or trailing spaces"
    elif "," in queue:
        problem = "must not contain a comma (workers take comma-separated queue lists)"
    elif any(ord(c) < 32 or ord(c) == 127 for c in queue):
        problem = "must not contain control characters"
    elif any(queue.startswith(prefix) for prefix, _ in reserved):
        prefix, why = next((prefix, why) for prefix, why in reserved if queue.startswith(prefix))
        problem = f"must not start with {prefix!r} ({why})"
    else:
        try:
            if len(queue.encode("utf-8")) > longest:
                problem = f"must be at most {longest} bytes long in UTF-8"
        except UnicodeEncodeError:
            problem = "must be valid Unicode text (it holds a lone surrogate)"
    if problem:
        raise ValueError(f"{label} {problem}, not {queue!r}")


def validate_message(message: Any) -> dict:
    """Check the envelope's shape; raises MessageError with the reason (see Message.check)."""
    return Message.check(message)


def decode_body(body: str | bytes) -> dict:
    """The checked envelope a body encodes, as a dict; MessageError with the reason."""
    return decode_object(body)


def encode_body(message: dict) -> str:
    return serialization.dumps(message)


def signature_from_message(message: Message | dict, serializer: serialization.Serializer) -> Signature:
    """Rebuild a Signature (arguments decoded) from an envelope: a Message, or its checked JSON
    object (a callback's, say)."""
    if not isinstance(message, Message):
        message = Message.from_dict(message)
    return Signature(
        message.name,
        args=[serializer.decode(a) for a in message.args],
        kwargs={k: serializer.decode(v) for k, v in message.kwargs.items()},
        id=message.id,
        queue=message.queue,
        priority=message.priority,
        headers=serializer.decode(message.headers or {}),
        retry_count=message.retry_count,
        retry_timeout=message.retry_timeout,
        retry_backoff=message.retry_backoff,
        retries=message.retries,
        immutable=message.immutable,
        on_success=[signature_from_message(m, serializer) for m in message.on_success or []],
        on_error=[signature_from_message(m, serializer) for m in message.on_error or []],
        ignore_when_not_registered=message.ignore_when_not_registered,
        time_limit=message.time_limit,
        soft_time_limit=message.soft_time_limit,
        group_id=message.group_id,
        group_task_count=message.group_task_count,
        workflow=message.workflow,
    )


def _keyword(key: Any, task: str) -> str:
    """A keyword argument's name as sent: a string (Python calls need one; JSON objects too)."""
    if type(key) is str and key.isascii():
        return key
    if not isinstance(key, str):
        raise serialization.SerializationError(
            f"keyword argument {reprlib.repr(key)} of task {task!r} has a name of type {type(key).__name__}; "
            "keyword argument names "
            "must be strings (pass it as a positional argument, or inside a dict argument)"
        )
    name = str.__str__(key)    # the plain string of a str subclass (an enum member, numpy.str_)
    return serialization.to_jsonable(name, f"the name of a keyword argument of task {task!r}")


def _task_fn(sig: Signature) -> Callable | None:
    app = sig.app
    if app is None:
        return None
    task = app.registry.get(sig.name)
    return task.fn if task is not None else None


_param_cache: dict = {}


def _parameter_names(fn: Callable | None) -> list[str]:
    """Positional parameter names, to name a bad argument in errors (cached per function)."""
    if fn is None:
        return []
    names = _param_cache.get(fn)
    if names is None:
        try:
            params = inspect.signature(fn).parameters.values()
            names = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        except (TypeError, ValueError):
            names = []
        if len(_param_cache) > 4096:
            _param_cache.clear()
        _param_cache[fn] = names
    return names


def _arg_label(task: str, index: int, names: list[str]) -> str:
    if index < len(names):
        return f"argument {index + 1} ({names[index]!r}) of task {task!r}"
    return f"argument {index + 1} of task {task!r}"


__all__ = ["Signature", "new_id", "to_message", "check_options", "check_queue_name", "validate_message", "decode_body",
           "encode_body", "signature_from_message"]
