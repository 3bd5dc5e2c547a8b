"""The dashboard's cost: worker throughput with a live page open, and the first render's server time.

    .venv/bin/python benchmarks/bench_dashboard.py                 # SQLite (and Redis when listening)
    N=20000 ROUNDS=6 .venv/bin/python benchmarks/bench_dashboard.py sqlite

1. Throughput of N no-op tasks through one `nbqueue worker` process (4 threads), with and
   without a dashboard process (`nbqueue dashboard`) that has one page following its live
   updates (a client reading /api/events?view=home, as the page's EventSource does); the
   runs alternate (without, with, without, ...) and the medians are compared.
2. The server time of the home page's first render (GET /, measured in-process around
   the request) with 100,000 stored task records: finished ones (a store that has been in
   use), and waiting ones (100,000 messages queued: the queue counts read every message).
"""
from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

from bench import listening, run_process_worker  # noqa: E402

import nbqueue  # noqa: E402

N = int(os.environ.get("N", "20000"))
ROUNDS = int(os.environ.get("ROUNDS", "6"))
STORED = int(os.environ.get("STORED", "100000"))
REDIS_URL = os.environ.get("BENCH_REDIS", "redis://127.0.0.1:6379/14")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class OpenPage:
    """`nbqueue dashboard` in a process of its own, and one client following its live updates."""

    def __init__(self, broker: str, backend: str | None, queue: str):
        self.port = free_port()
        env = dict(os.environ, NBQUEUE_BROKER=broker, NBQUEUE_BACKEND=backend or "", NBQUEUE_DEFAULT_QUEUE=queue,
                   PYTHONPATH=os.pathsep.join([HERE, ROOT]))
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "nbqueue",
                "--log-level",
                "WARNING",
                "dashboard",
                "--app",
                "bench_tasks:app",
                "--port",
                str(self.port),
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.events = 0
        self.stop = threading.Event()
        deadline = time.time() + 30
        while not listening(self.port):
            if time.time() > deadline or self.proc.poll() is not None:
                raise RuntimeError("the dashboard did not start")
            time.sleep(0.05)
        self.thread = threading.Thread(target=self.follow, daemon=True)
        self.thread.start()
        while self.events == 0 and time.time() < deadline:
            time.sleep(0.02)
        self.cpu_start = self.cpu()

    def cpu(self) -> float:
        """CPU seconds the dashboard process has used (user + system)."""
        with open(f"/proc/{self.proc.pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def follow(self) -> None:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/api/events?view=home", timeout=60) as stream:
            for line in stream:
                if line.startswith(b"data: "):
                    self.events += 1
                if self.stop.is_set():
                    return

    def close(self) -> None:
        self.cpu_used = self.cpu() - self.cpu_start
        self.stop.set()
        self.proc.terminate()
        self.proc.wait(30)


def throughput(kind: str, tmp: str) -> None:
    from bench import fresh_app

    print(
        f"\n{kind}: {N} no-op tasks through one worker process (4 threads), {ROUNDS} rounds of three conditions, "
        "interleaved",
        flush=True,
    )
    rates: dict[str, list[float]] = {"no dashboard": [], "dashboard, no page": [], "one open page": []}
    shares, events = [], []
    for r in range(ROUNDS):
        for condition in rates:
            queue = f"dash-{uuid.uuid4().hex[:6]}"
            url = (
                f"sqlite:///{tmp}/{queue}.db"
                if kind == "sqlite"
                else f"{REDIS_URL}?key_prefix=bdash-{uuid.uuid4().hex[:6]}:"
            )
            app = fresh_app(url, url, queue)
            page = None
            if condition != "no dashboard":
                page = OpenPage(url, url, queue)
                if condition == "dashboard, no page":
                    page.stop.set()             # the follower leaves at its next event: the process idles
                    time.sleep(1.2)
                    page.cpu_start = page.cpu()
            try:
                rate = run_process_worker(app, url, url, queue, N, 4)
            finally:
                if page is not None:
                    page.close()
            rates[condition].append(rate)
            extra = ""
            if condition == "one open page":
                shares.append(page.cpu_used / (N / rate))
                events.append(page.events)
                extra = f"   (dashboard CPU {100 * shares[-1]:.1f}% of one core, {page.events} live updates)"
            print(f"  round {r + 1}: {condition:<20} {rate:8.0f} tasks/s{extra}", flush=True)
            if kind == "redis":
                import redis

                client = redis.Redis.from_url(REDIS_URL)
                prefix = url.split("key_prefix=")[1]
                for key in client.scan_iter(match=prefix + "*", count=1000):
                    client.delete(key)
            app.close()
    base_median, base_best = statistics.median(rates["no dashboard"]), max(rates["no dashboard"])
    for condition, values in rates.items():
        median, best = statistics.median(values), max(values)
        print(f"  {condition:<20} median {median:8.0f} tasks/s ({100 * (median / base_median - 1):+5.1f}%), "
              f"best {best:8.0f} ({100 * (best / base_best - 1):+5.1f}%)", flush=True)
    print(
        f"  the dashboard process used {100 * statistics.median(shares):.1f}% of one core while the page was open "
        "(median)",
        flush=True,
    )


def first_render(tmp: str) -> None:
    from starlette.testclient import TestClient

    from nbqueue.dashboard import create_app

    print(f"\nsqlite: the home page's first render with {STORED:,} stored tasks (server time, median of 7)", flush=True)
    for label, finished in (("finished records", True), ("waiting messages", False)):
        app = nbqueue.App(f"sqlite:///{tmp}/render-{label[:4]}.db", default_queue="render")
        sigs = [app.signature("add", args=(i, i)) for i in range(STORED)]
        for start in range(0, STORED, 5000):
            chunk = sigs[start:start + 5000]
            if finished:        # records as a worker leaves them; no message waiting
                prepared = [app.prepare(s) for s in chunk]
                app.backend.create([p[1] for p in prepared])
                now = time.time()
                app.backend.store_results(
                    [
                        (p[1]["id"], "SUCCESS", None, {"result": "4", "started_at": now, "finished_at": now})
                        for p in prepared
                    ]
                )
            else:
                app.send_many(chunk)
        client = TestClient(create_app(app), client=("127.0.0.1", 50000))
        times = {}
        for path in ("/", "/api/tasks", "/api/tasks?q=99999", "/metrics"):
            samples = []
            for _ in range(7):
                t0 = time.perf_counter()
                response = client.get(path)
                samples.append(time.perf_counter() - t0)
                assert response.status_code == 200, (path, response.status_code)
            times[path] = statistics.median(samples) * 1000
        print(f"  {label:<18} GET / {times['/']:7.1f} ms   (with counts: /api/tasks {times['/api/tasks']:6.1f} ms, "
              f"text search {times['/api/tasks?q=99999']:6.1f} ms, /metrics {times['/metrics']:6.1f} ms)", flush=True)
        app.close()


def main(argv: list[str]) -> None:
    warnings.filterwarnings("ignore", message="Using `httpx` with `starlette.testclient`")
    kinds = argv or ["sqlite", "redis"]
    tmp = tempfile.mkdtemp(prefix="nbq-bench-dash-")
    for kind in kinds:
        if kind == "redis" and not listening(6379):
            print("redis: not listening on 6379, skipped")
            continue
        if kind in ("sqlite", "redis"):
            throughput(kind, tmp)
    if "sqlite" in kinds:
        first_render(tmp)


if __name__ == "__main__":
    main(sys.argv[1:])
