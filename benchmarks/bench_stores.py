"""SQS and Memcache rows for bench.py, each beside its floor measured in the same run.

SQS runs against moto's server on 127.0.0.1 (started here on a free port, as the tests
do; BENCH_SQS=http://host:port uses one that runs), so its figures measure nbqueue's
overhead over plain boto3 against the same local endpoint, not AWS. memcached is started
here too (BENCH_MEMCACHE=host:port uses one that runs).
"""
from __future__ import annotations

import os
import sys
import time
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

import servers  # noqa: E402  (tests/servers.py: local servers on free ports)

N_SQS = int(os.environ.get("N_SQS", "300"))     # moto receives in time linear in the queue's length
LAT_SQS = int(os.environ.get("LAT_SQS", "100"))
N_MEMCACHE = int(os.environ.get("N_MEMCACHE", "5000"))


def sqs_url() -> str | None:
    if os.environ.get("BENCH_SQS"):
        os.environ["NBQUEUE_TEST_SQS"] = os.environ["BENCH_SQS"]
    try:
        host, port = servers.MOTO.get()
    except RuntimeError as exc:
        print(f"\n== sqs: {exc}; skipped")
        return None
    return f"sqs://bench:bench@{host}:{port}?region=us-east-1"


def memcache_address() -> tuple[str, int] | None:
    if os.environ.get("BENCH_MEMCACHE"):
        os.environ["NBQUEUE_TEST_MEMCACHE"] = os.environ["BENCH_MEMCACHE"]
    try:
        return servers.MEMCACHED.get()
    except RuntimeError as exc:
        print(f"\n== memcache: {exc}; skipped")
        return None


def _boto3_client(url: str):
    from urllib.parse import urlsplit

    import boto3

    parts = urlsplit(url)
    return boto3.session.Session().client("sqs", region_name="us-east-1", endpoint_url=f"http://{parts.hostname}:{parts.port}",
                                          aws_access_key_id="bench", aws_secret_access_key="bench")


def sqs_floor(url: str, n: int, lat_n: int) -> tuple[float, list[float]]:
    """Plain boto3: send ``n`` messages in batches of 10, receive them 10 at a time and delete
    each batch (tasks/s); then ``lat_n`` round trips of one message (send, long-poll receive,
    delete)."""
    client = _boto3_client(url)
    queue = client.create_queue(QueueName=f"floor-{uuid.uuid4().hex[:8]}")["QueueUrl"]
    started = time.perf_counter()
    for start in range(0, n, 10):
        client.send_message_batch(
            QueueUrl=queue, Entries=[{"Id": str(i), "MessageBody": str(start + i)} for i in range(min(10, n - start))]
        )
    got = 0
    while got < n:
        messages = (
            client.receive_message(QueueUrl=queue, MaxNumberOfMessages=10, WaitTimeSeconds=1).get("Messages") or []
        )
        if messages:
            client.delete_message_batch(
                QueueUrl=queue,
                Entries=[{"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(messages)],
            )
            got += len(messages)
    throughput = n / (time.perf_counter() - started)
    lat = []
    for i in range(lat_n):
        t0 = time.perf_counter()
        client.send_message(QueueUrl=queue, MessageBody=str(i))
        messages = []
        while not messages:
            messages = (
                client.receive_message(QueueUrl=queue, MaxNumberOfMessages=1, WaitTimeSeconds=1).get("Messages") or []
            )
        client.delete_message(QueueUrl=queue, ReceiptHandle=messages[0]["ReceiptHandle"])
        lat.append(time.perf_counter() - t0)
    client.delete_queue(QueueUrl=queue)
    return throughput, lat


def memcache_floor(address: tuple[str, int], n: int) -> tuple[float, list[float]]:
    """Plain pymemcache: per task a set of its record and a get of it (records/s, and the
    time of one set + get)."""
    from pymemcache.client.base import Client

    client = Client(address, no_delay=True, default_noreply=False)
    prefix = f"floor-{uuid.uuid4().hex[:6]}:"
    body = b'{"id": "x", "state": "SUCCESS", "result": "1"}'
    lat = []
    started = time.perf_counter()
    for i in range(n):
        t0 = time.perf_counter()
        client.set(f"{prefix}{i}", body)
        client.get(f"{prefix}{i}")
        lat.append(time.perf_counter() - t0)
    throughput = n / (time.perf_counter() - started)
    client.close()
    return throughput, lat


def memcache_backend_life(url: str, n: int) -> tuple[float, list[float]]:
    """nbqueue's MemcacheBackend over a task's record life: create (PENDING), begin
    (fenced token), store_result, get. Returns (tasks/s, per-task times)."""
    from nbqueue import states
    from nbqueue.drivers.memcache.backend import MemcacheBackend

    be = MemcacheBackend(url, options={"key_prefix": f"bench-{uuid.uuid4().hex[:6]}"})
    lat = []
    started = time.perf_counter()
    for i in range(n):
        t0 = time.perf_counter()
        task_id = f"t{i}"
        be.create([{"id": task_id, "name": "noop", "args": "[1]", "kwargs": "{}", "queue": "q"}])
        token = be.begin(task_id, worker="w")
        be.store_result(task_id, states.SUCCESS, token=token, result="1")
        be.get(task_id)
        lat.append(time.perf_counter() - t0)
    throughput = n / (time.perf_counter() - started)
    be.close()
    return throughput, lat
