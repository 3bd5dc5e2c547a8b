"""The result cache (cache.py): hits, misses, shared runs, clearing, bad input; on every kind of store.

Task functions are defined the way a notebook defines them (``exec`` in a ``__main__``
namespace), so the globals they read count as in a kernel. They count their runs in a
file whose path is an argument (a counter they read would be part of their key).
"""
from __future__ import annotations

import threading
import uuid
import warnings

import pytest

import nbqueue
from nbqueue import cache, states
from nbqueue.clock import ManualClock
from nbqueue.testing import wait_for

from conftest import private_redis_url, require_server, session_server_url

KINDS = ["sqlite", "memory", "redis", "amqp-results"]


def urls(kind: str, tmp_path) -> tuple[str, str]:
    if kind == "sqlite":
        url = f"sqlite:///{tmp_path}/nbqueue.db"
        return url, url
    if kind == "memory":
        url = f"memory://cache-{uuid.uuid4().hex[:12]}"
        return url, url
    if kind == "redis":
        require_server("Redis", "127.0.0.1", 6379)
        url = private_redis_url()
        return url, url
    return f"sqlite:///{tmp_path}/broker.db", session_server_url("amqp-results")   # a key-value backend over RabbitMQ


@pytest.fixture(params=KINDS)
def store(request, tmp_path):
    """(broker, backend) URLs of one fresh store; the Apps made with ``make`` are closed after."""
    broker, backend = urls(request.param, tmp_path)
    made = []

    def make(**options):
        app = nbqueue.App(broker, backend, default_queue=f"q{uuid.uuid4().hex[:8]}", **options)
        made.append(app)
        return app

    yield make
    for app in made:
        for worker in list(app.workers):
            worker.stop(wait=True, timeout=10)
    if made and request.param == "amqp-results":
        made[0].backend.delete_queues()          # every queue of this test's key prefix
    for app in made:
        app.close()


NOTEBOOK = '''
import os, time
FACTOR = 10

def helper(x):
    return x * FACTOR

def compute(x, log):
    with open(log, "a") as fh:
        fh.write("run\\n")
    while os.path.exists(log + ".hold"):
        time.sleep(0.01)
    return helper(x)

def explode(log):
    with open(log, "a") as fh:
        fh.write("run\\n")
    raise ValueError("no")
'''


def notebook(source: str = NOTEBOOK) -> dict:
    """A namespace of functions defined as a notebook cell defines them (module ``__main__``)."""
    namespace = {"__name__": "__main__"}
    exec(compile(source, "<cell>", "exec"), namespace)
    return namespace


class Opaque:
    """An object only pickle carries (its pickle is not a stable hash)."""


def runs(log) -> int:
    return log.read_text().count("run") if log.exists() else 0


def test_second_send_is_a_hit_marked_in_its_record(store, tmp_path):
    app = store()
    ns = notebook()
    compute = app.task(ns["compute"], name="compute", cache=True)
    app.start_worker()
    log = tmp_path / "log"
    first = compute.delay(2, str(log))
    assert first.get(timeout=20) == 20
    second = compute.delay(2, str(log))
    assert second.state == states.SUCCESS                      # final when send returns: nothing ran
    assert second.get(timeout=1) == 20 and runs(log) == 1
    assert app.cache_info(second.id) == {"hit": True, "from": first.id, "key": first.cache["key"]}
    assert app.cache_info(first.id) == {"hit": False, "key": first.cache["key"]}
    other = compute.delay(3, str(log))                         # other arguments: another key
    assert other.get(timeout=20) == 30 and runs(log) == 2
    kwargs = compute.apply_async(kwargs={"log": str(log), "x": 3})   # keyword arguments by name
    assert kwargs.get(timeout=20) == 30 and runs(log) == 3     # (a call by keyword is another key than by position)
    again = compute.apply_async(kwargs={"x": 3, "log": str(log)})
    assert app.cache_info(again.id)["hit"] is True and runs(log) == 3


