"""Dramatiq on the same RabbitMQ, for bench.py's AMQP comparison (``pip install -e '.[bench]'``).

The same workload as nbqueue's "worker process" figure: one worker process with 4
threads is started and ready; then N no-op messages are sent and the clock stops when
the worker has run the last one. Measured twice: with ``confirm_delivery=True`` (as
nbqueue always publishes; Dramatiq then waits for each confirm in turn) and with
Dramatiq's default (no confirms). Dramatiq acks after each message and stores no
results (nbqueue records every result in SQLite: Dramatiq does less work per task).

    .venv/bin/python benchmarks/bench_dramatiq.py          # prints tasks/s
"""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import uuid

AMQP_URL = os.environ.get("BENCH_AMQP", "amqp://guest:guest@127.0.0.1:5672/%2F")


def _broker(url: str, confirm: bool = True):
    from dramatiq.brokers.rabbitmq import RabbitmqBroker

    return RabbitmqBroker(url=url, confirm_delivery=confirm)


def _worker(url: str, queue: str, n: int) -> None:
    """The worker process: run n no-ops, then print when the last one finished."""
    import dramatiq

    broker = _broker(url)
    dramatiq.set_broker(broker)
    done = threading.Event()
    count = [0]
    lock = threading.Lock()

    @dramatiq.actor(queue_name=queue, max_retries=0, broker=broker)
    def noop(i=None):
        with lock:
            count[0] += 1
            if count[0] == n:
                done.set()

    worker = dramatiq.Worker(broker, worker_threads=4)
    worker.start()
    print("ready", flush=True)
    done.wait()
    print(f"done {time.time()!r}", flush=True)
    worker.stop()
    broker.close()


def dramatiq_throughput(url: str, n: int, confirm: bool = True) -> float:
    """Tasks per second, end to end, of one Dramatiq worker process with 4 threads."""
    import dramatiq

    queue = f"dq-{uuid.uuid4().hex[:8]}"
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "worker", url, queue, str(n)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        broker = _broker(url, confirm)
        dramatiq.set_broker(broker)

        @dramatiq.actor(queue_name=queue, max_retries=0, broker=broker)
        def noop(i=None):
            pass

        time.sleep(0.5)                      # the worker's consumers are up
        started = time.time()
        for i in range(n):
            noop.send(i)
        line = proc.stdout.readline().strip()
        finished = float(line.split()[1])
        proc.wait(30)
        for name in (queue, f"{queue}.DQ", f"{queue}.XQ"):
            broker.channel.queue_delete(name)
        broker.close()
        return n / (finished - started)
    finally:
        if proc.poll() is None:
            proc.kill()


if __name__ == "__main__":
    if sys.argv[1:2] == ["worker"]:
        _worker(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    else:
        n = int(os.environ.get("N", "5000"))
        print(
            f"dramatiq, worker process, 4 threads, confirm_delivery=True: {dramatiq_throughput(AMQP_URL, n):.0f} "
            "tasks/s"
        )
        print(
            f"dramatiq, worker process, 4 threads, no confirms: {dramatiq_throughput(AMQP_URL, n, confirm=False):.0f} "
            "tasks/s"
        )
