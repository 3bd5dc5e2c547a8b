"""A batch of claimed deliveries being run, and the finish steps that settle them: stored and
acknowledged together (one transaction or round trip where the engine allows), one by one
when that fails, so one bad message never holds back the others."""
from __future__ import annotations

import logging
import threading
import time
from typing import Any

from .. import states, workflow
from ..broker import Delivery
from ..engine import Claim, Outcome

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


# a batch's unstarted tasks are checked in the store for revocations once earlier ones took this long
REVOKE_CHECK = 0.02


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

    def __init__(self, worker: Any, local: list):
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
        same transaction, one commit fewer per batch, or where no transaction spans the
        stores, in the round trip of the finish (``Engine.claims_in_finish``);
        ``Worker.reserve`` returns it.
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
                    # where no transaction spans the stores, the finish itself may claim
                    self._finish_plain(plain, acks, members, then_claim=claim_next and not self.grouped)
                if claim_next and self.grouped and not self.local:
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
        transaction spans the finish (an engine without ``shares_transaction``) they were: hand
        them back to the queue at once."""
        for deliveries, _ in self.local:
            for d in deliveries:
                if not self.grouped:
                    try:
                        self.app.broker.release(d)
                    except Exception:
                        log.warning(
                            "could not hand back %s; it returns when its lease runs out", d.message_id, exc_info=True
                        )
                self.worker._unhold(d)
        self.local.clear()

    def _run_alone(self, op, delivery: Delivery) -> None:
        try:
            with self.app.transaction():
                op()
        except self.store_errors:  # the store, not the message: redeliver
            self._forget_local()
            log.exception(
                "worker %s: finishing %s failed; its message will be redelivered", self.worker.name, delivery.message_id
            )
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
                    log.exception(
                        "worker %s: acknowledging %d finished message(s) failed; they will be redelivered",
                        self.worker.name,
                        len(ack),
                    )
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
        name = (
            f"task {message['name']!r} ({message['id']})" if message is not None else f"message {delivery.message_id}"
        )
        exc_type, reason = type(exc).__name__, f"{what} {name} failed: {_describe(exc)}"
        log.error("worker %s: %s", worker.name, reason, exc_info=exc)
        recorded = False
        if message is not None and token is not None:
            for follow in (True, False):       # with its error callbacks, else the record alone
                try:
                    with app.transaction():
                        recorded = app.backend.store_result(
                            message["id"],
                            states.FAILURE,
                            token=token,
                            exc_type=exc_type,
                            error=reason,
                            retries=message.get("retries", 0),
                        )
                        if recorded and follow:
                            workflow.on_failure(app, message, exc_type, reason, send=self.send)
                        if recorded and not dead_letter:
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
                    self._forget_local()
                    log.exception("worker %s: recording the failure of %s failed", worker.name, name)
            if recorded:
                worker._count(failed=1)
                if not dead_letter:
                    return
        try:
            app.broker.reject(delivery, reason)
        except Exception:
            log.exception(
                "worker %s: could not dead-letter %s; its lease will bring it back", worker.name, delivery.message_id
            )

    def _finish_plain(self, plain: list, acks: list = (), members: list = (), then_claim: bool = False) -> None:
        """Store the results, then acknowledge them and ``acks`` (finished already): one
        round trip for the lot where the engine allows. ``members`` (see ``add_member``) are
        stored and counted in that round trip; their advance follows, then their acks.
        ``then_claim``: the executor's next batch is claimed in that round trip where the
        engine does so (``claims_in_finish``) and nothing of this batch runs locally next."""
        app = self.app
        outcomes = [Outcome(d, task_id, states.SUCCESS, token, fields) for d, task_id, token, fields in plain]
        outcomes += [
            Outcome(d, task_id, states.SUCCESS, token, fields, group=cont["group"])
            for d, task_id, token, fields, _, cont in members
        ]
        claim = None
        if then_claim and app.engine.claims_in_finish and not self.local and not self.worker.has_claimed():
            claim = self.worker._next_claim()
        finished = app.engine.finish(outcomes, [d for d, _, _, _ in plain] + list(acks), then_claim=claim)
        if finished.claimed:        # the executor runs it next, whatever follows here
            self.worker._claimed.next = ([c.delivery for c in finished.claimed], _prepared(finished.claimed))
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
