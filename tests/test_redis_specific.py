"""What the Redis broker and backend promise beyond the contracts: memory:// is
in-process, due messages move in batches, blocking is push-driven, and connections
survive a drop. Real-Redis tests use the tests' Redis DB (conftest.REDIS_URL) under a
key prefix of their own, so they neither flush nor see other tests' keys; the tests
that SCRIPT FLUSH a server do it on a redis-server of this session's own
(conftest.session_redis), never on the shared one."""
from __future__ import annotations

import hashlib
import logging
import multiprocessing
import os
import queue
import socket
import threading
import time
import uuid

import pytest
import redis

from nbqueue import Signature, states
from nbqueue import chord as nbqueue_chord
from nbqueue.broker import Outgoing
from nbqueue.clock import ManualClock
from nbqueue.drivers.redis.backend import RedisBackend
from nbqueue.drivers.redis.broker import SIGNAL_TOKENS, RedisBroker
from nbqueue.drivers.redis.client import ScriptPipeline, fake_server
from nbqueue.drivers.redis.engine import RedisEngine
from nbqueue.engine import NextClaim, Outcome
from nbqueue.errors import ConnectionLost, ResultNotFound
from nbqueue.testing import wait_for

from conftest import REDIS_URL, RUN_ID, delete_prefix, require_server


def _memory_url() -> str:
    return f"memory://spec-{uuid.uuid4().hex[:10]}"


def _out(queue, id, *, eta=None, priority=0, body="{}"):
    return Outgoing(id=id, body=body, queue=queue, eta=eta, priority=priority)


@pytest.fixture
def real_redis():
    """Options for a real Redis under a key prefix of this test's own; its keys are deleted afterwards."""
    require_server("Redis", "127.0.0.1", 6379)
    prefix = f"nbqtest-{RUN_ID}-{uuid.uuid4().hex[:8]}:"
    name = f"nbq-{uuid.uuid4().hex[:8]}"
    yield {"key_prefix": prefix, "client_name": name}
    delete_prefix(REDIS_URL, prefix)


@pytest.fixture(params=["memory", "redis"])
def store(request):
    """(url, options) of a fresh memory:// server, or of real Redis under a prefix of its own."""
    if request.param == "memory":
        return _memory_url(), {}
    return REDIS_URL, request.getfixturevalue("real_redis")


@pytest.fixture(params=["memory", "own-redis"])
def flushable_app(request):
    """An App on a fresh memory:// server, or on a redis-server of this session's own
    (under a prefix of its own): the test may SCRIPT FLUSH it."""
    import nbqueue

    if request.param == "memory":
        app = nbqueue.App(_memory_url())
    else:
        server = request.getfixturevalue("session_redis")
        app = nbqueue.App(server.url, key_prefix=f"nbqtest-{uuid.uuid4().hex[:8]}")
    yield app
    app.close()


# -- memory:// --------------------------------------------------------------------------

