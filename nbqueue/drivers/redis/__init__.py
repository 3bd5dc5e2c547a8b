"""Redis: broker and result backend on one server (``redis://``, ``rediss://``), or in this
process over fakeredis (``memory://NAME``). Extra: ``nbqueue[redis]``.
"""
NAME = "redis"
SCHEMES = ("redis", "rediss", "memory")
BROKER = "nbqueue.drivers.redis.broker:RedisBroker"
BACKEND = "nbqueue.drivers.redis.backend:RedisBackend"
ENGINE = "nbqueue.drivers.redis.engine:RedisEngine"
PAYLOADS = "nbqueue.drivers.redis.payloads:RedisPayloads"
OPTIONS = frozenset({"max_block", "batch", "retries", "retry_base", "retry_cap", "socket_timeout",
                     "socket_connect_timeout", "health_check_interval", "client_name", "password"})
EXTRA = "redis"
RESULTS_BESIDE = True
LOCAL_SCHEMES = ("memory",)
