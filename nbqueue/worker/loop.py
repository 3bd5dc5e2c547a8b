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
import uuid
from typing import Iterable

from .. import capture, control, shipping, states
from ..broker import Delivery, Outgoing, queue_list
from ..engine import Claim, NextClaim, Outcome, decode
from ..events import WorkerEvents
from ..message import Message
from ..options import boolean, choice, count, seconds, string
from .batch import GROUP_COMMIT, REVOKE_CHECK, STEAL_AFTER, _Batch
from .execute import Execution
from .heartbeat import Heartbeat

log = logging.getLogger(__name__)

#: seconds a stopping worker with nothing running waits for its threads and the removal of its
#: record (see Worker.join)
STOP_WAIT = 2.0
#: seconds a start waits for the worker's first heartbeat to be written (see Worker.start)
FIRST_HEARTBEAT_WAIT = 2.0


def _pool_options(pool: str, max_tasks_per_child: int | None, max_memory_per_child: int | None,
                  shutdown_grace: float | None) -> tuple[int | None, int | None, float | None]:
    """The process pool's options checked: a pool that is threads or processes; children's task and
    memory (KiB) limits, whole numbers (0 or None: no limit); ``shutdown_grace`` in seconds, 0 or
    more (None: running tasks may take as long as they need). ConfigurationError naming a bad one."""
    choice("pool", pool, ("threads", "processes"))
    return (count("max_tasks_per_child", max_tasks_per_child, None, minimum=0) or None,
            count("max_memory_per_child", max_memory_per_child, None, minimum=0) or None,
            None if shutdown_grace is None else seconds("shutdown_grace", shutdown_grace, None))


