"""Contract suites every broker and result backend must pass.

Import the tests into a test module and provide fixtures:

- ``broker_factory()``: a new Broker connected to the same store each call;
- ``backend_factory()``: likewise for a ResultBackend;
- ``qname(label)``: a queue name of the test's own (deleted afterwards where needed).

Times are short real durations, since some brokers (RabbitMQ) keep their own time.
A broker's ``Capabilities`` (``priority``, ``leases_expire``, ``dedupes_publish``,
``delivers_once``) and the backend class (``lists_tasks``) select what a test
checks: the behaviour, or the fallback the store declares instead (never a skip).
"""
from __future__ import annotations

import threading
import time
import uuid

import pytest

from nbqueue import states
from nbqueue.broker import Outgoing

from . import wait_for


def _out(queue, body="{}", *, id=None, eta=None, priority=0):
    return Outgoing(id=id or str(uuid.uuid4()), body=body, queue=queue, eta=eta, priority=priority)


def _reserve_all(broker, queues, n, timeout=5.0, lease=30.0):
    got, deadline = [], time.monotonic() + timeout
    while len(got) < n and time.monotonic() < deadline:
        got += broker.reserve(queues, timeout=0.5, lease=lease, limit=n - len(got))
    return got


# -- broker contract -------------------------------------------------------------------

def test_broker_publish_then_reserve_returns_the_body(broker_factory, qname):
    broker, q = broker_factory(), qname("a")
    broker.publish(_out(q, '{"x": 1}', id="m1"))
    [d] = _reserve_all(broker, [q], 1)
    assert (d.message_id, d.queue, d.body) == ("m1", q, '{"x": 1}')
    assert d.attempt == 1 and not d.redelivered
    assert broker.ack(d) is True


def test_broker_reserve_on_empty_queue_returns_nothing_after_timeout(broker_factory, qname):
    broker, q = broker_factory(), qname("empty")
    started = time.monotonic()
    assert broker.reserve([q], timeout=0.3, lease=5) == []
    assert time.monotonic() - started >= 0.25


def test_broker_acked_message_is_not_delivered_again(broker_factory, qname):
    broker, q = broker_factory(), qname("a")
    broker.publish(_out(q))
    [d] = _reserve_all(broker, [q], 1)
    broker.ack(d)
    assert broker.reserve([q], timeout=0.3, lease=5) == []


def test_broker_queues_are_separate(broker_factory, qname):
    broker, a, b = broker_factory(), qname("a"), qname("b")
    broker.publish(_out(a, id="in-a"))
    assert broker.reserve([b], timeout=0.2, lease=5) == []
    [d] = _reserve_all(broker, [a, b], 1)
    assert d.message_id == "in-a"
    broker.ack(d)


def test_broker_publish_many_delivers_each_message_once(broker_factory, qname):
    broker, q = broker_factory(), qname("many")
    ids = [f"m{i}" for i in range(50)]
    broker.publish_many([_out(q, id=i) for i in ids])
    got = _reserve_all(broker, [q], 50)
    assert sorted(d.message_id for d in got) == sorted(ids)
    for d in got:
        assert broker.ack(d)
    assert broker.reserve([q], timeout=0.2, lease=5) == []


def test_broker_publishing_an_id_already_waiting_is_a_no_op(broker_factory, qname):
    broker, q = broker_factory(), qname("dup")
    broker.publish(_out(q, id="same"))
    broker.publish(_out(q, id="same"))
    if not broker.capabilities.dedupes_publish:
        # declared fallback (AMQP, SQS standard queues): a repeat is a second message with
        # the same id, so the result backend can refuse to run the task twice
        got = _reserve_all(broker, [q], 2, timeout=5.0)
        assert [d.message_id for d in got] == ["same", "same"]
        return
    got = _reserve_all(broker, [q], 2, timeout=1.0)
    assert [d.message_id for d in got] == ["same"]


def test_broker_keeps_delayed_message_back_until_its_eta(broker_factory, qname):
    broker, q = broker_factory(), qname("delay")
    eta = time.time() + 1.0
    broker.publish(_out(q, id="later", eta=eta))
    assert broker.reserve([q], timeout=0.4, lease=5) == []
    [d] = _reserve_all(broker, [q], 1, timeout=5)
    assert d.message_id == "later"
    assert time.time() >= eta - 0.01  # never handed out early
    broker.ack(d)


