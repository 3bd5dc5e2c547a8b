"""Waiting that never ends, or ends late; a store file that is gone; forked children.

Each test is one input a user tried: waiting inside a task on a one-thread worker, a
forgotten id, no worker anywhere, a misspelt task name from a notebook, a revoked chord
member or chain step, ``rm -rf .nbqueue`` in a kernel, a notebook's task on a queue an
external worker shares, and children forked from a process whose worker is running.
They run on every App kind (SQLite, memory://, Redis, RabbitMQ with results in SQLite)
unless they say otherwise; the ones about other processes start real ones.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import sqlite3
import threading
import time
from pathlib import Path

import pytest

import nbqueue
from nbqueue import Signature, TaskFailed, TaskRevoked, chain, chord, group, states
from nbqueue.clock import ManualClock
from nbqueue.testing import wait_for

from conftest import cli_worker

TESTS_DIR = Path(__file__).resolve().parent


def slow_task(app, name: str = "slow"):
    """A task that signals when it starts and runs until the test releases it."""
    started, release = threading.Event(), threading.Event()

    @app.task(name=name)
    def slow(x):
        started.set()
        release.wait(60)
        return x

    slow.started, slow.release = started, release
    return slow


# -- waiting for a result inside a task ----------------------------------------------------------------


@pytest.mark.parametrize("awaited", ["task", "group"])
def test_a_task_waiting_for_another_on_a_one_thread_worker_fails_at_once_saying_what_to_do_instead(app, awaited):
    """``inner.delay(x).get()`` inside a task, with concurrency=1: the one thread that could run
    inner is the one waiting, so the wait fails at once instead of hanging with outer STARTED forever."""
    sent = []
    inner = app.task(name="inner")(lambda x: x * 2)

    @app.task(name="outer")
    def outer(x):
        if awaited == "task":
            res = inner.delay(x)
        else:
            res = app.send(group(inner.s(x), inner.s(x + 1)))
        sent.append(res)
        return res.get(timeout=60)

    app.start_worker(concurrency=1)
    r = outer.delay(21)
    with pytest.raises(TaskFailed) as err:
        r.get(timeout=30)
    assert err.value.exc_type == "DeadlockError"
    assert "chain" in err.value.message and "chord" in err.value.message and "inner" in err.value.message
    # not lost: it runs once the thread is free
    assert sent[0].get(timeout=30) == (42 if awaited == "task" else [42, 44])


def test_a_task_may_wait_for_another_while_a_free_worker_thread_can_run_it(app):
    inner = app.task(name="inner")(lambda x: x * 2)
    app.task(name="outer")(lambda x: inner.delay(x).get(timeout=30) + 1)
    app.start_worker(concurrency=2)
    assert app.send_task(app.signature("outer", args=[20])).get(timeout=30) == 41


def test_two_tasks_waiting_on_a_two_thread_worker_the_second_fails_at_once(app):
    """Both threads held by waits: the second wait would never end, the first one does."""
    gate = threading.Event()
    both_running = threading.Barrier(2)
    inner = app.task(name="inner")(lambda x: x)

    @app.task(name="outer")
    def outer(x):
        both_running.wait(30)         # each outer task holds a thread before either sends
        if x == 2:
            gate.wait(30)             # waits only once outer(1) holds its thread in its wait
        else:
            gate.set()
        return inner.delay(x).get(timeout=60)

    app.start_worker(concurrency=2, prefetch=1)      # one outer task per thread
    first, second = app.send_many([outer.s(1), outer.s(2)])
    outcomes = []
    for r in (first, second):
        try:
            outcomes.append(r.get(timeout=60))
        except TaskFailed as exc:
            outcomes.append(exc.exc_type)
    assert sorted(map(str, outcomes)) in (["1", "DeadlockError"], ["2", "DeadlockError"])


# -- a forgotten, unknown or expired id ----------------------------------------------------------------


def test_get_on_a_forgotten_id_raises_at_once_saying_the_record_is_gone(app):
    add = app.task(name="add")(lambda x, y: x + y)
    app.start_worker()
    r = add.delay(1, 2)
    assert r.get(timeout=30) == 3
    r.forget()
    with pytest.raises(nbqueue.ResultNotFound) as err:
        app.result(r.id).get(timeout=5)
    assert err.value.task_id == r.id and "forgotten" in str(err.value)
    with pytest.raises(nbqueue.ResultNotFound):
        r.get(timeout=5)
    with pytest.raises(nbqueue.ResultNotFound):
        app.result(r.id).wait(timeout=5)
    with pytest.raises(nbqueue.ResultNotFound):
        app.result("no-such-id").get()                       # no timeout: it would have waited forever


def test_get_on_a_forgotten_workflow_raises_at_once(app):
    add = app.task(name="add")(lambda x, y: x + y)
    app.start_worker()
    g = app.send(group(add.s(1, 1), add.s(2, 2)))
    assert g.get(timeout=30) == [2, 4]
    app.backend.forget([g.id])
    from nbqueue.result import GroupResult
    with pytest.raises(nbqueue.ResultNotFound):
        GroupResult(g.id, g.results, app).get(timeout=5)


def test_get_on_an_expired_result_raises_at_once(app_factory):
    app = app_factory(results_expire_in=1)
    app.task(name="add")(lambda x, y: x + y)
    app.start_worker()
    r = app.send_task(app.signature("add", args=[2, 3]))
    assert r.get(timeout=30) == 5
    wait_for(lambda: app.backend.get(r.id) is None, message="the result expired")
    with pytest.raises(nbqueue.ResultNotFound, match="expired"):
        app.result(r.id).get(timeout=5)


def test_an_error_callback_that_has_not_fired_is_waited_for_not_refused(app):
    """A callback's record is written when it fires: waiting for one is not an error."""
    app.task(name="fine")(lambda: "ok")
    app.task(name="alert")(lambda error: error)
    r = app.send_task(app.signature("fine").link_error(app.signature("alert")))
    [alert] = r.callbacks
    with pytest.raises(TimeoutError):
        alert.get(timeout=0.5)


