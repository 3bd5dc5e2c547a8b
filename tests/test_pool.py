"""The process pool (pool="processes") and functions shipped from notebooks (shipping.py).

Notebook functions are made here as a kernel makes them: compiled from a "cell" (a
file name only linecache knows) into a namespace whose ``__name__`` is ``__main__``.
One test runs a real kernel with nbclient. Children are checked with psutil: none may
outlive its worker. Side effects go to files in the test's directory, so a test counts
executions where nbqueue never writes.
"""
from __future__ import annotations

import base64
import hashlib
import linecache
import multiprocessing.forkserver
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import nbformat
import psutil
import pytest
from nbclient import NotebookClient

import nbqueue
from nbqueue import Signature, builtin, shipping, states
from nbqueue.pool import ProcessPool
from nbqueue.testing import wait_for

from conftest import store_url

TESTS_DIR = Path(__file__).resolve().parent
REPO = TESTS_DIR.parent


def notebook_cell(source: str, **globals_) -> dict:
    """Run ``source`` as a notebook cell would: its functions live in ``__main__`` and
    their file exists only in linecache. Returns the cell's namespace."""
    filename = f"/tmp/ipykernel_{os.getpid()}/{uuid.uuid4().hex[:10]}.py"
    source = textwrap.dedent(source)
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    namespace = {"__name__": "__main__", **globals_}
    exec(compile(source, filename, "exec"), namespace)
    return namespace


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def forkserver_children() -> list[int]:
    pid = multiprocessing.forkserver._forkserver._forkserver_pid
    if pid is None or not psutil.pid_exists(pid):
        return []
    return [p.pid for p in psutil.Process(pid).children() if alive(p.pid)]


def lines(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


TASKS = """
import ctypes, logging, os, time

log = logging.getLogger("notebook")
factor = 3

def scale(x):
    return x * factor

def where(x):
    print(f"child {os.getpid()} got {x}")
    log.warning("computing %s", x)
    return [scale(x), os.getpid()]

def hang_once(path):
    with open(path + ".attempts", "a") as fh:
        fh.write(f"{os.getpid()}\\n")
    with open(path + ".attempts") as fh:
        n = len(fh.read().split())
    if n == 1:
        time.sleep(120)
    with open(path + ".done", "a") as fh:
        fh.write(f"{os.getpid()}\\n")
    return n

def crash(path):
    with open(path, "a") as fh:
        fh.write(f"{os.getpid()}\\n")
    ctypes.string_at(0)          # SIGSEGV

def pid(i=None):
    return os.getpid()

class DataError(Exception):
    pass

def bad(rows):
    if not rows:
        raise DataError("no rows")

def leave():
    raise SystemExit(3)

def retry_once(path):
    import nbqueue
    if not os.path.exists(path):
        open(path, "w").close()
        raise nbqueue.Retry(countdown=0.1, reason="not yet")
    return "second time"

def grow(mib):
    block = bytearray(mib * 1024 * 1024)
    return os.getpid()

def nap(seconds):
    time.sleep(seconds)
    return os.getpid()
"""


def register(app, **names):
    """Register the notebook cell's functions under their names (or the given ones)."""
    ns = notebook_cell(TASKS)
    return ns, {
        name: app.task(ns[name], name=name)
        for name in names or ns
        if callable(ns.get(name)) and not isinstance(ns[name], type)
    }


# -- in-process workers ---------------------------------------------------------------------------------

def test_notebook_function_runs_in_a_child_with_its_globals_output_and_logging(app_factory):
    app = app_factory()
    ns, tasks = register(app, where=1)
    worker = app.start_worker(pool="processes", concurrency=2)
    r = tasks["where"].delay(2)
    value, child = r.get(timeout=60)
    assert value == 6 and child != os.getpid() and child in worker.pool.pids()
    record = app.backend.get(r.id)
    assert f"child {child} got 2" in record["output"] and "computing 2" in record["output"]
    assert record["queue"] == app.default_queue + ".code" and record["worker"] == worker.name


def test_notebook_function_runs_in_a_child_when_main_has_no_spec(app_factory, monkeypatch):
    """IPython's namespace after ``reset`` is a ``__main__`` without ``__spec__``, which
    multiprocessing's preparation of each child reads: the task still runs, and ``__main__``
    is left as it was."""
    main = sys.modules["__main__"]
    monkeypatch.delattr(main, "__spec__")
    app = app_factory()
    ns, tasks = register(app, where=1)
    worker = app.start_worker(pool="processes", concurrency=1)
    value, child = tasks["where"].delay(2).get(timeout=60)
    assert value == 6 and child in worker.pool.pids()
    assert sys.modules["__main__"] is main and not hasattr(main, "__spec__")


@pytest.mark.parametrize("app_kind", ["sqs"])
def test_a_kernel_worker_on_sqs_reads_the_code_queue_and_runs_a_shipped_task(app_factory, qname, monkeypatch):
    """Given an App on SQS in a notebook kernel (``__main__`` has no file), its worker reads
    the code queue ``<queue>.code`` from the start; a notebook function runs through the
    process pool end to end, and the queue shows under nbqueue's name."""
    monkeypatch.delattr(sys.modules["__main__"], "__file__", raising=False)
    assert shipping.interactive()
    app = app_factory()
    code = shipping.code_queue(app.default_queue)
    qname.made.append(code)                              # deleted after the test with the others
    worker = app.start_worker(pool="processes", concurrency=1)
    assert code in worker.queues
    ns, tasks = register(app, where=1)
    r = tasks["where"].delay(2)
    value, child = r.get(timeout=60)
    assert value == 6 and child in worker.pool.pids()
    assert app.backend.get(r.id)["queue"] == code
    assert code in [row["queue"] for row in app.broker.stats()]


class _StandInMain:
    """A ``__main__`` that is no module (as IPython's ``DummyMod``): no ``__spec__``, no ``__file__``."""

    __slots__ = ()


@pytest.mark.parametrize("main", ["module without __spec__", "no module", "none at all"])
def test_process_pool_starts_children_whatever_main_looks_like(monkeypatch, main):
    ns = notebook_cell("""
        import os
        factor = 7

        def times(x):
            return [x * factor, os.getpid()]
        """)
    if main == "module without __spec__":
        import types

        stand_in = types.ModuleType("__main__")
        del stand_in.__spec__
        monkeypatch.setitem(sys.modules, "__main__", stand_in)
    elif main == "no module":
        stand_in = _StandInMain()
        monkeypatch.setitem(sys.modules, "__main__", stand_in)
    else:
        stand_in = None
        monkeypatch.delitem(sys.modules, "__main__")
    pool = ProcessPool(1)
    try:
        value, child = pool.call(ns["times"], (6,), task_id=f"main-{main}")
        assert value == 42 and child == pool.pids()[0] != os.getpid()
    finally:
        pool.close()
    assert sys.modules.get("__main__") is stand_in
    assert stand_in is None or not hasattr(stand_in, "__spec__")


def test_a_fresh_fork_server_starts_when_main_has_no_spec(tmp_path):
    """The fork server itself starts (its preparation reads ``__main__.__spec__`` too) in
    an interpreter whose ``__main__`` lost its ``__spec__``, and children run notebook code."""
    script = textwrap.dedent("""
        import sys
        del sys.modules["__main__"].__spec__
        from nbqueue.pool import ProcessPool

        def double(x):
            return x * 2

        if __name__ == "__main__":
            pool = ProcessPool(1)
            try:
                print(pool.call(double, (21,), task_id="t"), hasattr(sys.modules["__main__"], "__spec__"))
            finally:
                pool.close()
        """)
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))},
    )
    assert (done.returncode, done.stdout) == (0, "42 False\n"), done.stderr


