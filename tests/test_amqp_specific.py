"""What only the RabbitMQ broker promises: confirms, delay buckets, dead letters with a
reason, prefetch, one broker shared by threads, reconnects, a server restart.

Runs on the real RabbitMQ of conftest (skipped locally when it is not there, failed
under CI). Queue names come from ``qname`` and are deleted afterwards, with their delay
and dead-letter queues. The length-limit test sets a policy that matches its own queue
only (``rabbitmqctl``, skipped when that is not usable here). The restart test restarts
a RabbitMQ node of its own (``rabbitmq-server`` on free ports, data in the test's
temporary directory), never the shared server.
"""
from __future__ import annotations

import concurrent.futures
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import pika
import pytest

import nbqueue
from nbqueue import serialization, states
from nbqueue.broker import Outgoing
from nbqueue.drivers import backend_from_url, broker_from_url
from nbqueue.drivers.amqp.broker import AMQPBroker
from nbqueue.drivers.amqp.consumer import LOWER_AFTER_S, Consumption, Demand, Pending, Session
from nbqueue.drivers.amqp.topology import (
    H_ETA,
    MAX_BUCKET,
    MAX_HOP_MS,
    MAX_TTL_MS,
    QUEUE_VERSION,
    dead_queue_name,
    delay_bucket,
    delay_queue_arguments,
    delay_queue_name,
    delay_queue_names,
    work_queue_arguments,
)
from nbqueue.errors import BrokerError, ConfigurationError, ConnectionLost, PublishRefused, TaskFailed
from nbqueue.testing import wait_for

from conftest import AMQP_URL, IN_CI, free_port, require_server


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


class RabbitMQNode:
    """A RabbitMQ node of the test's own: its name, ports and data directory are the
    test's, so stopping and starting it disturbs no one. Needs root (the server runs as
    the ``rabbitmq`` user, which must own the directory; pytest's own temporary
    directories are private to root, so it lives in a directory of its own)."""

    def __init__(self, directory):
        self.dir = directory
        self.port, self.dist_port = free_port(), free_port()
        self.name = f"nbqtest{self.port}@localhost"
        self.proc: subprocess.Popen | None = None
        for sub in ("mnesia", "log"):
            (directory / sub).mkdir()
        owner = pwd.getpwnam("rabbitmq")
        for path in (directory, directory / "mnesia", directory / "log"):
            os.chown(path, owner.pw_uid, owner.pw_gid)

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/%2F"

    def env(self) -> dict:
        d = str(self.dir)
        return {**os.environ, "RABBITMQ_NODENAME": self.name, "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
                "RABBITMQ_NODE_PORT": str(self.port), "RABBITMQ_DIST_PORT": str(self.dist_port),
                "RABBITMQ_MNESIA_BASE": f"{d}/mnesia", "RABBITMQ_LOG_BASE": f"{d}/log",
                "RABBITMQ_PID_FILE": f"{d}/node.pid", "RABBITMQ_FEATURE_FLAGS_FILE": f"{d}/feature_flags",
                "RABBITMQ_ENABLED_PLUGINS_FILE": f"{d}/enabled_plugins", "RABBITMQ_PLUGINS_EXPAND_DIR": f"{d}/plugins",
                "RABBITMQ_CONFIG_FILE": f"{d}/rabbitmq", "RABBITMQ_ADVANCED_CONFIG_FILE": f"{d}/advanced.config"}

    def start(self) -> None:
        with open(self.dir / "log" / "server.out", "ab") as log:
            self.proc = subprocess.Popen(
                ["rabbitmq-server"], env=self.env(), cwd=self.dir, stdout=log, stderr=subprocess.STDOUT
            )

        def up() -> bool:
            assert self.proc.poll() is None, (
                "rabbitmq-server exited: " + (self.dir / "log" / "server.out").read_text()[-2000:]
            )
            try:
                pika.BlockingConnection(
                    pika.URLParameters(self.url + "?connection_attempts=1&socket_timeout=1")
                ).close()
                return True
            except pika.exceptions.AMQPError:
                return False

        wait_for(up, timeout=120, interval=0.2, message=f"RabbitMQ node {self.name}")

    def stop(self) -> None:
        """SIGTERM to the node (a clean shutdown: durable queues and persistent messages stay)."""
        if self.proc is None:
            return
        pid_file = self.dir / "node.pid"
        if pid_file.exists():
            try:
                os.kill(int(pid_file.read_text().strip()), signal.SIGTERM)
            except (ValueError, ProcessLookupError):
                pass
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        pid_file.unlink(missing_ok=True)
        self.proc = None


