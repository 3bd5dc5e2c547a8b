"""The process pool, beside floors measured in the same run (the machine is shared and noisy).

    .venv/bin/python benchmarks/bench_pool.py            # the embedded SQLite store
    .venv/bin/python benchmarks/bench_pool.py redis      # Redis on 127.0.0.1:6379 (BENCH_REDIS)

- CPU-bound: 16 tasks of about 0.3 s of pure-Python work on ``pool="processes",
  concurrency=2``, against ``multiprocessing.Pool(2).map`` of the same function (the
  floor) and against ``pool="threads", concurrency=2``. Targets: within 1.2x of the floor,
  at least 1.7x as fast as threads.
- Overhead: 2,000 no-op tasks on ``pool="processes", concurrency=2`` against
  ``concurrent.futures.ProcessPoolExecutor(2)`` (submit all, wait for all). Target: at
  least half the floor's throughput.
- Shipping: the first call of a freshly defined notebook function (a group of two, one
  per child, each loading the new code) against later calls of the same function.
  Target: under 50 ms more.

Every pool is warm before it is timed (children started, the function loaded once);
nbqueue's figures include sending, the worker's bookkeeping and waiting for the results.
Rounds alternate between the floor and nbqueue, and the best of each is printed.
"""
from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import statistics
import sys
import tempfile
import textwrap
import time
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import nbqueue  # noqa: E402
from nbqueue.testing import wait_for  # noqa: E402

REDIS_URL = os.environ.get("BENCH_REDIS", "redis://127.0.0.1:6379/14")
CPU_TASKS = 16
NOOP_TASKS = int(os.environ.get("NOOP_N", "2000"))
ROUNDS = int(os.environ.get("ROUNDS", "3"))
PREFETCH = 16          # messages each executor thread reserves at once, as in bench.py's throughput runs


def burn(n):
    """Pure-Python CPU work: about ``n`` loop iterations."""
    total = 0
    for i in range(n):
        total += i * i % 7
    return total


def noop(i=None):
    return i


def calibrate(seconds: float = 0.3) -> int:
    """Iterations of ``burn`` that take about ``seconds`` here (best of three)."""
    n = 200_000
    best = min(_timed(burn, n) for _ in range(3))
    return int(n * seconds / best)


def _timed(fn, *args) -> float:
    started = time.perf_counter()
    fn(*args)
    return time.perf_counter() - started


def row(label, value, unit, floor=None, better="lower"):
    ratio = f"  ({value / floor:.2f}x floor)" if floor else ""
    print(f"  {label:<58} {value:>9.3f} {unit}{ratio}", flush=True)


def ready_worker(app, **options):
    worker = app.start_worker(**options)
    if worker.pool is not None:
        worker.pool.start(wait=True)
    wait_for(
        lambda: any(w.get("worker_id") == worker.name for w in app.backend.workers()),
        timeout=30,
        message="worker registered",
    )
    return worker


def run_group(app, sigs, timeout=600) -> float:
    started = time.perf_counter()
    results = app.send_many(sigs)
    app.backend.wait([r.id for r in results], timeout=timeout)
    elapsed = time.perf_counter() - started
    bad = [r.id for r in results if r.state != nbqueue.states.SUCCESS]
    assert not bad, f"{len(bad)} task(s) did not succeed"
    return elapsed


def fresh_app(url_factory):
    broker = url_factory()
    return nbqueue.App(broker, default_queue=f"bench-pool-{uuid.uuid4().hex[:6]}")


def cpu_bound(url_factory, n: int) -> None:
    print(
        f"\n== CPU-bound: {CPU_TASKS} tasks of burn({n:,}) (~0.3 s each), 2 workers, best of {ROUNDS} rounds",
        flush=True,
    )
    times: dict[str, list[float]] = {"serial": [], "floor": [], "processes": [], "threads": []}
    with multiprocessing.Pool(2) as mp_pool:
        mp_pool.map(burn, [1000, 1000])                       # warm
        apps = {}
        for pool in ("processes", "threads"):
            app = fresh_app(url_factory)
            task = app.task(burn, name="burn")
            worker = ready_worker(app, pool=pool, concurrency=2)
            run_group(app, [task.s(1000), task.s(1000)])      # warm: the function is loaded in both children
            apps[pool] = (app, task, worker)
        for _ in range(ROUNDS):                               # interleaved: the machine's load hits all alike
            started = time.perf_counter()
            for _ in range(CPU_TASKS):
                burn(n)
            times["serial"].append(time.perf_counter() - started)
            started = time.perf_counter()
            mp_pool.map(burn, [n] * CPU_TASKS, chunksize=1)
            times["floor"].append(time.perf_counter() - started)
            for pool, (app, task, _) in apps.items():
                times[pool].append(run_group(app, [task.s(n) for _ in range(CPU_TASKS)]))
        for app, _, worker in apps.values():
            worker.stop(timeout=60)
            app.close()
    serial, floor, processes, threads = (min(times[k]) for k in ("serial", "floor", "processes", "threads"))
    row("serial: the same calls one after another, in this process", serial, "s")
    row("floor: multiprocessing.Pool(2).map", floor, "s")
    row('nbqueue, pool="processes", concurrency=2', processes, "s", floor)
    row('nbqueue, pool="threads", concurrency=2', threads, "s", floor)
    print(f"  processes: {processes / floor:.2f}x the floor's time (target <= 1.2x), "
          f"{threads / processes:.2f}x as fast as threads (target >= 1.7x); the floor ran "
          f"{serial / floor:.2f}x as fast as serial (the parallelism the machine gave this run)", flush=True)