def test_redefining_a_function_or_rebinding_a_global_it_reads_ships_new_code(app_factory):
    app = app_factory()
    worker = app.start_worker(pool="processes", concurrency=1)
    first = app.task(notebook_cell("def answer():\n    return 'first'\n")["answer"], name="answer")
    assert first.delay().get(timeout=60) == "first"
    second = app.task(notebook_cell("def answer():\n    return 'second'\n")["answer"], name="answer")
    assert second.delay().get(timeout=60) == "second"

    ns, tasks = register(app, where=1)
    assert tasks["where"].delay(2).get(timeout=60)[0] == 6
    ns["factor"] = 10                                          # the closure's global, bound anew
    assert tasks["where"].delay(2).get(timeout=60)[0] == 20
    ns["scale"] = lambda x: -x                                 # another notebook function it calls, re-defined
    assert tasks["where"].delay(2).get(timeout=60)[0] == -2
    assert len(worker.pool.pids()) == 1


def test_exceptions_keep_their_type_name_and_the_notebook_traceback(app_factory):
    app = app_factory()
    _, tasks = register(app, bad=1, leave=1, pid=1)
    worker = app.start_worker(pool="processes", concurrency=1)
    r = tasks["bad"].delay([])
    with pytest.raises(nbqueue.TaskFailed) as failed:
        r.get(timeout=60)
    assert (failed.value.exc_type, failed.value.message) == ("DataError", "no rows")
    tb = failed.value.traceback
    assert 'raise DataError("no rows")' in tb and "in bad" in tb and "/tmp/ipykernel_" in tb and "pool.py" not in tb
    child = worker.pool.pids()
    r = tasks["leave"].delay()                                  # exit() in a task fails it; the child goes on
    with pytest.raises(nbqueue.TaskFailed) as failed:
        r.get(timeout=60)
    assert failed.value.exc_type == "SystemExit"
    assert tasks["pid"].delay().get(timeout=60) in child


def test_retry_raised_in_a_child_retries(app_factory, tmp_path):
    app = app_factory()
    _, tasks = register(app, retry_once=1)
    app.start_worker(pool="processes", concurrency=1)
    r = tasks["retry_once"].delay(str(tmp_path / "marker"))
    assert r.get(timeout=60) == "second time"


