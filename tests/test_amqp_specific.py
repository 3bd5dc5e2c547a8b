"""What only the RabbitMQ broker promises: confirms, delay buckets, dead letters with a
reason, prefetch, one broker shared by threads, reconnects, a server restart.

Runs on the real RabbitMQ of conftest (skipped locally when it is not there, failed
under CI). Queue names come from ``qname`` and are deleted afterwards, with their delay
and dead-letter queues. Tests that change the server (a policy, a restart) use
``rabbitmqctl`` and skip when it is not usable here.
"""
from __future__ import annotations

import concurrent.futures
import os
import shutil
import subprocess
import threading
import time
import uuid
from urllib.parse import urlsplit

import pika
import pytest

from nbqueue.brokers import broker_from_url
from nbqueue.brokers.amqp import (
    H_ETA, MAX_BUCKET, MAX_HOP_MS, MAX_TTL_MS, AMQPBroker, dead_queue_name, delay_bucket, delay_queue_name,
    delay_queue_names,
)
from nbqueue.brokers.base import Outgoing
from nbqueue.errors import ConfigurationError, ConnectionLost, PublishRefused

from conftest import AMQP_URL, require_server


@pytest.fixture
def amqp(qname):
    """A factory of AMQP brokers on the test server; the test's queues are deleted afterwards."""
    require_server("RabbitMQ", "127.0.0.1", 5672)
    made: list[AMQPBroker] = []

    def make(**options) -> AMQPBroker:
        broker = broker_from_url(AMQP_URL, options=options or None)
        made.append(broker)
        return broker

    yield make
    for broker in made:
        broker.close()
    if qname.made:
        cleaner = broker_from_url(AMQP_URL)
        cleaner.delete_queues(qname.made)
        cleaner.close()


@pytest.fixture
def raw():
    """A plain pika channel, to look at the server behind the broker's back."""
    require_server("RabbitMQ", "127.0.0.1", 5672)
    connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    yield connection.channel()
    connection.close()


def rabbitmqctl(*args: str, timeout: float = 60) -> None:
    subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True, timeout=timeout)


def needs_rabbitmqctl() -> None:
    local = urlsplit(AMQP_URL).hostname in ("127.0.0.1", "localhost", "::1")
    if not local or shutil.which("rabbitmqctl") is None or os.geteuid() != 0:
        pytest.skip("needs rabbitmqctl, run as root, on the host of the test RabbitMQ")


def out(queue: str, body: str = "{}", *, id: str | None = None, eta: float | None = None, priority: int = 0) -> Outgoing:
    return Outgoing(id=id or str(uuid.uuid4()), body=body, queue=queue, eta=eta, priority=priority)


def reserve_all(broker, queues, n: int, timeout: float = 5.0, limit: int | None = None) -> list:
    got, deadline = [], time.monotonic() + timeout
    while len(got) < n and time.monotonic() < deadline:
        got += broker.reserve(queues, timeout=0.5, lease=30, limit=limit or n - len(got))
    return got


def ready(channel, name: str) -> int | None:
    try:
        return channel.queue_declare(name, passive=True).method.message_count
    except pika.exceptions.ChannelClosedByBroker:
        return None


# -- publisher confirms ----------------------------------------------------------------------

def test_publish_to_a_queue_deleted_behind_our_back_is_refused_then_redeclared(amqp, qname, raw):
    # Given a broker that has declared its queue (and remembers so)
    broker, q = amqp(), qname("gone")
    broker.publish(out(q, id="first"))
    # When someone deletes the queue and the broker publishes again
    raw.queue_delete(q)
    with pytest.raises(PublishRefused, match="unroutable") as refused:
        broker.publish(out(q, id="lost"))
    # Then the unroutable message is reported, not silently dropped, by id
    assert refused.value.message_ids == ["lost"]
    # And the next publish declares the queue again and goes through
    broker.publish(out(q, id="next"))
    [d] = reserve_all(broker, [q], 1)
    assert d.message_id == "next"
    assert broker.ack(d)


