"""%%task and %nbqueue in an IPython shell; the cell task's safety checks; the live views.

The shell is IPython's own InteractiveShell (no kernel, so views are in text mode);
widget views are exercised directly. Cells that must still be running when the test
acts block on a threading.Event the test sets: no sleeps decide an outcome.
"""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import uuid

import pytest

import nbqueue
from nbqueue import builtin, capture, states
from nbqueue.canvas import Signature
from nbqueue.notebook import cellvars, display, widgets
from nbqueue.notebook import magics as nbmagics
from nbqueue.testing import wait_for

from conftest import REDIS_URL, ipython_shell, private_redis_url, require_server, session_server_url

REDIS_CELLS_URL = os.environ.get("NBQUEUE_TEST_REDIS_CELLS", REDIS_URL)


@pytest.fixture
def ipython(monkeypatch):
    return ipython_shell(monkeypatch)


@pytest.fixture
def shell(ipython, tmp_path):
    """A shell with a fresh namespace, an App on a fresh SQLite file, and the extension loaded."""
    ipython.reset(new_session=False)
    app = nbqueue.App(f"sqlite:///{tmp_path}/nb.db")
    ipython.user_ns["app"] = app
    ipython.user_ns["marker_dir"] = str(tmp_path)
    state = nbmagics.load_ipython_extension(ipython, concurrency=2)
    ipython.nbq = state
    yield ipython
    nbmagics.unload_ipython_extension(ipython)
    for worker in list(app.workers):
        worker.stop(wait=True, timeout=10)
    app.close()


def run(shell, code: str):
    """Run a cell; raise what it raised (so a test sees the error, not a printed traceback)."""
    capture.install()   # pytest swaps sys.stdout between a test's phases, dropping the workers' wrapper
    result = shell.run_cell(code)
    if result.error_before_exec is not None:
        raise result.error_before_exec
    if result.error_in_exec is not None:
        raise result.error_in_exec
    return result.result


def gate(shell, name: str = "gate") -> threading.Event:
    event = threading.Event()
    shell.user_ns[name] = event
    return event


# -- what a cell reads ------------------------------------------------------------------------------

def test_free_names_are_reads_before_the_cell_binds_them():
    src = (
        "import math\n"
        "y = x + 1\n"          # x read, y bound
        "z = y * factor\n"     # y is the cell's own, factor read
        "total += 1\n"         # augmented assignment reads first
        "for i in items:\n"
        "    acc = i\n"
        "print(acc, math.pi)\n"  # acc bound only in a loop: captured too
        "def f(a):\n"
        "    return a + offset\n"
        "squares = [k * k for k in range(n)]\n"
        "if flag:\n"
        "    w = 1\n"
        "w\n"
    )
    assert cellvars.free_names(src) == [
        "x",
        "factor",
        "total",
        "items",
        "print",
        "acc",
        "offset",
        "range",
        "n",
        "flag",
        "w",
    ]


def test_capture_sorts_values_imports_and_kernel_only_objects():
    import math
    from os.path import join

    def helper():
        return 1

    ns = {"n": 3, "frame_like": {"a": [1, 2]}, "m": math, "join": join, "helper": helper, "lock": threading.Lock()}
    from nbqueue.serialization import Serializer

    captured = cellvars.capture(list(ns), ns, Serializer(), allow_local=True)
    assert captured.inputs == {"n": 3, "frame_like": {"a": [1, 2]}}
    assert captured.imports == {"m": ["math", None], "join": [join.__module__, "join"]}
    assert set(captured.local) == {"helper", "lock"} and captured.local["helper"] is helper
    with pytest.raises(nbqueue.SerializationError, match="variable 'helper'"):
        cellvars.capture(["n", "helper"], ns, Serializer(), allow_local=False)


# -- %%task in the kernel's worker ------------------------------------------------------------------

def test_cell_value_is_the_result_and_its_prints_are_recorded(shell):
    res = run(shell, "%%task hello\nprint('hi from the cell')\n6 * 7")
    assert isinstance(res, nbmagics.CellTask)
    assert res.get(timeout=30) == 42
    assert "hi from the cell" in res.output
    assert res.info()["name"] == builtin.CELL_TASK and res.label == "hello"


def test_variables_are_captured_at_submission(shell):
    g = gate(shell)
    run(shell, "x = 1\ndata = [1, 2]")
    res = run(shell, "%%task snap\ngate.wait(30)\n(x, sum(data))")
    run(shell, "x = 100\ndata.append(1000)")    # edits after submission ...
    g.set()
    assert res.get(timeout=30) == (1, 3)          # ... do not reach the submitted cell