def test_broker_many_due_messages_come_out_together(broker_factory, qname):
    broker, q = broker_factory(), qname("due")
    eta = time.time() + 0.5
    broker.publish_many([_out(q, id=f"d{i}", eta=eta) for i in range(20)])
    time.sleep(0.8)
    got = _reserve_all(broker, [q], 20, timeout=3)
    assert len(got) == 20


def test_broker_higher_priority_first(broker_factory, qname):
    broker, q = broker_factory(), qname("prio")
    broker.publish_many([_out(q, id="low", priority=0), _out(q, id="high", priority=9), _out(q, id="mid", priority=5)])
    if not broker.capabilities.priority:
        # declared fallback (SQS): the priority is accepted and carried, not acted on; nothing is lost
        got = _reserve_all(broker, [q], 3)
        assert sorted((d.message_id, d.priority) for d in got) == [("high", 9), ("low", 0), ("mid", 5)]
        return
    time.sleep(0.2)
    order = []
    for _ in range(3):
        [d] = _reserve_all(broker, [q], 1)
        order.append(d.message_id)
        broker.ack(d)
    assert order == ["high", "mid", "low"]


def test_broker_retry_puts_message_back_with_new_body(broker_factory, qname):
    broker, q = broker_factory(), qname("retry")
    broker.publish(_out(q, '{"n": 1}', id="r"))
    [d] = _reserve_all(broker, [q], 1)
    assert broker.retry(d, body='{"n": 2}') is True
    [d2] = _reserve_all(broker, [q], 1)
    assert (d2.message_id, d2.body) == ("r", '{"n": 2}')
    broker.ack(d2)


def test_broker_retry_with_eta_delays_the_message(broker_factory, qname):
    broker, q = broker_factory(), qname("retry-eta")
    broker.publish(_out(q, id="r"))
    [d] = _reserve_all(broker, [q], 1)
    broker.retry(d, eta=time.time() + 1.0)
    assert broker.reserve([q], timeout=0.4, lease=5) == []
    [d2] = _reserve_all(broker, [q], 1, timeout=5)
    assert d2.message_id == "r"
    broker.ack(d2)


def test_broker_release_hands_message_back_at_once(broker_factory, qname):
    broker, q = broker_factory(), qname("release")
    broker.publish(_out(q, id="back"))
    [d] = _reserve_all(broker, [q], 1)
    assert broker.release(d)
    [d2] = _reserve_all(broker, [q], 1, timeout=2)
    assert d2.message_id == "back"
    broker.ack(d2)


def test_broker_reject_dead_letters_with_reason(broker_factory, qname):
    broker, q = broker_factory(), qname("dead")
    broker.publish(_out(q, "not json", id="bad"))
    [d] = _reserve_all(broker, [q], 1)
    assert broker.reject(d, "body is not JSON")
    assert broker.reserve([q], timeout=0.3, lease=5) == []
    dead = wait_for(lambda: [x for x in broker.dead_letters(q) if x["id"] == "bad"])
    assert "not JSON" in dead[0]["reason"]
    assert wait_for(lambda: _stat(broker, q)["dead"] == 1)


def test_broker_expired_lease_redelivers_and_fences_stale_ack(broker_factory, qname):
    broker, q = broker_factory(), qname("lease")
    broker.publish(_out(q, id="slow"))
    if not broker.capabilities.leases_expire:
        # declared fallback (AMQP): no lease timer; a delivery stays held until it is acknowledged
        # or its connection dies (test_broker_dead_consumer_message_is_delivered_to_another)
        [d1] = _reserve_all(broker, [q], 1, lease=0.3)
        time.sleep(0.5)
        assert broker.reserve([q], timeout=0.3, lease=30) == []
        assert broker.ack(d1) is True
        return
    [d1] = _reserve_all(broker, [q], 1, lease=0.3)
    time.sleep(0.5)
    [d2] = _reserve_all(broker, [q], 1, lease=30)
    assert d2.message_id == "slow" and d2.redelivered and d2.attempt == 2
    assert broker.ack(d1) is False      # the stale attempt cannot acknowledge
    assert broker.extend(d1, 30) is False
    assert broker.ack(d2) is True