def test_publish_nacked_by_a_queue_length_limit_is_refused(amqp, qname):
    needs_rabbitmqctl()
    broker, q = amqp(), qname("full")
    policy = f"nbq-test-{q}"
    rabbitmqctl("set_policy", "--apply-to", "queues", policy, f"^{q}$", '{"max-length": 1, "overflow": "reject-publish"}')
    try:
        broker.publish(out(q, id="fits"))
        # the policy applies to the queue just declared; wait until the server says so
        deadline = time.monotonic() + 10
        while True:
            try:
                broker.publish(out(q, id="probe"))
            except PublishRefused as exc:
                assert "nacked" in str(exc) and exc.message_ids == ["probe"]
                break
            assert time.monotonic() < deadline, "the length-limit policy never applied"
            broker.purge(q)
            broker.publish(out(q, id="fits"))
            time.sleep(0.2)
        # publish_many: the one that fits is confirmed, the rest are refused by id
        broker.purge(q)
        with pytest.raises(PublishRefused) as refused:
            broker.publish_many([out(q, id=f"m{i}") for i in range(4)])
        assert refused.value.message_ids == ["m1", "m2", "m3"]
    finally:
        rabbitmqctl("clear_policy", policy)


def test_publish_many_pipelines_confirms_in_batches(amqp, qname):
    broker, q = amqp(publish_batch=100), qname("bulk")
    started = time.monotonic()
    broker.publish_many([out(q, id=f"b{i}") for i in range(1000)])
    elapsed = time.monotonic() - started
    got = reserve_all(broker, [q], 1000, timeout=20, limit=200)
    assert sorted(d.message_id for d in got) == sorted(f"b{i}" for i in range(1000))
    for d in got:
        broker.ack(d)
    assert elapsed < 5.0      # one round trip per 100, not per message (about 0.1 s here)


# -- delays ---------------------------------------------------------------------------------

def test_long_delay_does_not_block_a_short_one_published_after_it(amqp, qname, raw):
    broker, q = amqp(), qname("delays")
    broker.publish(out(q, id="in-an-hour", eta=time.time() + 3600))
    broker.publish(out(q, id="soon", eta=time.time() + 0.5))
    started = time.monotonic()
    [d] = reserve_all(broker, [q], 1, timeout=5)
    assert d.message_id == "soon" and time.monotonic() - started < 2.0
    broker.ack(d)
    # the hour-long one waits in its own bucket, counted as delayed
    assert ready(raw, delay_queue_name(q, delay_bucket(3_600_000))) == 1
    # the buckets were declared as a set, so stats() can probe one and count the rest
    assert all(ready(raw, name) is not None for name in delay_queue_names(q))
    [row] = [r for r in broker.stats() if r["queue"] == q]
    assert (row["ready"], row["delayed"]) == (0, 1)


def test_delay_buckets_are_powers_of_two_and_cap_at_the_timer_limit():
    assert delay_queue_name("q", delay_bucket(1)) == "nbq.delay.q.128"
    assert delay_queue_name("q", delay_bucket(128)) == "nbq.delay.q.128"
    assert delay_queue_name("q", delay_bucket(129)) == "nbq.delay.q.256"
    assert delay_queue_name("q", delay_bucket(3_600_000)) == "nbq.delay.q.4194304"
    assert delay_bucket(60 * 86_400_000) == MAX_BUCKET       # 60 days: the top bucket


def test_delay_beyond_rabbitmq_timer_limit_hops_instead_of_arriving_early(amqp, qname, raw):
    broker, q = amqp(), qname("far")
    # Given a message 60 days out: it goes to the top bucket for the longest hop RabbitMQ allows
    broker.publish(out(q, id="far", eta=time.time() + 60 * 86400))
    method, properties, _ = raw.basic_get(delay_queue_name(q, MAX_BUCKET))
    assert (properties.message_id, properties.expiration) == ("far", str(MAX_HOP_MS))
    raw.basic_nack(method.delivery_tag, requeue=True)
    assert MAX_HOP_MS < MAX_TTL_MS == 2**32 - 1
    # When such a message reaches the work queue before its eta (as it will after 49.7 days)
    eta_ms = int((time.time() + 3600) * 1000)
    raw.basic_publish("", q, b"{}", pika.BasicProperties(message_id="early", delivery_mode=2, headers={H_ETA: eta_ms}))
    # Then reserve() does not hand it out but sends it back to wait for the rest
    assert broker.reserve([q], timeout=1.0, lease=5) == []
    assert ready(raw, q) == 0
    assert ready(raw, delay_queue_name(q, delay_bucket(3_600_000))) == 1