def test_dash_o_binds_the_value_only_after_success(shell):
    g = gate(shell)
    res = run(shell, "%%task make -o made\ngate.wait(30)\n{'rows': [1, 2, 3]}")
    assert "made" not in shell.user_ns
    g.set()
    res.wait(timeout=30)
    run(shell, "pass")                            # the next cell sees it (pre_run_cell binding)
    assert shell.user_ns["made"] == {"rows": [1, 2, 3]}


def test_dash_o_is_bound_by_the_updater_thread_without_another_cell(shell):
    res = run(shell, "%%task quick -o quick_value\n[10, 20]")
    res.wait(timeout=30)
    deadline = time.monotonic() + 30
    while "quick_value" not in shell.user_ns and time.monotonic() < deadline:
        widgets.UPDATER.flush(timeout=1)
    assert shell.user_ns["quick_value"] == [10, 20]


def test_failed_cell_records_the_traceback_and_binds_nothing(shell):
    res = run(shell, "%%task broken -o never\nvalues = [1, 0]\n[1 / v for v in values]")
    with pytest.raises(nbqueue.TaskFailed) as info:
        res.get(timeout=30)
    assert info.value.exc_type == "ZeroDivisionError"
    assert "[1 / v for v in values]" in res.traceback     # the cell's own line is in the traceback
    run(shell, "pass")
    assert "never" not in shell.user_ns


def test_retry_count_runs_a_failing_cell_again(shell, tmp_path):
    res = run(shell, "%%task flaky --retry-count 2\n"
                     "import os\n"
                     "first = not os.path.exists(marker_dir + '/attempted')\n"
                     "open(marker_dir + '/attempted', 'w').close()\n"
                     "if first:\n"
                     "    raise ConnectionError('not yet')\n"
                     "'second attempt'")
    assert res.get(timeout=30) == "second attempt"
    assert res.retries == 1


def test_nbqueue_wait_raises_the_failure_of_a_cell_naming_the_cell(shell):
    run(shell, "%%task bad\nraise KeyError('missing')")
    with pytest.raises(nbqueue.TaskFailed, match="KeyError") as info:
        run(shell, "%nbqueue wait bad --timeout 30")
    assert str(info.value).startswith("task '%%task bad' (") and "nbqueue.cell" not in str(info.value)


def test_after_waits_for_the_dependency_and_reads_its_output(shell):
    g = gate(shell)
    first = run(shell, "%%task load -o rows\ngate.wait(30)\n[1, 2, 3, 4]")
    run(shell, "rows = ['stale']")                        # a value the dependent cell must not see
    second = run(shell, "%%task total --after load\nsum(rows)")
    widgets.UPDATER.flush()
    assert second.state == states.PENDING and second.run.waiting   # not sent while load runs
    g.set()
    assert second.get(timeout=30) == 10
    assert first.info()["finished_at"] <= second.info()["started_at"]


def test_after_a_failed_dependency_the_cell_never_runs(shell, tmp_path):
    g = gate(shell)
    run(shell, "%%task load\ngate.wait(30)\nraise RuntimeError('no data')")
    res = run(shell, "%%task use --after load\nopen(marker_dir + '/ran', 'w').close()\n1")
    g.set()
    with pytest.raises(nbqueue.TaskRevoked) as info:
        res.get(timeout=30)
    assert info.value.exc_type == "DependencyFailed" and "load FAILURE" in info.value.message
    assert not (tmp_path / "ran").exists()


def test_after_accepts_a_variable_holding_a_result(shell):
    g = gate(shell)

    @shell.user_ns["app"].task
    def slow():
        g.wait(30)
        return "slow done"

    shell.user_ns["pending"] = slow.delay()
    res = run(shell, "%%task follow --after pending\n'followed'")
    widgets.UPDATER.flush()
    assert res.state == states.PENDING
    g.set()
    assert res.get(timeout=30) == "followed"


def test_rerunning_a_cell_replaces_and_revokes_the_earlier_task(shell):
    g = gate(shell)
    first = run(shell, "%%task job -o job_value\ngate.wait(30)\n'first'")
    second = run(shell, "%%task job -o job_value\n'second'")
    assert first.state == states.REVOKED
    assert second.get(timeout=30) == "second"
    g.set()                                        # the first run finishes: its result is fenced out
    shell.nbq.wait(["job"], timeout=30)
    run(shell, "pass")
    assert first.state == states.REVOKED
    assert shell.user_ns["job_value"] == "second"


