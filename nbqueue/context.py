"""The task this thread runs: ``current_task()`` inside a task (its id, name, App, fencing
token and worker, and its controls: cancel and progress), None elsewhere. The worker sets
it around each run (``enter`` and ``leave``, or ``task_context``)."""
from __future__ import annotations

import contextlib
import contextvars
import threading
from typing import TYPE_CHECKING, Any, Callable, Iterator

from .errors import ConfigurationError, TaskRevoked

if TYPE_CHECKING:
    from .message import Message

_current: contextvars.ContextVar = contextvars.ContextVar("nbqueue_current_task", default=None)


class TaskContext(dict):
    """``nbqueue.current_task()`` inside a task: a dict (``id``, ``name``, ``app``, ``token``,
    ``worker``, ``control``) with the task's controls as attributes. ``control`` is the run's
    ``control.TaskControl`` (None when the task runs without one)."""

    @property
    def id(self) -> str:
        return self["id"]

    @property
    def name(self) -> str:
        return self["name"]

    @property
    def cancelled(self) -> bool:
        """True once the task was cancelled (or passed its time limit in a thread): it
        should stop. In a child process a cancel stops the process instead."""
        control = self.get("control")
        return control is not None and control.reason is not None

    def check_cancelled(self) -> None:
        """Raise ``TaskRevoked`` if the task was asked to stop (see ``cancelled``)."""
        if self.cancelled:
            why = getattr(self.get("control"), "reason", None)
            message = "the task passed its time limit" if why == "time_limit" else "the task was cancelled"
            raise TaskRevoked(self["id"], "TaskRevoked", message, name=self.get("name"))

    def report_progress(self, done: float, total: float | None = None, note: str | None = None) -> None:
        """See ``nbqueue.report_progress``."""
        control = self.get("control")
        if control is None:
            return
        control.set_progress(done, total, note)
        if control.on_progress is not None:
            control.on_progress(done, total, note)


def enter(app: Any, message: Message, token: int, worker: Any, control: Any = None) -> contextvars.Token:
    """From now on in this thread ``current_task()`` describes the task of ``message``
    (``control``: its ``control.TaskControl``); ``leave`` with what this returns ends it.
    The worker's executor calls the two around each run (no context manager per task)."""
    return _current.set(
        TaskContext(id=message.id, name=message.name, app=app, token=token, worker=worker, control=control)
    )


def leave(entered: contextvars.Token) -> None:
    """End the task context ``enter`` began (the one before it is current again)."""
    _current.reset(entered)


@contextlib.contextmanager
def task_context(app: Any, message: Message, token: int, worker: Any, control: Any = None) -> Iterator[None]:
    """Within the block, ``current_task()`` describes the task of ``message``; ``control``
    is its ``control.TaskControl`` (cancel requests, reported progress)."""
    entered = enter(app, message, token, worker, control)
    try:
        yield
    finally:
        leave(entered)


def current_task() -> TaskContext | None:
    """Inside a task: a ``TaskContext`` (a dict with its ``id``, ``name``, ``app``, ``token``
    and ``worker``, also with ``.cancelled``, ``.check_cancelled()`` and
    ``.report_progress(...)``); None elsewhere."""
    return _current.get()


class _ProcessApp:
    """In a child process of a worker's process pool: how to open an App on the worker's
    stores (``opener``, made into an App once, at the first need) or why there is none."""

    opener: Callable[[], Any] | None = None
    why_not: str | None = None
    app: Any = None
    lock = threading.Lock()


def use_process_app(opener: Callable[[], Any] | None, why_not: str | None) -> None:
    """Called once by a child process of a worker's pool (pool.py): ``opener()`` makes an
    App on the worker's stores; None, with ``why_not``, when the worker's App cannot be
    opened in another process."""
    _ProcessApp.opener, _ProcessApp.why_not = opener, why_not or "its App cannot be opened in another process"


def opened_process_app() -> Any:
    """The App ``process_app`` made so far in this process, or None."""
    return _ProcessApp.app


def process_app(doing: str) -> Any:
    """In a child process of a worker's pool: the App on the worker's stores (made at the
    first call); None in any other process. ``doing``: what needs it, for the
    ConfigurationError raised when the worker's App cannot be opened here."""
    if _ProcessApp.app is not None:
        return _ProcessApp.app
    if _ProcessApp.why_not is None:
        return None
    with _ProcessApp.lock:
        if _ProcessApp.app is None:
            if _ProcessApp.opener is None:
                raise ConfigurationError(f"{doing}: {_ProcessApp.why_not}; run the task on a thread pool")
            try:
                _ProcessApp.app = _ProcessApp.opener()
            except Exception as exc:
                raise ConfigurationError(f"{doing}: the worker's App could not be opened here "
                                         f"({type(exc).__name__}: {exc})") from exc
    return _ProcessApp.app
