"""A batch of claimed deliveries being run, and the finish steps that settle them: stored and
acknowledged together (one transaction or round trip where the engine allows), one by one
when that fails, so one bad message never holds back the others."""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
from typing import Any, Callable

from .. import states, workflow
from ..broker import Delivery
from ..engine import ACK, COUNT_LAPSE, DEFER, REJECT, RELEASE, Claim, Outcome
from ..message import Message

log = logging.getLogger(__name__)

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


# a batch's unstarted tasks are checked in the store for revocations once earlier ones took this long
REVOKE_CHECK = 0.02


def _follows(message: Message | None) -> bool:
    """Whether anything follows a task's outcome (callbacks, a workflow step)."""
    return message is not None and bool(
        message.on_success or message.workflow or message.on_error
    )


class _Batch:
    """The claims of one batch being run, and their outcomes settled together (one
    transaction where broker and backend share a store, one ``Engine.finish`` round trip for
    plain results and counted group members).

    A settling step that fails inside the shared transaction rolls it back; the steps are
    then run again one transaction each, and a delivery whose own step still fails is
    dead-lettered with the reason (unless the store itself is unreachable: then its
    lease brings it back), so one bad message never holds back the others.
    """

    def __init__(self, worker: Any, local: list, claims: list[Claim] = (), *, runs_next: bool = True):
        self.app = worker.app
        self.worker = worker
        self.grouped = worker.group_commit
        self.local = local          # follow-ups this worker claimed for itself: lists of Claims run next
        # follow-ups may be claimed for this batch's executor to run next (False: a batch no executor runs)
        self.runs_next = runs_next and worker.local_follow_ups
        self.ops: list = []         # outcomes settled one step each (see _settle)
        self.plain: list = []       # successes nothing follows (outcomes)
        self.acks: list = []        # deliveries whose finish is done, acknowledged at the next flush (see ack)
        self.members: list = []     # group members nothing else follows (outcomes with a group)
        self.first = 0.0            # when the oldest pending outcome was added
        self.todo: list[Claim] = list(claims)   # not started yet; see give_away
        self.given: set = set()     # id() of the deliveries given away to another executor
        self.closed = False         # the batch is finishing: nothing more is given away
        self.since: float | None = None   # when its executor began the task it runs (None: between tasks)
        self.lock = threading.Lock()
        # one flush at a time: the executor's last flush must see follow-ups a heartbeat
        # flush reserved (lock order: this, then the store's write lock)
        self.flushing = threading.Lock()
        self.store_errors = worker.store_errors

    def send(self, outs: list) -> None:
        """Publish follow-ups of this batch's tasks: the ones this worker runs next are taken
        (``Engine.run_next``), the others published as usual."""
        if not self.local and self.runs_next:
            claims, outs = self.worker.claim_follow_ups(outs)
            if claims:
                self.local.append(claims)
        if outs:
            self.app.engine.publish(outs)

    # -- outcomes -------------------------------------------------------------------------------
    def settle(self, outcome: Outcome) -> None:
        """Add a task's outcome: settled at the batch's next flush. A success nothing follows
        is stored (and a group member counted) with others in one ``Engine.finish``."""
        if outcome.state == states.SUCCESS and outcome.then == ACK:
            if not _follows(outcome.message):
                self._queue(self.plain, outcome)
                return
            if outcome.group is not None:
                self._queue(self.members, outcome)
                return
        if not self.grouped:
            self._run_alone(outcome)
            return
        self._queue(self.ops, outcome)

    def _settle(self, outcome: Outcome) -> None:
        """Record one outcome, advance what follows its task, and settle its delivery."""
        if outcome.then == REJECT:
            self._dead_letter(outcome)
        elif outcome.state in states.READY_STATES:
            self._finish_one(outcome)
        elif outcome.state:
            self._put_back(outcome)
        else:
            self._settle_unrecorded(outcome)

    def _finish_one(self, outcome: Outcome) -> None:
        """A final state stored, then what follows it, then the ack (where there is a delivery:
        a task failed by its time limit has none, its executor still holds it)."""
        app, message = self.app, outcome.message
        assert message is not None
        try:
            [stored] = app.engine.finish([outcome]).stored
        except self.store_errors:
            raise
        except Exception as exc:
            if outcome.state != states.SUCCESS:
                raise
            raise _ResultNotStored() from exc
        if not stored:   # revoked (or failed by its time limit) meanwhile: what follows it ends as for a failure
            workflow.after_final(app, message, app.backend.get(outcome.task_id) or {}, send=self.send)
        elif outcome.state == states.SUCCESS:
            workflow.on_success(app, message, outcome.fields["result"], send=self.send)
            self.worker.count(processed=1)
        else:
            workflow.on_failure(app, message, outcome.fields["exc_type"], outcome.fields["error"], send=self.send)
            self.worker.count(failed=1)
        if outcome.delivery is not None:
            self.ack(outcome.delivery)

    def _put_back(self, outcome: Outcome) -> None:
        """A begun task back to RETRY or PENDING and its message back to its queue (a RETRY with
        its changed message); a task final meanwhile (revoked) is not run again."""
        app, delivery = self.app, outcome.delivery
        assert delivery is not None and outcome.state
        if not app.backend.set_state(outcome.task_id, outcome.state, token=outcome.token, **outcome.fields):
            if outcome.state == states.RETRY and outcome.message is not None:  # revoked or taken over meanwhile
                workflow.after_final(app, outcome.message, app.backend.get(outcome.task_id) or {}, send=self.send)
            self.ack(delivery)
        elif outcome.then == RELEASE:
            app.broker.release(delivery)
        elif outcome.state == states.RETRY and outcome.message is not None:
            app.broker.retry(delivery, body=outcome.message.encode(), eta=outcome.eta)
            log.info("task %s (%s) will retry in %.1fs: %s", outcome.message.name, outcome.task_id,
                     max(0.0, (outcome.eta or 0.0) - app.clock.time()), outcome.fields.get("error"))
        else:
            app.broker.retry(delivery, eta=outcome.eta)

    def _settle_unrecorded(self, outcome: Outcome) -> None:
        """Nothing to record: a task final already (its follow-ups repeated), a delivery put back
        while an earlier attempt lives, a lapse counted, a message acknowledged."""
        app, delivery = self.app, outcome.delivery
        assert delivery is not None
        if outcome.then == DEFER:
            assert outcome.eta is not None
            app.broker.defer(delivery, eta=outcome.eta)
        elif outcome.then == COUNT_LAPSE:
            assert outcome.token is not None
            app.broker.count_lapse(delivery, outcome.token)
        else:
            if outcome.message is not None:
                workflow.after_final(app, outcome.message, app.backend.get(outcome.task_id) or {}, send=self.send)
            self.ack(delivery)

    def _dead_letter(self, outcome: Outcome) -> None:
        """Fail the task's record, if one is waiting, with the reason; dead-letter the message."""
        app, delivery, message = self.app, outcome.delivery, outcome.message
        assert delivery is not None and outcome.reason is not None
        stored = False
        record = app.backend.get(outcome.task_id) if outcome.task_id else None
        if record is not None and record.get("state") not in states.READY_STATES:
            token = app.backend.begin(outcome.task_id, worker=self.worker.name)
            stored = token is not None and app.engine.finish([dataclasses.replace(outcome, token=token)]).stored[0]
        if stored:
            self.worker.count(failed=1)
            if message is not None:
                workflow.on_failure(app, message, outcome.fields["exc_type"], outcome.reason, send=self.send)
        app.broker.reject(delivery, outcome.reason)

    def _pending(self) -> bool:
        return bool(self.ops or self.plain or self.acks or self.members)

    # -- claims not started yet -----------------------------------------------------------------
    def take_next(self) -> Claim | None:
        """The next unstarted claim of this batch, for its own executor."""
        with self.lock:
            return self.todo.pop(0) if self.todo else None

    def give_away(self) -> list[Claim] | None:
        """For an idle executor while this batch's thread is busy with a long task: the
        batch's unstarted claims (with their fencing tokens), or else the first batch of
        follow-ups this worker claimed for itself (unless a flush, which may still roll
        them back, is under way); None when there is nothing to give."""
        with self.lock:
            if self.closed:
                return None
            taken, self.todo = self.todo, []
            if taken:
                self.given.update(id(c.delivery) for c in taken)
                return taken
            if self.local and self.flushing.acquire(blocking=False):
                try:
                    return self.local.pop(0) if self.local else None
                finally:
                    self.flushing.release()
        return None

    def running(self, busy: bool = True) -> None:
        """Its executor begins (``busy``) or ends a task."""
        self.since = time.monotonic() if busy else None

    def busy_for(self) -> float:
        """Seconds its executor has been running the current task (0 between tasks)."""
        since = self.since
        return 0.0 if since is None else time.monotonic() - since

    def kept(self, claims: list[Claim]) -> list[Delivery]:
        """The deliveries of ``claims`` not given away to another executor (which holds those now)."""
        given = self.given
        return [c.delivery for c in claims if id(c.delivery) not in given]

    def pending(self) -> list[Claim]:
        """The unstarted claims left, without taking them."""
        with self.lock:
            return list(self.todo)

    def give_away_all(self) -> list[Claim]:
        """Every unstarted claim left, for the batch's own thread (stopping)."""
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

    def ack(self, delivery: Delivery) -> None:
        """Acknowledge a delivery whose finish (result, follow-ups) is done. Inside a group
        commit at once; otherwise with the batch's next flush, in the round trip that stores
        the plain results (a worker dying first only means a redelivery, which finds the
        task final and repeats nothing but its follow-ups, as for any redelivery)."""
        if self.grouped:
            self.app.broker.ack(delivery)
        else:
            self._queue(self.acks, delivery)

    def waiting(self, now: float | None = None) -> float:
        """Seconds the oldest pending outcome has waited (0 when none) at ``now`` (``time.monotonic()``)."""
        with self.lock:
            if not self._pending():
                return 0.0
            first = self.first
        return (time.monotonic() if now is None else now) - first

    def flush(self, claim_next: Callable[[], list[Claim]] | None = None) -> list[Claim]:
        """Settle what is pending; safe from the executor and the heartbeat thread alike.

        ``claim_next`` (the executor's last flush of a batch): called to claim its next batch
        in the same transaction, one commit fewer per batch, or where no transaction spans the
        stores, claimed in the round trip of the finish (``Engine.claims_in_finish``, kept by
        ``Worker.keep_claimed``); a batch claimed in the transaction is returned.
        """
        with self.flushing:
            return self._flush(claim_next)

    def _flush(self, claim_next: Callable[[], list[Claim]] | None = None) -> list[Claim]:
        with self.lock:
            ops, self.ops = self.ops, []
            plain, self.plain = self.plain, []
            acks, self.acks = self.acks, []
            members, self.members = self.members, []
        if not ops and not plain and not acks and not members:
            return []
        # the finish claims the next batch where no transaction spans the stores, or where the
        # finish is one transaction itself and nothing else is settled in it (then it is not
        # wrapped in another, so the finish builds its statements before it takes the store)
        alone = self.grouped and self.app.engine.claims_in_finish and not ops and not members
        try:
            claimed: list[Claim] = []
            with self.app.transaction() if not alone else contextlib.nullcontext():
                for outcome in ops:
                    self._settle(outcome)
                if plain or acks or members:
                    self._finish_plain(plain, acks, members,
                                       then_claim=claim_next is not None and (alone or not self.grouped))
                if claim_next is not None and self.grouped and not alone and not self.local:
                    claimed = claim_next()
            return claimed
        except Exception:
            log.warning("worker %s: finishing %d task(s) together failed; finishing them one by one",
                        self.worker.name, len(ops) + len(plain), exc_info=True)
            self.forget_local()
        for outcome in ops:
            self._run_alone(outcome)
        if plain or acks or members:
            self._finish_plain_alone(plain, acks, members)
        return []

    def forget_local(self) -> None:
        """Follow-ups reserved in a transaction that rolled back were never stored. Where no
        transaction spans the finish (an engine without ``shares_transaction``) they were: hand
        them back to the queue at once."""
        for claims in self.local:
            for c in claims:
                d = c.delivery
                if not self.grouped:
                    try:
                        self.app.broker.release(d)
                    except Exception:
                        log.warning(
                            "could not hand back %s; it returns when its lease runs out", d.message_id, exc_info=True
                        )
                self.worker.unhold(d)
        self.local.clear()

    def _run_alone(self, outcome: Outcome) -> None:
        delivery = outcome.delivery
        try:
            with self.app.transaction():
                self._settle(outcome)
        except self.store_errors:  # the store, not the message: redeliver
            self.forget_local()
            log.exception(
                "worker %s: finishing %s failed; its message will be redelivered", self.worker.name, outcome.task_id
            )
        except _ResultNotStored as exc:
            self.forget_local()
            self.give_up(delivery, exc.__cause__ or exc, "storing the result of", dead_letter=False,
                         message=outcome.message, token=outcome.token)
        except Exception as exc:
            self.forget_local()
            self.give_up(delivery, exc, "finishing", message=outcome.message, token=outcome.token)

    def _finish_plain_alone(self, plain: list, acks: list, members: list) -> None:
        """``_finish_plain`` one result at a time, after the batch's round trip failed: a
        result that cannot be stored fails its own task (``give_up``), not its batch-mates."""
        parts = [([p], [], []) for p in plain] + [([], [], [m]) for m in members] + ([([], acks, [])] if acks else [])
        for one, ack, member in parts:
            outcome = (one or member)[0] if one or member else None
            try:
                with self.app.transaction():
                    self._finish_plain(one, ack, member)
            except self.store_errors:
                self.forget_local()
                log.exception("worker %s: storing a result failed; its message will be redelivered", self.worker.name)
            except Exception as exc:
                self.forget_local()
                if outcome is None:
                    log.exception(
                        "worker %s: acknowledging %d finished message(s) failed; they will be redelivered",
                        self.worker.name,
                        len(ack),
                    )
                else:
                    self.give_up(outcome.delivery, exc, "storing the result of", dead_letter=False,
                                 message=outcome.message, token=outcome.token)

    def give_up(self, delivery: Delivery | None, exc: BaseException, what: str, *, dead_letter: bool = True,
                message: Message | None = None, token: int | None = None) -> None:
        """Settle a delivery whose own bookkeeping failed (not the store: see Engine.store_errors),
        so it is not run again at every lease. Its task (``message``, begun with ``token``) is
        recorded FAILURE with the reason unless its record is final already (error callbacks
        and workflows follow, as for any failure), and the message is dead-lettered with the
        reason; with ``dead_letter`` False a recorded failure is acknowledged instead (the
        record tells the whole story). ``what`` names the step that failed ("storing the
        result of"). Without a ``delivery`` (an outcome its executor settles later: a time limit)
        only the record is failed. Never raises."""
        app, worker = self.app, self.worker
        assert message is not None or delivery is not None
        name = f"task {message.name!r} ({message.id})" if message is not None else f"message {delivery.message_id}"
        exc_type, reason = type(exc).__name__, f"{what} {name} failed: {_describe(exc)}"
        log.error("worker %s: %s", worker.name, reason, exc_info=exc)
        recorded = False
        if message is not None and token is not None:
            for follow in (True, False):       # with its error callbacks, else the record alone
                try:
                    with app.transaction():
                        recorded = app.backend.store_result(
                            message.id,
                            states.FAILURE,
                            token=token,
                            exc_type=exc_type,
                            error=reason,
                            retries=message.retries,
                        )
                        if recorded and follow:
                            workflow.on_failure(app, message, exc_type, reason, send=self.send)
                        if recorded and not dead_letter and delivery is not None:
                            app.broker.ack(delivery)
                    break
                except self.store_errors:
                    log.exception(
                        "worker %s: recording the failure of %s failed; its message will be redelivered",
                        worker.name,
                        name,
                    )
                    return
                except Exception:
                    recorded = False
                    self.forget_local()
                    log.exception("worker %s: recording the failure of %s failed", worker.name, name)
            if recorded:
                worker.count(failed=1)
                if not dead_letter:
                    return
        if delivery is None:
            return
        try:
            app.broker.reject(delivery, reason)
        except Exception:
            log.exception(
                "worker %s: could not dead-letter %s; its lease will bring it back", worker.name, delivery.message_id
            )

    def _finish_plain(self, plain: list, acks: list = (), members: list = (), then_claim: bool = False) -> None:
        """Store the results, then acknowledge them and ``acks`` (finished already): one
        round trip for the lot where the engine allows. ``members`` (see ``settle``) are
        stored and counted in that round trip; their advance follows, then their acks.
        ``then_claim``: the executor's next batch is claimed in that round trip where the
        engine does so (``claims_in_finish``) and nothing of this batch runs locally next."""
        app = self.app
        claim = None
        if then_claim and app.engine.claims_in_finish and not self.local and not self.worker.has_claimed():
            claim = self.worker.next_claim()
        finished = app.engine.finish(plain + members, [o.delivery for o in plain] + list(acks), then_claim=claim)
        if finished.claimed:        # the executor runs it next, whatever follows here
            self.worker.keep_claimed(finished.claimed)
        self.worker.count(processed=sum(finished.stored))
        if not members:
            return
        for outcome, ok, count in zip(members, finished.stored[len(plain):], finished.counts):
            task_id, message = outcome.task_id, outcome.message
            if not ok:   # revoked meanwhile (or stored by another attempt): end its workflow as the record says
                workflow.after_final(app, message, app.backend.get(task_id) or {}, send=self.send)
                continue
            if count is None:
                log.warning("task %s finished, but its group %s is gone; nothing follows it", task_id, outcome.group)
                continue
            if count[0] < 0:
                # stored, yet not SUCCESS when counted: only if the server ran the count first
                # (a script it had lost, run again after the rest of the pipeline)
                count = app.backend.member_done(outcome.group, task_id)
            workflow.member_counted(app, message, workflow.lone_member(message), *count, send=self.send)
        app.broker.ack_many([o.delivery for o in members])
