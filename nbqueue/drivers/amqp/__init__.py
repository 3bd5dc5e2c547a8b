"""AMQP 0-9-1 (RabbitMQ): broker, and a result backend over RPC-style queues
(``amqp://``, ``amqps://``). Extra: ``nbqueue[amqp]``. Results default to the SQLite file.
"""
NAME = "amqp"
SCHEMES = ("amqp", "amqps")
BROKER = "nbqueue.drivers.amqp.broker:AMQPBroker"
BACKEND = "nbqueue.drivers.amqp.backend:AMQPBackend"
OPTIONS = frozenset({"reconnect_timeout", "confirm_timeout", "publish_batch", "eta_tolerance", "lock_timeout"})
EXTRA = "amqp"
QUIET_LOGGERS = ("pika",)
#: the longest queue name, in UTF-8 bytes: RabbitMQ's 255 less what the names nbqueue derives
#: from it add (a kernel's queue and its code queue, ``.kernel-<pid>-<hex>.code``: 27; the delay
#: queue of that, ``nbq.delay.<queue>.<ms>``: 21 more)
MAX_QUEUE_NAME = 200
RESERVED_QUEUE_PREFIXES = {"amq.": "reserved by RabbitMQ"}