GATED = """
import os, time
import nbqueue
def gated(path):
    open(path + ".started", "w").close()
    for _ in range(12000):              # at most 120 s: longer than any wait of the test, which opens it
        if os.path.exists(path + ".open"):
            return "late"
        time.sleep(0.01)
    return "the gate never opened"
def boom(tag):
    raise ValueError(f"boom {tag}")
def same(x):
    return x
def later():
    raise nbqueue.Retry(countdown=3600, reason="not now")
"""


@pytest.mark.parametrize("app_kind", ["sqlite", "memory", "redis"])
@pytest.mark.parametrize("concurrency", [2, 1])
def test_outcomes_are_recorded_while_a_child_still_runs_a_batch_mate(app_factory, tmp_path, concurrency):
    """One executor reserves a FAILURE, a SUCCESS, a RETRY and a blocker (last) in one batch
    (prefetch 8): each outcome is recorded, and visible to ``state`` and ``get()``, while the
    blocker still runs in its child."""
    app = app_factory(visibility_timeout=60)
    ns = notebook_cell(GATED)
    tasks = {name: app.task(ns[name], name=name) for name in ("gated", "boom", "same", "later")}
    gate = str(tmp_path / "gate")
    failed, succeeded, retried = tasks["boom"].delay("x"), tasks["same"].delay(7), tasks["later"].delay()
    blocker = tasks["gated"].delay(gate)
    app.start_worker(pool="processes", concurrency=concurrency, prefetch=8)
    try:
        wait_for(lambda: os.path.exists(gate + ".started"), timeout=60, message="the blocker started")
        wait_for(lambda: failed.state == states.FAILURE, timeout=60, message="FAILURE recorded")
        with pytest.raises(nbqueue.TaskFailed, match="boom x"):
            failed.get(timeout=5)
        assert succeeded.get(timeout=60) == 7
        wait_for(lambda: retried.state == states.RETRY, timeout=60, message="RETRY recorded")
        wait_for(lambda: blocker.state == states.STARTED, timeout=60, message="the blocker recorded STARTED")
        assert not os.path.exists(gate + ".open") and not blocker.ready()     # all while the blocker runs
    finally:
        Path(gate + ".open").touch()
    assert blocker.get(timeout=60) == "late"


def test_child_killed_mid_task_is_replaced_and_the_task_completes_once(app_factory, tmp_path):
    app = app_factory()
    _, tasks = register(app, hang_once=1)
    worker = app.start_worker(pool="processes", concurrency=1)
    side = str(tmp_path / "victim")
    r = tasks["hang_once"].delay(side)
    first = int(wait_for(lambda: lines(Path(side + ".attempts")), timeout=60, message="first attempt started")[0])
    assert first in worker.pool.pids()
    os.kill(first, signal.SIGKILL)
    assert r.get(timeout=60) == 2                              # delivered again, to a new child
    attempts = [int(p) for p in lines(Path(side + ".attempts"))]
    assert attempts[0] == first and attempts[1] != first and lines(Path(side + ".done")) == [str(attempts[1])]
    assert not alive(first) and worker.pool.pids() == [attempts[1]]


def test_a_task_that_kills_its_child_every_time_is_dead_lettered_with_the_reason_and_its_batch_mates_finish(
    app_factory, tmp_path
):
    app = app_factory()
    _, tasks = register(app, crash=1, pid=1)
    side = tmp_path / "crashes"
    res = app.send_group(
        nbqueue.group([tasks["pid"].s(0), tasks["crash"].s(str(side)), tasks["pid"].s(1), tasks["pid"].s(2)])
    )
    worker = app.start_worker(pool="processes", concurrency=1, prefetch=4)
    crashed = res.results[1]
    with pytest.raises(nbqueue.TaskFailed) as failed:
        crashed.get(timeout=120)
    assert failed.value.exc_type == "WorkerLostError"
    assert failed.value.message.startswith("worker child process died (signal 11)")
    assert "on 5 deliveries (max_deliveries=5)" in failed.value.message
    assert len(lines(side)) == 5 and len(set(lines(side))) == 5  # five children, each killed by it
    [dead] = wait_for(
        lambda: [d for d in app.broker.dead_letters(app.default_queue + ".code") if d["id"] == crashed.id]
    )
    assert dead["reason"] == failed.value.message
    for i in (0, 2, 3):
        assert res.results[i].get(timeout=60) != os.getpid() and res.results[i].state == states.SUCCESS
    wait_for(lambda: len(worker.pool.pids()) == 1, message="the dead child replaced")


def test_time_limit_stops_the_child_and_the_next_task_gets_a_new_one(app_factory):
    app = app_factory()
    _, tasks = register(app, nap=1, pid=1)
    worker = app.start_worker(pool="processes", concurrency=1)
    r = app.send_task(tasks["nap"].s(120).set(time_limit=1))
    with pytest.raises(nbqueue.TaskFailed) as failed:
        r.get(timeout=60)
    assert failed.value.exc_type == "TimeLimitExceeded"
    assert failed.value.message == "task ran longer than its time limit of 1s; its child process was stopped"
    assert tasks["pid"].delay().get(timeout=60) in worker.pool.pids()


