"""Control over running work: cancel (before start, reserved, running in a thread, in a child
process, in a worker of another process), workflows cancelled, time limits, progress.

Side effects go to files in the test's directory (one line per step), so a test sees a
task stop where nbqueue never writes. Children are checked with psutil: a stopped one is
gone, not an orphan. Every in-process test runs on every broker (AMQP and SQS keep results
in SQLite); the remote-worker tests on every broker a second process can share.
"""
from __future__ import annotations

import _thread
import contextlib
import os
import threading
import time
from pathlib import Path

import psutil
import pytest

import nbqueue
from nbqueue import Signature, states
from nbqueue.testing import wait_for

from conftest import cli_worker

TESTS_DIR = Path(__file__).resolve().parent
NBQUEUE_ROOT = str(Path(nbqueue.__file__).resolve().parent.parent)    # workers run the nbqueue under test
ALL_BROKERS = ["sqlite", "memory", "redis", "amqp", "sqs"]
SHARED_BROKERS = ["sqlite", "redis", "amqp", "sqs"]      # memory:// lives inside one process


@pytest.fixture(params=ALL_BROKERS)
def app_kind(request):
    return request.param


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def define(app, side: Path):
    """Tasks of an in-process worker: ``spin`` (cooperative, progress), ``mark``, ``collect``, ``failed``."""

    @app.task(name="spin")
    def spin(label, steps, pause=0.05):
        task = nbqueue.current_task()
        for i in range(steps):
            with open(side, "a") as fh:
                fh.write(f"{label} {i}\n")
            nbqueue.report_progress(i + 1, steps, note=f"{label} step {i + 1}")
            task.check_cancelled()
            time.sleep(pause)
        return label

    @app.task(name="mark")
    def mark(*values):
        with open(side, "a") as fh:
            fh.write(f"mark {values!r}\n")
        return list(values)

    @app.task(name="failed")
    def failed(error, *args):
        with open(side, "a") as fh:
            fh.write("on_error\n")
        return error

    return spin, mark, failed


def settled(path: Path, quiet: float = 0.5, timeout: float = 20.0) -> int:
    """The number of lines of ``path`` once it has not grown for ``quiet`` seconds."""
    deadline = time.monotonic() + timeout
    count = len(lines(path))
    while time.monotonic() < deadline:
        time.sleep(quiet)
        now = len(lines(path))
        if now == count:
            return count
        count = now
    raise AssertionError(f"{path} still grows after {timeout}s")


def started(app, result, timeout=60):
    wait_for(lambda: result.reported_progress() is not None, timeout, message=f"task {result.id} reporting")


# -- every broker, a worker of this process -------------------------------------------------------------

def test_cancel_before_start_never_runs_and_a_second_cancel_changes_nothing(app_factory, tmp_path):
    app = app_factory()
    side = tmp_path / "side.txt"
    spin, mark, _ = define(app, side)
    r = mark.delay("x")
    later = app.send_task(Signature("mark", args=["later"], countdown=30))
    assert r.cancel() is True and later.cancel() is True
    assert r.state == states.REVOKED and later.state == states.REVOKED
    assert r.cancel() is False and app.revoke(r.id, terminate=True) is False     # twice: already final
    assert app.revoke("no-such-task-id", terminate=True) is False                  # unknown id
    worker = app.start_worker(1)
    ran = mark.delay("after")
    assert ran.get(timeout=60) == ["after"]
    worker.stop(wait=True, timeout=10)
    assert [line for line in lines(side) if "'x'" in line or "later" in line] == []
    with pytest.raises(nbqueue.TaskRevoked):
        r.get(timeout=5)
    assert ran.cancel() is False and ran.state == states.SUCCESS                    # finished: nothing changes


