"""What a user coming from Celery writes, each exact input as reported: kombu's AMQP URL with
the vhost ``//``, Celery's canvas calls (``sig.delay()``, ``chain(...)()``, ``chord(header)(cb)``),
Celery's option names, and the messages nbqueue gives for them."""
from __future__ import annotations

import logging
import os
import re
import uuid

import pika
import pytest

import nbqueue
from nbqueue import chain, chord, cli, group
from nbqueue.canvas import Signature
from nbqueue.drivers.amqp.client import connection_parameters, refused
from nbqueue.errors import ConfigurationError

from conftest import app_maker, app_urls, require_server

KOMBU_URL = "amqp://guest:guest@127.0.0.1:5672//"


# -- AMQP URLs --------------------------------------------------------------------------------

@pytest.mark.parametrize("url, vhost", [
    (KOMBU_URL, "/"), ("amqp://h:5672/%2F", "/"), ("amqp://h:5672/", "/"), ("amqp://h", "/"),
    ("amqp://h:5672/jobs", "jobs"), ("amqp://h:5672//jobs", "/jobs"),
])
def test_the_vhost_is_read_as_kombu_reads_it(url, vhost):
    assert connection_parameters(url, ()).virtual_host == vhost


def test_a_refused_vhost_is_named_quoted_with_how_to_write_the_root_vhost():
    err = refused("amqp://guest:guest@h:5672/x", pika.URLParameters("amqp://guest:guest@h:5672/"), OSError("no"))
    assert "vhost '/'" in str(err) and "%2F" in str(err) and "guest:guest" not in str(err)


@pytest.fixture
def kombu_app(tmp_path, qname):
    require_server("RabbitMQ", "127.0.0.1", 5672)
    yield from app_maker(KOMBU_URL, f"sqlite:///{tmp_path}/results.db", qname, "amqp")


def test_kombu_url_with_the_root_vhost_runs_tasks(kombu_app):
    app = kombu_app()

    @app.task
    def add(x, y):
        return x + y

    app.start_worker(concurrency=1)
    assert add.delay(1, 2).get(timeout=30) == 3


def test_a_missing_vhost_is_a_configuration_error_naming_it(tmp_path):
    require_server("RabbitMQ", "127.0.0.1", 5672)
    vhost = f"nbq-missing-{uuid.uuid4().hex[:8]}"
    app = nbqueue.App(f"amqp://guest:guest@127.0.0.1:5672/{vhost}", f"sqlite:///{tmp_path}/r.db")
    try:
        with pytest.raises(ConfigurationError, match=f"vhost '{vhost}'.*%2F"):
            app.send_task(Signature("add", args=[1, 2]))
    finally:
        app.close()


