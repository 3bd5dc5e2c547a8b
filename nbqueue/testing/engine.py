"""The contract suite every engine must pass: fused engines and split pairs alike.

Import the tests into a test module and provide fixtures:

- ``engine_factory()``: a new Engine on the same broker and backend stores each call;
- ``qname(label)``: a queue name of the test's own.

The suite speaks only the Engine interface (``send``, ``claim``, ``finish``, ``run_next``,
``extend``, ``hand_back``, ``transaction``) and reads records through its backend. An
engine's flags (``runs_next``, ``shares_transaction``) and its broker's ``Capabilities``
select what a test checks: the behaviour, or the fallback declared instead (never a skip).
"""
from __future__ import annotations

import threading
import time
import uuid

from nbqueue import states
from nbqueue.broker import Outgoing
from nbqueue.engine import Claim, NextClaim, Outcome

from . import wait_for


def _message(queue: str, name: str = "add", task_id: str | None = None) -> tuple[dict, Outgoing]:
    """A PENDING record and the Outgoing of a task message (as App.prepare makes them)."""
    from nbqueue.signature import encode_body

    task_id = task_id or str(uuid.uuid4())
    message = {"id": task_id, "name": name, "args": [], "kwargs": {}, "queue": queue}
    record = {"id": task_id, "name": name, "state": states.PENDING, "queue": queue, "created_at": time.time()}
    return record, Outgoing(id=task_id, body=encode_body(message), queue=queue)


def _send(engine, queue: str, n: int = 1) -> list[str]:
    pairs = [_message(queue) for _ in range(n)]
    engine.send([r for r, _ in pairs], [o for _, o in pairs])
    return [o.id for _, o in pairs]


def _claim_all(
    engine, queue: str, n: int, *, lease: float = 30.0, timeout: float = 5.0, worker: str = "w1"
) -> list[Claim]:
    got: list[Claim] = []
    deadline = time.monotonic() + timeout
    while len(got) < n and time.monotonic() < deadline:
        got += engine.claim([queue], limit=n - len(got), timeout=0.5, lease=lease, worker=worker)
    return got


def _success(claim: Claim, value: str = "1", group: str | None = None) -> Outcome:
    assert claim.message is not None
    return Outcome(claim.delivery, claim.message.id, states.SUCCESS, claim.token,
                   {"result": value, "error": None, "exc_type": None, "traceback": None}, group=group)


def _nothing_left(engine, queue: str, timeout: float = 0.3) -> bool:
    return engine.claim([queue], limit=10, timeout=timeout, lease=30, worker="w9") == []


# -- claim, finish, hand back ---------------------------------------------------------------------

def test_engine_claim_decodes_and_begins_then_finish_stores_and_acks(engine_factory, qname):
    engine, q = engine_factory(), qname("a")
    [task_id] = _send(engine, q)
    assert engine.backend.get(task_id)["state"] == states.PENDING
    [claim] = _claim_all(engine, q, 1)
    assert claim.message is not None and claim.message.id == task_id and claim.reason is None
    assert claim.begun and isinstance(claim.token, int)
    assert engine.backend.get(task_id)["state"] == states.RECEIVED
    done = engine.finish([_success(claim, "42")], [claim.delivery])
    assert done.stored == [True] and done.counts == []
    record = engine.backend.get(task_id)
    assert record["state"] == states.SUCCESS and record["result"] == "42"
    assert _nothing_left(engine, q)


def test_engine_claim_hands_a_malformed_message_out_with_its_reason(engine_factory, qname):
    engine, q = engine_factory(), qname("bad")
    engine.publish([Outgoing(id="not-json", body="{not json", queue=q)])
    [claim] = _claim_all(engine, q, 1)
    assert claim.message is None and claim.reason and not claim.begun
    engine.broker.reject(claim.delivery, claim.reason)


def test_engine_claim_leaves_tasks_the_caller_does_not_begin(engine_factory, qname):
    engine, q = engine_factory(), qname("a")
    [task_id] = _send(engine, q)
    [claim] = engine.claim([q], limit=1, timeout=5, lease=30, worker="w1", begins=lambda message: False)
    # a fused engine may begin every claimed task in the claim itself; a token is then handed out
    assert claim.begun is (engine.backend.get(task_id)["state"] == states.RECEIVED)
    engine.finish([], [claim.delivery])