def test_children_are_recycled_by_task_count_and_by_memory(app_factory):
    app = app_factory()
    _, tasks = register(app, pid=1, grow=1)
    worker = app.start_worker(pool="processes", concurrency=1, max_tasks_per_child=2)
    pids = [tasks["pid"].delay(i).get(timeout=60) for i in range(6)]
    assert pids[0] == pids[1] != pids[2] == pids[3] != pids[4] == pids[5]
    worker.stop(timeout=10)

    worker = app.start_worker(pool="processes", concurrency=1, max_memory_per_child=200 * 1024)   # KiB
    a = tasks["pid"].delay().get(timeout=60)
    b = tasks["grow"].delay(300).get(timeout=60)               # peak resident memory past 200 MiB
    c = tasks["pid"].delay().get(timeout=60)
    assert a == b != c
    assert not alive(b)


def test_stop_lets_running_children_finish_within_the_grace_period(app_factory):
    app = app_factory()
    _, tasks = register(app, nap=1)
    worker = app.start_worker(pool="processes", concurrency=2)
    r = tasks["nap"].delay(1.0)
    wait_for(lambda: r.state == states.STARTED, timeout=60, message="task started")
    pids = worker.pool.pids()
    worker.stop(wait=True, timeout=30)
    assert r.get(timeout=5) in pids and r.state == states.SUCCESS
    assert not any(alive(p) for p in pids) and forkserver_children() == []


def test_stop_past_the_grace_period_stops_children_and_hands_their_tasks_back(app_factory, tmp_path):
    app = app_factory()
    _, tasks = register(app, hang_once=1)
    side = str(tmp_path / "slow")
    worker = app.start_worker(pool="processes", concurrency=2)
    r = tasks["hang_once"].delay(side)
    first = int(wait_for(lambda: lines(Path(side + ".attempts")), timeout=60, message="task started")[0])
    pids = worker.pool.pids()
    worker.stop(wait=True, timeout=0.5)
    assert not worker.running
    assert not any(alive(p) for p in pids + [first]) and forkserver_children() == []
    assert r.state == states.PENDING and "worker child process stopped" in app.backend.get(r.id)["error"]
    assert not lines(Path(side + ".done"))
    app.start_worker(pool="processes", concurrency=1)         # handed back: another worker runs it, once
    assert r.get(timeout=60) == 2 and len(lines(Path(side + ".done"))) == 1


def test_a_stopped_process_worker_starts_again_with_new_children(app_factory):
    app = app_factory()
    _, tasks = register(app, pid=1)
    worker = app.start_worker(pool="processes", concurrency=1)
    first = tasks["pid"].delay().get(timeout=60)
    worker.stop(timeout=30)
    assert not alive(first)
    worker.start()
    second = tasks["pid"].delay().get(timeout=60)
    assert second != first and second in worker.pool.pids()


def test_kernel_interrupt_does_not_reach_running_children(app_factory):
    """A kernel interrupt signals the kernel's whole process group: children ignore SIGINT."""
    app = app_factory()
    _, tasks = register(app, nap=1)
    worker = app.start_worker(pool="processes", concurrency=1)
    r = tasks["nap"].delay(1.0)
    wait_for(lambda: r.state == states.STARTED, timeout=60, message="task started")
    for pid in worker.pool.pids():
        os.kill(pid, signal.SIGINT)
    assert r.get(timeout=60) in worker.pool.pids()


def test_pool_interface_soft_limit_and_stop():
    ns = notebook_cell("""
        import time
        import nbqueue

        def careful(seconds):
            try:
                time.sleep(seconds)
            except nbqueue.SoftTimeLimitExceeded:
                print("cleaning up")
                return "cleaned up"
        """)
    pool = ProcessPool(1)
    try:
        seen = []
        outcome = pool.run(
            ns["careful"], (60,), task_id="soft", soft_time_limit=0.5, on_output=lambda s, t: seen.append((s, t))
        )
        assert (outcome.exit, outcome.value, outcome.output, seen) == (
            "ok",
            "cleaned up",
            "cleaning up\n",
            [("stdout", "cleaning up\n")],
        )
        import threading

        box = {}
        runner = threading.Thread(target=lambda: box.update(outcome=pool.run(ns["careful"], (60,), task_id="stop-me")))
        runner.start()
        wait_for(lambda: pool._running("stop-me"), message="task running")
        pid = pool.pids()[0]
        assert pool.stop("stop-me", reason="cancelled")
        runner.join(30)
        outcome = box["outcome"]
        assert (outcome.exit, outcome.reason, outcome.signal) == ("stopped", "cancelled", signal.SIGTERM)
        assert not alive(pid)
        with pytest.raises(nbqueue.WorkerLostError, match=r"worker child process stopped \(cancelled\)"):
            outcome.unwrap()
        assert pool.run(ns["careful"], (0,), task_id="after").exit == "ok"
    finally:
        pool.close()
    assert pool.pids() == []