def test_changing_a_global_or_a_called_function_or_the_code_misses(store, tmp_path):
    app = store()
    ns = notebook()
    compute = app.task(ns["compute"], name="compute", cache=True)
    app.start_worker()
    log = str(tmp_path / "log")
    assert compute.delay(1, log).get(timeout=20) == 10
    ns["FACTOR"] = 11                                          # a global the called helper reads
    changed = compute.delay(1, log)
    assert changed.get(timeout=20) == 11 and app.cache_info(changed.id)["hit"] is False
    exec("def helper(x):\n    return x * FACTOR + 1\n", ns)  # the helper redefined
    assert compute.delay(1, log).get(timeout=20) == 12
    exec("def compute(x, log):\n    return -helper(x)\n", ns)   # the task itself redefined
    compute = app.task(ns["compute"], name="compute", cache=True)
    redefined = compute.delay(1, log)
    assert redefined.get(timeout=20) == -12 and app.cache_info(redefined.id)["hit"] is False
    ns["FACTOR"] = 10
    exec("def helper(x):\n    return x * FACTOR\n", ns)
    back = compute.delay(1, log)                               # the same code and values as before: a hit
    assert app.cache_info(back.id)["hit"] is False             # (this compute is new code, so it runs) ...
    back.get(timeout=20)
    assert app.cache_info(compute.delay(1, log).id)["hit"] is True   # ... and then hits


def test_a_failure_is_never_cached(store, tmp_path):
    app = store()
    explode = app.task(notebook()["explode"], name="explode", cache=True)
    app.start_worker()
    log = tmp_path / "log"
    for attempt in (1, 2):
        with pytest.raises(nbqueue.TaskFailed):
            explode.delay(str(log)).get(timeout=20)
        assert runs(log) == attempt


