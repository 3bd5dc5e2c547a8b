"""Real processes: ``nbqueue worker`` in the foreground, its signals, a SIGKILLed worker,
several worker processes sharing one SQLite file, an idle worker's CPU use, and the demo.

Workers run ``nbqueue worker --app proc_tasks:app`` (tests/proc_tasks.py, configured
from NBQUEUE_* variables). Their side effects go to a separate SQLite file whose
PRIMARY KEY turns a second execution of the same task into a failure.
"""
from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

import nbqueue
from nbqueue import Signature, states
from nbqueue.testing import wait_for

TESTS_DIR = Path(__file__).resolve().parent
REPO = TESTS_DIR.parent


def side_rows(path: Path, sql: str, params=()) -> list[tuple]:
    """Read the side-effect file (its tables are created by the tasks)."""
    if not path.exists():
        return []
    conn = sqlite3.connect(path, timeout=60)
    try:
        return conn.execute(sql, params).fetchall()
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):
            return []
        raise
    finally:
        conn.close()


class Workers:
    """Starts ``nbqueue worker`` processes for one App's store; kills leftovers at the end."""

    def __init__(self, tmp_path: Path):
        self.tmp_path = tmp_path
        self.side_db = tmp_path / "side.db"
        self.procs: list[subprocess.Popen] = []
        self.logs: list[Path] = []

    def env(self, app, **extra) -> dict:
        env = dict(os.environ)
        env.update(
            {
                "NBQUEUE_BROKER": app.broker_url,
                "NBQUEUE_BACKEND": app.backend_url,
                "NBQUEUE_DEFAULT_QUEUE": app.default_queue,
                "NBQUEUE_VISIBILITY_TIMEOUT": str(app.visibility_timeout),
                "NBQUEUE_TEST_SIDE_DB": str(self.side_db),
                "NBQUEUE_TEST_SIDE_DIR": str(self.tmp_path),
                "NBQUEUE_LOG_LEVEL": "WARNING",
                "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS_DIR), env.get("PYTHONPATH")])),
            }
        )
        env.update(extra)
        return env

    def start(self, app, *args: str) -> subprocess.Popen:
        log = self.tmp_path / f"worker{len(self.procs)}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen([sys.executable, "-m", "nbqueue", "worker", "--app", "proc_tasks:app", *args],
                                    cwd=self.tmp_path, env=self.env(app), stdout=out, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        self.logs.append(log)
        return proc

    def log(self, proc) -> str:
        return self.logs[self.procs.index(proc)].read_text(errors="replace")

    def wait_serving(self, app, proc, timeout: float = 30.0) -> dict:
        """Until the process's worker heartbeat is in the backend."""
        def serving():
            assert proc.poll() is None, f"worker exited early:\n{self.log(proc)}"
            return next((w for w in app.backend.workers() if w.get("pid") == proc.pid), None)
        return wait_for(serving, timeout, message=f"worker {proc.pid} serving")

    def cleanup(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)


@pytest.fixture
def workers(tmp_path):
    w = Workers(tmp_path)
    yield w
    w.cleanup()


def sqlite_app(tmp_path, **options):
    return nbqueue.App(f"sqlite:///{tmp_path}/nbqueue.db", default_queue="procs", **options)


# -- the foreground worker command ---------------------------------------------------------------


def test_cli_worker_serves_only_the_named_queues_with_its_concurrency(tmp_path, workers):
    app = sqlite_app(tmp_path)
    try:
        proc = workers.start(app, "--concurrency", "3", "--queues", "qa,qb")
        info = workers.wait_serving(app, proc)
        assert (info["concurrency"], info["queues"]) == (3, ["qa", "qb"])
        ra, rb = (app.send_task(Signature("add", args=[i, 1], queue=q)) for i, q in ((1, "qa"), (2, "qb")))
        rc = app.send_task(Signature("add", args=[3, 1], queue="qc"))
        assert (ra.get(timeout=30), rb.get(timeout=30)) == (2, 3)
        assert rc.state == states.PENDING
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert "stopped after 2 task(s)" in workers.log(proc)
    finally:
        app.close()


