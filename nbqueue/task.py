"""Task: a registered function with its default options, and the registry of names."""
from __future__ import annotations

import functools
import inspect
import math
from typing import Any, Callable

from . import shipping
from .canvas import Signature, check_option_names, send_options
from .errors import NbqueueError
from .signature import check_options

TASK_OPTIONS = ("retry_count", "retry_timeout", "retry_backoff", "queue", "priority", "time_limit", "soft_time_limit",
                "ignore_when_not_registered")


class Task:
    """Calling it runs the function here; ``.delay()``/``.s()`` send it to a worker.

    ``cache=True`` (or an expiry: ``cache="7d"``, seconds): a send whose code and arguments
    ran before returns the stored result without running (cache.py)."""

    def __init__(self, app, name: str, fn: Callable, *, cache: Any = False, typing: bool = True, **options: Any):
        from .cache import policy

        #: False (no result cache), None (cached, no expiry) or the expiry in seconds (see cache.py)
        self.cache = policy(cache)
        check_option_names(options, TASK_OPTIONS + ("name", "cache", "typing"), "task option")
        if not isinstance(typing, bool):
            raise TypeError(f"typing of task {name!r} must be True or False, not {type(typing).__name__} {typing!r}")
        #: sends are checked against the function's parameters (Celery's ``typing``)
        self.typing = typing
        self._forget_reads()
        check_options(Signature(name, **options))     # a bad default is refused here, not at each send
        self.app = app
        self.name = name
        self.fn = fn
        self.options = options
        # signatures made from a function defined in a notebook carry its code (shipping.py)
        self._ship = shipping.defined_in_notebook(fn)
        functools.update_wrapper(self, fn)

    @property
    def ship_code(self) -> bool:
        """Its messages carry the function's code (defined in a notebook; see shipping.py)."""
        return self._ship

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)

    def _forget_reads(self) -> None:
        """What this task reads of its function and App at its first sends, read afresh."""
        self._parameters: Parameters | None = None
        #: (fewest, most) positional arguments a call without keywords may have unchecked
        #: (send_call); (1, 0), none, until check_arguments has read the function's signature
        self._arity: tuple[int, float] = (1, 0)
        #: what every message of this task shares (nbqueue.callpath.Plan), made at its first send
        self._plan = None

    def __reduce__(self):
        """A task that a function shipped to another process reads (``quad`` calling
        ``double(x)`` or ``double.delay(x)`` in a child of a process pool) travels without
        its App (locks, connections): by module and name when its module binds that name
        to it (the other process imports the module, and so has its App); else as a
        :class:`SentTask` with its name, options and function (by value from a notebook)."""
        where = _bound_in_module(self)
        if where is not None:
            return shipping.imported, where
        return _sent_task, ({k: v for k, v in vars(self).items() if k not in _LOCAL},)

    def __copy__(self) -> "Task":
        """A copy in this process keeps its class and App (``__reduce__`` is for other processes)."""
        clone = type(self).__new__(type(self))
        clone.__dict__.update(self.__dict__)
        return clone

    def __deepcopy__(self, memo: dict) -> "Task":
        """The task itself: a registration in its App, shared, as the App is."""
        return self

    def check_arguments(self, args: Any, kwargs: dict | None) -> None:
        """TypeError naming the task when its function cannot take ``args`` and ``kwargs``
        (not checked with ``typing=False``, nor for a function without a readable signature)."""
        if not self.typing:
            return
        parameters = self._parameters
        if parameters is None:
            parameters = self._parameters = Parameters.of(self.fn)
            self._arity = (0, math.inf) if parameters.signature is None else (parameters.fewest, parameters.most)
        parameters.check(self.name, args, kwargs)

    def s(self, *args, **kwargs) -> Signature:
        """A signature; chains append the previous result to its args."""
        return Signature(self.name, args=args, kwargs=kwargs, app=self.app, ship_code=self._ship, **self.options)

    def si(self, *args, **kwargs) -> Signature:
        """An immutable signature: workflows do not append results to its args."""
        return Signature(
            self.name, args=args, kwargs=kwargs, immutable=True, app=self.app, ship_code=self._ship, **self.options
        )

    def signature(self, args=(), kwargs=None, **options) -> Signature:
        check_option_names(options, send_options(), "send option")
        return Signature(
            self.name, args=args, kwargs=kwargs, app=self.app, ship_code=self._ship, **{**self.options, **options}
        )

    def delay(self, *args, **kwargs):
        return self.app.send_call(self, args, kwargs)

    def apply_async(self, args=(), kwargs=None, **options):
        """Send with send options (queue=, countdown=, eta=, priority=, ...); TypeError naming an unknown one."""
        return self.app.send_task(self.signature(args, kwargs, **options))

    def __repr__(self) -> str:
        return f"<Task {self.name}>"


