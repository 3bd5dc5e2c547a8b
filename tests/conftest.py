"""Fixtures: every broker and backend the project has, over real servers.

Redis (127.0.0.1:6379, DB NBQUEUE_TEST_REDIS, default 13) and RabbitMQ (127.0.0.1:5672,
guest/guest) are real servers SHARED with whoever else uses them: a test never
flushes a database, never runs SCRIPT FLUSH and never restarts them. Each Redis store
a test makes lives under a key prefix of its own (``nbqtest-<run>-<store>:``, given in
the URL's query, so worker processes started from the URL use it too), and its keys are
deleted (SCAN + DEL on that prefix) after the test. RabbitMQ queue names are unique to
the test (``qname``) and deleted afterwards. Tests that restart a server start their
own (tests/test_redis_restart.py, the RabbitMQ restart in tests/test_amqp_specific.py).
Locally a missing server skips its tests; under CI=true it fails them. ``memory://`` is
fakeredis inside this process: a product feature, tested as such.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import uuid
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import pytest

REDIS_URL = os.environ.get("NBQUEUE_TEST_REDIS", "redis://127.0.0.1:6379/13")
AMQP_URL = os.environ.get("NBQUEUE_TEST_AMQP", "amqp://guest:guest@127.0.0.1:5672/%2F")
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

#: Debian's Chromium and the flags the browser tests (JupyterLab, the dashboard) start it with
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
    "--disable-quic",
]

#: this pytest run's token: in every Redis key prefix and queue name the tests make
RUN_ID = uuid.uuid4().hex[:8]
# boto3 must never look for an EC2 instance role (a request to a link-local address)
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")

BROKER_KINDS = ["sqlite", "memory", "redis", "amqp", "sqs"]
BACKEND_KINDS = ["sqlite", "memory", "redis", "memcache", "amqp"]


def pytest_configure(config):
    """In a pytest-xdist worker, ``__main__`` is execnet's bootstrap (``python -c``, no file):
    nbqueue would take the process for an interactive one (``shipping.interactive``) and its
    workers would read notebook code queues too. Tests expect a script's ``__main__``, as
    ``python -m pytest`` gives them; tests of the interactive case install IPython's own."""
    if hasattr(config, "workerinput"):
        import sys

        main = sys.modules["__main__"]
        if not getattr(main, "__file__", None):
            main.__file__ = os.path.join(os.path.dirname(pytest.__file__), "__main__.py")


def pytest_collection_modifyitems(session, config, items):
    """Under pytest-xdist, tests marked ``slow`` first (a stable sort: the same order in every
    worker), so the long ones start early and the run does not end on one of them."""
    if hasattr(config, "workerinput"):
        items.sort(key=lambda item: item.get_closest_marker("slow") is None)


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


def ipython_shell(monkeypatch):
    """IPython's InteractiveShell (IPython keeps one per process) with its namespace as
    ``__main__`` for this test only, as in a kernel. The shell installs its namespace as
    ``sys.modules["__main__"]`` and never puts the real one back (after ``reset`` that
    namespace has no ``__spec__``); ``monkeypatch`` restores the real one after the test."""
    import sys

    from IPython.core.interactiveshell import InteractiveShell
    from traitlets.config import Config

    monkeypatch.setitem(sys.modules, "__main__", sys.modules["__main__"])
    config = Config()
    config.HistoryManager.hist_file = ":memory:"
    shell = InteractiveShell.instance(config=config)
    monkeypatch.setitem(sys.modules, "__main__", shell.user_module)
    return shell


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def cli_worker(app, tmp_path, module: str, *args: str, path: tuple = (), **env: str):
    """``nbqueue worker --app <module>:app [args]`` in a child process on ``app``'s broker,
    backend and default queue, with ``tmp_path`` (where the test wrote ``<module>.py``) and the
    directories in ``path`` importable and ``env`` added to its environment; yields (process,
    path of its combined output: ``worker.log`` in ``tmp_path``, numbered for a test's next
    workers). Stopped (SIGTERM, then SIGKILL after 30 s) when the block ends."""
    environ = dict(
        os.environ,
        NBQUEUE_BROKER=app.broker_url,
        NBQUEUE_BACKEND=app.backend_url,
        NBQUEUE_DEFAULT_QUEUE=app.default_queue,
        **env,
    )
    importable = [*map(str, path), str(tmp_path), os.environ.get("PYTHONPATH")]
    environ["PYTHONPATH"] = os.pathsep.join(filter(None, importable))
    log, n = tmp_path / "worker.log", 1
    while log.exists():
        log, n = tmp_path / f"worker-{n}.log", n + 1
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "nbqueue", "worker", "--app", f"{module}:app", *args],
                                cwd=tmp_path, env=environ, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield proc, log
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()