# -- no worker that can run it -----------------------------------------------------------------------


def test_get_with_no_worker_running_anywhere_says_so(app, caplog):
    caplog.set_level(logging.WARNING, logger="nbqueue.result")
    r = app.send_task(Signature("add", args=[1, 2]))
    with pytest.raises(TimeoutError) as err:
        r.get(timeout=5)
    assert "no worker is running" in str(err.value) and "start_worker" in str(err.value)
    [notice] = [rec.getMessage() for rec in caplog.records if "has not started" in rec.getMessage()]
    assert "no worker is running" in notice and r.id in notice
    assert "no worker is running" in r.diagnose()


def test_get_with_workers_only_on_other_queues_names_the_queue_nobody_serves(app, caplog):
    caplog.set_level(logging.WARNING, logger="nbqueue.result")
    app.task(name="add")(lambda x, y: x + y)
    app.start_worker(queues=["elsewhere"])
    r = app.send_task(Signature("add", args=[1, 2]))
    with pytest.raises(TimeoutError) as err:
        r.get(timeout=5)
    assert f"no live worker serves queue {app.default_queue!r}" in str(err.value) and "elsewhere" in str(err.value)
    assert any("no live worker serves queue" in rec.getMessage() for rec in caplog.records)


def test_the_live_view_of_a_task_no_worker_serves_says_so(app_factory):
    from nbqueue.notebook import widgets

    clock = ManualClock()
    app = app_factory(clock=clock)
    r = app.send_task(Signature("add", args=[1, 2]))
    view = widgets.make_view(r, "text")
    assert "no worker" not in view.text(view.snapshot())           # just sent: nothing to say yet
    clock.advance(5)
    line = view.text(view.snapshot())
    assert "PENDING" in line and "no worker is running" in line
    g = app.send(group(app.signature("add", args=[1, 1]), app.signature("add", args=[2, 2])))
    gview = widgets.make_view(g, "text")
    clock.advance(5)
    assert "no worker is running" in gview.text(gview.snapshot())