def test_pool_soft_limit_due_before_a_fresh_child_is_ready_reaches_the_task():
    """A soft limit that passes while a new child is still starting (before its SIGUSR1
    handler is installed) is sent once the child says it runs the task: the task gets
    SoftTimeLimitExceeded, the child is not killed by the signal's default action."""
    ns = notebook_cell("""
        import time
        import nbqueue

        def careful(seconds):
            try:
                time.sleep(seconds)
            except nbqueue.SoftTimeLimitExceeded:
                return "cleaned up"
        """)
    pool = ProcessPool(1, max_tasks_per_child=1)     # every task starts on a child started for it
    try:
        for i in range(3):
            outcome = pool.run(ns["careful"], (30,), task_id=f"fresh-{i}", soft_time_limit=1e-6)
            assert outcome.exit == "ok", (outcome.exit, outcome.signal, outcome.message)
            # raised as the function starts or inside its sleep: either way the task got it
            assert outcome.value == "cleaned up" or outcome.exc_type == "SoftTimeLimitExceeded", outcome
    finally:
        pool.close()


class _SlowToLoad:
    """Loading this in the child takes 1.5 s: a child slow to begin its task (its start-up)."""

    def __reduce__(self):
        return (time.sleep, (1.5,))


def test_pool_time_limit_counts_from_the_function_start_not_the_child_s_start_up():
    """A task given 1 s that returns at once is not stopped because its child took 1.5 s to
    begin it (a fresh child under load; arguments slow to load): the hard limit, as the soft
    one and Celery's, counts from the function's start. One that runs too long still stops."""
    ns = notebook_cell("""
import time

def quick(_):
    return "ran"

def sleepy(_):
    time.sleep(30)
""")
    pool = ProcessPool(1)
    try:
        outcome = pool.run(ns["quick"], (_SlowToLoad(),), task_id="slow-start", time_limit=1)
        assert (outcome.exit, outcome.value) == ("ok", "ran"), outcome
        outcome = pool.run(ns["sleepy"], (_SlowToLoad(),), task_id="too-long", time_limit=1)
        assert outcome.exit == "time_limit", outcome
    finally:
        pool.close()


def test_worker_rejects_an_unknown_pool():
    app = nbqueue.App("memory://pool-choice")
    with pytest.raises(nbqueue.ConfigurationError, match="pool must be one of .threads., .processes., not .fork."):
        app.worker(pool="fork")


MODULE_TASKS = """
import os
import nbqueue

app = nbqueue.App(os.environ["NBQ_POOL_MODULE_URL"], default_queue=os.environ["NBQ_POOL_MODULE_QUEUE"])

@app.task(name="plus")
def plus(x):
    return x + 1

@app.task(name="uses_its_app")
def uses_its_app(x):
    return [app.default_queue, plus.delay(x).id, os.getpid()]
"""


def test_a_module_task_that_uses_its_app_runs_in_a_child_which_imports_the_module(tmp_path, monkeypatch):
    """``@app.task`` binds the module's name to the Task, so the function is not pickled by
    reference by cloudpickle's own rule; by value it would take the App along (which cannot be
    pickled). It is shipped by module and name, and the child gets the module's App."""
    queue = f"mod-{uuid.uuid4().hex[:6]}"
    monkeypatch.setenv("NBQ_POOL_MODULE_URL", f"sqlite:///{tmp_path}/q.db")
    monkeypatch.setenv("NBQ_POOL_MODULE_QUEUE", queue)
    module = f"pool_module_tasks_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{module}.py").write_text(MODULE_TASKS)
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib

    tasks = importlib.import_module(module)
    shipped = shipping.pack(tasks.uses_its_app.fn)
    assert not shipped.by_value and len(shipped.data) < 500
    try:
        worker = tasks.app.start_worker(pool="processes", concurrency=2)
        used_queue, sent, child = tasks.uses_its_app.delay(1).get(timeout=60)
        assert used_queue == queue and child in worker.pool.pids()
        assert tasks.app.result(sent).get(timeout=60) == 2          # sent from the child through its own App
    finally:
        tasks.app.close()
        sys.modules.pop(module, None)


# -- shipped code in messages: routing, refusal, signatures ------------------------------------------------