class RedisServer:
    """A redis-server of the test's own on a free port (append-only file in ``directory``):
    what a test may restart or SCRIPT FLUSH without disturbing anyone."""

    def __init__(self, directory: str):
        self.dir = directory
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        from nbqueue.testing import wait_for

        self.proc = subprocess.Popen(
            ["redis-server", "--bind", "127.0.0.1", "--port", str(self.port), "--dir", self.dir, "--save", "",
             "--appendonly", "yes", "--appendfsync", "always"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: _listening("127.0.0.1", self.port), timeout=20, message=f"redis-server on {self.port}")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()          # SIGTERM: Redis flushes its append-only file and exits
            self.proc.wait(20)
            self.proc = None


def require_binary(name: str) -> None:
    if shutil.which(name) is None:
        if IN_CI:
            pytest.fail(f"{name} is not installed (CI=true: a missing server is a failure)")
        pytest.skip(f"{name} is not installed")


@pytest.fixture(scope="session")
def session_redis(tmp_path_factory):
    """A redis-server of this test session's own, for tests that SCRIPT FLUSH a server."""
    require_binary("redis-server")
    server = RedisServer(str(tmp_path_factory.mktemp("own-redis")))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def qname():
    """Unique queue names for this test."""
    made: list[str] = []
    token = uuid.uuid4().hex[:8]

    def make(label: str = "q") -> str:
        name = f"t{RUN_ID}{token}-{label}"
        made.append(name)
        return name

    make.made = made
    return make


#: (server URL, key prefix) of every Redis store made by the running test, deleted after it
_redis_stores: list[tuple[str, str]] = []


def with_query(url: str, **params: str) -> str:
    """``url`` with ``params`` added to its query."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(query=urlencode(parse_qsl(parts.query) + list(params.items()))))


def private_redis_url(base: str = REDIS_URL) -> str:
    """``base`` under a key prefix of its own (``?key_prefix=``), removed after the test."""
    prefix = f"nbqtest-{RUN_ID}-{uuid.uuid4().hex[:8]}:"
    _redis_stores.append((base, prefix))
    return with_query(base, key_prefix=prefix)


def delete_prefix(base: str, prefix: str) -> int:
    """Delete the keys under ``prefix`` on the server of ``base`` (SCAN + DEL); how many."""
    import redis

    client = redis.Redis.from_url(base)
    try:
        deleted = 0
        batch = []
        for key in client.scan_iter(match=prefix + "*", count=1000):
            batch.append(key)
            if len(batch) >= 1000:
                deleted += client.delete(*batch)
                batch = []
        if batch:
            deleted += client.delete(*batch)
        return deleted
    finally:
        client.close()


@pytest.fixture(autouse=True)
def _delete_test_redis_keys():
    """After each test: the keys of the Redis stores it made (see private_redis_url)."""
    yield
    while _redis_stores:
        base, prefix = _redis_stores.pop()
        try:
            delete_prefix(base, prefix)
        except Exception:  # the server went away: nothing of ours is left on it either
            pass


def store_url(kind: str, tmp_path) -> str:
    """A fresh store of this kind for one test."""
    if kind == "sqlite":
        return f"sqlite:///{tmp_path}/nbqueue.db"
    if kind == "memory":
        return f"memory://test-{uuid.uuid4().hex[:12]}"
    if kind == "redis":
        require_server("Redis", "127.0.0.1", 6379)
        return private_redis_url()
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
    from nbqueue.drivers import broker_from_url

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
    from nbqueue.drivers import backend_from_url

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


#: engines of the engine contract suite: the fused ones (one store) and split pairs (broker+backend)
ENGINE_KINDS = ["sqlite", "memory", "redis", "amqp+sqlite", "sqlite+redis", "redis+sqlite", "sqs+memcache"]


@pytest.fixture(params=ENGINE_KINDS)
def engine_factory(request, tmp_path, qname):
    """``engine_factory()``: a new engine (new broker and backend objects) on the same stores each call."""
    from nbqueue.drivers import backend_from_url, broker_from_url, engine_for

    broker_kind, _, backend_kind = request.param.partition("+")
    broker_url = store_url(broker_kind, tmp_path)
    backend_url = (
        broker_url
        if not backend_kind
        else store_url("amqp-results" if backend_kind == "amqp" else backend_kind, tmp_path / "results")
    )
    (tmp_path / "results").mkdir(exist_ok=True)
    made = []

    def make():
        engine = engine_for(broker_from_url(broker_url), backend_from_url(backend_url))
        made.append(engine)
        return engine

    yield make
    if broker_kind in ("amqp", "sqs") and qname.made:
        cleaner = broker_from_url(broker_url)
        cleaner.delete_queues(qname.made)
        cleaner.close()
    for engine in made:
        try:
            engine.close()
        except Exception:
            pass


APP_KINDS = ["sqlite", "memory", "redis", "amqp"]


def app_urls(kind: str, tmp_path) -> tuple[str, str | None]:
    """(broker, backend) URLs for an App of this kind; AMQP and SQS (not in APP_KINDS: tests
    name it where they run on it too) keep results in SQLite."""
    if kind in ("amqp", "sqs"):
        return store_url(kind, tmp_path), f"sqlite:///{tmp_path}/results.db"
    url = store_url(kind, tmp_path)
    return url, url


@pytest.fixture(params=APP_KINDS)
def app_kind(request):
    return request.param


def app_maker(broker: str, backend: str | None, qname, kind: str):
    """A fixture body: yields ``make(**options)``, Apps on these URLs (``default_queue`` the
    test's own unless given). After the test: their workers stopped, the test's queues
    deleted where queues outlive the App (RabbitMQ, SQS; a RabbitMQ result backend's too),
    the Apps closed. ``make.kind`` is ``kind``; ``make.broker_url``, ``make.backend_url``."""
    import nbqueue

    queue = qname("default")
    made = []

    def make(**options):
        options.setdefault("default_queue", queue)
        app = nbqueue.App(broker, backend, **options)
        made.append(app)
        return app

    make.kind = kind
    make.broker_url, make.backend_url = broker, backend
    yield make
    for app in made:
        for worker in list(app.workers):
            worker.stop(wait=True, timeout=10)
    if made and urlsplit(broker).scheme in ("amqp", "sqs"):
        made[0].broker.delete_queues(qname.made)
        if hasattr(made[0].backend, "delete_queues"):
            made[0].backend.delete_queues()         # every queue of its key prefix
    for app in made:
        try:
            app.close()
        except Exception:
            pass


@pytest.fixture
def app_factory(app_kind, tmp_path, qname):
    """``app_factory(**options)``: Apps on one fresh store of this kind; workers stopped after the test."""
    yield from app_maker(*app_urls(app_kind, tmp_path), qname, app_kind)


@pytest.fixture
def app(app_factory):
    return app_factory()
