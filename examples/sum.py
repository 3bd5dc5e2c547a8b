"""The machinery example on nbqueue's embedded default: nothing to install or start.

Run with ``make demo``. A worker runs in background threads of this process; results
go to ./.nbqueue/nbqueue.db and are still there the next time you run it.
"""
import datetime as dt
import time

import nbqueue

app = nbqueue.App()  # broker and results in ./.nbqueue/nbqueue.db


@app.task(name="sum")
def total(numbers):
    return sum(numbers)


attempts = {"flaky": 0}


@app.task(name="flaky", retry_count=3, retry_timeout=0)
def flaky(x):
    """Fails twice, then succeeds: retried after 1 s and 2 s (machinery's Fibonacci back-off)."""
    attempts["flaky"] += 1
    if attempts["flaky"] < 3:
        raise ConnectionError(f"attempt {attempts['flaky']}: the service is not ready")
    return x * 2


@app.task(name="divide")
def divide(a, b):
    return a / b


@app.task(name="report")
def report(value, label="done"):
    print(f"callback: {label} -> {value}")
    return f"{label}: {value}"


def main() -> None:
    worker = app.start_worker(concurrency=2)  # returns at once

    # 1. the machinery example: the sum of 1..10
    res = app.send_task(nbqueue.Signature("sum", args=[list(range(1, 11))]))
    print("sum(1..10) =", res.get(timeout=10))

    # 2. a retry: fails twice, succeeds on the third attempt
    started = time.monotonic()
    res = flaky.delay(21)
    print("flaky(21) =", res.get(timeout=30), f"after {res.retries} retries, {time.monotonic() - started:.1f}s")

    # 3. a delayed task: not before its ETA
    eta = dt.datetime.now() + dt.timedelta(seconds=2)
    res = app.send_task(nbqueue.Signature("sum", args=[[1, 2, 3]], eta=eta))
    value = res.get(timeout=10)
    print(f"delayed sum = {value}, ran {res.info()['started_at'] - eta.timestamp():+.2f}s after its ETA")

    # 4. callbacks: on success the result is appended to the callback's args;
    #    after the final failure the error message is the error callback's first argument
    ok = app.signature("divide", args=[10, 4])
    ok.on_success = [app.signature("report", kwargs={"label": "10 / 4"})]
    res = app.send_task(ok)
    print("divide(10, 4) =", res.get(timeout=10), "| success callback:", res.callbacks[0].get(timeout=10))

    bad = app.signature("divide", args=[1, 0])
    bad.on_error = [app.signature("report", kwargs={"label": "1 / 0"})]
    res = app.send_task(bad)
    try:
        res.get(timeout=10)
    except nbqueue.TaskFailed as exc:
        print("divide(1, 0) failed as expected:", exc.exc_type, exc.message)
    print("error callback:", res.callbacks[0].get(timeout=10))

    worker.stop()
    frame = app.tasks(limit=8)
    print()
    print(frame[["name", "state", "args", "result", "error", "retries", "runtime"]].to_string(index=False))


if __name__ == "__main__":
    main()