class Worker(Heartbeat, Execution):
    def __init__(
        self,
        app,
        concurrency: int = 1,
        queues: str | Iterable[str] | None = None,
        *,
        name: str | None = None,
        prefetch: int | None = None,
        allow_cells: bool = False,
        echo_output: bool = False,
        heartbeat_interval: float | None = None,
        local_follow_ups: bool = True,
        unknown_grace: float = 0.0,
        beat: bool = False,
        pool: str = "threads",
        allow_code: bool = False,
        max_tasks_per_child: int | None = None,
        max_memory_per_child: int | None = None,
        shutdown_grace: float | None = 30.0,
    ):
        # every argument is checked before anything is made: ConfigurationError naming a bad one
        self.concurrency: int = count("concurrency", concurrency, 1)
        children = _pool_options(pool, max_tasks_per_child, max_memory_per_child, shutdown_grace)
        for flag_name, value in (("allow_cells", allow_cells), ("echo_output", echo_output), ("beat", beat),
                                 ("allow_code", allow_code), ("local_follow_ups", local_follow_ups)):
            boolean(flag_name, value)
        self.app = app
        self.queues = queue_list(queues) if queues else [app.default_queue]
        self.name = string("name", name, None) or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.prefetch: int = count("prefetch", prefetch, None) or count("prefetch", app.config.option("prefetch"), 4)
        self.allow_cells = allow_cells
        self.echo_output = echo_output
        self.beat = beat                               # also run the App's periodic-task scheduler (schedule.py)
        self.lease = app.visibility_timeout
        self.heartbeat_interval = seconds("heartbeat_interval", heartbeat_interval, None, positive=True) or max(
            0.05, min(self.lease / 3.0, 5.0))
        # a notebook kernel defines its tasks in cells that may run after the worker starts
        # (a restarted kernel): for this long, a message sent before it started whose task
        # it does not know yet is handed back (see _leave_unknown)
        self.unknown_grace = seconds("unknown_grace", unknown_grace, 0.0)
        self._born = app.clock.time()
        self._pid = os.getpid()
        self._init_pool(pool, allow_code, *children)
        self._init_state()
        self._init_engine_use(app.engine, local_follow_ups)
        self.events = WorkerEvents()                   # hooks around each task run (metrics, tracing)
        self.control = control.Watch(self)             # cancels, soft limits in threads, progress (control.py)

    def _init_pool(self, pool: str, allow_code: bool, max_tasks_per_child: int | None,
                   max_memory_per_child: int | None, shutdown_grace: float | None) -> None:
        """The process pool (pool.py) and shipped notebook functions (shipping.py): with
        ``pool="processes"`` each executor thread drives one child; code queues are read where
        shipped functions may come (``allow_code``, an interactive kernel, notebook tasks)."""
        self.allow_code = allow_code                   # run functions shipped from notebooks (--allow-code)
        self.pool = None
        if pool == "processes":
            from ..pool import ProcessPool

            self.pool = ProcessPool(self.concurrency, max_tasks_per_child=max_tasks_per_child,
                                    max_memory_per_child=max_memory_per_child, app=self.app)
        self.shutdown_grace = shutdown_grace  # seconds running children may finish once the worker stops
        if (
            allow_code
            or shipping.interactive()
            or any(shipping.defined_in_notebook(t.fn) for t in list(self.app.registry.values()))
        ):
            self.serve_code_queues()

    def _init_state(self) -> None:
        """The threads, what they hold and run, and the counters, all empty."""
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
        self.crashed = False  # every executor thread died (see _executors_died)
        self._record_gone = False                      # removed (see _remove_record): a heartbeat does not revive it
        self.waiting = 0  # executor threads held by a task waiting for a result (result.py)
        self._wait_lock = threading.Lock()             # one such wait decided at a time (see holding_thread)
        self._revoked: set = set()                     # ids revoked by this process's App (see note_revoked)
        self._workers_seen: tuple[float, list] = (0.0, [])   # other workers' heartbeats, read for unknown task names

    def _init_engine_use(self, engine, local_follow_ups: bool) -> None:
        """What the worker takes from its engine's capabilities."""
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

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> "Worker":
        if self._threads:
            return self
        capture.install(echo=self.echo_output)
        self._stopping.clear()
        self._record_gone = False
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
        # the first heartbeat, written before start returns unless the store does not answer
        # in time (the heartbeat thread writes it then)
        announcer = threading.Thread(target=self.announce, name="nbqueue-announce", daemon=True)
        announcer.start()
        announcer.join(FIRST_HEARTBEAT_WAIT)
        if self.beat:
            self.app.scheduler().start()
        log.info(
            "worker %s started: %d %s, queues %s",
            self.name,
            self.concurrency,
            "child process(es)" if self.pool else "thread(s)",
            ",".join(self.queues),
        )
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
        """Wait for the worker's threads, at most ``timeout`` seconds. Once the worker stops with
        no task running or held, its threads and the removal of its record get ``STOP_WAIT``
        seconds at most: a thread caught in a call to a store that does not answer does not
        hold the stop up (the record then expires with its TTL; a message such a call claims
        after all comes back when its lease runs out)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        idle_until = None
        for t in self._threads:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            if self._idle():
                idle_until = idle_until or time.monotonic() + STOP_WAIT
                left = max(0.0, idle_until - time.monotonic())
                remaining = left if remaining is None else min(remaining, left)
            t.join(remaining)
        alive = not self._idle() and any(t.is_alive() for t in self._threads)
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
                remover = threading.Thread(target=self._remove_record, name="nbqueue-worker-gone", daemon=True)
                remover.start()
                remover.join(STOP_WAIT)
        return not alive

    def _idle(self) -> bool:
        """Whether the worker stops with nothing left to finish: no task running or held."""
        if not self._stopping.is_set():
            return False
        with self._held_lock:
            return not (self._running or self._held)

    def _remove_record(self) -> None:
        """Remove this worker's heartbeat record for good: a heartbeat written concurrently
        (an announcement from another thread) and landing after the removal sees the flag set
        first and removes the record again (see _beat)."""
        self._record_gone = True
        try:
            self.app.backend.worker_gone(self.name)
        except Exception:
            log.debug("could not remove worker heartbeat", exc_info=True)

    @property
    def running(self) -> bool:
        return any(t.is_alive() for t in self._threads)

    def count(self, processed: int = 0, failed: int = 0) -> None:
        """Add to the counters: executor and heartbeat threads finish tasks concurrently."""
        with self._count_lock:
            self.processed += processed
            self.failed += failed

    # -- the steppable core ---------------------------------------------------------------------
    def step(self, now: float | None = None, limit: int | None = None) -> int:
        """Claim what is due and process it in this thread; returns how many were processed.

        ``now`` (seconds since the epoch): run this pass at that time. Every store and the
        worker read time from the App's clock, so ``now`` is passed down by setting that
        clock, which must then be settable (a ``ManualClock``; ValueError otherwise) and is
        never moved back."""
        if now is not None:
            settable = getattr(self.app.clock, "set", None)
            if settable is None:
                raise ValueError(
                    f"step(now=...) needs an App whose clock can be set (a ManualClock), not {self.app.clock!r}"
                )
            settable(max(float(now), self.app.clock.time()))
        claims = self.reserve(0, limit or self.concurrency)
        if claims:
            self.run_claims(claims)
        return len(claims)

    def drain(self, timeout: float = 10.0) -> int:
        """Process until the queues stay empty (for tests and scripts)."""
        total, deadline = 0, time.monotonic() + timeout
        while time.monotonic() < deadline:
            claims = self.reserve(0.05, self.concurrency)
            if not claims:
                break
            self.run_claims(claims)
            total += len(claims)
        return total

    def _executor_loop(self) -> None:
        backoff = 0.1
        while not self._stopping.is_set():
            # (a batch claimed in the last commit comes first: it is not held, its lease not extended)
            claims = self._steal() if getattr(self._claimed, "next", None) is None else None
            if claims is None:
                try:
                    claims = self.reserve(0.25, self.prefetch)  # short, so stop() is prompt
                    backoff = 0.1
                except Exception as exc:
                    log.warning("worker %s: reserve failed (%s); retrying in %.1fs", self.name, exc, backoff)
                    self._stopping.wait(backoff)
                    backoff = min(backoff * 2, 10.0)
                    continue
            if claims:
                self.hold([c.delivery for c in claims])
                try:
                    self.run_claims(claims)
                except Exception:
                    log.exception(
                        "worker %s: unexpected error in a batch of %d; its messages will be redelivered",
                        self.name,
                        len(claims),
                    )
        claimed = getattr(self._claimed, "next", None)
        if claimed is not None:   # claimed as the worker was told to stop: handed back, unstarted
            self._claimed.next = None
            self.hold([c.delivery for c in claimed])
            self.run_claims(claimed)

    def _steal(self) -> list[Claim] | None:
        """What another executor's batch has not started while its thread has been running
        one task for ``STEAL_AFTER`` (see ``_Batch.give_away``), or None: a task reserved
        with a long-running one does not wait for it while this thread is idle."""
        with self._held_lock:
            batches = [batch for batch in self._batches if batch.busy_for() >= STEAL_AFTER]
        for batch in batches:
            taken = batch.give_away()
            if taken is not None:
                log.debug(
                    "worker %s: taking %d unstarted message(s) from a batch busy with a long task",
                    self.name,
                    len(taken),
                )
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
        self._remove_record()

    def hold(self, deliveries: list[Delivery]) -> None:
        """Note deliveries this worker holds: their leases are extended until ``unhold``."""
        with self._held_lock:
            for d in deliveries:
                self._held[id(d)] = d

    def unhold(self, d: Delivery) -> None:
        self.unhold_many([d])

    def unhold_many(self, deliveries: list[Delivery]) -> None:
        """Their leases are no longer extended (see ``hold``)."""
        with self._held_lock:
            for d in deliveries:
                self._held.pop(id(d), None)

    def _hand_back(self, deliveries: list[Delivery]) -> None:
        self.app.engine.hand_back(deliveries)
        self.unhold_many(deliveries)

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

    # -- deliveries -------------------------------------------------------------------------------
    def process(self, delivery: Delivery) -> None:
        """Run one delivery to completion; never raises (a bad message cannot stop a worker)."""
        self.process_batch([delivery])

    def process_batch(self, deliveries: list[Delivery]) -> None:
        """Decode reserved deliveries, begin their tasks and run them (``run_claims``); never raises."""
        try:
            claims = self._prepare(deliveries)
        except Exception:
            log.exception("worker %s: beginning a batch of %d failed; its messages will be redelivered", self.name,
                          len(deliveries))
            return
        self.run_claims(claims)

    def run_claims(self, claims: list[Claim]) -> None:
        """Run claimed deliveries (``reserve``) in order in this thread; never raises.

        The claim marks the batch RECEIVED and hands out fencing tokens (``Engine.claim``: one
        write, or none beyond the claim where the engine is fused, see ``reserve``). Finished
        tasks (result, follow-ups, ack) are committed together once the oldest has waited
        ``GROUP_COMMIT``, and by the heartbeat thread when the executor is busy with a long
        task, so a result waits for a slow batch-mate at most a heartbeat tick.
        """
        queue = [claims]
        while queue:
            claims = queue.pop(0)
            local: list = []
            self._run_batch(claims, local)
            # follow-ups this worker published to itself (the next chain step, a chord's
            # callback) run next, without another claim
            queue.extend(local)

    def _run_batch(self, claims: list[Claim], local: list) -> None:
        malformed = [c for c in claims if c.message is None]
        todo, copies = self._distinct([c for c in claims if c.message is not None])
        batch = _Batch(self, local, todo)
        with self._held_lock:
            self._batches.add(batch)
        try:
            for c in malformed:
                batch.settle(self.dead_letter(c.delivery, c.reason or "malformed message"))
            self._run_todo(batch)
            for copy in copies:     # once the first copy is settled: a no-op where a copy was the same message
                batch.settle(Outcome(copy, copy.message_id, "", None, {}))
        except Exception:
            log.exception(
                "worker %s: unexpected error in a batch of %d; its messages will be redelivered", self.name, len(claims)
            )
        finally:
            batch.close()
            try:
                # an executor thread claims its next batch in this commit (where broker and
                # backend share a transaction, or else in the finish's round trip where the
                # engine claims there) when nothing local runs next
                mine = threading.current_thread() in self._threads
                claimed = batch.flush(
                    claim_next=self._claim_now
                    if (self.group_commit or self.app.engine.claims_in_finish) and mine and not self._stopping.is_set()
                    else None
                )
                if claimed:
                    self._claimed.next = claimed
            except Exception:
                log.exception("worker %s: finishing a batch failed; its messages will be redelivered", self.name)
                batch.forget_local()
            with self._held_lock:
                self._batches.discard(batch)
            self.unhold_many(batch.kept(claims))    # those given away are held by the executor that took them

    def _run_todo(self, batch: _Batch) -> None:
        """Run the batch's claims in order, each outcome settled by the batch; stopping, hand
        back the unstarted ones."""
        checked = time.monotonic()
        while (claim := batch.take_next()) is not None:
            assert claim.message is not None
            if self._stopping.is_set() and threading.current_thread() in self._threads:
                unstarted = [claim] + batch.give_away_all()
                self._hand_back([c.delivery for c in unstarted])    # not started: PENDING again, not "received"
                break
            now = time.monotonic()
            if batch.waiting(now) >= GROUP_COMMIT:
                # finished tasks wait at most GROUP_COMMIT (or the heartbeat's flush, see _flush_stale)
                batch.flush()
            if now - checked >= REVOKE_CHECK:
                checked = now
                self._skip_revoked([claim] + batch.pending())
            if self._revoked and self._revoked_here(claim.message.id):
                claim.begun, claim.token = True, None
            batch.running()
            try:
                batch.settle(self.execute(claim))
            except self.store_errors:
                log.exception(
                    "worker %s: processing %s failed; it will be redelivered", self.name, claim.delivery.message_id
                )
            except KeyboardInterrupt:  # Ctrl-C in a thread that steps the worker itself (drain())
                raise
            except BaseException as exc:  # the worker's own bookkeeping: this message fails, not the thread
                batch.give_up(claim.delivery, exc, "processing", message=claim.message,
                              token=claim.token if claim.begun else None)
            finally:
                batch.running(False)

    def _distinct(self, claims: list[Claim]) -> tuple[list[Claim], list[Delivery]]:
        """``claims`` with one delivery per task id, and the deliveries of further copies:
        a message published twice where the broker keeps both (RabbitMQ) runs once, and its
        other copies are acknowledged after the batch (the first copy's delivery stands for
        the task until it is finished)."""
        seen: set = set()
        out, copies = [], []
        for claim in claims:
            assert claim.message is not None
            if claim.message.id in seen:
                log.warning(
                    "worker %s: task %s (%s) is in this batch twice; running it once",
                    self.name,
                    claim.message.name,
                    claim.message.id,
                )
                copies.append(claim.delivery)
                continue
            seen.add(claim.message.id)
            out.append(claim)
        return out, copies

    def note_revoked(self, task_id: str) -> None:
        """``App.revoke`` in this process: a batch holding the task skips it without asking the store,
        and a running one is looked at in the heartbeat's next tick (control.Watch)."""
        self.control.poke()
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

    def _skip_revoked(self, unstarted: list[Claim]) -> None:
        """Tasks of a batch not started yet may have been revoked (in another process) since
        they were reserved: forget their tokens, so they are settled as final (ending their
        workflows), not run."""
        waiting = {c.message.id: c for c in unstarted if c.message is not None and c.begun and c.token}
        if not waiting:
            return
        found = self.app.backend.states_of(list(waiting))
        for task_id, claim in waiting.items():
            if found.get(task_id) in states.READY_STATES:
                claim.token = None

    def claim_follow_ups(self, outs: list[Outgoing]) -> tuple[list[Claim], list[Outgoing]]:
        """Of follow-ups about to be published, claim for this worker those it can run next
        (``Engine.run_next``, held from now on): the claims, and the follow-ups left to publish."""
        if not self.local_follow_ups or self._stopping.is_set():
            return [], outs
        now = self.app.clock.time()
        mine = [o for o in outs if o.queue in self.queues and (o.eta is None or o.eta <= now)][: self.prefetch]
        if not mine:
            return [], outs
        claims = self.app.engine.run_next(mine, lease=self.lease, worker=self.name, begins=self._begins)
        self.hold([c.delivery for c in claims])
        taken = {o.id for o in mine}
        return claims, [o for o in outs if o.id not in taken]

    def has_claimed(self) -> bool:
        """Whether this thread holds a batch claimed in its last commit, not run yet."""
        return getattr(self._claimed, "next", None) is not None

    def next_claim(self) -> NextClaim:
        """A claim of this worker's next batch, made by ``Engine.finish`` (``claims_in_finish``)."""
        return NextClaim(self.queues, limit=self.prefetch, lease=self.lease, worker=self.name, begins=self._begins)

    def keep_claimed(self, claims: list[Claim]) -> None:
        """``claims``, claimed by this thread in a finish, are the batch its next ``reserve`` returns."""
        self._claimed.next = claims

    def _claim_now(self) -> list[Claim]:
        """Claim a batch inside the caller's transaction (see ``_Batch.flush``), without waiting."""
        return self.reserve(0, self.prefetch)

    def reserve(self, timeout: float, limit: int) -> list[Claim]:
        """Claim a batch (``Engine.claim``): decoded messages and fencing tokens. A batch this
        thread claimed while committing its last one comes first."""
        claimed = getattr(self._claimed, "next", None)
        if claimed is not None:
            self._claimed.next = None
            return claimed
        return self.app.engine.claim(self.queues, limit=limit, timeout=timeout, lease=self.lease, worker=self.name,
                                     begins=self._begins, handoff=self.group_commit and not self._stopping.is_set())

    def _prepare(self, deliveries: list[Delivery]) -> list[Claim]:
        """Decode deliveries handed to ``process`` unclaimed and begin their tasks."""
        return self.app.engine.begin(decode(deliveries), self.name, self._begins)

    def _begins(self, message: Message) -> bool:
        """Whether a claim begins this task: one this worker runs, or may fail as not registered."""
        return message.name in self.app.registry or not message.ignore_when_not_registered

    def serve_code_queues(self) -> None:
        """Also read the code queues of this worker's queues (``shipping.code_queue``), where
        tasks defined in a notebook are sent: called when such a task is registered."""
        queues = shipping.with_code_queues(self.queues)
        if queues != self.queues:
            self.queues = queues        # an executor's next reserve (within 0.25 s) reads them

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        pool = " pool=processes" if self.pool is not None else ""
        return f"<Worker {self.name} {state} concurrency={self.concurrency}{pool} queues={','.join(self.queues)}>"
