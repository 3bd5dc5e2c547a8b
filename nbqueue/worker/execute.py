"""Running one claimed task: decode its arguments, call it (in this thread or a child process),
and decide its outcome (result, retry, failure, hand-back, dead letter) as an ``Outcome`` that
its batch settles (worker/batch.py)."""
from __future__ import annotations

import logging
import socket
import time
import traceback as _tb
from typing import Any

from .. import capture, context, control, serialization, shipping, states, workflow
from ..broker import Delivery
from ..engine import COUNT_LAPSE, DEFER, REJECT, RELEASE, RETRY, Claim, Outcome
from ..errors import (
    DeliveryLimitExceeded,
    MessageError,
    NotRegistered,
    PayloadError,
    Retry,
    SerializationError,
    WorkerLostError,
)
from ..message import Message
from ..procs import process_alive
from ..retry import next_delay
from .batch import _describe, _safe_text, _text

log = logging.getLogger(__name__)


class Execution:
    """Running tasks, Worker's part (a mixin: Worker holds the state)."""

    def execute(self, claim: Claim) -> Outcome:
        """Run one claimed task; the Outcome says what to record and what becomes of its delivery.

        A claim the engine did not begin is begun here (``claim.begun`` and ``claim.token``
        set), unless an earlier attempt after a lapse is dealt with instead."""
        assert claim.message is not None
        delivery, message = claim.delivery, claim.message
        task = self.app.registry.get(message.name)
        if task is None and message.ignore_when_not_registered:
            log.warning(
                "dropping task %s (%s): not registered on this worker and ignore_when_not_registered is set",
                message.name,
                message.id,
            )
            return Outcome(delivery, message.id, "", None, {})
        if not claim.begun:
            settled = self._begin(claim)
            if settled is not None:
                return settled
        if claim.token is None:
            # already final: an earlier attempt stored it (or it was revoked); repeat its follow-ups
            return Outcome(delivery, message.id, "", None, {}, message=message)
        found = self._task_to_run(claim, task)
        if isinstance(found, Outcome):
            return found
        return self._run(claim, found)

    def _begin(self, claim: Claim) -> Outcome | None:
        """Begin the claim's task (its fencing token; None when its record is final), or the
        outcome that settles a delivery after a lapse instead (see ``_after_lapse``)."""
        delivery, message = claim.delivery, claim.message
        assert message is not None
        if delivery.after_lapse:
            settled = self._after_lapse(delivery, message)
            if settled is not None:
                return settled
        claim.token = self.app.backend.begin(
            message.id,
            worker=self.name,
            fields={"retries": message.retries, "name": message.name, "queue": delivery.queue},
        )
        claim.begun = True
        return None

    def _task_to_run(self, claim: Claim, task: Any) -> Any:
        """The registered (or shipped) task to run, or the outcome that settles the delivery
        instead (handed back to another worker or for later, failed as not registered)."""
        delivery, message = claim.delivery, claim.message
        assert message is not None
        name = message.name
        if message.code is not None:   # a function shipped from a notebook: run by name, or its code with allow_code
            task = shipping.task_for(self, message, task, delivery.queue)
            if task is shipping.HAND_BACK:    # another live worker runs it
                return _requeued(claim, self.app.clock.time() + 1.0)
        if task is None:
            delay = self._leave_unknown(name, delivery.queue, message)
            if delay is not None:
                return _requeued(claim, self.app.clock.time() + delay)
            known = ", ".join(sorted(n for n in self.app.registry if not n.startswith("nbqueue."))) or "none"
            return _failed(claim, NotRegistered(
                f"task {name!r} is not registered on this worker nor on any live worker of queue {delivery.queue!r} "
                f"(registered here: {known})"))
        return task

    def _run(self, claim: Claim, task: Any) -> Outcome:
        """Decode the arguments, call the task, and decide its outcome (result, retry, failure)."""
        app = self.app
        delivery, message, token = claim.delivery, claim.message, claim.token
        assert message is not None
        task_id, name = message.id, message.name
        refusal = self._refusal(task, message)
        if refusal is not None:
            return _failed(claim, refusal)
        try:
            args, kwargs = app.serializer.decode_arguments(message.args, message.kwargs)
        except Exception as exc:
            # a payload's error (missing, corrupt) keeps its type
            kind = type(exc) if isinstance(exc, PayloadError) else SerializationError
            return _failed(claim, kind(f"cannot decode arguments of task {name!r}: {exc}"))

        started_at = app.clock.time()
        ctl = control.TaskControl(task_id, name)
        run = {
            "started": time.monotonic(),
            "started_at": started_at,
            "time_limit": message.time_limit,
            "token": token,
            "message": message,
            "control": ctl,
        }
        with self._held_lock:
            self._running[task_id] = run
        capture.begin(task_id)
        try:
            value = self._call_in_context(task, args, kwargs, message, delivery.queue, ctl, token)
        except Retry as exc:
            eta = app.clock.time() + exc.countdown
            return _retried(claim, message, eta, "Retry", exc.reason or "retry requested", capture.end())
        except WorkerLostError as exc:  # its child process died or was stopped: not finished, not the task's failure
            return self._child_lost(claim, exc, capture.end())
        # the task's own failure, whatever it raised (exit() too): recorded, the worker carries on
        except BaseException as exc:
            output = capture.end()
            tb = getattr(exc, "child_traceback", None) or _tb.format_exc()
            return self._raised(claim, exc, tb, output, started_at)
        finally:
            with self._held_lock:
                self._running.pop(task_id, None)
            if ctl.progress is not None:     # reported progress, or was asked to stop
                self.control.finished(task_id, run)
        output = capture.end()
        del args, kwargs        # a large argument is not held while the result is encoded
        return self._succeeded(claim, value, output, started_at)

    def _call_in_context(self, task, args: list, kwargs: dict, message: Message, queue: str,
                         ctl: control.TaskControl, token: int | None) -> Any:
        """``_call`` with ``current_task()`` describing the task, inside the worker's events
        (hooks, trace span) where any are listening."""
        entered = context.enter(self.app, message, token, self, ctl)
        try:
            events = self.events.run(message, queue)
            if events is None:
                return self._call(task, args, kwargs, message, ctl)
            with events:
                return self._call(task, args, kwargs, message, ctl)
        finally:
            context.leave(entered)

    def _raised(self, claim: Claim, exc: BaseException, tb: str, output: str, started_at: float) -> Outcome:
        """A task raised: retried while it has retries left, else failed."""
        message = claim.message
        assert message is not None
        if message.retry_count <= 0:
            return _failed(claim, exc, tb=tb, output=output, started_at=started_at)
        try:
            delay, timeout = next_delay(message.retries, float(message.retry_timeout), message.retry_backoff)
        except Exception as err:  # options no producer of this version sends (see signature.check_options)
            return _failed(claim, exc, tb=tb, output=output, started_at=started_at,
                           note=f"not retried: its retry options are invalid: {_describe(err)}")
        retried = message.copy(retry_timeout=timeout, retry_count=message.retry_count - 1, retries=message.retries + 1)
        eta = self.app.clock.time() + delay
        return _retried(claim, retried, eta, type(exc).__name__, _text(exc), output, tb=tb)

    def _succeeded(self, claim: Claim, value: Any, output: str, started_at: float) -> Outcome:
        """The task returned ``value``: SUCCESS with its encoded result (a group member counted
        with it where the engine counts members), or FAILURE when it cannot be encoded."""
        message = claim.message
        assert message is not None
        name = message.name
        try:
            result_text = serialization.dumps(
                self.app.serializer.encode(value, f"result of task {name!r}", owner=message.id)
            )
        except Exception as exc:    # whatever the encoder raises (a value nested too deeply, say): the task fails
            if not isinstance(exc, SerializationError):
                hint = (
                    " (a value that contains itself, or is nested too deeply?)"
                    if isinstance(exc, RecursionError)
                    else ""
                )
                exc = SerializationError(f"the result of task {name!r} cannot be encoded: {_describe(exc)}{hint}")
            return _failed(claim, exc, output=output, started_at=started_at)
        fields = {
            "result": result_text,
            "output": _safe_text(output) or None,
            "error": None,
            "exc_type": None,
            "traceback": None,
            "started_at": started_at,
        }
        member = workflow.lone_member(message) if self.counts_members else None
        return Outcome(claim.delivery, message.id, states.SUCCESS, claim.token, fields,
                       group=member["group"] if member is not None else None, message=message)

    def _after_lapse(self, delivery: Delivery, message: Message) -> Outcome | None:
        """Before a delivery after a lapse begins its task again: the outcome that deals with it
        instead, or None. While an earlier attempt is alive (``_attempt_alive``) the message is
        put back for a lease, so that attempt is not fenced out and records its own result. A
        ``maybe_lapsed`` delivery (a broker that cannot count lapses itself: AMQP) whose
        record shows an attempt begun since the last count that never finished is a lapse:
        counted (``Broker.count_lapse``), or dead-lettered at ``max_deliveries``."""
        app = self.app
        task_id = message.id
        record = app.backend.get(task_id) or {}
        if self._attempt_alive(task_id, record, delivery):
            delay = self.lease
            log.info("task %s (%s): its attempt on worker %s is still alive; looking again in %.1fs",
                     message.name, task_id, record.get("worker"), delay)
            return Outcome(delivery, task_id, "", None, {}, then=DEFER, eta=app.clock.time() + delay)
        token = int(record.get("token") or 0)
        if (
            delivery.maybe_lapsed
            and record.get("state") in (states.RECEIVED, states.STARTED)
            and token > delivery.lapse_token
        ):
            reason = app.broker.limit_reason(delivery.lapsed + 1)
            if reason is not None:
                return self.dead_letter(delivery, reason, message=message, exc_type=DeliveryLimitExceeded.__name__)
            return Outcome(delivery, task_id, "", token, {}, then=COUNT_LAPSE)
        return None

    def _attempt_alive(self, task_id: str, record: dict, delivery: Delivery) -> bool:
        """Is an earlier attempt of this task still alive? Its record is RECEIVED or STARTED
        by a worker that is this one and still holds the task; or that heartbeats on time
        and lists the task among those it holds (a worker extends the leases of what it
        holds, so it lets one lapse only while stalled); or, its heartbeat late, that is a
        live process of this host (a thread holding the GIL stalls the heartbeat too: the
        process is the only sign of life); or, on another host, whose heartbeat has not
        expired yet. Past that a stalled remote attempt is taken for dead, and a task
        whose attempts keep dying ends at ``max_deliveries``."""
        owner = record.get("worker") or ""
        if record.get("state") not in (states.RECEIVED, states.STARTED) or not owner:
            return False
        if owner == self.name:
            with self._held_lock:
                return task_id in self._running or any(
                    d.message_id == task_id and d is not delivery for d in self._held.values()
                )
        beat = next((w for w in self.app.backend.workers() if w.get("worker_id") == owner), None)
        if beat is not None:
            every = float(beat.get("heartbeat_interval") or self.heartbeat_interval)
            if self.app.clock.time() - float(beat.get("last_seen") or 0) <= 2 * every:
                return task_id in (beat.get("holding") or ())
            host, pid = beat.get("host"), beat.get("pid")
        else:
            host, pid = _host_and_pid(owner)
        if host == socket.gethostname() and isinstance(pid, int):
            alive = process_alive(pid)
            if alive is not None:
                return alive
        return beat is not None

    def dead_letter(self, delivery: Delivery, reason: str, *, message: Message | None = None,
                    exc_type: str | None = None) -> Outcome:
        """The outcome that dead-letters a message with ``reason`` and fails its task's record, if
        one is waiting (a sender's ``get()`` then raises with the reason instead of waiting forever)."""
        limit = delivery.dead_reason is not None and delivery.dead_reason == self.app.broker.limit_reason(
            delivery.lapsed
        )
        exc_type = exc_type or (DeliveryLimitExceeded if limit else MessageError).__name__
        if message is None and limit:
            try:
                message = Message.decode(delivery.body)
            except MessageError:
                pass
        task_id = message.id if message is not None else delivery.message_id
        log.error("worker %s: dead-lettering message %s: %s", self.name, delivery.message_id, reason)
        fields = {"exc_type": exc_type, "error": reason, "retries": message.retries if message is not None else 0}
        return Outcome(delivery, task_id, states.FAILURE, None, fields, message=message, then=REJECT, reason=reason)

    def _call(self, task, args: list, kwargs: dict, message: Message, ctl: "control.TaskControl | None" = None) -> Any:
        """Run the task's function: in this thread, or with ``pool="processes"`` in a child
        process (pool.py; built-in tasks, which use this process's objects, stay here)."""
        if self.pool is None or task.name.startswith("nbqueue."):
            if ctl is None or not message.soft_time_limit:    # only a soft time limit is raised into the thread
                return task.fn(*args, **kwargs)
            return ctl.call(task.fn, args, kwargs)
        return self.pool.call(task.fn, args, kwargs, task_id=message.id, name=task.name,
                              time_limit=message.time_limit, soft_time_limit=message.soft_time_limit,
                              on_progress=None if ctl is None else ctl.set_progress)

    def _child_lost(self, claim: Claim, exc: WorkerLostError, output: str) -> Outcome:
        """The child process running the task died (or was stopped): the task goes back to the
        queue (a release: not a lapse), unless it has now ended ``max_deliveries`` deliveries
        without finishing (its child deaths in this worker, or its lapses and this one): then
        its record fails and its message is dead-lettered with the reason, so a task that
        kills its child every time cannot loop."""
        delivery, message = claim.delivery, claim.message
        assert message is not None
        if getattr(exc, "counts", True) and self.pool is not None:
            deliveries = max(self.pool.note_death(message.id), delivery.lapsed + 1)
            limit = self.app.broker.max_deliveries
            if deliveries >= limit:
                reason = (
                    f"{exc} running this task, on {deliveries} deliveries (max_deliveries={limit}); not delivered again"
                )
                return self.dead_letter(delivery, reason, message=message, exc_type=WorkerLostError.__name__)
        if getattr(exc, "counts", True) or "(cancelled)" not in str(exc):
            log.warning("worker %s: %s running task %s (%s); delivering it again", self.name, exc, message.name,
                        message.id)
        return _requeued(claim, None, exc_type=type(exc).__name__, error=f"{exc}; delivered again",
                         output=output or None)

    def _leave_unknown(self, name: str, queue: str, message: Message) -> float | None:
        """For a task name this worker has not registered: in how many seconds to hand the
        message back instead of failing it, or None to fail it with NotRegistered.

        Another live worker of the queue has it registered (its heartbeat lists it): leave it
        to that worker, never fail it. A message sent before this worker started, within its
        ``unknown_grace`` (a notebook kernel's worker: the cells that define tasks may run
        after it starts): wait for it to be registered. Otherwise no live worker knows it.
        """
        app = self.app
        now = app.clock.time()
        seen_at, others = self._workers_seen
        if time.monotonic() - seen_at > 1.0:
            try:
                others = [w for w in app.backend.workers() if w.get("worker_id") != self.name]
            except Exception:
                log.warning("worker %s: cannot read the other workers' heartbeats", self.name, exc_info=True)
                others = []
            self._workers_seen = (time.monotonic(), others)
        owners = [w["worker_id"] for w in others if queue in (w.get("queues") or ()) and name in (w.get("tasks") or ())]
        if owners:
            log.info(
                "task %s (%s) is not registered here; leaving it to %s", name, message.id, ", ".join(owners[:3])
            )
            return 0.5
        if now - self._born < self.unknown_grace and (message.created_at or 0.0) <= self._born:
            log.info("task %s (%s) is not registered yet; handing it back for %.0fs more", name, message.id,
                     self.unknown_grace - (now - self._born))
            return 1.0
        return None

    def _refusal(self, task, message: Message) -> BaseException | None:
        """A reason not to run this task on this worker (cells need --allow-cells), or None."""
        check = getattr(task.fn, "nbqueue_check", None)
        return check(self, message) if check is not None else None


