"""SQLite: broker and result backend in one file (WAL mode), safe for many processes of one machine.

``sqlite:///relative/file.db`` (three slashes: a path relative to the current directory of
each process, as SQLAlchemy reads it: ``sqlite:///tmp/x/jobs.db`` is ``./tmp/x/jobs.db``),
``sqlite:////abs/path/file.db`` (four slashes: an absolute path), ``sqlite://`` (./.nbqueue/nbqueue.db).
A worker started in another directory would use another file: the broker's repr, ``nbqueue status``
and the worker's start line show the file's absolute path. No extra to install.
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
