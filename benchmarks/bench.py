"""nbqueue benchmarks: figures printed beside floors measured in the same run.

The machine is shared and noisy, so every figure is quoted as a ratio against a floor
(a plain queue on the same store, written here) measured in the same process run.

    .venv/bin/python benchmarks/bench.py                  # everything available
    .venv/bin/python benchmarks/bench.py sqlite memory    # some stores only
    N=2000 .venv/bin/python benchmarks/bench.py sqlite    # fewer tasks
    .venv/bin/python benchmarks/bench.py sqs memcache     # SQS on moto's local server, memcached (bench_stores.py)

Workloads: end-to-end throughput of N no-op tasks (worker in this process with 1 and
4 threads, and a separate worker process), sequential round-trip latency (p50, p99),
a chord of 1,000 members with a summing callback, a chain of 100 steps.
"""
from __future__ import annotations

import atexit
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

import nbqueue  # noqa: E402

N = int(os.environ.get("N", "5000"))
LAT_N = int(os.environ.get("LAT_N", "300"))
REDIS_URL = os.environ.get("BENCH_REDIS", "redis://127.0.0.1:6379/14")
#: every Redis key this run writes starts with it (the floors' keys and nbqueue's key_prefix): the
#: server may be shared, so the run deletes its own keys and never flushes a database
RUN_PREFIX = f"bench-{os.getpid()}-{int(time.time())}"
FLOOR = f"{RUN_PREFIX}:floor:"
FLOOR_B = FLOOR.encode()


def clear_run_keys(url: str) -> None:
    """Delete this run's Redis keys (floors and nbqueue's, under RUN_PREFIX)."""
    import redis

    r = redis.Redis.from_url(url)
    for keys in _batches(r.scan_iter(match=f"{RUN_PREFIX}*", count=1000), 500):
        r.delete(*keys)


def _clear_at_exit() -> None:
    try:
        clear_run_keys(REDIS_URL)
    except Exception:  # no Redis here: nothing was written
        pass


atexit.register(_clear_at_exit)


def _batches(items, n: int):
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch
AMQP_URL = os.environ.get("BENCH_AMQP", "amqp://guest:guest@127.0.0.1:5672/%2F")


def listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def row(label, value, unit, floor=None):
    """A figure, and its ratio to the floor (throughput: higher is better; times: lower)."""
    ratio = ""
    if floor:
        ratio = f"  ({value / floor:.2f}x floor)"
    print(f"  {label:<44} {value:>10.1f} {unit}{ratio}", flush=True)


# -- floors: plain queues written here ----------------------------------------------------------