def test_sigterm_lets_the_running_task_finish_and_takes_no_more(tmp_path, workers):
    app = sqlite_app(tmp_path)
    try:
        proc = workers.start(app, "--concurrency", "2")
        workers.wait_serving(app, proc)
        running = app.send_task(Signature("nap", args=[1.5, "nap-1"]))
        wait_for(
            lambda: side_rows(workers.side_db, "SELECT 1 FROM attempts WHERE key = 'nap-1'"), message="nap started"
        )
        proc.send_signal(signal.SIGTERM)
        wait_for(lambda: "received SIGTERM" in workers.log(proc), message="SIGTERM noticed")
        late = app.send_task(Signature("add", args=[1, 1]))
        assert proc.wait(30) == 0
        assert running.get(timeout=5) == proc.pid                 # finished and recorded before exiting
        assert side_rows(workers.side_db, "SELECT pid FROM executed WHERE task_id = 'nap-1'") == [(proc.pid,)]
        assert not late.ready()                                    # taken by no one after the signal
        assert next(r for r in app.broker.stats() if r["queue"] == "procs")["in_flight"] == 0  # and not held
    finally:
        app.close()


def test_second_signal_exits_at_once(tmp_path, workers):
    app = sqlite_app(tmp_path)
    try:
        proc = workers.start(app, "--concurrency", "1")
        workers.wait_serving(app, proc)
        stuck = app.send_task(Signature("hang_first_attempt", args=["stuck"]))
        wait_for(
            lambda: side_rows(workers.side_db, "SELECT 1 FROM attempts WHERE key = 'stuck'"), message="task started"
        )
        proc.send_signal(signal.SIGTERM)
        wait_for(lambda: "received SIGTERM" in workers.log(proc), message="SIGTERM noticed")
        assert proc.poll() is None                                # still finishing its (ten-minute) task
        proc.send_signal(signal.SIGINT)
        assert proc.wait(20) != 0
        assert not stuck.ready()
    finally:
        app.close()


# -- crashes --------------------------------------------------------------------------------------


@pytest.mark.parametrize("app_kind", ["sqlite", "redis", "amqp"])
def test_task_of_a_sigkilled_worker_is_delivered_again_and_recorded_once(app_factory, workers):
    """SQLite and Redis redeliver when the lease runs out; RabbitMQ when the connection dies."""
    app = app_factory(visibility_timeout=2)
    r = app.send_task(Signature("hang_first_attempt", args=["victim"]))
    first = workers.start(app, "--concurrency", "1")
    wait_for(
        lambda: side_rows(workers.side_db, "SELECT 1 FROM attempts WHERE key = 'victim'"),
        message="first attempt started",
    )
    first.kill()
    first.wait(10)
    assert r.state != states.SUCCESS

    second = workers.start(app, "--concurrency", "1")
    assert r.get(timeout=60) == 2  # the second attempt completed
    assert side_rows(workers.side_db, "SELECT pid FROM attempts WHERE key = 'victim' ORDER BY seq") == [
        (first.pid,),
        (second.pid,),
    ]
    assert side_rows(workers.side_db, "SELECT pid FROM executed WHERE task_id = 'victim'") == [(second.pid,)]
    assert list(app.tasks()["id"]) == [r.id] and r.info()["state"] == states.SUCCESS
    second.send_signal(signal.SIGTERM)
    assert second.wait(30) == 0


# -- many processes on one SQLite file --------------------------------------------------------------


def test_sqlite_file_is_in_wal_mode_with_a_busy_timeout(tmp_path):
    app = sqlite_app(tmp_path)
    try:
        conn = sqlite3.connect(tmp_path / "nbqueue.db")
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"      # a property of the file
        conn.close()
        timeouts = {app.broker.store.conn.execute("PRAGMA busy_timeout").fetchone()[0],
                    app.backend.store.conn.execute("PRAGMA busy_timeout").fetchone()[0]}
        assert min(timeouts) >= 1000                                            # milliseconds
    finally:
        app.close()


