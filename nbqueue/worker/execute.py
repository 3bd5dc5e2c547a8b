"""Running one claimed task: decode its arguments, call it (in this thread or a child process),
and decide what its outcome is (result, retry, failure, hand-back, dead letter), added to its
batch as a finish step."""
from __future__ import annotations

import logging
import os
import socket
import time
import traceback as _tb
from typing import Any

from .. import capture, context, control, serialization, shipping, states, workflow
from ..broker import Delivery
from ..errors import (
    DeliveryLimitExceeded,
    MessageError,
    NotRegistered,
    PayloadError,
    Retry,
    SerializationError,
    WorkerLostError,
)
from ..retry import next_delay
from ..signature import decode_body, encode_body
from .batch import _MISSING, _Batch, _describe, _ResultNotStored, _safe_text, _text

log = logging.getLogger(__name__)


class Execution:
    """Running tasks, Worker's part (a mixin: Worker holds the state)."""

    def _execute(self, delivery: Delivery, message: dict, token: Any, batch: "_Batch") -> None:
        """Run one claimed task and add the step that settles its outcome to ``batch``."""
        app = self.app
        task_id, name = message["id"], message["name"]
        task = app.registry.get(name)
        if task is None and message.get("ignore_when_not_registered"):
            log.warning(
                "dropping task %s (%s): not registered on this worker and ignore_when_not_registered is set",
                name,
                task_id,
            )
            batch.add(lambda: batch.ack(delivery), delivery)
            return
        token = self._begun(delivery, message, token, batch)
        if token is _MISSING:
            return
        task = self._task_to_run(delivery, message, token, task, batch)
        if task is None:
            return
        self._run(delivery, message, token, task, batch)

    def _begun(self, delivery: Delivery, message: dict, token: Any, batch: "_Batch") -> Any:
        """The task's fencing token, begun here where the claim did not; ``_MISSING`` when the
        delivery was settled instead (an earlier attempt is alive, or the task is final)."""
        app = self.app
        task_id = message["id"]
        if token is _MISSING:
            if delivery.after_lapse and self._settled_after_lapse(delivery, message, batch):
                return _MISSING
            token = app.backend.begin(
                task_id,
                worker=self.name,
                fields={"retries": message.get("retries", 0), "name": message["name"], "queue": delivery.queue},
            )
        batch.begun[id(delivery)] = (message, token)
        if token is None:
            # already final: an earlier attempt stored it (or it was revoked); repeat its follow-ups
            def settle() -> None:
                workflow.after_final(app, message, app.backend.get(task_id) or {}, send=batch.send)
                batch.ack(delivery)

            batch.add(settle, delivery)
            return _MISSING
        return token

    def _task_to_run(self, delivery: Delivery, message: dict, token: int, task: Any, batch: "_Batch") -> Any:
        """The registered (or shipped) task to run, or None when the delivery was settled instead
        (handed back to another worker or for later, failed as not registered)."""
        app = self.app
        task_id, name = message["id"], message["name"]
        if "code" in message:   # a function shipped from a notebook: run by name, or its code only with allow_code
            task = shipping.task_for(self, message, task, delivery.queue)
            if task is shipping.HAND_BACK:    # another live worker runs it
                self._requeue(delivery, message, token, batch, delay=1.0)
                return None
        if task is None:
            delay = self._leave_unknown(name, delivery.queue, message)
            if delay is not None:
                def hand_back() -> None:
                    if app.backend.set_state(task_id, states.PENDING, token=token):
                        app.broker.retry(delivery, eta=app.clock.time() + delay)
                    else:
                        batch.ack(delivery)

                batch.add(hand_back, delivery)
                return None
            known = ", ".join(sorted(n for n in app.registry if not n.startswith("nbqueue."))) or "none"
            self._fail(delivery, message, token, NotRegistered(
                f"task {name!r} is not registered on this worker nor on any live worker of queue {delivery.queue!r} "
                f"(registered here: {known})"), batch)
            return None
        return task

    def _run(self, delivery: Delivery, message: dict, token: int, task: Any, batch: "_Batch") -> None:
        """Decode the arguments, call the task, and decide its outcome (result, retry, failure)."""
        app = self.app
        task_id, name = message["id"], message["name"]
        refusal = self._refusal(task, message)
        if refusal is not None:
            self._fail(delivery, message, token, refusal, batch)
            return
        try:
            args = [app.serializer.decode(a) for a in message["args"]]
            kwargs = {k: app.serializer.decode(v) for k, v in message["kwargs"].items()}
        except Exception as exc:
            # a payload's error (missing, corrupt) keeps its type
            kind = type(exc) if isinstance(exc, PayloadError) else SerializationError
            self._fail(delivery, message, token, kind(f"cannot decode arguments of task {name!r}: {exc}"), batch)
            return

        started_at = app.clock.time()
        run = {
            "started": time.monotonic(),
            "started_at": started_at,
            "time_limit": message.get("time_limit"),
            "token": token,
            "message": message,
            "batch": batch,
            "control": control.TaskControl(task_id, name),
        }
        with self._held_lock:
            self._running[task_id] = run
        capture.begin(task_id)
        try:
            with context.task_context(app, message, token, self, run["control"]), \
                    self.events.run(message, delivery.queue):
                value = self._call(task, args, kwargs, message, run["control"])
        except Retry as exc:
            output = capture.end()
            self._retry(
                delivery,
                message,
                token,
                exc.countdown,
                "Retry",
                exc.reason or "retry requested",
                output,
                batch,
                counts=False,
            )
            return
        except WorkerLostError as exc:  # its child process died or was stopped: not finished, not the task's failure
            self._child_lost(delivery, message, token, exc, capture.end(), batch, started_at)
            return
        # the task's own failure, whatever it raised (exit() too): recorded, the worker carries on
        except BaseException as exc:
            output = capture.end()
            tb = getattr(exc, "child_traceback", None) or _tb.format_exc()
            if int(message.get("retry_count") or 0) > 0:
                try:
                    delay, timeout = next_delay(
                        int(message.get("retries") or 0),
                        float(message.get("retry_timeout") or 0),
                        message.get("retry_backoff"),
                    )
                except Exception as err:  # options no producer of this version sends (see signature.check_options)
                    self._fail(
                        delivery,
                        message,
                        token,
                        exc,
                        batch,
                        tb=tb,
                        output=output,
                        started_at=started_at,
                        note=f"not retried: its retry options are invalid: {_describe(err)}",
                    )
                    return
                message["retry_timeout"] = timeout
                self._retry(
                    delivery, message, token, delay, type(exc).__name__, _text(exc), output, batch, counts=True, tb=tb
                )
            else:
                self._fail(delivery, message, token, exc, batch, tb=tb, output=output, started_at=started_at)
            return
        finally:
            with self._held_lock:
                self._running.pop(task_id, None)
            self.control.finished(task_id, run)
        output = capture.end()
        del args, kwargs        # a large argument is not held while the result is encoded
        try:
            result_text = serialization.dumps(app.serializer.encode(value, f"result of task {name!r}", owner=task_id))
        except Exception as exc:    # whatever the encoder raises (a value nested too deeply, say): the task fails
            if not isinstance(exc, SerializationError):
                hint = (
                    " (a value that contains itself, or is nested too deeply?)"
                    if isinstance(exc, RecursionError)
                    else ""
                )
                exc = SerializationError(f"the result of task {name!r} cannot be encoded: {_describe(exc)}{hint}")
            self._fail(delivery, message, token, exc, batch, output=output, started_at=started_at)
            return

        fields = {
            "result": result_text,
            "output": _safe_text(output) or None,
            "error": None,
            "exc_type": None,
            "traceback": None,
            "started_at": started_at,
        }
        if not message.get("on_success") and not message.get("workflow") and not message.get("on_error"):
            batch.add_plain(delivery, task_id, token, fields)      # nothing follows: finished with others in one go
            return
        if self.counts_members:    # counted in the round trip that stores the result (Engine.finish)
            member = workflow.lone_member(message)
            if member is not None:     # a group member: stored and counted with others in one go
                batch.add_member(delivery, task_id, token, fields, message, member)
                return

        def finish() -> None:
            try:
                stored = app.backend.store_result(task_id, states.SUCCESS, token=token, **fields)
            except self.store_errors:
                raise
            except Exception as exc:
                raise _ResultNotStored() from exc
            if stored:
                workflow.on_success(app, message, result_text, send=batch.send)
                self._count(processed=1)
            else:   # revoked (or failed by its time limit) meanwhile: what follows it ends as for a failure
                workflow.after_final(app, message, app.backend.get(task_id) or {}, send=batch.send)
            batch.ack(delivery)

        batch.add(finish, delivery)

    def _settled_after_lapse(self, delivery: Delivery, message: dict, batch: "_Batch") -> bool:
        """Before a delivery after a lapse begins its task again: True when it was dealt with
        instead. While an earlier attempt is alive (``_attempt_alive``) the message is put
        back for a lease, so that attempt is not fenced out and records its own result. A
        ``maybe_lapsed`` delivery (a broker that cannot count lapses itself: AMQP) whose
        record shows an attempt begun since the last count that never finished is a lapse:
        counted (``Broker.count_lapse``), or dead-lettered at ``max_deliveries``."""
        app = self.app
        task_id = message["id"]
        record = app.backend.get(task_id) or {}
        if self._attempt_alive(task_id, record, delivery):
            delay = self.lease
            log.info("task %s (%s): its attempt on worker %s is still alive; looking again in %.1fs",
                     message["name"], task_id, record.get("worker"), delay)
            batch.add(lambda: app.broker.defer(delivery, eta=app.clock.time() + delay), delivery)
            return True
        token = int(record.get("token") or 0)
        if (
            delivery.maybe_lapsed
            and record.get("state") in (states.RECEIVED, states.STARTED)
            and token > delivery.lapse_token
        ):
            reason = app.broker.limit_reason(delivery.lapsed + 1)
            if reason is not None:
                self._dead_letter(delivery, reason, batch, message=message, exc_type=DeliveryLimitExceeded.__name__)
            else:
                batch.add(lambda: app.broker.count_lapse(delivery, token), delivery)
            return True
        return False

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
            alive = _process_alive(pid)
            if alive is not None:
                return alive
        return beat is not None

    def _dead_letter(self, delivery: Delivery, reason: str, batch: "_Batch", *, message: dict | None = None,
                     exc_type: str | None = None) -> None:
        """Dead-letter a message with ``reason`` and fail its task's record, if one is waiting
        (a sender's ``get()`` then raises with the reason instead of waiting forever)."""
        app = self.app
        limit = delivery.dead_reason is not None and delivery.dead_reason == app.broker.limit_reason(delivery.lapsed)
        exc_type = exc_type or (DeliveryLimitExceeded if limit else MessageError).__name__
        if message is None and limit:
            try:
                message = decode_body(delivery.body)
            except MessageError:
                pass
        task_id = message["id"] if message is not None else delivery.message_id
        log.error("worker %s: dead-lettering message %s: %s", self.name, delivery.message_id, reason)

        def finish() -> None:
            stored = False
            record = app.backend.get(task_id) if task_id else None
            if record is not None and record.get("state") not in states.READY_STATES:
                token = app.backend.begin(task_id, worker=self.name)
                stored = token is not None and app.backend.store_result(
                    task_id,
                    states.FAILURE,
                    token=token,
                    exc_type=exc_type,
                    error=reason,
                    retries=(message or {}).get("retries", 0),
                )
            if stored:
                self._count(failed=1)
                if message is not None:
                    workflow.on_failure(app, message, exc_type, reason, send=batch.send)
            app.broker.reject(delivery, reason)

        batch.add(finish, delivery)

    def _call(self, task, args: list, kwargs: dict, message: dict, ctl: "control.TaskControl | None" = None) -> Any:
        """Run the task's function: in this thread, or with ``pool="processes"`` in a child
        process (pool.py; built-in tasks, which use this process's objects, stay here)."""
        if self.pool is None or task.name.startswith("nbqueue."):
            return task.fn(*args, **kwargs) if ctl is None else ctl.call(task.fn, args, kwargs)
        return self.pool.call(task.fn, args, kwargs, task_id=message["id"], name=task.name,
                              time_limit=message.get("time_limit"), soft_time_limit=message.get("soft_time_limit"),
                              on_progress=None if ctl is None else ctl.set_progress)

    def _child_lost(
        self,
        delivery: Delivery,
        message: dict,
        token: int,
        exc: WorkerLostError,
        output: str,
        batch: "_Batch",
        started_at: float,
    ) -> None:
        """The child process running the task died (or was stopped): the task goes back to the
        queue (a release: not a lapse), unless it has now ended ``max_deliveries`` deliveries
        without finishing (its child deaths in this worker, or its lapses and this one): then
        its record fails and its message is dead-lettered with the reason, so a task that
        kills its child every time cannot loop."""
        if getattr(exc, "counts", True) and self.pool is not None:
            deliveries = max(self.pool.note_death(message["id"]), delivery.lapsed + 1)
            limit = self.app.broker.max_deliveries
            if deliveries >= limit:
                reason = (
                    f"{exc} running this task, on {deliveries} deliveries (max_deliveries={limit}); not delivered again"
                )
                self._dead_letter(delivery, reason, batch, message=message, exc_type=WorkerLostError.__name__)
                return
        if getattr(exc, "counts", True) or "(cancelled)" not in str(exc):
            log.warning("worker %s: %s running task %s (%s); delivering it again", self.name, exc, message["name"],
                        message["id"])
        self._requeue(
            delivery,
            message,
            token,
            batch,
            exc_type=type(exc).__name__,
            error=f"{exc}; delivered again",
            output=output or None,
        )

    def _requeue(
        self, delivery: Delivery, message: dict, token: int, batch: "_Batch", *, delay: float = 0.0, **fields
    ) -> None:
        """A begun task back to PENDING and its message back to its queue (due in ``delay`` s)."""
        app = self.app

        def requeue() -> None:
            if app.backend.set_state(message["id"], states.PENDING, token=token, **fields):
                if delay:
                    app.broker.retry(delivery, eta=app.clock.time() + delay)
                else:
                    app.broker.release(delivery)
            else:   # final meanwhile (revoked): nothing to run
                batch.ack(delivery)

        batch.add(requeue, delivery)

    def _leave_unknown(self, name: str, queue: str, message: dict) -> float | None:
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
                "task %s (%s) is not registered here; leaving it to %s", name, message["id"], ", ".join(owners[:3])
            )
            return 0.5
        if now - self._born < self.unknown_grace and (message.get("created_at") or 0.0) <= self._born:
            log.info("task %s (%s) is not registered yet; handing it back for %.0fs more", name, message["id"],
                     self.unknown_grace - (now - self._born))
            return 1.0
        return None

    def _refusal(self, task, message: dict) -> BaseException | None:
        """A reason not to run this task on this worker (cells need --allow-cells), or None."""
        check = getattr(task.fn, "nbqueue_check", None)
        return check(self, message) if check is not None else None

    def _retry(
        self,
        delivery: Delivery,
        message: dict,
        token: int,
        delay: float,
        exc_type: str,
        reason: str,
        output: str,
        batch: "_Batch",
        *,
        counts: bool,
        tb: str | None = None,
    ) -> None:
        app = self.app
        if counts:
            message["retry_count"] = int(message.get("retry_count") or 0) - 1
            message["retries"] = int(message.get("retries") or 0) + 1
        eta = app.clock.time() + delay

        def finish() -> None:
            if app.backend.set_state(
                message["id"],
                states.RETRY,
                token=token,
                retries=message.get("retries", 0),
                exc_type=exc_type,
                error=reason,
                traceback=tb,
                output=output or None,
            ):
                app.broker.retry(delivery, body=encode_body(message), eta=eta)
                log.info("task %s (%s) will retry in %.1fs: %s", message["name"], message["id"], delay, reason)
            else:  # revoked or taken over meanwhile
                workflow.after_final(app, message, app.backend.get(message["id"]) or {}, send=batch.send)
                batch.ack(delivery)

        batch.add(finish, delivery)

    def _fail(
        self,
        delivery: Delivery,
        message: dict,
        token: int,
        exc: BaseException,
        batch: "_Batch",
        *,
        tb: str | None = None,
        output: str | None = None,
        started_at: float | None = None,
        note: str | None = None,
    ) -> None:
        """Record the task FAILURE (``note``: said after the error) and acknowledge it."""
        app = self.app
        exc_type, error = type(exc).__name__, _text(exc)
        if note:
            error = f"{error} ({note})" if error else note
        tb, output = _safe_text(tb), _safe_text(output)
        extra = {"started_at": started_at} if started_at is not None else {}

        def finish() -> None:
            if app.backend.store_result(
                message["id"],
                states.FAILURE,
                token=token,
                exc_type=exc_type,
                error=error,
                traceback=tb,
                output=output or None,
                retries=message.get("retries", 0),
                **extra,
            ):
                workflow.on_failure(app, message, exc_type, error, send=batch.send)
                self._count(failed=1)
            else:   # revoked meanwhile: what follows it ends as for a failure
                workflow.after_final(app, message, app.backend.get(message["id"]) or {}, send=batch.send)
            batch.ack(delivery)

        batch.add(finish, delivery)


def _host_and_pid(worker_name: str) -> tuple[str | None, int | None]:
    """(host, pid) from a worker name of the default form ``host:pid:suffix``, else (None, None)."""
    host, _, rest = worker_name.partition(":")
    pid = rest.partition(":")[0]
    return (host, int(pid)) if host and pid.isdigit() else (None, None)


def _process_alive(pid: int) -> bool | None:
    """Whether process ``pid`` of this host is running (a zombie has ended); None where this
    cannot be asked (not POSIX)."""
    if pid == os.getpid():
        return True
    if os.name != "posix":
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True
