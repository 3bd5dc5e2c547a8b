"""The AMQP floor for bench.py: a plain pika loop with publisher confirms and acks."""
from __future__ import annotations

import time
import uuid

import pika


def amqp_floor(url: str, n: int) -> float:
    """Publish ``n`` persistent messages with confirms to a durable queue, then consume and
    ack each (prefetch 100), with pika's BlockingConnection as a plain script would.
    Returns messages per second, end to end."""
    params = pika.URLParameters(url)
    conn = pika.BlockingConnection(params)
    ch = conn.channel()
    queue = f"floor-{uuid.uuid4().hex[:8]}"
    ch.queue_declare(queue, durable=True, arguments={"x-max-priority": 9})
    ch.confirm_delivery()
    props = pika.BasicProperties(delivery_mode=2)
    started = time.perf_counter()
    for i in range(n):
        ch.basic_publish("", queue, str(i).encode(), props)      # waits for the broker's confirm
    ch.basic_qos(prefetch_count=100)
    got = 0
    for method, _props, _body in ch.consume(queue, inactivity_timeout=5):
        if method is None:
            break
        ch.basic_ack(method.delivery_tag)
        got += 1
        if got == n:
            break
    elapsed = time.perf_counter() - started
    ch.cancel()
    ch.queue_delete(queue)
    conn.close()
    return n / elapsed