@pytest.fixture
def own_rabbitmq():
    if shutil.which("rabbitmq-server") is None:
        if IN_CI:
            pytest.fail("rabbitmq-server is not installed (CI=true: a missing server is a failure)")
        pytest.skip("rabbitmq-server is not installed")
    if os.geteuid() != 0:
        pytest.skip("starting a RabbitMQ node of the test's own needs root (the server runs as the rabbitmq user)")
    directory = Path(tempfile.mkdtemp(prefix="nbqtest-rabbitmq-"))
    try:
        node = RabbitMQNode(directory)
        node.start()
        try:
            yield node
        finally:
            node.stop()
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def out(
    queue: str, body: str = "{}", *, id: str | None = None, eta: float | None = None, priority: int = 0
) -> Outgoing:
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


@pytest.fixture
def amqp_app(tmp_path, qname):
    """An App on the test RabbitMQ with its results in SQLite, and an ``add`` task."""
    require_server("RabbitMQ", "127.0.0.1", 5672)
    app = nbqueue.App(AMQP_URL, f"sqlite:///{tmp_path}/results.db", default_queue=qname("app"))
    app.task(name="add")(_add)
    yield app
    app.broker.delete_queues(qname.made)
    app.close()


def _add(x, y):
    return x + y


def test_a_delay_rabbitmq_refuses_fails_its_record_instead_of_leaving_it_pending(amqp_app, raw):
    # Given an App whose queue is deleted behind its back after a first send
    add = amqp_app.registry["add"]
    add.delay(1, 1)
    raw.queue_delete(amqp_app.default_queue)
    # When a .delay() is returned as unroutable
    with pytest.raises(PublishRefused, match="unroutable") as refused:
        add.delay(2, 2)
    # Then its record is final, failed with the reason: nothing waits on it forever
    [task_id] = refused.value.message_ids
    record = amqp_app.backend.get(task_id)
    assert record["state"] == states.FAILURE and record["exc_type"] == "PublishRefused"
    assert "unroutable" in record["error"]
    with pytest.raises(TaskFailed, match="unroutable"):
        amqp_app.result(task_id).get(timeout=5)


def test_a_record_written_after_its_message_keeps_what_a_fast_worker_recorded(amqp_app, monkeypatch):
    # Given a worker that begins and finishes the task while its confirm is on its way,
    # before the sender writes the task's record
    backend, start = amqp_app.backend, amqp_app.broker.start_publish
    ran = []

    def start_then_run(outs):
        confirmed = start(outs)
        for o in outs:
            tokens = backend.begin_many([o.id], worker="fast", fields={o.id: {"name": "add", "queue": o.queue}})
            assert backend.store_results([(o.id, states.SUCCESS, tokens[o.id], {"result": "4"})]) == [True]
            ran.append(o.id)
        return confirmed

    monkeypatch.setattr(amqp_app.broker, "start_publish", start_then_run)
    # When .delay() returns
    handle = amqp_app.registry["add"].delay(2, 2)
    # Then the worker's outcome stands (state, token, result) and the record has the sent fields
    assert ran == [handle.id]
    record = backend.get(handle.id)
    assert (record["state"], record["token"], record["worker"]) == (states.SUCCESS, 1, "fast")
    assert handle.get(timeout=5) == 4
    assert serialization.loads(record["args"]) == [2, 2] and record["created_at"] <= record["started_at"]


