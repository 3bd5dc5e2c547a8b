"""The data plane: a 1,000,000 × 5 DataFrame through nbqueue, beside a floor measured in the same run.

    .venv/bin/python benchmarks/bench_payloads.py                     # sqlite redis amqp, each also with zstd
    .venv/bin/python benchmarks/bench_payloads.py sqlite redis        # some stores only
    ROWS=200000 ROUNDS=5 .venv/bin/python benchmarks/bench_payloads.py sqlite

The frame has the column types of the field: float64, int64, category, tz-aware datetime
(Europe/Paris) and strings. It is sent as the argument of a task that returns it; the
worker is an ``nbqueue worker`` process; each round sends a frame with one value changed
(so its payload is new and really written), ROUNDS times. Reported:

- the round trip (send to ``get()`` returning the frame), median of the rounds;
- payload bytes written to the store per round, against the frame's Arrow IPC size;
- the peak RSS of the producer and of the worker process (``getrusage``), also above
  their RSS before the frame was built (producer) or received (worker), against the
  frame's in-memory size (``memory_usage(deep=True)``);
- ``app.tasks()`` with those ROUNDS (10) results stored.

The floor, in the same run, is a plain script in a process of its own: pickle protocol 5
of the same frame written to the same store and read back (an SQLite BLOB insert and
select in a WAL file like nbqueue's; a Redis SET and GET), and unpickled. RabbitMQ keeps
results and payloads in SQLite, so its floor is SQLite's. Targets: round trip
within 2x the floor on SQLite and Redis; stored bytes within 1.2x Arrow IPC's size;
peak RSS at most 3x the frame; ``app.tasks()`` under 50 ms with 10 such results.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

ROWS = int(os.environ.get("ROWS", "1000000"))
ROUNDS = int(os.environ.get("ROUNDS", "10"))
REDIS_URL = os.environ.get("BENCH_REDIS", "redis://127.0.0.1:6379/14")
AMQP_URL = os.environ.get("BENCH_AMQP", "amqp://guest:guest@127.0.0.1:5672/%2F")

TASKS_MODULE = '''
import resource
import nbqueue

app = nbqueue.App.from_env()


@app.task(name="echo")
def echo(frame):
    return frame


@app.task(name="peak_rss")
def peak_rss():
    """The highest RSS since reset_peak (bytes)."""
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmHWM:"))


@app.task(name="reset_peak")
def reset_peak():
    """Start measuring the peak RSS afresh (Linux: clear_refs 5); returns the RSS now."""
    import gc

    import pandas  # noqa: F401  (imported before the baseline, as the producer has it)
    import pyarrow

    gc.collect()
    pyarrow.default_memory_pool().release_unused()
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize()
'''


def make_frame(rows: int):
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(13)
    return pd.DataFrame({
        "x": rng.random(rows),                                                       # float64
        "n": rng.integers(0, 10**12, rows),                                          # int64
        "kind": pd.Categorical(rng.choice(["alpha", "beta", "gamma", "delta"], rows)),  # category
        "when": pd.date_range("2024-01-01", periods=rows, freq="s", tz="Europe/Paris"),  # tz-aware datetime
        "name": [f"item-{i}" for i in range(rows)],                                  # strings
    })


def rss_now() -> int:
    import resource

    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize()


def peak_rss() -> int:
    """The highest RSS since reset_peak() (Linux VmHWM), in bytes."""
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmHWM:"))


def reset_peak() -> None:
    """Measure the peak RSS afresh from now (Linux: writing 5 to clear_refs resets VmHWM), after
    handing back what the garbage collector and Arrow's allocator can free (as both producers have)."""
    import gc

    import pyarrow

    gc.collect()
    pyarrow.default_memory_pool().release_unused()
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