def test_broker_extend_keeps_a_running_message_reserved(broker_factory, qname):
    broker, q = broker_factory(), qname("extend")
    broker.publish(_out(q, id="long"))
    [d] = _reserve_all(broker, [q], 1, lease=0.4)
    for _ in range(3):
        time.sleep(0.2)
        assert broker.extend(d, 0.4)
    assert broker.reserve([q], timeout=0.1, lease=5) == []
    assert broker.ack(d)


def test_broker_dead_consumer_message_is_delivered_to_another(broker_factory, qname):
    first, q = broker_factory(), qname("crash")
    first.publish(_out(q, id="orphan"))
    [d] = _reserve_all(first, [q], 1, lease=0.5)
    first.close()                      # the consumer goes away without acking
    second = broker_factory()
    [d2] = _reserve_all(second, [q], 1, timeout=5)
    assert d2.message_id == "orphan" and d2.redelivered
    assert second.ack(d2)


def test_broker_concurrent_reservers_never_share_a_message(broker_factory, qname):
    q = qname("race")
    producer = broker_factory()
    producer.publish_many([_out(q, id=f"c{i}") for i in range(200)])
    seen, lock = [], threading.Lock()

    def consume():
        b = broker_factory()
        idle = 0
        while idle < 3:
            ds = b.reserve([q], timeout=0.3, lease=30, limit=5)
            if not ds:
                idle += 1
                continue
            for d in ds:
                b.ack(d)
            with lock:
                seen.extend(d.message_id for d in ds)

    threads = [threading.Thread(target=consume) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    if not producer.capabilities.delivers_once:
        # declared fallback (SQS standard queues: at least once): none lost, none unknown;
        # a rare second copy is the result backend's to fence
        assert sorted(set(seen)) == sorted(f"c{i}" for i in range(200))
        return
    assert sorted(seen) == sorted(f"c{i}" for i in range(200))


def test_broker_stats_count_ready_delayed_in_flight(broker_factory, qname):
    broker, q = broker_factory(), qname("stats")
    broker.publish_many([_out(q, id="r1"), _out(q, id="r2"), _out(q, id="later", eta=time.time() + 60)])
    [d] = _reserve_all(broker, [q], 1)
    s = wait_for(lambda: _stat(broker, q) if _stat(broker, q)["in_flight"] == 1 else None)
    assert (s["ready"], s["delayed"], s["in_flight"]) == (1, 1, 1)
    broker.ack(d)


def test_broker_purge_empties_a_queue(broker_factory, qname):
    broker, q = broker_factory(), qname("purge")
    broker.publish_many([_out(q) for _ in range(5)])
    time.sleep(0.2)
    assert broker.purge(q) == 5
    assert broker.reserve([q], timeout=0.2, lease=5) == []


def test_broker_purge_messages_returns_the_bodies_it_removed_delayed_ones_too(broker_factory, qname):
    broker, q = broker_factory(), qname("purgebodies")
    outs = [_out(q, body=f'{{"n": {i}}}') for i in range(4)]
    outs.append(_out(q, body='{"n": "later"}', eta=time.time() + 600))
    broker.publish_many(outs)
    time.sleep(0.2)
    purged = broker.purge_messages(q)
    assert purged.count == 5
    if purged.complete:         # every removed message named
        assert sorted(purged.bodies) == sorted(o.body for o in outs)
    else:                       # the store removed some unseen (SQS's PurgeQueue names only the ready ones)
        assert set(purged.bodies) <= {o.body for o in outs}
    assert broker.reserve([q], timeout=0.2, lease=5) == []
    assert broker.purge_messages(q).bodies == []


def _stat(broker, q):
    for row in broker.stats():
        if row["queue"] == q:
            return row
    return {"queue": q, "ready": 0, "delayed": 0, "in_flight": 0, "dead": 0}


# -- result backend contract -------------------------------------------------------------

def test_backend_create_records_pending_and_keeps_existing(backend_factory):
    be = backend_factory()
    be.create([{"id": "t1", "name": "add", "args": "[1,2]", "kwargs": "{}", "queue": "q"}])
    assert be.get("t1")["state"] == states.PENDING
    assert be.begin("t1", worker="w") == 1
    be.create([{"id": "t1", "name": "add"}])
    assert be.get("t1")["state"] == states.STARTED


def test_backend_missing_record_is_none(backend_factory):
    assert backend_factory().get("nope") is None


def test_backend_success_is_stored_once(backend_factory):
    be = backend_factory()
    be.create([{"id": "t", "name": "n"}])
    token = be.begin("t")
    assert be.store_result("t", states.SUCCESS, token=token, result="3")
    assert not be.store_result("t", states.FAILURE, token=token, error="late")
    rec = be.get("t")
    assert (rec["state"], rec["result"], rec["error"]) == (states.SUCCESS, "3", None)
    assert rec["finished_at"] is not None and rec["started_at"] is not None
    assert be.begin("t") is None                      # final: a redelivery must not run it again


def test_backend_stale_attempt_cannot_overwrite_newer(backend_factory):
    be = backend_factory()
    be.create([{"id": "t", "name": "n"}])
    old = be.begin("t", worker="dead")
    new = be.begin("t", worker="alive")
    assert new == old + 1
    assert not be.store_result("t", states.SUCCESS, token=old, result='"stale"')
    assert be.store_result("t", states.SUCCESS, token=new, result='"fresh"')
    assert be.get("t")["result"] == '"fresh"'


def test_backend_failure_keeps_type_message_traceback(backend_factory):
    be = backend_factory()
    token = be.begin("f")
    be.store_result("f", states.FAILURE, token=token, error="boom", exc_type="ValueError", traceback="Traceback ...")
    rec = be.get("f")
    assert (rec["state"], rec["exc_type"], rec["error"], rec["traceback"]) == (
        states.FAILURE,
        "ValueError",
        "boom",
        "Traceback ...",
    )


def test_backend_set_state_and_update(backend_factory):
    be = backend_factory()
    be.create([{"id": "t", "name": "n"}])
    assert be.set_state("t", states.RETRY, retries=1, error="flaky")
    be.update("t", output="hello\n")
    rec = be.get("t")
    assert (rec["state"], rec["retries"], rec["output"]) == (states.RETRY, 1, "hello\n")


def test_backend_get_many_keeps_order(backend_factory):
    be = backend_factory()
    be.create([{"id": f"g{i}", "name": "n"} for i in range(5)])
    recs = be.get_many(["g3", "missing", "g0"])
    assert [r and r["id"] for r in recs] == ["g3", None, "g0"]


def test_backend_wait_returns_when_final_and_times_out_otherwise(backend_factory):
    be = backend_factory()
    be.create([{"id": "w", "name": "n"}])
    started = time.monotonic()
    assert be.wait(["w"], timeout=0.3) is False
    assert time.monotonic() - started >= 0.25

    def finish():
        other = backend_factory()
        time.sleep(0.2)
        other.store_result("w", states.SUCCESS, token=other.begin("w"), result="1")

    finisher = threading.Thread(target=finish)
    finisher.start()
    assert be.wait(["w"], timeout=10) is True
    finisher.join(10)


def test_backend_member_done_counts_each_member_once(backend_factory):
    be = backend_factory()
    be.init_group("grp", ["a", "b", "c"])
    assert be.member_done("grp", "a") == (1, 3)
    assert be.member_done("grp", "a") == (1, 3)      # a redelivered member counts once
    assert be.member_done("grp", "b") == (2, 3)
    assert be.member_done("grp", "c") == (3, 3)
    info = be.group_info("grp")
    assert info["members"] == ["a", "b", "c"] and info["done"] == 3


def test_backend_member_done_is_atomic_under_threads(backend_factory):
    be = backend_factory()
    members = [f"m{i}" for i in range(40)]
    be.init_group("race", members)
    finals, lock = [], threading.Lock()

    def finish(chunk):
        mine = backend_factory()
        for m in chunk:
            done, total = mine.member_done("race", m)
            if done == total:
                with lock:
                    finals.append(m)

    threads = [threading.Thread(target=finish, args=(members[i::4],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(finals) == 1


def test_backend_claim_chord_is_true_exactly_once(backend_factory):
    be = backend_factory()
    be.init_group("chord", ["x"])
    results = []
    threads = [
        threading.Thread(target=lambda: results.append(backend_factory().claim_chord("chord"))) for _ in range(6)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results.count(True) == 1


def test_backend_progress_counts_by_state_in_one_call(backend_factory):
    be = backend_factory()
    ids = [f"p{i}" for i in range(6)]
    be.init_group("prog", ids)
    be.create([{"id": i, "name": "n", "group_id": "prog"} for i in ids])
    be.begin("p0")
    be.store_result("p1", states.SUCCESS, token=be.begin("p1"), result="1")
    be.store_result("p2", states.FAILURE, token=be.begin("p2"), error="x")
    be.set_state("p3", states.RETRY)
    for counts in (be.progress(ids), be.progress(group_id="prog")):
        assert counts["total"] == 6
        assert (counts["running"], counts["succeeded"], counts["failed"], counts["retrying"], counts["pending"]) == (
            1,
            1,
            1,
            1,
            2,
        )


def test_backend_list_filters_and_forget(backend_factory):
    be = backend_factory()
    be.create([{"id": f"l{i}", "name": "even" if i % 2 == 0 else "odd", "created_at": 1000.0 + i} for i in range(6)])
    if be.lists_tasks == "none":
        # declared fallback (AMQP): no index of tasks; listing needs ids and says so without them
        from nbqueue.errors import UnsupportedOperation

        with pytest.raises(UnsupportedOperation):
            be.list()
        ids = [f"l{i}" for i in range(6)]
        assert [r["id"] for r in be.list(ids=ids, name="odd")] == ["l5", "l3", "l1"]
        assert len(be.list(ids=ids, limit=2)) == 2
    else:
        # "all", or "recent": the newest ones, and these six are the newest of this store
        assert {r["id"] for r in be.list(name="odd")} >= {"l1", "l3", "l5"}
        assert len(be.list(limit=2)) == 2
    assert be.forget(["l0", "l1"]) == 2
    assert be.get("l0") is None


def test_backend_results_expire(backend_factory):
    be = backend_factory()
    be.results_expire_in = 0.3
    be.store_result("e", states.SUCCESS, token=be.begin("e"), result="1")
    assert be.get("e") is not None
    time.sleep(0.6)
    be.expire()
    assert be.get("e") is None


def test_backend_workers_heartbeat_and_expiry(backend_factory):
    be = backend_factory()
    be.heartbeat("w1", {"host": "h", "concurrency": 2}, ttl=0.5)
    assert [w["worker_id"] for w in be.workers() if w["worker_id"] == "w1"] == ["w1"]
    time.sleep(0.7)
    assert not [w for w in be.workers() if w["worker_id"] == "w1"]


def test_backend_claim_once_and_kv(backend_factory):
    be = backend_factory()
    assert be.claim_once("tick:1", ttl=60)
    assert not backend_factory().claim_once("tick:1", ttl=60)
    be.kv_set("sched:a", "1")
    be.kv_set("sched:b", "2")
    assert be.kv_items("sched:") == {"sched:a": "1", "sched:b": "2"}
    be.kv_set("sched:a", None)
    assert be.kv_get("sched:a") is None



def test_broker_ack_many_acks_current_deliveries_and_refuses_stale_ones(broker_factory, qname):
    broker, q = broker_factory(), qname("ackmany")
    broker.publish_many([_out(q, id=f"a{i}") for i in range(3)])
    got = sorted(_reserve_all(broker, [q], 3), key=lambda d: d.message_id)
    assert broker.ack_many(got[:2]) == [True, True]
    assert broker.ack_many(got[:2]) == [False, False]     # acknowledged already: stale
    assert broker.ack_many([got[2]]) == [True]
    assert broker.reserve([q], timeout=0.3, lease=5) == []


# -- bounded redelivery ------------------------------------------------------------------

def _end_unfinished(broker_factory, broker, lease: float):
    """End the deliveries ``broker`` holds without settling them, as a worker that dies does:
    let their lease run out, or (a broker whose deliveries last as long as the consumer's
    connection) close it. Returns the broker to go on with."""
    if broker.capabilities.leases_expire:
        time.sleep(lease + 0.1)
        return broker
    broker.close()
    return broker_factory()


def _next_delivery(broker, q, lease: float, token: int):
    """The next delivery of the one message on ``q``; where the broker leaves counting a lapse
    to the worker (``maybe_lapsed``), counted as a worker would after finding an attempt
    begun at fencing token ``token`` that never finished."""
    [d] = _reserve_all(broker, [q], 1, lease=lease)
    if d.maybe_lapsed:
        assert broker.count_lapse(d, token)
        [d] = _reserve_all(broker, [q], 1, lease=lease)
        assert d.lapse_token == token
    return d


def test_broker_counts_deliveries_that_end_without_finishing_and_flags_the_last(broker_factory, qname):
    broker, q = broker_factory(), qname("lapses")
    broker.publish(_out(q, id="crashy"))
    counts = []
    for token in range(1, broker.max_deliveries + 1):
        d = _next_delivery(broker, q, 0.2, token)
        counts.append(d.lapsed)
        assert d.dead_reason is None and d.after_lapse == (d.lapsed > 0)
        broker = _end_unfinished(broker_factory, broker, 0.2)
    d = _next_delivery(broker, q, 30, broker.max_deliveries + 1)
    assert counts == list(range(broker.max_deliveries)) and d.lapsed == broker.max_deliveries
    assert f"delivered {broker.max_deliveries} times without finishing" in d.dead_reason
    assert broker.reject(d, d.dead_reason)
    dead = wait_for(lambda: [x for x in broker.dead_letters(q) if x["id"] == "crashy"])
    assert "without finishing" in dead[0]["reason"]


def test_broker_release_and_retry_are_not_deliveries_that_ended_unfinished(broker_factory, qname):
    broker, q = broker_factory(), qname("handback")
    broker.publish(_out(q, id="back"))
    for i in range(broker.max_deliveries + 1):
        [d] = _reserve_all(broker, [q], 1)
        assert d.lapsed == 0 and d.dead_reason is None
        assert broker.release(d) if i % 2 else broker.retry(d)
    [d] = _reserve_all(broker, [q], 1)
    assert d.lapsed == 0 and d.dead_reason is None
    assert broker.ack(d)


def test_broker_delivers_a_message_after_a_lapse_alone(broker_factory, qname):
    """So a message that kills its worker takes no batch-mates with it."""
    broker, q = broker_factory(), qname("alone")
    broker.publish(_out(q, id="suspect"))
    [d] = _reserve_all(broker, [q], 1, lease=0.2)
    broker = _end_unfinished(broker_factory, broker, 0.2)
    broker.publish_many([_out(q, id="b"), _out(q, id="c")])
    batches, deadline = [], time.monotonic() + 10
    while sum(map(len, batches)) < 3 and time.monotonic() < deadline:
        got = broker.reserve([q], timeout=0.5, lease=30, limit=3)
        if got:
            batches.append(sorted(x.message_id for x in got))
    assert sorted(sum(batches, [])) == ["b", "c", "suspect"]
    assert ["suspect"] in batches


def test_broker_defer_puts_a_message_back_still_marked_after_a_lapse(broker_factory, qname):
    """What a worker does when the earlier attempt of a redelivered task is still alive."""
    broker, q = broker_factory(), qname("defer")
    broker.publish(_out(q, id="slow"))
    _reserve_all(broker, [q], 1, lease=0.2)
    broker = _end_unfinished(broker_factory, broker, 0.2)
    [d] = _reserve_all(broker, [q], 1, lease=30)
    assert d.after_lapse and d.dead_reason is None
    lapsed = d.lapsed
    assert broker.defer(d, eta=time.time() + 0.5)
    assert broker.reserve([q], timeout=0.2, lease=30) == []
    [d2] = _reserve_all(broker, [q], 1, lease=30)
    assert d2.message_id == "slow" and d2.after_lapse and d2.lapsed == lapsed
    assert broker.ack(d2)