def test_a_publish_whose_confirms_were_never_waited_for_does_not_confuse_the_next(amqp, qname):
    # Given a split publish whose waiting half is never called (its caller failed in between)
    broker, q = amqp(), qname("split")
    broker.start_publish([out(q, id="first")])
    # When the same thread publishes again
    broker.publish_many([out(q, id="second"), out(q, id="third")])
    # Then that publish is confirmed on its own, and all three messages are queued
    got = reserve_all(broker, [q], 3)
    assert sorted(d.message_id for d in got) == ["first", "second", "third"]
    assert all(broker.ack(d) for d in got)


def test_new_queues_are_of_version_2_and_queues_declared_without_a_version_are_used_as_they_are(amqp, qname, raw):
    broker = amqp()
    fresh, older = qname("v2"), qname("v1")
    # Given a work queue and its delay queues as an nbqueue without queue versions declared them
    raw.queue_declare(older, durable=True, arguments=work_queue_arguments())
    for name in delay_queue_names(older):
        raw.queue_declare(name, durable=True, arguments=delay_queue_arguments(older))
    # When the broker sends to it (at once and delayed), and to a queue it creates itself
    broker.publish(out(older, id="now"))
    broker.publish(out(older, id="soon", eta=time.time() + 0.3))
    broker.publish(out(fresh, id="new"))
    # Then the existing queues serve as they are: both messages arrive
    got = reserve_all(broker, [older], 2, timeout=10)
    assert sorted(d.message_id for d in got) == ["now", "soon"]
    assert all(broker.ack(d) for d in got)
    [d] = reserve_all(broker, [fresh], 1)
    assert d.message_id == "new" and broker.ack(d)
    # And the new queue is of version 2: declaring it without the version is refused
    with pytest.raises(pika.exceptions.ChannelClosedByBroker, match="x-queue-version") as refused:
        raw.queue_declare(fresh, durable=True, arguments=work_queue_arguments())
    assert refused.value.reply_code == 406
    assert raw.connection.channel().queue_declare(fresh, durable=True,
                                                  arguments={**work_queue_arguments(), **QUEUE_VERSION})


def test_publish_nacked_by_a_queue_length_limit_is_refused(amqp, qname):
    needs_rabbitmqctl()
    broker, q = amqp(), qname("full")
    policy = f"nbq-test-{q}"
    rabbitmqctl(
        "set_policy", "--apply-to", "queues", policy, f"^{q}$", '{"max-length": 1, "overflow": "reject-publish"}'
    )
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


def test_names_derived_from_the_longest_queue_name_send_accepts_fit_rabbitmq(amqp, qname):
    """Given a queue name of MAX_QUEUE_NAME bytes, the longest nbqueue derives from it (a
    kernel's code queue) takes delayed messages (its delay queue) and dead letters (its
    dead-letter queue) on RabbitMQ."""
    from nbqueue.drivers.amqp import MAX_QUEUE_NAME
    from nbqueue.shipping import code_queue

    base = qname("long")
    base += "x" * (MAX_QUEUE_NAME - len(base))
    longest = code_queue(f"{base}.kernel-4194304-abcdef")
    qname.made.append(longest)
    broker = amqp()
    broker.publish(out(longest, id="later", eta=time.time() + 0.5))
    [d] = reserve_all(broker, [longest], 1)
    assert d.message_id == "later" and broker.reject(d, "no good")
    [dead] = wait_for(lambda: broker.dead_letters(longest))
    assert (dead["id"], dead["queue"], dead["reason"]) == ("later", longest, "no good")


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