def test_the_waiting_check_names_a_task_no_live_worker_knows(app):
    app.task(name="add")(lambda x, y: x + y)
    app.start_worker(queues=[app.default_queue])
    r = app.send_task(Signature("ad", args=[1, 2]))     # seen before any worker took it
    from nbqueue.result import waiting_problem
    problem = waiting_problem(app, {**app.backend.get(r.id), "state": states.PENDING})
    assert "'ad'" in problem and "did you mean 'add'" in problem


# -- a misspelt task name sent from a notebook ---------------------------------------------------------


@pytest.fixture
def kernel(app_factory, monkeypatch):
    """An IPython shell with ``%load_ext nbqueue`` done: its kernel worker has the notebook's
    grace period for task names it does not know yet."""
    from nbqueue.notebook import magics as nbmagics

    from conftest import ipython_shell

    shell = ipython_shell(monkeypatch)
    shell.reset(new_session=False)
    app = app_factory()
    shell.user_ns["app"] = app
    state = nbmagics.load_ipython_extension(shell, concurrency=2)
    yield shell, app, state
    nbmagics.unload_ipython_extension(shell)


def test_a_misspelt_task_name_sent_from_a_notebook_fails_fast_with_not_registered(kernel):
    shell, app, state = kernel
    assert state.kernel_worker.unknown_grace > 60               # the kernel's grace for tasks defined later
    shell.run_cell("@app.task(name='add')\ndef add(x, y):\n    return x + y\n")
    r = app.send_task(Signature("ad", args=[1, 2]))
    with pytest.raises(TaskFailed) as err:
        r.get(timeout=30)                                       # was PENDING for 121 s
    assert err.value.exc_type == "NotRegistered" and "'ad'" in err.value.message
    assert app.send_task(Signature("add", args=[1, 2])).get(timeout=30) == 3


# -- revoking a task a workflow waits for -------------------------------------------------------------


def test_revoking_a_running_chord_member_fails_the_chord_with_task_revoked_and_fires_its_error_callback(app):
    slow = slow_task(app)
    add = app.task(name="add")(lambda x, y: x + y)
    total = app.task(name="total")(lambda values: sum(values))
    errors = []
    app.task(name="on_err")(lambda error, label: errors.append((error, label)) or label)
    callback = total.s().link_error(app.signature("on_err", args=["chord failed"]))
    res = app.send(chord([add.s(1, 1), slow.s(5)], callback))
    app.start_worker(concurrency=2)
    try:
        assert slow.started.wait(30)
        assert res.results[1].revoke()
        with pytest.raises(TaskRevoked) as err:
            res.get(timeout=30)                                 # while the member still runs
        assert err.value.task_id == res.results[1].id
        with pytest.raises(TaskRevoked):
            res.header.get(timeout=5)
        # a member cancelled: the header is not run to its end
        assert res.header.state == states.REVOKED and res.callback.state == states.REVOKED
        wait_for(lambda: errors, message="the callback's error callback ran")
        assert errors[0][1] == "chord failed"
    finally:
        slow.release.set()
    wait_for(lambda: not any(w.running and w._running for w in app.workers), message="the slow member returned")
    assert res.results[1].state == states.REVOKED               # its late result was not stored
    assert len(errors) == 1


def test_revoking_a_running_chain_step_records_the_rest_as_not_run(app):
    slow = slow_task(app)
    add = app.task(name="add")(lambda x, y: x + y)
    res = app.send(chain(slow.s(1), add.s(2), add.s(3)))
    app.start_worker(concurrency=1)
    try:
        assert slow.started.wait(30)
        res.results[0].revoke("changed my mind")
        with pytest.raises(TaskRevoked, match="changed my mind"):
            res.get(timeout=30)
        for step in res.results[1:]:
            info = step.info()
            assert info["state"] == states.REVOKED and info["traceback"] == f"not run: {res.results[0].id} was revoked"
    finally:
        slow.release.set()