class _Evil:
    """Unpickling this creates a file: proof that a worker unpickled what it must not."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _evil_message(app, task, marker: Path, *, secret: str | None = None) -> tuple[dict, dict]:
    """A message for ``task`` whose shipped code, if unpickled, creates ``marker``."""
    message, record, _ = app.prepare(task.s())
    data = pickle.dumps((_Evil(str(marker)), {}))
    key = hashlib.sha256(data).hexdigest()
    message["code"].update(key=key, data=base64.b64encode(data).decode(), origin="elsewhere",
                           signature=shipping.sign(secret, message["name"], key, "elsewhere") if secret else None)
    return message, record


def _cli_env(app, **extra) -> dict:
    env = dict(os.environ)
    env.update(
        {
            "NBQUEUE_BROKER": app.broker_url,
            "NBQUEUE_BACKEND": app.backend_url,
            "NBQUEUE_DEFAULT_QUEUE": app.default_queue,
            "NBQUEUE_LOG_LEVEL": "WARNING",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS_DIR), env.get("PYTHONPATH")])),
        }
    )
    env.pop("NBQUEUE_SECRET", None)
    env.update(extra)
    return env


@pytest.fixture
def cli(tmp_path):
    procs = []

    def start(app, *args, **env):
        log = tmp_path / f"worker{len(procs)}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "nbqueue", "worker", "--app", "proc_tasks:app", *args],
                cwd=tmp_path,
                env=_cli_env(app, **env),
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        proc.log = log
        procs.append(proc)
        wait_for(
            lambda: proc.poll() is None and any(w.get("pid") == proc.pid for w in app.backend.workers()),
            timeout=60,
            message=f"worker {proc.pid} serving",
        )
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def other_name(app, proc) -> str:
    return next(w["worker_id"] for w in app.backend.workers() if w.get("pid") == proc.pid)


def sqlite_app(tmp_path, **options):
    return nbqueue.App(f"sqlite:///{tmp_path}/nbqueue.db", default_queue="ship", **options)


def test_signatures_from_a_notebook_function_carry_its_code_and_signatures_by_name_do_not(app_factory):
    app = app_factory(secret="s")
    _, tasks = register(app, pid=1, where=1)
    message, record, out = app.prepare(tasks["where"].s(1).link(tasks["pid"].s()))
    assert out.queue == record["queue"] == message["queue"] == app.default_queue + ".code"
    code = message["code"]
    assert code["key"] == hashlib.sha256(base64.b64decode(code["data"])).hexdigest()
    assert code["origin"] == builtin.PROCESS_TOKEN and code["signature"] == shipping.sign(
        "s", "where", code["key"], code["origin"]
    )
    assert message["on_success"][0]["code"]["key"] != code["key"]             # the callback carries its own
    by_name, _, _ = app.prepare(Signature("where", args=[1]))
    assert "code" not in by_name and by_name["queue"] == app.default_queue   # by name: whoever has "where" runs it


def test_a_notebook_function_that_cannot_be_pickled_goes_by_name_and_fails_clearly_in_a_child(app_factory):
    app = app_factory()
    ns = notebook_cell("""
        import threading
        gate = threading.Event()

        def wait_for_gate():
            return gate.wait(5)
        """)
    task = app.task(ns["wait_for_gate"], name="wait_for_gate")
    message, _, _ = app.prepare(task.s())
    assert "code" not in message and message["queue"] == app.default_queue       # sent by name
    threads = app.start_worker()                                                  # the kernel's thread worker runs it
    ns["gate"].set()
    assert task.delay().get(timeout=60) is True
    threads.stop(timeout=30)
    app.start_worker(pool="processes", concurrency=1)
    with pytest.raises(nbqueue.TaskFailed) as failed:
        task.delay().get(timeout=60)
    assert failed.value.exc_type == "SerializationError"
    assert "cannot be sent to a child process" in failed.value.message and "_thread.lock" in failed.value.message


CALLING_TASKS = """
@app.task
def double(x): return 2*x

@app.task
def quad(x): return double(double(x))

@app.task
def fib(n): return n if n < 2 else fib(n - 1) + fib(n - 2)

@app.task
def double_sent(x): return double.delay(x).get(timeout=30)
"""


@pytest.mark.parametrize("app_kind", ["sqlite", "redis"])
def test_a_task_calling_other_tasks_or_itself_in_a_child_works_as_on_threads(app_factory):
    """Given notebook tasks that call another task, themselves, or send another task and
    wait for it, when they run in child processes, then each returns what it returns on
    threads: a Task travels without its App, and a child sends through the worker's stores."""
    app = app_factory()
    ns = notebook_cell(CALLING_TASKS, app=app)
    app.start_worker(pool="processes", concurrency=2)
    assert ns["quad"].delay(4).get(timeout=60) == 16
    assert ns["fib"].delay(10).get(timeout=60) == 55
    assert ns["double_sent"].delay(5).get(timeout=60) == 10


@pytest.mark.parametrize("app_kind", ["memory"])
def test_a_task_sending_from_a_child_on_a_store_of_one_process_fails_saying_so(app_factory):
    app = app_factory()
    ns = notebook_cell(CALLING_TASKS, app=app)
    app.start_worker(pool="processes", concurrency=1)
    assert ns["quad"].delay(4).get(timeout=60) == 16
    with pytest.raises(nbqueue.TaskFailed) as failed:
        ns["double_sent"].delay(5).get(timeout=60)
    assert failed.value.exc_type == "ConfigurationError"
    assert "task 'double' cannot be sent from this child process" in failed.value.message
    assert "a store that lives in the worker's process alone" in failed.value.message


@pytest.mark.parametrize("app_kind", ["sqlite"])
def test_a_task_reading_something_that_cannot_be_pickled_fails_in_a_child_naming_it(app_factory):
    app = app_factory()
    ns = notebook_cell("""
        import threading
        lock = threading.Lock()

        def helper():
            with lock:
                return 1

        @app.task
        def locked(x):
            return helper() + x
        """, app=app)
    app.start_worker(pool="processes", concurrency=1)
    with pytest.raises(nbqueue.TaskFailed) as failed:
        ns["locked"].delay(1).get(timeout=60)
    assert failed.value.exc_type == "SerializationError"
    assert ("task 'locked' cannot be sent to a child process: it reads 'helper', which reads 'lock' "
            "(a _thread.lock), which cannot be pickled") in failed.value.message