def test_cli_worker_with_a_refused_vhost_exits_with_the_message(monkeypatch, capsys):
    require_server("RabbitMQ", "127.0.0.1", 5672)
    monkeypatch.setenv("NBQUEUE_BROKER", f"amqp://guest:guest@127.0.0.1:5672/nbq-missing-{uuid.uuid4().hex[:8]}")
    monkeypatch.setenv("NBQUEUE_BACKEND", f"memory://test-{uuid.uuid4().hex[:12]}")
    assert cli.main(["worker", "-c", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("nbqueue: RabbitMQ at") and "vhost 'nbq-missing-" in err and "%2F" in err
    assert logging.getLogger("pika").getEffectiveLevel() == logging.WARNING    # no INFO chatter by default


@pytest.mark.parametrize("login, vhost, named", [
    ("guest:not-the-password", "%2F", "refused the login (user 'guest')"),
    ("guest:guest", "nbq-missing-{}", "vhost 'nbq-missing-"),
], ids=["password", "vhost"])
def test_start_worker_with_a_refused_login_or_vhost_raises_naming_it(tmp_path, login, vhost, named):
    """Given an App on RabbitMQ with a wrong password or a missing vhost, when a worker is
    started in-process, then start_worker raises the error the CLI ends with and starts nothing."""
    require_server("RabbitMQ", "127.0.0.1", 5672)
    app = nbqueue.App(f"amqp://{login}@127.0.0.1:5672/{vhost.format(uuid.uuid4().hex[:8])}",
                      f"sqlite:///{tmp_path}/r.db")
    try:
        with pytest.raises(ConfigurationError, match=r"^RabbitMQ at .*" + re.escape(named)):
            app.start_worker(concurrency=1)
        assert app.workers == []
    finally:
        app.close()


def test_worker_concurrency_has_help_naming_its_default(capsys):
    with pytest.raises(SystemExit):
        cli.main(["worker", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--concurrency CONCURRENCY tasks run at once" in out and f"(default: the CPU count, {os.cpu_count()})" in out


# -- canvas calls ---------------------------------------------------------------------------

@pytest.fixture(params=["memory", "sqlite"])
def canvas_app(request, tmp_path, qname):
    for make in app_maker(*app_urls(request.param, tmp_path), qname, request.param):
        app = make()

        @app.task
        def add(x, y):
            return x + y

        @app.task
        def tsum(values):
            return sum(values)

        app.start_worker(concurrency=2)
        yield app, add, tsum


def test_celery_canvas_calls_send_through_the_bound_app(canvas_app):
    app, add, tsum = canvas_app
    assert add.s(1, 2).delay().get(timeout=30) == 3
    assert add.s(1, 2).apply_async().get(timeout=30) == 3
    assert add.s(1).delay(5).get(timeout=30) == 6
    assert add.s(1).apply_async((5,), queue=app.default_queue).get(timeout=30) == 6
    assert (add.s(1, 1) | add.s(2)).apply_async().get(timeout=30) == 4
    assert (add.s(1, 1) | add.s(2)).delay().get(timeout=30) == 4
    assert chain(add.s(1, 1), add.s(2))().get(timeout=30) == 4
    assert group(add.s(1, 1), add.s(2, 2))().get(timeout=30) == [2, 4]
    assert group(add.s(1, 1), add.s(2, 2)).delay().get(timeout=30) == [2, 4]
    assert chord([add.s(1, 1), add.s(2, 2)])(tsum.s()).get(timeout=30) == 6
    assert chord([add.s(1, 1), add.s(2, 2)], tsum.s()).delay().get(timeout=30) == 6
    assert group(add.s(1), add.s(2)).delay(10).get(timeout=30) == [11, 12]


@pytest.mark.parametrize("send", [
    lambda: Signature("add", args=[1, 2]).delay(),
    lambda: Signature("add", args=[1, 2]).apply_async(),
    lambda: chain(Signature("add", args=[1, 1]), Signature("add", args=[2])).delay(),
    lambda: group(Signature("add", args=[1, 1]))(),
    lambda: chord([Signature("add", args=[1, 1])])(Signature("tsum")),
])
def test_canvas_without_an_app_says_how_to_send_it(send):
    with pytest.raises(RuntimeError, match=r"not bound to an App.*app\.send\(\.\.\.\)"):
        send()


def test_a_chord_without_a_callback_says_so():
    with pytest.raises(TypeError, match="has no callback"):
        chord([Signature("add", args=[1, 1])]).delay()


# -- clear errors ----------------------------------------------------------------------------

def test_args_of_the_wrong_type_are_named():
    with pytest.raises(TypeError, match=r"the args of task 'echo' must be a list or tuple of arguments, not int"):
        Signature("echo", args=5)


@pytest.fixture
def echo_app(tmp_path):
    app = nbqueue.App(f"memory://test-{uuid.uuid4().hex[:12]}")

    @app.task(name="echo")
    def echo(*args, **kwargs):
        return args

    yield app, echo
    app.close()


def test_unknown_send_options_are_named_with_the_known_ones(echo_app):
    _, echo = echo_app
    with pytest.raises(TypeError, match=r"unknown send option\(s\): 'expires' \(expires: nbqueue has no expiry.*"
                                        r"; known: id, queue, eta, countdown, priority"):
        echo.apply_async((1, 2), expires=10)
    with pytest.raises(TypeError, match=r"unknown send option\(s\): 'bogus'; known: id, queue, eta, countdown"):
        echo.apply_async((1, 2), bogus=1)
    with pytest.raises(TypeError, match=r"'max_retries' \(max_retries: use retry_count\)"):
        echo.s(1).apply_async(max_retries=3)
    with pytest.raises(TypeError, match=r"unknown signature option\(s\): 'bogus'"):
        echo.s(1).set(bogus=1)
    assert echo.apply_async((1, 2), countdown=0.01).id     # Celery's countdown and eta are nbqueue's too


def test_celery_task_option_names_say_the_nbqueue_name(echo_app):
    app, _ = echo_app
    with pytest.raises(TypeError, match=r"unknown task option\(s\): 'max_retries' \(max_retries: use retry_count\); "
                                        r"known: retry_count"):
        app.task(max_retries=3)(lambda: None)


def test_a_bad_nested_argument_is_located_apart_from_the_task_name(echo_app):
    _, echo = echo_app
    with pytest.raises(nbqueue.SerializationError, match=r"^argument 1 of task 'echo', at \['a'\]\[1\]: "
                                                         r"has type builtins\.function"):
        echo.delay({"a": [1, lambda: 0]})


def test_an_unknown_broker_scheme_is_the_only_message(caplog):
    caplog.set_level(logging.WARNING)
    with pytest.raises(ConfigurationError, match=r"unknown broker URL scheme 'reddis'.*did you mean redis://"):
        nbqueue.App("reddis://x")
    assert [r.getMessage() for r in caplog.records if r.name.startswith("nbqueue")] == []


def test_a_call_its_function_cannot_take_is_refused_at_send_naming_the_task_and_the_problem(tmp_path):
    """Celery's ``typing=True``: ``add.delay(1)`` for ``def add(x, y)`` raises TypeError at send
    (every way of sending one task), and nothing is sent; ``typing=False`` sends it as it is."""
    app = nbqueue.App(f"sqlite:///{tmp_path}/args.db", default_queue=f"args-{uuid.uuid4().hex[:8]}")
    try:
        @app.task
        def add(x, y):
            return x + y

        @app.task(typing=False)
        def loose(x, y):
            return x + y

        @app.task
        def spread(first, *args, scale=1, **kwargs):
            return first

        missing = r"^task 'test_celery_compat\..*add' cannot take these arguments: missing a required argument: 'y'$"
        with pytest.raises(TypeError, match=missing):
            add.delay(1)
        cannot = "' cannot take these arguments: "
        with pytest.raises(TypeError, match="add" + cannot + "too many positional arguments"):
            add.apply_async((1, 2, 3))
        with pytest.raises(TypeError, match="add" + cannot + "got an unexpected keyword argument 'z'"):
            add.s(1, 2, z=3).delay()
        with pytest.raises(TypeError, match=missing):
            app.send_task(app.signature(add.name, args=[1]))
        with pytest.raises(TypeError, match=missing):
            app.send_many([add.s(1, 2), add.s(1)])
        with pytest.raises(TypeError, match="spread" + cannot + "missing a required argument: 'first'"):
            spread.delay(scale=2)
        assert app.backend.list() == [] and app.broker.stats() == []
        sent = [add.delay(1, 2), add.delay(1, y=2), add.s(1).delay(2), loose.delay(1), spread.delay(1, 2, 3, z=4),
                spread.delay(first=1)]
        assert len({r.id for r in sent}) == 6
        assert add(1, 2) == 3                                              # a local call is Python's own
    finally:
        app.close()


# -- SQLite paths ------------------------------------------------------------------------------

def test_a_relative_sqlite_url_shows_its_absolute_file(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("NBQUEUE_BROKER", "sqlite:///tmp/x/jobs.db")
    expected = tmp_path / "tmp" / "x" / "jobs.db"
    app = nbqueue.App("sqlite:///tmp/x/jobs.db")
    try:
        assert expected.exists()                                   # relative to the cwd, as in SQLAlchemy
        assert f"(file {expected})" in repr(app.broker) and f"(file {expected})" in repr(app.backend)
    finally:
        app.close()
    assert cli.main(["status"]) == 0
    assert f"broker <SQLiteBroker sqlite:///tmp/x/jobs.db (file {expected})>" in capsys.readouterr().out