def test_revoking_a_chord_callback_while_its_members_run_fails_the_chord_and_the_callback_never_runs(app):
    slow = slow_task(app)
    runs, errors = [], []
    total = app.task(name="total")(lambda values: runs.append(values) or sum(values))
    app.task(name="on_err")(lambda error, label: errors.append(label) or label)
    res = app.send(
        chord([slow.s(1), slow.s(2)], total.s().link_error(app.signature("on_err", args=["callback revoked"])))
    )
    app.start_worker(concurrency=2)
    try:
        assert slow.started.wait(30)
        res.callback.revoke()
        with pytest.raises(TaskRevoked):
            res.get(timeout=30)
    finally:
        slow.release.set()
    assert res.header.get(timeout=30) == [1, 2]
    wait_for(lambda: errors == ["callback revoked"], message="the callback's error callback ran")
    assert runs == [] and res.callback.state == states.REVOKED


@pytest.mark.parametrize("revoker", ["this_app", "another_app"])
def test_a_revoked_task_prefetched_behind_a_running_one_does_not_run(app_factory, revoker):
    """Revoked from the worker's own App (the notebook's) or from another one on the store
    (another process's): the task waiting in the worker's batch is skipped."""
    app = app_factory()
    started, release = threading.Event(), threading.Event()

    @app.task(name="slow")
    def slow(x):
        started.set()
        release.wait(60)
        time.sleep(0.1)           # a task that takes a while: the batch-mate waits behind it
        return x

    runs = []
    app.task(name="mark")(lambda: runs.append(1))
    first, second = app.send_many([slow.s(1), app.signature("mark")])
    app.start_worker(concurrency=1, prefetch=4)
    try:
        assert started.wait(30)
        assert second.state == states.RECEIVED                  # reserved in the slow task's batch
        (app if revoker == "this_app" else app_factory()).revoke(second.id)
    finally:
        release.set()
    assert first.get(timeout=30) == 1
    wait_for(lambda: not any(w._held for w in app.workers), message="the batch settled")
    assert runs == [] and second.state == states.REVOKED


# -- a store file deleted under a running kernel ---------------------------------------------------------


def result_rows(path: Path, task_id: str) -> list:
    conn = sqlite3.connect(path)
    try:
        return conn.execute("SELECT state FROM nbq_results WHERE id = ?", (task_id,)).fetchall()
    finally:
        conn.close()


def test_an_app_made_again_after_rm_rf_of_its_sqlite_store_writes_a_new_file_other_processes_use(tmp_path):
    store = tmp_path / ".nbqueue"
    url = f"sqlite:///{store}/nbqueue.db"
    app = nbqueue.App(url, default_queue="procs")
    app.send_task(Signature("add", args=[1, 1]))
    shutil.rmtree(store)                                        # !rm -rf .nbqueue
    app = nbqueue.App(url, default_queue="procs")               # the cell that makes the App, run again
    r = app.send_task(Signature("add", args=[2, 3]))
    assert (store / "nbqueue.db").exists() and result_rows(store / "nbqueue.db", r.id) == [("PENDING",)]
    try:
        with cli_worker(app, tmp_path, "proc_tasks", "--concurrency", "1", path=(TESTS_DIR,),
                        NBQUEUE_LOG_LEVEL="WARNING", NBQUEUE_TEST_SIDE_DB=str(tmp_path / "side.db")):
            assert r.get(timeout=60) == 5                       # another process ran it
    finally:
        app.close()


@pytest.mark.parametrize("app_kind", ["sqlite", "amqp"])
def test_an_app_whose_sqlite_file_was_deleted_keeps_recording_into_the_file_at_its_path(app_factory, tmp_path):
    """Also the App made before the deletion (its kernel worker still running): it never
    writes into the deleted file (on RabbitMQ the results live in an SQLite file)."""
    app = app_factory()
    app.task(name="add")(lambda x, y: x + y)
    app.start_worker()
    assert app.send_task(app.signature("add", args=[1, 1])).get(timeout=30) == 2
    path = Path(app.backend.path)
    for name in os.listdir(path.parent):
        if name.startswith(path.name):
            os.remove(path.parent / name)                      # the file and its -wal, -shm
    r = app.send_task(app.signature("add", args=[2, 2]))
    assert r.get(timeout=30) == 4
    assert path.exists() and result_rows(path, r.id) == [("SUCCESS",)]