def test_a_reserver_taking_one_message_at_a_time_beside_a_waiting_one_does_not_reset_the_prefetch(
        amqp, qname, monkeypatch):
    # Given a broker with one reserver waiting on a quiet queue (limit 4) and another on a
    # second queue, each asking for 4 and getting the one message published each time
    broker, quiet, busy = amqp(), qname("quiet"), qname("busy")
    with concurrent.futures.ThreadPoolExecutor(1) as waiting:
        parked = waiting.submit(broker.reserve, [quiet], timeout=60, lease=30, limit=4)
        wait_for(lambda: len(broker._consumption.demands) == 1, message="the reserver waits")
        broker.publish(out(busy, id="warm-up"))
        [d] = reserve_all(broker, [busy], 1, limit=4)
        assert broker.ack(d)
        qos: list[int] = []
        set_qos = pika.adapters.blocking_connection.BlockingChannel.basic_qos

        def counted(channel, *args, **kwargs):
            qos.append(kwargs.get("prefetch_count", 0))
            return set_qos(channel, *args, **kwargs)

        monkeypatch.setattr(pika.adapters.blocking_connection.BlockingChannel, "basic_qos", counted)
        # When the second takes one message, acks it and comes back, twenty times
        for i in range(20):
            broker.publish(out(busy, id=f"m{i}"))
            [d] = reserve_all(broker, [busy], 1, limit=4)
            assert d.message_id == f"m{i}" and broker.ack(d)
        # Then the prefetch was not changed meanwhile: the window swings by less than a limit
        # (each change would be a basic.qos round trip on the consuming connection)
        assert qos == []
        broker.publish(out(quiet, id="last"))
        [last] = parked.result(timeout=30)
        assert last.message_id == "last" and broker.ack(last)


def test_the_prefetch_follows_the_window_within_one_limit():
    # the window: deliveries held plus the limits of the waiting reservers
    state = Consumption(None, None)
    session = Session(None, None)
    state.session, session.prefetch = session, 8
    state.demands = [Demand(frozenset({"q"}), 4), Demand(frozenset({"q"}), 4)]
    assert state.prefetch_for(session, 0.0) is None             # the window is 8
    state.demands.pop()
    session.outstanding = {1: "q"}
    assert state.prefetch_for(session, 0.0) is None             # 5: within a limit (4) below
    session.outstanding = {}
    assert state.prefetch_for(session, 0.0) is None             # 4: a limit below
    session.prefetch = 9
    assert state.prefetch_for(session, 1.0) is None             # more than a limit below: not yet
    assert state.prefetch_for(session, 1.0 + LOWER_AFTER_S / 2) is None
    session.prefetch = 50                                       # (left by a reserver of 50)
    state.demands = [Demand(frozenset({"q"}), 4)] * 3
    assert state.prefetch_for(session, 2.0) == 12
    session.prefetch = 8
    assert state.prefetch_for(session, 2.0) == 12               # a wider window: raised at once
    state.demands = []
    assert state.prefetch_for(session, 2.0) is None             # nobody waits: left as it is


def test_the_prefetch_is_lowered_once_it_stayed_too_wide_for_a_while():
    state = Consumption(None, None)
    session = Session(None, None)
    state.session, session.prefetch = session, 16
    state.demands = [Demand(frozenset({"q"}), 4)]
    # Given a window (4) more than a limit below the prefetch (16), first seen at t=10
    assert state.prefetch_for(session, 10.0) is None
    # When the window widens again meanwhile, the wait starts over
    state.demands = [Demand(frozenset({"q"}), 4)] * 4
    assert state.prefetch_for(session, 10.0 + LOWER_AFTER_S / 2) is None
    state.demands = [Demand(frozenset({"q"}), 4)]
    assert state.prefetch_for(session, 10.0 + LOWER_AFTER_S) is None
    # Then it is lowered once it has stayed too wide for LOWER_AFTER_S
    assert state.prefetch_for(session, 10.0 + 2 * LOWER_AFTER_S) == 4


def test_held_acks_are_written_as_one_multiple_ack_below_the_first_unsettled_delivery():
    # Given acks held for deliveries 1, 2, 3 and 6, with 4 handed out, 5 claimed and 7 pushed
    session = Session(None, None)
    session.held, session.outstanding, session.claimed = {1, 2, 3, 6}, {4: "q"}, {5}
    session.buffer = [Pending(0, "q", 7, False, None, b"")]
    # When the acks that may go are taken: one frame acks 1-3 (multiple), 6 stays held
    assert session.due_acks(False) == [(3, True)]
    assert session.held == {6}
    # When all must go: the one above an unsettled delivery is acked alone
    session.held.update({1, 2})
    assert session.due_acks(True) == [(2, True), (6, False)]
    assert session.held == set()
    session.held, session.outstanding, session.claimed, session.buffer = {8}, {}, set(), []
    assert session.due_acks(False) == [(8, False)]


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


