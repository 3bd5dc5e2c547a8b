"""nbqueue: a job runner that feels at home in a Jupyter notebook.

Send task signatures to a broker, run them on workers (threads of this kernel or
``nbqueue worker`` processes), read states and results from a result backend, and
build group/chain/chord workflows. The default needs no server: an SQLite file.
"""
from . import states
from .app import App
from .errors import (BrokerError, CodeNotAllowed, ConfigurationError, ConnectionLost, DeadlockError, MessageError,
                     NbqueueError, NotRegistered, PayloadCorrupt, PayloadError, PayloadMissing, PayloadTooLarge,
                     PublishRefused, ResultNotFound, Retry, SerializationError, SignatureError, SoftTimeLimitExceeded,
                     TaskFailed, TaskRevoked, TimeLimitExceeded, UnsupportedOperation, WorkerLostError)
from .result import AsyncResult, ChainResult, ChordResult, GroupResult
from .retry import Backoff
from .signature import Signature
from .workflow import chain, chord, current_task, group

__version__ = "0.1.0"

__all__ = [
    "App", "Signature", "group", "chain", "chord", "Retry", "Backoff", "states", "current_task",
    "AsyncResult", "GroupResult", "ChainResult", "ChordResult",
    "NbqueueError", "BrokerError", "ConnectionLost", "PublishRefused", "ConfigurationError", "SerializationError",
    "MessageError", "NotRegistered", "TaskFailed", "TaskRevoked", "SignatureError", "UnsupportedOperation", "ResultNotFound",
    "DeadlockError", "progress", "export_notebook",
    "CodeNotAllowed", "WorkerLostError", "TimeLimitExceeded", "SoftTimeLimitExceeded",
    "PayloadError", "PayloadMissing", "PayloadCorrupt", "PayloadTooLarge",
]


def progress(result):
    """Show a live progress view of any result in a notebook (text in a terminal)."""
    from .notebook.widgets import progress as _progress

    return _progress(result)


def export_notebook(path, out=None) -> str:
    """The notebook's tasks, with the code they need, as an importable module's text; written to ``out`` if given.

    See nbqueue.notebook.export: names that cannot be resolved are listed, not guessed.
    """
    from .notebook.export import export_notebook as _export

    return _export(path, out)


def load_ipython_extension(ipython):
    """``%load_ext nbqueue``: registers %%task and %nbqueue."""
    from .notebook.magics import load_ipython_extension as _load

    _load(ipython)


def unload_ipython_extension(ipython):
    """``%unload_ext nbqueue``."""
    from .notebook.magics import unload_ipython_extension as _unload

    _unload(ipython)