def test_cancel_while_reserved_does_not_run(app_factory, tmp_path):
    app = app_factory()
    side = tmp_path / "side.txt"
    spin, mark, _ = define(app, side)
    first = spin.delay("first", 40)
    second = mark.delay("second")
    worker = app.start_worker(1, prefetch=4)
    started(app, first)
    assert second.cancel() is True
    assert first.cancel() is True
    with pytest.raises(nbqueue.TaskRevoked):
        second.get(timeout=30)
    after = mark.delay("after")
    assert after.get(timeout=60) == ["after"]
    worker.stop(wait=True, timeout=10)
    assert not [line for line in lines(side) if "second" in line]


def test_cancel_running_thread_task_is_cooperative_and_says_so_on_the_record(app_factory, tmp_path):
    app = app_factory()
    side = tmp_path / "side.txt"
    spin, _, _ = define(app, side)
    worker = app.start_worker(1)
    r = spin.delay("t", 2000)
    started(app, r)
    assert r.cancel() is True
    with pytest.raises(nbqueue.TaskRevoked):
        r.get(timeout=10)
    from nbqueue.taskprogress import stopping

    wait_for(lambda: (stopping(app.backend.get(r.id)) or {}).get("state") == "stopped", 30,
             message="the thread stopped")
    count = len(lines(side))
    time.sleep(0.5)
    assert len(lines(side)) == count < 2000                                           # the side effect stopped
    assert r.state == states.REVOKED and r.cancel() is False
    worker.stop(wait=True, timeout=10)


def test_cancelling_a_chain_step_records_the_rest_not_run(app_factory, tmp_path):
    app = app_factory()
    side = tmp_path / "side.txt"
    spin, mark, _ = define(app, side)
    worker = app.start_worker(1)
    c = app.send(spin.si("step1", 2000) | mark.s() | mark.s())
    started(app, c.results[0])
    assert c.cancel() >= 1
    with pytest.raises(nbqueue.TaskRevoked):
        c.get(timeout=30)
    wait_for(lambda: all(r.state == states.REVOKED for r in c.results), 30, message="every step REVOKED")
    worker.stop(wait=True, timeout=10)
    assert not [line for line in lines(side) if line.startswith("mark")]


def test_cancelled_chord_member_fails_the_chord_and_its_error_callback_fires_once(app_factory, tmp_path):
    app = app_factory()
    side = tmp_path / "side.txt"
    spin, mark, failed = define(app, side)
    worker = app.start_worker(2)
    callback = mark.s()
    callback.link_error(failed.s())
    ch = app.send(nbqueue.chord([spin.si("quick", 1), spin.si("slow", 2000)], callback))
    slow = ch.header.results[1]
    started(app, slow)
    assert slow.cancel() is True
    with pytest.raises(nbqueue.TaskRevoked):
        ch.get(timeout=30)
    wait_for(lambda: "on_error" in lines(side), 30, message="the error callback")
    # the quick member may have been claimed behind the slow one: it runs once that one stopped
    wait_for(lambda: ch.header.results[0].state == states.SUCCESS, 30, message="the quick member")
    assert ch.cancel() == 0                                                          # nothing left to cancel
    time.sleep(1.0)
    worker.stop(wait=True, timeout=10)
    assert lines(side).count("on_error") == 1
    assert not [line for line in lines(side) if line.startswith("mark")]            # the callback never ran


def test_cancelling_a_group_revokes_its_unfinished_members(app_factory, tmp_path):
    app = app_factory()
    side = tmp_path / "side.txt"
    spin, _, _ = define(app, side)
    worker = app.start_worker(2)
    g = app.send_group(nbqueue.group([spin.si("a", 1)] + [spin.si(f"m{i}", 2000) for i in range(4)]))
    wait_for(lambda: g.results[0].state == states.SUCCESS, 60, message="the quick member")
    started(app, g.results[1])
    assert g.cancel() == 4
    with pytest.raises(nbqueue.TaskRevoked):
        g.get(timeout=30)
    assert [r.state for r in g.results] == [states.SUCCESS] + [states.REVOKED] * 4
    assert g.cancel() == 0
    worker.stop(wait=True, timeout=10)