def test_engine_hand_back_returns_unstarted_claims_at_once(engine_factory, qname):
    engine, q = engine_factory(), qname("a")
    ids = _send(engine, q, 3)
    claims = _claim_all(engine, q, 3)
    engine.hand_back([c.delivery for c in claims])
    again = _claim_all(engine, q, 3, worker="w2")
    assert sorted(c.delivery.message_id for c in again) == sorted(ids)
    assert all(c.delivery.lapsed == 0 and not c.delivery.dead_reason for c in again)
    engine.finish([_success(c) for c in again], [c.delivery for c in again])
    assert _nothing_left(engine, q)


def test_engine_extend_keeps_a_claim_from_others(engine_factory, qname):
    engine, q = engine_factory(), qname("a")
    _send(engine, q)
    [claim] = _claim_all(engine, q, 1, lease=0.5)
    engine.extend([claim.delivery], 30.0)
    time.sleep(0.8)
    assert _nothing_left(engine_factory(), q)
    engine.finish([_success(claim)], [claim.delivery])


# -- fencing ----------------------------------------------------------------------------------------

def test_engine_finish_refuses_a_stale_attempt(engine_factory, qname):
    engine, q = engine_factory(), qname("a")
    [task_id] = _send(engine, q)
    [claim] = _claim_all(engine, q, 1)
    newer = engine.backend.begin(task_id, worker="w2")          # a later attempt took the task over
    assert newer is not None and newer != claim.token
    done = engine.finish([_success(claim, "stale")], [claim.delivery])
    assert done.stored == [False]
    assert engine.backend.get(task_id)["state"] != states.SUCCESS
    assert engine.backend.store_result(task_id, states.SUCCESS, token=newer, result="2")
    assert engine.backend.get(task_id)["result"] == "2"


def test_engine_crash_between_store_and_ack_redelivers_a_final_task_not_run_again(engine_factory, qname):
    """The result is stored, the worker dies before its ack: the message comes back, and its
    claim shows the task final (token None, or left unbegun with a final record), so it is
    only acknowledged."""
    first, q = engine_factory(), qname("a")
    [task_id] = _send(first, q)
    [claim] = _claim_all(first, q, 1, lease=0.5)
    assert first.backend.store_results([(task_id, states.SUCCESS, claim.token, {"result": "7"})]) == [True]
    if first.broker.capabilities.leases_expire:
        time.sleep(0.7)
    else:
        first.broker.close()                                     # its connection dies with it
    second = engine_factory()
    [again] = _claim_all(second, q, 1, worker="w2", timeout=10)
    assert again.delivery.message_id == task_id and again.token is None
    assert second.backend.get(task_id)["state"] == states.SUCCESS and second.backend.get(task_id)["result"] == "7"
    second.finish([], [again.delivery])
    assert _nothing_left(second, q)


# -- fan-in ------------------------------------------------------------------------------------------

def test_engine_fan_in_reaches_its_total_once_under_concurrent_finishes(engine_factory, qname):
    q, n = qname("g"), 6
    setup = engine_factory()
    ids = _send(setup, q, n)
    gid = f"g-{uuid.uuid4().hex[:8]}"
    setup.backend.init_group(gid, ids)
    claims = _claim_all(setup, q, n)
    assert len(claims) == n
    completions: list[tuple] = []
    lock = threading.Lock()

    def finish(claim: Claim) -> None:
        engine = engine_factory()
        done = engine.finish([_success(claim, group=gid)], [claim.delivery])
        with lock:
            completions.extend(
                count for ok, count in zip(done.stored, done.counts) if ok and count and count[0] == count[1]
            )

    threads = [threading.Thread(target=finish, args=(c,)) for c in claims]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert completions == [(n, n)]
    # a repeated finish (a redelivery) counts its member once: the total stays where it is
    # (the workflow step fires the callback once, through ResultBackend.claim_once)
    again = setup.finish([_success(claims[0], "other", group=gid)], [])
    assert again.counts in ([(n, n)], [(-1, 0)], [(-1, n)]) and setup.backend.group_info(gid)["done"] == n
    assert setup.backend.get(claims[0].delivery.message_id)["result"] == "1"