def sqlite_floor(path: str, n: int) -> tuple[float, list[float]]:
    """A plain sqlite3 queue: WAL, synchronous=NORMAL, one UPDATE ... RETURNING claim per task,
    the result written to a table and the message deleted. Returns (tasks/s, latencies)."""
    import threading

    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("CREATE TABLE IF NOT EXISTS q (id INTEGER PRIMARY KEY AUTOINCREMENT, body TEXT, state INT DEFAULT 0)")
    conn.execute("CREATE TABLE IF NOT EXISTS r (id INTEGER PRIMARY KEY, result TEXT)")

    def consume(count):
        c = sqlite3.connect(path, isolation_level=None)
        c.execute("PRAGMA synchronous=NORMAL")
        done = 0
        while done < count:
            row_ = c.execute(
                "UPDATE q SET state = 1 WHERE id = (SELECT id FROM q WHERE state = 0 ORDER BY id LIMIT 1) "
                "RETURNING id, body"
            ).fetchone()
            if row_ is None:
                continue
            c.execute("BEGIN IMMEDIATE")
            c.execute("INSERT INTO r(id, result) VALUES (?, ?)", (row_[0], row_[1]))
            c.execute("DELETE FROM q WHERE id = ?", (row_[0],))
            c.execute("COMMIT")
            done += 1
        c.close()

    started = time.perf_counter()
    conn.execute("BEGIN")
    conn.executemany("INSERT INTO q(body) VALUES (?)", [(f'{{"i": {i}}}',) for i in range(n)])
    conn.execute("COMMIT")
    consume(n)
    throughput = n / (time.perf_counter() - started)

    # round trip: publish one, a consumer thread claims and answers, the producer polls the result
    lat = []
    stop = threading.Event()

    def server():
        c = sqlite3.connect(path, isolation_level=None)
        c.execute("PRAGMA synchronous=NORMAL")
        while not stop.is_set():
            row_ = c.execute(
                "UPDATE q SET state = 1 WHERE id = (SELECT id FROM q WHERE state = 0 ORDER BY id LIMIT 1) "
                "RETURNING id, body"
            ).fetchone()
            if row_ is None:
                time.sleep(0.0002)
                continue
            c.execute("BEGIN IMMEDIATE")
            c.execute("INSERT INTO r(id, result) VALUES (?, ?)", (row_[0], row_[1]))
            c.execute("DELETE FROM q WHERE id = ?", (row_[0],))
            c.execute("COMMIT")

    t = threading.Thread(target=server, daemon=True)
    t.start()
    for i in range(LAT_N):
        t0 = time.perf_counter()
        cur = conn.execute("INSERT INTO q(body) VALUES ('x') RETURNING id")
        rid = cur.fetchone()[0]
        while conn.execute("SELECT 1 FROM r WHERE id = ?", (rid,)).fetchone() is None:
            time.sleep(0.0002)
        lat.append(time.perf_counter() - t0)
    stop.set()
    t.join()
    conn.close()
    return throughput, lat


def redis_floor(url: str, n: int) -> tuple[float, list[float]]:
    """A plain redis-py queue: LPUSH/BRPOP, results returned through a per-task list."""
    import threading

    import redis

    r = redis.Redis.from_url(url)
    clear_run_keys(url)

    def consume(count):
        c = redis.Redis.from_url(url)
        for _ in range(count):
            _, body = c.brpop(FLOOR + "q")
            c.lpush(FLOOR_B + b"r:" + body, body)

    started = time.perf_counter()
    pipe = r.pipeline(transaction=False)
    for i in range(n):
        pipe.lpush(FLOOR + "q", str(i))
    pipe.execute()
    consume(n)
    throughput = n / (time.perf_counter() - started)

    stop = threading.Event()

    def server():
        c = redis.Redis.from_url(url)
        while not stop.is_set():
            got = c.brpop(FLOOR + "q", timeout=0.2)
            if got:
                c.lpush(FLOOR_B + b"r:" + got[1], got[1])

    t = threading.Thread(target=server, daemon=True)
    t.start()
    lat = []
    for i in range(LAT_N):
        key = f"lat{i}"
        t0 = time.perf_counter()
        r.lpush(FLOOR + "q", key)
        r.brpop(f"{FLOOR}r:{key}", timeout=5)
        lat.append(time.perf_counter() - t0)
    stop.set()
    t.join()
    clear_run_keys(url)
    return throughput, lat