def test_progress_from_a_thread_is_stored_and_listed(app_factory, tmp_path):
    app = app_factory()
    side = tmp_path / "side.txt"
    spin, _, _ = define(app, side)
    worker = app.start_worker(1)
    r = spin.delay("p", 5, 0.01)
    assert r.get(timeout=60) == "p"
    assert r.reported_progress()["done"] == 5 and r.reported_progress()["total"] == 5
    assert r.reported_progress()["note"] == "p step 5"
    worker.stop(wait=True, timeout=10)
    if app.backend.lists_tasks == "none":
        return
    frame = app.tasks()
    row = frame[frame["id"] == r.id].iloc[0]
    assert (row["progress_done"], row["progress_total"], row["progress_note"]) == (5, 5, "p step 5")


# -- one store: races, limits, bad input, interrupts --------------------------------------------------------

@pytest.fixture
def sqlite_app(tmp_path):
    app = nbqueue.App(f"sqlite:///{tmp_path}/nbqueue.db")
    yield app
    for worker in list(app.workers):
        worker.stop(wait=True, timeout=10)
    app.close()


@pytest.mark.parametrize("app_kind", ["sqlite"])
def test_a_task_finishing_while_its_cancel_is_in_flight_keeps_one_final_state_and_the_chain_follows_it(
        app_factory, tmp_path):
    app = app_factory()
    side = tmp_path / "side.txt"
    spin, mark, _ = define(app, side)
    worker = app.start_worker(2)
    outcomes = set()
    for i in range(20):
        c = app.send(spin.si(f"r{i}", 1, 0) | mark.si(f"next{i}"))
        time.sleep(0.002 * (i % 10))
        cancelled = c.results[0].cancel()
        first = c.results[0]
        wait_for(lambda: c.ready(), 30, message="the chain settled")
        state = app.backend.get(first.id)["state"]
        assert state == (states.REVOKED if cancelled else states.SUCCESS)
        ran_next = any(line.startswith("mark") and f"next{i}'" in line for line in lines(side))
        assert ran_next == (state == states.SUCCESS) == (c.results[1].state == states.SUCCESS)
        outcomes.add(state)
    worker.stop(wait=True, timeout=10)


def test_bad_ids_are_refused_or_answered_false(sqlite_app):
    with pytest.raises(TypeError, match="task_id"):
        sqlite_app.revoke(None)
    assert sqlite_app.revoke("unknown") is False
    assert nbqueue.AsyncResult("unknown", sqlite_app).cancel() is False
    with pytest.raises(TypeError, match="done"):
        nbqueue.report_progress("half")
    assert nbqueue.report_progress(1, 2) is False          # outside a task: nothing stored


def test_time_limits_of_a_task_reach_the_envelope_of_delay_and_of_its_signatures(sqlite_app):
    """``delay()`` builds its envelope from the task's template (callpath.py): the limits are in
    it, as in a signature's; a bad limit is refused at send naming the option."""
    from nbqueue import callpath
    from nbqueue.signature import to_message

    app = sqlite_app

    @app.task(soft_time_limit=1.5, time_limit=3)
    def limited(x):
        return x

    message = callpath.call_message(app, limited, (1,), {}, now=0.0)
    assert (message["soft_time_limit"], message["time_limit"]) == (1.5, 3)
    sig = limited.s(1).set(soft_time_limit=0.25)
    message = to_message(sig, app.serializer, default_queue=app.default_queue)
    assert (message["soft_time_limit"], message["time_limit"]) == (0.25, 3)
    r = limited.delay(2)
    assert r.info()["state"] == states.PENDING
    with pytest.raises(ValueError, match="soft_time_limit"):
        app.send(limited.s(1).set(soft_time_limit=-1))
    with pytest.raises(TypeError, match="soft_time_limit"):
        app.send(limited.s(1).set(soft_time_limit="soon"))


