"""The result cache: a hit's round trip beside a plain ``send_task`` round trip, measured in the same run.

    .venv/bin/python benchmarks/bench_cache.py            # the embedded SQLite store, then Redis
    .venv/bin/python benchmarks/bench_cache.py sqlite     # one of them (Redis: BENCH_REDIS, 127.0.0.1:6379)

Round trip: ``task.delay(x).get()`` in the sending thread, with a worker of 1 thread in the
same process (threads pool), over a task that does nothing but return its argument.

- **plain**: a task without the cache: send, a worker runs it, the result is read (the floor).
- **hit**: a task registered with ``cache=True`` whose key has a stored result: the send
  looks the key up, copies the result into a new record and returns; ``get()`` reads it.
- **miss**: the same cached task with new arguments each time (the lookup, the claim and
  the entry are the overhead over **plain**).
- **hit after a restart**: the first hit in a fresh interpreter (a restarted kernel): the
  App is made, the task defined and the store connected (one call, timed apart: a
  kernel's worker connects when ``%load_ext nbqueue`` starts it), then one send is
  timed. Issue target: under 50 ms.

Medians of ``N`` sends (alternating plain and hit), and ratios to the plain round trip.
"""
from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import nbqueue  # noqa: E402

REDIS_URL = os.environ.get("BENCH_REDIS", "redis://127.0.0.1:6379/14")
N = int(os.environ.get("N", "300"))
RESTARTS = int(os.environ.get("RESTARTS", "5"))

TASKS = textwrap.dedent('''
    import nbqueue

    def define(app):
        @app.task(name="plain")
        def plain(x):
            return x

        @app.task(name="cached", cache=True)
        def cached(x):
            return x

        return plain, cached
''')


def store_url(kind: str, tmp: str) -> tuple[str, str | None]:
    """(URL, Redis key prefix to delete afterwards or None)."""
    if kind == "sqlite":
        return f"sqlite:///{tmp}/bench-cache.db", None
    prefix = f"nbqbench-cache-{uuid.uuid4().hex[:8]}:"
    return f"{REDIS_URL}?key_prefix={prefix}", prefix


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1000


def first_hit_in_a_fresh_process(url: str, tmp: str) -> tuple[float, float]:
    """(ms of the first store call, ms of the first cached send) in a new interpreter (its App
    made and its task defined first)."""
    code = textwrap.dedent(f'''
        import sys, time
        sys.path[:0] = [{os.path.dirname(HERE)!r}, {tmp!r}]
        import nbqueue, bench_cache_tasks
        app = nbqueue.App({url!r})
        plain, cached = bench_cache_tasks.define(app)
        t = time.perf_counter()
        app.backend.kv_get("nbqbench:connect")      # the first call connects (a kernel's worker does it at start)
        connect = (time.perf_counter() - t) * 1000
        t = time.perf_counter()
        result = cached.delay(0)
        value = result.get(timeout=30)
        ms = (time.perf_counter() - t) * 1000
        assert value == 0 and app.cache_info(result.id)["hit"], app.cache_info(result.id)
        print(connect, ms)
        app.close()
    ''')
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    connect, ms = map(float, out.stdout.split()[-2:])
    return connect, ms


def run(kind: str) -> dict:
    tmp = tempfile.mkdtemp(prefix="nbqueue-bench-cache-")
    with open(os.path.join(tmp, "bench_cache_tasks.py"), "w") as fh:
        fh.write(TASKS)
    sys.path.insert(0, tmp)
    import bench_cache_tasks

    url, prefix = store_url(kind, tmp)
    app = nbqueue.App(url)
    try:
        plain, cached = bench_cache_tasks.define(app)
        app.start_worker(concurrency=1)
        for i in range(20):                                  # warm: connections, code hash, the first result
            plain.delay(i).get(timeout=30)
            cached.delay(0).get(timeout=30)
        plains, hits, misses = [], [], []
        for i in range(N):
            plains.append(timed(lambda: plain.delay(i).get(timeout=30)))
            hits.append(timed(lambda: cached.delay(0).get(timeout=30)))
            misses.append(timed(lambda: cached.delay(1_000_000 + i).get(timeout=30)))
        fresh = [first_hit_in_a_fresh_process(url, tmp) for _ in range(RESTARTS)]
        restarted = sorted(ms for _, ms in fresh)
        return {"plain": statistics.median(plains), "hit": statistics.median(hits), "miss": statistics.median(misses),
                "restart": statistics.median(restarted), "restart_max": restarted[-1],
                "connect": statistics.median(c for c, _ in fresh)}
    finally:
        app.close()
        if prefix is not None:
            import redis

            client = redis.Redis.from_url(REDIS_URL)
            keys = list(client.scan_iter(match=prefix + "*", count=1000))
            if keys:
                client.delete(*keys)
            client.close()


def main() -> None:
    kinds = sys.argv[1:] or ["sqlite", "redis"]
    print(f"round trips, median of {N} (ms); 'after restart': first hit in a fresh interpreter, median of {RESTARTS}")
    print(f"{'store':8} {'plain':>8} {'hit':>8} {'hit/plain':>10} {'miss':>8} {'miss/plain':>11} "
          f"{'hit after restart':>18} {'(connecting first)':>19}")
    for kind in kinds:
        r = run(kind)
        print(f"{kind:8} {r['plain']:8.2f} {r['hit']:8.2f} {r['hit'] / r['plain']:10.2f} {r['miss']:8.2f} "
              f"{r['miss'] / r['plain']:11.2f} {r['restart']:8.1f} (max {r['restart_max']:5.1f}) {r['connect']:19.1f}")
    print(f"load average: {' '.join(f'{x:.1f}' for x in os.getloadavg())} on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