def test_a_worker_without_allow_code_never_takes_or_unpickles_shipped_code(tmp_path, cli):
    app = sqlite_app(tmp_path)
    try:
        _, tasks = register(app, pid=1)
        plain = cli(app, "-c", "1")
        shipped = tasks["pid"].delay()
        assert app.send_task(Signature("add", args=[1, 2])).get(timeout=60) == 3
        assert shipped.state == states.PENDING                      # routed to ship.code, which it does not read
        assert app.backend.get(shipped.id)["queue"] == "ship.code"

        # one told to read the code queue anyway refuses, and unpickles nothing
        marker = tmp_path / "unpickled"
        message, record = _evil_message(app, tasks["pid"], marker)
        app.publish([record], [app.outgoing(message)])
        misconfigured = cli(app, "-c", "1", "-Q", "ship.code")
        r = app.result(message["id"])
        with pytest.raises(nbqueue.TaskFailed) as failed:
            r.get(timeout=60)
        assert failed.value.exc_type == "CodeNotAllowed" and "--allow-code" in failed.value.message
        assert not marker.exists()
        plain.send_signal(signal.SIGTERM)
        misconfigured.send_signal(signal.SIGTERM)
        assert plain.wait(30) == 0 and misconfigured.wait(30) == 0
    finally:
        app.close()


def test_a_worker_without_allow_code_hands_shipped_code_back_while_its_sender_serves(tmp_path, cli):
    app = sqlite_app(tmp_path)
    try:
        _, tasks = register(app, pid=1)
        # the sending kernel's worker, as its heartbeat shows it (it is started below)
        app.backend.heartbeat(
            "sender-kernel",
            {"pid": os.getpid(), "queues": ["ship", "ship.code"], "origin": builtin.PROCESS_TOKEN},
            ttl=120,
        )
        other = cli(app, "-c", "1", "-Q", "ship.code")
        r = tasks["pid"].delay()

        def record():
            return app.backend.get(r.id)

        wait_for(
            lambda: record().get("worker") == other_name(app, other) and record()["state"] == states.PENDING,
            timeout=60,
            message="taken by the other worker and handed back",
        )
        worker = app.start_worker(pool="processes", concurrency=1)
        assert r.get(timeout=60) in worker.pool.pids()             # it was not failed: its sender's worker ran it
        other.send_signal(signal.SIGTERM)
        assert other.wait(30) == 0
    finally:
        app.close()


def test_allow_code_with_a_secret_refuses_unsigned_altered_or_foreign_signed_code(tmp_path, cli):
    app = sqlite_app(tmp_path)
    try:
        _, tasks = register(app, pid=1)
        marker = tmp_path / "unpickled"
        worker = cli(app, "-c", "1", "--allow-code", NBQUEUE_SECRET="right")
        refused = []
        unsigned, record = _evil_message(app, tasks["pid"], marker)                     # no signature
        foreign, record2 = _evil_message(app, tasks["pid"], marker, secret="wrong")     # another secret
        altered, record3 = _evil_message(app, tasks["pid"], marker, secret="right")
        altered["code"]["key"] = "0" * 64                                               # hash does not match the data
        for message, rec in ((unsigned, record), (foreign, record2), (altered, record3)):
            app.publish([rec], [app.outgoing(message)])
            with pytest.raises(nbqueue.TaskFailed) as failed:
                app.result(message["id"]).get(timeout=60)
            refused.append((failed.value.exc_type, failed.value.message.split(":")[0].split(" (")[0]))
        assert refused == [("SignatureError", "unsigned code refused"),
                           ("SignatureError", "shipped code signature does not match"),
                           ("SignatureError", "shipped code does not match its hash")]
        assert not marker.exists()
        signed = sqlite_app(tmp_path, secret="right")
        try:
            _, good = register(signed, pid=1)
            assert good["pid"].delay().get(timeout=60) == worker.pid  # threads pool: runs in the worker process
        finally:
            signed.close()
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(30) == 0
    finally:
        app.close()


def test_cli_process_worker_on_redis_runs_a_shipped_notebook_function(tmp_path, cli):
    url = store_url("redis", tmp_path)
    app = nbqueue.App(url, default_queue=f"ship-{uuid.uuid4().hex[:6]}", secret="s3")
    try:
        ns, tasks = register(app, where=1, crash=1)
        proc = cli(app, "--pool", "processes", "-c", "2", "--allow-code", NBQUEUE_SECRET="s3")
        value, child = tasks["where"].delay(5).get(timeout=60)
        assert value == 15
        descendants = {p.pid for p in psutil.Process(proc.pid).children(recursive=True)}
        assert child != proc.pid and child in descendants
        r = tasks["where"].delay(1)
        other = r.get(timeout=60)[1]
        output = app.backend.get(r.id)["output"]
        assert f"child {other} got 1\n" in output and "WARNING notebook: computing 1" in output and other in descendants
        ns["factor"] = 7                                       # re-sent with the new value
        assert tasks["where"].delay(5).get(timeout=60)[0] == 35
        crashed = tasks["crash"].delay(str(tmp_path / "crashes"))
        with pytest.raises(nbqueue.TaskFailed, match=r"worker child process died \(signal 11\)"):
            crashed.get(timeout=120)
        descendants = {p.pid for p in psutil.Process(proc.pid).children(recursive=True)}
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        wait_for(lambda: not any(alive(p) for p in descendants), timeout=30, message="no process outlives the worker")
    finally:
        app.close()