def test_soft_time_limit_raises_inside_a_thread_task_which_cleans_up(sqlite_app, tmp_path):
    app = sqlite_app

    @app.task(soft_time_limit=0.5)
    def busy():
        try:
            while True:
                time.sleep(0.01)
        except nbqueue.SoftTimeLimitExceeded:
            return "cleaned up"

    worker = app.start_worker(1)
    assert busy.delay().get(timeout=30) == "cleaned up"
    worker.stop(wait=True, timeout=10)


def test_time_limit_in_a_thread_fails_the_record_and_asks_the_task_to_stop(sqlite_app, tmp_path):
    app = sqlite_app
    stopped = threading.Event()

    @app.task(time_limit=0.5)
    def long():
        while not nbqueue.current_task().cancelled:
            time.sleep(0.01)
        stopped.set()
        return "late"

    worker = app.start_worker(1)
    r = long.delay()
    with pytest.raises(nbqueue.TaskFailed) as info:
        r.get(timeout=30)
    assert info.value.exc_type == "TimeLimitExceeded"
    assert stopped.wait(10)
    worker.stop(wait=True, timeout=10)
    assert app.backend.get(r.id)["state"] == states.FAILURE


@pytest.mark.parametrize("app_kind", ["sqlite", "memory"])
def test_time_limit_in_a_thread_fails_the_step_once_and_its_workflow_follows_the_failure(app_factory):
    """Given a chain whose first step passes its time limit in a thread and has an error
    callback, when the limit passes, then the step fails with TimeLimitExceeded, its error
    callback runs once with the reason, the next step is never run, and the worker counts
    one failure, even after the late result of the step comes back."""
    app = app_factory()
    seen = []

    @app.task(name="slow", time_limit=0.3)
    def slow():
        while not nbqueue.current_task().cancelled:
            time.sleep(0.01)
        return "late"

    app.register_task("after", lambda value: seen.append(("after", value)))
    app.register_task("on_err", lambda error: seen.append(("error", error)))
    first = app.signature("slow")
    first.on_error = [app.signature("on_err")]
    result = app.send(nbqueue.chain(first, app.signature("after")))
    worker = app.start_worker(1)
    wait_for(lambda: seen, message="the error callback ran")
    wait_for(lambda: not worker._running, message="the late step returned")
    worker.stop(wait=True, timeout=10)
    [step, rest] = result.results
    assert step.state == states.FAILURE and app.backend.get(step.id)["exc_type"] == "TimeLimitExceeded"
    assert rest.state == states.REVOKED
    [(kind, error)] = seen
    assert kind == "error" and "time limit of 0.3s" in error
    assert (worker.processed, worker.failed) == (1, 1)      # the callback, then the step


def test_ctrl_c_during_get_stops_the_wait_without_cancelling(sqlite_app):
    app = sqlite_app
    r = app.send_task(Signature("nobody.runs.this"))
    timer = threading.Timer(0.3, _thread.interrupt_main)
    timer.start()
    with pytest.raises(KeyboardInterrupt, match="NOT cancelled.*cancel"):
        r.get(timeout=30)
    timer.cancel()
    assert r.state == states.PENDING


# -- the process pool: stopping children -----------------------------------------------------------------

def _pool_app(tmp_path, kind):
    from conftest import app_urls

    broker, backend = app_urls(kind, tmp_path)
    return nbqueue.App(broker, backend, default_queue=f"cancel-{os.getpid()}-{time.monotonic_ns()}")