def test_concurrent_sends_of_one_key_run_it_once(store, tmp_path):
    app = store()
    compute = app.task(notebook()["compute"], name="compute", cache=True)
    app.start_worker(concurrency=4)
    log = tmp_path / "log"
    hold = tmp_path / "log.hold"
    hold.write_text("")                                        # the run waits until the file is gone
    barrier = threading.Barrier(4)
    results = []

    def send():
        barrier.wait()
        results.append(compute.delay(7, str(log)))

    threads = [threading.Thread(target=send) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    wait_for(lambda: runs(log) >= 1, timeout=20)
    hold.unlink()
    assert [r.get(timeout=20) for r in results] == [70] * 4
    assert runs(log) == 1
    infos = [app.cache_info(r.id) for r in results]
    leaders = [r.id for r, i in zip(results, infos) if "waiting_for" not in i]
    assert len(leaders) == 1 and all(i.get("waiting_for") == leaders[0] for i in infos if "waiting_for" in i)
    stats = app.status()["cache"]
    assert stats["misses"] == 1 and stats["shared"] == 3 and stats["size"] == 1


def test_two_apps_on_one_store_share_the_cache(store, tmp_path):
    """Two kernels (or a kernel and a CLI worker's producer) on one store: one runs, the other hits."""
    first, second = store(), store()
    ns = notebook()
    for app in (first, second):
        app.task(ns["compute"], name="compute", cache=True)
    first.start_worker()
    log = str(tmp_path / "log")
    ran = first.registry["compute"].delay(4, log)
    assert ran.get(timeout=20) == 40
    hit = second.registry["compute"].delay(4, log)
    assert hit.get(timeout=1) == 40 and second.cache_info(hit.id)["from"] == ran.id


def test_cache_clear_and_the_figures_in_status(store, tmp_path):
    app = store()
    ns = notebook()
    compute = app.task(ns["compute"], name="compute", cache=True)
    other = app.task(ns["helper"], name="helper", cache=True)
    app.start_worker()
    log = tmp_path / "log"
    compute.delay(1, str(log)).get(timeout=20)
    compute.delay(1, str(log)).get(timeout=20)
    other.delay(1).get(timeout=20)
    stats = app.status()["cache"]
    assert (stats["size"], stats["hits"], stats["misses"]) == (2, 1, 2) and stats["hit_rate"] == pytest.approx(1 / 3)
    assert app.cache_clear(task="helper") == 1
    assert app.status()["cache"]["size"] == 1
    assert app.cache_clear() == 1
    assert app.status()["cache"] == {"size": 0, "hits": 0, "misses": 0, "shared": 0, "hit_rate": None}
    compute.delay(1, str(log)).get(timeout=20)
    assert runs(log) == 2                                      # cleared: it ran again


def test_a_cached_run_whose_record_is_gone_is_a_miss(store, tmp_path):
    app = store()
    compute = app.task(notebook()["compute"], name="compute", cache=True)
    app.start_worker()
    log = tmp_path / "log"
    first = compute.delay(5, str(log))
    first.get(timeout=20)
    first.forget()
    again = compute.delay(5, str(log))
    assert again.get(timeout=20) == 50 and runs(log) == 2 and app.cache_info(again.id)["hit"] is False


def test_a_cached_result_that_no_longer_reads_is_a_miss(tmp_path):
    app = nbqueue.App(f"sqlite:///{tmp_path}/nb.db")
    compute = app.task(notebook()["compute"], name="compute", cache=True)
    app.start_worker()
    log = tmp_path / "log"
    first = compute.delay(5, str(log))
    first.get(timeout=20)
    with app.backend.store.write() as conn:                   # its stored value refers to a payload that is gone
        conn.execute("UPDATE nbq_results SET result = ? WHERE id = ?",
                     ('{"__nbq__":"blob","v":{"codec":"arrow","b64":"bm9wZQ=="}}', first.id))
    again = compute.delay(5, str(log))
    assert again.get(timeout=20) == 50 and runs(log) == 2
    app.close()


def test_expiry_in_the_cache_option(tmp_path):
    clock = ManualClock(start=1_800_000_000.0)
    app = nbqueue.App(f"sqlite:///{tmp_path}/nb.db", clock=clock)
    compute = app.task(notebook()["compute"], name="compute", cache="1h")
    worker = app.worker()
    log = tmp_path / "log"
    compute.delay(1, str(log))
    worker.drain()
    clock.advance(1800)
    assert app.cache_info(compute.delay(1, str(log)).id)["hit"] is True
    clock.advance(1801)
    late = compute.delay(1, str(log))
    assert app.cache_info(late.id)["hit"] is False
    worker.drain()
    assert runs(log) == 2
    app.close()


def test_unstable_arguments_and_globals_turn_the_cache_off_naming_them(tmp_path):
    app = nbqueue.App(f"sqlite:///{tmp_path}/nb.db", serializer="pickle")
    ns = notebook("import threading\nLOCK = threading.Lock()\ndef locked(x):\n    with LOCK:\n        return 1\n"
                  "def plain(x):\n    return 2\n")
    locked = app.task(ns["locked"], name="locked", cache=True)
    plain = app.task(ns["plain"], name="plain", cache=True)
    app.start_worker()
    unstable = r"argument 1 \('x'\) of task 'plain' cannot be hashed stably \(a pickled value"
    with pytest.warns(cache.CacheWarning, match=unstable):
        first = plain.delay(Opaque())
    assert first.get(timeout=20) == 2 and app.cache_info(first.id) is None
    with pytest.warns(cache.CacheWarning, match=r"global 'LOCK' read by task 'locked' cannot be hashed stably"):
        assert locked.delay(1).get(timeout=20) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert plain.delay({3, "a", (1, 2)}).get(timeout=20) == 2      # a set: hashed in a stable order
        assert app.cache_info(plain.delay({(1, 2), "a", 3}).id)["hit"] is True
    app.close()


def test_cache_option_is_checked_when_the_task_is_registered(tmp_path):
    app = nbqueue.App(f"sqlite:///{tmp_path}/nb.db")
    with pytest.raises(ValueError, match="cache='soon'"):
        app.task(lambda: 1, name="a", cache="soon")
    with pytest.raises(TypeError, match="cache must be"):
        app.task(lambda: 1, name="b", cache=[1])
    assert cache.policy("7d") == 7 * 86400 and cache.policy("1h30m") == 5400 and cache.policy(True) is None
    assert cache.policy(False) is False and cache.policy(90) == 90.0
    app.close()


def test_code_hash_ignores_where_the_cell_sits_but_not_what_it_says():
    one = notebook("def f(x):\n    return x + 1\n")["f"]
    moved = notebook("\n\n\ndef f(x):\n    return x + 1\n")["f"]
    other = notebook("def f(x):\n    return x + 2\n")["f"]
    assert cache.code_hash(one) == cache.code_hash(moved) != cache.code_hash(other)
