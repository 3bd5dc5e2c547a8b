"""A worker survives a Redis restart: it reconnects with back-off and the task that
was in flight completes once.

The test runs its own redis-server (append-only file, on a port of its own) so that
the restart does not disturb the shared server the other tests use.
"""
from __future__ import annotations

import threading
import time

import pytest

import nbqueue
from nbqueue.testing import wait_for

from conftest import RedisServer, require_binary


@pytest.fixture
def own_redis(tmp_path):
    require_binary("redis-server")
    server = RedisServer(str(tmp_path))
    server.start()
    yield server
    server.stop()


def test_worker_survives_a_redis_restart_and_the_task_in_flight_completes_once(own_redis):
    app = nbqueue.App(f"redis://127.0.0.1:{own_redis.port}/0", retries=20, retry_base=0.1, retry_cap=1.0)
    runs = []
    release = threading.Event()

    @app.task(name="long")
    def long(x):
        runs.append(x)
        release.wait(30)
        return x * 2

    worker = app.start_worker(concurrency=1)
    try:
        res = long.delay(21)
        wait_for(lambda: runs, message="the task started")
        # Given a task in flight, when Redis restarts under the worker
        own_redis.stop()
        time.sleep(0.5)
        own_redis.start()
        release.set()
        # Then the worker reconnects, the task's result is recorded, and it ran once
        assert res.get(timeout=60) == 42
        assert runs == [21]
        after = long.delay(1)                       # and the worker goes on taking work
        assert after.get(timeout=30) == 2
        assert wait_for(
            lambda: (
                app.broker.stats() and app.broker.stats()[0]["in_flight"] == 0 and app.broker.stats()[0]["ready"] == 0
            )
        )
    finally:
        release.set()
        worker.stop(timeout=10)
        app.close()
