"""Configuration (URLs, machinery-style YAML, environment) and the ``nbqueue`` command's
status / purge / --app loading. The foreground worker command and its signals are in
test_processes.py.
"""
from __future__ import annotations

import re
import textwrap
import time

import pytest

import nbqueue
from nbqueue import Signature, cli


def queue_row(app, queue):
    return next((row for row in app.broker.stats() if row["queue"] == queue), None)


# -- YAML ------------------------------------------------------------------------------------------


def test_from_yaml_reads_a_machinery_style_config(tmp_path):
    config = tmp_path / "config.yml"
    config.write_text(textwrap.dedent(f"""\
        broker: sqlite:///{tmp_path}/broker.db
        default_queue: machinery_tasks
        result_backend: sqlite:///{tmp_path}/results.db
        results_expire_in: 3600
        sqlite:
          visibility_timeout: 12
          poll_interval: 0.05
        """))
    app = nbqueue.App.from_yaml(str(config))
    try:
        assert (app.default_queue, app.visibility_timeout, app.backend.results_expire_in) == (
            "machinery_tasks",
            12.0,
            3600.0,
        )
        assert app.config.option("poll_interval") == 0.05
        assert app.broker.path == str(tmp_path / "broker.db") and app.backend.path == str(tmp_path / "results.db")
        app.register_task("add", lambda x, y: x + y)
        r = app.send_task(Signature("add", args=[1, 2]))
        assert queue_row(app, "machinery_tasks")["ready"] == 1   # sent to the configured default queue
        app.worker().drain(timeout=10)
        assert r.get(timeout=5) == 3
        info = r.info()
        assert info["expires_at"] == pytest.approx(info["finished_at"] + 3600)
    finally:
        app.close()


@pytest.mark.parametrize("content, complaint", [
    ("broker: sqlite:///x.db\nbrokr_url: typo\n", "unknown key 'brokr_url'"),
    ("- just\n- a list\n", "must hold a mapping"),
    ("broker: [unclosed\n", "not valid YAML"),
    ("redis: 5\n", "section 'redis'"),
])
def test_from_yaml_rejects_bad_files_saying_what_is_wrong(tmp_path, content, complaint):
    config = tmp_path / "config.yml"
    config.write_text(content)
    with pytest.raises(nbqueue.ConfigurationError, match=re.escape(complaint)):
        nbqueue.App.from_yaml(str(config))


def test_from_yaml_names_a_missing_file(tmp_path):
    with pytest.raises(nbqueue.ConfigurationError, match="config file not found: .*absent.yml"):
        nbqueue.App.from_yaml(str(tmp_path / "absent.yml"))


# -- environment -------------------------------------------------------------------------------------


def test_from_env_reads_broker_backend_and_default_queue(tmp_path, monkeypatch):
    monkeypatch.setenv("NBQUEUE_BROKER", f"sqlite:///{tmp_path}/env-broker.db")
    monkeypatch.setenv("NBQUEUE_BACKEND", f"sqlite:///{tmp_path}/env-results.db")
    monkeypatch.setenv("NBQUEUE_DEFAULT_QUEUE", "from-env")
    monkeypatch.setenv("NBQUEUE_RESULTS_EXPIRE_IN", "60")
    monkeypatch.setenv("NBQUEUE_VISIBILITY_TIMEOUT", "7.5")
    app = nbqueue.App.from_env()
    try:
        assert app.broker.path == str(tmp_path / "env-broker.db") and app.backend.path == str(
            tmp_path / "env-results.db"
        )
        assert (app.default_queue, app.visibility_timeout, app.backend.results_expire_in) == ("from-env", 7.5, 60.0)
    finally:
        app.close()