# -- a notebook's task on a queue an external worker shares ------------------------------------------------


@pytest.mark.parametrize("app_kind", ["sqlite", "redis", "amqp"])
def test_a_notebook_task_on_a_queue_an_external_worker_shares_never_fails_not_registered(app_factory, tmp_path):
    app = app_factory()

    @app.task(name="notebook_only")
    def notebook_only(i):
        time.sleep(0.02)
        return i

    app.start_worker(concurrency=1, unknown_grace=120, heartbeat_interval=0.5)   # the kernel's worker
    with cli_worker(app, tmp_path, "proc_tasks", "--concurrency", "2", path=(TESTS_DIR,),
                    NBQUEUE_VISIBILITY_TIMEOUT=str(app.visibility_timeout), NBQUEUE_LOG_LEVEL="WARNING",
                    NBQUEUE_TEST_SIDE_DB=str(tmp_path / "side.db")) as (proc, _):
        wait_for(
            lambda: any(w.get("pid") == proc.pid for w in app.backend.workers()),
            timeout=30,
            message="external worker serving",
        )
        results = app.send_many([notebook_only.s(i) for i in range(20)])
        outcomes = []
        for r in results:
            try:
                outcomes.append(r.get(timeout=60))
            except TaskFailed as exc:
                outcomes.append(exc.exc_type)
        assert outcomes == list(range(20))
        # a name that no live worker anywhere knows still fails
        with pytest.raises(TaskFailed) as err:
            app.send_task(Signature("nobody_knows_it")).get(timeout=60)
        assert err.value.exc_type == "NotRegistered"


# -- children forked from a process with a running worker ---------------------------------------------------


def _forked_child(add, i: int, out) -> None:
    try:
        out.put((i, "ok", add.delay(i, 100).get(timeout=30)))
    except Exception as exc:
        out.put((i, type(exc).__name__, str(exc)))
    finally:
        add.app.close()           # the parent's worker goes on: the child must not unlist it


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_children_forked_while_the_worker_writes_send_and_wait(app):
    """Four children forked (multiprocessing, fork start method) while a thread of the parent
    is inside a write: each sends a task and gets its result, or (memory://, a store inside
    the parent) fails at once saying what to use instead. None hangs."""
    add = app.task(name="add")(lambda x, y: x + y)
    worker = app.start_worker(concurrency=2)
    assert add.delay(1, 1).get(timeout=30) == 2
    store = getattr(app.backend, "store", None)        # the SQLite file (also RabbitMQ's results)
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    writing, stop = threading.Event(), threading.Event()

    def busy() -> None:
        while not stop.is_set():
            if store is not None:
                with store.write():
                    writing.set()
                    time.sleep(0.05)
                time.sleep(0.005)
            else:
                writing.set()
                add.delay(0, 0)

    thread = threading.Thread(target=busy, daemon=True)
    thread.start()
    try:
        assert writing.wait(10)
        procs = [ctx.Process(target=_forked_child, args=(add, i, out)) for i in range(4)]
        for p in procs:
            p.start()
    finally:
        stop.set()
        thread.join(10)
    outcomes = {}
    deadline = time.monotonic() + 90
    while len(outcomes) < 4 and time.monotonic() < deadline:
        try:
            i, kind, value = out.get(timeout=1)
            outcomes[i] = (kind, value)
        except Exception:
            pass
    for p in procs:
        p.join(10)
        if p.is_alive():
            p.kill()
    if app.broker_url.startswith("memory://"):
        assert {kind for kind, _ in outcomes.values()} == {"ConfigurationError"} and len(outcomes) == 4
        assert all("'spawn'" in value and "'forkserver'" in value for _, value in outcomes.values())
    else:
        assert outcomes == {i: ("ok", i + 100) for i in range(4)}
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    assert worker.name in {w["worker_id"] for w in app.backend.workers()}
    assert add.delay(2, 2).get(timeout=30) == 4                # the parent carries on