class _StingySocket:
    """A socket whose first ``send`` takes only ``first`` bytes (or, given an error, raises it);
    later sends take what they are given, as much as the socket does."""

    def __init__(self, sock, first: int = 0, error: BaseException | None = None):
        self.sock, self.first, self.error, self.sends = sock, first, error, []

    def send(self, data) -> int:
        self.sends.append(len(data))
        if len(self.sends) == 1:
            if self.error is not None:
                raise self.error
            data = data[:self.first]
        return self.sock.send(data)

    def __getattr__(self, name):
        return getattr(self.sock, name)


@pytest.mark.parametrize("stingy", [dict(first=5), dict(error=BlockingIOError())], ids=["part", "would block"])
def test_frames_the_socket_does_not_take_at_once_are_written_by_the_loop_whole(amqp, qname, stingy):
    # Given a publishing and a consuming connection whose sockets take part of a first write
    # only, or none of it
    broker, q = amqp(), qname("stingy")
    broker.publish(out(q, id="warm-up"))
    [warm] = reserve_all(broker, [q], 1)
    transports = [broker._publishers.current().connection._impl._transport,
                  broker._consumption.session.connection._impl._transport]
    sockets = [_StingySocket(t._sock, **stingy) for t in transports]
    for transport, sock in zip(transports, sockets):
        transport._sock = sock
    # When a message of 100 kB is published and confirmed, and the deliveries acked
    body = serialization.dumps({"blob": "x" * 100_000})
    broker.publish(out(q, body, id="big"))
    assert broker.ack(warm)
    [big] = reserve_all(broker, [q], 1)
    assert broker.ack(big)
    # Then the frames went out whole: the message arrived as published, once, and both
    # acks reached RabbitMQ (nothing comes back to another consumer once this one closes)
    assert big.body == body and big.message_id == "big"
    assert all(len(sock.sends) >= 2 for sock in sockets)      # the rest was written by pika's loop
    broker.close()
    assert amqp().reserve([q], timeout=0.5, lease=5) == []


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


def test_an_ack_held_back_while_a_reserver_waits_still_reaches_rabbitmq(amqp, qname):
    """With a reserver waiting for more, an ack may be held back until the next delivery (see
    consumer.Session): the waiting reserver still gets the next message, and neither acked
    message comes back once the broker closes; the one left unacked does."""
    broker, q = amqp(), qname("held")
    broker.publish_many([out(q, id="m1")])
    [first] = reserve_all(broker, [q], 1, limit=1)
    got: list = []
    waiting = threading.Thread(target=lambda: got.extend(broker.reserve([q], timeout=10, lease=30, limit=2)))
    waiting.start()
    wait_for(lambda: broker._consumption.demands, timeout=5)
    assert broker.ack(first)
    broker.publish_many([out(q, id="m2")])
    waiting.join(15)
    assert [d.message_id for d in got] == ["m2"]
    broker.publish_many([out(q, id="m3")])
    [third] = reserve_all(broker, [q], 1, limit=1)
    assert broker.ack_many([got[0]]) == [True]
    broker.close()
    again = amqp()
    [back] = again.reserve([q], timeout=5, lease=5)
    assert back.message_id == "m3" and back.redelivered
    assert again.reserve([q], timeout=0.5, lease=5) == []