def test_functions_defined_in_the_notebook_are_passed_live_in_process(shell):
    run(shell, "def double(v):\n    return 2 * v")
    res = run(shell, "%%task use_fn\ndouble(21)")
    assert res.get(timeout=30) == 42
    assert res.info()["queue"] == shell.nbq.kernel_queue   # kernel-only objects stay on this kernel's queue


# -- leaving the kernel ---------------------------------------------------------------------------------

def test_cell_for_other_workers_refuses_unserializable_variables_naming_them(shell):
    from IPython.core.error import UsageError

    run(shell, "%nbqueue worker stop")
    run(shell, "def helper():\n    return 1")
    with pytest.raises(UsageError, match="variable 'helper'"):
        run(shell, "%%task away\nhelper()")
    with pytest.raises(UsageError, match="variable 'helper'"):
        run(shell, "%%task away2 --queue elsewhere\nhelper()")


def test_worker_without_allow_cells_refuses_a_cell_and_runs_nothing(shell, tmp_path):
    app = shell.user_ns["app"]
    run(shell, "%nbqueue worker stop")
    res = run(shell, "%%task refused\nopen(marker_dir + '/ran', 'w').close()\n1")
    plain = app.worker(allow_cells=False)
    plain.drain(timeout=10)
    with pytest.raises(nbqueue.TaskFailed) as info:
        res.get(timeout=10)
    assert info.value.exc_type == "CellsNotAllowed" and "--allow-cells" in info.value.message
    assert not (tmp_path / "ran").exists()


def _cell(app, source: str) -> Signature:
    return Signature(builtin.CELL_TASK, kwargs=builtin.cell_kwargs(app, source=source, inputs={"n": 2}), queue="cells")


def test_signed_cells_run_and_tampered_or_unsigned_ones_are_refused(tmp_path):
    url = f"sqlite:///{tmp_path}/signed.db"
    sender = nbqueue.App(url, secret="s3cret")
    worker_app = nbqueue.App(url, secret="s3cret")
    unsigned_sender = nbqueue.App(url)
    marker = tmp_path / "ran"

    good = sender.send_task(_cell(sender, "n * 21"))
    tampered_sig = _cell(sender, "n * 21")
    tampered_sig.kwargs["source"] = f"open({str(marker)!r}, 'w').close()\nn * 21"
    tampered = sender.send_task(tampered_sig)
    unsigned = unsigned_sender.send_task(_cell(unsigned_sender, f"open({str(marker)!r}, 'w').close()"))
    other_key = nbqueue.App(url, secret="another").send_task(
        _cell(nbqueue.App(url, secret="another"), f"open({str(marker)!r}, 'w').close()")
    )

    worker_app.worker(queues="cells", allow_cells=True).drain(timeout=10)
    assert good.get(timeout=10) == 42
    for res, why in ((tampered, "does not match"), (unsigned, "unsigned"), (other_key, "does not match")):
        with pytest.raises(nbqueue.TaskFailed) as info:
            res.get(timeout=10)
        assert info.value.exc_type == "SignatureError" and why in info.value.message
    assert not marker.exists()
    for a in (sender, worker_app, unsigned_sender):
        a.close()