PROC_TASKS = "import proc_tasks\n"


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
def test_cancel_running_in_a_child_stops_it_and_replaces_it(tmp_path, kind, monkeypatch):
    monkeypatch.syspath_prepend(str(TESTS_DIR))
    monkeypatch.setenv("NBQUEUE_BROKER", "memory://unused")
    import proc_tasks

    app = _pool_app(tmp_path, kind)
    app.task(proc_tasks.spin.fn, name="spin")
    side = tmp_path / "side.txt"
    worker = app.start_worker(1, pool="processes")
    try:
        r = app.send_task(Signature("spin", args=[str(side), 5000]))
        wait_for(lambda: r.reported_progress() is not None, 60, message="progress from the child")
        child = int(lines(side)[0].split()[0])
        assert alive(child)
        assert r.cancel() is True
        wait_for(lambda: not alive(child), 10, message="the child stopped")
        count = len(lines(side))
        assert settled(side) == count                                             # its side effect stopped
        with pytest.raises(nbqueue.TaskRevoked):
            r.get(timeout=10)
        wait_for(lambda: worker.pool.pids() and child not in worker.pool.pids(), 30, message="a new child")
        again = app.send_task(Signature("spin", args=[str(tmp_path / "again.txt"), 2, 0.01]))
        assert again.get(timeout=60) == 2
        assert again.reported_progress()["done"] == 2
    finally:
        worker.stop(wait=True, timeout=30)
        app.close()


@pytest.mark.parametrize("app_kind", ["sqlite", "redis", "amqp", "sqs"])
def test_a_child_that_ignores_sigterm_is_killed_after_the_grace(app_factory, tmp_path):
    from test_pool import notebook_cell

    app = app_factory()
    ns = notebook_cell("""
import os, signal, time
def stubborn(path):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    with open(path, "w") as fh:
        fh.write(str(os.getpid()))
    time.sleep(300)
""")
    stubborn = app.task(ns["stubborn"], name="stubborn")
    marker = tmp_path / "pid"
    worker = app.start_worker(1, pool="processes")
    try:
        r = stubborn.delay(str(marker))
        wait_for(marker.exists, 60, message="the child started")
        wait_for(lambda: marker.read_text(), 10, message="its pid")
        child = int(marker.read_text())
        assert r.cancel() is True
        wait_for(lambda: not alive(child), 15, message="SIGKILL after the grace")
        assert app.backend.get(r.id)["state"] == states.REVOKED
    finally:
        worker.stop(wait=True, timeout=30)


@pytest.mark.parametrize("app_kind", ["sqlite"])
def test_hard_time_limit_in_a_child_fails_with_retries_and_soft_limit_raises_inside(app_factory, tmp_path):
    from test_pool import notebook_cell

    app = app_factory()
    ns = notebook_cell("""
import os, time
import nbqueue
def slow(path):
    with open(path, "a") as fh:
        fh.write(f"{os.getpid()}\\n")
    time.sleep(300)

def tidy():
    try:
        time.sleep(300)
    except nbqueue.SoftTimeLimitExceeded:
        return "cleaned up"
""")
    slow = app.task(ns["slow"], name="slow", time_limit=1, retry_count=1)
    tidy = app.task(ns["tidy"], name="tidy", soft_time_limit=0.5, time_limit=30)
    attempts = tmp_path / "attempts"
    worker = app.start_worker(1, pool="processes")
    try:
        r = slow.delay(str(attempts))
        with pytest.raises(nbqueue.TaskFailed) as info:
            r.get(timeout=120)
        assert info.value.exc_type == "TimeLimitExceeded"
        pids = [int(p) for p in lines(attempts)]
        assert len(pids) == 2 and pids[0] != pids[1]                 # retried, in a new child
        wait_for(lambda: not any(alive(p) for p in pids), 15, message="the stopped children gone")
        assert tidy.delay().get(timeout=60) == "cleaned up"
    finally:
        worker.stop(wait=True, timeout=30)


# -- a worker in another process, on every broker it can share ----------------------------------------------

@pytest.fixture
def remote(tmp_path):
    with contextlib.ExitStack() as workers:
        def start(app, *args):
            proc, log = workers.enter_context(cli_worker(app, tmp_path, "proc_tasks", *args,
                                                         path=(TESTS_DIR, NBQUEUE_ROOT), NBQUEUE_LOG_LEVEL="WARNING"))
            wait_for(lambda: proc.poll() is None and any(w.get("pid") == proc.pid for w in app.backend.workers()),
                     timeout=60,
                     message=f"worker {proc.pid} serving:\n{log.read_text() if log.exists() else ''}")
            return proc

        yield start