def test_retry_with_eta_counts_attempts_and_release_counts_too(amqp, qname):
    broker, q = amqp(), qname("attempts")
    broker.publish(out(q, id="r"))
    [d1] = reserve_all(broker, [q], 1)
    assert d1.attempt == 1
    assert broker.retry(d1, body='{"n": 2}', eta=time.time() + 0.3)
    [d2] = reserve_all(broker, [q], 1)
    assert (d2.message_id, d2.body, d2.attempt) == ("r", '{"n": 2}', 2)
    assert broker.release(d2)
    [d3] = reserve_all(broker, [q], 1)
    assert d3.attempt == 3 and d3.redelivered
    assert broker.ack(d3)
    assert broker.ack(d3) is False        # settled once only; no "unknown delivery tag" channel error
    assert broker.retry(d2) is False      # an old delivery cannot act


# -- dead letters ---------------------------------------------------------------------------

def test_poison_message_dead_letters_with_its_reason(amqp, qname, raw):
    broker, q = amqp(), qname("poison")
    broker.publish(out(q, "not json", id="bad"))
    [d] = reserve_all(broker, [q], 1)
    assert broker.reject(d, "MessageError: body is not JSON")
    assert broker.reserve([q], timeout=0.3, lease=5) == []
    assert ready(raw, dead_queue_name(q)) == 1
    for _ in range(2):          # peeking leaves the dead letter in place
        [dead] = broker.dead_letters(q)
        assert dead == {"id": "bad", "queue": q, "reason": "MessageError: body is not JSON", "body": "not json"}
    assert broker.reject(d, "again") is False
    assert broker.purge(q) == 1
    assert broker.dead_letters(q) == []


# -- prefetch and threads -------------------------------------------------------------------

def test_prefetch_is_bounded_by_the_limit_asked_for(amqp, qname, raw):
    q = qname("prefetch")
    greedy, other = amqp(), amqp()
    greedy.publish_many([out(q, id=f"p{i}") for i in range(10)])
    first = reserve_all(greedy, [q], 2)               # asks for 2, then for the 1 missing
    time.sleep(0.3)                                   # time for RabbitMQ to push more, if it would
    assert len(first) == 2
    assert greedy.stats()[0]["in_flight"] == 2        # nothing more prefetched behind them
    assert ready(raw, q) == 8                         # the rest is still there for others
    rest = reserve_all(other, [q], 8, limit=10)
    assert len(rest) == 8
    for d in first:
        assert greedy.ack(d)
    for d in rest:
        assert other.ack(d)