def test_memory_url_shares_one_in_process_server_by_name_and_opens_no_socket(monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("memory:// must not open a socket")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    url = _memory_url()
    producer, consumer, elsewhere = RedisBroker(url), RedisBroker(url), RedisBroker(_memory_url())

    producer.publish(_out("q", "shared"))

    assert elsewhere.reserve(["q"], timeout=0) == []
    [d] = consumer.reserve(["q"], timeout=1)
    assert d.message_id == "shared" and consumer.ack(d)
    backend_a, backend_b = RedisBackend(url), RedisBackend(url)
    backend_a.store_result("t", states.SUCCESS, token=backend_a.begin("t"), result="1")
    assert backend_b.get("t")["state"] == states.SUCCESS


def test_memory_url_without_a_name_is_the_default_server():
    assert RedisBroker("memory://").client.connection_pool.connection_kwargs["server"] is fake_server("default")


# -- the reserve script ---------------------------------------------------------------------

def test_one_reserve_moves_every_due_delayed_message_to_ready():
    # Given 300 messages delayed until t0 + 10 on a stopped clock
    clock = ManualClock(1_000.0)
    broker = RedisBroker(_memory_url(), clock=clock)
    broker.publish_many([_out("q", f"d{i}", eta=1_010.0) for i in range(300)])
    assert _stat(broker, "q")["delayed"] == 300
    # When the time has come and one reserve claims one message
    clock.advance(20)
    [d] = broker.reserve(["q"], timeout=0, limit=1)
    # Then that single script call moved all the others to ready
    assert broker.client.zcard(broker._key("q", "delayed")) == 0
    assert broker.client.zcard(broker._key("q", "ready")) == 299
    assert d.message_id.startswith("d")


def test_reserve_moves_due_messages_in_batches_of_the_configured_size():
    clock = ManualClock(1_000.0)
    broker = RedisBroker(_memory_url(), clock=clock, options={"batch": 100})
    broker.publish_many([_out("q", f"d{i}", eta=1_001.0) for i in range(250)])
    clock.advance(5)
    assert len(broker.reserve(["q"], timeout=0, limit=500)) == 100
    assert len(broker.reserve(["q"], timeout=0, limit=500)) == 100
    assert len(broker.reserve(["q"], timeout=0, limit=500)) == 50


def test_reserve_requeues_an_expired_lease_without_a_reaper():
    clock = ManualClock(1_000.0)
    broker = RedisBroker(_memory_url(), clock=clock)
    broker.publish(_out("q", "m", priority=3))
    [first] = broker.reserve(["q"], timeout=0, lease=10)
    assert broker.reserve(["q"], timeout=0, lease=10) == []
    clock.advance(11)
    [second] = broker.reserve(["q"], timeout=0, lease=10)
    assert (second.message_id, second.attempt, second.priority) == ("m", 2, 3)
    assert not broker.retry(first) and not broker.reject(first, "stale")
    assert broker.ack(second)
    assert broker.stats() == [{"queue": "q", "ready": 0, "delayed": 0, "in_flight": 0, "dead": 0}]


def test_a_claim_of_many_from_one_queue_leaves_what_it_does_not_take_ready_with_its_place(store):
    """A message after a lapse is claimed alone: the messages behind it, taken off the ready
    set with it, stay ready with their scores (the next claim takes them, in order)."""
    url, options = store
    clock = ManualClock(1_000.0)
    broker = RedisBroker(url, clock=clock, options=options)
    broker.publish(_out("q", "lapsed", priority=9))
    assert [d.message_id for d in broker.reserve(["q"], timeout=0, lease=10)] == ["lapsed"]
    broker.publish_many([_out("q", "p1"), _out("q", "p2", priority=1), _out("q", "p3")])
    scores = broker.client.zrange(broker._key("q", "ready"), 0, -1, withscores=True)
    clock.advance(11)
    [alone] = broker.reserve(["q"], timeout=0, limit=5, lease=10)
    assert (alone.message_id, alone.lapsed) == ("lapsed", 1)
    assert broker.client.zrange(broker._key("q", "ready"), 0, -1, withscores=True) == scores
    assert [d.message_id for d in broker.reserve(["q"], timeout=0, limit=2, lease=10)] == ["p2", "p1"]
    assert [d.message_id for d in broker.reserve(["q"], timeout=0, limit=2, lease=10)] == ["p3"]
    broker.close()


def test_a_claim_that_empties_its_queue_gives_the_earliest_lease_deadline_as_next_due(store):
    """The next due time of a claim that leaves nothing ready counts the leases it has just
    handed out, earlier or later than those already in flight."""
    url, options = store
    clock = ManualClock(1_000.0)
    broker = RedisBroker(url, clock=clock, options=options)
    broker.publish_many([_out("q", "a"), _out("q", "b"), _out("q", "c")])
    assert broker._claim(["q"], clock.time(), 100.0, 1)[1:] == (None, True)
    _, next_due, more = broker._claim(["q"], clock.time(), 10.0, 1)     # b: earlier than a's lease
    assert next_due is None and more
    _, next_due, more = broker._claim(["q"], clock.time(), 200.0, 5)    # c: later than b's
    assert (next_due, more) == (1_010.0, False)
    broker.publish(_out("q", "d"))
    _, next_due, _ = broker._claim(["q"], clock.time(), 5.0, 5)         # d: the earliest of all
    assert next_due == 1_005.0
    broker.close()


def test_priority_order_holds_across_queues_and_dead_letters_keep_the_reason():
    broker = RedisBroker(_memory_url())
    broker.publish_many(
        [_out("a", "a-low", priority=1), _out("b", "b-high", priority=8), _out("a", "a-mid", priority=5)]
    )
    got = broker.reserve(["a", "b"], timeout=0, limit=3)
    assert [d.message_id for d in got] == ["b-high", "a-mid", "a-low"]
    assert broker.reject(got[0], "cannot decode")
    assert broker.dead_letters() == [{"id": "b-high", "queue": "b", "reason": "cannot decode", "body": "{}"}]
    assert broker.purge("a") == 2 and broker.purge("b") == 1
    assert broker.stats() == []


def test_purge_touches_only_keys_under_its_own_prefix():
    url = _memory_url()
    mine, theirs = RedisBroker(url, options={"key_prefix": "app"}), RedisBroker(url)
    assert (mine.prefix, theirs.prefix) == ("app:", "nbq:")
    mine.client.set("q:foreign", "kept")
    mine.publish_many([_out("q", "a1"), _out("q", "a2", eta=time.time() + 60)])
    theirs.publish(_out("q", "b1"))
    assert mine.purge("q") == 2
    assert mine.client.get("q:foreign") == "kept"
    assert [d.message_id for d in theirs.reserve(["q"], timeout=0)] == ["b1"]
    assert not [k for k in mine.client.scan_iter("app:*") if not k.startswith("app:seq")]


# -- blocking without polling -----------------------------------------------------------------

def test_blocked_reserve_wakes_on_a_publish_from_another_client(store):
    url, options = store
    # max_block 10 s: only the signal can wake the reserver in time
    consumer = RedisBroker(url, options={**options, "max_block": 10})
    producer = RedisBroker(url, options=options)
    got = []
    reserver = threading.Thread(target=lambda: got.extend(consumer.reserve(["q"], timeout=10)))
    reserver.start()
    time.sleep(0.1)
    published = time.monotonic()
    producer.publish(_out("q", "ping"))
    reserver.join(5)
    assert [d.message_id for d in got] == ["ping"]
    assert time.monotonic() - published < 1.0
    consumer.close()
    producer.close()


def test_a_reserver_that_emptied_its_queues_still_wakes_for_new_delayed_and_expired_work(store):
    """After a claim that left no ready message, the next reserve blocks on the signal
    lists without claiming first; a publish from another client, a delayed message
    falling due and another reserver's expired lease must all still reach it."""
    url, options = store
    consumer = RedisBroker(url, options={**options, "max_block": 10})
    producer = RedisBroker(url, options=options)
    producer.publish(_out("q", "first"))
    [first] = consumer.reserve(["q"], timeout=5)        # emptied the queue: the next call skips its claim
    assert consumer.ack(first)
    producer.publish(_out("q", "published"))
    assert [d.message_id for d in consumer.reserve(["q"], timeout=5)] == ["published"]
    producer.publish(_out("q", "later", eta=time.time() + 0.5))
    started = time.monotonic()
    [later] = consumer.reserve(["q"], timeout=5)
    assert later.message_id == "later" and 0.3 < time.monotonic() - started < 3.0
    assert consumer.ack(later)
    producer.publish(_out("q", "abandoned"))
    [abandoned] = producer.reserve(["q"], timeout=5, lease=0.5)    # a worker that dies with it
    again = consumer.reserve(["q"], timeout=5)
    assert [d.message_id for d in again] == ["abandoned"] and again[0].attempt == 2
    consumer.close()
    producer.close()


def test_a_claim_that_leaves_a_queue_with_nothing_ready_drops_its_wake_up_tokens(store):
    """Given messages published while nobody waited (a wake-up token each), when claims take
    them without waiting, then the queue's tokens stay while messages are ready and are gone
    once a claim leaves nothing ready, so a later wait is not ended by a token whose message
    was claimed already."""
    url, options = store
    broker = RedisBroker(url, options=options)
    signal = broker._key("q", "signal")
    broker.publish_many([_out("q", "m1"), _out("q", "m2"), _out("other", "o1")])
    assert broker.client.llen(signal) == 2
    assert [d.message_id for d in broker.reserve(["q"], limit=1)] == ["m1"]
    assert broker.client.llen(signal) == 2                 # m2 is still ready
    assert [d.message_id for d in broker.reserve(["q", "other"], limit=1)] == ["m2"]
    assert broker.client.exists(signal) == 0 and broker.client.llen(broker._key("other", "signal")) == 1
    assert [d.message_id for d in broker.reserve(["other"], limit=5)] == ["o1"]
    assert broker.client.exists(broker._key("other", "signal")) == 0
    broker.close()


def test_wake_makes_a_blocked_reserve_return_at_once():
    broker = RedisBroker(_memory_url(), options={"max_block": 10})
    got = []
    reserver = threading.Thread(target=lambda: got.append(broker.reserve(["q"], timeout=10)))
    reserver.start()
    time.sleep(0.1)
    woken = time.monotonic()
    broker.wake()
    reserver.join(5)
    assert got == [[]] and time.monotonic() - woken < 1.0


def test_waiter_blocks_on_the_done_notification(store):
    url, options = store
    waiter, worker = RedisBackend(url, options=options), RedisBackend(url, options=options)
    waiter.create([{"id": "t", "name": "n"}])
    returned = []
    blocker = threading.Thread(target=lambda: (waiter._block(["t"], 0, 10.0), returned.append(time.monotonic())))
    blocker.start()
    time.sleep(0.1)
    stored = time.monotonic()
    worker.store_result("t", states.SUCCESS, token=worker.begin("t"), result="1")
    blocker.join(5)
    assert returned and returned[0] - stored < 1.0
    assert waiter.wait(["t"], timeout=1)


def test_a_finish_that_finds_its_queues_empty_stores_first_then_waits_in_its_round_trip_for_the_next_task(
        store, monkeypatch):
    """Given a worker thread whose last claim emptied its queue, when its finish claims the
    next batch, then the result is stored and the message acked before the claim waits for a
    publish, in the same round trip; a publish ends the wait with the new task claimed and
    begun, and ``wake()`` ends it with nothing; a finish counting group members does not wait."""
    from nbqueue.drivers.redis import engine as engine_module

    monkeypatch.setattr(engine_module, "FINISH_WAIT", 30.0)
    url, options = store
    engine = RedisEngine(RedisBroker(url, options={**options, "max_block": 30}), RedisBackend(url, options=options))
    sender = RedisEngine(RedisBroker(url, options=options), RedisBackend(url, options=options))
    nxt = NextClaim(queues=["q"], limit=5, lease=10, worker="w")
    steps: queue.Queue = queue.Queue()
    done: list = []

    def worker_thread():        # claims and finishes in one thread, as an executor does
        while (step := steps.get()) is not None:
            done.append(step())

    def finish(claim, group=None):
        return engine.finish([Outcome(claim.delivery, claim.delivery.message_id, states.SUCCESS, claim.delivery.token,
                                      {"result": "1"}, group=group)], [claim.delivery], then_claim=nxt)

    def run(step):
        steps.put(step)
        wait_for(lambda: len(done) == ran + 1 or engine.broker._waiting == 1, timeout=10, message="a step")

    executor = threading.Thread(target=worker_thread)
    executor.start()
    ran = 0
    # a claim that waits for t1 (so its publish signal is taken) and empties the queue
    run(lambda: engine.claim(["q"], limit=5, timeout=10, lease=10, worker="w"))
    sender.send([{"id": "t1", "name": "add"}], [_out("q", "t1")])
    wait_for(lambda: len(done) == 1, timeout=10, message="t1 claimed")
    ran, [c1] = 1, done[0]
    run(lambda: finish(c1))
    assert engine.broker._waiting == 1 and len(done) == 1                  # the finish waits
    assert sender.backend.get("t1")["state"] == states.SUCCESS          # stored before the wait
    assert sender.broker.stats()[0]["in_flight"] == 0                     # and acked
    sender.send([{"id": "t2", "name": "add"}], [_out("q", "t2")])
    wait_for(lambda: len(done) == 2, timeout=10, message="the finish returns")
    first = done[1]
    assert first.stored == [True] and [c.delivery.message_id for c in first.claimed] == ["t2"]
    assert first.claimed[0].delivery.token == 1                          # begun in the claim

    ran = 2
    run(lambda: finish(first.claimed[0]))
    assert engine.broker._waiting == 1 and len(done) == 2
    engine.broker.wake()
    wait_for(lambda: len(done) == 3, timeout=10, message="the finish returns")
    assert done[2].stored == [True] and done[2].claimed == []

    engine.backend.init_group("g", ["t3"])
    sender.send([{"id": "t3", "name": "add", "group_id": "g"}], [_out("q", "t3")])
    ran = 3
    run(lambda: engine.claim(["q"], limit=5, timeout=1, lease=10, worker="w"))     # empties the queue
    [c3] = done[3]
    ran = 4
    run(lambda: finish(c3, "g"))
    assert len(done) == 5 and done[4].counts == [(1, 1)] and done[4].claimed == []   # returned without a wait
    steps.put(None)
    executor.join(10)
    engine.broker.close()
    engine.backend.close()
    sender.broker.close()
    sender.backend.close()


def test_begin_many_hands_out_tokens_in_one_call_and_skips_final_records():
    backend = RedisBackend(_memory_url())
    backend.create([{"id": "old", "name": "n"}, {"id": "done", "name": "n"}])
    backend.store_result("done", states.SUCCESS, token=backend.begin("done"), result="1")
    calls = []
    script = backend._begin
    backend._begin = lambda **kw: calls.append(kw) or script(**kw)
    tokens = backend.begin_many(
        ["old", "new", "done"], worker="w1", fields={"new": {"name": "add", "queue": "q", "retries": 2}}
    )
    assert tokens == {"old": 1, "new": 1, "done": None} and len(calls) == 1
    new = backend.get("new")
    assert (new["state"], new["name"], new["queue"], new["retries"], new["worker"]) == (
        states.RECEIVED,
        "add",
        "q",
        2,
        "w1",
    )
    assert backend.get("old")["state"] == states.RECEIVED and backend.begin("old") == 2


def _twin_scenario(url: str) -> list:
    """Every call of a broker, backend and engine on ``url`` whose scripts have Python twins,
    through the paths that branch in them, with what each returned."""
    clock = ManualClock()
    broker = RedisBroker(url, clock=clock)
    backend = RedisBackend(url, clock=clock, options={"results_expire_in": 600})
    engine = RedisEngine(broker, backend)
    kept = RedisEngine(broker, RedisBackend(url, clock=clock))     # results that do not expire
    seen: list = []

    def claims(claimed):
        seen.append([(c.delivery.message_id, c.delivery.queue, c.delivery.body, c.delivery.attempt,
                      c.delivery.priority, c.delivery.lapsed, c.delivery.token, c.token, c.begun) for c in claimed])
        return claimed

    def finished(done):
        seen.append((done.stored, done.counts))
        return claims(done.claimed)

    def refused(call, *args):
        try:
            call(*args)
        except redis.ResponseError as exc:
            seen.append(str(exc))
        else:
            seen.append("no error")

    engine.send([{"id": f"t{i}", "name": "add"} for i in range(6)],
                [_out("a", "t0"), _out("a", "t1", priority=7), _out("b", "t2", eta=clock.time() + 5),
                 _out("b", "t3", body="\u00e9\u20ac"), _out("a", "t4"), _out("a", "t5")])
    broker.publish_many([_out("a", "t0", body="again"), _out("c", "solo")])     # t0 is known: left alone
    # records alone: a new one, one known (left alone), one with a state and creation time of its own
    backend.create([{"id": "rec", "name": "add"}, {"id": "t0", "name": "other"},
                    {"id": "rec2", "name": "add", "state": states.STARTED, "created_at": 3.5}])
    # signals: as many tokens as the limit (no trim), then one more (trimmed back to the limit)
    broker.publish_many([_out("d", f"d{i}", priority=i % 10) for i in range(SIGNAL_TOKENS + 6)])
    broker.publish_many([_out("d", "late", eta=clock.time() + 1000)])
    first = claims(engine.claim(["a", "b"], limit=2, timeout=0, lease=10, worker="w1"))
    # stored with fields to delete, its ack acts once the record is final
    finished(engine.finish([Outcome(first[0].delivery, "t1", states.SUCCESS, first[0].delivery.token,
                                    {"result": "2", "traceback": None, "error": None})], [first[0].delivery]))
    # not stored (wrong token): its ack, held to the record, does not act
    finished(engine.finish([Outcome(None, "t0", states.SUCCESS, 99, {"result": "x"})], [first[1].delivery]))
    seen.append(broker.extend(first[1].delivery, 30))
    clock.advance(6)                            # t2 due
    rest = claims(engine.claim(["a", "b"], limit=10, timeout=0, lease=10, worker="w1"))
    seen.append([broker.retry(rest[0].delivery, body="retried"), broker.reject(rest[1].delivery, "bad"),
                 broker.retry(rest[2].delivery, eta=clock.time() + 100), broker.ack(first[0].delivery)])
    refused(broker._settle_op, rest[3].delivery, "bogus")
    seen.append(broker.ack_many([rest[3].delivery], records={rest[3].delivery.message_id:
                                                             backend._rec(rest[3].delivery.message_id)}))
    seen.append(broker.reserve(["c"], lease=1))
    clock.advance(40)                           # leases of t0 and solo run out
    again = claims(engine.claim(["a", "b", "c"], limit=10, timeout=0, lease=10, worker="w2"))
    lapsed = claims(engine.claim(["a", "b", "c"], limit=10, timeout=0, lease=10, worker="w2"))
    # a new id, one known, one whose message is gone and record final
    claims(engine.run_next([_out("a", "next"), _out("a", "t4"), _out("a", "t1")], lease=10, worker="w2"))
    seen.append(backend.begin_many(["t4", "t1", "new"], worker="w3", fields={"new": {"name": "x", "retries": 3}}))
    seen.append([backend.set_state("t5", states.STARTED, token=1), backend.set_state("t5", states.FAILURE),
                 backend.set_state("t5", states.SUCCESS), backend.set_state("fresh", states.STARTED, token=2),
                 backend.set_state("t3", states.RETRY, worker=None, error="e")])
    # the worker's finish: group members counted behind their results, the next batch claimed in it
    backend.init_group("grp", ["m1", "m2", "m3"])
    engine.send([{"id": m, "name": "add", "group_id": "grp"} for m in ("m1", "m2", "m3")],
                [_out("e", m) for m in ("m1", "m2", "m3")])
    nxt = NextClaim(queues=["e"], limit=1, lease=10, worker="w4")
    got = finished(engine.finish([Outcome(rest[3].delivery, rest[3].delivery.message_id, states.SUCCESS,
                                          rest[3].delivery.token, {"result": "3", "finished_at": 1.5}),
                                  Outcome(again[0].delivery, "t3", states.SUCCESS, again[0].delivery.token,
                                          {"result": "ok", "error": None})],
                                 [rest[3].delivery, again[0].delivery, *(c.delivery for c in lapsed)],
                                 then_claim=nxt))
    got += finished(engine.finish([Outcome(got[0].delivery, "m1", states.SUCCESS, got[0].delivery.token,
                                           {"result": "1"}, group="grp")], [got[0].delivery], then_claim=nxt))
    got += claims(engine.claim(["e"], limit=5, timeout=0, lease=10, worker="w4"))
    # results kept (no expiry), a failure not counted, a new record, a state that is not final,
    # an ack whose attempt is stale and one of a message already gone
    finished(kept.finish([Outcome(got[1].delivery, "m2", states.FAILURE, got[1].delivery.token, {"error": "boom"},
                                  group="grp"),
                          Outcome(got[2].delivery, "m3", states.SUCCESS, got[2].delivery.token + 1, {}, group="grp"),
                          Outcome(None, "ghost", states.RETRY, None, {"error": "later"}),
                          Outcome(None, "ghost2", states.REVOKED, None, {})],
                         [got[1].delivery, got[2].delivery, first[1].delivery, first[0].delivery]))
    finished(kept.finish([], [got[2].delivery]))
    # one queue: a message after a lapse, found behind another, is left for the next claim
    # with its place in the ready set, then claimed alone
    broker.publish_many([_out("f", "f1")])
    claims(engine.claim(["f"], limit=5, timeout=0, lease=10, worker="w5"))
    clock.advance(11)
    broker.publish_many([_out("f", "f2"), _out("f", "f3", priority=9)])
    claims(engine.claim(["f"], limit=5, timeout=0, lease=10, worker="w5"))
    seen.append(broker.client.zrange(broker._key("f", "ready"), 0, -1, withscores=True))
    claims(engine.claim(["f"], limit=5, timeout=0, lease=10, worker="w5"))
    seen.append(broker.stats())
    seen.append(broker.dead_letters())
    client = broker.client
    for key in sorted(client.keys("*")):
        kind = client.type(key)
        if kind == "hash":
            value = client.hgetall(key)
        elif kind == "zset":
            value = client.zrange(key, 0, -1, withscores=True)
        elif kind == "list":
            value = client.lrange(key, 0, -1)
        elif kind == "set":
            value = sorted(client.smembers(key))
        else:
            value = client.get(key)
        seen.append((key, kind, value, client.pttl(key) > 0))
    return seen


def test_memory_runs_the_scripts_as_their_python_twins_with_the_lua_scripts_results(monkeypatch):
    """The Lua scripts fakeredis would run and their Python twins (nbqueue.drivers.redis.twins)
    leave the same keys and return the same replies, and memory:// runs the twins: each
    one of them in the scenario, none of their scripts as Lua."""
    import fakeredis.commands_mixins.scripting_mixin as scripting

    from nbqueue.drivers.redis import memory

    as_lua: list[bytes] = []
    lua_eval = scripting.ScriptingCommandsMixin.eval

    def spy_eval(sock, script, *args):
        as_lua.append(hashlib.sha1(script).hexdigest().encode())
        return lua_eval(sock, script, *args)

    twins_ran: set[bytes] = set()

    def spied(sha, fn):
        def run(*args):
            twins_ran.add(sha)
            return fn(*args)
        return run

    monkeypatch.setattr(scripting.ScriptingCommandsMixin, "eval", spy_eval)
    twins = dict(memory.TWINS)
    monkeypatch.setattr(memory, "TWINS", {sha: spied(sha, fn) for sha, fn in twins.items()})
    with_twins = _twin_scenario(_memory_url())
    assert not set(as_lua) & set(twins)         # no script with a twin ran as Lua
    assert twins_ran == set(twins)              # and the scenario runs every twin
    monkeypatch.setattr(memory, "TWINS", {})
    as_lua.clear()
    with_lua = _twin_scenario(_memory_url())
    assert set(twins) <= set(as_lua)           # the same scripts, as Lua
    assert with_twins == with_lua



def test_memory_runs_the_hot_scripts_on_the_stored_values_with_the_lua_scripts_results(monkeypatch):
    """The scripts memory:// runs in place of their twins (nbqueue.drivers.redis.memory.NATIVE)
    leave the same keys and return the same replies as the Lua scripts, each of them run; with
    a subscriber on the server (who may hear keyspace events) the twins run instead."""
    import fakeredis

    from nbqueue.drivers.redis import memory

    ran: list = []

    def spied(fn):
        def run(*args, **kwargs):
            ran.append(fn)
            return fn(*args, **kwargs)
        return run

    monkeypatch.setattr(memory, "NATIVE", {twin: spied(fn) for twin, fn in memory.NATIVE.items()})
    natively = _twin_scenario(_memory_url())
    assert {fn.__name__ for fn in ran} == {"_native_send", "_native_finish", "_native_reserve"}
    monkeypatch.setattr(memory, "TWINS", {})
    assert natively == _twin_scenario(_memory_url())
    monkeypatch.setattr(memory, "TWINS", dict(memory.twins.TWINS))
    ran.clear()
    url = _memory_url()
    listener = fakeredis.FakeRedis(server=fake_server(url[len("memory://"):])).pubsub()
    listener.psubscribe("__keyspace*")
    try:
        assert _twin_scenario(url) == natively and not ran
    finally:
        listener.close()


def _spoiled_scenario(url: str, spoil) -> list:
    """send, claim and finish on ``url`` with ``spoil(client)`` run first (keys of another type,
    a hash with a field expiry): what each returned or raised, then every stored key."""
    import fakeredis

    clock = ManualClock()
    broker = RedisBroker(url, clock=clock)
    backend = RedisBackend(url, clock=clock, options={"results_expire_in": 600})
    engine = RedisEngine(broker, backend)
    client = fakeredis.FakeRedis(server=fake_server(url[len("memory://"):]))
    spoil(client)
    seen: list = []

    def attempt(call, *args, **kwargs):
        try:
            seen.append(call(*args, **kwargs))
        except redis.ResponseError as exc:
            seen.append(("error", str(exc)))

    attempt(engine.send, [{"id": f"t{i}", "name": "add"} for i in range(3)], [_out("a", f"t{i}") for i in range(3)])
    claimed: list = []
    attempt(lambda: claimed.extend(engine.claim(["a"], limit=3, timeout=0, lease=10, worker="w")))
    attempt(lambda: [(c.delivery.message_id, c.token) for c in claimed])
    attempt(lambda: engine.finish([Outcome(c.delivery, c.delivery.message_id, states.SUCCESS, c.token,
                                           {"result": "1", "error": None}) for c in claimed],
                                  [c.delivery for c in claimed]).stored)
    seen += [(key, kind, value, expiry is not None)
             for key, kind, value, expiry in _dump(client.connection_pool.connection_kwargs["server"].dbs[0])]
    return seen


@pytest.mark.parametrize("spoil", [
    lambda c: c.set("nbq:r:t1", "x"),                           # a record key of another type
    lambda c: c.set("nbq:q:a:signal", "x"),                     # the signal list: fails after the writes
    lambda c: c.set("nbq:seq", "x"),                            # INCR of text
    lambda c: c.rpush("nbq:results", "x"),                      # the results index
    lambda c: (c.hset("nbq:r:t0", mapping={"id": "t0", "state": "PENDING", "token": "0", "x": "1"}),
               c.hpexpire("nbq:r:t0", 100_000, "x")),           # a record with a field expiry
    lambda c: c.set("nbq:expiring", "x"),                       # the index of expiring results
    lambda c: c.set("nbq:done:t2", "x"),                        # a done list
    lambda c: c.set("nbq:q:a:inflight", "x"),                   # the leases
], ids=["record", "signal", "seq", "index", "field-expiry", "expiring", "done", "inflight"])
def test_memory_hot_scripts_fail_and_write_as_their_twins_on_keys_they_do_not_expect(monkeypatch, spoil):
    """The scripts memory:// runs on the stored values (nbqueue.drivers.redis.memory.NATIVE) give
    the replies and errors of their twins and leave the same keys where keys are not what the
    scripts write (another type, a hash with a field expiry)."""
    from nbqueue.drivers.redis import memory

    natively = _spoiled_scenario(_memory_url(), spoil)
    monkeypatch.setattr(memory, "NATIVE", {})
    assert natively == _spoiled_scenario(_memory_url(), spoil)


def test_memory_script_reads_answer_as_the_command_table_does():
    """The reads a twin's ``redis.call`` answers itself (nbqueue.drivers.redis.memory.Call)
    give what fakeredis' command table gives, for keys missing, expired, of the wrong type,
    and a hash with a field expiry (an HDEL among them of fields no hash has: it writes nothing)."""
    import fakeredis

    from nbqueue.drivers.redis import memory

    url = _memory_url()
    client = fakeredis.FakeRedis(server=fake_server(url[len("memory://"):]))
    client.hset("h", mapping={"a": "1", "b": "2"})
    client.hset("hx", mapping={"a": "1", "b": "2"})
    client.hpexpire("hx", 1, "a")
    client.zadd("z", {"m1": 5.5, "m2": 1e20, "m3": 3})
    client.zadd("far", {"m": 10})
    client.set("s", "v")
    client.hset("gone", "a", "1")
    client.pexpire("gone", 1)
    time.sleep(0.01)
    sock = memory.MemorySocket(fake_server(url[len("memory://"):]), db=0, client_class=fakeredis.FakeRedis)
    call = memory.Call(sock)
    reads = []
    for key in (b"h", b"hx", b"z", b"far", b"s", b"gone", b"missing"):
        reads += [("exists", key), ("hget", key, b"a"), ("hget", key, b"x"), ("hmget", key, b"a", b"b", b"x"),
                  ("hdel", key, b"x", b"y"), ("zcard", key), ("zscore", key, b"m1"), ("zscore", key, b"m3"),
                  ("zscore", key, b"x"), ("zrange", key, 0, 0, b"WITHSCORES"),
                  ("zrangebyscore", key, b"-inf", b"4", b"LIMIT", 0, 10),
                  ("zrangebyscore", key, b"-inf", b"3", b"LIMIT", 0, 10),
                  ("zrangebyscore", key, b"-inf", b"1e30", b"LIMIT", 0, 1)]

    def answer(run, name, args):
        with sock._server.lock:
            sock._db.time = time.time()
            try:
                return run(name, args)
            except fakeredis._helpers.SimpleError as exc:
                return ("error", exc.value)

    fast = [answer(lambda n, a: call(n, *a), r[0], r[1:]) for r in reads]
    table = [answer(call.command, r[0], r[1:]) for r in reads]
    assert fast == table
    assert ("error", memory.WRONGTYPE_MSG) in fast and [b"m3", b"3"] in fast and b"5.5" in fast
    assert answer(lambda n, a: call(n, *a), "hdel", (b"h", b"a", b"x")) == 1     # a field there: deleted
    assert client.hgetall("h") == {b"b": b"2"}


def _dump(db) -> list:
    """Every stored key of a fakeredis database: (key, type, value, expiry)."""
    out = []
    for key, item in sorted(db._dict.items()):
        value = item.value
        if hasattr(value, "_values"):
            shown = dict(value._values)
        elif hasattr(value, "_byscore"):
            shown = list(value._byscore)
        else:
            shown = list(value) if isinstance(value, list) else value
        out.append((key, type(value).__name__, shown, item.expireat))
    return out


def test_memory_script_writes_do_what_the_command_table_does():
    """The writes a twin's ``redis.call`` makes itself (nbqueue.drivers.redis.memory.Call) give
    the replies and errors of fakeredis' command table, leave the same keys, values and expiries,
    and tell the database of the same keys (WATCH and blocked clients): for keys missing,
    expired, with a TTL, of the wrong type, a hash with a field expiry, and arguments the
    command refuses."""
    import fakeredis

    from nbqueue.drivers.redis import memory

    def prepared():
        url = _memory_url()
        server = fake_server(url[len("memory://"):])
        client = fakeredis.FakeRedis(server=server)
        client.hset("h", mapping={"a": "1", "n": "x"})
        client.hset("hx", mapping={"a": "1", "b": "2"})
        client.hpexpire("hx", 100_000, "a")
        client.zadd("z", {"m1": 5.5, "m2": 3})
        client.zadd("z1", {"only": 1})
        client.sadd("st", "a")
        client.rpush("l", "x")
        client.set("s", "41")
        client.set("v", "text")
        client.set("ttl", "1")
        client.hset("gone", "a", "1")
        client.set("old", "1")
        sock = memory.MemorySocket(server, db=0, client_class=fakeredis.FakeRedis)
        # the same expiries on both servers
        for key, expireat in ((b"ttl", now + 100), (b"gone", now - 1), (b"old", now - 1)):
            sock._db._dict[key].expireat = expireat
        told: list = []
        notify = sock._db.notify_watch
        sock._db.notify_watch = lambda key: (told.append(key), notify(key))
        return sock, memory.Call(sock), told

    now = time.time()
    writes = [
        ("hset", b"h", b"a", b"2", b"b", b"3"), ("hset", b"new", b"f", 1), ("hset", b"h", b"a"),
        ("hset", b"z", b"f", b"1"), ("hset", b"hx", b"b", b"9"), ("hset", b"gone", b"f", b"1"),
        ("hset", b"ttl", b"f", b"1"),
        ("hincrby", b"h", b"c", 1), ("hincrby", b"h", b"c", 5), ("hincrby", b"h", b"n", 1),
        ("hincrby", b"h", b"c", b"x"), ("hincrby", b"h", b"c", 2 ** 63 - 1), ("hincrby", b"hnew", b"c", -3),
        ("hincrby", b"st", b"c", 1), ("hincrby", b"hx", b"b", 1),
        ("incr", b"s"), ("incr", b"cnt"), ("incr", b"v"), ("incr", b"h"), ("incr", b"ttl"), ("incr", b"gone"),
        ("zadd", b"z", b"7", b"m3"), ("zadd", b"z", b"5.5", b"m1"), ("zadd", b"z", b"1e3", b"m1"),
        ("zadd", b"zn", 12, b"a"), ("zadd", b"z", b"nan", b"m4"), ("zadd", b"z", b"inf", b"m4"),
        ("zadd", b"z", b"abc", b"m4"), ("zadd", b"z", b"1", b"nx"), ("zadd", b"z", b"NX", b"1"),
        ("zadd", b"z", b"-0", b"m5"), ("zadd", b"h", b"1", b"m"), ("zadd", b"z", b"1e400", b"m6"),
        ("zrem", b"z", b"m3", b"missing"), ("zrem", b"z", b"missing"), ("zrem", b"z1", b"only"),
        ("zrem", b"nokey", b"x"), ("zrem", b"h", b"x"),
        ("sadd", b"st", b"a"), ("sadd", b"st", b"b", b"c", b"b"), ("sadd", b"stnew", b"q"), ("sadd", b"l", b"q"),
        ("lpush", b"l", b"1", b"2"), ("rpush", b"l", b"3"), ("lpush", b"lnew", b"1"), ("rpush", b"rnew", b"1", b"2"),
        ("lpush", b"h", b"1"), ("rpush", b"ttl", b"1"),
        ("pexpire", b"l", 5000), ("pexpire", b"nokey", 5000), ("pexpire", b"h", b"x"), ("pexpire", b"st", 2 ** 62),
        ("pexpire", b"s", b"-5"), ("pexpire", b"z", 5000, b"NX"), ("pexpire", b"old", 10),
        ("del", b"l", b"l", b"nokey", b"stnew"), ("del", b"gone"), ("del", b"zn"), ("del", b"old", b"h"),
    ]

    def run(call, told, op):
        told.clear()
        with call.sock._server.lock:
            call.sock._db.time = now
            try:
                reply = op(call)
            except fakeredis._helpers.SimpleError as exc:
                reply = ("error", exc.value)
            return reply, list(told), _dump(call.sock._db)

    generic, replies = [], []

    class Counted(memory.Call):
        __slots__ = ()

        def command(self, name, args):
            generic.append((name, *args))
            return super().command(name, args)

    fast_sock, _, fast_told = prepared()
    fast = Counted(fast_sock)
    _, table, table_told = prepared()
    for write in writes:
        name, args = write[0], write[1:]
        got = run(fast, fast_told, lambda call: call(name, *args))
        want = run(table, table_told, lambda call: call.command(name, args))
        assert got == want, write
        replies.append(got[0])
    assert ("error", memory.WRONGTYPE_MSG) in replies and ("error", "ERR hash value is not an integer") in replies
    # the command table answered only what the writes leave to it
    assert generic == [("hset", b"h", b"a"), ("hset", b"hx", b"b", b"9"), ("hincrby", b"hx", b"b", 1),
                       ("zadd", b"z", b"1", b"nx"), ("zadd", b"z", b"NX", b"1"), ("pexpire", b"z", 5000, b"NX")]


def _pop_scenario(url: str, protocol: int) -> list:
    """BLPOP and BRPOP on memory:// (keys with values, missing, emptied, of another type, with a
    TTL; bad timeouts; a timeout), then what is stored."""
    import fakeredis

    from nbqueue.drivers.redis import memory

    server = fake_server(url[len("memory://"):])
    client = fakeredis.FakeRedis(server=server, connection_class=memory.MemoryConnection, protocol=protocol)
    client.rpush("a", "1", "2", "3")
    client.rpush("ttl", "x", "y")
    client.pexpire("ttl", 100_000)
    client.set("s", "v")
    replies = []
    for args in (("blpop", "missing", "a", 1), ("brpop", "a", 1), ("blpop", "a", "ttl", 0), ("blpop", "a", 1),
                 ("brpop", "ttl", "a", 1), ("blpop", "s", "a", 1), ("blpop", "ttl", "s", 1),
                 ("blpop", "a", "-1"), ("blpop", "a", "x"), ("blpop", "a"), ("brpop", "missing", 0.01)):
        try:
            replies.append(client.execute_command(*args))
        except redis.ResponseError as exc:
            replies.append(("error", str(exc)))
    stored = [(key, list(item.value) if isinstance(item.value, list) else item.value, item.expireat is not None)
              for key, item in sorted(server.dbs[0]._dict.items())]
    return [replies, stored]


@pytest.mark.parametrize("protocol", [2, 3])
def test_memory_blocking_pops_answer_as_the_command_table_does(monkeypatch, protocol):
    """A BLPOP or BRPOP memory:// runs itself (``MemorySocket._run_pop``) gives the replies and
    errors of fakeredis' command table and leaves the same keys, values and expiries."""
    from nbqueue.drivers.redis import memory

    ran = []
    run_pop = memory.MemorySocket._run_pop
    monkeypatch.setattr(memory.MemorySocket, "_run_pop", lambda sock, fields: ran.append(run_pop(sock, fields))
                        or ran[-1])
    fast = _pop_scenario(_memory_url(), protocol)
    assert ran.count(True) == 8         # all but the three the command refuses
    monkeypatch.setattr(memory.MemorySocket, "_run_pop", lambda sock, fields: False)
    assert fast == _pop_scenario(_memory_url(), protocol)
    assert any("WRONGTYPE" in str(reply) for reply in fast[0]) and fast[0][-1] is None


def test_memory_blocked_pops_wake_for_writes_to_their_keys_one_client_per_value(monkeypatch):
    """A client blocked in BLPOP on memory:// sleeps through writes to other keys, and a push of
    three values to its key wakes three blocked clients, each once, each taking one; a client
    blocked through a plain fakeredis socket, and one unblocked by CLIENT UNBLOCK, still wake. A
    write that adds no value (a PEXPIRE) wakes no second client."""
    import fakeredis

    from nbqueue.drivers.redis import memory
    from nbqueue.drivers.redis.client import connect

    url = _memory_url()
    server = fake_server(url[len("memory://"):])
    woken = []
    pop_pass = memory.MemorySocket._pop_pass

    def counted(self, keys, left, first_pass):
        if not first_pass:
            woken.append(keys)
        return pop_pass(self, keys, left, first_pass)

    monkeypatch.setattr(memory.MemorySocket, "_pop_pass", counted)
    got: list = []

    def pop(client, key):
        got.append(client.blpop([key], timeout=10))

    def blocked(n):
        return wait_for(lambda: sum(sock._blocked for sock in server.sockets) == n, message=f"{n} blocked")

    poppers = [threading.Thread(target=pop, args=(connect(url, {}), "k")) for _ in range(3)]
    plain = threading.Thread(target=pop, args=(fakeredis.FakeRedis(server=server), "k2"))
    for thread in [*poppers, plain]:
        thread.start()
    blocked(4)
    writer = connect(url, {})
    for i in range(50):
        writer.lpush("other", i)
    writer.lpush("k", "a", "b", "c")
    for thread in poppers:
        thread.join(5)
    assert sorted(map(tuple, got)) == [("k", "a"), ("k", "b"), ("k", "c")]
    assert woken == [(b"k",)] * 3
    writer.lpush("k2", "p")
    plain.join(5)
    assert tuple(got[-1]) == (b"k2", b"p")
    # a write that adds nothing to pop (the PEXPIRE after the push, in one transaction) wakes nobody more
    poppers = [threading.Thread(target=pop, args=(connect(url, {}), "k3")) for _ in range(2)]
    for thread in poppers:
        thread.start()
    blocked(2)
    woken.clear()
    pipe = writer.pipeline(transaction=True)
    pipe.lpush("k3", "x")
    pipe.pexpire("k3", 100_000)
    pipe.execute()
    wait_for(lambda: ("k3", "x") in map(tuple, got), message="x taken")
    assert woken == [(b"k3",)] and blocked(1)
    writer.lpush("k3", "y")
    for thread in poppers:
        thread.join(5)
    assert ("k3", "y") in map(tuple, got) and woken == [(b"k3",)] * 2
    # CLIENT UNBLOCK ends the wait of a client blocked on a key nobody writes
    unblocked = fakeredis.FakeRedis(server=server, connection_class=memory.MemoryConnection,
                                    single_connection_client=True)
    client_id = unblocked.client_id()
    popper = threading.Thread(target=pop, args=(unblocked, "never"))
    popper.start()
    blocked(1)
    assert writer.client_unblock(client_id) == 1
    popper.join(5)
    assert got[-1] is None


def test_memory_waiter_reads_then_waits_in_process_for_the_done_list(monkeypatch):
    """On memory:// a wait for one task reads its record, and a record not final waits in this
    process for a write to the task's done list (no blocking command), next to a waiter blocked
    on that list in BRPOPLPUSH: the result stored wakes both."""
    from nbqueue.drivers.redis import memory

    url = _memory_url()
    waiter, rotator, worker = RedisBackend(url), RedisBackend(url), RedisBackend(url)
    worker.create([{"id": "t", "name": "n"}])
    db = fake_server(url[len("memory://"):]).dbs[0]
    done = worker._done_key("t").encode()
    sent: list = []
    sendall = memory.MemorySocket.sendall

    def counted(sock, data):
        sent.append(data[0])
        return sendall(sock, data)

    monkeypatch.setattr(memory.MemorySocket, "sendall", counted)
    records, rotated = [], []
    reader = threading.Thread(target=lambda: records.append(waiter.wait_record("t", timeout=10)))
    blocker = threading.Thread(target=lambda: (rotator._block(["t"], 0, 10.0), rotated.append(True)))
    reader.start()
    wait_for(lambda: len(db.blocked.get(done, ())) == 1, message="the reader waiting")
    blocker.start()
    wait_for(lambda: len(db.blocked.get(done, ())) == 2, message="both waiting")
    worker.store_result("t", states.SUCCESS, token=worker.begin("t"), result="1")
    reader.join(5)
    blocker.join(5)
    assert records[0]["state"] == states.SUCCESS and rotated == [True]
    assert done not in db.blocked and sent.count(b"BRPOPLPUSH") == 1      # the rotator's only
    assert waiter.wait_record("t", timeout=1)["result"] == "1"     # final at once: a read, no wait


def test_memory_key_wait_reads_a_hash_as_hgetall_does():
    """``KeyWait.hgetall`` (a waiter's read without a command) gives what the client's HGETALL
    gives: a hash, a key missing or expired, a hash with a field expiry, text that is not ASCII,
    and the command's error for a key of another type."""
    from nbqueue.drivers.redis import memory
    from nbqueue.drivers.redis.client import connect

    url = _memory_url()
    client = connect(url, {})
    client.hset("h", mapping={"a": "1", "é": "ü"})
    client.hset("hx", mapping={"a": "1", "b": "2"})
    client.hpexpire("hx", 1, "a")
    client.hset("gone", "a", "1")
    client.pexpire("gone", 1)
    client.set("s", "v")
    time.sleep(0.01)
    wait = memory.KeyWait(client, [b"done"])
    for key in ("h", "hx", "gone", "missing"):
        assert wait.hgetall(key) == client.hgetall(key), key
    assert wait.hgetall("h") == {"a": "1", "é": "ü"} and wait.hgetall("hx") == {"b": "2"}
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        wait.hgetall("s")


@pytest.mark.parametrize("errors", ["strict", "surrogateescape"])
def test_memory_connection_decodes_replies_as_fakeredis_does(errors):
    """A memory:// connection decodes a reply (bytes, nested in lists and dicts, beside sets,
    numbers and None) as fakeredis' connection decodes it."""
    from fakeredis import FakeRedisConnection

    from nbqueue.drivers.redis.client import connect

    client = connect(_memory_url(), {}, encoding_errors=errors)
    conn = client.connection_pool.get_connection()
    try:
        reply = [b"a", [b"\xc3\xa9", 1, None, 2.5, {b"k": [b"v", {b"x"}]}], {b"f": b"1"}, b"\xff" if errors != "strict"
                 else b"b", 7, True]
        assert conn._decode(reply) == FakeRedisConnection._decode(conn, reply)
        assert conn._decode(reply)[1][0] == "é"
    finally:
        client.connection_pool.release(conn)


def test_memory_sends_every_command_as_its_arguments_pipelines_and_scripts_too(monkeypatch):
    """A memory:// client hands the socket each command as its arguments (``Command``), the
    driver's pipelines (their SCRIPT LOADs and EVALSHAs) included: nothing is packed as RESP for
    the server to parse, and each script with a twin runs without the command table."""
    from nbqueue.drivers.redis import memory

    url = _memory_url()
    engine = RedisEngine(RedisBroker(url), RedisBackend(url))
    sent: list = []
    sendall = memory.MemorySocket.sendall

    def spied(sock, data):
        sent.append(data)
        return sendall(sock, data)

    monkeypatch.setattr(memory.MemorySocket, "sendall", spied)
    twins = []
    run_twin = memory.MemorySocket._run_twin
    monkeypatch.setattr(memory.MemorySocket, "_run_twin", lambda sock, fields: twins.append(run_twin(sock, fields))
                        or twins[-1])
    engine.send([{"id": "m1", "name": "n"}], [_out("q", "m1")])
    claims = engine.claim(["q"], limit=1, timeout=1.0, lease=30.0, worker="w")
    engine.finish([Outcome(claims[0].delivery, "m1", states.SUCCESS, claims[0].token, {"result": "2"})],
                  [claims[0].delivery])
    assert engine.backend.get("m1")["state"] == states.SUCCESS
    assert sent and all(type(data) is memory.Command for data in sent), [type(d) for d in sent]
    evalshas = [data for data in sent if data[0] == b"EVALSHA"]
    assert len(evalshas) == 3 and twins.count(True) == 3


# -- connections ---------------------------------------------------------------------------

def test_remote_redis_without_password_logs_a_warning(caplog):
    caplog.set_level(logging.WARNING, logger="nbqueue.drivers.redis.broker")
    RedisBroker("redis://10.11.12.13:6379/0")            # clients connect lazily: nothing is sent
    RedisBackend("redis://redis.example.com/2")
    assert len([r for r in caplog.records if "without a password" in r.getMessage()]) == 2
    caplog.clear()
    RedisBroker("redis://:s3cret@10.11.12.13:6379/0")
    RedisBroker("redis://127.0.0.1:6379/13")
    RedisBroker("redis://localhost/13")
    RedisBroker("redis://[::1]:6379/13")
    RedisBroker(_memory_url())
    assert not [r for r in caplog.records if "without a password" in r.getMessage()]
    assert "s3cret" not in repr(RedisBroker("redis://:s3cret@127.0.0.1/13"))


def test_connection_killed_mid_command_is_reopened_and_work_goes_on(real_redis):
    import redis

    admin = redis.Redis.from_url(REDIS_URL)
    consumer = RedisBroker(REDIS_URL, options={**real_redis, "max_block": 5})
    producer = RedisBroker(REDIS_URL, options={**real_redis, "client_name": "nbq-producer"})
    backend = RedisBackend(REDIS_URL, options=real_redis)
    backend.create([{"id": "t", "name": "n"}])
    got = []
    reserver = threading.Thread(target=lambda: got.extend(consumer.reserve(["q"], timeout=5)))
    reserver.start()
    blocked = wait_for(
        lambda: [c for c in admin.client_list() if c["name"] == real_redis["client_name"] and c["cmd"] == "blpop"]
    )
    assert blocked, "the reserver never blocked"
    # When Redis drops every connection of ours, including the one blocked in BLPOP
    for client in admin.client_list():
        if client["name"] == real_redis["client_name"]:
            admin.client_kill_filter(_id=client["id"])
    # Then the blocked reserve reconnects and still receives the next publish
    producer.publish(_out("q", "after"))
    reserver.join(5)
    assert [d.message_id for d in got] == ["after"]
    assert consumer.ack(got[0])
    assert backend.begin("t") == 1
    admin.close()


def test_redis_down_for_a_moment_is_survived_and_for_good_raises_connection_lost():
    url = _memory_url()
    server = fake_server(url[len("memory://"):])
    broker = RedisBroker(url, options={"retries": 2, "retry_base": 0.05, "retry_cap": 0.2})
    broker.publish(_out("q", "m"))
    # a short outage: the client's retries bridge it
    server.connected = False
    threading.Timer(0.15, lambda: setattr(server, "connected", True)).start()
    [d] = broker.reserve(["q"], timeout=1)
    assert broker.ack(d)
    # an outage that outlasts the retries surfaces as ConnectionLost
    impatient = RedisBroker(url, options={"retries": 1, "retry_base": 0.01})
    impatient.stats()
    server.connected = False
    with pytest.raises(ConnectionLost):
        impatient.publish(_out("q", "lost"))
    with pytest.raises(ConnectionLost):
        RedisBackend(url, options={"retries": 1, "retry_base": 0.01}).get("t")
    server.connected = True


def test_unreachable_redis_raises_connection_lost():
    broker = RedisBroker(
        "redis://127.0.0.1:1/0", options={"retries": 1, "retry_base": 0.01, "socket_connect_timeout": 1}
    )
    with pytest.raises(ConnectionLost):
        broker.publish(_out("q", "m"))


def _stat(broker, queue):
    return next(row for row in broker.stats() if row["queue"] == queue)


# -- a worker of the sending process ------------------------------------------------------------

@pytest.fixture
def redis_app(store):
    import nbqueue

    url, options = store
    app = nbqueue.App(url, **options)
    yield app
    app.close()


def test_tasks_sent_one_by_one_to_a_waiting_worker_are_claimed_as_its_wait_ends(redis_app, monkeypatch):
    """With results on the same server, a worker blocked on its queue claims and begins a
    task sent meanwhile in the round trip that wakes it: no claim call of its own."""
    app = redis_app
    app.register_task("double", lambda x: 2 * x)
    claims = []
    real_claim = app.broker._claim
    monkeypatch.setattr(app.broker, "_claim", lambda *a, **kw: claims.append(a) or real_claim(*a, **kw))
    worker = app.start_worker(concurrency=1)
    try:
        for i in range(10):
            time.sleep(0.3 if i % 4 == 0 else 0.02)     # back waiting; now and then past a whole reserve() call
            r = app.send_task(Signature("double", args=[i]))
            assert r.get(timeout=10) == 2 * i
            assert r.info()["worker"] == worker.name
    finally:
        worker.stop()
    assert len(claims) <= 1             # only the very first reserve claims before it waits
    assert all(row["ready"] == row["in_flight"] == 0 for row in app.broker.stats())


def test_a_large_send_to_a_waiting_worker_goes_out_in_chunks_and_every_task_runs(redis_app):
    """More messages than one publish script takes (they go in chunks, beside the records
    in one pipeline): the send succeeds and every task runs once."""
    app = redis_app
    runs = []
    app.register_task("double", lambda x: runs.append(x) or 2 * x)
    worker = app.start_worker(concurrency=1, prefetch=4)
    try:
        time.sleep(0.05)
        results = app.send_many([Signature("double", args=[i]) for i in range(1200)])
        assert [r.get(timeout=60) for r in results] == [2 * i for i in range(1200)]
    finally:
        worker.stop()
    assert sorted(runs) == list(range(1200))


# -- round trips --------------------------------------------------------------------------------

def test_a_blocked_reserve_claims_in_the_same_round_trip_as_its_wait(store):
    """The claim is pipelined behind the blocking pop: a message published while the
    reserver waits comes back without a claim call of its own after the wait."""
    url, options = store
    consumer = RedisBroker(url, options={**options, "max_block": 10})
    producer = RedisBroker(url, options=options)
    claims = []
    claim = consumer._claim
    consumer._claim = lambda *a, **kw: claims.append(a) or claim(*a, **kw)
    got = []
    reserver = threading.Thread(target=lambda: got.extend(consumer.reserve(["q"], timeout=10)))
    reserver.start()
    time.sleep(0.1)
    producer.publish(_out("q", "ping"))
    reserver.join(5)
    assert [d.message_id for d in got] == ["ping"]
    assert len(claims) == 1         # the one before it blocked, which found the queue empty
    consumer.close()
    producer.close()


def test_a_waiter_reads_the_record_in_the_round_trip_that_wakes_it(store):
    url, options = store
    waiter, worker = RedisBackend(url, options=options), RedisBackend(url, options=options)
    waiter.create([{"id": "t", "name": "n"}])
    reads = []
    get_many = waiter.get_many
    waiter.get_many = lambda ids: reads.append(ids) or get_many(ids)
    got = []
    blocker = threading.Thread(
        target=lambda: got.append(waiter.wait_record("t", timeout=10, since=waiter.wake_version()))
    )
    blocker.start()
    time.sleep(0.1)
    worker.store_result("t", states.SUCCESS, token=worker.begin("t"), result="1")
    blocker.join(5)
    assert got[0]["state"] == states.SUCCESS and got[0]["result"] == "1" and reads == []
    assert waiter.wait_record("t", timeout=0)["result"] == "1"     # an old result: read at once


def _finished(backend, ids, value="1"):
    for task_id in ids:
        backend.store_result(task_id, states.SUCCESS, token=backend.begin(task_id), result=value)


def _counting_round_trips(monkeypatch) -> list:
    trips: list = []
    execute = ScriptPipeline.execute
    monkeypatch.setattr(ScriptPipeline, "execute", lambda pipe, *a, **k: trips.append(1) or execute(pipe, *a, **k))
    return trips


def test_waits_in_creation_order_read_the_records_of_the_next_tasks_ahead(real_redis, monkeypatch):
    """A loop of waits over tasks created here, all final already, reads many records per
    round trip (the first wait reads one ahead, then twice as many each time all were final)."""
    waiter, worker = RedisBackend(REDIS_URL, options=real_redis), RedisBackend(REDIS_URL, options=real_redis)
    ids = [f"t{i}" for i in range(40)]
    waiter.create([{"id": i, "name": "n"} for i in ids])
    for i in ids:
        worker.store_result(i, states.SUCCESS, token=worker.begin(i), result=i)
    trips = _counting_round_trips(monkeypatch)
    got = [waiter.wait_record(i, timeout=5, since=waiter.wake_version())["result"] for i in ids]
    assert got == ids
    assert len(trips) == 6          # 1 + 1, 2, 4, 8, 16 then 8 more read ahead


def test_a_record_read_ahead_is_kept_only_when_final_and_not_after_a_forget(real_redis):
    waiter, worker = RedisBackend(REDIS_URL, options=real_redis), RedisBackend(REDIS_URL, options=real_redis)
    waiter.create([{"id": i, "name": "n"} for i in ("a", "b", "c")])
    _finished(worker, ["a", "c"])
    assert waiter.wait_record("a", timeout=1)["state"] == states.SUCCESS
    assert "b" not in waiter._ahead                   # read ahead but not final: not kept
    _finished(worker, ["b"], value="2")
    assert waiter.wait_record("b", timeout=1)["result"] == "2"
    assert "c" in waiter._ahead
    assert waiter.forget(["c"]) == 1
    assert "c" not in waiter._ahead
    with pytest.raises(ResultNotFound):
        waiter.wait_record("c", timeout=1, missing_ok=False)


def test_a_record_read_ahead_is_read_again_once_it_is_old(real_redis, monkeypatch):
    """A record read ahead answers a wait only for AHEAD_FOR seconds: later the wait reads it
    again (and so sees what changed meanwhile)."""
    from nbqueue.drivers.redis import backend as redis_backend

    waiter, worker = RedisBackend(REDIS_URL, options=real_redis), RedisBackend(REDIS_URL, options=real_redis)
    waiter.create([{"id": i, "name": "n"} for i in ("a", "b")])
    _finished(worker, ["a", "b"])
    waiter.wait_record("a", timeout=1)
    assert "b" in waiter._ahead
    worker.update("b", output="printed")
    monkeypatch.setattr(redis_backend, "AHEAD_FOR", 0.0)
    assert waiter.wait_record("b", timeout=1)["output"] == "printed"


def test_scripts_the_server_lost_are_loaded_again_and_no_task_runs_twice(flushable_app):
    """After SCRIPT FLUSH (as after a restart) a pipeline's scripts fail with NOSCRIPT;
    each such command is run again once its script is loaded, and only those."""
    app = flushable_app
    runs = []
    app.register_task("double", lambda x: runs.append(x) or 2 * x)
    worker = app.start_worker(concurrency=2)
    try:
        assert app.send_task(Signature("double", args=[1])).get(timeout=10) == 2
        app.broker.client.script_flush()
        results = app.send_many([Signature("double", args=[i]) for i in range(10)])
        assert [r.get(timeout=10) for r in results] == [2 * i for i in range(10)]
        app.broker.client.script_flush()
        assert app.send_task(Signature("double", args=[5])).get(timeout=10) == 10
    finally:
        worker.stop()
    assert sorted(runs) == sorted([1, *range(10), 5])


def test_a_member_counted_behind_its_result_counts_only_once_that_result_is_a_success(store):
    """The Redis engine's finish queues each member's count right behind its result: a result
    refused as stale (a newer attempt holds the task) must leave the member uncounted."""
    url, options = store
    broker, backend = RedisBroker(url, options=options), RedisBackend(url, options=options)
    backend.create([{"id": "a", "name": "n"}, {"id": "b", "name": "n"}])
    backend.init_group("g", ["a", "b"])
    stale, current = backend.begin("a"), backend.begin("a")     # a second attempt took "a" over
    token_b = backend.begin("b")
    engine = RedisEngine(broker, backend)
    done = engine.finish([Outcome(None, "a", states.SUCCESS, stale, {"result": "1"}, group="g"),
                          Outcome(None, "b", states.SUCCESS, token_b, {"result": "2"}, group="g")])
    assert done.stored == [False, True] and done.counts == [(-1, 2), (1, 2)]
    assert backend.get("a")["state"] == states.STARTED
    done = engine.finish([Outcome(None, "a", states.SUCCESS, current, {"result": "1"}, group="g")])
    assert done.stored == [True] and done.counts == [(2, 2)]
    assert engine.finish([Outcome(None, "a", states.SUCCESS, current, {"result": "1"}, group="gone")]).counts == [None]
    broker.close()
    backend.close()


def _flush_scripts_keeping(client, *scripts):
    """An emptied script cache (as after a restart) that another client has begun to
    refill with ``scripts``."""
    client.script_flush()
    for script in scripts:
        client.script_load(script.script)


def test_a_new_connection_loads_its_scripts_before_the_commands_so_they_run_in_order(flushable_app):
    """After a restart the cache refills script by script. A pipeline on the new connection
    sends SCRIPT LOAD first, in the same write: the member is stored before it is counted
    and counted before it is acked, and the chord calls back."""
    app = flushable_app
    app.register_task("add", lambda x, y: x + y)
    app.register_task("total", lambda values: sum(values))
    res = app.send_chord(
        nbqueue_chord([Signature("add", args=[1, 1]), Signature("add", args=[2, 2])], Signature("total"))
    )
    worker = app.worker(local_follow_ups=False)
    [first] = [
        c.delivery for c in app.engine.claim([app.default_queue], limit=1, timeout=5, lease=30, worker=worker.name)
    ]
    worker.process(first)
    [last] = [
        c.delivery for c in app.engine.claim([app.default_queue], limit=1, timeout=5, lease=30, worker=worker.name)
    ]
    _flush_scripts_keeping(app.broker.client, app.broker._settle, app.backend._member_done)
    app.broker.client.connection_pool.disconnect()        # the restart: every connection is new
    worker.process(last)
    assert app.backend.group_info(res.header.id)["done"] == 2
    assert worker.drain(timeout=5) >= 1 and res.get(timeout=10) == 6
    assert all(row["in_flight"] == 0 for row in app.broker.stats())


def test_a_script_lost_under_a_live_connection_never_acks_a_result_that_was_not_stored(flushable_app):
    """SCRIPT FLUSH by hand while the connection stays up: the engine's finish script (results
    and acks in one call) fails with NOSCRIPT and runs again once loaded, whole: the result
    is stored and its message acked together, never acked unstored."""
    app = flushable_app
    app.register_task("add", lambda x, y: x + y)
    worker = app.worker()
    first = app.send_task(Signature("add", args=[1, 1]))
    worker.drain(timeout=5)                                # the scripts are known on this connection now
    assert first.get(timeout=5) == 2
    r = app.send_task(Signature("add", args=[2, 2]))
    [d] = [c.delivery for c in app.engine.claim([app.default_queue], limit=1, timeout=5, lease=30, worker=worker.name)]
    _flush_scripts_keeping(app.broker.client, app.broker._settle)
    stored = app.engine.finish([Outcome(d, d.message_id, states.SUCCESS, d.token, {"result": "4"})], [d]).stored
    assert stored == [True] and r.get(timeout=5) == 4
    assert _stat(app.broker, app.default_queue)["in_flight"] == 0      # acked in the call that stored it
    assert not app.broker.ack(d)                                       # gone already


def test_a_message_claimed_at_the_end_of_a_long_wait_gets_a_whole_lease(store):
    """The claim riding on the wait compares due times with the time from before the wait,
    but its lease must run from the wait's end: another reserver must not take the
    message while the first one still holds it."""
    url, options = store
    first, second = RedisBroker(url, options=options), RedisBroker(url, options=options)
    got = []
    reserver = threading.Thread(target=lambda: got.extend(first.reserve(["q"], timeout=5, lease=0.5)))
    reserver.start()
    time.sleep(0.8)                     # past the lease, counted from when the wait began
    second.publish(_out("q", "m"))
    reserver.join(5)
    assert [d.message_id for d in got] == ["m"] and got[0].lease_until - time.time() > 0.3
    assert second.reserve(["q"], timeout=0, lease=30) == []
    first.close()
    second.close()


def test_a_reserve_that_may_not_wait_claims_even_after_one_that_emptied_the_queue(store):
    url, options = store
    broker = RedisBroker(url, options=options)
    broker.publish(_out("q", "a"))
    assert [d.message_id for d in broker.reserve(["q"], timeout=0)] == ["a"]      # emptied the queue
    broker.publish(_out("q", "b"))
    assert [d.message_id for d in broker.reserve(["q"], timeout=0)] == ["b"]
    broker.close()


# -- options in the URL ----------------------------------------------------------------------------

def test_key_prefix_and_batch_in_the_url_query_are_read_and_not_passed_to_redis_py(store):
    url, options = store
    prefix = options.get("key_prefix") or f"nbqtest-{uuid.uuid4().hex[:8]}:"
    from conftest import with_query

    with_prefix = with_query(url, key_prefix=prefix.rstrip(":"), batch="7")
    broker, backend = RedisBroker(with_prefix), RedisBackend(with_prefix)
    assert (broker.prefix, backend.prefix, broker.batch) == (prefix, prefix, 7)
    broker.publish(_out("q", "m"))
    backend.create([{"id": "t", "name": "n"}])
    assert broker.client.exists(f"{prefix}msg:m") and backend.client.exists(f"{prefix}r:t")
    assert RedisBroker(with_prefix, options={"key_prefix": "mine"}).prefix == "mine:"     # explicit options win
    broker.purge("q")
    backend.forget(["t"])
    broker.close()
    backend.close()


def test_no_test_flushes_or_restarts_a_shared_server():
    """Redis and RabbitMQ on 127.0.0.1 are shared: tests use key prefixes and queue names of
    their own; SCRIPT FLUSH and restarts happen only on servers a test started itself."""
    import pathlib
    import re

    forbidden = re.compile(
        r"flush" + r"(db|all)|FLUSH" + r"(DB|ALL)|stop" + r"_app|rabbitmqctl\(\"stop|shutdown\(", re.I
    )
    for path in sorted(pathlib.Path(__file__).parent.glob("*.py")):
        text = path.read_text()
        assert not forbidden.search(text), f"{path.name}: {forbidden.search(text).group(0)}"
        for match in re.finditer(r"script_flush\(", text):
            test = text[:match.start()].rsplit("\ndef ", 1)[-1]
            assert "flushable_app" in test.split("\n", 1)[0] or test.startswith("_flush_scripts_keeping"), \
                f"{path.name}: SCRIPT FLUSH outside a test of a server of its own: def {test.split(chr(10), 1)[0]}"


# -- a child forked while a thread of the parent holds a connection pool's lock -----------------

def _child_of_a_held_pool(add, out) -> None:
    try:
        out.put(("ok", add.delay(3, 4).get(timeout=30)))
    except Exception as exc:
        out.put((type(exc).__name__, str(exc)))
    finally:
        add.app.close()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_child_forked_while_a_thread_holds_the_connection_pool_lock_sends_and_waits(redis_app):
    """A thread of the parent is inside the broker's and the backend's connection pools (taking
    or giving back a connection) at the moment of the fork: the child's copies of those locks
    stay held, and its first command must not wait on them. It sends a task and gets the
    parent's worker's result (memory://: fails at once saying to use spawn or forkserver), and exits."""
    app = redis_app
    add = app.task(name="add")(lambda x, y: x + y)
    app.start_worker(concurrency=1)
    assert add.delay(1, 1).get(timeout=30) == 2
    pools = {id(c.connection_pool): c.connection_pool for c in (app.broker.client, app.backend.client)}.values()
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        for pool in pools:
            pool._lock.acquire()
        held.set()
        release.wait(30)
        for pool in pools:
            pool._lock.release()

    holder = threading.Thread(target=hold, daemon=True)
    holder.start()
    assert held.wait(10)
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    child = ctx.Process(target=_child_of_a_held_pool, args=(add, out))
    try:
        child.start()
    finally:
        release.set()
        holder.join(10)
    try:
        kind, value = out.get(timeout=60)
    finally:
        child.join(30)
        if child.is_alive():
            child.kill()
    if app.broker_url.startswith("memory://"):
        assert kind == "ConfigurationError" and "'spawn'" in value and "'forkserver'" in value
    else:
        assert (kind, value) == ("ok", 7)
    assert child.exitcode == 0
    assert add.delay(2, 2).get(timeout=30) == 4                # the parent carries on


@pytest.mark.parametrize("connected", [True, False], ids=["command", "handshake"])
def test_a_round_trip_interrupted_before_its_replies_leaves_none_for_the_next_command(store, monkeypatch, connected):
    """A read interrupted before it starts (Ctrl-C between a send and its reply), of a command
    or of a new connection's handshake, leaves a reply on the connection nobody reads: the
    next command on the store gets its own reply, not the one left over."""
    url, options = store
    backend = RedisBackend(url, options=options)
    backend.create([{"id": "a", "name": "n"}])
    if not connected:
        backend.client.connection_pool.disconnect()
        backend.client.connection_pool.reset()      # the next command makes a connection
    connection_class = backend.client.connection_pool.connection_class
    read = connection_class.read_response
    interrupted = []

    def interrupt_once(conn, *args, **kwargs):
        if not interrupted:
            interrupted.append(True)
            raise KeyboardInterrupt
        return read(conn, *args, **kwargs)

    monkeypatch.setattr(connection_class, "read_response", interrupt_once)
    with pytest.raises(KeyboardInterrupt):
        backend.get("a")
    assert backend.get("missing") is None
    assert backend.get("a")["id"] == "a"
    backend.close()


@pytest.mark.parametrize("path", ["poll", "can_read"])
def test_a_connection_the_server_closed_is_taken_afresh_whatever_its_descriptor(monkeypatch, path):
    """An idle connection whose server end closed (a restart) counts as unread, so it is
    connected afresh instead of failing its next command; also where ``select`` cannot take
    the descriptor (at or above FD_SETSIZE in a process with many files open)."""
    import select
    import socket

    import redis

    from nbqueue.drivers.redis import client

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    conn = redis.Connection(host="127.0.0.1", port=listener.getsockname()[1])
    conn._sock = socket.create_connection(listener.getsockname())     # connected, without a handshake
    conn._parser.on_connect(conn)
    accepted, _ = listener.accept()
    accepted.close()
    if path == "can_read":
        def out_of_range(*args):
            raise ValueError("filedescriptor out of range in select()")

        monkeypatch.setattr(client, "_POLL", None)
        monkeypatch.setattr(select, "select", out_of_range)
    try:
        assert client._unread(conn) is True
    finally:
        conn.disconnect()
        listener.close()
