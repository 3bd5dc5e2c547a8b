"""Cancelling a running task, beside floors measured in the same run (the machine is shared and noisy).

    .venv/bin/python benchmarks/bench_cancel.py                  # SQLite, Redis and RabbitMQ
    .venv/bin/python benchmarks/bench_cancel.py sqlite redis     # some of them

A worker runs in another process (``nbqueue worker --pool processes --concurrency 1``,
this file as its app), as a worker on another machine would. Twenty times: a task that
writes a line every 10 ms is sent, and once it runs (its first progress report is seen),
the sender calls ``cancel()``. Measured from just before ``cancel()``:

- **REVOKED visible**: until a second App (another connection, as another process would
  have) reads REVOKED, and the sender's ``get()`` raises ``TaskRevoked``;
- **child stopped**: until the child process running the task is gone (psutil; it is
  stopped with SIGTERM once the worker's heartbeat sees the cancel);
- **worker free**: until the next task sent to that worker has started (the child was
  replaced, the cancelled message settled).

Floors: one read of a record from the store (the lower bound of a worker noticing
anything), and the worker's poll interval (``control.CANCEL_POLL``: a cancel is noticed on
average half of it after it is stored). Target: p50 and max under 1 s.
Figures: p50 and max over 20 cancels.
"""
from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import nbqueue  # noqa: E402
from nbqueue.testing import wait_for  # noqa: E402

REDIS_URL = os.environ.get("BENCH_REDIS", "redis://127.0.0.1:6379/14")
AMQP_URL = os.environ.get("BENCH_AMQP", "amqp://guest:guest@127.0.0.1:5672/%2F")
CANCELS = int(os.environ.get("CANCELS", "20"))

app = nbqueue.App.from_env() if os.environ.get("NBQUEUE_BROKER") else None


def ticker(path: str, steps: int = 100_000):
    """Write ``<pid> <i>`` every 10 ms, reporting progress (the task that is cancelled)."""
    for i in range(steps):
        with open(path, "a") as fh:
            fh.write(f"{os.getpid()} {i}\n")
        nbqueue.report_progress(i + 1, steps)
        time.sleep(0.01)
    return steps


if app is not None:
    app.task(ticker, name="bench.ticker")


def urls(kind: str, directory: str) -> tuple[str, str]:
    if kind == "sqlite":
        url = f"sqlite:///{directory}/bench.db"
        return url, url
    if kind == "redis":
        url = f"{REDIS_URL}?key_prefix=bench-cancel-{uuid.uuid4().hex[:8]}:"
        return url, url
    if kind == "amqp":
        return AMQP_URL, f"sqlite:///{directory}/results.db"
    raise SystemExit(f"unknown store {kind!r}: sqlite, redis or amqp")


def first_pid(path: str) -> int | None:
    try:
        with open(path) as fh:
            line = fh.readline()
    except FileNotFoundError:
        return None
    return int(line.split()[0]) if line.endswith("\n") else None


def gone(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def pct(values: list[float]) -> str:
    return f"p50 {statistics.median(values) * 1000:7.1f} ms   max {max(values) * 1000:7.1f} ms"


def run(kind: str) -> None:
    directory = tempfile.mkdtemp(prefix="bench-cancel-")
    print("directory", directory) if os.environ.get("BENCH_LOG") else None
    broker, backend = urls(kind, directory)
    queue = f"bench-cancel-{uuid.uuid4().hex[:8]}"
    sender = nbqueue.App(broker, backend, default_queue=queue)
    other = nbqueue.App(broker, backend, default_queue=queue)
    env = dict(os.environ, NBQUEUE_BROKER=broker, NBQUEUE_BACKEND=backend, NBQUEUE_DEFAULT_QUEUE=queue,
               NBQUEUE_LOG_LEVEL=os.environ.get("BENCH_LOG", "WARNING"),
               PYTHONPATH=os.pathsep.join(filter(None, [HERE, ROOT, os.environ.get("PYTHONPATH")])))
    log = open(os.path.join(directory, "worker.log"), "wb")
    proc = subprocess.Popen([sys.executable, "-m", "nbqueue", "worker", "--app", "bench_cancel:app",
                             "--pool", "processes",
                             "--concurrency", "1"], env=env, cwd=directory, stdout=log, stderr=subprocess.STDOUT)
    visible, stopped, free, reads = [], [], [], []
    try:
        wait_for(lambda: any(w.get("pid") == proc.pid for w in sender.backend.workers()), 60,
                 message="the worker serving")
        for i in range(CANCELS):
            path = os.path.join(directory, f"side{i}.txt")
            r = sender.send_task(nbqueue.Signature("bench.ticker", args=[path]))
            wait_for(lambda: first_pid(path) is not None and r.reported_progress() is not None, 60,
                     message="the task running")
            child = first_pid(path)
            t = time.perf_counter()
            other.backend.states_of([r.id])
            reads.append(time.perf_counter() - t)
            t0 = time.perf_counter()
            assert r.cancel()
            wait_for(lambda: other.backend.states_of([r.id]).get(r.id) == nbqueue.states.REVOKED, 10, interval=0.001,
                     message="REVOKED")
            try:
                r.get(timeout=10)
            except nbqueue.TaskRevoked:
                visible.append(time.perf_counter() - t0)
            nxt = os.path.join(directory, f"next{i}.txt")
            follow = sender.send_task(nbqueue.Signature("bench.ticker", args=[nxt, 1]))
            wait_for(lambda: gone(child), 30, interval=0.001, message="the child stopped")
            stopped.append(time.perf_counter() - t0)
            wait_for(lambda: first_pid(nxt) is not None, 60, interval=0.001, message="the next task started")
            free.append(time.perf_counter() - t0)
            follow.get(timeout=30)
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        if kind == "amqp":
            sender.broker.delete_queues([queue])
        sender.close()
        other.close()
    from nbqueue.control import CANCEL_POLL

    floor = statistics.median(reads)
    print(f"{kind:7s} {CANCELS} cancels of a task running in a child process of a worker in another process")
    seen = statistics.median(visible) / floor
    print(f"  REVOKED visible to the sender  {pct(visible)}   ({seen:5.1f}x a store read)")
    ratio = statistics.median(stopped) / (floor + CANCEL_POLL / 2)
    print(f"  child process stopped          {pct(stopped)}   ({ratio:5.1f}x "
          f"read + half the poll interval)")
    print(f"  worker free for the next task  {pct(free)}")
    print(f"  floors: one store read p50 {floor * 1000:.2f} ms; poll interval {CANCEL_POLL * 1000:.0f} ms "
          f"(noticed on average {CANCEL_POLL * 500:.0f} ms after it is stored); target < 1000 ms")


def main(argv: list[str]) -> None:
    for kind in argv or ["sqlite", "redis", "amqp"]:
        run(kind)


if __name__ == "__main__":
    main(sys.argv[1:])
