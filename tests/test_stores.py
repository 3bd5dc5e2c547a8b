"""The SQS broker, the Memcache and AMQP result backends: whole Apps on them, and what each
store does that the contract suites do not cover (tests/test_contracts.py runs those).

Apps: SQS (moto's server, started by the session) with results in SQLite or memcached,
and RabbitMQ with results in RabbitMQ. Each App uses queues and key prefixes of its own.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

import nbqueue
from nbqueue import Backoff, Signature, chord, states
from nbqueue.broker import Outgoing
from nbqueue.errors import ConfigurationError, PublishRefused, SerializationError, TaskFailed, UnsupportedOperation
from nbqueue.testing import wait_for

from conftest import AMQP_URL, app_maker, require_server, session_server_url

TESTS_DIR = Path(__file__).resolve().parent

COMBOS = ["sqs+sqlite", "sqs+memcache", "amqp+amqp"]


def combo_urls(combo: str, tmp_path) -> tuple[str, str]:
    if combo == "sqs+sqlite":
        return session_server_url("sqs"), f"sqlite:///{tmp_path}/results.db"
    if combo == "sqs+memcache":
        return session_server_url("sqs"), session_server_url("memcache")
    require_server("RabbitMQ", "127.0.0.1", 5672)
    return AMQP_URL, session_server_url("amqp-results")


@pytest.fixture(params=COMBOS)
def combo(request):
    return request.param


@pytest.fixture
def store_app(combo, tmp_path, qname):
    """``store_app(**options)``: Apps on one broker/backend pair of this combo; tidied after the test."""
    yield from app_maker(*combo_urls(combo, tmp_path), qname, combo)


def register(app):
    @app.task(name="add")
    def add(x, y):
        return x + y

    @app.task(name="total")
    def total(values):
        return sum(values)

    return add, total


# -- whole Apps ----------------------------------------------------------------------------------------

def test_task_round_trip(store_app):
    app = store_app()
    add, _ = register(app)
    app.start_worker(concurrency=2)
    result = add.delay(2, 3)
    assert result.get(timeout=30) == 5
    assert result.state == states.SUCCESS and result.get(timeout=1) == 5     # readable again
    assert app.result(result.id).get(timeout=5) == 5                         # and through a fresh handle


def test_chord_calls_back_once_with_results_in_order(store_app):
    app = store_app()
    add, total = register(app)
    calls = []

    @app.task(name="collect")
    def collect(values):
        calls.append(values)
        return values

    app.start_worker(concurrency=3)
    res = app.send_chord(chord([add.s(i, i) for i in range(6)], collect.s()))
    assert res.get(timeout=60) == [0, 2, 4, 6, 8, 10]
    for worker in app.workers:
        worker.stop(wait=True, timeout=30)       # whatever was still running or reserved has finished
    assert len(calls) == 1


def test_group_with_a_concurrency_limit_finishes_every_member(store_app):
    """Held members wait in the backend's key-value store (kv_items by prefix) until released."""
    app = store_app()
    add, _ = register(app)
    app.start_worker(concurrency=2)
    res = app.send_group(nbqueue.group([add.s(i, 1) for i in range(7)]), concurrency=2)
    assert res.get(timeout=60) == [1, 2, 3, 4, 5, 6, 7]
    assert app.backend.kv_items("nbq:held:") == {}


def test_failing_task_is_retried_after_its_delay_then_succeeds(store_app):
    app = store_app()
    attempts = []

    @app.task(name="flaky", retry_count=2, retry_backoff=Backoff("fixed", base=1))
    def flaky(x):
        attempts.append(time.time())
        if len(attempts) < 2:
            raise ConnectionError("first attempt fails")
        return x * 10

    app.start_worker()
    result = flaky.delay(4)
    assert result.get(timeout=60) == 40
    assert len(attempts) == 2 and attempts[1] - attempts[0] >= 0.9    # the retry waited its delay
    assert result.retries == 1


