"""What users build: a Signature (a task name with its arguments and options) and the
workflows made of signatures: ``group``, ``chain`` and ``chord``. Data only: encoding a
signature into a message is signature.py's job, running a workflow workflow.py's.
"""
from __future__ import annotations

import copy
import dataclasses
import datetime as _dt
import numbers
import time
from typing import Any


def _to_timestamp(eta: Any) -> float | None:
    if eta is None:
        return None
    if isinstance(eta, (int, float)):
        return float(eta)
    if isinstance(eta, _dt.datetime):
        return eta.timestamp()  # naive datetimes are local time, as datetime.timestamp() says
    raise TypeError(f"eta must be a datetime or a Unix timestamp, not {type(eta).__name__}")


@dataclasses.dataclass
class Signature:
    """A task name with its arguments and options: what a worker should run."""

    name: str
    args: Any = ()
    kwargs: dict | None = None
    id: str | None = None
    queue: str | None = None
    eta: Any = None
    countdown: float | None = None
    priority: int = 0
    headers: dict | None = None
    retry_count: int = 0
    retry_timeout: float = 0
    immutable: bool = False
    on_success: list | None = None
    on_error: list | None = None
    ignore_when_not_registered: bool = False
    retry_backoff: Any = None
    time_limit: float | None = None
    soft_time_limit: float | None = None
    # filled in by workflows and by the worker; users rarely set these
    retries: int = 0
    group_id: str | None = None
    group_task_count: int = 0
    workflow: dict | None = None
    app: Any = dataclasses.field(default=None, repr=False, compare=False)
    #: made from a task's function defined in a notebook (``fit.s()``): sent with its code (shipping.py)
    ship_code: bool = dataclasses.field(default=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise TypeError("a Signature needs a task name (a non-empty string)")
        # list() of str/bytes/dict would split or drop the values; of a number, fail without naming args
        bad = isinstance(self.args, (str, bytes, bytearray, dict)) or not hasattr(self.args, "__iter__")
        if bad and self.args is not None:
            raise TypeError(f"the args of task {self.name!r} must be a list or tuple of arguments, "
                            f"not {type(self.args).__name__}; for one argument pass ({self.args!r:.40},)")
        self.args = list(self.args) if self.args is not None else []
        if not isinstance(self.kwargs, (dict, type(None))):
            raise TypeError(f"the kwargs of task {self.name!r} must be a dict of keyword arguments, "
                            f"not a {type(self.kwargs).__name__}")
        self.kwargs = dict(self.kwargs or {})
        # a priority that is no int is refused at send, naming its task (signature.check_options)
        integral = isinstance(self.priority, numbers.Integral) and not isinstance(self.priority, bool)
        if integral and not 0 <= self.priority <= 9:
            raise ValueError(f"priority must be between 0 and 9, not {self.priority}")
        self.on_success = list(self.on_success or [])
        self.on_error = list(self.on_error or [])

    # -- building -------------------------------------------------------------
    def replace(self, **changes: Any) -> "Signature":
        """A copy with some fields changed (lists and dicts copied, not shared)."""
        clone = copy.copy(self)
        for key, value in changes.items():
            setattr(clone, key, value)
        clone.args = list(clone.args)
        clone.kwargs = dict(clone.kwargs or {})
        clone.headers = dict(clone.headers) if clone.headers else None
        clone.on_success = [s.replace() for s in clone.on_success or ()]
        clone.on_error = [s.replace() for s in clone.on_error or ()]
        return clone

    def set(self, **options: Any) -> "Signature":
        """Change options in place and return self: ``add.s(1, 2).set(queue="fast")``."""
        check_option_names(options, send_options(), "signature option")
        for key, value in options.items():
            setattr(self, key, value)
        return self

    def link(self, callback: "Signature") -> "Signature":
        """Send ``callback`` with this task's value appended to its args when this task succeeds."""
        if self.on_success is None:
            self.on_success = []
        self.on_success.append(callback)
        return self

    def link_error(self, callback: "Signature") -> "Signature":
        """Send ``callback`` with the error text before its args when this task fails for good."""
        if self.on_error is None:
            self.on_error = []
        self.on_error.append(callback)
        return self

    def eta_timestamp(self, now: float | None = None) -> float | None:
        if self.countdown is not None:
            return (time.time() if now is None else now) + float(self.countdown)
        return _to_timestamp(self.eta)

    def apply_async(self, args: Any = (), kwargs: dict | None = None, **options: Any) -> Any:
        """Send through the App this signature's task is registered on (its AsyncResult), as
        Celery's ``sig.apply_async()``: ``args`` are appended to the signature's own (as a chain
        appends a result), ``kwargs`` merged over its own, ``options`` (queue=, countdown=, eta=,
        priority=, ...) set on a copy. RuntimeError without a bound App; TypeError naming an
        unknown option."""
        check_option_names(options, send_options(), "send option")
        sig = self
        if args or kwargs or options:
            sig = self.replace(
                args=[*self.args, *_as_args(args, self.name)],
                kwargs={**(self.kwargs or {}), **(kwargs or {})},
                **options,
            )
        return _bound_app(self, f"signature {self.name!r}").send(sig)

    def delay(self, *args: Any, **kwargs: Any) -> Any:
        """``sig.delay(*args, **kwargs)``: ``sig.apply_async(args, kwargs)``."""
        return self.apply_async(args, kwargs)

    delay_send = apply_async

    def __or__(self, other: Any) -> "chain":
        return chain(self, other)


# -- option names ----------------------------------------------------------------------------

#: Celery's names for options nbqueue calls otherwise (or lacks), said when one is passed
CELERY_NAMES = {
    "max_retries": "use retry_count",
    "default_retry_delay": "use retry_timeout (seconds between retries)",
    "task_id": "use id",
    "routing_key": "use queue",
    "link": "use on_success, or sig.link(callback)",
    "link_error": "use on_error, or sig.link_error(callback)",
    "expires": "nbqueue has no expiry of unstarted tasks; revoke them (app.revoke) or use time_limit for running ones",
    "bind": "a task reads its context from nbqueue.current_task()",
}

#: Signature fields workflows and workers fill in, not options to pass
_INTERNAL = {"name", "args", "kwargs", "app", "ship_code", "retries", "group_id", "group_task_count", "workflow"}


def send_options() -> list[str]:
    """The options a signature takes at send (``apply_async(..., queue=..., countdown=...)``)."""
    return [f.name for f in dataclasses.fields(Signature) if f.name not in _INTERNAL]


def check_option_names(options: Any, known: Any, what: str = "option") -> None:
    """TypeError naming each unknown option, the Celery equivalent where there is one, and the known ones."""
    unknown = [k for k in options if k not in known]
    if not unknown:
        return
    hints = "; ".join(f"{k}: {CELERY_NAMES[k]}" for k in unknown if k in CELERY_NAMES)
    raise TypeError(f"unknown {what}(s): {', '.join(map(repr, unknown))}" + (f" ({hints})" if hints else "")
                    + f"; known: {', '.join(known)}")


def _as_args(args: Any, name: str) -> list:
    if isinstance(args, (str, bytes, bytearray, dict)) or not hasattr(args, "__iter__"):
        raise TypeError(f"the args of task {name!r} must be a list or tuple of arguments, not a {type(args).__name__}")
    return list(args)


def _bound_app(item: Any, what: str) -> Any:
    """The App the first bound signature in ``item`` belongs to; RuntimeError naming how to send without one."""
    for sig in _signatures(item):
        if sig.app is not None:
            return sig.app
    raise RuntimeError(f"{what} is not bound to an App (its signatures were not made from a task's .s()/.si()); "
                       "send it with app.send(...)")


def _signatures(item: Any):
    if isinstance(item, Signature):
        yield item
    elif isinstance(item, chord):
        yield from _signatures(item.header)
        if item.callback is not None:
            yield from _signatures(item.callback)
    else:
        for member in (item.steps if isinstance(item, chain) else item.items):
            yield from _signatures(member)


class _Workflow:
    """Celery's ways to send a workflow through the App its signatures are bound to:
    ``wf.apply_async()``, ``wf.delay()``, ``wf()``. Options are set on the signatures, not here."""

    def apply_async(self, args: Any = (), kwargs: dict | None = None, **options: Any) -> Any:
        """Send through the bound App (``App.send``); its result object. ``args``/``kwargs`` go to
        the first step of a chain, to every member of a group (appended, merged)."""
        if options:
            raise TypeError(f"a {type(self).__name__} takes no send options ({', '.join(map(repr, options))}); "
                            "set them on its signatures: add.s(1).set(queue='fast')")
        item = self._partial(_as_args(args, type(self).__name__), dict(kwargs or {})) if args or kwargs else self
        return _bound_app(self, repr(self)).send(item)

    def delay(self, *args: Any, **kwargs: Any) -> Any:
        return self.apply_async(args, kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.apply_async(args, kwargs)

    def _partial(self, args: list, kwargs: dict) -> Any:
        raise TypeError(f"a {type(self).__name__} takes no arguments at send")


def _with_partial(item: Any, args: list, kwargs: dict) -> Any:
    if isinstance(item, Signature):
        return item.replace(args=[*item.args, *args], kwargs={**(item.kwargs or {}), **kwargs})
    return item._partial(args, kwargs)


# -- workflows -------------------------------------------------------------------------------

def _spread(items: tuple) -> tuple:
    """``f(a, b)``, ``f([a, b])`` and ``f(x for x in ...)`` all mean the items a, b."""
    if len(items) != 1 or isinstance(items[0], (Signature, group, chain, chord, str, bytes, dict)):
        return items
    if hasattr(items[0], "__iter__"):
        return tuple(items[0])
    return items


class group(_Workflow):
    """Tasks (or chains) that run in parallel: ``group(add.s(1, 1), add.s(2, 2))`` or
    ``group(add.s(i, i) for i in range(9))``."""

    def __init__(self, *items: Any):
        items = _spread(items)
        self.items = [_check_item(i) for i in items]
        self.id: str | None = None

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self):
        return iter(self.items)

    def __or__(self, other: Any) -> "chain":
        return chain(self, other)

    def __repr__(self) -> str:
        return f"group({', '.join(map(_short, self.items))})"

    def _partial(self, args: list, kwargs: dict) -> "group":
        return group([_with_partial(i, args, kwargs) for i in self.items])


class chain(_Workflow):
    """Steps that run one after another; each result is appended to the next step's args."""

    steps: list

    def __init__(self, *items: Any):
        items = _spread(items)
        steps: list = []
        for item in items:
            item = _check_item(item)
            steps.extend(item.steps if isinstance(item, chain) else [item])
        if not steps:
            raise ValueError("a chain needs at least one step")
        self.steps = steps

    def __or__(self, other: Any) -> "chain":
        return chain(self, other)

    def __repr__(self) -> str:
        return " | ".join(map(_short, self.steps))

    def _partial(self, args: list, kwargs: dict) -> "chain":
        return chain(_with_partial(self.steps[0], args, kwargs), *self.steps[1:])


class chord(_Workflow):
    """A group whose member results, in order, go to a callback: ``chord(group(...), total.s())``,
    or, as in Celery, ``chord([...])(total.s())`` (sends it)."""

    def __init__(self, header: Any, callback: Any = None):
        self.header = header if isinstance(header, group) else group(*header)
        self.callback = None if callback is None else _check_item(callback)
        if isinstance(self.callback, group):
            raise TypeError("a chord's callback must be a signature or a chain, not a group")

    def __call__(self, body: Any = None, **options: Any) -> Any:
        """``chord(header)(callback)`` sends the chord with that callback; ``chord(header, callback)()`` sends it."""
        if body is not None:
            return chord(self.header, body).apply_async(**options)
        return self.apply_async(**options)

    def apply_async(self, args: Any = (), kwargs: dict | None = None, **options: Any) -> Any:
        if self.callback is None:
            raise TypeError(f"{self!r} has no callback: send chord(header, callback) or chord(header)(callback)")
        return super().apply_async(args, kwargs, **options)

    def __repr__(self) -> str:
        return f"chord({self.header!r}, {_short(self.callback)})"


def _check_item(item: Any) -> Any:
    if isinstance(item, (Signature, group, chain, chord)):
        if isinstance(item, chord) and item.callback is None:
            raise TypeError(f"{item!r} has no callback: chord(header, callback)")
        return item
    raise TypeError(f"workflows are built from signatures, groups, chains and chords, not {type(item).__name__}")


def _short(item: Any) -> str:
    return f"{item.name}(...)" if isinstance(item, Signature) else repr(item)


__all__ = ["Signature", "group", "chain", "chord", "send_options", "check_option_names"]
