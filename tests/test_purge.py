"""Purging a queue: its tasks end REVOKED ("purged from queue ..."), their workflows end as on a
revoke, and ``nbqueue purge`` asks before it deletes.

Every broker, with results where the App keeps them (AMQP and SQS: SQLite), plus SQS with
results in memcached and RabbitMQ with results in RabbitMQ (a backend that cannot list its
records, so only the messages the broker names can be revoked).
"""
from __future__ import annotations

import io
import time

import pytest

import nbqueue
from nbqueue import cli, states
from nbqueue.testing import wait_for

from conftest import AMQP_URL, app_maker, app_urls, require_server, session_server_url

KINDS = ["sqlite", "memory", "redis", "amqp", "sqs", "sqs+memcache", "amqp+amqp"]


@pytest.fixture(params=KINDS)
def purge_app(request, tmp_path, qname):
    """``purge_app(**options)``: Apps on one broker/backend pair of this kind; tidied after the test."""
    kind = request.param
    if kind == "sqs+memcache":
        urls = session_server_url("sqs"), session_server_url("memcache")
    elif kind == "amqp+amqp":
        require_server("RabbitMQ", "127.0.0.1", 5672)
        urls = AMQP_URL, session_server_url("amqp-results")
    else:
        urls = app_urls(kind, tmp_path)
    yield from app_maker(*urls, qname, kind)


def define(app, side):
    @app.task(name="add")
    def add(x, y):
        with open(side, "a") as fh:
            fh.write(f"add {x} {y}\n")
        return x + y

    @app.task(name="failed")
    def failed(error, *args):
        with open(side, "a") as fh:
            fh.write("on_error\n")
        return error

    return add, failed


def lines(path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def raises_at_once(result, reason: str) -> None:
    """``get()`` raises TaskRevoked with ``reason`` (a task left PENDING would raise TimeoutError)."""
    with pytest.raises(nbqueue.TaskRevoked, match=reason):
        result.get(timeout=8)


def test_purged_tasks_are_revoked_and_get_raises_the_purge_reason_at_once(purge_app, tmp_path):
    # Given three sends, one of them delayed, and no worker yet
    app = purge_app()
    side = tmp_path / "side.txt"
    add, _ = define(app, side)
    sent = [add.delay(1, 2), add.delay(3, 4), add.apply_async((5, 6), countdown=600)]
    # When the queue is purged, and then a live worker serves it
    assert app.purge() == 3
    app.start_worker(1)
    # Then every purged task is final, and waiting on it says why instead of timing out
    reason = f"purged from queue '{app.default_queue}'"
    for result in sent:
        raises_at_once(result, reason)
        assert result.state == states.REVOKED
    assert not lines(side)
    # and the queue works on: a task sent after the purge runs
    assert add.delay(5, 5).get(timeout=30) == 10


def test_purged_chain_step_records_the_rest_of_its_chain_revoked(purge_app, tmp_path):
    app = purge_app()
    side = tmp_path / "side.txt"
    add, _ = define(app, side)
    c = app.send(add.si(1, 1) | add.s(10) | add.s(100))
    app.purge()
    app.start_worker(1)
    raises_at_once(c, "purged from queue")
    wait_for(lambda: all(r.state == states.REVOKED for r in c.results), 10, message="every step REVOKED")
    assert not lines(side)


def test_purged_chord_members_fail_the_chord_and_fire_its_error_callback_once(purge_app, tmp_path):
    app = purge_app()
    side = tmp_path / "side.txt"
    add, failed = define(app, side)
    callback = add.s(0)
    callback.link_error(failed.s())
    ch = app.send(nbqueue.chord([add.si(1, 1), add.si(2, 2)], callback))
    app.purge()
    app.start_worker(1)
    raises_at_once(ch, "purged from queue")
    assert [r.state for r in ch.header.results] == [states.REVOKED] * 2
    wait_for(lambda: "on_error" in lines(side), 20, message="the error callback")
    time.sleep(0.5)
    assert lines(side) == ["on_error"]       # once, and no member nor the callback ran


def test_purge_of_a_broker_that_names_no_message_revokes_the_waiting_records_of_that_queue(tmp_path, qname):
    # a broker that implements only purge() (a count): the records sent before it began are revoked
    from nbqueue.broker import Broker
    from nbqueue.drivers.sqlite.broker import SQLiteBroker

    class CountingBroker(SQLiteBroker):
        purge_messages = Broker.purge_messages          # the base class's: it names no message

        def purge(self, queue: str) -> int:
            return SQLiteBroker.purge_messages(self, queue).count

    app = nbqueue.App(f"sqlite:///{tmp_path}/q.db", default_queue=qname("counted"))
    try:
        add, _ = define(app, tmp_path / "side.txt")
        sent = [add.delay(1, 2), add.delay(3, 4)]
        elsewhere = add.apply_async((1, 1), queue=qname("other"))
        app.broker.__class__ = CountingBroker
        assert app.purge() == 2
        assert [r.state for r in sent] == [states.REVOKED] * 2
        assert sent[0].info()["error"] == f"purged from queue '{app.default_queue}'"
        assert elsewhere.state == states.PENDING
    finally:
        app.close()


# -- the command ---------------------------------------------------------------------------------------

@pytest.fixture
def cli_app(tmp_path, monkeypatch, qname):
    monkeypatch.setenv("NBQUEUE_BROKER", f"sqlite:///{tmp_path}/cli.db")
    monkeypatch.delenv("NBQUEUE_BACKEND", raising=False)
    monkeypatch.setenv("NBQUEUE_DEFAULT_QUEUE", "work")
    app = nbqueue.App.from_env()
    add, _ = define(app, tmp_path / "side.txt")
    yield app, [add.delay(i, i) for i in range(3)]
    app.close()


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_purge_command_without_a_terminal_or_force_refuses_and_names_the_queue(cli_app, capsys, monkeypatch):
    app, sent = cli_app
    monkeypatch.setattr("sys.stdin", io.StringIO("y\n"))
    assert cli.main(["purge"]) == 2
    err = capsys.readouterr().err
    assert "queue 'work' (the App's default queue)" in err and "--force" in err
    assert [r.state for r in sent] == [states.PENDING] * 3


def test_purge_command_asks_naming_the_default_queue_and_no_keeps_the_messages(cli_app, capsys, monkeypatch):
    app, sent = cli_app
    monkeypatch.setattr("sys.stdin", Terminal("n\n"))
    assert cli.main(["purge"]) == 1
    out = capsys.readouterr().out
    assert "queue 'work' (the App's default queue)? Their tasks will be recorded REVOKED. [y/N]" in out
    assert "nothing purged" in out
    assert [r.state for r in sent] == [states.PENDING] * 3
    monkeypatch.setattr("sys.stdin", Terminal("y\n"))
    assert cli.main(["purge"]) == 0
    assert "purged 3 message(s) from work" in capsys.readouterr().out
    assert [r.state for r in sent] == [states.REVOKED] * 3


def test_purge_command_with_force_purges_without_asking(cli_app, capsys, monkeypatch):
    app, sent = cli_app
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    assert cli.main(["purge", "work", "--force"]) == 0
    assert capsys.readouterr().out == "purged 3 message(s) from work\n"
    assert [r.state for r in sent] == [states.REVOKED] * 3
    assert cli.main(["purge", "-y"]) == 0


def test_purge_command_help_says_what_it_does(capsys):
    with pytest.raises(SystemExit):
        cli.main(["purge", "--help"])
    out = capsys.readouterr().out
    assert "recorded REVOKED" in out and "--force" in out and "default: the App's default queue" in out
