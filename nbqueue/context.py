"""The task this thread runs: ``current_task()`` inside a task (its id, name, App, fencing
token and worker, and its controls: cancel and progress), None elsewhere. The worker sets
it around each run (``enter`` and ``leave``, or ``task_context``)."""
from __future__ import annotations

import contextlib
import contextvars
from typing import TYPE_CHECKING, Any, Iterator

from .errors import TaskRevoked

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
