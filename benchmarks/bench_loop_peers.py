"""Huey and Celery apps for bench_loop.py's worker processes, built from the environment.

    BENCH_PEER=huey-sqlite BENCH_PATH=/tmp/x.db (or huey-redis with BENCH_URL, BENCH_NAME) python -c \
        "import bench_loop_peers as p; p.huey_consumer(p.huey).run()"
    celery -A bench_loop_peers:celery_app worker (BENCH_URL: the AMQP URL, BENCH_NAME: the queue)
"""
from __future__ import annotations

import os

PEER = os.environ.get("BENCH_PEER", "")
huey = None
celery_app = None

if PEER.startswith("huey"):
    from huey import MemoryHuey, RedisHuey, SqliteHuey

    if PEER == "huey-sqlite":
        huey = SqliteHuey(os.environ.get("BENCH_NAME", "bench"), filename=os.environ["BENCH_PATH"])
    elif PEER == "huey-redis":
        huey = RedisHuey(os.environ.get("BENCH_NAME", "bench"), url=os.environ["BENCH_URL"])
    else:
        huey = MemoryHuey("bench")

    @huey.task()
    def add(x, y):
        return x + y

if PEER == "celery":
    from celery import Celery

    celery_app = Celery("bench_loop_peers", broker=os.environ["BENCH_URL"], backend="rpc://")
    celery_app.conf.task_default_queue = os.environ.get("BENCH_NAME", "celery")
    celery_app.conf.worker_hijack_root_logger = False

    @celery_app.task(name="add")
    def add(x, y):  # noqa: F811
        return x + y


def huey_consumer(instance):
    """Huey's consumer with its polling turned down to 1 ms (4 worker threads)."""
    return instance.create_consumer(workers=4, initial_delay=0.001, max_delay=0.001, backoff=1.0, periodic=False,
                                    check_worker_health=False)
