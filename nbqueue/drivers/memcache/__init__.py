"""Memcached result backend (``memcache://host:port``). Extra: ``nbqueue[memcache]``."""
NAME = "memcache"
SCHEMES = ("memcache",)
BACKEND = "nbqueue.drivers.memcache.backend:MemcacheBackend"
OPTIONS = frozenset({"index_size", "max_item_size", "socket_timeout", "socket_connect_timeout"})
EXTRA = "memcache"