@pytest.mark.parametrize("app_kind", SHARED_BROKERS)
@pytest.mark.parametrize("pool", ["threads", "processes"])
def test_cancel_reaches_a_worker_in_another_process(app_factory, remote, tmp_path, pool):
    app = app_factory()
    proc = remote(app, "--pool", pool, "--concurrency", "1")
    side = tmp_path / "side.txt"
    waiting = app.send_task(Signature("spin", args=[str(tmp_path / "never.txt"), 5], countdown=2))
    assert waiting.cancel() is True                                                # before start
    r = app.send_task(Signature("spin", args=[str(side), 5000]))
    wait_for(lambda: r.reported_progress() is not None, 60, message="progress from the remote worker")
    assert r.reported_progress()["total"] == 5000
    runner = int(lines(side)[0].split()[0])
    assert (runner == proc.pid) == (pool == "threads")
    assert r.cancel() is True
    with pytest.raises(nbqueue.TaskRevoked):
        r.get(timeout=10)
    if pool == "processes":
        wait_for(lambda: not alive(runner), 15, message="the remote child stopped")
    assert settled(side) < 5000
    ok = app.send_task(Signature("spin", args=[str(tmp_path / "ok.txt"), 3, 0.01]))
    assert ok.get(timeout=60) == 3 and ok.reported_progress()["done"] == 3
    time.sleep(2.5)
    assert not (tmp_path / "never.txt").exists()
    assert proc.poll() is None
    if pool == "processes":
        children = [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
        assert runner not in children


# -- the notebook: %nbqueue cancel, the views' Cancel button and progress bars ---------------------------------

@pytest.fixture
def shell(monkeypatch, tmp_path):
    from nbqueue.notebook import magics as nbmagics

    from conftest import ipython_shell

    ipython = ipython_shell(monkeypatch)
    ipython.reset(new_session=False)
    app = nbqueue.App(f"sqlite:///{tmp_path}/nb.db")
    ipython.user_ns["app"] = app
    nbmagics.load_ipython_extension(ipython, concurrency=2)
    yield ipython
    nbmagics.unload_ipython_extension(ipython)
    for worker in list(app.workers):
        worker.stop(wait=True, timeout=10)
    app.close()


def test_nbqueue_cancel_magic_cancels_ids_and_all(shell, tmp_path, capsys):
    app = shell.user_ns["app"]
    side = tmp_path / "side.txt"
    spin, _, _ = define(app, side)
    running = spin.delay("run", 2000)
    started(app, running)
    shell.run_line_magic("nbqueue", f"cancel {running.id} no-such-id")
    out = capsys.readouterr().out
    assert f"{running.id}: cancelled" in out and "no-such-id: no such task" in out
    shell.run_line_magic("nbqueue", f"cancel {running.id}")
    assert "already final (REVOKED); nothing changed" in capsys.readouterr().out
    later = [app.send_task(Signature("spin", args=[f"l{i}", 5], countdown=60)) for i in range(3)]
    assert shell.run_line_magic("nbqueue", "cancel --all") == 3
    assert all(r.state == states.REVOKED for r in later)
    from IPython.core.error import UsageError

    with pytest.raises(UsageError):
        shell.run_line_magic("nbqueue", "cancel")


def test_views_cancel_button_stops_a_group_and_shows_progress_bars(tmp_path):
    pytest.importorskip("ipywidgets")
    from nbqueue.notebook import widgets

    app = nbqueue.App(f"sqlite:///{tmp_path}/nbqueue.db")
    side = tmp_path / "side.txt"
    spin, _, _ = define(app, side)
    worker = app.start_worker(2)
    try:
        g = app.send_group(nbqueue.group([spin.si(f"g{i}", 2000) for i in range(2)]))
        started(app, g.results[0])
        view = widgets.WorkflowView(g, "widget")
        view.start()
        wait_for(lambda: (view.refresh() or True) and "nbqueue-task-progress" in view._reported.value, 30,
                 message="per-task bars")
        assert "reported by" in view._reported.value                               # summed over the group
        assert "[nbqueue] group of 2" in view.text(view._snap) and "reported" in view.text(view._snap)
        view._cancel.click()
        assert view._cancel.disabled and view.cancel_answer == "cancel sent to 2 task(s)"
        wait_for(lambda: view.refresh(), 30, message="the view finished")
        assert view._snap["state"] == states.REVOKED or view._snap["counts"]["revoked"] == 2
        assert [r.state for r in g.results] == [states.REVOKED, states.REVOKED]

        one = spin.delay("one", 2000)
        started(app, one)
        task_view = widgets.TaskView(one, "widget")
        task_view.start()
        assert "nbqueue-task-progress" in task_view._reported.value and "one step" in task_view._reported.value
        task_view._cancel.click()
        wait_for(lambda: task_view.refresh(), 30, message="the task view finished")
        assert task_view._snap["state"] == states.REVOKED and task_view._cancel.layout.display == "none"
        again = widgets.TaskView(one, "widget")
        again.start()
        assert again.cancel() == "already finished: nothing to cancel"
    finally:
        worker.stop(wait=True, timeout=10)
        app.close()


def test_task_view_says_a_cancelled_thread_task_has_not_noticed_yet(tmp_path):
    from nbqueue.notebook import widgets

    app = nbqueue.App(f"sqlite:///{tmp_path}/nbqueue.db")
    release = threading.Event()

    @app.task()
    def deaf():
        release.wait(60)            # never looks at current_task().cancelled
        return "late"

    worker = app.start_worker(1)
    try:
        r = deaf.delay()
        wait_for(lambda: r.state == states.STARTED, 30, message="started")
        view = widgets.TaskView(r, "text")
        view.start()
        assert r.cancel() is True
        wait_for(lambda: not view.refresh() and "waiting for the task (in a thread) to notice" in view._snap["note"],
                 10,
                 message="the note")
        assert view._snap["state"] == states.REVOKED and not view.finished
        release.set()
        wait_for(lambda: view.refresh(), 10, message="the view finished once the thread returned")
    finally:
        release.set()
        worker.stop(wait=True, timeout=10)
        app.close()


def test_snapshots_carry_reported_progress_and_the_stop_of_a_thread_task(tmp_path):
    """The core's snapshots (no notebook code): a task's ``progress`` and ``stopping``, a group's
    summed ``reported`` progress with a row per running task that reported."""
    app = nbqueue.App(f"sqlite:///{tmp_path}/nbqueue.db")
    side = tmp_path / "side.txt"
    spin, _, _ = define(app, side)
    worker = app.start_worker(3)
    try:
        g = app.send_group(nbqueue.group([spin.si(f"g{i}", 2000) for i in range(2)]))
        for member in g.results:
            started(app, member)
        snap = g.snapshot()
        assert snap["reported"]["sum"]["reporting"] == 2 and snap["reported"]["sum"]["total"] == 4000
        assert sorted(row["id"] for row in snap["reported"]["rows"]) == sorted(r.id for r in g.results)
        assert snap["reported"]["stopping"] == ""
        task = g.results[0].snapshot()
        assert task["progress"]["total"] == 2000 and task["progress"]["note"].startswith("g0 step")
        assert task["stopping"] is None and task["stopped_while_running"] is False
        assert g.cancel() == 2
        wait_for(lambda: (g.results[0].snapshot()["stopping"] or {}).get("state") == "stopped", 30,
                 message="the thread task noticed the cancel")
        task = g.results[0].snapshot()
        assert task["state"] == states.REVOKED and task["stopped_while_running"] is True
        assert task["stopping"] == {"why": "cancel", "state": "stopped"} and task["stopping_note"] == ""
    finally:
        worker.stop(wait=True, timeout=10)
        app.close()