def overhead(url_factory) -> None:
    print(f"\n== overhead: {NOOP_TASKS:,} no-op tasks, 2 child processes, best of {ROUNDS} rounds", flush=True)
    floors: list[float] = []
    figures: dict[str, list[float]] = {"processes": [], "threads": []}
    apps = {}
    for pool in figures:
        app = fresh_app(url_factory)
        task = app.task(noop, name="noop")
        worker = ready_worker(app, pool=pool, concurrency=2, prefetch=PREFETCH)
        run_group(app, [task.s(0), task.s(1)])
        apps[pool] = (app, task, worker)
    with concurrent.futures.ProcessPoolExecutor(2) as executor:
        list(executor.map(noop, range(10)))                   # warm
        for _ in range(ROUNDS):
            started = time.perf_counter()
            futures = [executor.submit(noop, i) for i in range(NOOP_TASKS)]
            for f in futures:
                f.result()
            floors.append(NOOP_TASKS / (time.perf_counter() - started))
            for pool, (app, task, _) in apps.items():
                figures[pool].append(NOOP_TASKS / run_group(app, [task.s(i) for i in range(NOOP_TASKS)]))
    for app, _, worker in apps.values():
        worker.stop(timeout=60)
        app.close()
    floor, tp, threads = max(floors), max(figures["processes"]), max(figures["threads"])
    row("floor: concurrent.futures.ProcessPoolExecutor(2)", floor, "tasks/s")
    row(f'nbqueue, pool="processes", concurrency=2, prefetch={PREFETCH}', tp, "tasks/s", floor)
    row(f'nbqueue, pool="threads", concurrency=2, prefetch={PREFETCH} (no child)', threads, "tasks/s", floor)
    print(f"  {tp / floor:.2f}x the floor's throughput (target >= 0.5x); {tp / threads:.2f}x the thread pool's "
          "(what a round trip to a child costs each task)", flush=True)


def notebook_function(source: str, name: str):
    """A function as a notebook cell defines it: in ``__main__``, from a file only linecache knows."""
    import linecache

    filename = f"<cell {uuid.uuid4().hex[:8]}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    namespace = {"__name__": "__main__"}
    exec(compile(source, filename, "exec"), namespace)
    return namespace[name]


def shipping(url_factory, fresh: int = 10, later: int = 7) -> None:
    print(
        f"\n== shipping: the first call of a freshly defined notebook function on 2 children ({fresh} functions)",
        flush=True,
    )
    app = fresh_app(url_factory)
    worker = ready_worker(app, pool="processes", concurrency=2, prefetch=1)
    # a kernel's worker reads the code queues (where notebook functions go) from the start; one
    # started by a script does once a notebook function is registered: this one, before timing
    warm = app.task(notebook_function("def warm(x):\n    return x\n", "warm"), name="warm")
    run_group(app, [warm.s(0), warm.s(1)])
    extra = []
    firsts, steadies = [], []
    for k in range(fresh):
        source = textwrap.dedent(f"""
            import math

            table = [math.sqrt(i) for i in range(100)]

            def helper(x):
                return table[x % 100] * {k}

            def fresh(x):
                return round(helper(x) + len(table), 3)
            """)
        task = app.task(notebook_function(source, "fresh"), name=f"fresh{k}")
        first = run_group(app, [task.s(1), task.s(2)])
        steady = statistics.median(run_group(app, [task.s(1), task.s(2)]) for _ in range(later))
        firsts.append(first)
        steadies.append(steady)
        extra.append(first - steady)
    worker.stop(timeout=60)
    app.close()
    row("later calls of the same function (median)", statistics.median(steadies) * 1e3, "ms")
    row(
        "first call of a fresh function (median)",
        statistics.median(firsts) * 1e3,
        "ms",
        statistics.median(steadies) * 1e3,
    )
    print(f"  the first call adds {statistics.median(extra) * 1e3:.1f} ms (median), {max(extra) * 1e3:.1f} ms (max) "
          f"(target < 50 ms)", flush=True)


def main(argv: list[str]) -> None:
    kind = argv[0] if argv else "sqlite"
    tmp = tempfile.mkdtemp(prefix="nbqueue-bench-pool-")
    if kind == "sqlite":
        def url_factory():
            return f"sqlite:///{tmp}/{uuid.uuid4().hex[:6]}.db"
    elif kind == "redis":
        def url_factory():
            return REDIS_URL
    else:
        raise SystemExit(f"unknown store {kind!r} (sqlite or redis)")
    print(f"nbqueue process pool benchmarks on {os.cpu_count()} cores, Python {sys.version.split()[0]}, store {kind}")
    n = calibrate()
    cpu_bound(url_factory, n)
    overhead(url_factory)
    shipping(url_factory)


if __name__ == "__main__":
    main(sys.argv[1:])
