"""The task this thread runs: ``current_task()`` inside a task (its id, name, App, fencing
token and worker), None elsewhere. The worker sets it around each run (``task_context``)."""
from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Iterator

_current: contextvars.ContextVar = contextvars.ContextVar("nbqueue_current_task", default=None)


@contextlib.contextmanager
def task_context(app: Any, message: dict, token: int, worker: Any) -> Iterator[None]:
    """Within the block, ``current_task()`` describes the task of ``message``."""
    reset = _current.set({"id": message["id"], "name": message["name"], "app": app, "token": token, "worker": worker})
    try:
        yield
    finally:
        _current.reset(reset)


def current_task() -> dict | None:
    """Inside a task: a dict with its ``id``, ``name``, ``app``, ``token`` and ``worker``; None elsewhere."""
    return _current.get()
