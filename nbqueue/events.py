"""Hooks around each task a worker runs: what metrics and tracing attach to.

``worker.events.on_start`` and ``worker.events.on_finish`` are lists of callables, called
in the thread that runs the task, right before and right after the task's function:

- ``on_start(message, queue)``: ``message`` is the task's ``nbqueue.message.Message`` (fields
  as attributes, ``message.name``; ``message.to_dict()`` for the envelope as a dict)
- ``on_finish(message, queue, outcome, seconds)``: ``outcome`` is ``"SUCCESS"``,
  ``"FAILURE"`` or ``"RETRY"`` (the task raised Retry, or raised with retries left);
  ``seconds`` the function's run time.

A hook that raises is logged and ignored: it never fails the task or stops the worker.
The run's trace span (nbqueue.tracing) is opened here too, around the function.
"""
from __future__ import annotations

import logging
import time
from typing import Callable

from . import states, tracing
from .errors import Retry
from .message import Message

log = logging.getLogger(__name__)


class WorkerEvents:
    def __init__(self) -> None:
        self.on_start: list[Callable] = []
        self.on_finish: list[Callable] = []

    def run(self, message: Message, queue: str | None) -> _Run | None:
        """A context manager around one run of a task's function, or None while no hook is
        registered and no trace is recorded (the function is then called without one)."""
        if not self.on_start and not self.on_finish and tracing.tracer() is None:
            return None
        return _Run(self, message, queue)


class _Run:
    __slots__ = ("events", "message", "queue", "span", "started")

    def __init__(self, events: WorkerEvents, message: Message, queue: str | None):
        self.events, self.message, self.queue = events, message, queue

    def __enter__(self) -> None:
        for hook in self.events.on_start:
            _call(hook, self.message, self.queue)
        self.span = tracing.running(self.message, self.queue)
        self.span.__enter__()
        self.started = time.perf_counter()

    def __exit__(self, exc_type, exc, tb) -> bool:
        seconds = time.perf_counter() - self.started
        try:
            self.span.__exit__(exc_type, exc, tb)
        except Exception:
            log.warning("ending the trace span of task %s failed", self.message.id, exc_info=True)
        if self.events.on_finish:
            if exc_type is None:
                outcome = states.SUCCESS
            elif issubclass(exc_type, Retry) or self.message.retry_count > 0:
                outcome = states.RETRY
            else:
                outcome = states.FAILURE
            for hook in self.events.on_finish:
                _call(hook, self.message, self.queue, outcome, seconds)
        return False


def _call(hook: Callable, *args) -> None:
    try:
        hook(*args)
    except Exception:
        log.warning("worker event hook %r failed", hook, exc_info=True)
