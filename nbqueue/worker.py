"""Worker: reserve -> execute -> record -> advance workflows -> ack.

``step()`` runs one pass in the calling thread, so tests drive it without sleeping;
``start()`` runs ``concurrency`` executor threads plus one heartbeat thread (daemon
threads: fine inside a notebook kernel) and returns at once; ``run()`` blocks.
A worker installs no signal handlers: the CLI owns those.

Delivery is at least once and recording exactly once: the backend hands out a fencing
token when a task begins and refuses a final result from a stale attempt, and a
redelivered message whose task is already final is not run again, only acknowledged
(after re-running the idempotent workflow step, in case the earlier attempt died
before it).

Redelivery is bounded (see nbqueue.broker): a message whose lease lapsed comes
alone, and before its task is begun again the worker checks whether the earlier attempt
is still alive (``_attempt_alive``). A lease also lapses while a task holds the GIL in
one long C call (a big sort, ``sum(range(n))``): the heartbeat thread cannot run to
extend it. Beginning the task again would fence out the running attempt, and with two
workers each attempt would fence out the last forever; so the message is put back for a
lease instead, the running attempt finishes and records its result, and the next
delivery finds the task final. After ``max_deliveries`` lapses of attempts that did not
survive, the task fails with DeliveryLimitExceeded and its message is dead-lettered.
"""
from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
import traceback as _tb
import uuid
from typing import Any, Iterable

from . import builtin, capture, serialization, shipping, states, workflow
from .broker import Delivery, queue_list
from .engine import Claim, Outcome, decode
from .errors import DeliveryLimitExceeded, MessageError, NotRegistered, Retry, SerializationError, WorkerLostError
from .events import WorkerEvents
from .retry import next_delay
from .signature import decode_body, encode_body

log = logging.getLogger(__name__)


_MISSING = object()
STARTED_AFTER = 0.1  # a task running this long is recorded as STARTED (shorter ones go RECEIVED -> result)
GROUP_COMMIT = 0.01  # finished tasks of a batch are committed together once the oldest has waited this long
STALE_FLUSH = 0.05   # ... or by the heartbeat thread, when the executor is busy with a long task
STEAL_AFTER = 0.2    # an idle executor takes the unstarted batch-mates of a task running this long


def _text(exc: BaseException) -> str:
    """``str(exc)``, storable (see ``_safe_text``) even when ``str()`` itself fails."""
    try:
        return _safe_text(str(exc)) or ""
    except Exception:
        return f"<{type(exc).__name__} whose message cannot be shown>"