def test_held_acks_written_together_never_ack_a_delivery_still_held(amqp, qname):
    """Acks held and written as one multiple ack (see consumer.Session) cover only settled
    deliveries: the one still handed out when they are written comes back, the acked ones not."""
    broker, q, other = amqp(), qname("multi"), qname("multi-idle")
    broker.publish_many([out(q, id=f"m{i}") for i in range(1, 6)])
    waiting = concurrent.futures.ThreadPoolExecutor(1)
    with waiting:
        # Given a reserver waiting on another queue (so acks may be held) and five deliveries
        parked = waiting.submit(broker.reserve, [other], timeout=30, lease=30, limit=8)
        wait_for(lambda: broker._consumption.demands, timeout=5)
        got = [reserve_all(broker, [q], 1, limit=1)[0] for _ in range(5)]
        assert [d.message_id for d in got] == ["m1", "m2", "m3", "m4", "m5"]
        # When all but m3 are acked, and a sixth delivery makes the held acks go out
        assert broker.ack_many([got[0], got[1], got[3]]) == [True] * 3
        assert broker.ack(got[4])
        broker.publish_many([out(q, id="m6")])
        [sixth] = reserve_all(broker, [q], 1, limit=1)
        assert sixth.message_id == "m6"
        broker.wake()
        assert parked.result(timeout=30) == []
    broker.close()
    # Then only the two never acked come back
    again = amqp()
    back = reserve_all(again, [q], 3, timeout=3, limit=3)
    assert sorted(d.message_id for d in back) == ["m3", "m6"]


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
def test_broker_reconnects_after_rabbitmq_restart_and_tasks_published_before_complete(own_rabbitmq):
    node = own_rabbitmq
    made = []

    def broker(**options):
        b = broker_from_url(node.url, options=options)
        made.append(b)
        return b

    q = "restart"
    b = broker(reconnect_timeout=60)
    # Given a waiting message, a delayed one and one in flight, all published before the restart
    b.publish_many([out(q, id="in-flight"), out(q, id="waiting"), out(q, id="delayed", eta=time.time() + 2)])
    [held] = b.reserve([q], timeout=5, lease=30, limit=1)
    assert held.message_id == "in-flight"
    impatient = broker(reconnect_timeout=1.0)
    assert impatient.reserve(["impatient"], timeout=0.2, lease=30) == []     # consuming, queue declared
    try:
        node.stop()
        # a broker that may not wait long gives up with ConnectionLost, not an endless wait
        started = time.monotonic()
        with pytest.raises(ConnectionLost):
            while time.monotonic() - started < 10:
                impatient.reserve(["impatient"], timeout=0.5, lease=30)
    finally:
        node.start()
    try:
        # When the broker is used again (reserve and publish reconnect with back-off)
        b.publish(out(q, id="after"))
        got = {}
        deadline = time.monotonic() + 30
        while len(got) < 4 and time.monotonic() < deadline:
            for d in b.reserve([q], timeout=1, lease=30, limit=4):
                got[d.message_id] = d
                assert b.ack(d)
        # Then everything published before the restart is still delivered, and the old delivery is stale
        assert set(got) == {"in-flight", "waiting", "delayed", "after"}
        assert got["in-flight"].redelivered
        assert b.ack(held) is False
    finally:
        for x in made:
            x.close()


@pytest.mark.parametrize("url_query, options", [
    ("?lock_timeout=soon", None),
    ("?lock_timeout=nan", None),
    ("", {"lock_timeout": "soon"}),
    ("", {"lock_timeout": -1}),
    ("", {"lock_timeout": True}),
    ("", {"lock_timeout": [30]}),
])
def test_a_lock_timeout_that_is_not_seconds_is_a_configuration_error(url_query, options):
    with pytest.raises(ConfigurationError, match="lock_timeout must be a number of seconds"):
        backend_from_url(AMQP_URL + url_query, options=options)


def test_lock_timeout_is_read_from_the_url_or_the_options():
    assert backend_from_url(AMQP_URL).lock_timeout == 30.0
    assert backend_from_url(AMQP_URL + "?lock_timeout=2.5").lock_timeout == 2.5
    assert backend_from_url(AMQP_URL + "?lock_timeout=").lock_timeout == 30.0
    assert backend_from_url(AMQP_URL, options={"lock_timeout": 0}).lock_timeout == 0.0


def test_a_lock_timeout_of_zero_fails_at_once_on_a_busy_lock():
    require_server("RabbitMQ", "127.0.0.1", 5672)
    holder = backend_from_url(AMQP_URL)
    impatient = backend_from_url(AMQP_URL, options={"lock_timeout": 0})
    key = f"lock-{uuid.uuid4().hex}"
    try:
        with pytest.raises(BrokerError, match="has been busy for 0 s"):
            holder._locked(key, lambda *_: impatient._locked(key, lambda *_: None))
    finally:
        holder.close()
        impatient.close()
