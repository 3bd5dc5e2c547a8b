"""One exception tree for nbqueue: everything a user catches derives from NbqueueError."""
from __future__ import annotations

from typing import Sequence


class NbqueueError(Exception):
    """Base of every error nbqueue raises on purpose."""


class ConfigurationError(NbqueueError):
    """A URL, option or config file nbqueue cannot use; the message says what to change."""


class UnsupportedOperation(NbqueueError, NotImplementedError):
    """The configured store cannot do this (its module docstring lists what it supports)."""


class SerializationError(NbqueueError, TypeError):
    """A value cannot be encoded (at send time) or decoded (on a worker)."""


class BrokerError(NbqueueError):
    """The broker refused or failed an operation."""


class ConnectionLost(BrokerError, ConnectionError):
    """The connection to a broker or backend dropped; workers reconnect with back-off."""


class PublishRefused(BrokerError):
    """The broker did not confirm a publish (AMQP publisher confirms)."""

    #: the ids of the refused messages, where the broker says which (their records are failed)
    message_ids: Sequence[str] = ()


class MessageError(NbqueueError):
    """A message that cannot be decoded or lacks required fields; it is dead-lettered."""


class DeliveryLimitExceeded(MessageError):
    """A message was delivered ``max_deliveries`` times without finishing (each time its worker
    died or stalled past its lease: a task that crashes its process); it is dead-lettered."""


class NotRegistered(NbqueueError, KeyError):
    """A worker received a task name it does not know."""

    def __str__(self) -> str:  # KeyError's repr-quoting makes messages unreadable
        return str(self.args[0]) if self.args else ""


class TaskFailed(NbqueueError):
    """A task failed for good; carries the remote exception's type, message and traceback text."""

    def __init__(
        self,
        task_id: str,
        exc_type: str | None,
        message: str | None,
        traceback: str | None = None,
        name: str | None = None,
    ):
        self.task_id = task_id
        self.exc_type = exc_type or "Error"
        self.message = message or ""
        self.traceback = traceback
        self.name = name
        label = f"task {name!r} ({task_id})" if name else f"task {task_id}"
        super().__init__(f"{label} failed: {self.exc_type}: {self.message}")


class TaskRevoked(TaskFailed):
    """The task was cancelled, or never ran because an earlier workflow step failed."""


class ResultNotFound(NbqueueError, LookupError):
    """No record of this task id in the result backend: it was never sent to this store,
    its record was removed with ``forget()``, or its result expired (``results_expire_in``).

    nbqueue records every task as PENDING when it is sent, so waiting on a missing record
    could only end in a timeout; ``get()`` and ``wait()`` raise this at once instead.
    """

    def __init__(self, task_id: str, message: str | None = None):
        self.task_id = task_id
        super().__init__(message or (
            f"no record of task {task_id}: the id is unknown to this result backend, or its record was "
            "forgotten (forget()) or has expired (results_expire_in); nothing will ever finish it"))


class DeadlockError(NbqueueError, RuntimeError):
    """A task waits (``get()``/``wait()``) for a result that no free worker thread can produce.

    Waiting inside a task holds a worker thread while it waits; when every thread that
    could run the awaited task is held like that, the wait would never end. As in Celery
    ("never call result.get() within a task"), build the dependency into the workflow
    instead: a chain runs a step with the previous step's result, a chord runs its callback
    with the results of a group.
    """


class Retry(NbqueueError):
    """Raise inside a task to run it again later without using up its retry_count.

    machinery's "retry later" error: ``raise nbqueue.Retry(countdown=30, reason="rate limited")``.
    """

    def __init__(self, countdown: float = 1.0, reason: str = ""):
        self.countdown = float(countdown)
        self.reason = reason
        super().__init__(f"retry in {self.countdown:g}s" + (f": {reason}" if reason else ""))


class SignatureError(NbqueueError):
    """A cell message failed HMAC verification or lacks a required signature."""


class CodeNotAllowed(NbqueueError):
    """A worker started without allow_code (``--allow-code``) received a function shipped
    from a notebook; nothing was unpickled or run."""


class WorkerLostError(NbqueueError):
    """The child process running a task died (or was stopped) before the task finished
    (Celery's name). The task is delivered again, up to the delivery limit."""


class TimeLimitExceeded(NbqueueError):
    """The task ran longer than its ``time_limit``; in a process pool its child was stopped."""


class SoftTimeLimitExceeded(NbqueueError):
    """Raised inside a task running in a child process when its ``soft_time_limit`` passes
    (delivered by a signal to the child's main thread), so the task can clean up."""


class PayloadError(NbqueueError):
    """A value stored out of band (a payload, see nbqueue.payloads) cannot be written or read."""


class PayloadMissing(PayloadError):
    """A message or result refers to a payload its payload store does not hold (deleted by
    hand, or removed with the records that referenced it); the message names the payload."""


class PayloadCorrupt(PayloadError):
    """A payload's bytes do not match its SHA-256 (truncated or corrupted); it is not decoded."""


class PayloadTooLarge(SerializationError, PayloadError):
    """A value is larger than this App's payload store can hold (or the App has none); refused
    at send, naming the argument and saying how to configure a payload store."""