@pytest.mark.slow
def test_four_worker_processes_of_four_threads_run_5000_tasks_exactly_once(tmp_path, workers):
    app = sqlite_app(tmp_path)
    try:
        ids = [f"task-{i:05d}" for i in range(5000)]
        records, outs = [], []
        for task_id in ids:
            _, record, out = app.prepare(Signature("append_id", args=[task_id], id=task_id))
            records.append(record)
            outs.append(out)
        app.publish(records, outs)
        procs = [workers.start(app, "--concurrency", "4") for _ in range(4)]

        def all_done():
            for proc in procs:
                assert proc.poll() is None, f"a worker exited:\n{workers.log(proc)}"
            return app.backend.progress(ids)["done"] == len(ids)

        wait_for(all_done, timeout=120, interval=0.5, message="5000 tasks done")
        progress = app.backend.progress(ids)
        assert (progress["succeeded"], progress["failed"]) == (5000, 0)
        executed = {int(f.stem.split("-")[1]): f.read_text().split() for f in tmp_path.glob("executed-*.txt")}
        assert set(executed) <= {p.pid for p in procs}
        assert sorted(t for lines in executed.values() for t in lines) == ids      # each exactly once
        for proc in procs:      # a process still starting (a loaded machine) has no SIGTERM handler yet
            workers.wait_serving(app, proc)
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        assert [proc.wait(30) for proc in procs] == [0, 0, 0, 0]
        for proc in procs:
            log = workers.log(proc)
            assert "Traceback" not in log and " ERROR " not in log and "locked" not in log, log
    finally:
        app.close()


# -- an idle worker --------------------------------------------------------------------------------


def process_cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")   # utime + stime


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process CPU time from /proc")
@pytest.mark.parametrize("app_kind", ["sqlite", "redis", "amqp"])
def test_idle_worker_process_does_not_spin_the_cpu(app_factory, workers):
    app = app_factory()
    proc = workers.start(app, "--concurrency", "4")
    workers.wait_serving(app, proc)
    time.sleep(0.5)                          # past start-up
    cpu_before, wall_before = process_cpu_seconds(proc.pid), time.monotonic()
    time.sleep(1.5)
    cpu = process_cpu_seconds(proc.pid) - cpu_before
    wall = time.monotonic() - wall_before
    assert cpu < 0.2 * wall, f"idle worker used {cpu:.2f}s of CPU in {wall:.2f}s"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0


# -- the demo ----------------------------------------------------------------------------------------


def test_example_sum_runs_in_a_fresh_directory(tmp_path):
    done = subprocess.run(
        [sys.executable, str(REPO / "examples" / "sum.py")], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "sum(1..10) = 55" in done.stdout
    assert (tmp_path / ".nbqueue" / "nbqueue.db").exists()


def test_a_worker_whose_store_does_not_answer_stops_on_sigterm(tmp_path):
    """Nothing runs, and every store call fails only after the client's retries: SIGTERM
    still ends the worker, rather than waiting for the calls its threads are caught in."""
    from conftest import free_port

    url = f"redis://127.0.0.1:{free_port()}/0"      # nothing listens there
    env = dict(os.environ, NBQUEUE_BROKER=url, NBQUEUE_BACKEND=url, NBQUEUE_LOG_LEVEL="INFO",
               NBQUEUE_TEST_SIDE_DB=str(tmp_path / "side.db"),
               PYTHONPATH=os.pathsep.join(filter(None, [str(TESTS_DIR), os.environ.get("PYTHONPATH")])))
    log = tmp_path / "worker.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "nbqueue", "worker", "--app", "proc_tasks:app"],
                                cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: "started" in log.read_text(errors="replace"), 60, message="the worker started")
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=90)       # before: still running minutes later, in its store calls
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the worker did not stop:\n{log.read_text(errors='replace')[-3000:]}") from None
        text = log.read_text(errors="replace")
        assert proc.returncode == 0, text[-3000:]
        assert "stopped after 0 task(s)" in text
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