# -- a real kernel ---------------------------------------------------------------------------------------

KERNEL_CELLS = [
    """
import os
import nbqueue, psutil
app = nbqueue.App("sqlite:///pool.db")
worker = app.start_worker(pool="processes", concurrency=2)
""",
    """
@app.task
def where(x):
    print(f"child {os.getpid()} got {x}")
    return [x, os.getpid()]

r = where.delay(1)
value = r.get(timeout=60)
print("value:", value[0], "| in a child:", value[1] != os.getpid() and value[1] in worker.pool.pids())
print("output:", app.backend.get(r.id)["output"].strip() == f"child {value[1]} got 1")
""",
    """
@app.task
def where(x):
    return ["redefined", x]

print("again:", where.delay(2).get(timeout=60))
""",
    """
factor = 3

def scale(x):
    return x * factor

@app.task
def scaled(x):
    return scale(x) + 1

print("scaled:", scaled.delay(2).get(timeout=60))
factor = 10
print("scaled after factor = 10:", scaled.delay(2).get(timeout=60))
""",
    """
class DataError(Exception):
    pass

@app.task
def bad():
    raise DataError("no rows")

try:
    bad.delay().get(timeout=60)
except nbqueue.TaskFailed as exc:
    print("failed:", exc.exc_type, exc.message, "| source line shown:", 'raise DataError("no rows")' in exc.traceback)
""",
    """
pids = worker.pool.pids()
worker.stop(timeout=30)
left = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
print("children:", len(pids), "| left:", left)
""",
]


@pytest.mark.slow
def test_notebook_functions_run_in_the_kernels_child_processes(tmp_path):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(textwrap.dedent(src).strip()) for src in KERNEL_CELLS]
    NotebookClient(nb, timeout=180, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    text = ["".join(o.get("text", "") for o in c.outputs if o.output_type == "stream") for c in nb.cells]
    errors = [o for c in nb.cells for o in c.outputs if o.output_type == "error"]
    assert not errors, errors
    assert "value: 1 | in a child: True" in text[1] and "output: True" in text[1]
    assert "again: ['redefined', 2]" in text[2]
    assert "scaled: 7" in text[3] and "scaled after factor = 10: 21" in text[3]
    assert "failed: DataError no rows | source line shown: True" in text[4]
    assert "children: 2 | left: []" in text[5]


@pytest.mark.slow
def test_process_pool_notebook_shows_the_speed_up(tmp_path):
    from test_notebooks import assert_no_errors, cell_text, execute

    nb = execute("06-process-pool.ipynb", tmp_path)
    assert_no_errors(nb)
    text = "".join(cell_text(c) for c in nb.cells if c.cell_type == "code")
    import re

    assert re.search(r"threads: \d+\.\d+ s, processes: \d+\.\d+ s: \d+\.\d+x as fast on \d+ cores", text), text
    assert "twin primes below 100: [3, 5, 11, 17, 29, 41, 59, 71]" in text, text


@pytest.mark.slow
@pytest.mark.parametrize("how", ["shutdown", "kill"])
def test_no_child_outlives_its_kernel(tmp_path, how):
    """A kernel shut down (its children are stopped at exit) or killed with SIGKILL (each
    child, here one busy with a task, sees the pipe only its parent held close, and exits)."""
    from jupyter_client.manager import start_new_kernel
    from test_notebooks import run_code

    km, kc = start_new_kernel(kernel_name="python3", cwd=str(tmp_path))
    try:
        out = run_code(kc, textwrap.dedent("""
            import os, time
            import nbqueue
            app = nbqueue.App("sqlite:///pool.db")
            worker = app.start_worker(pool="processes", concurrency=2)
            worker.pool.start(wait=True)

            @app.task
            def nap():
                import time
                time.sleep(600)

            r = nap.delay()
            while r.state != "STARTED":   # a child busy with a task: only its watch on the parent ends it
                time.sleep(0.05)
            print(os.getpid(), *worker.pool.pids())
            """))
        kernel, *pids = [int(p) for p in out.split()]
        assert len(pids) == 2 and all(alive(p) for p in pids)
        if how == "kill":
            os.kill(kernel, signal.SIGKILL)      # this process only (the kernel manager would kill its process group)
        else:
            km.shutdown_kernel()
        wait_for(lambda: not any(alive(p) for p in pids), timeout=30, message="children gone with their kernel")
    finally:
        kc.stop_channels()
        if km.has_kernel:
            km.shutdown_kernel(now=True)