def _requeued(claim: Claim, eta: float | None, **fields: Any) -> Outcome:
    """A begun task back to PENDING and its message back to its queue: due at ``eta``, or at once."""
    assert claim.message is not None
    return Outcome(claim.delivery, claim.message.id, states.PENDING, claim.token, fields,
                   then=RELEASE if eta is None else RETRY, eta=eta)


def _retried(claim: Claim, message: Message, eta: float, exc_type: str, reason: str, output: str, *,
             tb: str | None = None) -> Outcome:
    """A task to run again at ``eta``, with ``message`` (its retry counts as it goes back)."""
    fields = {
        "retries": message.retries,
        "exc_type": exc_type,
        "error": reason,
        "traceback": tb,
        "output": output or None,
    }
    return Outcome(claim.delivery, message.id, states.RETRY, claim.token, fields, message=message, then=RETRY,
                   eta=eta)


def _failed(claim: Claim, exc: BaseException, *, tb: str | None = None, output: str | None = None,
            started_at: float | None = None, note: str | None = None) -> Outcome:
    """The task's FAILURE with ``exc`` (``note``: said after the error); its message acknowledged."""
    message = claim.message
    assert message is not None
    exc_type, error = type(exc).__name__, _text(exc)
    if note:
        error = f"{error} ({note})" if error else note
    fields = {
        "exc_type": exc_type,
        "error": error,
        "traceback": _safe_text(tb),
        "output": _safe_text(output) or None,
        "retries": message.retries,
    }
    if started_at is not None:
        fields["started_at"] = started_at
    return Outcome(claim.delivery, message.id, states.FAILURE, claim.token, fields, message=message)


def timed_out(task_id: str, run: dict, limit: float, output: str | None) -> Outcome:
    """The FAILURE (TimeLimitExceeded) of a task running in a thread past its hard time limit
    (``run``: the worker's record of the running task). No delivery: the executor running the
    task still holds it, and settles it once the task returns."""
    message = run["message"]
    fields: dict[str, Any] = {
        "exc_type": "TimeLimitExceeded",
        "error": f"task ran longer than its time limit of {limit:g}s",
        "traceback": None,
        "output": _safe_text(output) or None,
        "retries": message.retries,
        "started_at": run["started_at"],
    }
    return Outcome(None, task_id, states.FAILURE, run["token"], fields, message=message)


def _host_and_pid(worker_name: str) -> tuple[str | None, int | None]:
    """(host, pid) from a worker name of the default form ``host:pid:suffix``, else (None, None)."""
    host, _, rest = worker_name.partition(":")
    pid = rest.partition(":")[0]
    return (host, int(pid)) if host and pid.isdigit() else (None, None)