def test_from_env_without_variables_uses_the_embedded_default(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    app = nbqueue.App.from_env({})
    try:
        assert app.default_queue == "nbqueue"
        assert app.broker.path == str((tmp_path / ".nbqueue" / "nbqueue.db").resolve())
    finally:
        app.close()


# -- the command: status, purge, --app --------------------------------------------------------------


@pytest.fixture
def env_app(tmp_path, monkeypatch):
    """An App the CLI finds through NBQUEUE_BROKER, with some waiting messages."""
    monkeypatch.setenv("NBQUEUE_BROKER", f"sqlite:///{tmp_path}/cli.db")
    monkeypatch.setenv("NBQUEUE_DEFAULT_QUEUE", "work")
    app = nbqueue.App.from_env()
    for i in range(3):
        app.send_task(Signature("add", args=[i, i]))
    app.send_task(Signature("add", args=[0, 0], countdown=3600))
    app.send_task(Signature("add", args=[0, 0], queue="elsewhere"))
    yield app
    app.close()


def table_row(text: str, first_cell: str) -> list[str]:
    for line in text.splitlines():
        cells = line.split()
        if cells and cells[0] == first_cell:
            return cells
    raise AssertionError(f"no row {first_cell!r} in:\n{text}")


def test_status_prints_queue_depths_and_live_workers(env_app, capsys):
    worker = env_app.start_worker(queues="idle")
    try:
        deadline = time.monotonic() + 15
        while worker.name not in {w["worker_id"] for w in env_app.backend.workers()}:  # its first heartbeat
            assert time.monotonic() < deadline, "worker heartbeat not recorded"
            time.sleep(0.02)
        assert cli.main(["status"]) == 0
    finally:
        worker.stop(wait=True, timeout=15)
    out = capsys.readouterr().out
    assert table_row(out, "work")[1:] == ["3", "1", "0", "0"]       # ready delayed in_flight dead
    assert table_row(out, "elsewhere")[1:] == ["1", "0", "0", "0"]
    assert table_row(out, worker.name)  # the in-process worker, from its heartbeat


def test_purge_empties_the_default_queue_or_the_named_one(env_app, capsys):
    assert cli.main(["purge", "--force"]) == 0
    assert "purged 4 message(s) from work" in capsys.readouterr().out
    assert queue_row(env_app, "work") is None and queue_row(env_app, "elsewhere")["ready"] == 1
    assert cli.main(["purge", "elsewhere", "-f"]) == 0
    assert "purged 1 message(s) from elsewhere" in capsys.readouterr().out
    assert queue_row(env_app, "elsewhere") is None


def test_app_option_loads_module_attribute_from_the_working_directory(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cliproj_ok.py").write_text(textwrap.dedent(f"""\
        import nbqueue
        application = nbqueue.App("sqlite:///{tmp_path}/proj.db", default_queue="proj")
        application.send_task(nbqueue.Signature("anything"))
        not_an_app = 42
        """))
    assert cli.main(["status", "--app", "cliproj_ok:application"]) == 0
    assert table_row(capsys.readouterr().out, "proj")[1] == "1"

    assert cli.main(["status", "--app", "cliproj_missing:app"]) == 2
    assert "cannot import 'cliproj_missing'" in capsys.readouterr().err
    assert cli.main(["status", "--app", "cliproj_ok:nothing"]) == 2
    assert "has no attribute 'nothing'" in capsys.readouterr().err
    assert cli.main(["status", "--app", "cliproj_ok:not_an_app"]) == 2
    assert "is a int, not an nbqueue.App" in capsys.readouterr().err


@pytest.mark.parametrize("app_kind", ["sqlite", "redis", "amqp"])
def test_status_from_another_process_lists_the_queues_with_their_dead_letters(app_factory, tmp_path):
    """10 dead letters on the App's queue; ``nbqueue status`` run by another process (which
    has declared nothing itself) lists the queue with them, RabbitMQ included."""
    import subprocess
    import sys

    from nbqueue.broker import Outgoing
    from nbqueue.testing import wait_for

    app = app_factory()
    queue = app.default_queue
    for i in range(10):
        app.broker.publish(Outgoing(id=f"bad-{i}", body="{not json", queue=queue))
    app.worker().drain(timeout=30)
    assert wait_for(lambda: (queue_row(app, queue) or {}).get("dead") == 10, timeout=30)
    (tmp_path / "statusapp.py").write_text(textwrap.dedent(f"""\
        import nbqueue
        app = nbqueue.App({app.broker_url!r}, {app.backend_url!r}, default_queue={queue!r})
        """))
    done = subprocess.run([sys.executable, "-m", "nbqueue", "status", "--app", "statusapp:app"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert table_row(done.stdout, queue)[1:] == ["0", "0", "0", "10"], done.stdout    # ready delayed in_flight dead


def test_the_cli_keeps_the_loggers_drivers_declare_quiet_at_warning_unless_debug(env_app, capsys):
    """Given a driver declaring its client's chatty loggers (the AMQP driver: pika), when the CLI
    runs at the default log level they are held at WARNING; at DEBUG they are left alone."""
    import logging

    from nbqueue.drivers import quiet_loggers

    assert "pika" in quiet_loggers()
    pika = logging.getLogger("pika")
    before = pika.level
    pika.setLevel(logging.NOTSET)
    try:
        assert cli.main(["purge", "nowhere", "-f"]) == 0
        assert pika.level == logging.WARNING
        pika.setLevel(logging.NOTSET)
        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.DEBUG)          # as --log-level DEBUG leaves it (basicConfig)
        try:
            assert cli.main(["--log-level", "DEBUG", "purge", "nowhere", "-f"]) == 0
        finally:
            root.setLevel(level)
        assert pika.level == logging.NOTSET
    finally:
        pika.setLevel(before)
    capsys.readouterr()