def sqlite_fanin_floors(path: str, members: int = 1000, steps: int = 100) -> tuple[float, float]:
    """Plain sqlite3 versions of the chord and chain workloads: (chord s, chain s).

    Chord: the members are queued in one transaction; each is claimed with UPDATE ...
    RETURNING, its result written and a counter bumped in one transaction; the member
    that completes the count queues the callback, which sums the results. Chain: each
    step is claimed, its result written and the next step queued in one transaction."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("CREATE TABLE q (id INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT, arg INT, state INT DEFAULT 0)")
    conn.execute("CREATE TABLE r (id INTEGER PRIMARY KEY, value INT)")
    conn.execute("CREATE TABLE g (id INTEGER PRIMARY KEY, done INT, total INT)")

    def claim():
        return conn.execute(
            "UPDATE q SET state = 1 WHERE id = (SELECT id FROM q WHERE state = 0 ORDER BY id LIMIT 1) "
            "RETURNING id, kind, arg"
        ).fetchone()

    started = time.perf_counter()
    conn.execute("BEGIN")
    conn.execute("INSERT INTO g VALUES (1, 0, ?)", (members,))
    conn.executemany("INSERT INTO q(kind, arg) VALUES ('member', ?)", [(i,) for i in range(members)])
    conn.execute("COMMIT")
    total = None
    while total is None:
        msg = claim()
        if msg is None:
            continue
        mid, kind, arg = msg
        conn.execute("BEGIN IMMEDIATE")
        if kind == "member":
            conn.execute("INSERT INTO r VALUES (?, ?)", (mid, arg + arg))
            done, want = conn.execute("UPDATE g SET done = done + 1 WHERE id = 1 RETURNING done, total").fetchone()
            if done == want:
                conn.execute("INSERT INTO q(kind, arg) VALUES ('callback', 0)")
        else:
            total = conn.execute("SELECT SUM(value) FROM r").fetchone()[0]
        conn.execute("DELETE FROM q WHERE id = ?", (mid,))
        conn.execute("COMMIT")
    chord = time.perf_counter() - started
    assert total == sum(2 * i for i in range(members)), total

    started = time.perf_counter()
    conn.execute("INSERT INTO q(kind, arg) VALUES ('step', 1)")
    value = 0
    for _ in range(steps):
        mid, kind, arg = claim()
        value = arg
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("INSERT OR REPLACE INTO r VALUES (?, ?)", (mid, arg))
        conn.execute("INSERT INTO q(kind, arg) VALUES ('step', ?)", (arg + 1,))
        conn.execute("DELETE FROM q WHERE id = ?", (mid,))
        conn.execute("COMMIT")
    chain = time.perf_counter() - started
    assert value == steps, value
    conn.close()
    return chord, chain


def redis_fanin_floors(url: str, members: int = 1000, steps: int = 100) -> tuple[float, float]:
    """Plain redis-py versions of the chord and chain workloads: LPUSH/BRPOP messages,
    results in a hash, an INCR counter whose last member pushes the callback."""
    import redis

    r = redis.Redis.from_url(url)
    clear_run_keys(url)
    started = time.perf_counter()
    pipe = r.pipeline(transaction=False)
    for i in range(members):
        pipe.lpush(FLOOR + "q", f"member:{i}")
    pipe.execute()
    total = None
    while total is None:
        _, body = r.brpop(FLOOR + "q")
        kind, arg = body.decode().split(":")
        if kind == "member":
            pipe = r.pipeline(transaction=False)
            pipe.hset(FLOOR + "r", arg, int(arg) * 2)
            pipe.incr(FLOOR + "done")
            done = pipe.execute()[1]
            if done == members:
                r.lpush(FLOOR + "q", "callback:0")
        else:
            total = sum(int(v) for v in r.hvals(FLOOR + "r"))
    chord = time.perf_counter() - started
    assert total == sum(2 * i for i in range(members)), total

    started = time.perf_counter()
    r.lpush(FLOOR + "q", "step:1")
    value = 0
    for _ in range(steps):
        _, body = r.brpop(FLOOR + "q")
        value = int(body.decode().split(":")[1])
        pipe = r.pipeline(transaction=False)
        pipe.hset(FLOOR + "chain", value, value)
        pipe.lpush(FLOOR + "q", f"step:{value + 1}")
        pipe.execute()
    chain = time.perf_counter() - started
    assert value == steps, value
    clear_run_keys(url)
    return chord, chain


# -- nbqueue ------------------------------------------------------------------------------------------

def run_in_process(app, n: int, threads: int) -> float:
    sigs = [app.signature("noop", args=[i]) for i in range(n)]
    started = time.perf_counter()
    results = app.send_many(sigs)
    worker = app.start_worker(concurrency=threads, prefetch=16)
    app.backend.wait([r.id for r in results], timeout=600)
    elapsed = time.perf_counter() - started
    worker.stop()
    return n / elapsed


def run_process_worker(app, broker, backend, queue, n: int, threads: int) -> float:
    env = dict(os.environ, NBQUEUE_BROKER=broker, NBQUEUE_BACKEND=backend or "", NBQUEUE_DEFAULT_QUEUE=queue,
               PYTHONPATH=os.pathsep.join([HERE, ROOT]))
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "nbqueue",
            "--log-level",
            "WARNING",
            "worker",
            "--app",
            "bench_tasks:app",
            "-c",
            str(threads),
            "--prefetch",
            "16",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        # wait until the worker has registered its heartbeat
        deadline = time.time() + 30
        while time.time() < deadline and not app.backend.workers():
            time.sleep(0.05)
        sigs = [app.signature("noop", args=[i]) for i in range(n)]
        started = time.perf_counter()
        results = app.send_many(sigs)
        app.backend.wait([r.id for r in results], timeout=600)
        return n / (time.perf_counter() - started)
    finally:
        proc.terminate()
        proc.wait(30)


def ready_worker(app, **options):
    """A worker started in this process, timed only once it has registered (as a kernel's would be)."""
    worker = app.start_worker(**options)
    deadline = time.time() + 10
    while time.time() < deadline and not any(w.get("worker_id") == worker.name for w in app.backend.workers()):
        time.sleep(0.01)
    return worker


def latency(app, n: int) -> list[float]:
    worker = ready_worker(app, concurrency=1, prefetch=1)
    lat = []
    for i in range(n):
        t0 = time.perf_counter()
        app.send_task(app.signature("noop", args=[i])).get(timeout=10)
        lat.append(time.perf_counter() - t0)
    worker.stop()
    return lat


def chord_time(app, members: int = 1000) -> float:
    worker = ready_worker(app, concurrency=1, prefetch=64)
    started = time.perf_counter()
    res = app.send_chord(
        nbqueue.chord(
            nbqueue.group(*[app.signature("add", args=[i, i]) for i in range(members)]), app.signature("total")
        )
    )
    value = res.get(timeout=600)
    elapsed = time.perf_counter() - started
    worker.stop()
    assert value == sum(2 * i for i in range(members)), value
    return elapsed


def chain_time(app, steps: int = 100) -> float:
    worker = ready_worker(app, concurrency=1, prefetch=1)
    started = time.perf_counter()
    res = app.send_chain(
        nbqueue.chain(app.signature("add", args=[0, 1]), *[app.signature("add", args=[1]) for _ in range(steps - 1)])
    )
    value = res.get(timeout=600)
    elapsed = time.perf_counter() - started
    worker.stop()
    assert value == steps, value
    return elapsed


def fresh_app(broker, backend, queue):
    from bench_tasks import add, noop, total

    app = nbqueue.App(broker, backend, default_queue=queue)
    app.register_tasks({"noop": noop.fn, "add": add.fn, "total": total.fn})
    return app


def bench_store(kind: str, tmp: str) -> None:
    queue = f"bench-{uuid.uuid4().hex[:6]}"
    if kind == "sqlite":
        def urls():
            path = os.path.join(tmp, f"{uuid.uuid4().hex[:6]}.db")
            return f"sqlite:///{path}", None
        floor_tp, floor_lat = sqlite_floor(os.path.join(tmp, "floor.db"), N)
        floor_name = "plain sqlite3 (UPDATE ... RETURNING)"
    elif kind == "memory":
        def urls():
            return f"memory://bench-{uuid.uuid4().hex[:6]}", None
        floor_tp = floor_lat = None
        floor_name = None
    elif kind == "redis":
        def urls():

            clear_run_keys(REDIS_URL)
            sep = "&" if "?" in REDIS_URL else "?"
            return f"{REDIS_URL}{sep}key_prefix={RUN_PREFIX}", None
        floor_tp, floor_lat = redis_floor(REDIS_URL, N)
        floor_name = "plain redis-py (LPUSH/BRPOP)"
    elif kind == "amqp":
        from bench_amqp import amqp_floor

        def urls():
            return AMQP_URL, f"sqlite:///{os.path.join(tmp, uuid.uuid4().hex[:6] + '.db')}"
        floor_tp, floor_lat = amqp_floor(AMQP_URL, N), None
        floor_name = "plain pika (confirms + acks)"
    else:
        raise SystemExit(f"unknown store {kind}")

    print(f"\n== {kind}: N={N} no-op tasks", flush=True)
    if floor_tp:
        row(f"floor: {floor_name}", floor_tp, "tasks/s")
    for threads in (1, 4):
        broker, backend = urls()
        app = fresh_app(broker, backend, queue)
        row(f"nbqueue, worker in process, {threads} thread(s)", run_in_process(app, N, threads), "tasks/s", floor_tp)
        app.close()
    if kind != "memory":
        broker, backend = urls()
        app = fresh_app(broker, backend, queue)
        row(
            "nbqueue, worker process, 4 threads",
            run_process_worker(app, broker, backend, queue, N, 4),
            "tasks/s",
            floor_tp,
        )
        if kind == "amqp":
            app.broker.delete_queues([queue])
        app.close()
    broker, backend = urls()
    app = fresh_app(broker, backend, queue)
    lat = latency(app, LAT_N)
    if floor_lat:
        row("floor round trip p50", pct(floor_lat, 0.5) * 1e3, "ms")
        row("floor round trip p99", pct(floor_lat, 0.99) * 1e3, "ms")
    row(
        "nbqueue round trip p50 (in-process worker)",
        pct(lat, 0.5) * 1e3,
        "ms",
        pct(floor_lat, 0.5) * 1e3 if floor_lat else None,
    )
    row(
        "nbqueue round trip p99 (in-process worker)",
        pct(lat, 0.99) * 1e3,
        "ms",
        pct(floor_lat, 0.99) * 1e3 if floor_lat else None,
    )
    fanin = None
    if kind == "sqlite":
        fanin = sqlite_fanin_floors(os.path.join(tmp, "fanin-floor.db"))
    elif kind == "redis":
        fanin = redis_fanin_floors(REDIS_URL)
    if fanin:
        row("floor: chord of 1,000 members", fanin[0] * 1e3, "ms")
        row("floor: chain of 100 steps", fanin[1] * 1e3, "ms")
    if kind == "amqp":
        import importlib.util

        from bench_dramatiq import dramatiq_throughput

        if importlib.util.find_spec("dramatiq") is None:
            print("  (Dramatiq not installed: `pip install -e '.[bench]'` to measure it beside nbqueue)")
        else:
            row("dramatiq, worker process, 4 threads, confirms", dramatiq_throughput(AMQP_URL, N), "tasks/s", floor_tp)
            row(
                "dramatiq, worker process, 4 threads, no confirms",
                dramatiq_throughput(AMQP_URL, N, confirm=False),
                "tasks/s",
                floor_tp,
            )
    row("chord of 1,000 members + summing callback", chord_time(app) * 1e3, "ms", fanin[0] * 1e3 if fanin else None)
    row("chain of 100 steps", chain_time(app) * 1e3, "ms", fanin[1] * 1e3 if fanin else None)
    if kind == "amqp":
        app.broker.delete_queues([queue])
    app.close()


def bench_sqs(tmp: str) -> None:
    """The SQS broker (results in SQLite) beside plain boto3 on the same local endpoint."""
    import bench_stores as bs

    url = bs.sqs_url()
    if url is None:
        return
    n, queue = bs.N_SQS, f"bench-{uuid.uuid4().hex[:6]}"
    print(f"\n== sqs (moto's server on 127.0.0.1; results in SQLite): N={n} no-op tasks", flush=True)
    floor_tp, floor_lat = bs.sqs_floor(url, n, bs.LAT_SQS)
    row("floor: plain boto3 (batch send/receive/delete)", floor_tp, "tasks/s")
    for threads in (1, 4):
        app = fresh_app(url, f"sqlite:///{os.path.join(tmp, uuid.uuid4().hex[:6] + '.db')}", queue)
        row(f"nbqueue, worker in process, {threads} thread(s)", run_in_process(app, n, threads), "tasks/s", floor_tp)
        app.close()
    app = fresh_app(url, f"sqlite:///{os.path.join(tmp, uuid.uuid4().hex[:6] + '.db')}", queue)
    lat = latency(app, bs.LAT_SQS)
    row("floor round trip p50 (send, receive, delete)", pct(floor_lat, 0.5) * 1e3, "ms")
    row("floor round trip p99", pct(floor_lat, 0.99) * 1e3, "ms")
    row("nbqueue round trip p50 (in-process worker)", pct(lat, 0.5) * 1e3, "ms", pct(floor_lat, 0.5) * 1e3)
    row("nbqueue round trip p99 (in-process worker)", pct(lat, 0.99) * 1e3, "ms", pct(floor_lat, 0.99) * 1e3)
    app.broker.delete_queues([queue])
    app.close()


def bench_memcache(tmp: str) -> None:
    """The Memcache result backend beside plain pymemcache set/get on the same server."""
    import bench_stores as bs

    address = bs.memcache_address()
    if address is None:
        return
    url = f"memcache://{address[0]}:{address[1]}"
    n = bs.N_MEMCACHE
    print(f"\n== memcache (memcached on 127.0.0.1): N={n} task records", flush=True)
    floor_tp, floor_lat = bs.memcache_floor(address, n)
    row("floor: plain pymemcache (set + get per task)", floor_tp, "tasks/s")
    tp, lat = bs.memcache_backend_life(url, n)
    row("nbqueue backend: create, begin, store, get", tp, "tasks/s", floor_tp)
    row("floor set + get p50", pct(floor_lat, 0.5) * 1e6, "us")
    row("nbqueue record life p50", pct(lat, 0.5) * 1e6, "us", pct(floor_lat, 0.5) * 1e6)
    queue = f"bench-{uuid.uuid4().hex[:6]}"
    app = fresh_app(
        f"sqlite:///{os.path.join(tmp, uuid.uuid4().hex[:6] + '.db')}",
        f"{url}?key_prefix=bench-{uuid.uuid4().hex[:6]}",
        queue,
    )
    row("nbqueue (SQLite broker), worker in process, 4 threads", run_in_process(app, min(N, n), 4), "tasks/s")
    lat = latency(app, LAT_N)
    row("nbqueue round trip p50 (SQLite broker)", pct(lat, 0.5) * 1e3, "ms")
    app.close()


def main(argv: list[str]) -> None:
    kinds = argv or ["sqlite", "memory", "redis", "amqp", "sqs", "memcache"]
    tmp = tempfile.mkdtemp(prefix="nbqueue-bench-")
    print(f"nbqueue benchmarks on {os.cpu_count()} cores, Python {sys.version.split()[0]}")
    try:
        for kind in kinds:
            if kind == "redis" and not listening(6379):
                print("\n== redis: not reachable on 127.0.0.1:6379, skipped")
                continue
            if kind == "amqp" and not listening(5672):
                print("\n== amqp: not reachable on 127.0.0.1:5672, skipped")
                continue
            if kind == "sqs":
                bench_sqs(tmp)
            elif kind == "memcache":
                bench_memcache(tmp)
            else:
                bench_store(kind, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if any(k in ("sqs", "memcache") for k in kinds):
            import bench_stores

            bench_stores.servers.stop_all()


if __name__ == "__main__":
    main(sys.argv[1:])
