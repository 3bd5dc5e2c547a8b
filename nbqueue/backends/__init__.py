"""Result backends by URL scheme, imported lazily."""
from __future__ import annotations

from ..brokers import resolve
from .base import ResultBackend

BACKENDS = {
    "sqlite": ("nbqueue.backends.sqlite", "SQLiteBackend", None),
    "memory": ("nbqueue.backends.redis", "RedisBackend", "redis"),
    "redis": ("nbqueue.backends.redis", "RedisBackend", "redis"),
    "rediss": ("nbqueue.backends.redis", "RedisBackend", "redis"),
    "memcache": ("nbqueue.backends.memcache", "MemcacheBackend", "memcache"),
    "amqp": ("nbqueue.backends.amqp", "AMQPBackend", "amqp"),
    "amqps": ("nbqueue.backends.amqp", "AMQPBackend", "amqp"),
}


def backend_from_url(url: str, **kwargs) -> ResultBackend:
    return resolve(BACKENDS, url, "result backend")(url, **kwargs)


__all__ = ["ResultBackend", "backend_from_url", "BACKENDS"]
