"""What users build: a Signature (a task name with its arguments and options) and the
workflows made of signatures: ``group``, ``chain`` and ``chord``. Data only: encoding a
signature into a message is signature.py's job, running a workflow workflow.py's.
"""
from __future__ import annotations

import copy
import dataclasses
import datetime as _dt
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
        if isinstance(self.args, (str, bytes, bytearray, dict)):   # list() of these would split or drop the values
            raise TypeError(f"the args of task {self.name!r} must be a list or tuple of arguments, "
                            f"not a {type(self.args).__name__}; for one argument pass ({self.args!r:.40},)")
        self.args = list(self.args) if self.args is not None else []
        self.kwargs = dict(self.kwargs or {})
        if not 0 <= int(self.priority) <= 9:
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
        for key, value in options.items():
            if not hasattr(self, key) or key == "app":
                raise TypeError(f"unknown signature option {key!r}")
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

    def delay_send(self) -> Any:
        """Send through the App this signature's task is registered on."""
        if self.app is None:
            raise RuntimeError(f"signature {self.name!r} is not bound to an App; use app.send_task(sig)")
        return self.app.send(self)

    apply_async = delay_send

    def __or__(self, other: Any) -> "chain":
        return chain(self, other)


# -- workflows -------------------------------------------------------------------------------

def _spread(items: tuple) -> tuple:
    """``f(a, b)``, ``f([a, b])`` and ``f(x for x in ...)`` all mean the items a, b."""
    if len(items) != 1 or isinstance(items[0], (Signature, group, chain, chord, str, bytes, dict)):
        return items
    if hasattr(items[0], "__iter__"):
        return tuple(items[0])
    return items


class group:
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


class chain:
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


class chord:
    """A group whose member results, in order, go to a callback: ``chord(group(...), total.s())``."""

    def __init__(self, header: Any, callback: Any):
        self.header = header if isinstance(header, group) else group(*header)
        self.callback = _check_item(callback)
        if isinstance(self.callback, group):
            raise TypeError("a chord's callback must be a signature or a chain, not a group")

    def __repr__(self) -> str:
        return f"chord({self.header!r}, {_short(self.callback)})"


def _check_item(item: Any) -> Any:
    if isinstance(item, (Signature, group, chain, chord)):
        return item
    raise TypeError(f"workflows are built from signatures, groups, chains and chords, not {type(item).__name__}")


def _short(item: Any) -> str:
    return f"{item.name}(...)" if isinstance(item, Signature) else repr(item)


__all__ = ["Signature", "group", "chain", "chord"]