def test_threads_sharing_one_broker_get_each_message_exactly_once(amqp, qname):
    broker, q = amqp(), qname("threads")
    broker.publish_many([out(q, id=f"t{i}") for i in range(200)])
    seen, lock = [], threading.Lock()
    acked = []

    def consume():
        idle = 0
        while idle < 3:
            ds = broker.reserve([q], timeout=0.3, lease=30, limit=5)
            if not ds:
                idle += 1
                continue
            results = [broker.ack(d) for d in ds]      # acks from four threads at once
            with lock:
                seen.extend(d.message_id for d in ds)
                acked.extend(results)

    threads = [threading.Thread(target=consume) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(seen) == sorted(f"t{i}" for i in range(200))
    assert all(acked) and len(acked) == 200
    time.sleep(0.2)
    assert broker.reserve([q], timeout=0.3, lease=5) == []


def test_deliveries_may_be_acked_from_other_threads(amqp, qname):
    # one thread reserves, a pool of four runs and acknowledges; the heartbeat thread extends
    broker, q = amqp(), qname("pool")
    broker.publish_many([out(q, id=f"x{i}") for i in range(200)])
    got = reserve_all(broker, [q], 200, timeout=20, limit=50)
    assert len(got) == 200
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        assert all(pool.map(lambda d: broker.extend(d, 30), got))
        assert all(pool.map(broker.ack, got))
        assert not any(pool.map(broker.ack, got))
    closer = amqp()
    assert closer.reserve([q], timeout=0.5, lease=5) == []


def test_ack_many_reaches_rabbitmq_and_only_the_unacked_message_comes_back(amqp, qname, raw):
    """ack_many writes its acks with one flush: they must all reach the server (closing the
    broker then returns only what was not acknowledged)."""
    broker, q = amqp(), qname("ackmany")
    broker.publish_many([out(q, id=f"m{i}") for i in range(20)])
    got = sorted(reserve_all(broker, [q], 20, timeout=20, limit=20), key=lambda d: int(d.message_id[1:]))
    assert broker.ack_many(got[:19]) == [True] * 19
    broker.close()                                   # the unacked one returns to the queue
    again = amqp()
    [back] = again.reserve([q], timeout=5, lease=5)
    assert back.message_id == "m19" and back.redelivered
    assert again.reserve([q], timeout=0.5, lease=5) == []


# -- connections ----------------------------------------------------------------------------

@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_forked_child_uses_connections_of_its_own(amqp, qname):
    # Given a parent holding a delivery, with publishing and consuming connections open
    broker, q = amqp(), qname("fork")
    broker.publish_many([out(q, id="parent"), out(q, id="child")])
    [held] = broker.reserve([q], timeout=5, lease=30, limit=1)
    assert held.message_id == "parent"
    pid = os.fork()
    if pid == 0:      # the child: the parent's delivery is not its own; it works on fresh connections
        code = 1
        try:
            ok = broker.ack(held) is False
            [mine] = reserve_all(broker, [q], 1)
            broker.publish(out(q, id="from-child"))
            ok = ok and mine.message_id == "child" and broker.ack(mine)
            broker.close()
            code = 0 if ok else 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    # Then the parent's connections were not disturbed: its delivery and publishing still work
    assert broker.ack(held) is True
    [late] = reserve_all(broker, [q], 1)
    assert late.message_id == "from-child" and broker.ack(late)
    broker.publish(out(q, id="after"))
    [d] = reserve_all(broker, [q], 1)
    assert d.message_id == "after" and broker.ack(d)


def test_unreachable_rabbitmq_raises_connection_lost_after_reconnect_timeout():
    broker = broker_from_url("amqp://guest:guest@127.0.0.1:1/%2F?reconnect_timeout=0.5")
    try:
        started = time.monotonic()
        with pytest.raises(ConnectionLost):
            broker.publish(out("nowhere"))
        assert time.monotonic() - started < 5
        with pytest.raises(ConnectionLost):
            broker.reserve(["nowhere"], timeout=0.2)
    finally:
        broker.close()


def test_wrong_password_is_a_configuration_error_at_once():
    require_server("RabbitMQ", "127.0.0.1", 5672)
    broker = broker_from_url("amqp://guest:not-the-password@127.0.0.1:5672/%2F")
    try:
        with pytest.raises(ConfigurationError, match="refused the login"):
            broker.publish(out("nowhere"))
    finally:
        broker.close()


@pytest.mark.slow
def test_broker_reconnects_after_rabbitmq_restart_and_tasks_published_before_complete(amqp, qname):
    needs_rabbitmqctl()
    broker, q = amqp(reconnect_timeout=60), qname("restart")
    # Given a waiting message, a delayed one and one in flight, all published before the restart
    broker.publish_many([out(q, id="in-flight"), out(q, id="waiting"), out(q, id="delayed", eta=time.time() + 2)])
    [held] = broker.reserve([q], timeout=5, lease=30, limit=1)
    assert held.message_id == "in-flight"
    impatient, elsewhere = amqp(reconnect_timeout=1.0), qname("impatient")
    assert impatient.reserve([elsewhere], timeout=0.2, lease=30) == []     # consuming, queue declared
    try:
        rabbitmqctl("stop_app")
        # a broker that may not wait long gives up with ConnectionLost, not an endless wait
        started = time.monotonic()
        with pytest.raises(ConnectionLost):
            while time.monotonic() - started < 10:
                impatient.reserve([elsewhere], timeout=0.5, lease=30)
        assert time.monotonic() - started < 5
    finally:
        rabbitmqctl("start_app")
        rabbitmqctl("await_startup")
    # When the broker is used again (reserve and publish reconnect with back-off)
    broker.publish(out(q, id="after"))
    got = {}
    deadline = time.monotonic() + 30
    while len(got) < 4 and time.monotonic() < deadline:
        for d in broker.reserve([q], timeout=1, lease=30, limit=4):
            got[d.message_id] = d
            assert broker.ack(d)
    # Then everything published before the restart is still delivered, and the old delivery is stale
    assert set(got) == {"in-flight", "waiting", "delayed", "after"}
    assert got["in-flight"].redelivered
    assert broker.ack(held) is False
