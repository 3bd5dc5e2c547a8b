"""Fixtures: every broker and backend the project has, over real servers.

Redis (127.0.0.1:6379, DB 13 of the tests' own, flushed per test) and RabbitMQ
(127.0.0.1:5672, guest/guest, queue names of each test's own, deleted afterwards) are
real servers. Locally a missing server skips its tests; under CI=true it fails them.
``memory://`` is fakeredis inside this process: a product feature, tested as such.
"""
from __future__ import annotations

import os
import socket
import uuid

import pytest

REDIS_URL = os.environ.get("NBQUEUE_TEST_REDIS", "redis://127.0.0.1:6379/13")
AMQP_URL = os.environ.get("NBQUEUE_TEST_AMQP", "amqp://guest:guest@127.0.0.1:5672/%2F")
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
# boto3 must never look for an EC2 instance role (a request to a link-local address)
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")

BROKER_KINDS = ["sqlite", "memory", "redis", "amqp", "sqs"]
BACKEND_KINDS = ["sqlite", "memory", "redis", "memcache", "amqp"]


def pytest_sessionfinish(session, exitstatus):
    """Stop the servers this session started (moto, memcached); never one it did not start."""
    import servers

    servers.stop_all()


def _listening(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def require_server(name: str, host: str, port: int) -> None:
    if _listening(host, port):
        return
    message = f"{name} is not reachable on {host}:{port}"
    if IN_CI:
        pytest.fail(message + " (CI=true: a missing server is a failure, not a skip)")
    pytest.skip(message)


@pytest.fixture
def qname():
    """Unique queue names for this test."""
    made: list[str] = []
    token = uuid.uuid4().hex[:8]

    def make(label: str = "q") -> str:
        name = f"t{token}-{label}"
        made.append(name)
        return name

    make.made = made
    return make


def _flush_redis() -> None:
    import redis

    redis.Redis.from_url(REDIS_URL).flushdb()


def store_url(kind: str, tmp_path) -> str:
    """A fresh store of this kind for one test."""
    if kind == "sqlite":
        return f"sqlite:///{tmp_path}/nbqueue.db"
    if kind == "memory":
        return f"memory://test-{uuid.uuid4().hex[:12]}"
    if kind == "redis":
        require_server("Redis", "127.0.0.1", 6379)
        _flush_redis()
        return REDIS_URL
    if kind == "amqp":
        require_server("RabbitMQ", "127.0.0.1", 5672)
        return AMQP_URL
    if kind in ("sqs", "memcache", "amqp-results"):
        return session_server_url(kind)
    raise ValueError(kind)


def session_server_url(kind: str) -> str:
    """A URL on a server the session started (tests/servers.py), with a key prefix of its own
    where the store has no databases: ``sqs`` (moto), ``memcache``, ``amqp-results``."""
    import servers

    token = uuid.uuid4().hex[:10]
    if kind == "amqp-results":
        require_server("RabbitMQ", "127.0.0.1", 5672)
        return f"{AMQP_URL}?key_prefix=t{token}"
    server = servers.MOTO if kind == "sqs" else servers.MEMCACHED
    try:
        host, port = server.get()
    except RuntimeError as exc:
        if IN_CI:
            pytest.fail(f"{exc} (CI=true: a missing server is a failure, not a skip)")
        pytest.skip(str(exc))
    if kind == "sqs":
        return f"sqs://testing:testing@{host}:{port}?region=us-east-1"
    return f"memcache://{host}:{port}?key_prefix=t{token}:"


@pytest.fixture(params=BROKER_KINDS)
def broker_kind(request):
    return request.param


@pytest.fixture(params=BACKEND_KINDS)
def backend_kind(request):
    return request.param


@pytest.fixture
def broker_factory(broker_kind, tmp_path, qname):
    from nbqueue.brokers import broker_from_url

    url = store_url(broker_kind, tmp_path)
    made = []

    def make():
        broker = broker_from_url(url)
        made.append(broker)
        return broker

    yield make
    if broker_kind in ("amqp", "sqs") and qname.made:
        cleaner = broker_from_url(url)
        cleaner.delete_queues(qname.made)
        cleaner.close()
    for broker in made:
        try:
            broker.close()
        except Exception:
            pass


@pytest.fixture
def backend_factory(backend_kind, tmp_path):
    from nbqueue.backends import backend_from_url

    url = store_url("amqp-results" if backend_kind == "amqp" else backend_kind, tmp_path)
    made = []

    def make():
        backend = backend_from_url(url)
        made.append(backend)
        return backend

    yield make
    if backend_kind == "amqp" and made:
        made[0].delete_queues()          # every queue of this test's key prefix
    for backend in made:
        try:
            backend.close()
        except Exception:
            pass


APP_KINDS = ["sqlite", "memory", "redis", "amqp"]


def app_urls(kind: str, tmp_path) -> tuple[str, str | None]:
    """(broker, backend) URLs for an App of this kind; AMQP keeps results in SQLite."""
    if kind == "amqp":
        return store_url("amqp", tmp_path), f"sqlite:///{tmp_path}/results.db"
    url = store_url(kind, tmp_path)
    return url, url


@pytest.fixture(params=APP_KINDS)
def app_kind(request):
    return request.param


@pytest.fixture
def app_factory(app_kind, tmp_path, qname):
    """``app_factory(**options)``: Apps on one fresh store of this kind; workers stopped after the test."""
    import nbqueue

    broker, backend = app_urls(app_kind, tmp_path)
    queue = qname("default")
    made = []

    def make(**options):
        options.setdefault("default_queue", queue)
        app = nbqueue.App(broker, backend, **options)
        made.append(app)
        return app

    make.kind = app_kind
    make.broker_url, make.backend_url = broker, backend
    yield make
    for app in made:
        for worker in list(app.workers):
            worker.stop(wait=True, timeout=10)
    if app_kind == "amqp" and made:
        made[0].broker.delete_queues(qname.made)
    for app in made:
        try:
            app.close()
        except Exception:
            pass


@pytest.fixture
def app(app_factory):
    return app_factory()