def test_cell_runs_on_an_allow_cells_worker_process_over_redis(ipython, tmp_path):
    """The remote path: Redis broker and results, an `nbqueue worker --allow-cells` process, a signed cell."""
    require_server("Redis", "127.0.0.1", 6379)
    queue = f"cells-{uuid.uuid4().hex[:8]}"
    url = private_redis_url(REDIS_CELLS_URL)         # a key prefix of this test's own, deleted afterwards
    env = {**os.environ, "NBQUEUE_BROKER": url, "NBQUEUE_DEFAULT_QUEUE": queue, "NBQUEUE_SECRET": "k3y"}
    env.pop("NBQUEUE_PROGRESS", None)
    proc = subprocess.Popen([sys.executable, "-m", "nbqueue", "worker", "--allow-cells", "-c", "1"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ipython.reset(new_session=False)
    app = nbqueue.App(url, default_queue=queue, secret="k3y")
    ipython.user_ns["app"] = app
    state = nbmagics.load_ipython_extension(ipython, start_worker=False)
    try:
        run(ipython, "import math\nfrom os.path import join\nbase = 4")
        res = run(
            ipython,
            "%%task remote -o answer\nimport os\nprint('pid', os.getpid())\n(math.sqrt(base * 4), join('a', 'b'), "
            "os.getpid())",
        )
        assert res.info()["queue"] == queue
        state.wait(["remote"], timeout=60)
        value = ipython.user_ns["answer"]
        assert value[:2] == (4.0, os.path.join("a", "b"))
        assert value[2] == proc.pid != os.getpid()
        assert f":{proc.pid}:" in res.info()["worker"]
    finally:
        nbmagics.unload_ipython_extension(ipython)
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
        app.purge(queue)
        app.close()
    assert proc.returncode == 0, out


# -- %nbqueue ----------------------------------------------------------------------------------------

def test_nbqueue_status_tasks_and_worker(shell):
    app = shell.user_ns["app"]
    app.task(lambda: "ok", name="ok").delay().get(timeout=30)
    queues = run(shell, "%nbqueue status")
    row = queues.set_index("queue").loc[shell.nbq.kernel_queue]
    assert row["workers"] == 1 and list(queues.columns) == ["queue", "ready", "delayed", "in_flight", "dead", "workers"]
    frame = run(shell, "%nbqueue tasks --state success")
    assert list(frame["name"]) == ["ok"] and list(frame["state"]) == ["SUCCESS"]
    run(shell, "%nbqueue worker stop")
    assert not shell.nbq.worker_running
    run(shell, "%nbqueue worker start -c 3")
    assert shell.nbq.worker_running and shell.nbq.kernel_worker.concurrency == 3


def test_kernel_on_sqs_runs_cells_and_notebook_functions_on_its_own_queues(ipython, tmp_path, qname):
    """Given a kernel whose App is on SQS, its worker reads the kernel's queue and the code
    queues (names with dots, which SQS takes under the broker's mapping): a %%task cell and
    a notebook function run, and %nbqueue status shows nbqueue's names."""
    from nbqueue.shipping import code_queue

    ipython.reset(new_session=False)
    app = nbqueue.App(session_server_url("sqs"), f"sqlite:///{tmp_path}/results.db", default_queue=qname("default"))
    ipython.user_ns["app"] = app
    state = nbmagics.load_ipython_extension(ipython, concurrency=2)
    try:
        run(ipython, "def double(v):\n    return 2 * v")
        assert run(ipython, "%%task on_sqs\ndouble(21)").get(timeout=60) == 42
        run(ipython, "triple = app.task(lambda v: 3 * v, name='triple')")
        shipped = run(ipython, "triple.delay(14)")
        assert shipped.get(timeout=60) == 42 and shipped.info()["queue"] == code_queue(app.default_queue)
        queues = run(ipython, "%nbqueue status").set_index("queue")
        assert queues.loc[state.kernel_queue, "workers"] == 1 and code_queue(app.default_queue) in queues.index
    finally:
        nbmagics.unload_ipython_extension(ipython)
        for worker in list(app.workers):
            worker.stop(wait=True, timeout=10)
        queues = [app.default_queue, state.kernel_queue]
        app.broker.delete_queues(queues + [code_queue(q) for q in queues])
        app.close()


def test_load_ext_creates_an_app_when_the_namespace_has_none(ipython, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ipython.reset(new_session=False)
    state = nbmagics.load_ipython_extension(ipython, concurrency=1)
    try:
        app = ipython.user_ns["app"]
        assert isinstance(app, nbqueue.App) and state.app is app
        assert os.path.exists(tmp_path / ".nbqueue" / "nbqueue.db")
        assert state.kernel_worker.allow_cells and state.worker_running
    finally:
        nbmagics.unload_ipython_extension(ipython)
        ipython.user_ns["app"].close()


# -- views ------------------------------------------------------------------------------------------------

@pytest.fixture
def app(tmp_path):
    app = nbqueue.App(f"sqlite:///{tmp_path}/views.db")
    yield app
    for worker in list(app.workers):
        worker.stop(wait=True, timeout=10)
    app.close()


def _until_finished(*views, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not all(v.finished for v in views) and time.monotonic() < deadline:
        widgets.UPDATER.flush(timeout=1)
    assert all(v.finished for v in views)


def test_widget_views_reach_completion_and_are_only_touched_by_the_updater(app):
    @app.task
    def square(x):
        return x * x

    @app.task
    def total(values):
        return sum(values)

    g = app.send(nbqueue.group([square.s(i) for i in range(6)]))
    c = app.send(nbqueue.chord([square.s(i) for i in range(4)], total.s()))
    ch = app.send(square.s(2) | square.s() | square.s())
    views = [widgets.WorkflowView(r, "widget") for r in (g, c, ch)]
    for v in views:
        v.start()                                   # first render in the displaying thread
    rendered_in: set[str] = set()
    for v in views:
        original = v.render
        v.render = lambda snap, _orig=original: (rendered_in.add(threading.current_thread().name), _orig(snap))[1]
        widgets.UPDATER.add_view(v)
    app.start_worker(concurrency=2)
    _until_finished(*views)
    for v in views:
        assert (v._bar.value, v._bar.max) == ((6, 6), (4, 4), (3, 3))[views.index(v)]
        assert v._bar.bar_style == "success"
        assert "SUCCESS" in v._header.value
    assert "→ <code>256</code>" in views[2]._value.value and views[2]._steps.value.count("<tr>") == 4
    assert "→ <code>14</code>" in views[1]._value.value
    assert rendered_in == {"nbqueue-view-updater"}
    assert sum(t.name == "nbqueue-view-updater" for t in threading.enumerate()) == 1


def test_group_view_turns_red_when_a_member_fails(app):
    @app.task
    def maybe(x):
        if x == 2:
            raise ValueError("two")
        return x

    g = app.send(nbqueue.group([maybe.s(i) for i in range(4)]))
    view = widgets.WorkflowView(g, "widget")
    view.start()
    widgets.UPDATER.add_view(view)
    app.start_worker(concurrency=2)
    _until_finished(view)
    assert view._bar.bar_style == "danger" and view._bar.value == 4
    assert "ValueError: two" in view._value.value


def test_task_view_streams_output_into_the_output_widget(app):
    g = threading.Event()

    @app.task
    def chatty():
        print("first line")
        g.wait(30)
        print("second line")
        return "done"

    res = chatty.delay()
    view = widgets.TaskView(res, "widget")
    view.start()
    widgets.UPDATER.add_view(view)
    app.start_worker()
    deadline = time.monotonic() + 30
    while "first line" not in "".join(o["text"] for o in view._output.outputs) and time.monotonic() < deadline:
        widgets.UPDATER.flush(timeout=1)
    assert "".join(o["text"] for o in view._output.outputs) == "first line\n"   # seen while still running
    assert not view.finished
    g.set()
    _until_finished(view)
    assert "".join(o["text"] for o in view._output.outputs) == "first line\nsecond line\n"
    assert "→ <code>&#x27;done&#x27;</code>" in view._value.value


def test_text_mode_prints_a_final_progress_line(app, capsys):
    @app.task
    def one(x):
        return x

    g = app.send(nbqueue.group([one.s(i) for i in range(3)]))
    view = widgets.progress(g, mode="text")
    app.start_worker()
    _until_finished(view)
    out = capsys.readouterr().out
    assert "group of 3" in out and "SUCCESS 100% (3/3 done: 3 succeeded)" in out and "→ [0, 1, 2]" in out


def test_mode_is_text_without_a_kernel_and_follows_the_environment(monkeypatch):
    monkeypatch.delenv("NBQUEUE_PROGRESS", raising=False)
    assert widgets.detect_mode() == "text"              # no kernel: no one could render a widget
    monkeypatch.setenv("NBQUEUE_PROGRESS", "both")
    assert widgets.detect_mode() == "text"              # ... even when asked
    with pytest.raises(ValueError, match="progress mode"):
        widgets.detect_mode("fancy")


def test_async_result_html_shows_state_value_and_output(app):
    @app.task
    def shout(word):
        print("shouting")
        return word.upper()

    res = shout.delay("hey")
    app.worker().start()
    res.get(timeout=30)
    text = display.html(res)
    assert "SUCCESS" in text and "&#x27;HEY&#x27;" in text and "shouting" in text and res.id in text


def test_results_display_through_the_formatters_nbqueue_registers_on_the_shell(ipython, app):
    """The core has no display code: nbqueue registers the notebook layer's rendering with the
    shell's display formatters, so every result type (and a cell's, a subclass) shows its view."""
    @app.task(name="add")
    def add(x, y):
        return x + y

    @app.task(name="total")
    def total(values):
        return sum(values)

    assert nbqueue.register_display(ipython)
    one, g = add.delay(1, 2), app.send(nbqueue.group(add.s(1, 1), add.s(2, 2)))
    c = app.send(nbqueue.chord(nbqueue.group(add.s(1, 1)), total.s()))
    ch = app.send(add.s(1, 1) | add.s(5))
    app.start_worker()
    for r in (one, g, c, ch):
        r.get(timeout=30)
    for r in (one, g, c, ch):
        data, _ = ipython.display_formatter.format(r)
        assert data["text/plain"].startswith("[nbqueue] ") and "SUCCESS" in data["text/plain"], data["text/plain"]
        assert data["text/html"] == display.html(r)
    assert not hasattr(one, "_repr_html_") and not hasattr(g, "_repr_mimebundle_")     # the formatters show them


# -- which App the magics use ----------------------------------------------------------------------

def test_an_app_created_after_load_ext_becomes_the_magics_app_and_says_so_once(ipython, tmp_path, monkeypatch, capsys):
    """%load_ext nbqueue, then app = nbqueue.App("redis://..."): %%task, %nbqueue and the
    kernel's worker move to the Redis App, and the cell that created it says so."""
    require_server("Redis", "127.0.0.1", 6379)
    monkeypatch.chdir(tmp_path)
    ipython.reset(new_session=False)
    state = nbmagics.load_ipython_extension(ipython, concurrency=1)    # no App yet: one on SQLite
    first = ipython.user_ns["app"]
    url = private_redis_url()
    try:
        capsys.readouterr()
        run(ipython, f"import nbqueue\napp = nbqueue.App({url!r})")
        said = capsys.readouterr().out
        app = ipython.user_ns["app"]
        assert app is not first and state.app is app
        assert said.count("nbqueue: %%task and %nbqueue now use `app` = <nbqueue.App broker=redis://") == 1
        assert "this kernel's worker moved to it (1 threads)" in said
        assert state.kernel_worker.app is app and state.worker_running
        assert wait_for(lambda: not first.workers, message="the SQLite App's worker stopped")
        res = run(ipython, "%%task on_redis\n6 * 7")
        assert res.app is app and res.get(timeout=30) == 42
        assert app.backend.get(res.id)["state"] == "SUCCESS" and first.backend.get(res.id) is None
        assert list(run(ipython, "%nbqueue tasks")["id"]) == [res.id]
        run(ipython, "x = 1")
        assert "nbqueue:" not in capsys.readouterr().out            # said once
    finally:
        nbmagics.unload_ipython_extension(ipython)
        ipython.user_ns["app"].close()
        first.close()


def test_nbqueue_use_picks_an_app_and_later_apps_do_not_switch_it(shell, tmp_path, capsys):
    first = shell.user_ns["app"]
    run(shell, f"import nbqueue\nother = nbqueue.App('sqlite:///{tmp_path}/other.db')")
    assert shell.nbq.app is shell.user_ns["other"]                  # the only new App: followed
    capsys.readouterr()
    run(shell, "%nbqueue use app")
    assert shell.nbq.app is first and shell.nbq.pinned and shell.nbq.kernel_worker.app is first
    assert "now use `app` = " in capsys.readouterr().out
    run(shell, f"third = nbqueue.App('sqlite:///{tmp_path}/third.db')")
    assert shell.nbq.app is first
    assert "new App `third`; %%task and %nbqueue keep using" in capsys.readouterr().out
    run(shell, "%nbqueue use")
    assert f"use {first!r}" in capsys.readouterr().out
    from IPython.core.error import UsageError

    with pytest.raises(UsageError, match="no variable 'nothing'"):
        run(shell, "%nbqueue use nothing")
    with pytest.raises(UsageError, match="is a int, not an nbqueue.App"):
        run(shell, "n = 3\n%nbqueue use n")
    for name in ("other", "third"):
        shell.user_ns[name].close()


def test_load_ext_uses_the_only_app_in_the_namespace_whatever_its_name(ipython, tmp_path):
    ipython.reset(new_session=False)
    mine = nbqueue.App(f"sqlite:///{tmp_path}/mine.db")
    ipython.user_ns["mine"] = mine
    state = nbmagics.load_ipython_extension(ipython, start_worker=False)
    try:
        assert state.app is mine and "app" not in ipython.user_ns
    finally:
        nbmagics.unload_ipython_extension(ipython)
        mine.close()