def test_engine_fan_in_counts_a_member_only_once_its_result_is_stored(engine_factory, qname):
    engine, q = engine_factory(), qname("g")
    ids = _send(engine, q, 2)
    gid = f"g-{uuid.uuid4().hex[:8]}"
    engine.backend.init_group(gid, ids)
    claims = _claim_all(engine, q, 2)
    stale = claims[0]
    engine.backend.begin(stale.delivery.message_id, worker="w2")
    done = engine.finish([_success(stale, group=gid)], [])
    assert done.stored == [False]
    assert engine.backend.group_info(gid)["done"] == 0


def test_engine_finish_then_claims_the_next_batch_after_storing(engine_factory, qname):
    engine, q = engine_factory(), qname("then")
    ids = _send(engine, q, 3)
    [first] = _claim_all(engine, q, 1)
    assert first.message is not None
    then = NextClaim([q], limit=5, lease=30, worker="w1")
    done = engine.finish([_success(first, "7")], [first.delivery], then_claim=then)
    assert done.stored == [True] and engine.backend.get(first.message.id)["result"] == "7"
    if engine.claims_in_finish:
        assert len(done.claimed) == 2          # more were ready when it last claimed: claimed in the finish
    for claim in done.claimed:
        assert claim.message is not None and claim.begun and isinstance(claim.token, int)
        assert engine.backend.get(claim.message.id)["state"] == states.RECEIVED
    rest = done.claimed + _claim_all(engine, q, 2 - len(done.claimed))
    assert sorted(c.message.id for c in rest if c.message is not None) == sorted(ids[1:])   # each once
    assert _nothing_left(engine, q)
    done = engine.finish([_success(c) for c in rest], [c.delivery for c in rest], then_claim=then)
    assert done.stored == [True, True] and done.claimed == []
    assert all(engine.backend.get(i)["state"] == states.SUCCESS for i in ids)


# -- run next ----------------------------------------------------------------------------------------

def test_engine_run_next_claims_follow_ups_for_the_caller_or_leaves_them_to_publish(engine_factory, qname):
    engine, q = engine_factory(), qname("next")
    record, out = _message(q)
    with engine.transaction():
        engine.backend.create([record])
        taken = engine.run_next([out], lease=30, worker="w1")
    if not engine.runs_next:
        assert taken == []
        assert _nothing_left(engine, q)            # nothing published: the caller publishes what is not taken
        return
    [claim] = taken
    assert claim.delivery.message_id == out.id and claim.begun and isinstance(claim.token, int)
    assert engine.backend.get(out.id)["state"] == states.RECEIVED
    assert _nothing_left(engine, q)                # in flight for the caller, not for others
    assert engine.run_next([out], lease=30, worker="w2") == []     # an id in flight is not taken again
    assert engine.finish([_success(claim)], [claim.delivery]).stored == [True]


def test_engine_run_next_claims_come_back_when_their_worker_dies(engine_factory, qname):
    engine, q = engine_factory(), qname("next")
    if not engine.runs_next or not engine.broker.capabilities.leases_expire:
        assert engine.runs_next or engine.run_next([_message(q)[1]], lease=30, worker="w1") == []
        return
    record, out = _message(q)
    with engine.transaction():
        engine.backend.create([record])
        [claim] = engine.run_next([out], lease=0.5, worker="w1")
    time.sleep(0.7)
    [again] = _claim_all(engine_factory(), q, 1, worker="w2")
    assert again.delivery.message_id == out.id


# -- transactions ------------------------------------------------------------------------------------

def test_engine_transaction_rolls_back_both_stores_where_it_spans_them(engine_factory, qname):
    engine, q = engine_factory(), qname("tx")
    record, out = _message(q)
    try:
        with engine.transaction():
            engine.send([record], [out])
            raise RuntimeError("rolled back")
    except RuntimeError:
        pass
    if engine.shares_transaction:
        assert engine.backend.get(out.id) is None and _nothing_left(engine, q)
    else:                                          # each store on its own: the send stands
        assert engine.backend.get(out.id) is not None
        assert wait_for(lambda: engine.claim([q], limit=1, timeout=0.5, lease=30, worker="w1") != [], timeout=5)