# -- the floor: a plain script -------------------------------------------------------------------------
def floor(kind: str, target: str) -> dict:
    """pickle protocol 5 of the frame, written to the store and read back, ROUNDS times."""
    import pickle

    import pandas  # noqa: F401  (imported before the baseline, as nbqueue's producer has it)
    import pyarrow  # noqa: F401

    base = rss_now()
    frame = make_frame(ROWS)
    reset_peak()
    frame_rss = rss_now()
    times, size = [], 0
    if kind == "sqlite":
        import sqlite3

        conn = sqlite3.connect(target, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("CREATE TABLE IF NOT EXISTS blobs (id INTEGER PRIMARY KEY, data BLOB)")
        for i in range(ROUNDS):
            frame.iloc[0, 0] = float(i)
            t0 = time.perf_counter()
            data = pickle.dumps(frame, protocol=5)
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("INSERT INTO blobs(id, data) VALUES (?, ?)", (i, data))
            conn.execute("COMMIT")
            back = pickle.loads(conn.execute("SELECT data FROM blobs WHERE id = ?", (i,)).fetchone()[0])
            times.append(time.perf_counter() - t0)
            size = len(data)
            del data, back
    else:
        import redis

        client = redis.Redis.from_url(target)
        prefix = f"nbqbench-floor-{uuid.uuid4().hex[:8]}:"
        try:
            for i in range(ROUNDS):
                frame.iloc[0, 0] = float(i)
                t0 = time.perf_counter()
                data = pickle.dumps(frame, protocol=5)
                client.set(f"{prefix}{i}", data)
                back = pickle.loads(client.get(f"{prefix}{i}"))
                times.append(time.perf_counter() - t0)
                size = len(data)
                del data, back
        finally:
            keys = list(client.scan_iter(match=prefix + "*"))
            if keys:
                client.delete(*keys)
    return {"times": times, "size": size, "peak": peak_rss(), "base": base, "before_rounds": frame_rss}


# -- nbqueue: the producer ---------------------------------------------------------------------------------
def producer(broker: str, backend: str, queue: str, compression: str | None) -> dict:
    import pandas as pd
    import pyarrow as pa

    import nbqueue

    app = nbqueue.App(broker, backend, default_queue=queue)     # the stores' modules imported before the baseline
    app.close()
    base = rss_now()
    frame = make_frame(ROWS)
    frame_size = int(frame.memory_usage(deep=True).sum())
    sink = pa.BufferOutputStream()
    table = pa.Table.from_pandas(frame, preserve_index=False)
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    arrow_size = sink.getvalue().size
    del sink, table, writer
    options = {"payload_compression": compression} if compression else {}
    app = nbqueue.App(broker, backend, default_queue=queue, **options)
    store = app.serializer.plane.store
    worker_base = app.send_task(nbqueue.Signature("reset_peak")).get(timeout=120)      # the worker is up
    reset_peak()
    producer_before = rss_now()
    times, ids = [], []
    for i in range(ROUNDS):
        frame.iloc[0, 0] = float(i)        # a new payload each round: written, not found already stored
        t0 = time.perf_counter()
        r = app.send_task(nbqueue.Signature("echo", args=[frame]))
        back = r.get(timeout=600)
        times.append(time.perf_counter() - t0)
        ids.append(r.id)
        if i < ROUNDS - 1:
            del back
        del r
    peak = peak_rss()
    pd.testing.assert_frame_equal(back, frame, check_exact=True)  # checked once the peak is read: it takes memory too
    del back
    stats = store.stats()
    store.reads = 0
    listings = []
    for _ in range(5):
        t0 = time.perf_counter()
        tasks = app.tasks()
        listings.append(time.perf_counter() - t0)
    assert store.reads == 0 and len(tasks) >= ROUNDS
    shown = repr(tasks["result"].iloc[0])
    worker_peak = app.send_task(nbqueue.Signature("peak_rss")).get(timeout=60)
    for task_id in ids:
        app.result(task_id).forget()
    app.close()
    return {
        "times": times,
        "payload_bytes": stats["bytes"],
        "payloads": stats["payloads"],
        "arrow_size": arrow_size,
        "frame_size": frame_size,
        "peak": peak,
        "base": base,
        "before_rounds": producer_before,
        "worker_peak": worker_peak,
        "worker_base": worker_base,
        "tasks_ms": [t * 1e3 for t in listings],
        "shown": shown,
    }


# -- orchestration ------------------------------------------------------------------------------------------
def run_json(args: list[str], env: dict | None = None) -> dict:
    out = subprocess.run([sys.executable, os.path.abspath(__file__), *args], capture_output=True, text=True,
                         env=env or os.environ.copy(), timeout=3600)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def mb(n: float) -> str:
    return f"{n / 1e6:,.1f} MB"


def bench(kind: str, tmp: str) -> None:
    compression = "zstd" if kind.endswith("-zstd") else None
    store_kind = kind.split("-")[0]
    queue = f"bench-payloads-{uuid.uuid4().hex[:8]}"
    prefix = f"nbqbench-{uuid.uuid4().hex[:8]}:"
    if store_kind == "sqlite":
        broker = backend = f"sqlite:///{tmp}/{kind}.db"
        floor_args = ["--floor", "sqlite", f"{tmp}/{kind}-floor.db"]
    elif store_kind == "redis":
        if not listening(6379):
            print(f"\n== {kind}: Redis not reachable on 6379, skipped")
            return
        broker = backend = f"{REDIS_URL}?key_prefix={prefix}"
        floor_args = ["--floor", "redis", REDIS_URL]
    else:
        if not listening(5672):
            print(f"\n== {kind}: RabbitMQ not reachable on 5672, skipped")
            return
        broker, backend = AMQP_URL, f"sqlite:///{tmp}/{kind}-results.db"
        floor_args = ["--floor", "sqlite", f"{tmp}/{kind}-floor.db"]
    print(f"\n== {kind}: {ROWS:,} x 5 frame, {ROUNDS} round trips, worker process (1 thread)", flush=True)
    fl = run_json(floor_args)
    with open(os.path.join(tmp, "bench_payload_tasks.py"), "w") as fh:
        fh.write(TASKS_MODULE)
    env = dict(os.environ, NBQUEUE_BROKER=broker, NBQUEUE_BACKEND=backend, NBQUEUE_DEFAULT_QUEUE=queue,
               PYTHONPATH=os.pathsep.join(filter(None, [tmp, ROOT, os.environ.get("PYTHONPATH")])))
    if compression:
        env["NBQUEUE_PAYLOAD_COMPRESSION"] = compression
    log = open(os.path.join(tmp, f"{kind}-worker.log"), "wb")
    worker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "nbqueue",
            "--log-level",
            "WARNING",
            "worker",
            "--app",
            "bench_payload_tasks:app",
            "--concurrency",
            "1",
        ],
        cwd=tmp,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        nb = run_json(["--producer", broker, backend, queue, compression or ""], env=env)
    finally:
        worker.terminate()
        try:
            worker.wait(60)
        except subprocess.TimeoutExpired:
            worker.kill()
        log.close()
        if store_kind == "redis":
            import redis

            client = redis.Redis.from_url(REDIS_URL)
            keys = list(client.scan_iter(match=prefix + "*"))
            if keys:
                client.delete(*keys)
        if store_kind == "amqp":
            import nbqueue

            app = nbqueue.App(AMQP_URL, f"sqlite:///{tmp}/{kind}-results.db", default_queue=queue)
            app.broker.delete_queues([queue])
            app.close()
    rt, floor_rt = statistics.median(nb["times"]), statistics.median(fl["times"])
    frame = nb["frame_size"]
    per_round = nb["payload_bytes"] / max(1, nb["payloads"])
    print(f"  frame in memory {mb(frame)}; Arrow IPC {mb(nb['arrow_size'])}; pickle protocol 5 {mb(fl['size'])}")
    print(f"  {'round trip (median), nbqueue':<52} {rt * 1e3:>9.0f} ms   ({rt / floor_rt:.2f}x floor)")
    print(f"  {'  best / worst':<52} {min(nb['times']) * 1e3:>9.0f} / {max(nb['times']) * 1e3:.0f} ms")
    floor_store = "Redis SET/GET" if floor_args[1] == "redis" else "SQLite BLOB insert/select"
    print(f"  {'floor: pickle + ' + floor_store + ' (median)':<52} {floor_rt * 1e3:>9.0f} ms")
    print(
        f"  {'payload bytes written per round trip':<52} {mb(per_round):>12}   ({per_round / nb['arrow_size']:.2f}x "
        "Arrow IPC, "
        f"{nb['payloads']} payloads for {ROUNDS} rounds)"
    )
    for label, peak, before in (
        ("producer", nb["peak"], nb["before_rounds"]),
        ("worker process", nb["worker_peak"], nb["worker_base"]),
        ("floor script", fl["peak"], fl["before_rounds"]),
    ):
        print(f"  {'peak RSS, ' + label + ', during the round trips':<52} {mb(peak):>12}   "
              f"(+{(peak - before) / frame:.2f}x the frame over its {mb(before)} before them)")
    print(
        f"  {'app.tasks() with ' + str(ROUNDS) + ' such results (median of 5)':<52} "
        f"{statistics.median(nb['tasks_ms']):>9.1f} ms"
        f"   (result column: {nb['shown']!r})",
        flush=True,
    )


def main(argv: list[str]) -> None:
    if argv and argv[0] == "--floor":
        print(json.dumps(floor(argv[1], argv[2])))
        return
    if argv and argv[0] == "--producer":
        print(json.dumps(producer(argv[1], argv[2], argv[3], argv[4] or None)))
        return
    kinds = argv or ["sqlite", "redis", "amqp", "sqlite-zstd", "redis-zstd", "amqp-zstd"]
    tmp = tempfile.mkdtemp(prefix="nbqueue-bench-payloads-")
    try:
        for kind in kinds:
            bench(kind, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main(sys.argv[1:])
