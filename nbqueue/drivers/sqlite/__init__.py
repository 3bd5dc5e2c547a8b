"""SQLite: broker and result backend in one file (WAL mode), safe for many processes of one machine.

``sqlite:///path/to/file.db``, ``sqlite://`` (./.nbqueue/nbqueue.db). No extra to install.
"""
NAME = "sqlite"
SCHEMES = ("sqlite",)
BROKER = "nbqueue.drivers.sqlite.broker:SQLiteBroker"
BACKEND = "nbqueue.drivers.sqlite.backend:SQLiteBackend"
ENGINE = "nbqueue.drivers.sqlite.engine:SQLiteEngine"
PAYLOADS = "nbqueue.drivers.sqlite.payloads:SQLitePayloads"
OPTIONS: frozenset = frozenset()
EXTRA = None
RESULTS_BESIDE = True