def _describe(exc: BaseException) -> str:
    """``Type: message`` of an exception (see ``_text``)."""
    text = _text(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _safe_text(text: str | None) -> str | None:
    """``text`` with what UTF-8 cannot encode (lone surrogates) escaped as ``\\udxxx``, so
    an error message, traceback or captured output can always be stored."""
    if not text:
        return text
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


class _ResultNotStored(Exception):
    """Storing a task's result failed for a reason of the result's own (its ``__cause__``)."""
REVOKE_CHECK = 0.02  # a batch's unstarted tasks are checked in the store for revocations once earlier ones took this long


class _Prepared:
    """A reserved batch, decoded and begun: (delivery, message) pairs, tokens, malformed ones."""

    __slots__ = ("messages", "malformed", "tokens")

    def __init__(self) -> None:
        self.messages: list[tuple[Delivery, dict]] = []
        self.malformed: list[tuple[Delivery, str]] = []
        self.tokens: dict = {}


def _prepared(claims: list[Claim]) -> _Prepared:
    """A batch's claims as the worker runs them (a task not begun by the claim is begun, or
    not, when its turn comes: see ``Worker._execute``)."""
    prep = _Prepared()
    for c in claims:
        if c.message is None:
            prep.malformed.append((c.delivery, c.reason or "malformed message"))
        else:
            prep.messages.append((c.delivery, c.message))
            if c.begun:
                prep.tokens[c.message["id"]] = c.token
    return prep


class _Batch:
    """Finish steps of one batch, committed together when broker and backend share a store.

    A step that fails inside the shared transaction rolls it back; the steps are then
    run again one transaction each, and a delivery whose own step still fails is
    dead-lettered with the reason (unless the store itself is unreachable: then its
    lease brings it back), so one bad message never holds back the others.
    """

    def __init__(self, worker: "Worker", local: list):
        self.app = worker.app
        self.worker = worker
        self.grouped = worker.group_commit
        self.local = local
        self.ops: list = []         # (step, delivery)
        self.plain: list = []       # successes nothing follows: (delivery, id, token, fields)
        self.acks: list = []        # deliveries whose finish is done, acknowledged at the next flush (see ack)
        self.members: list = []     # group members nothing else follows: (delivery, id, token, fields, message, cont)
        self.first = 0.0            # when the oldest pending step was added
        self.todo: list = []        # (delivery, message) not started yet; see give_away
        self.tokens: dict = {}      # task id -> fencing token, for the messages of this batch
        self.given: set = set()     # id() of the deliveries given away to another executor
        self.begun: dict = {}       # id(delivery) -> (message, token) once begun; see give_up
        self.closed = False         # the batch is finishing: nothing more is given away
        self.lock = threading.Lock()
        # one flush at a time: the executor's last flush must see follow-ups a heartbeat
        # flush reserved (lock order: this, then the store's write lock)
        self.flushing = threading.Lock()
        self.store_errors = worker.store_errors

    def send(self, outs: list) -> None:
        """Publish follow-ups of this batch's tasks: the ones this worker runs next are taken
        (``Engine.run_next``), the others published as usual."""
        rest = self.worker._take_local(outs, self.local) if self.worker.local_follow_ups else outs
        if rest:
            self.app.engine.publish(rest)

    def add(self, op, delivery: Delivery) -> None:
        if not self.grouped:
            self._run_alone(op, delivery)
            return
        self._queue(self.ops, (op, delivery))

    def _pending(self) -> bool:
        return bool(self.ops or self.plain or self.acks or self.members)

    def take_next(self) -> "tuple[Delivery, dict] | None":
        """The next unstarted (delivery, message) of this batch, for its own executor."""
        with self.lock:
            return self.todo.pop(0) if self.todo else None

    def give_away(self) -> "tuple[list[Delivery], _Prepared] | None":
        """For an idle executor while this batch's thread is busy with a long task: the
        batch's unstarted messages (with their fencing tokens), or else the first batch of
        follow-ups this worker published to itself (unless a flush, which may still roll
        them back, is under way); None when there is nothing to give."""
        with self.lock:
            if self.closed:
                return None
            taken, self.todo = self.todo, []
            if taken:
                self.given.update(id(d) for d, _ in taken)
            elif self.local and self.flushing.acquire(blocking=False):
                try:
                    return self.local.pop(0) if self.local else None
                finally:
                    self.flushing.release()
        if not taken:
            return None
        prep = _Prepared()
        prep.messages = taken
        prep.tokens = {m["id"]: self.tokens[m["id"]] for _, m in taken if m["id"] in self.tokens}
        return [d for d, _ in taken], prep

    def pending(self) -> list:
        """The unstarted (delivery, message) pairs left, without taking them."""
        with self.lock:
            return list(self.todo)

    def give_away_all(self) -> list:
        """Every unstarted (delivery, message) left, for the batch's own thread (stopping)."""
        with self.lock:
            taken, self.todo = self.todo, []
        return taken

    def close(self) -> None:
        """Give nothing more away: the batch's own thread finishes what is left."""
        with self.lock:
            self.closed = True

    def _queue(self, pending: list, item) -> None:
        """Add ``item`` to one of the pending lists, noting when the oldest pending item came."""
        with self.lock:
            if not self._pending():
                self.first = time.monotonic()
            pending.append(item)

    def add_plain(self, delivery: Delivery, task_id: str, token: int, fields: dict) -> None:
        self._queue(self.plain, (delivery, task_id, token, fields))

    def add_member(self, delivery: Delivery, task_id: str, token: int, fields: dict, message: dict, cont: dict) -> None:
        """A successful group member nothing else follows (``workflow.lone_member``): stored
        and counted with the plain results in one round trip, acknowledged once its advance
        (the group's completion, for the last one) is done."""
        self._queue(self.members, (delivery, task_id, token, fields, message, cont))

    def ack(self, delivery: Delivery) -> None:
        """Acknowledge a delivery whose finish (result, follow-ups) is done. Inside a group
        commit at once; otherwise with the batch's next flush, in the round trip that stores
        the plain results (a worker dying first only means a redelivery, which finds the
        task final and repeats nothing but its follow-ups, as for any redelivery)."""
        if self.grouped:
            self.app.broker.ack(delivery)
        else:
            self._queue(self.acks, delivery)

    def waiting(self) -> float:
        """Seconds the oldest pending step has waited (0 when none)."""
        with self.lock:
            return time.monotonic() - self.first if self._pending() else 0.0

    def flush(self, claim_next: bool = False) -> None:
        """Commit what is pending; safe from the executor and the heartbeat thread alike.

        ``claim_next`` (the executor's last flush of a batch): claim its next batch in the
        same transaction, one commit fewer per batch; ``Worker.reserve`` returns it.
        """
        with self.flushing:
            self._flush(claim_next)

    def _flush(self, claim_next: bool = False) -> None:
        with self.lock:
            ops, self.ops = self.ops, []
            plain, self.plain = self.plain, []
            acks, self.acks = self.acks, []
            members, self.members = self.members, []
        if not ops and not plain and not acks and not members:
            return
        try:
            claimed = None
            with self.app.transaction():
                for op, _ in ops:
                    op()
                if plain or acks or members:
                    self._finish_plain(plain, acks, members)
                if claim_next and not self.local:
                    claimed = self.worker._claim_now()
            if claimed:
                self.worker._claimed.next = claimed
            return
        except Exception:
            log.warning("worker %s: finishing %d task(s) together failed; finishing them one by one",
                        self.worker.name, len(ops) + len(plain), exc_info=True)
            self._forget_local()
        for op, delivery in ops:
            self._run_alone(op, delivery)
        if plain or acks or members:
            self._finish_plain_alone(plain, acks, members)

    def _forget_local(self) -> None:
        """Follow-ups reserved in a transaction that rolled back were never stored. Where no
        transaction spans the finish (Redis) they were: hand them back to the queue at once."""
        for deliveries, _ in self.local:
            for d in deliveries:
                if not self.grouped:
                    try:
                        self.app.broker.release(d)
                    except Exception:
                        log.warning("could not hand back %s; it returns when its lease runs out", d.message_id, exc_info=True)
                self.worker._unhold(d)
        self.local.clear()

    def _run_alone(self, op, delivery: Delivery) -> None:
        try:
            with self.app.transaction():
                op()
        except self.store_errors:  # the store, not the message: redeliver
            self._forget_local()
            log.exception("worker %s: finishing %s failed; its message will be redelivered", self.worker.name, delivery.message_id)
        except _ResultNotStored as exc:
            self._forget_local()
            self.give_up(delivery, exc.__cause__ or exc, "storing the result of", dead_letter=False)
        except Exception as exc:
            self._forget_local()
            self.give_up(delivery, exc, "finishing")

    def _finish_plain_alone(self, plain: list, acks: list, members: list) -> None:
        """``_finish_plain`` one result at a time, after the batch's round trip failed: a
        result that cannot be stored fails its own task (``give_up``), not its batch-mates."""
        parts = [([p], [], []) for p in plain] + [([], [], [m]) for m in members] + ([([], acks, [])] if acks else [])
        for one, ack, member in parts:
            delivery = (one or member)[0][0] if one or member else None
            try:
                with self.app.transaction():
                    self._finish_plain(one, ack, member)
            except self.store_errors:
                self._forget_local()
                log.exception("worker %s: storing a result failed; its message will be redelivered", self.worker.name)
            except Exception as exc:
                self._forget_local()
                if delivery is None:
                    log.exception("worker %s: acknowledging %d finished message(s) failed; they will be redelivered", self.worker.name, len(ack))
                else:
                    self.give_up(delivery, exc, "storing the result of", dead_letter=False)

    def give_up(self, delivery: Delivery, exc: BaseException, what: str, *, dead_letter: bool = True) -> None:
        """Settle a delivery whose own bookkeeping failed (not the store: see Engine.store_errors),
        so it is not run again at every lease. Its task is recorded FAILURE with the reason
        unless its record is final already (error callbacks and workflows follow, as for any
        failure), and the message is dead-lettered with the reason; with ``dead_letter``
        False a recorded failure is acknowledged instead (the record tells the whole story).
        ``what`` names the step that failed ("storing the result of"). Never raises."""
        app, worker = self.app, self.worker
        message, token = self.begun.get(id(delivery), (None, None))
        name = f"task {message['name']!r} ({message['id']})" if message is not None else f"message {delivery.message_id}"
        exc_type, reason = type(exc).__name__, f"{what} {name} failed: {_describe(exc)}"
        log.error("worker %s: %s", worker.name, reason, exc_info=exc)
        recorded = False
        if message is not None and token is not None:
            for follow in (True, False):       # with its error callbacks, else the record alone
                try:
                    with app.transaction():
                        recorded = app.backend.store_result(message["id"], states.FAILURE, token=token, exc_type=exc_type, error=reason,
                                                            retries=message.get("retries", 0))
                        if recorded and follow:
                            workflow.on_failure(app, message, exc_type, reason, send=self.send)
                        if recorded and not dead_letter:
                            app.broker.ack(delivery)
                    break
                except self.store_errors:
                    log.exception("worker %s: recording the failure of %s failed; its message will be redelivered", worker.name, name)
                    return
                except Exception:
                    recorded = False
                    self._forget_local()
                    log.exception("worker %s: recording the failure of %s failed", worker.name, name)
            if recorded:
                worker._count(failed=1)
                if not dead_letter:
                    return
        try:
            app.broker.reject(delivery, reason)
        except Exception:
            log.exception("worker %s: could not dead-letter %s; its lease will bring it back", worker.name, delivery.message_id)

    def _finish_plain(self, plain: list, acks: list = (), members: list = ()) -> None:
        """Store the results, then acknowledge them and ``acks`` (finished already): one
        round trip for the lot where the engine allows. ``members`` (see ``add_member``) are
        stored and counted in that round trip; their advance follows, then their acks."""
        app = self.app
        outcomes = [Outcome(d, task_id, states.SUCCESS, token, fields) for d, task_id, token, fields in plain]
        outcomes += [Outcome(d, task_id, states.SUCCESS, token, fields, group=cont["group"]) for d, task_id, token, fields, _, cont in members]
        finished = app.engine.finish(outcomes, [d for d, _, _, _ in plain] + list(acks))
        self.worker._count(processed=sum(finished.stored))
        if not members:
            return
        for (_, task_id, _, _, message, cont), ok, count in zip(members, finished.stored[len(plain):], finished.counts):
            if not ok:   # revoked meanwhile (or stored by another attempt): end its workflow as the record says
                workflow.after_final(app, message, app.backend.get(task_id) or {}, send=self.send)
                continue
            if count is None:
                log.warning("task %s finished, but its group %s is gone; nothing follows it", task_id, cont["group"])
                continue
            if ok and count[0] < 0:
                # stored, yet not SUCCESS when counted: only if the server ran the count first
                # (a script it had lost, run again after the rest of the pipeline)
                count = app.backend.member_done(cont["group"], task_id)
            workflow.member_counted(app, message, cont, *count, send=self.send)
        app.broker.ack_many([d for d, _, _, _, _, _ in members])


class Worker:
    def __init__(self, app, concurrency: int = 1, queues: str | Iterable[str] | None = None, *, name: str | None = None,
                 prefetch: int | None = None, allow_cells: bool = False, echo_output: bool = False, heartbeat_interval: float | None = None,
                 local_follow_ups: bool = True, unknown_grace: float = 0.0,
                 beat: bool = False, pool: str = "threads", allow_code: bool = False, max_tasks_per_child: int | None = None,
                 max_memory_per_child: int | None = None, shutdown_grace: float = 30.0):
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        if pool not in ("threads", "processes"):
            raise ValueError(f"pool must be 'threads' or 'processes', not {pool!r}")
        self.app = app
        self.concurrency = int(concurrency)
        self.queues = queue_list(queues) if queues else [app.default_queue]
        self.name = name or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.prefetch = max(1, int(prefetch if prefetch is not None else app.config.option("prefetch")))
        self.allow_cells = allow_cells
        self.echo_output = echo_output
        self.beat = beat                               # also run the App's periodic-task scheduler (schedule.py)
        # -- the process pool (pool.py) and shipped notebook functions (shipping.py) --
        self.allow_code = allow_code                   # run functions shipped from notebooks (--allow-code)
        self.pool = None                               # pool="processes": each executor thread drives one child
        if pool == "processes":
            from .pool import ProcessPool

            self.pool = ProcessPool(self.concurrency, max_tasks_per_child=max_tasks_per_child, max_memory_per_child=max_memory_per_child)
        self.shutdown_grace = shutdown_grace           # seconds running children may finish once the worker stops
        if allow_code or shipping.interactive() or any(shipping.defined_in_notebook(t.fn) for t in list(app.registry.values())):
            self.serve_code_queues()
        self.lease = app.visibility_timeout
        self.heartbeat_interval = heartbeat_interval or max(0.05, min(self.lease / 3.0, 5.0))
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._held: dict[int, Delivery] = {}          # reserved and not yet finished, for lease extension
        self._running: dict[str, dict] = {}            # task id -> {"started": t, "time_limit": s, "token": n}
        self._held_lock = threading.Lock()
        self._batches: set = set()                     # batches being run, for the heartbeat's stale flush
        self._claimed = threading.local()              # .next: a batch claimed in the last one's commit
        self.processed = 0                             # tasks recorded SUCCESS (see _count)
        self.failed = 0                                # ... and FAILURE
        self._count_lock = threading.Lock()
        self.crashed = False                           # every executor thread died (see _executors_died)
        self.waiting = 0                               # executor threads held by a task waiting for a result (result.py)
        self._wait_lock = threading.Lock()             # one such wait decided at a time (see holding_thread)
        self._revoked: set = set()                     # ids revoked by this process's App (see note_revoked)
        self._workers_seen: tuple[float, list] = (0.0, [])   # other workers' heartbeats, read for unknown task names
        engine = app.engine
        #: errors of the stores themselves: a message whose finish fails with one is left to its
        #: lease and delivered again; any other error fails that message alone
        self.store_errors = engine.store_errors
        # finished tasks of a batch are committed together where one transaction spans both stores
        self.group_commit = engine.shares_transaction
        # a finished group member nothing else follows is counted in the round trip storing it
        self.counts_members = engine.counts_members
        # run our own follow-ups next (chain steps, chord callbacks) where the engine can
        # publish them already claimed by us (their lease covers a crash before they run)
        self.local_follow_ups = local_follow_ups and engine.runs_next
        # a notebook kernel defines its tasks in cells that may run after the worker starts
        # (a restarted kernel): for this long, a message sent before it started whose task
        # it does not know yet is handed back (see _leave_unknown)
        self.unknown_grace = float(unknown_grace)
        self._born = app.clock.time()
        self._pid = os.getpid()
        self.events = WorkerEvents()                   # hooks around each task run (metrics, tracing)

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> "Worker":
        if self._threads:
            return self
        capture.install(echo=self.echo_output)
        self._stopping.clear()
        if self.pool is not None:
            self.pool.start()
        for i in range(self.concurrency):
            t = threading.Thread(target=self._executor_loop, name=f"nbqueue-worker-{i}", daemon=True)
            self._threads.append(t)
        hb = threading.Thread(target=self._heartbeat_loop, name="nbqueue-heartbeat", daemon=True)
        self._threads.append(hb)
        for t in self._threads:
            t.start()
        self.app._worker_started(self)
        self.announce()
        if self.beat:
            self.app.scheduler().start()
        log.info("worker %s started: %d %s, queues %s", self.name, self.concurrency, "child process(es)" if self.pool else "thread(s)",
                 ",".join(self.queues))
        return self

    def run(self) -> None:
        """Start and block until stop() is called (from another thread or a signal handler)."""
        self.start()
        while not self._stopping.is_set():
            self._stopping.wait(0.5)
        if not self.join(self.shutdown_grace if self.pool is not None else None):
            self.join()

    def stop(self, wait: bool = True, timeout: float | None = None) -> None:
        """Stop taking tasks; running ones finish; reserved but unstarted ones go back at once."""
        if os.getpid() != self._pid:       # a forked child's copy of its parent's worker: it runs in the parent
            self._threads = []
            self.app._worker_stopped(self)
            return
        self._stopping.set()
        if self.beat:
            self.app.scheduler().stop(wait=wait, timeout=timeout)
        self.app.broker.wake()
        if wait:
            self.join(timeout)

    def join(self, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        for t in self._threads:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            t.join(remaining)
        alive = any(t.is_alive() for t in self._threads)
        if alive and self.pool is not None and self._stopping.is_set() and timeout is not None:
            # past the grace period: stop the running children; their tasks go back to the queue
            if self.pool.stop_running("the worker stopped before the task finished"):
                for t in self._threads:
                    t.join(self.pool.kill_grace + 10)
                alive = any(t.is_alive() for t in self._threads)
        if not alive and self._threads:
            self._threads = []
            if self.pool is not None:
                self.pool.close()
            self.app._worker_stopped(self)
            if os.getpid() == self._pid:   # in a forked child, the worker is the parent's: it goes on there
                try:
                    self.app.backend.worker_gone(self.name)
                except Exception:
                    log.debug("could not remove worker heartbeat", exc_info=True)
        return not alive

    @property
    def running(self) -> bool:
        return any(t.is_alive() for t in self._threads)

    def _count(self, processed: int = 0, failed: int = 0) -> None:
        """Add to the counters: executor and heartbeat threads finish tasks concurrently."""
        with self._count_lock:
            self.processed += processed
            self.failed += failed

    # -- the steppable core ---------------------------------------------------------------------
    def step(self, now: float | None = None, limit: int | None = None) -> int:
        """Reserve what is due and process it in this thread; returns how many were processed."""
        deliveries, prep = self.reserve(0, limit or self.concurrency)
        if deliveries:
            self.process_batch(deliveries, prep)
        return len(deliveries)

    def drain(self, timeout: float = 10.0) -> int:
        """Process until the queues stay empty (for tests and scripts)."""
        total, deadline = 0, time.monotonic() + timeout
        while time.monotonic() < deadline:
            deliveries, prep = self.reserve(0.05, self.concurrency)
            if not deliveries:
                break
            self.process_batch(deliveries, prep)
            total += len(deliveries)
        return total

    def _executor_loop(self) -> None:
        backoff = 0.1
        while not self._stopping.is_set():
            # (a batch claimed in the last commit comes first: it is not held, its lease not extended)
            taken = self._steal() if getattr(self._claimed, "next", None) is None else None
            if taken is not None:
                deliveries, prep = taken
            else:
                try:
                    deliveries, prep = self.reserve(0.25, self.prefetch)  # short, so stop() is prompt
                    backoff = 0.1
                except Exception as exc:
                    log.warning("worker %s: reserve failed (%s); retrying in %.1fs", self.name, exc, backoff)
                    self._stopping.wait(backoff)
                    backoff = min(backoff * 2, 10.0)
                    continue
            if deliveries:
                self._hold(deliveries)
                try:
                    self.process_batch(deliveries, prep)
                except Exception:
                    log.exception("worker %s: unexpected error in a batch of %d; its messages will be redelivered", self.name, len(deliveries))
        claimed = getattr(self._claimed, "next", None)
        if claimed is not None:   # claimed as the worker was told to stop: handed back, unstarted
            self._claimed.next = None
            self._hold(claimed[0])
            self.process_batch(*claimed)

    def _steal(self) -> "tuple[list[Delivery], _Prepared] | None":
        """What another executor's batch has not started while its thread has been running
        one task for ``STEAL_AFTER`` (see ``_Batch.give_away``), or None: a task reserved
        with a long-running one does not wait for it while this thread is idle."""
        now = time.monotonic()
        with self._held_lock:
            batches = [run["batch"] for run in self._running.values() if run.get("batch") is not None and now - run["started"] >= STEAL_AFTER]
        for batch in batches:
            taken = batch.give_away()
            if taken is not None:
                log.debug("worker %s: taking %d unstarted message(s) from a batch busy with a long task", self.name, len(taken[0]))
                return taken
        return None

    def _executors_alive(self) -> int:
        return sum(t.is_alive() for t in self._threads if t.name.startswith("nbqueue-worker-"))

    def _executors_died(self) -> None:
        """Every executor thread has died (a fault of the worker itself, logged where it
        happened): stop reporting this worker alive, hand back what it held, and stop, so
        ``run()`` (and ``nbqueue worker``) returns instead of holding its queues silently."""
        log.error("worker %s: all %d executor thread(s) died; the worker stops", self.name, self.concurrency)
        self.crashed = True
        self._stopping.set()
        with self._held_lock:
            held = list(self._held.values())
        self._hand_back(held)
        try:
            self.app.backend.worker_gone(self.name)
        except Exception:
            log.debug("could not remove worker heartbeat", exc_info=True)

    def _hold(self, deliveries: list[Delivery]) -> None:
        with self._held_lock:
            for d in deliveries:
                self._held[id(d)] = d

    def _unhold(self, d: Delivery) -> None:
        with self._held_lock:
            self._held.pop(id(d), None)

    def _hand_back(self, deliveries: list[Delivery]) -> None:
        self.app.engine.hand_back(deliveries)
        for d in deliveries:
            self._unhold(d)

    def _heartbeat_loop(self) -> None:
        """Every 0.1 s while tasks run: STARTED states, live output, time limits.
        Every ``heartbeat_interval``: lease extensions and the worker's heartbeat record."""
        next_beat, next_upkeep = 0.0, time.monotonic() + 0.5   # no checkpoint at start: work comes first
        reported_alive = self.concurrency
        while True:
            alive = self._executors_alive()
            if not alive and not self._stopping.is_set():
                self._executors_died()
                return
            try:
                with self._held_lock:
                    running = dict(self._running)
                for task_id, run in running.items():
                    try:
                        self._watch_running(task_id, run)
                    except Exception:
                        log.warning("worker %s: watching task %s failed", self.name, task_id, exc_info=True)
                self._flush_stale()
                if time.monotonic() >= next_beat:
                    next_beat = time.monotonic() + self.heartbeat_interval
                    with self._held_lock:
                        held = list(self._held.values())
                    for d in held:
                        self.app.broker.extend(d, self.lease)
                    if alive < reported_alive and not self._stopping.is_set():
                        log.error("worker %s: %d of %d executor thread(s) died", self.name, self.concurrency - alive, self.concurrency)
                    reported_alive = alive
                    self._beat(len(running))
                    self._settle_revoked(running)
            except Exception:
                log.warning("worker %s: heartbeat failed", self.name, exc_info=True)
            if time.monotonic() >= next_upkeep:
                next_upkeep = time.monotonic() + 0.5
                try:
                    self.app.broker.upkeep()
                    self.app.backend.upkeep()       # expired results go without a scheduler
                except Exception:
                    log.debug("worker %s: broker upkeep failed", self.name, exc_info=True)
            if self._stopping.is_set() and not any(t.is_alive() for t in self._threads if t is not threading.current_thread()):
                return
            self._stopping.wait(min(STARTED_AFTER, self.heartbeat_interval)) if not self._stopping.is_set() else time.sleep(0.05)

    def _beat(self, running: int) -> None:
        """Write this worker's heartbeat: who it is, its queues and threads, the task names it
        has registered (so a worker lacking one leaves its messages to this one, and waiters
        can tell when no live worker can run a task) and its threads held waiting in a task."""
        with self._held_lock:
            holding = sorted({d.message_id for d in self._held.values()})     # see _attempt_alive
        info = {"host": socket.gethostname(), "pid": os.getpid(), "queues": self.queues,
                "concurrency": self._executors_alive() if self._threads else self.concurrency,
                "heartbeat_interval": self.heartbeat_interval, "holding": holding,
                "running": running, "processed": self.processed, "waiting": self.waiting, "tasks": sorted(list(self.app.registry)),
                "pool": "processes" if self.pool is not None else "threads", "allow_code": self.allow_code, "origin": builtin.PROCESS_TOKEN}
        self.app.backend.heartbeat(self.name, info, ttl=max(3 * self.heartbeat_interval, 2.0))

    def announce(self) -> None:
        """Write the heartbeat now (at start, and when the App registers a task), not at the next beat."""
        if not self.running:
            return
        with self._held_lock:
            running = len(self._running)
        try:
            self._beat(running)
        except Exception:
            log.warning("worker %s: heartbeat failed", self.name, exc_info=True)

    @contextlib.contextmanager
    def holding_thread(self, check=None):
        """Around a wait for another task's result inside a task of this worker (result.py):
        an executor thread of this worker counts as held (``waiting``) while it waits.
        ``check()`` (which may raise) runs once the thread counts, one thread at a time, so
        of two threads starting to wait together the second sees the first as held."""
        mine = threading.current_thread() in self._threads
        with self._wait_lock:
            if mine:
                with self._held_lock:
                    self.waiting += 1
            try:
                if check is not None:
                    check()
            except BaseException:
                if mine:
                    with self._held_lock:
                        self.waiting -= 1
                raise
        try:
            yield
        finally:
            if mine:
                with self._held_lock:
                    self.waiting -= 1

    def _settle_revoked(self, running: dict) -> None:
        """End the workflows of running tasks revoked meanwhile (``App.revoke``), at once rather
        than when the task returns (its late result is fenced out then): the chord fails, the
        rest of a chain is recorded as not run."""
        started = [task_id for task_id, run in running.items() if not run.get("revoked")]
        if not started:
            return
        found = self.app.backend.states_of(started)
        for task_id in started:
            if found.get(task_id) == states.REVOKED:
                run = running[task_id]
                run["revoked"] = True
                workflow.after_final(self.app, run["message"], self.app.backend.get(task_id) or {})

    def _flush_stale(self) -> None:
        """Commit finished tasks that wait in a batch whose executor is busy with a long task,
        so a result never waits for a slow batch-mate longer than a heartbeat tick."""
        with self._held_lock:
            batches = list(self._batches)
        for batch in batches:
            if batch.waiting() >= STALE_FLUSH:
                batch.flush()

    def _watch_running(self, task_id: str, run: dict) -> None:
        if time.monotonic() - run["started"] < STARTED_AFTER:
            return
        fields = {}
        if not run.get("marked"):
            run["marked"] = True
            self.app.backend.set_state(task_id, states.STARTED, token=run["token"], started_at=run["started_at"])
        text = capture.peek(task_id)
        if text and text != run.get("flushed"):
            fields["output"] = _safe_text(text)
            run["flushed"] = text
        if fields:
            self.app.backend.update(task_id, **fields)
        self._enforce_time_limit(task_id, run)

    def _enforce_time_limit(self, task_id: str, run: dict) -> None:
        limit = run.get("time_limit")
        if not limit or time.monotonic() - run["started"] <= limit:
            return
        if self.pool is not None and not run["message"]["name"].startswith("nbqueue."):
            return   # in a child process: the pool stops it at its limit (a hard limit)
        # A thread cannot be killed: the task is failed now, its late result is fenced out.
        if self.app.backend.store_result(task_id, states.FAILURE, token=run["token"], exc_type="TimeLimitExceeded",
                                         error=f"task ran longer than its time limit of {limit:g}s", output=_safe_text(capture.peek(task_id))):
            self._count(failed=1)
            workflow.on_failure(self.app, run["message"], "TimeLimitExceeded", f"time limit of {limit:g}s exceeded")

    # -- deliveries -------------------------------------------------------------------------------
    def process(self, delivery: Delivery) -> None:
        """Run one delivery to completion; never raises (a bad message cannot stop a worker)."""
        self.process_batch([delivery])

    def process_batch(self, deliveries: list[Delivery], prep: "_Prepared | None" = None) -> None:
        """Run reserved deliveries in order in this thread; never raises.

        One write marks the batch RECEIVED and hands out fencing tokens (on SQLite in the
        claim's own transaction, on Redis in the claim script, see ``reserve``). Finished
        tasks (result, follow-ups, ack) are committed together once the oldest has waited
        ``GROUP_COMMIT``, and by the heartbeat thread when the executor is busy with a long
        task, so a result waits for a slow batch-mate at most a heartbeat tick.
        """
        queue = [(deliveries, prep)]
        while queue:
            deliveries, prep = queue.pop(0)
            local: list = []
            self._run_batch(deliveries, prep, local)
            # follow-ups this worker published to itself (the next chain step, a chord's
            # callback) run next, without another claim
            queue.extend(local)

    def _run_batch(self, deliveries: list[Delivery], prep: "_Prepared | None", local: list) -> None:
        batch = _Batch(self, local)
        with self._held_lock:
            self._batches.add(batch)
        try:
            if prep is None:
                prep = self._prepare(deliveries)
            checked = time.monotonic()
            for delivery, reason in prep.malformed:
                self._dead_letter(delivery, reason, batch)
            batch.tokens = prep.tokens
            batch.todo, copies = self._distinct(prep.messages)
            while (item := batch.take_next()) is not None:
                delivery, message = item
                if self._stopping.is_set() and threading.current_thread() in self._threads:
                    unstarted = [item] + batch.give_away_all()
                    self._hand_back([d for d, _ in unstarted])    # not started: PENDING again, not "received"
                    break
                if batch.waiting() >= GROUP_COMMIT:
                    batch.flush()   # finished tasks wait at most GROUP_COMMIT (or the heartbeat's flush, see _flush_stale)
                if time.monotonic() - checked >= REVOKE_CHECK:
                    checked = time.monotonic()
                    self._skip_revoked(prep, [item] + batch.pending())
                if self._revoked and self._revoked_here(message["id"]):
                    prep.tokens[message["id"]] = None
                try:
                    self._execute(delivery, message, prep.tokens.get(message["id"], _MISSING), batch)
                except self.store_errors:
                    log.exception("worker %s: processing %s failed; it will be redelivered", self.name, delivery.message_id)
                except KeyboardInterrupt:       # Ctrl-C in a thread that steps the worker itself (drain())
                    raise
                except BaseException as exc:    # the worker's own bookkeeping: this message fails, not the thread
                    batch.give_up(delivery, exc, "processing")
            for copy in copies:     # once the first copy is settled: a no-op where a copy was the same message
                batch.add(lambda d=copy: batch.ack(d), copy)
        except Exception:
            log.exception("worker %s: unexpected error in a batch of %d; its messages will be redelivered", self.name, len(deliveries))
        finally:
            batch.close()
            try:
                # an executor thread claims its next batch in this commit (where broker and
                # backend share a transaction and nothing local runs next)
                batch.flush(claim_next=self.group_commit and threading.current_thread() in self._threads and not self._stopping.is_set())
            except Exception:
                log.exception("worker %s: finishing a batch failed; its messages will be redelivered", self.name)
                batch._forget_local()
            with self._held_lock:
                self._batches.discard(batch)
            for d in deliveries:
                if id(d) not in batch.given:    # those are held by the executor that took them
                    self._unhold(d)

    def _distinct(self, messages: list[tuple[Delivery, dict]]) -> tuple[list[tuple[Delivery, dict]], list[Delivery]]:
        """``messages`` with one delivery per task id, and the deliveries of further copies:
        a message published twice where the broker keeps both (RabbitMQ) runs once, and its
        other copies are acknowledged after the batch (the first copy's delivery stands for
        the task until it is finished)."""
        seen: set = set()
        out, copies = [], []
        for delivery, message in messages:
            if message["id"] in seen:
                log.warning("worker %s: task %s (%s) is in this batch twice; running it once", self.name, message["name"], message["id"])
                copies.append(delivery)
                continue
            seen.add(message["id"])
            out.append((delivery, message))
        return out, copies

    def note_revoked(self, task_id: str) -> None:
        """``App.revoke`` in this process: a batch holding the task skips it without asking the store."""
        with self._held_lock:
            if len(self._revoked) > 10_000:
                self._revoked.clear()
            self._revoked.add(task_id)

    def _revoked_here(self, task_id: str) -> bool:
        with self._held_lock:
            if task_id in self._revoked:
                self._revoked.discard(task_id)
                return True
        return False

    def _skip_revoked(self, prep: "_Prepared", unstarted: list) -> None:
        """Tasks of a batch not started yet (``unstarted``: (delivery, message) pairs) may have
        been revoked (in another process) since they were reserved: forget their tokens, so
        they are settled as final (ending their workflows), not run."""
        waiting = [m["id"] for _, m in unstarted if prep.tokens.get(m["id"])]
        if not waiting:
            return
        found = self.app.backend.states_of(waiting)
        for task_id in waiting:
            if found.get(task_id) in states.READY_STATES:
                prep.tokens[task_id] = None

    def _take_local(self, outs: list, local: list) -> list:
        """Claim for this worker the follow-ups it can run next (``Engine.run_next``); return the others."""
        if local or not self.local_follow_ups or self._stopping.is_set():
            return outs
        now = self.app.clock.time()
        mine = [o for o in outs if o.queue in self.queues and (o.eta is None or o.eta <= now)][: self.prefetch]
        if not mine:
            return outs
        claims = self.app.engine.run_next(mine, lease=self.lease, worker=self.name, begins=self._begins)
        if claims:
            deliveries = [c.delivery for c in claims]
            self._hold(deliveries)
            local.append((deliveries, _prepared(claims)))
        taken = {o.id for o in mine}
        return [o for o in outs if o.id not in taken]

    def _claim_now(self) -> "tuple[list[Delivery], _Prepared] | None":
        """Claim a batch inside the caller's transaction (see ``_Batch.flush``), without waiting."""
        deliveries, prep = self.reserve(0, self.prefetch)
        return (deliveries, prep) if deliveries else None

    def reserve(self, timeout: float, limit: int) -> tuple[list[Delivery], "_Prepared | None"]:
        """Claim a batch (``Engine.claim``): decoded messages and fencing tokens. A batch this
        thread claimed while committing its last one comes first."""
        claimed = getattr(self._claimed, "next", None)
        if claimed is not None:
            self._claimed.next = None
            return claimed
        claims = self.app.engine.claim(self.queues, limit=limit, timeout=timeout, lease=self.lease, worker=self.name,
                                       begins=self._begins, handoff=self.group_commit and not self._stopping.is_set())
        if not claims:
            return [], None
        return [c.delivery for c in claims], _prepared(claims)

    def _prepare(self, deliveries: list[Delivery]) -> "_Prepared":
        """Decode deliveries handed to ``process_batch`` unclaimed and begin their tasks."""
        return _prepared(self.app.engine.begin(decode(deliveries), self.name, self._begins))

    def _begins(self, message: dict) -> bool:
        """Whether a claim begins this task: one this worker runs, or may fail as not registered."""
        return message["name"] in self.app.registry or not message.get("ignore_when_not_registered")

    def _execute(self, delivery: Delivery, message: dict, token: Any, batch: "_Batch") -> None:
        app = self.app
        task_id, name = message["id"], message["name"]
        task = app.registry.get(name)
        if task is None and message.get("ignore_when_not_registered"):
            log.warning("dropping task %s (%s): not registered on this worker and ignore_when_not_registered is set", name, task_id)
            batch.add(lambda: batch.ack(delivery), delivery)
            return
        if token is _MISSING:
            if delivery.after_lapse and self._settled_after_lapse(delivery, message, batch):
                return
            token = app.backend.begin(task_id, worker=self.name, fields={"retries": message.get("retries", 0), "name": name, "queue": delivery.queue})
        batch.begun[id(delivery)] = (message, token)
        if token is None:
            # already final: an earlier attempt stored it (or it was revoked); repeat its follow-ups
            def settle() -> None:
                workflow.after_final(app, message, app.backend.get(task_id) or {}, send=batch.send)
                batch.ack(delivery)

            batch.add(settle, delivery)
            return
        if "code" in message:   # a function shipped from a notebook: run by name, or its code only with allow_code
            task = shipping.task_for(self, message, task, delivery.queue)
            if task is shipping.HAND_BACK:    # another live worker runs it
                self._requeue(delivery, message, token, batch, delay=1.0)
                return
        if task is None:
            delay = self._leave_unknown(name, delivery.queue, message)
            if delay is not None:
                def hand_back() -> None:
                    if app.backend.set_state(task_id, states.PENDING, token=token):
                        app.broker.retry(delivery, eta=app.clock.time() + delay)
                    else:
                        batch.ack(delivery)

                batch.add(hand_back, delivery)
                return
            known = ", ".join(sorted(n for n in app.registry if not n.startswith("nbqueue."))) or "none"
            self._fail(delivery, message, token, NotRegistered(
                f"task {name!r} is not registered on this worker nor on any live worker of queue {delivery.queue!r} "
                f"(registered here: {known})"), batch)
            return
        refusal = self._refusal(task, message)
        if refusal is not None:
            self._fail(delivery, message, token, refusal, batch)
            return
        try:
            args = [app.serializer.decode(a) for a in message["args"]]
            kwargs = {k: app.serializer.decode(v) for k, v in message["kwargs"].items()}
        except Exception as exc:
            self._fail(delivery, message, token, SerializationError(f"cannot decode arguments of task {name!r}: {exc}"), batch)
            return

        started_at = app.clock.time()
        run = {"started": time.monotonic(), "started_at": started_at, "time_limit": message.get("time_limit"), "token": token, "message": message,
               "batch": batch}
        with self._held_lock:
            self._running[task_id] = run
        capture.begin(task_id)
        try:
            with workflow.task_context(app, message, token, self), self.events.run(message, delivery.queue):
                value = self._call(task, args, kwargs, message)
        except Retry as exc:
            output = capture.end()
            self._retry(delivery, message, token, exc.countdown, "Retry", exc.reason or "retry requested", output, batch, counts=False)
            return
        except WorkerLostError as exc:   # its child process died or was stopped: not finished, not the task's failure
            self._child_lost(delivery, message, token, exc, capture.end(), batch, started_at)
            return
        except BaseException as exc:  # the task's own failure, whatever it raised (exit() too): recorded, the worker carries on
            output = capture.end()
            tb = getattr(exc, "child_traceback", None) or _tb.format_exc()
            if int(message.get("retry_count") or 0) > 0:
                try:
                    delay, timeout = next_delay(int(message.get("retries") or 0), float(message.get("retry_timeout") or 0), message.get("retry_backoff"))
                except Exception as err:   # options no producer of this version sends (see signature.check_options)
                    self._fail(delivery, message, token, exc, batch, tb=tb, output=output, started_at=started_at,
                               note=f"not retried: its retry options are invalid: {_describe(err)}")
                    return
                message["retry_timeout"] = timeout
                self._retry(delivery, message, token, delay, type(exc).__name__, _text(exc), output, batch, counts=True, tb=tb)
            else:
                self._fail(delivery, message, token, exc, batch, tb=tb, output=output, started_at=started_at)
            return
        finally:
            with self._held_lock:
                self._running.pop(task_id, None)
        output = capture.end()
        try:
            result_text = serialization.dumps(app.serializer.encode(value, f"result of task {name!r}"))
        except Exception as exc:    # whatever the encoder raises (a value nested too deeply, say): the task fails
            if not isinstance(exc, SerializationError):
                hint = " (a value that contains itself, or is nested too deeply?)" if isinstance(exc, RecursionError) else ""
                exc = SerializationError(f"the result of task {name!r} cannot be encoded: {_describe(exc)}{hint}")
            self._fail(delivery, message, token, exc, batch, output=output, started_at=started_at)
            return

        fields = {"result": result_text, "output": _safe_text(output) or None, "error": None, "exc_type": None, "traceback": None, "started_at": started_at}
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
        if delivery.maybe_lapsed and record.get("state") in (states.RECEIVED, states.STARTED) and token > delivery.lapse_token:
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
                return task_id in self._running or any(d.message_id == task_id and d is not delivery for d in self._held.values())
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
                    task_id, states.FAILURE, token=token, exc_type=exc_type, error=reason, retries=(message or {}).get("retries", 0))
            if stored:
                self._count(failed=1)
                if message is not None:
                    workflow.on_failure(app, message, exc_type, reason, send=batch.send)
            app.broker.reject(delivery, reason)

        batch.add(finish, delivery)

    def _call(self, task, args: list, kwargs: dict, message: dict) -> Any:
        """Run the task's function: in this thread, or with ``pool="processes"`` in a child
        process (pool.py; built-in tasks, which use this process's objects, stay here)."""
        if self.pool is None or task.name.startswith("nbqueue."):
            return task.fn(*args, **kwargs)
        return self.pool.call(task.fn, args, kwargs, task_id=message["id"], name=task.name, time_limit=message.get("time_limit"),
                              soft_time_limit=message.get("soft_time_limit"))

    def _child_lost(self, delivery: Delivery, message: dict, token: int, exc: WorkerLostError, output: str, batch: "_Batch",
                    started_at: float) -> None:
        """The child process running the task died (or was stopped): the task goes back to the
        queue (a release: not a lapse), unless it has now ended ``max_deliveries`` deliveries
        without finishing (its child deaths in this worker, or its lapses and this one): then
        its record fails and its message is dead-lettered with the reason, so a task that
        kills its child every time cannot loop."""
        if getattr(exc, "counts", True) and self.pool is not None:
            deliveries = max(self.pool.note_death(message["id"]), delivery.lapsed + 1)
            limit = self.app.broker.max_deliveries
            if deliveries >= limit:
                reason = f"{exc} running this task, on {deliveries} deliveries (max_deliveries={limit}); not delivered again"
                self._dead_letter(delivery, reason, batch, message=message, exc_type=WorkerLostError.__name__)
                return
        log.warning("worker %s: %s running task %s (%s); delivering it again", self.name, exc, message["name"], message["id"])
        self._requeue(delivery, message, token, batch, exc_type=type(exc).__name__, error=f"{exc}; delivered again", output=output or None)

    def _requeue(self, delivery: Delivery, message: dict, token: int, batch: "_Batch", *, delay: float = 0.0, **fields) -> None:
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

    def serve_code_queues(self) -> None:
        """Also read the code queues of this worker's queues (``shipping.code_queue``), where
        tasks defined in a notebook are sent: called when such a task is registered."""
        queues = shipping.with_code_queues(self.queues)
        if queues != self.queues:
            self.queues = queues        # an executor's next reserve (within 0.25 s) reads them

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
            log.info("task %s (%s) is not registered here; leaving it to %s", name, message["id"], ", ".join(owners[:3]))
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

    def _retry(self, delivery: Delivery, message: dict, token: int, delay: float, exc_type: str, reason: str, output: str,
               batch: "_Batch", *, counts: bool, tb: str | None = None) -> None:
        app = self.app
        if counts:
            message["retry_count"] = int(message.get("retry_count") or 0) - 1
            message["retries"] = int(message.get("retries") or 0) + 1
        eta = app.clock.time() + delay

        def finish() -> None:
            if app.backend.set_state(message["id"], states.RETRY, token=token, retries=message.get("retries", 0), exc_type=exc_type,
                                     error=reason, traceback=tb, output=output or None):
                app.broker.retry(delivery, body=encode_body(message), eta=eta)
                log.info("task %s (%s) will retry in %.1fs: %s", message["name"], message["id"], delay, reason)
            else:  # revoked or taken over meanwhile
                workflow.after_final(app, message, app.backend.get(message["id"]) or {}, send=batch.send)
                batch.ack(delivery)

        batch.add(finish, delivery)

    def _fail(self, delivery: Delivery, message: dict, token: int, exc: BaseException, batch: "_Batch", *, tb: str | None = None,
              output: str | None = None, started_at: float | None = None, note: str | None = None) -> None:
        """Record the task FAILURE (``note``: said after the error) and acknowledge it."""
        app = self.app
        exc_type, error = type(exc).__name__, _text(exc)
        if note:
            error = f"{error} ({note})" if error else note
        tb, output = _safe_text(tb), _safe_text(output)
        extra = {"started_at": started_at} if started_at is not None else {}

        def finish() -> None:
            if app.backend.store_result(message["id"], states.FAILURE, token=token, exc_type=exc_type, error=error,
                                        traceback=tb, output=output or None, retries=message.get("retries", 0), **extra):
                workflow.on_failure(app, message, exc_type, error, send=batch.send)
                self._count(failed=1)
            else:   # revoked meanwhile: what follows it ends as for a failure
                workflow.after_final(app, message, app.backend.get(message["id"]) or {}, send=batch.send)
            batch.ack(delivery)

        batch.add(finish, delivery)

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        pool = " pool=processes" if self.pool is not None else ""
        return f"<Worker {self.name} {state} concurrency={self.concurrency}{pool} queues={','.join(self.queues)}>"


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