def test_worker_in_another_process_runs_tasks_and_results_read_back(store_app, tmp_path):
    app = store_app()
    env = {**__import__("os").environ, "NBQUEUE_BROKER": app.broker_url, "NBQUEUE_BACKEND": app.backend_url,
           "NBQUEUE_DEFAULT_QUEUE": app.default_queue, "NBQUEUE_TEST_SIDE_DB": str(tmp_path / "side.db"),
           "NBQUEUE_LOG_LEVEL": "WARNING",
           # the worker imports the nbqueue under test, whatever the venv has installed
           "PYTHONPATH": __import__("os").pathsep.join([str(TESTS_DIR), str(TESTS_DIR.parent)])}
    log = tmp_path / "worker.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "nbqueue", "worker", "--app", "proc_tasks:app", "--concurrency", "2"],
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        results = [app.send_task(Signature("add", args=[i, 100])) for i in range(5)]
        assert [r.get(timeout=60) for r in results] == [100, 101, 102, 103, 104]
        # another process reads the same results again (AMQP: a state is not consumed by reading it)
        code = ("import nbqueue, sys; app = nbqueue.App(sys.argv[1], sys.argv[2]); "
                "print([app.result(i).get(timeout=30) for i in sys.argv[3:]]); app.close()")
        out = subprocess.run([sys.executable, "-c", code, app.broker_url, app.backend_url, *[r.id for r in results]],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == "[100, 101, 102, 103, 104]"
    finally:
        proc.terminate()
        proc.wait(30)
    assert proc.returncode == 0, log.read_text(errors="replace")


# -- SQS ---------------------------------------------------------------------------------------------

@pytest.fixture
def sqs(qname):
    """``sqs(**options)``: SQS brokers on the session's moto server; their queues deleted after."""
    from nbqueue.drivers.sqs.broker import SQSBroker

    url = session_server_url("sqs")
    made = []

    def make(**options):
        broker = SQSBroker(url, options=options)
        made.append(broker)
        return broker

    make.url = url
    yield make
    if made:
        made[0].delete_queues(qname.made)
    for broker in made:
        broker.close()


def _reserve(broker, queue, timeout=10.0, lease=30.0):
    got = []
    deadline = time.monotonic() + timeout
    while not got and time.monotonic() < deadline:
        got = broker.reserve([queue], timeout=0.5, lease=lease)
    return got


def test_sqs_message_delivered_max_deliveries_times_without_finishing_comes_flagged_then_dead_letters_with_the_reason(
    sqs, qname
):
    broker, q = sqs(max_deliveries=2), qname("poison")
    broker.publish(Outgoing(id="poison", body="{}", queue=q))
    for attempt in (1, 2):                      # the worker dies each time: the lease (1 s) runs out
        [d] = _reserve(broker, q, lease=1)
        assert (d.attempt, d.lapsed, d.dead_reason) == (attempt, attempt - 1, None)
    [d] = _reserve(broker, q, lease=30)         # the third receive: flagged for the worker to dead-letter
    assert (d.attempt, d.lapsed) == (3, 2)
    assert d.dead_reason == "delivered 2 times without finishing (max_deliveries=2)"
    assert broker.reject(d, d.dead_reason)
    dead = wait_for(lambda: broker.dead_letters(q))
    assert [(x["id"], x["reason"]) for x in dead] == [
        ("poison", "delivered 2 times without finishing (max_deliveries=2)")
    ]
    assert wait_for(lambda: [s for s in broker.stats() if s["queue"] == q and s["dead"] == 1])


def test_sqs_redrive_policy_moves_a_message_only_when_its_flagged_delivery_lapses_too(sqs, qname):
    """The queue's own redrive policy is a backstop: a worker that dies before dead-lettering
    the flagged delivery leaves it to SQS, which moves it at the next receive."""
    broker, q = sqs(max_deliveries=1), qname("backstop")
    broker.publish(Outgoing(id="crash", body="{}", queue=q))
    [d] = _reserve(broker, q, lease=1)
    assert d.lapsed == 0
    [d] = _reserve(broker, q, lease=1)
    assert d.lapsed == 1 and d.dead_reason is not None        # the worker dies with this one too
    assert broker.reserve([q], timeout=2.5, lease=1) == []     # SQS moved it instead of a third receive
    dead = wait_for(lambda: broker.dead_letters(q))
    assert [x["id"] for x in dead] == ["crash"] and "redrive policy" in dead[0]["reason"]


def test_sqs_retry_release_and_delay_hops_are_not_lapses(sqs, qname):
    """SQS counts every receive; a hand-back that is not a lapse sends a copy instead, so its
    next receive does not read as one (ChangeMessageVisibility to 0 would)."""
    broker, q = sqs(max_deliveries=2), qname("nolapse")
    broker.max_delay = 1                        # SQS's 15 minutes, shortened: the same code path
    broker.publish(Outgoing(id="n", body="{}", queue=q))
    [d] = _reserve(broker, q, lease=1)
    assert broker.retry(d)
    [d] = _reserve(broker, q, lease=1)
    assert broker.release(d)
    [d] = _reserve(broker, q, lease=1)
    assert broker.retry(d, eta=time.time() + 2.2)             # hops once on the way
    [d] = _reserve(broker, q, lease=1)
    assert (d.attempt, d.lapsed, d.dead_reason) == (3, 0, None)
    [d] = _reserve(broker, q, lease=30)                        # its lease (1 s) ran out: a lapse
    assert (d.attempt, d.lapsed, d.dead_reason) == (4, 1, None)
    assert broker.defer(d, eta=time.time() + 1)               # still after its lapse, not another
    [d] = _reserve(broker, q, lease=30)
    assert (d.lapsed, d.after_lapse, d.dead_reason) == (1, True, None)
    assert broker.ack(d)


def test_sqs_message_after_a_lapse_comes_alone_and_its_batch_mates_are_not_counted(sqs, qname):
    broker, q = sqs(), qname("alone")
    broker.publish(Outgoing(id="suspect", body="{}", queue=q))
    _reserve(broker, q, lease=1)
    broker.publish_many([Outgoing(id=f"m{i}", body="{}", queue=q) for i in range(4)])
    # the suspect's lease runs out while the others wait: all five visible, received together
    wait_for(lambda: [s for s in broker.stats() if s["queue"] == q and s["ready"] == 5])
    got: list = []
    deadline = time.monotonic() + 60     # a bound for a hang, generous for a loaded machine
    while sum(map(len, got)) < 5 and time.monotonic() < deadline:
        batch = broker.reserve([q], timeout=0.5, lease=30, limit=10)
        if batch:
            got.append(batch)
    assert sorted(d.message_id for b in got for d in b) == ["m0", "m1", "m2", "m3", "suspect"]
    assert [[d.message_id for d in b] for b in got if any(d.message_id == "suspect" for d in b)] == [["suspect"]]
    assert {d.message_id: (d.attempt, d.lapsed) for b in got for d in b} == {
        **{f"m{i}": (1, 0) for i in range(4)}, "suspect": (2, 1)}
    assert all(broker.ack_many([d for b in got for d in b]))


def test_sqs_created_queue_has_a_redrive_policy_to_its_dead_letter_queue(sqs, qname):
    broker, q = sqs(max_deliveries=3), qname("redrive")
    broker.publish(Outgoing(id="m", body="{}", queue=q))
    attrs = broker.client.get_queue_attributes(QueueUrl=broker._url(q), AttributeNames=["RedrivePolicy"])["Attributes"]
    policy = json.loads(attrs["RedrivePolicy"])
    assert int(policy["maxReceiveCount"]) == 4 and policy["deadLetterTargetArn"].endswith(f":{q}-dead")
    fifo = qname("redrive-f") + ".fifo"
    qname.made.append(fifo)
    broker.publish(Outgoing(id="f", body="{}", queue=fifo))
    attrs = broker.client.get_queue_attributes(QueueUrl=broker._url(fifo), AttributeNames=["RedrivePolicy"])[
        "Attributes"
    ]
    assert int(json.loads(attrs["RedrivePolicy"])["maxReceiveCount"]) == 5      # and one early receive hiding a delay


def test_sqs_queue_made_elsewhere_dead_letters_into_its_own_redrive_target(sqs, qname):
    broker, q, target = sqs(), qname("theirs"), qname("their-dlq")
    client = broker.client
    target_url = client.create_queue(QueueName=target)["QueueUrl"]
    arn = client.get_queue_attributes(QueueUrl=target_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    client.create_queue(
        QueueName=q, Attributes={"RedrivePolicy": json.dumps({"deadLetterTargetArn": arn, "maxReceiveCount": "9"})}
    )
    broker.publish(Outgoing(id="bad", body="{}", queue=q))
    [d] = _reserve(broker, q)
    assert broker.reject(d, "not a task")
    assert [(x["id"], x["reason"]) for x in wait_for(lambda: broker.dead_letters(q))] == [("bad", "not a task")]
    assert client.get_queue_attributes(QueueUrl=target_url, AttributeNames=["ApproximateNumberOfMessages"])[
        "Attributes"
    ] == {"ApproximateNumberOfMessages": "1"}


def test_sqs_delay_beyond_the_native_maximum_hops_and_is_never_early(sqs, qname):
    broker, q = sqs(), qname("long")
    broker.max_delay = 1                        # SQS's 15 minutes, shortened: the same code path
    eta = time.time() + 6                       # far beyond the 1.8 s look below, even on a loaded machine
    broker.publish(Outgoing(id="later", body="{}", queue=q, eta=eta))
    got = broker.reserve([q], timeout=1.8, lease=5)             # received after 1 s, sent on for the rest
    assert got == [], f"handed out {eta - time.time():.1f}s before its eta"
    [d] = _reserve(broker, q)
    assert time.time() >= eta and d.message_id == "later"
    assert d.attempt == 1                       # hops are not deliveries
    assert broker.ack(d)


def test_sqs_fifo_queue_dedupes_by_task_id_and_keeps_delays(sqs, qname):
    broker = sqs()
    q = qname("orders") + ".fifo"
    qname.made.append(q)
    broker.publish(Outgoing(id="o1", body='{"n": 1}', queue=q))
    broker.publish(Outgoing(id="o1", body='{"n": 1}', queue=q))         # a repeat within 5 minutes: dropped
    eta = time.time() + 1.5
    broker.publish(Outgoing(id="o2", body='{"n": 2}', queue=q, eta=eta))
    [d1] = _reserve(broker, q)
    assert d1.message_id == "o1" and broker.ack(d1)
    [d2] = _reserve(broker, q, lease=1)
    assert d2.message_id == "o2" and time.time() >= eta
    assert (d2.attempt, d2.lapsed) == (1, 0)                         # the receive that hid it is no lapse
    [d2] = _reserve(broker, q, lease=5)                               # its lease (1 s) ran out: one is
    assert (d2.message_id, d2.attempt, d2.lapsed) == ("o2", 2, 1)
    assert broker.ack(d2)
    assert broker.reserve([q], timeout=1.2, lease=5) == []


def test_sqs_second_copy_of_a_held_message_is_not_handed_out_again(sqs, qname):
    """SQS standard queues may return a message to a second receive while it is in flight;
    within one broker (a worker's threads share it) the copy is swallowed and the delivery
    acts with the newest receipt."""
    broker, q = sqs(), qname("copies")
    broker.publish(Outgoing(id="once", body="{}", queue=q))
    [d] = _reserve(broker, q)
    url = broker._url(q)
    # what a concurrent receive on another SQS server does: the same message, a new receipt
    again = broker.client.change_message_visibility(QueueUrl=url, ReceiptHandle=d.tag[2], VisibilityTimeout=0)
    assert again["ResponseMetadata"]["HTTPStatusCode"] == 200
    assert broker.reserve([q], timeout=1.5, lease=30) == []          # received again, not handed out
    assert broker.extend(d, 30) and broker.ack(d)                     # with the newest receipt
    assert broker.reserve([q], timeout=1.5, lease=30) == []
    assert wait_for(lambda: [s for s in broker.stats() if s["queue"] == q and s["in_flight"] == 0 and s["ready"] == 0])


def test_sqs_release_hands_back_without_counting_a_delivery(sqs, qname):
    broker, q = sqs(), qname("handback")
    broker.publish(Outgoing(id="h", body="{}", queue=q))
    for _ in range(3):
        [d] = _reserve(broker, q)
        assert d.attempt == 1
        assert broker.release(d)
    [d] = _reserve(broker, q)
    assert broker.retry(d, body='{"again": 1}')                 # a retry counts this reservation
    [d] = _reserve(broker, q)
    assert (d.attempt, d.body) == (2, '{"again": 1}')
    broker.ack(d)


def test_sqs_missing_queue_is_an_error_naming_it_when_creation_is_off(sqs, qname):
    broker = sqs(create_queues=False)
    with pytest.raises(ConfigurationError, match=r"SQS queue 't.*-absent' does not exist and create_queues is off"):
        broker.publish(Outgoing(id="m", body="{}", queue=qname("absent")))


def test_sqs_bad_queue_name_and_oversized_message_are_refused_with_reasons(sqs, qname):
    broker = sqs()
    with pytest.raises(ConfigurationError, match="not a usable SQS queue name"):
        broker.publish(Outgoing(id="m", body="{}", queue="has spaces"))
    with pytest.raises(PublishRefused, match="at most 1,048,576"):
        broker.publish(Outgoing(id="big", body="x" * 1_100_000, queue=qname("big")))


def test_sqs_names_of_queues_nbqueue_derives_map_one_to_one_onto_names_sqs_holds():
    """Every name nbqueue derives (code queues, a kernel's queue and its code queue, of a
    name as long as SQS takes) maps to its own SQS name; names SQS takes are kept."""
    from nbqueue.drivers.sqs.broker import QUEUE_NAME, sqs_name
    from nbqueue.shipping import code_queue

    longest = "q" * 75
    bases = ["default", "a-b_c", "jobs.fifo", "x-", "x_", longest, longest[:-1] + "z"]
    derived = [d for b in bases for k in (b, f"{b}.kernel-4194304-0a1b2c") for d in (k, code_queue(k))]
    names = bases + derived + ["x-.code", "x.-code", "x.code.code", "a.b", "a-b"]
    mapped = {n: sqs_name(n) for n in names}
    assert len(set(mapped.values())) == len(set(names))                      # one SQS queue per name
    for n, m in mapped.items():
        assert QUEUE_NAME.match(m) and len(m.removesuffix(".fifo")) <= 75, (n, m)
    assert [sqs_name(n) for n in ("default", "jobs.fifo", "default.code", "jobs.fifo.code")] == [
        "default", "jobs.fifo", "default-_code", "jobs-_fifo-_code"]
    assert mapped[code_queue(longest)] == sqs_name(code_queue(longest))     # deterministic
    with pytest.raises(ConfigurationError, match=r"'a-_code' is not a usable SQS queue name: '-_' is reserved"):
        sqs_name("a-_code")
    with pytest.raises(ConfigurationError, match=r"'q{76}' is not a usable SQS queue name"):
        sqs_name("q" * 76)


def test_sqs_code_queue_works_under_nbqueue_name_beside_a_queue_whose_sqs_name_is_alike(sqs, qname):
    """Given nbqueue's code queue ``<q>.code`` and a user's queue ``<q>-code`` on one broker,
    each message stays on its own queue; stats, dead letters and purge speak nbqueue's names."""
    broker, q = sqs(), qname("w")
    code, plain = q + ".code", q + "-code"
    qname.made.extend([code, plain])
    broker.publish(Outgoing(id="shipped", body="{}", queue=code))
    broker.publish(Outgoing(id="plain", body="{}", queue=plain))
    [d] = _reserve(broker, code)
    assert (d.message_id, d.queue) == ("shipped", code)
    assert broker.reject(d, "no good")
    [dead] = wait_for(lambda: broker.dead_letters(code))
    assert (dead["id"], dead["queue"], dead["reason"]) == ("shipped", code, "no good")
    rows = {s["queue"]: s for s in broker.stats()}
    assert rows[code]["dead"] == 1 and rows[plain]["dead"] == 0
    assert broker.purge(plain) == 1 and _reserve(broker, plain, timeout=1) == []
    with pytest.raises(ConfigurationError, match=r"'t.*-w-_code' is not a usable SQS queue name"):
        broker.publish(Outgoing(id="m", body="{}", queue=q + "-_code"))


def test_sqs_queue_named_like_a_dead_letter_queue_is_a_queue_of_its_own(sqs, qname):
    """Given nbqueue's queue ``<q>`` and a user's queue ``<q>-dead`` (the SQS name of ``<q>``'s
    dead-letter queue) on one broker, a message rejected on ``<q>`` dead-letters apart from
    the messages on ``<q>-dead``, which is an ordinary queue with its own dead-letter queue."""
    from nbqueue.drivers.sqs.broker import dead_queue_name, sqs_name

    broker, q = sqs(), qname("x")
    user = q + "-dead"
    qname.made.append(user)
    broker.publish(Outgoing(id="plain", body="{}", queue=user))
    broker.publish(Outgoing(id="bad", body="{}", queue=q))
    [d] = _reserve(broker, q)
    assert broker.reject(d, "not a task")
    assert [(x["id"], x["queue"]) for x in wait_for(lambda: broker.dead_letters(q))] == [("bad", q)]
    [p] = _reserve(broker, user)
    assert p.message_id == "plain" and broker.ack(p)
    assert broker.dead_letters(user) == []
    assert _reserve(broker, user, timeout=1.5) == []
    names = [b.replace("x", stem, 1) for b in ("x", "x.fifo", "x.code") for stem in ("x", "x-dead", "x.-dead")]
    mapped = [sqs_name(n) for n in names]
    assert not set(mapped) & {dead_queue_name(m) for m in mapped}           # no user queue is a dead-letter queue
    assert len(set(mapped)) == len(names)
    with pytest.raises(ConfigurationError, match=r"'x\.' is not a usable SQS queue name: .*end in '\.'"):
        sqs_name("x.")


def test_sqs_missing_credentials_name_the_settings_to_fix(monkeypatch, sqs):
    from nbqueue.drivers.sqs.broker import SQSBroker

    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/credentials")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/config")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    host = sqs.url.split("@", 1)[1]                         # the same server, without keys in the URL
    broker = SQSBroker(f"sqs://{host}")
    try:
        with pytest.raises(ConfigurationError, match="AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"):
            broker.publish(Outgoing(id="m", body="{}", queue="nocreds"))
    finally:
        broker.close()


class _RawBody:
    def __init__(self, body: bytes):
        self.body = body

    def stream(self, **_):
        yield self.body


def _sqs_error(request, status: int, code: str):
    from botocore.awsrequest import AWSResponse

    body = b'{"__type": "com.amazonaws.sqs#%s", "message": "refused by the test"}' % code.encode()
    headers = {"Content-Type": "application/x-amz-json-1.0", "x-amzn-query-error": f"{code};Sender"}
    return AWSResponse(request.url, status, headers, _RawBody(body))


def test_sqs_missing_region_names_the_settings_to_fix(monkeypatch):
    from nbqueue.drivers.sqs.broker import SQSBroker

    for name in ("AWS_DEFAULT_REGION", "AWS_REGION", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/config")
    broker = SQSBroker("sqs://")
    with pytest.raises(ConfigurationError, match=r"no AWS region .*\?region=.*AWS_DEFAULT_REGION"):
        broker.publish(Outgoing(id="m", body="{}", queue="noregion"))


def test_sqs_url_keys_are_unquoted():
    from nbqueue.drivers.sqs.broker import SQSBroker

    broker = SQSBroker("sqs://AKIDEXAMPLE:wJal%2FrXUt%2BnFEMI@127.0.0.1:4566?region=us-east-1")
    assert broker._keys == ("AKIDEXAMPLE", "wJal/rXUt+nFEMI") and broker.endpoint_url == "http://127.0.0.1:4566"
    assert "wJal" not in repr(broker)


def test_sqs_refused_credentials_name_the_settings_to_fix(sqs, qname):
    broker = sqs()

    def refuse(request, **_):
        return _sqs_error(request, 403, "InvalidClientTokenId")

    broker.client.meta.events.register("before-send.sqs.GetQueueUrl", refuse)
    try:
        with pytest.raises(
            ConfigurationError, match=r"SQS refused the credentials .*InvalidClientTokenId.*AWS_ACCESS_KEY_ID"
        ):
            broker.publish(Outgoing(id="m", body="{}", queue=qname("creds")))
    finally:
        broker.client.meta.events.unregister("before-send.sqs.GetQueueUrl", refuse)


def test_sqs_throttled_requests_are_retried_with_back_off(sqs, qname):
    broker, q = sqs(), qname("throttle")
    throttled = []

    def throttle(request, **_):
        if len(throttled) < 2:
            throttled.append(request.url)
            return _sqs_error(request, 400, "RequestThrottled")
        return None

    broker._url(q)                                   # the queue exists; now throttle the publish
    broker.client.meta.events.register("before-send.sqs.SendMessageBatch", throttle)
    broker.publish(Outgoing(id="t", body="{}", queue=q))
    assert len(throttled) == 2
    [d] = _reserve(broker, q)
    assert d.message_id == "t"
    broker.ack(d)


def test_sqs_https_url_as_machinery_spells_it():
    from nbqueue.drivers.sqs.broker import SQSBroker

    broker = SQSBroker("https://sqs.eu-west-1.amazonaws.com/123456789012")
    assert (broker.region, broker.account, broker.endpoint_url) == ("eu-west-1", "123456789012", "https://sqs.eu-west-1.amazonaws.com")
    with pytest.raises(ConfigurationError, match="must be an SQS endpoint"):
        SQSBroker("https://example.com/queue")


# -- Memcache ------------------------------------------------------------------------------------------

@pytest.fixture
def memcache():
    from nbqueue.drivers.memcache.backend import MemcacheBackend

    url = session_server_url("memcache")
    made = []

    def make(**options):
        backend = MemcacheBackend(url, options=options)
        made.append(backend)
        return backend

    yield make
    for backend in made:
        backend.close()


def test_memcache_evicted_result_reads_as_expired_not_pending(memcache):
    be = memcache()
    be.create([{"id": "e", "name": "n"}])
    be.store_result("e", states.SUCCESS, token=be.begin("e"), result="1")
    be.client.delete(be._k("r:e"))                  # what memcached does to an item when out of memory
    rec = be.get("e")
    assert (rec["state"], rec["exc_type"]) == (states.FAILURE, "ResultExpired")
    assert "evicted" in rec["error"]
    assert be.wait(["e"], timeout=1) is True        # a waiter ends instead of waiting for ever


def test_memcache_evicted_result_raises_from_get(tmp_path, qname):
    app = nbqueue.App(f"sqlite:///{tmp_path}/q.db", session_server_url("memcache"), default_queue=qname("q"))
    try:
        register(app)
        result = app.send_task(Signature("add", args=[1, 2]))
        app.backend.client.delete(app.backend._k(f"r:{result.id}"))
        with pytest.raises(TaskFailed, match="ResultExpired"):
            result.get(timeout=10)
    finally:
        app.close()


def test_memcache_configured_expiry_reads_as_gone(memcache):
    be = memcache()
    be.results_expire_in = 0.2
    be.store_result("x", states.SUCCESS, token=be.begin("x"), result="1")
    time.sleep(0.4)
    assert be.get("x") is None


def test_memcache_lists_the_newest_index_size_tasks_and_finds_older_ones_by_id(memcache):
    be = memcache(index_size=3)
    be.create([{"id": f"t{i}", "name": "n", "created_at": 1000.0 + i} for i in range(5)])
    assert [r["id"] for r in be.list()] == ["t4", "t3", "t2"]
    assert be.get("t0")["state"] == states.PENDING
    assert [r["id"] for r in be.list(ids=["t0", "t1"])] == ["t1", "t0"]


def test_memcache_result_over_the_item_size_is_recorded_as_failure(tmp_path, qname):
    app = nbqueue.App(
        f"sqlite:///{tmp_path}/q.db", session_server_url("memcache"), default_queue=qname("q"), max_item_size=8192
    )
    try:
        @app.task(name="big")
        def big():
            return "x" * 20_000

        app.start_worker()
        with pytest.raises(TaskFailed) as err:
            big.delay().get(timeout=30)
        assert err.value.exc_type == "ResultTooLarge" and "over the result store's item size" in err.value.message
        with pytest.raises(SerializationError, match="over the result store's item size"):
            app.send_task(Signature("big", args=["y" * 20_000]))
    finally:
        app.close()


def test_memcache_app_tasks_lists_recent_tasks(tmp_path, qname):
    app = nbqueue.App(f"sqlite:///{tmp_path}/q.db", session_server_url("memcache"), default_queue=qname("q"))
    try:
        add, _ = register(app)
        app.start_worker()
        results = [add.delay(i, 1) for i in range(3)]
        [r.get(timeout=30) for r in results]
        frame = app.tasks()
        assert set(frame["id"]) == {r.id for r in results} and set(frame["state"]) == {states.SUCCESS}
    finally:
        app.close()


# -- AMQP results ------------------------------------------------------------------------------------------

def test_amqp_results_cannot_list_all_tasks_and_say_so(tmp_path):
    require_server("RabbitMQ", "127.0.0.1", 5672)
    app = nbqueue.App(f"sqlite:///{tmp_path}/q.db", session_server_url("amqp-results"))
    try:
        with pytest.raises(UnsupportedOperation, match="cannot list tasks"):
            app.tasks()
    finally:
        app.backend.delete_queues()
        app.close()


def test_amqp_result_queue_is_named_by_task_id_and_expires_by_disuse(tmp_path):
    require_server("RabbitMQ", "127.0.0.1", 5672)
    from nbqueue.drivers.amqp.backend import AMQPBackend

    be = AMQPBackend(session_server_url("amqp-results"), options={"results_expire_in": 2})
    try:
        task_id = str(uuid.uuid4())
        be.store_result(task_id, states.SUCCESS, token=be.begin(task_id), result="1")
        assert be.get(task_id)["result"] == "1" and be.get(task_id)["result"] == "1"    # read twice
        queue = be._queue(f"r:{task_id}")
        assert queue.endswith(task_id)
        gone = lambda: not be._exists(be._session(), queue)  # noqa: E731
        # RabbitMQ deletes the queue once unused for 2 s (a look renews it: look seldom)
        assert wait_for(gone, timeout=30, interval=3)
    finally:
        be.delete_queues()
        be.close()


# -- registries -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("url, module, extra", [
    ("sqs://127.0.0.1:1", "boto3", "sqs"),
    ("memcache://127.0.0.1:1", "pymemcache", "memcache"),
])
def test_missing_client_library_names_the_extra_to_install(monkeypatch, url, module, extra):
    from nbqueue.drivers import backend_from_url, broker_from_url

    for name in list(sys.modules):
        if (
            name == module
            or name.startswith(module + ".")
            or name in ("nbqueue.drivers.sqs.broker", "nbqueue.drivers.memcache.backend")
        ):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, module, None)          # as if not installed
    make = broker_from_url if url.startswith("sqs") else backend_from_url
    with pytest.raises(ConfigurationError, match=rf"pip install 'nbqueue\[{extra}\]'"):
        make(url)
