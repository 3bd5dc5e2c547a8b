"""The per-call path: ``.delay()`` in a loop and ``.get()`` per handle.

What a send promises (when ``.delay()`` returns the task is durably queued) is checked by
killing the sending process with SIGKILL right after its sends returned; the wake-up
channel beside a SQLite file and the read-first ``get()`` are checked on their own.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading

import pytest

import nbqueue
from nbqueue.drivers.sqlite import wake as wakechannel
from nbqueue.wakeups import WAKEUPS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SENDER = r"""
import json, os, time
from proc_tasks import add                            # App.from_env(): NBQUEUE_BROKER, ...

for i in range(int(os.environ["COUNT"])):
    handle = add.delay(i, i)
    print(json.dumps([handle.id, i]), flush=True)     # reported only once .delay() returned
print("sent", flush=True)
time.sleep(600)                                       # killed here, without a chance to clean up
"""


def _send_then_sigkill(broker: str, backend: str | None, queue: str, count: int) -> list[tuple[str, int]]:
    """A child process sends ``count`` tasks, reporting each id as its send returns; it is
    killed with SIGKILL as soon as it has reported them all."""
    env = dict(os.environ, NBQUEUE_BROKER=broker, NBQUEUE_BACKEND=backend or "", NBQUEUE_DEFAULT_QUEUE=queue,
               COUNT=str(count),
               PYTHONPATH=os.pathsep.join([os.path.join(ROOT, "tests"), ROOT]))
    proc = subprocess.Popen([sys.executable, "-c", SENDER], env=env, stdout=subprocess.PIPE, text=True)
    sent = []
    try:
        for line in proc.stdout:
            if line.strip() == "sent":
                break
            sent.append(tuple(json.loads(line)))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    assert proc.returncode == -signal.SIGKILL
    return sent


@pytest.mark.parametrize("kind", ["sqlite", "amqp"])
def test_a_send_that_returned_survives_sigkill_of_the_sender(kind, tmp_path, qname):
    """Given a process that sends tasks one .delay() at a time and is SIGKILLed right after,
    when a worker starts later, then every task whose .delay() had returned runs."""
    from conftest import app_urls

    broker, backend = app_urls(kind, tmp_path)
    queue = qname("kill")
    sent = _send_then_sigkill(broker, backend, queue, 200)
    assert len(sent) == 200

    app = nbqueue.App(broker, backend, default_queue=queue)
    app.register_task("add", _add)
    worker = app.start_worker(concurrency=2)
    try:
        values = {task_id: app.result(task_id).get(timeout=60) for task_id, _ in sent}
    finally:
        worker.stop()
        if kind == "amqp":
            app.broker.delete_queues([queue])
        app.close()
    assert values == {task_id: 2 * i for task_id, i in sent}


def _add(x, y):
    return x + y


def test_get_of_a_final_task_reads_it_without_arming_a_wait(tmp_path, monkeypatch):
    app = nbqueue.App(f"sqlite:///{tmp_path}/q.db", default_queue="q")

    @app.task(name="add")
    def add(x, y):
        return x + y

    handle = add.delay(2, 3)
    assert app.worker().drain(timeout=5) == 1

    def no_wait(*args, **kwargs):
        raise AssertionError("a wait was armed for a final task")

    monkeypatch.setattr(WAKEUPS, "watching", no_wait)
    assert handle.get(timeout=5) == 5
    app.close()


def test_get_of_a_task_not_final_yet_still_waits(tmp_path):
    app = nbqueue.App(f"sqlite:///{tmp_path}/q.db", default_queue="q")

    @app.task(name="add")
    def add(x, y):
        return x + y

    handle = add.delay(2, 3)
    with pytest.raises(TimeoutError):
        handle.get(timeout=0.2)
    app.start_worker()
    assert handle.get(timeout=30) == 5
    app.close()


def test_wake_channel_carries_a_datagram_to_another_listener(tmp_path):
    """Two channels on one file stand for two processes: one listens, the other sends."""
    path = str(tmp_path / "store.db")
    listener, sender = wakechannel.WakeChannel(path), wakechannel.WakeChannel(path)
    got: list[list[str] | None] = []
    woken = threading.Event()

    def handler(payload: bytes) -> None:
        got.append(wakechannel.payload_ids(payload))
        woken.set()

    try:
        assert listener.listen(wakechannel.RESULTS, handler)
        sender.send(wakechannel.MESSAGES)                        # another kind: not for this listener
        sender.send(wakechannel.RESULTS, wakechannel.ids_payload(["a", "b"]))
        assert woken.wait(10)
        assert got == [["a", "b"]]
    finally:
        listener.close()
        sender.close()


def test_wake_channel_datagrams_that_arrived_together_make_one_wake_up(tmp_path):
    """Datagrams waiting while the listener handled an earlier one are handled in one call,
    their ids merged: a burst of sends costs the listening process one wake-up."""
    path = str(tmp_path / "store.db")
    listener, sender = wakechannel.WakeChannel(path), wakechannel.WakeChannel(path)
    got: list[list[str] | None] = []
    first, release, done = threading.Event(), threading.Event(), threading.Event()

    def handler(payload: bytes) -> None:
        got.append(wakechannel.payload_ids(payload))
        if len(got) == 1:
            first.set()
            release.wait(10)
        else:
            done.set()

    try:
        assert listener.listen(wakechannel.RESULTS, handler)
        sender.send(wakechannel.RESULTS, wakechannel.ids_payload(["a"]))
        assert first.wait(10)                    # the listener is busy with the first datagram
        for ids in (["b"], ["c", "d"], ["e"]):
            sender.send(wakechannel.RESULTS, wakechannel.ids_payload(ids))
        release.set()
        assert done.wait(10)
    finally:
        listener.close()
        sender.close()
    assert got == [["a"], ["b", "c", "d", "e"]]
    # one of them saying "every waiter" (no ids) makes the merged one say so
    assert wakechannel.payload_ids(wakechannel._merged([b"x", wakechannel.ids_payload(None) or b"-", b"y"])) is None


def test_wake_channel_works_beside_a_path_too_long_for_a_socket_address(tmp_path):
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    path = str(deep / "store.db")
    listener, sender = wakechannel.WakeChannel(path), wakechannel.WakeChannel(path)
    woken = threading.Event()
    try:
        if not listener.listen(wakechannel.MESSAGES, lambda payload: woken.set()):
            pytest.skip("no /proc/self/fd on this platform: a long path has no channel (waits poll)")
        sender.send(wakechannel.MESSAGES)
        assert woken.wait(10)
    finally:
        listener.close()
        sender.close()


def test_wake_channel_removes_the_socket_of_a_process_gone(tmp_path):
    import socket

    path = str(tmp_path / "store.db")
    directory = str(tmp_path / ".store.db.wake")
    os.makedirs(directory)
    stale = os.path.join(directory, "m-999999-dead")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(stale)
    sock.close()                                               # the file stays, nobody reads it
    sender = wakechannel.WakeChannel(path)
    sender.send(wakechannel.MESSAGES)
    assert not os.path.exists(stale)
    sender.close()


def test_a_worker_process_is_woken_by_a_send_from_another_process(tmp_path, qname):
    """A worker process serves a task sent here, and its result wakes this process's
    waiter, with the wake-up channel in place (polling would also get there: this checks
    the channel's files appear and the round trip works through them)."""
    url = f"sqlite:///{tmp_path}/q.db"
    queue = qname("wake")
    app = nbqueue.App(url, default_queue=queue)
    env = dict(os.environ, NBQUEUE_BROKER=url, NBQUEUE_BACKEND=url, NBQUEUE_DEFAULT_QUEUE=queue,
               PYTHONPATH=os.pathsep.join([os.path.join(ROOT, "tests"), ROOT]))
    command = [sys.executable, "-m", "nbqueue", "--log-level", "WARNING", "worker", "--app", "proc_tasks:app",
               "-c", "1"]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        first = app.send_task(app.signature("add", args=[1, 2]))
        assert first.get(timeout=60) == 3
        names = os.listdir(str(tmp_path / ".q.db.wake"))
        assert any(n.startswith("m-") for n in names)              # the worker process's reservers listen
        values = [app.send_task(app.signature("add", args=[i, i])).get(timeout=30) for i in range(20)]
        assert values == [2 * i for i in range(20)]
    finally:
        proc.terminate()
        proc.wait(30)
        app.close()


RESERVER = r"""
import sys
from nbqueue.drivers.sqlite.broker import SQLiteBroker

broker = SQLiteBroker(sys.argv[1], options={"poll_interval": 120})    # only a wake-up ends a wait in time
def say(*words):
    print(*words, flush=True)

say("got", *[d.message_id for d in broker.reserve(["q"], timeout=120, limit=1)])
sys.stdin.readline()
say("drained", *[d.message_id for d in broker.reserve(["q"], timeout=0, limit=2)])
for line in sys.stdin:
    say("got", *[d.message_id for d in broker.reserve(["q"], timeout=120, limit=10)])
"""


def _reservers_rows(broker) -> list:
    return broker.store.read("SELECT name FROM nbq_reservers")


def test_sends_wake_another_process_only_while_one_of_its_reservers_may_wait(tmp_path, monkeypatch):
    """Given a reserver in another process (polling every 120 s, so only a wake-up brings
    it a message in time), a send wakes it while it waits; once that process claimed a
    full batch with no reserver of its own waiting (a worker with a backlog), sends go
    without a wake-up datagram; when it waits again, a send wakes it again."""
    from nbqueue.broker import Outgoing
    from nbqueue.drivers.sqlite.broker import SQLiteBroker
    from nbqueue.testing import wait_for

    url = f"sqlite:///{tmp_path}/q.db"
    broker = SQLiteBroker(url)
    datagrams = []
    real_send = wakechannel.WakeChannel.send
    monkeypatch.setattr(wakechannel.WakeChannel, "send",
                        lambda self, kind, payload=b"": (datagrams.append(kind), real_send(self, kind, payload)))
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.Popen([sys.executable, "-c", RESERVER, url], env=env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)

    def publish(*ids):
        broker.publish_many([Outgoing(id=i, queue="q", body="{}") for i in ids])

    def messages_sent():
        return datagrams.count(wakechannel.MESSAGES)

    try:
        wait_for(lambda: _reservers_rows(broker), timeout=60, message="the reserver's row")
        publish("m1")
        assert proc.stdout.readline().split() == ["got", "m1"]
        assert messages_sent() == 1
        publish("m2", "m3")                         # its row is still there: it may wait again
        assert messages_sent() == 2
        proc.stdin.write("go\n")
        proc.stdin.flush()
        assert proc.stdout.readline().split() == ["drained", "m2", "m3"]
        assert _reservers_rows(broker) == []        # a full batch with none of its reservers waiting
        publish("m4")
        assert messages_sent() == 2                 # nobody waits there: no wake-up
        proc.stdin.write("go\n")
        proc.stdin.flush()
        assert proc.stdout.readline().split() == ["got", "m4"]     # found by its claim, which came first
        proc.stdin.write("go\n")
        proc.stdin.flush()
        wait_for(lambda: _reservers_rows(broker), timeout=60, message="the reserver's row again")
        publish("m5")
        assert messages_sent() == 3
        assert proc.stdout.readline().split() == ["got", "m5"]
    finally:
        proc.kill()
        proc.wait(30)
        broker.close()


def test_a_file_opened_afresh_gets_the_reservers_row_again(tmp_path):
    """The row that makes other processes wake this one's reservers is written again into a
    file that replaced the one it was in (this process knew it was there)."""
    from nbqueue.drivers.sqlite.broker import WAITERS, SQLiteBroker

    path = tmp_path / "q.db"
    broker = SQLiteBroker(f"sqlite:///{path}")
    assert broker.reserve(["q"], timeout=0.05) == []
    assert _reservers_rows(broker) == [(WAITERS.name,)] and WAITERS.marked(broker.path)
    for name in ("q.db", "q.db-wal", "q.db-shm"):
        if (tmp_path / name).exists():
            (tmp_path / name).unlink()
    broker.purge("q")                                   # a write: the store opens the new file
    assert not WAITERS.marked(broker.path)
    assert broker.reserve(["q"], timeout=0.05) == []
    assert _reservers_rows(broker) == [(WAITERS.name,)]
    broker.close()


def test_closing_the_broker_deletes_the_reservers_row_of_its_process(tmp_path):
    from nbqueue.drivers.sqlite.broker import SQLiteBroker

    url = f"sqlite:///{tmp_path}/q.db"
    broker = SQLiteBroker(url)
    assert broker.reserve(["q"], timeout=0.05) == []
    assert _reservers_rows(broker)
    broker.close()
    other = SQLiteBroker(url)
    assert _reservers_rows(other) == []
    other.close()


def test_the_reservers_row_of_a_process_gone_is_removed_by_upkeep(tmp_path):
    from nbqueue.drivers.sqlite.broker import WAITERS, SQLiteBroker

    broker = SQLiteBroker(f"sqlite:///{tmp_path}/q.db")
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait(30)
    broker.store.execute("INSERT INTO nbq_reservers(name, pid, since) VALUES (?, ?, 0)", ("gone", gone.pid))
    broker.store.execute("INSERT INTO nbq_reservers(name, pid, since) VALUES (?, ?, 0)", ("alive", os.getppid()))
    broker.store.execute("INSERT INTO nbq_reservers(name, pid, since) VALUES (?, ?, 0)", (WAITERS.name, os.getpid()))
    broker.upkeep()
    assert sorted(name for (name,) in _reservers_rows(broker)) == sorted(["alive", WAITERS.name])
    broker.close()


@pytest.mark.parametrize("options", [
    {},
    {"queue": "fast", "priority": 3, "retry_count": 2, "retry_timeout": 1.5, "time_limit": 9.0},
    {"retry_backoff": {"kind": "exponential", "base": 2, "max": 30}, "ignore_when_not_registered": True},
])
def test_delay_sends_the_envelope_a_signature_would(tmp_path, options):
    """``task.delay()`` builds its envelope from the task's template; it equals the one
    ``task.s()`` makes, but for the id and the time."""
    from nbqueue.signature import decode_body

    app = nbqueue.App(f"sqlite:///{tmp_path}/q.db", default_queue="q")
    if "retry_backoff" in options:
        from nbqueue.retry import Backoff

        options = dict(options, retry_backoff=Backoff(**options["retry_backoff"]))
    task = app.task(name="add", **options)(_add)
    sent = []
    app.publish = lambda records, outs: sent.extend(zip(records, outs))
    task.delay(1, y=[2, {"z": None}])
    app.send_task(task.s(1, y=[2, {"z": None}]))
    (fast_record, fast), (slow_record, slow) = sent
    strip = ("id", "created_at")
    fast_message, slow_message = decode_body(fast.body), decode_body(slow.body)
    def same(fast: dict, slow: dict) -> bool:
        return {k: v for k, v in fast.items() if k not in strip} == {k: v for k, v in slow.items() if k not in strip}

    assert same(fast_message, slow_message)
    assert same(fast_record, slow_record)
    assert (fast.queue, fast.priority, fast.eta) == (slow.queue, slow.priority, slow.eta)
    app.close()


def test_delay_with_an_argument_json_cannot_carry_names_it(tmp_path):
    app = nbqueue.App(f"sqlite:///{tmp_path}/q.db", default_queue="q")
    task = app.task(name="add")(_add)
    with pytest.raises(TypeError, match="argument"):
        task.delay(object(), 1)
    app.close()


def _anything(*args, **kwargs):
    return [args, kwargs]


@pytest.mark.parametrize("shipped", [False, True])
@pytest.mark.parametrize("args, kwargs", [
    ((1, 2), {}),
    ((), {}),
    ((1.5, "text", None, True, False, -(2**63), 2**63 - 1), {"y": -3, "z": "w"}),
    (("ünïcode", 1), {}),                       # not plain: the general path
    ((2**64, 1), {}),                           # beyond 64 bits: tagged
    ((float("nan"), float("inf")), {}),         # not finite: tagged
    ((b"bytes", [1, 2]), {"y": {"k": (1,)}}),
    ((1,), {"y": "sha256-" + "0" * 64}),
])
def test_delay_with_any_arguments_sends_what_a_signature_would(tmp_path, args, kwargs, shipped):
    """``task.delay()`` (plain arguments encoded in one go, the others through the
    serializer) writes the envelope, record and routing ``send_task(task.s())`` writes,
    but for the id and the time; a notebook's function carries its code either way."""
    from nbqueue.signature import decode_body

    app = nbqueue.App(f"sqlite:///{tmp_path}/q.db", default_queue="q")
    fn = _anything
    if shipped:
        namespace = {"__name__": "__main__"}
        exec("def anything(*args, **kwargs):\n    return [args, kwargs]", namespace)   # as a notebook cell would
        fn = namespace["anything"]
    task = app.task(name="anything", retry_count=1, priority=2)(fn)
    assert task.ship_code is shipped
    sent = []
    app.publish = lambda records, outs: sent.extend(zip(records, outs))
    handle = task.delay(*args, **kwargs)
    app.send_task(task.s(*args, **kwargs))
    (fast_record, fast), (slow_record, slow) = sent
    strip = ("id", "created_at")

    def same(fast: dict, slow: dict) -> bool:
        return {k: v for k, v in fast.items() if k not in strip} == {k: v for k, v in slow.items() if k not in strip}

    fast_message = decode_body(fast.body)
    assert same(fast_message, decode_body(slow.body)) and same(fast_record, slow_record)
    assert fast.message == fast_message and fast.id == fast_message["id"] == fast_record["id"] == handle.id
    assert fast_record["created_at"] == fast_message["created_at"]
    assert fast_record["args"] == json.dumps(fast_message["args"], separators=(",", ":"), ensure_ascii=False)
    assert json.loads(fast_record["kwargs"]) == fast_message["kwargs"]
    assert (fast.queue, fast.priority, fast.eta) == (slow.queue, slow.priority, slow.eta)
    assert ("code" in fast_message) is shipped and fast.queue == ("q.code" if shipped else "q") == fast_record["queue"]
    app.close()


def test_delay_checks_the_arguments_of_every_call(tmp_path):
    """The count of positional arguments a task takes is read once; every call is checked."""
    app = nbqueue.App(f"sqlite:///{tmp_path}/q.db", default_queue="q")
    task = app.task(name="add")(_add)
    task.delay(1, 2)
    for args, kwargs in [((1, 2, 3), {}), ((1,), {}), ((1,), {"z": 2}), ((), {})]:
        with pytest.raises(TypeError, match="task 'add' cannot take these arguments"):
            task.delay(*args, **kwargs)
    task.delay(1, y=2)
    loose = app.task(name="loose", typing=False)(_add)
    loose.delay(1, 2, 3)                        # typing=False: not checked
    assert app.worker().drain(timeout=10) == 3
    app.close()


def test_delay_links_a_payload_key_written_in_a_plain_argument(tmp_path, monkeypatch):
    """A plain string argument that reads like a payload key is handed to ``payloads.track``,
    as every other send's body is; other sends skip it."""
    from nbqueue import payloads

    app = nbqueue.App(f"sqlite:///{tmp_path}/q.db", default_queue="q")
    task = app.task(name="add")(_add)
    tracked = []
    monkeypatch.setattr(payloads, "track", lambda app, owner, *texts: tracked.append(owner))
    task.delay("plain", 1)
    assert tracked == []
    handle = task.delay(payloads.KEY_PREFIX + "0" * 64, 1)
    assert tracked == [handle.id]
    app.close()


@pytest.mark.parametrize("value", [5, -1.5, "text", None, True, 2**70, {"a": (1, 2)}, [1, "x"], float("nan")])
def test_get_returns_every_kind_of_value_as_it_was(tmp_path, value):
    app = nbqueue.App(f"sqlite:///{tmp_path}/q.db", default_queue="q")
    task = app.task(name="echo")(lambda v: v)
    handle = task.delay(value)
    assert app.worker().drain(timeout=10) == 1
    got = handle.get(timeout=5)
    assert got == value or got != got and value != value
    assert type(got) is type(value) and handle.get(timeout=5) is got     # read once, kept
    app.close()


def test_a_batch_writes_its_sends_when_it_ends(tmp_path):
    app = nbqueue.App(f"sqlite:///{tmp_path}/q.db", default_queue="q")
    task = app.task(name="add")(_add)
    with app.batch() as batch:
        handles = [task.delay(i, i) for i in range(5)]
        handles.append(app.send_task(task.s(10, 10)))
        with app.batch():
            handles.append(task.apply_async((20, 20)))
        assert len(batch) == 7
        assert app.backend.get(handles[0].id) is None           # nothing written yet
        with pytest.raises(nbqueue.ResultNotFound):
            handles[0].get(timeout=1)
    assert app.worker().drain(timeout=10) == 7
    assert [h.get(timeout=5) for h in handles] == [0, 2, 4, 6, 8, 20, 40]
    app.close()


def test_a_batch_that_raises_sends_nothing(tmp_path):
    app = nbqueue.App(f"sqlite:///{tmp_path}/q.db", default_queue="q")
    task = app.task(name="add")(_add)
    with pytest.raises(KeyError):
        with app.batch():
            handle = task.delay(1, 1)
            raise KeyError("stop")
    assert app.backend.get(handle.id) is None
    assert app.worker().drain(timeout=1) == 0
    task.delay(2, 2)                                           # outside a block: written at once
    assert app.worker().drain(timeout=5) == 1
    app.close()


def test_a_batch_on_rabbitmq_is_queued_when_it_ends(tmp_path, qname):
    from conftest import app_urls

    broker, backend = app_urls("amqp", tmp_path)
    app = nbqueue.App(broker, backend, default_queue=qname("batch"))
    task = app.task(name="add")(_add)
    try:
        with app.batch():
            handles = [task.delay(i, i) for i in range(300)]
        app.start_worker(concurrency=2)
        assert [h.get(timeout=60) for h in handles] == [2 * i for i in range(300)]
    finally:
        for worker in app.workers:
            worker.stop()
        app.broker.delete_queues(qname.made)
        app.close()


def new_threads(before: set, name: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t not in before and t.name == name]


def test_wake_channel_listener_thread_ends_when_its_socket_is_replaced_or_closed(tmp_path, monkeypatch):
    """A listener blocked on its socket ends when the channel binds a new socket (its file
    was removed) and when the channel closes: no thread outlives its socket."""
    monkeypatch.setattr(wakechannel, "RELIST", 0.0)
    before = set(threading.enumerate())
    channel = wakechannel.WakeChannel(str(tmp_path / "store.db"))
    try:
        if not channel.listen(wakechannel.MESSAGES, lambda payload: None):
            pytest.skip("no wake-up channel on this platform (waits poll)")
        [first] = new_threads(before, "nbqueue-wake-m")
        for name in os.listdir(channel.directory):
            os.unlink(os.path.join(channel.directory, name))
        assert channel.listen(wakechannel.MESSAGES, lambda payload: None)
        first.join(10)
        assert not first.is_alive()
        [second] = new_threads(before, "nbqueue-wake-m")
    finally:
        channel.close()
    second.join(10)
    assert not second.is_alive()
    assert not os.listdir(channel.directory)


def test_wake_listeners_of_a_store_file_end_with_the_last_app_on_it(tmp_path):
    """Each SQLite App waits through the process's channel of its file (a reserver of one, a
    result waiter of the other here); closing one App leaves the listeners, closing the last
    one ends them."""
    url = f"sqlite:///{tmp_path}/store.db"
    before = set(threading.enumerate())
    apps = [nbqueue.App(url), nbqueue.App(url)]
    assert apps[0].broker.reserve(["nothing-here"], timeout=0.05) == []
    pending = apps[1].send(apps[1].signature("add", args=(1, 2)))       # no worker runs it
    with pytest.raises(TimeoutError):
        pending.get(timeout=0.05)
    listeners = new_threads(before, "nbqueue-wake-m") + new_threads(before, "nbqueue-wake-r")
    assert sorted(t.name for t in listeners) == ["nbqueue-wake-m", "nbqueue-wake-r"]
    apps[0].close()
    assert all(t.is_alive() for t in listeners)
    apps[1].close()
    for t in listeners:
        t.join(10)
    assert not any(t.is_alive() for t in listeners)


@pytest.mark.parametrize("depth", [0, 60])
def test_wake_channel_listens_again_after_its_directory_was_removed(tmp_path, monkeypatch, depth):
    """``rm -rf .nbqueue`` removes the sockets too: the next wait binds a new one, in the
    directory now at the path (also through /proc/self/fd for a long path)."""
    import shutil

    monkeypatch.setattr(wakechannel, "RELIST", 0.0)
    monkeypatch.setattr(wakechannel, "RESTAT", 0.0)
    base = tmp_path / ("d" * depth) / ("e" * depth) if depth else tmp_path
    base.mkdir(parents=True, exist_ok=True)
    path = str(base / "store.db")
    listener, sender = wakechannel.WakeChannel(path), wakechannel.WakeChannel(path)
    woken = threading.Event()
    try:
        if not listener.listen(wakechannel.MESSAGES, lambda payload: woken.set()):
            pytest.skip("no wake-up channel for this path on this platform (waits poll)")
        shutil.rmtree(listener.directory)
        sender.send(wakechannel.MESSAGES)                       # nobody to reach: the directory is gone
        assert listener.listen(wakechannel.MESSAGES, lambda payload: woken.set())
        assert os.listdir(listener.directory)
        sender.send(wakechannel.MESSAGES)
        assert woken.wait(10)
    finally:
        listener.close()
        sender.close()