#: what a Task holds for this process only: its App, and what its sends made of it
_LOCAL = frozenset({"app", "_plan", "_parameters", "_arity"})


class SentTask(Task):
    """A Task unpickled in another process (see ``Task.__reduce__``). Calling it runs its
    function, as any Task; ``.delay()``, ``.s()`` and the rest send with the App of that
    process: in a child of a worker's process pool an App on the worker's stores, made at
    the first send (``context.process_app``); elsewhere the App of the task running there
    (``current_task().app``)."""

    @property
    def app(self):
        from .context import current_task, process_app

        app = process_app(f"task {self.name!r} cannot be sent from this child process")
        if app is not None:
            app.registry.setdefault(self.name, self)
            return app
        running = current_task()
        app = running.get("app") if running is not None else None
        if app is None:
            raise NbqueueError(f"task {self.name!r} was sent to this process without its App, and no task with an "
                               "App runs here: it can be called, not sent")
        return app

    def __repr__(self) -> str:
        return f"<SentTask {self.name}>"


def _sent_task(state: dict) -> SentTask:
    task = SentTask.__new__(SentTask)
    task.__dict__.update(state)
    task._forget_reads()
    return task


def _bound_in_module(task: Task) -> tuple[str, str] | None:
    """(module, qualified name) when an imported module binds that name to ``task``."""
    binding = shipping.module_binding(task.fn)
    return binding[:2] if binding is not None and binding[2] is task else None


class Parameters:
    """What a function takes: its inspect.Signature, read once, and the range of positional
    argument counts that alone settle a call without keywords."""

    __slots__ = ("signature", "fewest", "most")

    def __init__(self, signature: inspect.Signature | None, fewest: int, most: float):
        self.signature, self.fewest, self.most = signature, fewest, most

    @classmethod
    def of(cls, fn: Callable) -> "Parameters":
        try:
            signature = inspect.signature(fn)
        except (TypeError, ValueError):        # a builtin or callable without one: anything goes
            return cls(None, 0, math.inf)
        params = list(signature.parameters.values())
        kinds = [p.kind for p in params]
        if set(kinds) <= {inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD}:
            return cls(None, 0, math.inf)
        positional = [p for p in params if p.kind in _POSITIONAL]
        if any(p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is p.empty for p in params):
            return cls(signature, 1, 0)         # a required keyword: every call is bound
        fewest = sum(p.default is p.empty for p in positional)
        most = math.inf if inspect.Parameter.VAR_POSITIONAL in kinds else len(positional)
        return cls(signature, fewest, most)

    def check(self, name: str, args: Any, kwargs: dict | None) -> None:
        if self.signature is None or not kwargs and self.fewest <= len(args) <= self.most:
            return
        try:
            self.signature.bind(*args, **(kwargs or {}))
        except TypeError as exc:
            raise TypeError(f"task {name!r} cannot take these arguments: {exc}") from None


_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


def task_name(fn: Callable) -> str:
    """Default name: the function's qualified name; notebook functions keep their plain name."""
    module = getattr(fn, "__module__", None) or ""
    if module in ("__main__", "builtins") or module.startswith("__"):
        return fn.__qualname__
    return f"{module}.{fn.__qualname__}"
